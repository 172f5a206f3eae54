// Adam / AdamW's update of one element, for the grouped optimizer kernel (see
// crates/graph/src/optim.rs):
//   Adam:  g += weight_decay * p          AdamW: p *= 1 - lr * weight_decay
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr * (m / bc1) / (sqrt(v / bc2) + eps),  bc_i = 1 - b_i^t (from the host)
// State: s.x = m, s.y = v.

struct Hyper {
    decoupled: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
}

fn update(param: f32, grad: f32, s: vec2<f32>) -> Step {
    let h = p.hyper;
    var x = param;
    var g = grad;
    if (h.decoupled != 0u) {
        x = x * (1.0 - h.lr * h.weight_decay);
    } else {
        g = g + h.weight_decay * x;
    }
    let m = h.beta1 * s.x + (1.0 - h.beta1) * g;
    let v = h.beta2 * s.y + (1.0 - h.beta2) * g * g;
    return Step(x - h.lr * (m / h.bc1) / (sqrt(v / h.bc2) + h.eps), vec2<f32>(m, v));
}
