// Softmax (or log-softmax when LOG) along the last axis of a [rows, cols] view of
// z = scale * x + bias, one workgroup per row: max, then sum of exp(z - max),
// then the normalised output, each pass striding over the row and combining
// through shared memory. With BIAS, `bias` is [rows / rows_per_bias, cols] and
// row r adds bias row r / rows_per_bias (attention: a -1e9 mask per sequence,
// shared by its heads and queries); without it the binding is unused.
// With ROW_PER_THREAD each invocation instead walks one whole row alone: no
// shared memory or barriers, which CPU adapters pay dearly for, and enough
// parallelism when there are many short rows (attention scores).
// With CROSS_ENTROPY the kernel is a classifier's whole loss in one pass:
// row r's loss -log softmax(z)[label] goes to row_loss[r] and the gradient
// softmax(z) - onehot(label) to out, both times loss_scale (the mean's 1/count).
// A label >= cols marks an ignored row: zero loss and gradient. Without
// CROSS_ENTROPY `labels` and `row_loss` are unused. With TOTAL (cross-entropy
// rows per thread, a classifier's batch) one workgroup takes every row and
// also writes the sum of the row losses to `total[0]` and the number of rows
// whose label has the largest logit (correct predictions) to `hits[0]`. With
// TALLY (and TOTAL) it also adds the sum of the row losses before loss_scale
// to `tally[0]` and the correct count to `tally[1]`: a training loop's running
// totals, updated in place.
// Prepended: WG (power of two), LOG, BIAS, ROW_PER_THREAD, CROSS_ENTROPY, TOTAL,
// TALLY.

struct Params {
    rows: u32,
    cols: u32,
    row_groups: u32,
    rows_per_bias: u32,
    scale: f32,
    loss_scale: f32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> labels: array<u32>;
@group(0) @binding(5) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(6) var<storage, read_write> total: array<f32>;
@group(0) @binding(7) var<storage, read_write> hits: array<f32>;
@group(0) @binding(8) var<storage, read_write> tally: array<f32>;

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

// The output pass over columns first, first + step, ... of a row whose max is
// `m` and whose sum of exp(z - m) is `s`; `lead` also writes the row's loss.
fn finish_row(row: u32, m: f32, s: f32, first: u32, step: u32, lead: bool) {
    let base = row * p.cols;
    let bias_base = (row / p.rows_per_bias) * p.cols;
    let log_s = log(s);
    let inv_s = 1.0 / s;
    var label = 0u;
    var weight = 0.0;
    if (CROSS_ENTROPY) {
        label = labels[row];
        weight = select(0.0, p.loss_scale, label < p.cols);
    }
    for (var c = first; c < p.cols; c += step) {
        let shifted = z(base, bias_base, c) - m;
        if (CROSS_ENTROPY) {
            out[base + c] = (exp(shifted) * inv_s - select(0.0, 1.0, c == label)) * weight;
        } else if (LOG) {
            out[base + c] = shifted - log_s;
        } else {
            out[base + c] = exp(shifted) * inv_s;
        }
    }
    if (CROSS_ENTROPY && lead) {
        var picked = log_s;
        if (label < p.cols) {
            picked = z(base, bias_base, label) - m;
        }
        row_loss[row] = (log_s - picked) * weight;
    }
}

// Normalises one row; with CROSS_ENTROPY returns 1 when the label's logit is
// the row's largest (ties count), else 0.
fn softmax_row(row: u32) -> f32 {
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
    finish_row(row, m, s, 0u, 1u, true);
    var hit = 0.0;
    if (CROSS_ENTROPY) {
        let label = labels[row];
        if (label < p.cols && z(base, bias_base, label) >= m) {
            hit = 1.0;
        }
    }
    return hit;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    if (TOTAL) {
        var mine = 0.0;
        var my_hits = 0.0;
        for (var row = lid; row < p.rows; row += WG) {
            my_hits += softmax_row(row);
            mine += row_loss[row];
        }
        partial[lid] = mine;
        workgroupBarrier();
        let sum = reduce_sum(lid);
        partial[lid] = my_hits;
        workgroupBarrier();
        let hit_count = reduce_sum(lid);
        if (lid == 0u) {
            total[0] = sum;
            hits[0] = hit_count;
            if (TALLY) {
                tally[0] += sum / p.loss_scale;
                tally[1] += hit_count;
            }
        }
        return;
    }
    if (ROW_PER_THREAD) {
        let row = (wid.y * p.row_groups + wid.x) * WG + lid;
        if (row < p.rows) {
            _ = softmax_row(row);
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

    finish_row(row, m, s, lid, WG, lid == 0u);
}
