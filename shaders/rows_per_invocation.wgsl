// Row kernels (layer_norm*.wgsl, softmax.wgsl) over one row per invocation:
// WG rows per workgroup, no shared memory or barriers, which CPU adapters pay
// dearly for (rows are many: batch x tokens). The alternative is
// rows_per_workgroup.wgsl; the host appends one of the two. Needs WG and
// `p.row_groups`.

// Invocations that share a row.
const ROW_LANES: u32 = 1u;

fn row_index(wid: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * p.row_groups + wid.x) * WG + lid;
}

// The merge over the invocations that share a row: here, one.
fn row_reduce(v: vec2<f32>, lid: u32) -> vec2<f32> {
    return v;
}
