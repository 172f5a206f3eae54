// Shared by the window kernels (col2im, max pooling): their parameters, and
// the gather half of col2im and of the max pool's gradient: the sum, over
// every window that covers input element `idx` of an [N*C, H, W] stack of
// planes, of `window_term(plane, cell, oy, ox, a, b)`: the window at output
// (oy, ox) of `plane` holds input cell `cell` = i * W + j as its cell (a, b).
// Each including kernel defines window_term.
// Prepended: the geometry constants (H, W, OH, OW, KH, KW, SH, SW, DH, DW).

// One invocation per element; row_threads spans a row of the 2-D grid.
struct Params {
    row_threads: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// The output row whose window has input row `i` as its row `a`, or OH if none.
fn covering_row(i: u32, a: u32) -> u32 {
    if (i < a * DH || (i - a * DH) % SH != 0u) {
        return OH;
    }
    return (i - a * DH) / SH;
}

// Likewise for columns, or OW if none.
fn covering_col(j: u32, b: u32) -> u32 {
    if (j < b * DW || (j - b * DW) % SW != 0u) {
        return OW;
    }
    return (j - b * DW) / SW;
}

fn sum_over_covering_windows(idx: u32) -> f32 {
    let j = idx % W;
    let i = (idx / W) % H;
    let plane = idx / (W * H);
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
            acc += window_term(plane, i * W + j, oy, ox, a, b);
        }
    }
    return acc;
}
