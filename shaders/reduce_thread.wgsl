// Reduction over the middle axis of an [outer, len, inner] view, one invocation per
// output. Neighbouring invocations read neighbouring `inner` elements, so this is
// the right kernel when `inner` is large or there are many outputs.
// Prepended: INIT (identity), TWG (invocations per workgroup); the COMBINE and
// FINISH placeholders are expressions of `acc`, `v` and `p.scale`.

struct Params {
    outer: u32,
    len: u32,
    inner: u32,
    row_threads: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(TWG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let o = gid.y * p.row_threads + gid.x;
    if (o >= p.outer * p.inner) {
        return;
    }
    let base = (o / p.inner) * p.len * p.inner + o % p.inner;
    var acc = INIT;
    for (var l = 0u; l < p.len; l++) {
        let v = x[base + l * p.inner];
        acc = {{COMBINE}};
    }
    out[o] = {{FINISH}};
}
