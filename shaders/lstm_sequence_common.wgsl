// Shared by the LSTM sequence kernels (shaders/lstm_sequence*.wgsl): their
// parameter block at binding 0 and the clamped tanh both use.

struct Params {
    batch: u32,
    steps: u32,
    // Rows per workgroup, a multiple of TR.
    rows: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// tanh saturates to +-1 in f32 beyond 15; clamping keeps exp-based
// implementations from computing inf / inf.
fn tanh4(x: vec4<f32>) -> vec4<f32> {
    return tanh(clamp(x, vec4<f32>(-15.0), vec4<f32>(15.0)));
}
