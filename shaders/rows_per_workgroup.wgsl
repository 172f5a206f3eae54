// Row kernels (layer_norm*.wgsl, softmax.wgsl) over one row per workgroup, for
// GPUs: the WG invocations stride along the row together, so neighbours read
// neighbouring elements (coalesced), and a row's partial results meet in
// shared memory. One row per invocation (rows_per_invocation.wgsl) would read
// a row per lane, far apart, and leave a BERT batch's few thousand rows too
// few lanes to keep a GPU busy. Needs WG (a power of two), `p.row_groups` and
// the kernel's `row_combine(a, b)`, which merges two lanes' partial results
// (a sum for layer norm, a running max and sum for softmax).

const ROW_LANES: u32 = WG;
// The tree in row_reduce halves WG each step.
const_assert ((WG & (WG - 1u)) == 0u);

var<workgroup> row_partial: array<vec2<f32>, WG>;

// Uniform across the workgroup, so kernels may return early on it.
fn row_index(wid: vec3<u32>, lid: u32) -> u32 {
    return wid.y * p.row_groups + wid.x;
}

// Every invocation's `v` merged by row_combine over the workgroup, returned
// to all.
fn row_reduce(v: vec2<f32>, lid: u32) -> vec2<f32> {
    row_partial[lid] = v;
    workgroupBarrier();
    for (var span = WG / 2u; span > 0u; span = span / 2u) {
        if (lid < span) {
            row_partial[lid] = row_combine(row_partial[lid], row_partial[lid + span]);
        }
        workgroupBarrier();
    }
    let merged = row_partial[0];
    workgroupBarrier();
    return merged;
}
