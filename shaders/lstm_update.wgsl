// One element's forward step, shared by the step and sequence kernels: unit j
// (V = f32) or units 4q..4q+3 (V = vec4<f32>) of row `row` (t * B + b). The
// including kernel declares `mask`, `gates`, `cells` and `states`; `prev` and
// `next` index the element in slots t and t + 1 of cells and states, `g0` its
// input gate in gates, `stride` the distance between its four gates.

// A masked (sample, step) keeps h and c from the step before (Keras
// semantics), so padding never changes the state. True if it was masked.
fn lstm_carry_masked(row: u32, prev: u32, next: u32) -> bool {
    if (mask[row] < 0.5) {
        cells[next] = cells[prev];
        states[next] = states[prev];
        return true;
    }
    return false;
}

// The gates (kept for the backward pass), c_t and h_t from the gates'
// pre-activations.
fn lstm_update(prev: u32, next: u32, g0: u32, stride: u32, pre: array<V, 4>) {
    let gate = lstm_gates(pre);
    for (var k = 0u; k < 4u; k++) {
        gates[g0 + k * stride] = gate[k];
    }
    let c = lstm_cell(gate, cells[prev]);
    cells[next] = c;
    states[next] = gate[3] * kiln_tanh(c);
}
