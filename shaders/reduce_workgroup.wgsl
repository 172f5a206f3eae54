// Reduction over the middle axis of an [outer, len, inner] view, one workgroup per
// output: invocations stride over `len` and combine through shared memory. The
// right kernel when `len` is long and outputs are few (e.g. a full sum).
// Prepended: INIT, WG (power of two); COMBINE and FINISH as in reduce_thread.

struct Params {
    outer: u32,
    len: u32,
    inner: u32,
    row_groups: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o = wid.y * p.row_groups + wid.x;
    // The whole workgroup leaves together, so barriers stay uniform.
    if (o >= p.outer * p.inner) {
        return;
    }
    let base = (o / p.inner) * p.len * p.inner + o % p.inner;
    var acc = INIT;
    for (var l = lid; l < p.len; l += WG) {
        let v = x[base + l * p.inner];
        acc = {{COMBINE}};
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var span = WG / 2u; span > 0u; span = span / 2u) {
        if (lid < span) {
            let v = partial[lid + span];
            let acc = partial[lid];
            partial[lid] = {{COMBINE}};
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let acc = partial[0];
        out[o] = {{FINISH}};
    }
}
