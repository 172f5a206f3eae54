// Max pooling over an (already padded) NCHW input, and its gradient.
//
// Forward (BACKWARD false): one invocation per output (n, c, oy, ox) writes the
// window's maximum to `values` and where it was (i * W + j in the input plane)
// to `argmax`; ties go to the first maximum in row-major window order, as in
// PyTorch. Backward: one invocation per input element (n, c, i, j) sums the
// incoming gradient (`values`) of every window whose argmax is this element: a
// gather, so overlapping windows need no atomics.
// Prepended: the geometry as constants (N, C, H, W, OH, OW, KH, KW, SH, SW, DH,
// DW) and BACKWARD. Appended: shaders/conv_window.wgsl.

// Params and binding 0: conv_window.wgsl.
// Forward: the input. Backward: the output's gradient.
@group(0) @binding(1) var<storage, read> source: array<f32>;
@group(0) @binding(2) var<storage, read_write> argmax: array<u32>;
// Forward: the pooled values. Backward: the input's gradient.
@group(0) @binding(3) var<storage, read_write> result: array<f32>;

fn forward(idx: u32) {
    let ox = idx % OW;
    let oy = (idx / OW) % OH;
    let plane = idx / (OW * OH);
    let base = plane * H * W;
    var best_at = oy * SH * W + ox * SW;
    var best = source[base + best_at];
    for (var a = 0u; a < KH; a++) {
        for (var b = 0u; b < KW; b++) {
            let at = (oy * SH + a * DH) * W + ox * SW + b * DW;
            let v = source[base + at];
            if (v > best) {
                best = v;
                best_at = at;
            }
        }
    }
    result[idx] = best;
    argmax[idx] = best_at;
}

// The window's incoming gradient if its maximum was input cell `cell`.
fn window_term(plane: u32, cell: u32, oy: u32, ox: u32, a: u32, b: u32) -> f32 {
    let o = (plane * OH + oy) * OW + ox;
    return select(0.0, source[o], argmax[o] == cell);
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.y * p.row_threads + gid.x;
    if (BACKWARD) {
        if (idx < N * C * H * W) {
            result[idx] = sum_over_covering_windows(idx);
        }
    } else if (idx < N * C * OH * OW) {
        forward(idx);
    }
}
