// Softmax (or log-softmax when LOG) along the last axis of a [rows, cols] view of
// z = scale * x + bias, one workgroup per row: max, then sum of exp(z - max),
// then the normalised output, each pass striding over the row and combining
// through shared memory. With BIAS, `bias` is [rows / rows_per_bias, cols] and
// row r adds bias row r / rows_per_bias (attention: a -1e9 mask per sequence,
// shared by its heads and queries); without it the binding is unused.
// With ROW_PER_THREAD each invocation instead walks one whole row alone: no
// shared memory or barriers, which CPU adapters pay dearly for, and enough
// parallelism when there are many short rows (attention scores).
// Prepended: WG (power of two), LOG, BIAS, ROW_PER_THREAD.

struct Params {
    rows: u32,
    cols: u32,
    row_groups: u32,
    rows_per_bias: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn z(base: u32, bias_base: u32, c: u32) -> f32 {
    var v = p.scale * x[base + c];
    if (BIAS) {
        v += bias[bias_base + c];
    }
    return v;
}

var<workgroup> partial: array<f32, WG>;

fn reduce_max(lid: u32) -> f32 {
    for (var span = WG / 2u; span > 0u; span = span / 2u) {
        if (lid < span) {
            partial[lid] = max(partial[lid], partial[lid + span]);
        }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32) -> f32 {
    for (var span = WG / 2u; span > 0u; span = span / 2u) {
        if (lid < span) {
            partial[lid] = partial[lid] + partial[lid + span];
        }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

fn softmax_row(row: u32) {
    let base = row * p.cols;
    let bias_base = (row / p.rows_per_bias) * p.cols;
    var m = -3.4028235e38;
    for (var c = 0u; c < p.cols; c++) {
        m = max(m, z(base, bias_base, c));
    }
    var s = 0.0;
    for (var c = 0u; c < p.cols; c++) {
        s += exp(z(base, bias_base, c) - m);
    }
    let log_s = log(s);
    let inv_s = 1.0 / s;
    for (var c = 0u; c < p.cols; c++) {
        let shifted = z(base, bias_base, c) - m;
        if (LOG) {
            out[base + c] = shifted - log_s;
        } else {
            out[base + c] = exp(shifted) * inv_s;
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    if (ROW_PER_THREAD) {
        let row = (wid.y * p.row_groups + wid.x) * WG + lid;
        if (row < p.rows) {
            softmax_row(row);
        }
        return;
    }
    let row = wid.y * p.row_groups + wid.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    let bias_base = (row / p.rows_per_bias) * p.cols;

    var m = -3.4028235e38;
    for (var c = lid; c < p.cols; c += WG) {
        m = max(m, z(base, bias_base, c));
    }
    partial[lid] = m;
    workgroupBarrier();
    m = reduce_max(lid);

    var s = 0.0;
    for (var c = lid; c < p.cols; c += WG) {
        s += exp(z(base, bias_base, c) - m);
    }
    partial[lid] = s;
    workgroupBarrier();
    s = reduce_sum(lid);

    let log_s = log(s);
    let inv_s = 1.0 / s;
    for (var c = lid; c < p.cols; c += WG) {
        let shifted = z(base, bias_base, c) - m;
        if (LOG) {
            out[base + c] = shifted - log_s;
        } else {
            out[base + c] = exp(shifted) * inv_s;
        }
    }
}
