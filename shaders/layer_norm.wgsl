// Layer normalisation over the last axis of a [rows, cols] view:
//   out = (x - mean) * rstd * gamma + beta,  rstd = 1 / sqrt(var + eps),
// with the biased variance taken around the mean (two passes: no cancellation).
// Each row's (mean, rstd) goes to `stats` for the backward pass.
// Params, bindings 0-2 and xv(i) (x, or x + r with RESIDUAL):
// layer_norm_input.wgsl. Which invocations take a row (row_index, ROW_LANES
// of them) and how they add up (row_reduce): rows_per_invocation.wgsl or
// rows_per_workgroup.wgsl.
// Prepended: WG, RESIDUAL.

@group(0) @binding(3) var<storage, read> gamma: array<Vec>;
@group(0) @binding(4) var<storage, read> beta: array<Vec>;
@group(0) @binding(5) var<storage, read_write> out: array<Vec>;
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wid, lid);
    if (row >= p.rows) {
        return;
    }
    let base = row * row_vecs();
    let lane = lid % ROW_LANES;
    let n = f32(p.cols);
    var sum = 0.0;
    for (var c = lane; c < row_vecs(); c += ROW_LANES) {
        sum += hsum(xv(base + c));
    }
    let mean = row_reduce(vec2<f32>(sum, 0.0), lid).x / n;
    var sq = 0.0;
    for (var c = lane; c < row_vecs(); c += ROW_LANES) {
        let d = xv(base + c) - mean;
        sq += hsum(d * d);
    }
    let rstd = inverseSqrt(row_reduce(vec2<f32>(sq, 0.0), lid).x / n + p.eps);
    for (var c = lane; c < row_vecs(); c += ROW_LANES) {
        out[base + c] = (xv(base + c) - mean) * rstd * gamma[c] + beta[c];
    }
    if (lane == 0u) {
        stats[2u * row] = mean;
        stats[2u * row + 1u] = rstd;
    }
}
