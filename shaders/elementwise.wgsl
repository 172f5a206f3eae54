// One generated kernel per elementwise expression: out[i] = EXPR(x0, x1, ..., s0..s3).
//
// The host fills the BINDINGS placeholder (inputs x0.. read-only, then `out`),
// LOADS (how each input is read: at the output index when its shape matches, at
// element 0 when it is a scalar, through broadcast strides otherwise), EXPR, and
// STORE (to `out[idx]`, or through the strides in slot 3 for a strided write),
// and HELPERS (shaders/expr_helpers.wgsl). Strided slots read through
// generated functions with their extents and strides as constants.

// PARAMS: the parameter block, only what the kernel reads (so that several
// kernels' blocks fit one fused block): numel and row_threads; scalars when
// the expression reads s0..s3; offsets (first element of each strided slot)
// when an input or the output is strided.
{{PARAMS}}
@group(0) @binding(0) var<uniform> p: Params;
{{BINDINGS}}

{{HELPERS}}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.y * p.row_threads + gid.x;
    if (idx >= p.numel) {
        return;
    }
{{SCALARS}}{{LOADS}}
    {{STORE}}
}
