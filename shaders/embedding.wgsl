// Embedding lookup: out[i, c] = table[ids[i], c].

struct Params {
    n: u32,
    dim: u32,
    row_threads: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * p.row_threads + gid.x;
    if (i >= p.n * p.dim) {
        return;
    }
    out[i] = table[ids[i / p.dim] * p.dim + i % p.dim];
}
