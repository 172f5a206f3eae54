// One Adam / AdamW step over one parameter tensor, in place:
//   Adam:  g += weight_decay * p          AdamW: p *= 1 - lr * weight_decay
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr * (m / bc1) / (sqrt(v / bc2) + eps),  bc_i = 1 - b_i^t (from the host)

struct Params {
    n: u32,
    row_threads: u32,
    decoupled: u32,
    _pad: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
    _pad2: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * p.row_threads + gid.x;
    if (i >= p.n) {
        return;
    }
    var x = param[i];
    var g = grad[i];
    if (p.decoupled != 0u) {
        x = x * (1.0 - p.lr * p.weight_decay);
    } else {
        g = g + p.weight_decay * x;
    }
    let mi = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] = x - p.lr * (mi / p.bc1) / (sqrt(vi / p.bc2) + p.eps);
}
