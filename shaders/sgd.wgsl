// SGD's update of one element (PyTorch's formulation), for the grouped
// optimizer kernel (see crates/graph/src/optim.rs):
//   g = grad + weight_decay * p
//   with momentum: v = momentum * v + g; g = nesterov ? g + momentum * v : v
//   p -= lr * g
// State s.x: the velocity (only with momentum).

struct Hyper {
    nesterov: u32,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
}

fn update(x: f32, grad: f32, s: vec2<f32>) -> Step {
    var g = grad + p.hyper.weight_decay * x;
    var velocity = s.x;
    if (p.hyper.momentum != 0.0) {
        velocity = p.hyper.momentum * velocity + g;
        g = select(velocity, g + p.hyper.momentum * velocity, p.hyper.nesterov != 0u);
    }
    return Step(x - p.hyper.lr * g, vec2<f32>(velocity, 0.0));
}
