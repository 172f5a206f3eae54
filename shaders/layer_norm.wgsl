// Layer normalisation over the last axis of a [rows, cols] view, one invocation
// per row (no shared memory or barriers, which CPU adapters pay dearly for;
// rows are many: batch x tokens):
//   out = (x - mean) * rstd * gamma + beta,  rstd = 1 / sqrt(var + eps),
// with the biased variance taken around the mean (two passes: no cancellation).
// Each row's (mean, rstd) goes to `stats` for the backward pass.
// With RESIDUAL the normalised value is x + r (a residual sum that is never
// written out); without it `r` is bound but unused.
// Prepended: WG, RESIDUAL.

struct Params {
    rows: u32,
    cols: u32,
    row_groups: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> r: array<f32>;

fn xv(i: u32) -> f32 {
    if (RESIDUAL) {
        return x[i] + r[i];
    }
    return x[i];
}
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
