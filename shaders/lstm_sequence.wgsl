// A whole LSTM sequence forward in one dispatch: the time loop runs inside the
// kernel. Samples of a batch never interact, so each workgroup takes p.rows
// rows (samples) through every step on its own, with a barrier between steps; one
// dispatch replaces a recurrent product and a gate kernel per step, whose
// launch costs dominate on CPU adapters (about 0.1 ms each on lavapipe).
//
// Per step, item (row group, quad q) computes units 4q..4q+3 of TR rows: the
// four gates' pre-activations h_{t-1} W_hh + x_t W_ih (slot t of xproj) + bias
// as vec4s, then the update (shaders/lstm_update.wgsl, V = vec4<f32>).
// Invocations loop over the workgroup's items. Semantics as
// shaders/lstm_step.wgsl: a masked (sample, step) keeps h and c; activated
// gates are kept for the backward pass; cells and states hold T + 1 slots,
// slot 0 the initial state.
// Prepended: H (a multiple of 4), QUADS (H / 4), TR, WG; generated: ACCUMULATE
// (`sums`, row u's four gate sums over h_{t-1} for the item's units).

// Params and binding 0: shaders/lstm_sequence_common.wgsl.
@group(0) @binding(1) var<storage, read> xproj: array<vec4<f32>>;        // [T, B, 4H]
@group(0) @binding(2) var<storage, read> w_hh: array<vec4<f32>>;         // [H, 4H]
@group(0) @binding(3) var<storage, read> bias: array<vec4<f32>>;         // [4H]
@group(0) @binding(4) var<storage, read> mask: array<f32>;               // [T, B]
@group(0) @binding(5) var<storage, read_write> gates: array<vec4<f32>>;  // [T, B, 4H]
@group(0) @binding(6) var<storage, read_write> cells: array<vec4<f32>>;  // [T + 1, B, H]
@group(0) @binding(7) var<storage, read_write> states: array<vec4<f32>>; // [T + 1, B, H]

// Row `b`'s units 4q..4q+3 at step t, given their gate sums over h_{t-1}.
fn finish(t: u32, b: u32, q: u32, rec: array<vec4<f32>, 4>) {
    let row = t * p.batch + b;
    let prev = row * QUADS + q;
    let next = prev + p.batch * QUADS;
    if (lstm_carry_masked(row, prev, next)) {
        return;
    }
    let g0 = row * H + q;
    var pre: array<V, 4>;
    for (var k = 0u; k < 4u; k++) {
        pre[k] = rec[k] + xproj[g0 + k * QUADS] + bias[q + k * QUADS];
    }
    lstm_update(prev, next, g0, QUADS, pre);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    for (var t = 0u; t < p.steps; t++) {
        for (var item = lid; item < (p.rows / TR) * QUADS; item += WG) {
            let q = item % QUADS;
            let first = wid.x * p.rows + (item / QUADS) * TR;
            if (first >= p.batch) {
                continue;
            }
{{ACCUMULATE}}
            // A loop, not TR inlined copies: the update's loads and stores
            // are most of the kernel's code, and code size sets how long
            // lavapipe takes to compile it.
            for (var u = 0u; u < TR; u++) {
                if (first + u < p.batch) {
                    finish(t, first + u, q, sums[u]);
                }
            }
        }
        // Step t + 1 reads every unit of h_t.
        storageBarrier();
    }
}
