// Shared by the LSTM sequence kernels (shaders/lstm_sequence*.wgsl): their
// parameter block at binding 0.

struct Params {
    batch: u32,
    steps: u32,
    // Rows per workgroup, a multiple of TR.
    rows: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
