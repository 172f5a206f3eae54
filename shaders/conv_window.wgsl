// Which windows cover an input cell, for the gather kernels (col2im, the max
// pool's gradient): cell row `i` is row `a` of the window at output row
// `covering_row(i, a)`, or of none when that is >= OH; likewise columns.
// Prepended: the geometry constants (H, W, OH, OW, KH, KW, SH, SW, DH, DW).

fn covering_row(i: u32, a: u32) -> u32 {
    if (i < a * DH || (i - a * DH) % SH != 0u) {
        return OH;
    }
    return (i - a * DH) / SH;
}

fn covering_col(j: u32, b: u32) -> u32 {
    if (j < b * DW || (j - b * DW) % SW != 0u) {
        return OW;
    }
    return (j - b * DW) / SW;
}
