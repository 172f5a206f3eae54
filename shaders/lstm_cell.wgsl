// The LSTM cell's arithmetic, written once for the step kernels (V = f32: one
// unit per invocation) and the sequence kernels (V = vec4<f32>: four units);
// the host prepends `alias V = ...;`. Gates are in the order Keras and
// PyTorch share: input, forget, cell candidate, output.

fn lstm_sigmoid(x: V) -> V {
    let e = exp(-abs(x));
    return select(e / (1.0 + e), 1.0 / (1.0 + e), x >= V(0.0));
}

// kiln_tanh: shaders/tanh.wgsl, which the host appends with TanhT = V.

// The activated gates from their pre-activations.
fn lstm_gates(pre: array<V, 4>) -> array<V, 4> {
    return array<V, 4>(
        lstm_sigmoid(pre[0]),
        lstm_sigmoid(pre[1]),
        kiln_tanh(pre[2]),
        lstm_sigmoid(pre[3]),
    );
}

// c_t = f * c_{t-1} + i * g; then h_t = o * tanh(c_t).
fn lstm_cell(gate: array<V, 4>, c_prev: V) -> V {
    return gate[1] * c_prev + gate[0] * gate[2];
}

struct LstmCellGradient {
    // Of the gates' pre-activations.
    pre: array<V, 4>,
    // Of c_{t-1}.
    c_prev: V,
}

// Backward of one step: `dh` and `dc` reach h_t and c_t from above and from
// step t + 1; `gate` are the activated gates, `c_prev` and `c` c_{t-1} and c_t.
fn lstm_cell_backward(dh: V, dc: V, gate: array<V, 4>, c_prev: V, c: V) -> LstmCellGradient {
    let i = gate[0];
    let f = gate[1];
    let g = gate[2];
    let o = gate[3];
    let tc = kiln_tanh(c);
    let dcell = dc + dh * o * (1.0 - tc * tc);
    let pre = array<V, 4>(
        dcell * g * i * (1.0 - i),
        dcell * c_prev * f * (1.0 - f),
        dcell * i * (1.0 - g * g),
        dh * tc * o * (1.0 - o),
    );
    return LstmCellGradient(pre, dcell * f);
}
