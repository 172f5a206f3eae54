// Functions every generated expression may call (elementwise kernels and
// matmul epilogues prepend this file). WGSL has no erf, sigmoid or hash.

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

// kiln_tanh: shaders/tanh.wgsl, which the host appends with TanhT = f32.

// x^y as PyTorch defines it. WGSL's pow is exp2(y * log2(x)): undefined for
// x < 0 (NaN on most GPUs), for 0^y with y <= 0, and NaN at 0^0. Here a
// negative base takes an integer exponent (the sign from its parity; any
// other exponent gives NaN), 0^0 = 1 and 0^y = inf for y < 0.
fn kiln_pow(x: f32, y: f32) -> f32 {
    if (y == 0.0) {
        return 1.0;
    }
    if (x == 0.0) {
        return select(0.0, bitcast<f32>(0x7f800000u), y < 0.0);
    }
    let magnitude = pow(abs(x), y);
    if (x > 0.0) {
        return magnitude;
    }
    if (fract(y) != 0.0) {
        return bitcast<f32>(0x7fc00000u);
    }
    return select(magnitude, -magnitude, fract(y * 0.5) != 0.0);
}

fn kiln_gelu(x: f32) -> f32 {
    return 0.5 * x * (1.0 + kiln_erf(x * 0.70710678118654752));
}
