// naga takes subgroup builtins without `enable subgroups;` (which it rejects);
// the device must have been opened with Features::SUBGROUP.
// C[z] = op(A[z]) * op(B[z]) for CPU adapters with subgroups, sharing B through
// subgroup broadcasts.
//
// All SG lanes of a subgroup compute the same TN = 4 * SG columns of C, each for
// its own TM rows. Each lane loads four columns of B as vec4s and the subgroup
// broadcasts them, so B costs each lane 4 loads per 4 k steps instead of TN.
// A is read as vec4s along its contiguous axis. On lavapipe, where a per-lane load
// costs tens of cycles and a broadcast is a register shuffle, this beats plain
// register tiles by cutting loads about threefold.
// Prepended: TM, TN, SG, WG (lanes per workgroup), TRANS_A, TRANS_B; generated:
// OFFSETS, STEP, STORE, COLUMN_SUMS (see kernels/matmul/source.rs). Requires k % 4 == 0,
// n % 4 == 0 unless TRANS_B, m % 4 == 0 when TRANS_A.

// Params and binding 0: matmul_params.wgsl.
// Bindings 1 (A) and 2 (B) and their vec4 loaders load_a / load_b (f32 or f16
// storage), and `epilogue(v, index, col)` applied to each stored element (with
// its operand at binding 4) at `c_index(row, col)` of its batch entry: generated
// by the host, see kernels/matmul/source.rs.
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// One-dimensional workgroups (naga allows the subgroup lane builtin only there):
// workgroup (x, y) covers columns x * TN.. and rows (y * WG + lane) * TM...
@compute @workgroup_size(WG, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    // Columns are per workgroup, so this exit is uniform; rows past the edge stay
    // in (clamped) because every lane must take part in the broadcasts.
    let col0 = wid.x * TN;
    if (col0 >= p.n) {
        return;
    }
    let row0 = ((wid.y + p.y0) * WG + lid.x) * TM;
    let z = wid.z + p.z0;
    let a_base = z * p.a_batch;
    let b_base = z * p.b_batch;
    let m4 = p.m / 4u;
    let n4 = p.n / 4u;
    let k4 = p.k / 4u;
    let my_col = col0 + 4u * lane;

{{OFFSETS}}
    for (var kq = 0u; kq < k4; kq++) {
{{STEP}}
    }
{{COLUMN_SUMS}}
    let c_base = z * p.c_batch;
{{STORE}}
}
