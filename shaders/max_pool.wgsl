// Max pooling over an (already padded) NCHW input, and its gradient.
//
// Forward (BACKWARD false): each output (n, c, oy, ox) gets the window's
// maximum in `values` and where it was (i * W + j in the input plane) in
// `argmax`; ties go to the first maximum in row-major window order, as in
// PyTorch. Backward: each input element (n, c, i, j) sums the incoming
// gradient (`values`) of every window whose argmax is this element: a gather,
// so overlapping windows need no atomics.
//
// Windows that tile the input without overlap (stride = kernel, no dilation,
// the usual 2x2 pooling) take a scatter instead: one invocation per window
// writes its whole window, the gradient at the argmax and zeros elsewhere
// (cells no window covers were cleared before). Each window's gradient and
// argmax are then read once, not once per cell.
//
// One invocation per PACK consecutive results, stored at once (as a vec4 when
// PACK is 4): CPU adapters pay per store instruction and per invocation.
// Prepended: the geometry as constants (N, C, H, W, OH, OW, KH, KW, SH, SW, DH,
// DW), BACKWARD and PACK; generated: RESULT (f32 or vec4<f32>), and FORWARD
// and BACKWARD_BODY, the stores from invocation q. Appended:
// shaders/conv_window.wgsl.

// Params and binding 0: conv_window.wgsl.
// Forward: the input. Backward: the output's gradient.
@group(0) @binding(1) var<storage, read> source: array<f32>;
@group(0) @binding(2) var<storage, read_write> argmax: array<u32>;
// Forward: the pooled values. Backward: the input's gradient.
@group(0) @binding(3) var<storage, read_write> result: array<{{RESULT}}>;

struct WindowMax {
    value: f32,
    at: u32,
}

fn window_max(idx: u32) -> WindowMax {
    let ox = idx % OW;
    let oy = (idx / OW) % OH;
    let plane = idx / (OW * OH);
    let base = plane * H * W;
    var best = WindowMax(source[base + oy * SH * W + ox * SW], oy * SH * W + ox * SW);
    for (var a = 0u; a < KH; a++) {
        for (var b = 0u; b < KW; b++) {
            let at = (oy * SH + a * DH) * W + ox * SW + b * DW;
            let v = source[base + at];
            if (v > best.value) {
                best = WindowMax(v, at);
            }
        }
    }
    return best;
}

// The window's incoming gradient if its maximum was input cell `cell`.
fn window_term(plane: u32, cell: u32, oy: u32, ox: u32, a: u32, b: u32) -> f32 {
    let o = (plane * OH + oy) * OW + ox;
    return select(0.0, source[o], argmax[o] == cell);
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let q = gid.y * p.row_threads + gid.x;
    if (BACKWARD) {
{{BACKWARD_BODY}}
    } else if (q < N * C * OH * OW / PACK) {
{{FORWARD}}
    }
}
