// One generated kernel per elementwise expression: out[i] = EXPR(x0, x1, ..., s0..s3).
//
// The host fills the BINDINGS placeholder (inputs x0.. read-only, then `out`),
// LOADS (how each input is read: at the output index when its shape matches, at
// element 0 when it is a scalar, through broadcast strides otherwise), EXPR, and
// STORE (to `out[idx]`, or through the strides in slot 3 for a strided write).
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

// erf to about 1e-7: a Taylor series near 0 (keeps relative accuracy for tiny x),
// else Numerical Recipes' Chebyshev fit of erfc (fractional error < 1.2e-7).
// WGSL has no erf.
fn kiln_erf(x: f32) -> f32 {
    let z = abs(x);
    if (z < 0.5) {
        let x2 = x * x;
        let series = 1.0 + x2 * (-1.0 / 3.0 + x2 * (1.0 / 10.0 + x2 * (-1.0 / 42.0
            + x2 * (1.0 / 216.0 + x2 * (-1.0 / 1320.0 + x2 * (1.0 / 9360.0))))));
        return 1.1283791670955126 * x * series;
    }
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))));
    let r = 1.0 - t * exp(poly);
    return select(-r, r, x >= 0.0);
}

// A stateless hash (lowbias32), so random numbers depend only on (seed, index):
// dropout recomputes its mask in the backward pass instead of storing it.
fn kiln_hash(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

// Uniform in [0, 1) for element `i` of the stream `seed`.
fn kiln_uniform(i: u32, seed: u32) -> f32 {
    return f32(kiln_hash(i ^ kiln_hash(seed)) >> 8u) * (1.0 / 16777216.0);
}

fn kiln_sigmoid(x: f32) -> f32 {
    // Split on the sign so exp never overflows.
    let e = exp(-abs(x));
    return select(e / (1.0 + e), 1.0 / (1.0 + e), x >= 0.0);
}

fn kiln_gelu(x: f32) -> f32 {
    return 0.5 * x * (1.0 + kiln_erf(x * 0.70710678118654752));
}

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
