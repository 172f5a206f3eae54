// Parameters shared by every matmul kernel; prepended to each by the host
// (kernels/matmul.rs mirrors this struct).
struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_batch: u32,
    b_batch: u32,
    c_batch: u32,
    z0: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
