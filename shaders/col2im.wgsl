// The adjoint of im2col, as a gather (no atomics): each element (n, c, i, j) of
// the padded input gradient sums the column entries of every output position
// whose window covered it. cols is [n * oh * ow, c * kh * kw], row-major.

struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    dh: u32,
    dw: u32,
    row_threads: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> cols: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.y * p.row_threads + gid.x;
    if (idx >= p.n * p.c * p.h * p.w) {
        return;
    }
    let j = idx % p.w;
    let i = (idx / p.w) % p.h;
    let c = (idx / (p.w * p.h)) % p.c;
    let n = idx / (p.w * p.h * p.c);
    let row_len = p.c * p.kh * p.kw;
    var acc = 0.0;
    for (var a = 0u; a < p.kh; a++) {
        if (i < a * p.dh || (i - a * p.dh) % p.sh != 0u) {
            continue;
        }
        let oy = (i - a * p.dh) / p.sh;
        if (oy >= p.oh) {
            continue;
        }
        for (var b = 0u; b < p.kw; b++) {
            if (j < b * p.dw || (j - b * p.dw) % p.sw != 0u) {
                continue;
            }
            let ox = (j - b * p.dw) / p.sw;
            if (ox >= p.ow) {
                continue;
            }
            let row = (n * p.oh + oy) * p.ow + ox;
            acc += cols[row * row_len + (c * p.kh + a) * p.kw + b];
        }
    }
    out[idx] = acc;
}
