// Backward through a whole LSTM sequence in one dispatch, t = T-1 down to 0,
// workgroups over rows as in shaders/lstm_sequence.wgsl. Per step, item (row
// group, NQ quads from q0) first sums the recurrent gradient
// d_gates_{t+1} W_hh^T for its units of its TR rows (W_hh^T comes transposed,
// [4H, H], so a vec4 load holds four units), then per unit quad adds the
// output's gradient (d_out slot t) and what masked later steps passed
// through (dh_carry), writes the gate pre-activations' gradient and carries
// dc_{t-1} in `dc`, as shaders/lstm_step_backward.wgsl does per step. Through
// a masked step h and c pass unchanged, so their gradients carry over and the
// gates get none.
// Prepended: H (a multiple of 4), QUADS (H / 4), TR, NQ (dividing QUADS), WG;
// generated: ACCUMULATE (`sums`, row u's d_gates_{t+1} W_hh^T for quad q0 + n).

// Params and binding 0: shaders/lstm_sequence_common.wgsl; the update:
// shaders/lstm_update_backward.wgsl (V = vec4<f32>).
@group(0) @binding(1) var<storage, read> d_out: array<vec4<f32>>;          // [T, B, H]
@group(0) @binding(2) var<storage, read> w_t: array<vec4<f32>>;            // [4H, H]
@group(0) @binding(3) var<storage, read> mask: array<f32>;                 // [T, B]
@group(0) @binding(4) var<storage, read> gates: array<vec4<f32>>;          // [T, B, 4H]
@group(0) @binding(5) var<storage, read> cells: array<vec4<f32>>;          // [T + 1, B, H]
@group(0) @binding(6) var<storage, read_write> d_gates: array<vec4<f32>>;  // [T, B, 4H]
@group(0) @binding(7) var<storage, read_write> dc: array<vec4<f32>>;       // [B, H]
@group(0) @binding(8) var<storage, read_write> dh_carry: array<vec4<f32>>; // [B, H]

// Row `b`'s units 4q..4q+3 at step t, given d_gates_{t+1} W_hh^T for them.
fn finish(t: u32, b: u32, q: u32, rec: vec4<f32>) {
    let row = t * p.batch + b;
    let prev = row * QUADS + q;
    let next = prev + p.batch * QUADS;
    let carried = b * QUADS + q;
    let dh = d_out[prev] + rec + dh_carry[carried];
    let g0 = row * H + q;
    if (lstm_pass_masked(row, g0, QUADS, carried, dh)) {
        return;
    }
    lstm_update_backward(prev, next, g0, QUADS, carried, dh);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    for (var step = 0u; step < p.steps; step++) {
        let t = p.steps - 1u - step;
        for (var item = lid; item < (p.rows / TR) * (QUADS / NQ); item += WG) {
            let q0 = (item % (QUADS / NQ)) * NQ;
            let first = wid.x * p.rows + (item / (QUADS / NQ)) * TR;
            if (first >= p.batch) {
                continue;
            }
{{ACCUMULATE}}
            // Loops, not inlined copies: the updates' loads and stores are
            // most of the kernel's code, and code size sets how long
            // lavapipe takes to compile it.
            for (var u = 0u; u < TR; u++) {
                if (first + u < p.batch) {
                    for (var n = 0u; n < NQ; n++) {
                        finish(t, first + u, q0 + n, sums[u][n]);
                    }
                }
            }
        }
        // Step t - 1 reads every gate gradient of step t.
        storageBarrier();
    }
}
