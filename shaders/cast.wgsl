// Conversions between f32 and f16 storage. f16 values are stored two per 32-bit
// word (little end first), converted to f16 in integer arithmetic and back
// with unpack2x16float (exact), so f16 storage works on adapters without
// SHADER_F16.
// Prepended: TO_HALF (f32 -> f16 when true, f16 -> f32 otherwise).

struct Params {
    n: u32,
    row_threads: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

// f16 bits of `v`, rounded to nearest even, in integer arithmetic.
// pack2x16float would do for most values, but WGSL lets it round either way
// and flush subnormals, and leaves values beyond f16's range undefined (some
// drivers saturate), while loss scaling must see overflow: so every adapter
// gives IEEE's result, infinities and NaN included.
fn half_bits(v: f32) -> u32 {
    let bits = bitcast<u32>(v);
    let sign = (bits >> 16u) & 0x8000u;
    let magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) {
        return sign | 0x7e00u;
    }
    // 65520 is halfway between 65504 and 2^16, and rounds to even: up.
    if (magnitude >= 0x477ff000u) {
        return sign | 0x7c00u;
    }
    if (magnitude >= 0x38800000u) {
        // A normal f16 (2^-14 and up): the exponent rebiased from 127 to
        // 15, then the 13 bits f16 drops rounded off; a carry into the
        // exponent is the right result too.
        let rebiased = magnitude - 0x38000000u;
        return sign | ((rebiased + 0xfffu + ((rebiased >> 13u) & 1u)) >> 13u);
    }
    // Below 2^-25 (half the smallest subnormal, which rounds to even: 0).
    if (magnitude <= 0x33000000u) {
        return sign;
    }
    // A subnormal f16 counts units of 2^-24: the 24-bit significand shifted
    // right by 126 - exponent (14 to 24 here), rounded to nearest even.
    let significand = (magnitude & 0x7fffffu) | 0x800000u;
    let shift = 126u - (magnitude >> 23u);
    let units = significand >> shift;
    let rest = significand & ((1u << shift) - 1u);
    let half = 1u << (shift - 1u);
    let up = rest > half || (rest == half && (units & 1u) == 1u);
    return sign | (units + select(0u, 1u, up));
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * p.row_threads + gid.x;
    if (TO_HALF) {
        // One invocation per output word: elements 2i and 2i + 1.
        if (2u * i >= p.n) {
            return;
        }
        let lo = bitcast<f32>(src[2u * i]);
        var hi = 0.0;
        if (2u * i + 1u < p.n) {
            hi = bitcast<f32>(src[2u * i + 1u]);
        }
        dst[i] = half_bits(lo) | (half_bits(hi) << 16u);
    } else {
        if (i >= p.n) {
            return;
        }
        let pair = unpack2x16float(src[i / 2u]);
        dst[i] = bitcast<u32>(pair[i % 2u]);
    }
}
