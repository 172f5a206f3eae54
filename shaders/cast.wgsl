// Conversions between f32 and f16 storage. f16 values are stored two per 32-bit
// word (little end first) and converted with pack2x16float / unpack2x16float,
// core WGSL builtins, so f16 storage works on adapters without SHADER_F16.
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

// f16 bits of `v`, rounded to nearest even. pack2x16float leaves values beyond
// f16's range undefined (some drivers saturate), but loss scaling must see
// overflow: those become infinities here, and NaN stays NaN, as in IEEE.
fn half_bits(v: f32) -> u32 {
    let bits = bitcast<u32>(v);
    let sign = (bits >> 16u) & 0x8000u;
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return sign | 0x7e00u;
    }
    // 65520 is halfway between 65504 and 2^16, and rounds to even: up.
    if ((bits & 0x7fffffffu) >= 0x477ff000u) {
        return sign | 0x7c00u;
    }
    return pack2x16float(vec2<f32>(v, 0.0)) & 0xffffu;
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
