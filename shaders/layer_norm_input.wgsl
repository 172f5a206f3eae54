// Shared by layer_norm.wgsl and layer_norm_backward.wgsl, which the host
// (kernels/norm.rs) appends to it: the parameters, how lanes' row sums merge,
// and the values being normalised, x or with RESIDUAL x + r (a residual sum
// that is never written out; without RESIDUAL `r` is bound but unused).
// Rows are read W columns per access (`Vec`: f32, or vec4<f32> where rows are
// whole vec4s and each invocation owns its rows); indices count Vecs.
// Prepended: W and its helpers (`Vec`, `hsum`, `row_vecs`: kernels/rows.rs).

struct Params {
    rows: u32,
    cols: u32,
    row_groups: u32,
    // Forward only.
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Vec>;
@group(0) @binding(2) var<storage, read> r: array<Vec>;

// Two lanes' partial sums of a row, added (see row_reduce).
fn row_combine(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    return a + b;
}

fn xv(i: u32) -> Vec {
    if (RESIDUAL) {
        return x[i] + r[i];
    }
    return x[i];
}
