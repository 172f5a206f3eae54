// Backward of LSTM time step t (run for t = T-1 down to 0), one invocation per
// (sample, unit). The gradient reaching h_t is the output's (d_out slot t), the
// next step's recurrent product d_gates_{t+1} W_hh^T (dh_rec slot t + 1) and
// what masked later steps passed through (dh_carry). It writes the gradient of
// the four gate pre-activations and carries dc_{t-1} in `dc`, by
// shaders/lstm_update_backward.wgsl (prepended with lstm_cell.wgsl, V = f32).

struct Params {
    batch: u32,
    hidden: u32,
    t: u32,
    row_threads: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> d_out: array<f32>;   // [T, B, H]
@group(0) @binding(2) var<storage, read> dh_rec: array<f32>;  // [T + 1, B, H]
@group(0) @binding(3) var<storage, read> mask: array<f32>;    // [T, B]
@group(0) @binding(4) var<storage, read> gates: array<f32>;   // [T, B, 4H]
@group(0) @binding(5) var<storage, read> cells: array<f32>;   // [T + 1, B, H]
@group(0) @binding(6) var<storage, read_write> d_gates: array<f32>;  // [T, B, 4H]
@group(0) @binding(7) var<storage, read_write> dc: array<f32>;       // [B, H]
@group(0) @binding(8) var<storage, read_write> dh_carry: array<f32>; // [B, H]

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
    let dh = d_out[prev] + dh_rec[next] + dh_carry[idx];
    let g0 = row * 4u * h + j;
    if (lstm_pass_masked(row, g0, h, idx, dh)) {
        return;
    }
    lstm_update_backward(prev, next, g0, h, idx, dh);
}
