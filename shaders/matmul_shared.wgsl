// C[z] = op(A[z]) * op(B[z]) with shared-memory tiles, for real GPUs.
//
// Prepended by the host: BM, BN, BK (block of C and depth of a k step), TM, TN
// (outputs per invocation), WG_X = BN / TN, WG_Y = BM / TM,
// THREADS = WG_X * WG_Y, TRANS_A, TRANS_B. Same operand layout as
// matmul_register.wgsl.
// An invocation owns rows lid.y + i * WG_Y and columns lid.x + j * WG_X of the
// block: neighbouring invocations read neighbouring shared-memory words (no bank
// conflicts) and write neighbouring words of C (coalesced).
// The accumulators are named variables and the multiply and the final store
// are generated unrolled over them (ACCUMULATORS, MULTIPLY, STORE; see
// kernels/matmul/source.rs), as in matmul_shared_vec4.wgsl, which says why.

// Params and binding 0: matmul_params.wgsl.
// Bindings 1 (A) and 2 (B) and their loaders load_a / load_b (f32 or f16
// storage), and `epilogue(v, index, col)` applied to each stored element (with
// its operand at binding 4) at `c_index(row, col)` of its batch entry: generated
// by the host, see kernels/matmul/source.rs.
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// [k][m] and [k][n]: two dimensions, so that the bounds clamps on a read
// fold away or hoist out of the depth loop (see matmul_shared_vec4.wgsl).
var<workgroup> a_tile: array<array<f32, BM>, BK>;
var<workgroup> b_tile: array<array<f32, BN>, BK>;

// Stores element (r, col) through the epilogue if it lies inside C.
fn store_one(c_base: u32, r: u32, col: u32, v: f32) {
    if (r < p.m && col < p.n) {
        let index = c_base + c_index(r, col);
        c[index] = epilogue(v, index, col);
    }
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) lidx: u32,
) {
    let z = wid.z + p.z0;
    let row_base = (wid.y + p.y0) * BM;
    let col_base = wid.x * BN;
    let a_base = z * p.a_batch;
    let b_base = z * p.b_batch;

{{ACCUMULATORS}}
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Stage the tiles, reading global memory along its contiguous axis.
        for (var l = lidx; l < BK * BM; l += THREADS) {
            var kk: u32;
            var mm: u32;
            if (TRANS_A) {
                kk = l / BM;
                mm = l % BM;
            } else {
                mm = l / BK;
                kk = l % BK;
            }
            let gr = row_base + mm;
            let gk = k0 + kk;
            var v = 0.0;
            if (gr < p.m && gk < p.k) {
                v = load_a(a_base + select(gr * p.k + gk, gk * p.m + gr, TRANS_A));
            }
            a_tile[kk][mm] = v;
        }
        for (var l = lidx; l < BK * BN; l += THREADS) {
            var kk: u32;
            var nn: u32;
            if (TRANS_B) {
                nn = l / BK;
                kk = l % BK;
            } else {
                kk = l / BN;
                nn = l % BN;
            }
            let gc = col_base + nn;
            let gk = k0 + kk;
            var v = 0.0;
            if (gc < p.n && gk < p.k) {
                v = load_b(b_base + select(gk * p.n + gc, gc * p.k + gk, TRANS_B));
            }
            b_tile[kk][nn] = v;
        }
        workgroupBarrier();

{{MULTIPLY}}
        workgroupBarrier();
    }

    let c_base = z * p.c_batch;
{{STORE}}
}
