// One time step t of an LSTM over a batch, one invocation per (sample, unit).
// Gate pre-activations are the input projection (slot t of xproj) plus the
// recurrent product h_{t-1} W_hh (slot t of rec) plus the bias, in the gate order
// Keras and PyTorch share: input, forget, cell candidate, output. Then
//   c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t).
// A masked (sample, step) keeps h and c from the step before (Keras semantics),
// so padding never changes the state. Activated gates are kept for the backward
// pass. Buffers are time-major; cells and hidden hold T + 1 slots, slot 0 being
// the initial state.

struct Params {
    batch: u32,
    hidden: u32,
    t: u32,
    row_threads: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xproj: array<f32>;   // [T, B, 4H]
@group(0) @binding(2) var<storage, read> rec: array<f32>;     // [T, B, 4H]
@group(0) @binding(3) var<storage, read> bias: array<f32>;    // [4H]
@group(0) @binding(4) var<storage, read> mask: array<f32>;    // [T, B], 1 or 0
@group(0) @binding(5) var<storage, read_write> gates: array<f32>;  // [T, B, 4H]
@group(0) @binding(6) var<storage, read_write> cells: array<f32>;  // [T + 1, B, H]
@group(0) @binding(7) var<storage, read_write> states: array<f32>; // [T + 1, B, H]

fn sigmoid(x: f32) -> f32 {
    let e = exp(-abs(x));
    return select(e / (1.0 + e), 1.0 / (1.0 + e), x >= 0.0);
}

// tanh saturates to +-1 in f32 beyond 15; clamping keeps exp-based
// implementations from computing inf / inf.
fn tanh_safe(x: f32) -> f32 {
    return tanh(clamp(x, -15.0, 15.0));
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.y * p.row_threads + gid.x;
    let h = p.hidden;
    if (idx >= p.batch * h) {
        return;
    }
    let b = idx / h;
    let j = idx % h;
    let row = p.t * p.batch + b;
    let prev = row * h + j;
    let next = prev + p.batch * h;
    if (mask[row] < 0.5) {
        cells[next] = cells[prev];
        states[next] = states[prev];
        return;
    }
    let g0 = row * 4u * h + j;
    let i = sigmoid(xproj[g0] + rec[g0] + bias[j]);
    let f = sigmoid(xproj[g0 + h] + rec[g0 + h] + bias[j + h]);
    let g = tanh_safe(xproj[g0 + 2u * h] + rec[g0 + 2u * h] + bias[j + 2u * h]);
    let o = sigmoid(xproj[g0 + 3u * h] + rec[g0 + 3u * h] + bias[j + 3u * h]);
    let c = f * cells[prev] + i * g;
    gates[g0] = i;
    gates[g0 + h] = f;
    gates[g0 + 2u * h] = g;
    gates[g0 + 3u * h] = o;
    cells[next] = c;
    states[next] = o * tanh_safe(c);
}
