// Backward of layer_norm.wgsl. With xhat = (x - mean) * rstd and gg = g * gamma:
//   dx = rstd * (gg - mean(gg) - xhat * mean(gg * xhat))
// and gxhat = g * xhat per element, which the caller sums over rows for the
// gradient of gamma (that of beta is the row sum of g).
// Params, bindings 0-2 and xv(i) (x, or x + r with RESIDUAL):
// layer_norm_input.wgsl. row_index, ROW_LANES and row_reduce:
// rows_per_invocation.wgsl or rows_per_workgroup.wgsl.
// Prepended: WG, RESIDUAL.

@group(0) @binding(3) var<storage, read> gamma: array<Vec>;
@group(0) @binding(4) var<storage, read> g: array<Vec>;
@group(0) @binding(5) var<storage, read> stats: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<Vec>;
@group(0) @binding(7) var<storage, read_write> gxhat: array<Vec>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wid, lid);
    if (row >= p.rows) {
        return;
    }
    let base = row * row_vecs();
    let lane = lid % ROW_LANES;
    let mean = stats[2u * row];
    let rstd = stats[2u * row + 1u];
    // (sum of gg, sum of gg * xhat)
    var sums = vec2<f32>(0.0);
    for (var c = lane; c < row_vecs(); c += ROW_LANES) {
        let xhat = (xv(base + c) - mean) * rstd;
        let gg = g[base + c] * gamma[c];
        sums += vec2<f32>(hsum(gg), hsum(gg * xhat));
        gxhat[base + c] = g[base + c] * xhat;
    }
    let means = row_reduce(sums, lid) / f32(p.cols);
    for (var c = lane; c < row_vecs(); c += ROW_LANES) {
        let xhat = (xv(base + c) - mean) * rstd;
        dx[base + c] = rstd * (g[base + c] * gamma[c] - means.x - xhat * means.y);
    }
}
