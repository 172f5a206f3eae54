// One element's backward step, shared by the step and sequence kernels (see
// lstm_update.wgsl for V, prev, next, g0 and stride). The including kernel
// declares `mask`, `gates`, `cells`, `d_gates`, `dc` and `dh_carry`; `carried`
// indexes the element in dc and dh_carry, and `dh` is the gradient reaching
// h_t.

// Through a masked step h and c pass unchanged, so their gradients carry
// over and the gates get none. True if it was masked.
fn lstm_pass_masked(row: u32, g0: u32, stride: u32, carried: u32, dh: V) -> bool {
    if (mask[row] < 0.5) {
        for (var k = 0u; k < 4u; k++) {
            d_gates[g0 + k * stride] = V(0.0);
        }
        dh_carry[carried] = dh;
        return true;
    }
    return false;
}

// The gradient of the gates' pre-activations, and dc_{t-1} carried in `dc`.
fn lstm_update_backward(prev: u32, next: u32, g0: u32, stride: u32, carried: u32, dh: V) {
    var gate: array<V, 4>;
    for (var k = 0u; k < 4u; k++) {
        gate[k] = gates[g0 + k * stride];
    }
    let grad = lstm_cell_backward(dh, dc[carried], gate, cells[prev], cells[next]);
    for (var k = 0u; k < 4u; k++) {
        d_gates[g0 + k * stride] = grad.pre[k];
    }
    dc[carried] = grad.c_prev;
    dh_carry[carried] = V(0.0);
}
