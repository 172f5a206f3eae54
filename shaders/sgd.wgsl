// One SGD step over one parameter tensor, in place (PyTorch's formulation):
//   g = grad + weight_decay * p
//   with momentum: v = momentum * v + g; g = nesterov ? g + momentum * v : v
//   p -= lr * g

struct Params {
    n: u32,
    row_threads: u32,
    nesterov: u32,
    _pad: u32,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    _pad2: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> velocity: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * p.row_threads + gid.x;
    if (i >= p.n) {
        return;
    }
    var g = grad[i] + p.weight_decay * param[i];
    if (p.momentum != 0.0) {
        let v = p.momentum * velocity[i] + g;
        velocity[i] = v;
        g = select(v, g + p.momentum * v, p.nesterov != 0u);
    }
    param[i] -= p.lr * g;
}
