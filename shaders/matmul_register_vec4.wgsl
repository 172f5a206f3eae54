// C[z] = op(A[z]) * op(B[z]) with register tiling, reading A and B four floats at
// a time along their contiguous axis and stepping k by four.
//
// Used instead of matmul_register.wgsl when k and the contiguous extents are
// multiples of four. CPU adapters turn every per-invocation load into a loop over
// SIMD lanes, so quartering the number of loads is what pays there.
// Prepended: TM, TN, WG_X, WG_Y, TRANS_A, TRANS_B; generated: OFFSETS, STEP,
// STORE, COLUMN_SUMS (see kernels/matmul/source.rs).

// Params and binding 0: matmul_params.wgsl.
// Bindings 1 (A) and 2 (B) and their vec4 loaders load_a / load_b (f32 or f16
// storage), and `epilogue(v, index, col)` applied to each stored element (with
// its operand at binding 4) at `c_index(row, col)` of its batch entry: generated
// by the host, see kernels/matmul/source.rs.
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

@compute @workgroup_size(WG_X, WG_Y, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = (gid.y + p.y0 * WG_Y) * TM;
    let col0 = gid.x * TN;
    if (row0 >= p.m || col0 >= p.n) {
        return;
    }
    let z = gid.z + p.z0;
    let a_base = z * p.a_batch;
    let b_base = z * p.b_batch;
    let m4 = p.m / 4u;
    let n4 = p.n / 4u;
    let k4 = p.k / 4u;

    // Rows and columns past the edge are clamped so the k loop has no branches;
    // their results are computed but never stored.
{{OFFSETS}}
    for (var kq = 0u; kq < k4; kq++) {
{{STEP}}
    }
{{COLUMN_SUMS}}
    let c_base = z * p.c_batch;
{{STORE}}
}
