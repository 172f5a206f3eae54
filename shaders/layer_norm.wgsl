// Layer normalisation over the last axis of a [rows, cols] view, one invocation
// per row (no shared memory or barriers, which CPU adapters pay dearly for;
// rows are many: batch x tokens):
//   out = (x - mean) * rstd * gamma + beta,  rstd = 1 / sqrt(var + eps),
// with the biased variance taken around the mean (two passes: no cancellation).
// Each row's (mean, rstd) goes to `stats` for the backward pass.
// Params, bindings 0-2 and xv(i) (x, or x + r with RESIDUAL):
// layer_norm_input.wgsl.
// Prepended: WG, RESIDUAL.

@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wid.y * p.row_groups + wid.x) * WG + lid;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    let n = f32(p.cols);
    var sum = 0.0;
    for (var c = 0u; c < p.cols; c++) {
        sum += xv(base + c);
    }
    let mean = sum / n;
    var sq = 0.0;
    for (var c = 0u; c < p.cols; c++) {
        let d = xv(base + c) - mean;
        sq += d * d;
    }
    let rstd = inverseSqrt(sq / n + p.eps);
    for (var c = 0u; c < p.cols; c++) {
        out[base + c] = (xv(base + c) - mean) * rstd * gamma[c] + beta[c];
    }
    stats[2u * row] = mean;
    stats[2u * row + 1u] = rstd;
}
