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
    // Row blocks (workgroups along y) before this dispatch's first: products
    // with more row blocks than a grid dimension holds go in several.
    y0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
