// The adjoint of im2col, as a gather (no atomics): each element (n, c, i, j) of
// the padded input gradient sums the column entries of every output position
// whose window covered it. cols is [n * oh * ow, ROW_WIDTH], row-major, each
// row's first c * kh * kw entries the window's (the rest padding; see
// im2col.wgsl). The geometry is prepended as constants (N, C, H, W, OH, OW,
// KH, KW, SH, SW, DH, DW, ROW_WIDTH), so the index arithmetic divides by
// constants: cheap on CPU adapters.
// Appended: shaders/conv_window.wgsl.

// Params and binding 0: conv_window.wgsl.
@group(0) @binding(1) var<storage, read> cols: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

// Column entry (a, b) of channel c in the im2col row of output (oy, ox).
fn window_term(plane: u32, cell: u32, oy: u32, ox: u32, a: u32, b: u32) -> f32 {
    let n = plane / C;
    let c = plane % C;
    let row = (n * OH + oy) * OW + ox;
    return cols[row * ROW_WIDTH + (c * KH + a) * KW + b];
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.y * p.row_threads + gid.x;
    if (idx >= N * C * H * W) {
        return;
    }
    out[idx] = sum_over_covering_windows(idx);
}
