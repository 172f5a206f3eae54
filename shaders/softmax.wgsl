// Softmax (or log-softmax when LOG) along the last axis of a [rows, cols] view of
// z = scale * x + bias. Each lane of a row finds the max of its columns and
// the sum of exp(z - max) over them; row_reduce merges the lanes' pairs
// (row_combine) and a last pass writes the normalised output. Which
// invocations take a row (row_index, ROW_LANES of them) and how they merge:
// rows_per_invocation.wgsl (short rows, CPU adapters) or
// rows_per_workgroup.wgsl (GPUs, few long rows), appended by the host.
// With BIAS, `bias` is [rows / rows_per_bias, cols] and row r adds bias row
// r / rows_per_bias (attention: a -1e9 mask per sequence, shared by its heads
// and queries); without it the binding is unused.
// With CROSS_ENTROPY the kernel is a classifier's whole loss in one pass:
// row r's loss -log softmax(z)[label] goes to row_loss[r] and the gradient
// softmax(z) - onehot(label) to out, both times loss_scale (the mean's 1/count).
// A label >= cols marks an ignored row: zero loss and gradient. Without
// CROSS_ENTROPY `labels` and `row_loss` are unused. With TOTAL (cross-entropy
// over a classifier's batch of short rows) one workgroup takes every row, an
// invocation per row, and also writes the sum of the row losses to `total[0]`
// and the number of rows whose label is the argmax (correct predictions,
// the first maximum winning ties) to `hits[0]`. With TALLY (and TOTAL) it also adds the sum of
// the row losses before loss_scale to `tally[0]` and the correct count to
// `tally[1]`: a training loop's running totals, updated in place.
// Rows are read W columns per access (`Vec`: f32, or vec4<f32> where rows are
// whole vec4s and each invocation owns its rows: CPU adapters pay per load,
// not per byte); `c` and the row bases count Vecs, labels count columns.
// Prepended: WG (power of two), LOG, BIAS, CROSS_ENTROPY, TOTAL, TALLY, and
// W with its helpers (`Vec`, `Cols`, `hmax`, `hsum`, `lane_of`, `columns`,
// `row_vecs`: kernels/rows.rs).

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
@group(0) @binding(1) var<storage, read> x: array<Vec>;
@group(0) @binding(2) var<storage, read> bias: array<Vec>;
@group(0) @binding(3) var<storage, read_write> out: array<Vec>;
@group(0) @binding(4) var<storage, read> labels: array<u32>;
@group(0) @binding(5) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(6) var<storage, read_write> total: array<f32>;
@group(0) @binding(7) var<storage, read_write> hits: array<f32>;
@group(0) @binding(8) var<storage, read_write> tally: array<f32>;

fn z(base: u32, bias_base: u32, c: u32) -> Vec {
    var v = p.scale * x[base + c];
    if (BIAS) {
        v += bias[bias_base + c];
    }
    return v;
}

// Column `col` (counted in columns) of the row at `base`.
fn z_column(base: u32, bias_base: u32, col: u32) -> f32 {
    return lane_of(z(base, bias_base, col / W), col % W);
}

// Two parts of a row as (max, sum of exp(z - max)), merged into the whole's.
// An empty part is (-f32 max, 0) and drops out.
fn row_combine(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

// (max, sum of exp(z - max)) over columns first, first + step, ... of a row.
fn part_stats(row: u32, first: u32, step: u32) -> vec2<f32> {
    let base = row * row_vecs();
    let bias_base = (row / p.rows_per_bias) * row_vecs();
    var m = -3.4028235e38;
    for (var c = first; c < row_vecs(); c += step) {
        m = max(m, hmax(z(base, bias_base, c)));
    }
    var s = 0.0;
    for (var c = first; c < row_vecs(); c += step) {
        s += hsum(exp(z(base, bias_base, c) - m));
    }
    return vec2<f32>(m, s);
}

// The output pass over columns first, first + step, ... of a row whose max is
// `m` and whose sum of exp(z - m) is `s`; `lead` also writes the row's loss.
fn finish_row(row: u32, m: f32, s: f32, first: u32, step: u32, lead: bool) {
    let base = row * row_vecs();
    let bias_base = (row / p.rows_per_bias) * row_vecs();
    let log_s = log(s);
    let inv_s = 1.0 / s;
    var label = 0u;
    var weight = 0.0;
    if (CROSS_ENTROPY) {
        label = labels[row];
        weight = select(0.0, p.loss_scale, label < p.cols);
    }
    for (var c = first; c < row_vecs(); c += step) {
        let shifted = z(base, bias_base, c) - m;
        if (CROSS_ENTROPY) {
            let hot = select(Vec(0.0), Vec(1.0), columns(c) == Cols(label));
            out[base + c] = (exp(shifted) * inv_s - hot) * weight;
        } else if (LOG) {
            out[base + c] = shifted - log_s;
        } else {
            out[base + c] = exp(shifted) * inv_s;
        }
    }
    if (CROSS_ENTROPY && lead) {
        var picked = log_s;
        if (label < p.cols) {
            picked = z_column(base, bias_base, label) - m;
        }
        row_loss[row] = (log_s - picked) * weight;
    }
}

// Whether a row whose largest logit is `m` predicts `label`: as argmax, the
// first column to reach the maximum wins a tie (a row of equal logits
// predicts class 0, not every class).
fn label_is_first_max(row: u32, label: u32, m: f32) -> bool {
    let base = row * row_vecs();
    let bias_base = (row / p.rows_per_bias) * row_vecs();
    if (label >= p.cols || z_column(base, bias_base, label) < m) {
        return false;
    }
    for (var c = 0u; c < label; c++) {
        if (z_column(base, bias_base, c) >= m) {
            return false;
        }
    }
    return true;
}

var<workgroup> batch_partial: array<vec2<f32>, WG>;

// TOTAL: the workgroup's invocations each take rows lid, lid + WG, ... and
// add up the losses and correct predictions of the whole batch.
fn cross_entropy_batch(lid: u32) {
    var mine = vec2<f32>(0.0);
    for (var row = lid; row < p.rows; row += WG) {
        let stats = part_stats(row, 0u, 1u);
        finish_row(row, stats.x, stats.y, 0u, 1u, true);
        let hit = label_is_first_max(row, labels[row], stats.x);
        mine += vec2<f32>(row_loss[row], select(0.0, 1.0, hit));
    }
    batch_partial[lid] = mine;
    workgroupBarrier();
    for (var span = WG / 2u; span > 0u; span = span / 2u) {
        if (lid < span) {
            batch_partial[lid] += batch_partial[lid + span];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let sums = batch_partial[0];
        total[0] = sums.x;
        hits[0] = sums.y;
        if (TALLY) {
            tally[0] += sums.x / p.loss_scale;
            tally[1] += sums.y;
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    if (TOTAL) {
        cross_entropy_batch(lid);
        return;
    }
    let row = row_index(wid, lid);
    if (row >= p.rows) {
        return;
    }
    let lane = lid % ROW_LANES;
    let stats = row_reduce(part_stats(row, lane, ROW_LANES), lid);
    finish_row(row, stats.x, stats.y, lane, ROW_LANES, lane == 0u);
}
