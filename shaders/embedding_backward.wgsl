// Gradient of an embedding lookup, without atomics: the host groups the
// positions of each distinct id (CSR: starts / positions), and one invocation per
// (distinct id, column) sums that id's rows of the incoming gradient. Repeated
// ids therefore add up exactly and deterministically. Rows of ids that do not
// occur keep the zeros the table gradient starts with.

struct Params {
    unique: u32,
    dim: u32,
    row_threads: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad_out: array<f32>;
@group(0) @binding(2) var<storage, read> unique_ids: array<u32>;
@group(0) @binding(3) var<storage, read> starts: array<u32>;
@group(0) @binding(4) var<storage, read> positions: array<u32>;
@group(0) @binding(5) var<storage, read_write> grad_table: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * p.row_threads + gid.x;
    if (i >= p.unique * p.dim) {
        return;
    }
    let u = i / p.dim;
    let c = i % p.dim;
    var acc = 0.0;
    for (var k = starts[u]; k < starts[u + 1u]; k++) {
        acc += grad_out[positions[k] * p.dim + c];
    }
    grad_table[unique_ids[u] * p.dim + c] = acc;
}
