// im2col: row (n, oy, ox) of the [N * OH * OW, ROW_WIDTH] window matrix holds,
// at column (c * KH + a) * KW + b, input channel c's cell (a, b) of the window
// at output (oy, ox), then zeros up to ROW_WIDTH: a row width that is a
// multiple of 4 lets the product over it take vec4 loads when the patch
// C * KH * KW is not (a first layer's 1 or 3 channels). One invocation per
// element; the geometry comes as constants, so the index arithmetic divides
// by constants.
// Prepended: N, C, H, W, OH, OW, KH, KW, SH, SW, DH, DW, ROW_WIDTH.

struct Params {
    row_threads: u32,
    _pad: vec3<u32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> cols: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.y * p.row_threads + gid.x;
    if (idx >= N * OH * OW * ROW_WIDTH) {
        return;
    }
    let col = idx % ROW_WIDTH;
    var v = 0.0;
    if (col < C * KH * KW) {
        let row = idx / ROW_WIDTH;
        let b = col % KW;
        let a = (col / KW) % KH;
        let c = col / (KW * KH);
        let ox = row % OW;
        let oy = (row / OW) % OH;
        let n = row / (OW * OH);
        v = x[((n * C + c) * H + oy * SH + a * DH) * W + ox * SW + b * DW];
    }
    cols[idx] = v;
}
