// One time step t of an LSTM over a batch, one invocation per (sample, unit).
// Gate pre-activations are the input projection (slot t of xproj) plus the
// recurrent product h_{t-1} W_hh (slot t of rec) plus the bias; the update
// and its masking are shaders/lstm_update.wgsl's (prepended with
// lstm_cell.wgsl, V = f32). Buffers are time-major; cells and hidden hold
// T + 1 slots, slot 0 being the initial state.

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
    if (lstm_carry_masked(row, prev, next)) {
        return;
    }
    let g0 = row * 4u * h + j;
    var pre: array<V, 4>;
    for (var k = 0u; k < 4u; k++) {
        pre[k] = xproj[g0 + k * h] + rec[g0 + k * h] + bias[j + k * h];
    }
    lstm_update(prev, next, g0, h, pre);
}
