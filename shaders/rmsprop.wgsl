// RMSProp's update of one element (PyTorch's form: eps outside the square
// root; Keras puts it inside, sqrt(s + eps)), for the grouped
// optimizer kernel (see crates/graph/src/optim.rs):
//   g = grad + weight_decay * p
//   s = alpha * s + (1 - alpha) * g^2
//   with momentum: b = momentum * b + g / (sqrt(s) + eps); p -= lr * b
//   without:       p -= lr * g / (sqrt(s) + eps)
// State: s.x = the square average, s.y = the momentum buffer.

struct Hyper {
    lr: f32,
    alpha: f32,
    eps: f32,
    weight_decay: f32,
    momentum: f32,
    _pad0: f32,
    _pad1: f32,
    _pad2: f32,
}

fn update(x: f32, grad: f32, s: vec2<f32>) -> Step {
    let h = p.hyper;
    let g = grad + h.weight_decay * x;
    let square_avg = h.alpha * s.x + (1.0 - h.alpha) * g * g;
    var step = g / (sqrt(square_avg) + h.eps);
    if (h.momentum != 0.0) {
        step = h.momentum * s.y + step;
    }
    return Step(x - h.lr * step, vec2<f32>(square_avg, step));
}
