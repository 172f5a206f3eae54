// The adjoint of im2col, as a gather (no atomics): each element (n, c, i, j) of
// the padded input gradient sums the column entries of every output position
// whose window covered it. cols is [n * oh * ow, c * kh * kw], row-major.
// The geometry is prepended as constants (N, C, H, W, OH, OW, KH, KW, SH, SW, DH,
// DW), so the index arithmetic divides by constants: cheap on CPU adapters.
// Appended: shaders/conv_window.wgsl.

struct Params {
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
    if (idx >= N * C * H * W) {
        return;
    }
    let j = idx % W;
    let i = (idx / W) % H;
    let c = (idx / (W * H)) % C;
    let n = idx / (W * H * C);
    let row_len = C * KH * KW;
    var acc = 0.0;
    for (var a = 0u; a < KH; a++) {
        let oy = covering_row(i, a);
        if (oy >= OH) {
            continue;
        }
        for (var b = 0u; b < KW; b++) {
            let ox = covering_col(j, b);
            if (ox >= OW) {
                continue;
            }
            let row = (n * OH + oy) * OW + ox;
            acc += cols[row * row_len + (c * KH + a) * KW + b];
        }
    }
    out[idx] = acc;
}
