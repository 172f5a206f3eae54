// Backward of layer_norm.wgsl, one invocation per row. With xhat = (x - mean) *
// rstd and gg = g * gamma:
//   dx = rstd * (gg - mean(gg) - xhat * mean(gg * xhat))
// and gxhat = g * xhat per element, which the caller sums over rows for the
// gradient of gamma (that of beta is the row sum of g).
// Params, bindings 0-2 and xv(i) (x, or x + r with RESIDUAL):
// layer_norm_input.wgsl.
// Prepended: WG, RESIDUAL.

@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read> stats: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;
@group(0) @binding(7) var<storage, read_write> gxhat: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wid.y * p.row_groups + wid.x) * WG + lid;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    let mean = stats[2u * row];
    let rstd = stats[2u * row + 1u];
    var sum_gg = 0.0;
    var sum_gg_xhat = 0.0;
    for (var c = 0u; c < p.cols; c++) {
        let xhat = (xv(base + c) - mean) * rstd;
        let gg = g[base + c] * gamma[c];
        sum_gg += gg;
        sum_gg_xhat += gg * xhat;
        gxhat[base + c] = g[base + c] * xhat;
    }
    let n = f32(p.cols);
    let mean_gg = sum_gg / n;
    let mean_gg_xhat = sum_gg_xhat / n;
    for (var c = 0u; c < p.cols; c++) {
        let xhat = (xv(base + c) - mean) * rstd;
        dx[base + c] = rstd * (g[base + c] * gamma[c] - mean_gg - xhat * mean_gg_xhat);
    }
}
