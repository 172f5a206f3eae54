// C[z] = op(A[z]) * op(B[z]) with register tiling and no shared memory.
//
// Prepended by the host: TM, TN (outputs per invocation), TMN = TM * TN,
// WG_X, WG_Y (workgroup shape), TRANS_A, TRANS_B (operands stored transposed).
// op(A) is M x K, op(B) is K x N, C is M x N, all row-major; batch z starts at
// z * a_batch / z * b_batch (0 broadcasts one operand over the batch).
// CPU adapters run one invocation per SIMD lane and scalarise loads, so a large
// TM x TN block per invocation is what amortises each load there.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_batch: u32,
    b_batch: u32,
    c_batch: u32,
    z0: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

@compute @workgroup_size(WG_X, WG_Y, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * TM;
    let col0 = gid.x * TN;
    if (row0 >= p.m || col0 >= p.n) {
        return;
    }
    let z = gid.z + p.z0;

    // Rows and columns past the edge are clamped so the k loop has no branches;
    // their results are computed but never stored.
    var a_off: array<u32, TM>;
    for (var i = 0u; i < TM; i++) {
        let r = min(row0 + i, p.m - 1u);
        a_off[i] = z * p.a_batch + select(r * p.k, r, TRANS_A);
    }
    var b_off: array<u32, TN>;
    for (var j = 0u; j < TN; j++) {
        let col = min(col0 + j, p.n - 1u);
        b_off[j] = z * p.b_batch + select(col, col * p.k, TRANS_B);
    }
    let a_step = select(1u, p.m, TRANS_A);
    let b_step = select(p.n, 1u, TRANS_B);

    var acc: array<f32, TMN>;
    for (var kk = 0u; kk < p.k; kk++) {
        var av: array<f32, TM>;
        for (var i = 0u; i < TM; i++) {
            av[i] = a[a_off[i] + kk * a_step];
        }
        var bv: array<f32, TN>;
        for (var j = 0u; j < TN; j++) {
            bv[j] = b[b_off[j] + kk * b_step];
        }
        for (var i = 0u; i < TM; i++) {
            for (var j = 0u; j < TN; j++) {
                acc[i * TN + j] += av[i] * bv[j];
            }
        }
    }

    let c_base = z * p.c_batch;
    for (var i = 0u; i < TM; i++) {
        let r = row0 + i;
        if (r < p.m) {
            for (var j = 0u; j < TN; j++) {
                let col = col0 + j;
                if (col < p.n) {
                    c[c_base + r * p.n + col] = acc[i * TN + j];
                }
            }
        }
    }
}
