// One generated kernel per elementwise expression: out[i] = EXPR(x0, x1, ..., s0..s3).
//
// The host fills the BINDINGS placeholder (inputs x0.. read-only, then `out`),
// LOADS (how each input is read: at the output index when its shape matches, at
// element 0 when it is a scalar, through broadcast strides otherwise), EXPR, and
// STORE (to `out[idx]`, or through the strides in slot 3 for a strided write),
// and HELPERS (shaders/expr_helpers.wgsl).
// Prepended: MAX_RANK.

struct Params {
    numel: u32,
    rank: u32,
    row_threads: u32,
    _pad: u32,
    scalars: vec4<f32>,
    // Output shape, 8 dims packed in two vec4s (uniform arrays need 16-byte strides).
    shape: array<vec4<u32>, 2>,
    // Element strides of input i in dims 0..8: strides[2 * i], strides[2 * i + 1].
    strides: array<vec4<u32>, 8>,
    // First element of each strided input.
    offsets: vec4<u32>,
}

@group(0) @binding(0) var<uniform> p: Params;
{{BINDINGS}}

fn shape_at(d: u32) -> u32 {
    return p.shape[d / 4u][d % 4u];
}

fn stride_at(input: u32, d: u32) -> u32 {
    return p.strides[input * 2u + d / 4u][d % 4u];
}

// Offset of output element `idx` in a strided (broadcast, permuted, sliced) input.
fn broadcast_index(input: u32, idx: u32) -> u32 {
    var rem = idx;
    var off = p.offsets[input];
    for (var d = p.rank; d > 0u; d--) {
        let extent = shape_at(d - 1u);
        off += (rem % extent) * stride_at(input, d - 1u);
        rem = rem / extent;
    }
    return off;
}

{{HELPERS}}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.y * p.row_threads + gid.x;
    if (idx >= p.numel) {
        return;
    }
    let s0 = p.scalars.x;
    let s1 = p.scalars.y;
    let s2 = p.scalars.z;
    let s3 = p.scalars.w;
{{LOADS}}
    {{STORE}}
}
