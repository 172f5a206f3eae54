// im2col: row (n, oy, ox) of the [N * OH * OW, ROW_WIDTH] window matrix holds,
// at column (c * KH + a) * KW + b, input channel c's cell (a, b) of the window
// at output (oy, ox), then zeros up to ROW_WIDTH: a row width that is a
// multiple of 4 lets the product over it take vec4 loads when the patch
// C * KH * KW is not (a first layer's 1 or 3 channels). The geometry comes as
// constants, so the index arithmetic divides by constants.
//
// One invocation per PACK consecutive entries of a row, stored at once (as a
// vec4 when PACK is 4): CPU adapters pay per store instruction, not per value.
// Prepended: N, C, H, W, OH, OW, KH, KW, SH, SW, DH, DW, ROW_WIDTH, PACK;
// generated: ELEMENT (f32 or vec4<f32>) and ENTRIES, the PACK entries from
// column `col` on.

struct Params {
    row_threads: u32,
    _pad: vec3<u32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> cols: array<{{ELEMENT}}>;

// Column `col` of the row whose window starts at input element `origin`.
fn entry(origin: u32, col: u32) -> f32 {
    if (col >= C * KH * KW) {
        return 0.0;
    }
    let b = col % KW;
    let a = (col / KW) % KH;
    let c = col / (KW * KH);
    return x[origin + (c * H + a * DH) * W + b * DW];
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let q = gid.y * p.row_threads + gid.x;
    if (q >= N * OH * OW * (ROW_WIDTH / PACK)) {
        return;
    }
    let row = q / (ROW_WIDTH / PACK);
    let col = (q % (ROW_WIDTH / PACK)) * PACK;
    let ox = row % OW;
    let oy = (row / OW) % OH;
    let n = row / (OW * OH);
    let origin = (n * C * H + oy * SH) * W + ox * SW;
    cols[q] = {{ENTRIES}};
}
