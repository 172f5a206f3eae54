// One RMSProp step over one parameter tensor, in place (PyTorch / Keras form):
//   g = grad + weight_decay * p
//   s = alpha * s + (1 - alpha) * g^2
//   with momentum: b = momentum * b + g / (sqrt(s) + eps); p -= lr * b
//   without:       p -= lr * g / (sqrt(s) + eps)

struct Params {
    n: u32,
    row_threads: u32,
    _pad: u32,
    _pad1: u32,
    lr: f32,
    alpha: f32,
    eps: f32,
    weight_decay: f32,
    momentum: f32,
    _pad2: f32,
    _pad3: f32,
    _pad4: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> square_avg: array<f32>;
@group(0) @binding(4) var<storage, read_write> momentum_buf: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * p.row_threads + gid.x;
    if (i >= p.n) {
        return;
    }
    let g = grad[i] + p.weight_decay * param[i];
    let s = p.alpha * square_avg[i] + (1.0 - p.alpha) * g * g;
    square_avg[i] = s;
    var step = g / (sqrt(s) + p.eps);
    if (p.momentum != 0.0) {
        step = p.momentum * momentum_buf[i] + step;
        momentum_buf[i] = step;
    }
    param[i] -= p.lr * step;
}
