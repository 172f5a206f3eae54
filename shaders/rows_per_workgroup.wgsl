// Row kernels (layer_norm*.wgsl) over one row per workgroup, for GPUs: the WG
// invocations stride along the row together, so neighbours read neighbouring
// elements (coalesced), and a row's sums meet in shared memory. One row per
// invocation (rows_per_invocation.wgsl) would read a row per lane, far
// apart, and leave a BERT batch's few thousand rows too few lanes to keep a
// GPU busy. Needs WG (a power of two) and `p.row_groups`.

const ROW_LANES: u32 = WG;
// The tree sum in row_total halves WG each step.
const_assert ((WG & (WG - 1u)) == 0u);

var<workgroup> row_partial: array<vec2<f32>, WG>;

// Uniform across the workgroup, so kernels may return early on it.
fn row_index(wid: vec3<u32>, lid: u32) -> u32 {
    return wid.y * p.row_groups + wid.x;
}

// The sum over the workgroup of every invocation's `v`, returned to all.
fn row_total(v: vec2<f32>, lid: u32) -> vec2<f32> {
    row_partial[lid] = v;
    workgroupBarrier();
    for (var span = WG / 2u; span > 0u; span = span / 2u) {
        if (lid < span) {
            row_partial[lid] += row_partial[lid + span];
        }
        workgroupBarrier();
    }
    let total = row_partial[0];
    workgroupBarrier();
    return total;
}
