// C[z] = op(A[z]) * op(B[z]) with register tiling and no shared memory.
//
// Prepended by the host: TM, TN (outputs per invocation), WG_X, WG_Y (workgroup
// shape), TRANS_A, TRANS_B (operands stored transposed). The host also generates
// the fully unrolled OFFSETS and STEP blocks, STORE and COLUMN_SUMS (the
// column sums of op(B), when asked for): TM x TN accumulators named
// acc_I_J and loads a_I / b_J. Unrolling by generation rather than by WGSL loops
// over private arrays keeps the accumulators in registers on drivers that do not
// unroll big loops themselves (lavapipe otherwise keeps them in memory).
// op(A) is M x K, op(B) is K x N, C is M x N, all row-major; batch z starts at
// z * a_batch / z * b_batch (0 broadcasts one operand over the batch).

// Params and binding 0: matmul_params.wgsl.
// Bindings 1 (A) and 2 (B) and their loaders load_a / load_b (f32 or f16
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
    let a_step = select(1u, p.m, TRANS_A);
    let b_step = select(p.n, 1u, TRANS_B);

    // Rows and columns past the edge are clamped so the k loop has no branches;
    // their results are computed but never stored.
{{OFFSETS}}
    for (var kk = 0u; kk < p.k; kk++) {
        let ak = kk * a_step;
        let bk = kk * b_step;
{{STEP}}
    }
{{COLUMN_SUMS}}
    let c_base = z * p.c_batch;
{{STORE}}
}
