// naga takes subgroup builtins without `enable subgroups;` (which it rejects);
// the device must have been opened with Features::SUBGROUP.
// A whole LSTM sequence forward in one dispatch, one hidden unit per lane, for
// CPU adapters with fixed-size subgroups (lavapipe's 8 lanes). Same semantics
// and buffers as shaders/lstm_sequence.wgsl, read element by element.
//
// Why a unit per lane: on lavapipe every storage load whose index differs per
// lane costs a loop over the lanes, and the quad-per-item kernel reloads
// W_hh at every step. Here each invocation loads its unit's four gate columns
// of W_hh once, into registers (spilled to its stack on a CPU, still far
// cheaper to read there), and the subgroup shares h_{t-1}: each lane loads a
// few quads of a row and broadcasts them, so a row of h costs each lane
// H / (4 * SG) vec4 loads.
// The update then works on the unit's four gates without any exchange.
//
// The workgroup holds H lanes (H a multiple of SG) and takes rows
// wid.x * p.rows .. + p.rows through every step, a row at a time, with a
// barrier between steps. The row loop is uniform, so every lane takes part
// in every broadcast.
//
// The backward pass keeps the quad layout (shaders/lstm_sequence_backward.wgsl):
// its recurrent sum runs over a row of 4H gate gradients, so a unit per lane
// would broadcast four times as much per multiply-add. On lavapipe that ran
// no faster than the quads, and the variants with more units per lane that
// did run faster took minutes to compile.
// Prepended: H, SG; generated: WEIGHTS (w{k}: row k of W_hh at the unit's
// four gates) and RECURRENT (`rec`, the unit's four gate sums over h_{t-1}
// for one row), see kernels/lstm.rs.

// Params and binding 0: shaders/lstm_sequence_common.wgsl. The update:
// shaders/lstm_update.wgsl (V = f32).
@group(0) @binding(1) var<storage, read> xproj: array<f32>;        // [T, B, 4H]
@group(0) @binding(2) var<storage, read> w_hh: array<f32>;         // [H, 4H]
@group(0) @binding(3) var<storage, read> bias: array<f32>;         // [4H]
@group(0) @binding(4) var<storage, read> mask: array<f32>;         // [T, B]
@group(0) @binding(5) var<storage, read_write> gates: array<f32>;  // [T, B, 4H]
@group(0) @binding(6) var<storage, read_write> cells: array<f32>;  // [T + 1, B, H]
@group(0) @binding(7) var<storage, read_write> states: array<f32>; // [T + 1, B, H]

// Quad `q` of the hidden state at `base`, zero past the last unit (lanes
// with no quad of their own still take part in the broadcasts).
fn h_quad(base: u32, q: u32) -> vec4<f32> {
    if (q * 4u >= H) {
        return vec4<f32>(0.0);
    }
    let i = base + 4u * q;
    return vec4<f32>(states[i], states[i + 1u], states[i + 2u], states[i + 3u]);
}

@compute @workgroup_size(H)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) unit: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
{{WEIGHTS}}
    let b4 = vec4<f32>(bias[unit], bias[unit + H], bias[unit + 2u * H], bias[unit + 3u * H]);
    let first = wid.x * p.rows;
    let end = min(first + p.rows, p.batch);
    for (var t = 0u; t < p.steps; t++) {
        for (var b = first; b < end; b++) {
            let row = t * p.batch + b;
            let prev = row * H + unit;
            let next = prev + p.batch * H;
            // The mask is the row's, alike in every lane: a masked row skips
            // the broadcasts in all of them.
            if (lstm_carry_masked(row, prev, next)) {
                continue;
            }
            let h_base = row * H;
{{RECURRENT}}
            let g0 = row * 4u * H + unit;
            let x4 = vec4<f32>(xproj[g0], xproj[g0 + H], xproj[g0 + 2u * H], xproj[g0 + 3u * H]);
            let pre = rec + x4 + b4;
            lstm_update(prev, next, g0, H, array<V, 4>(pre.x, pre.y, pre.z, pre.w));
        }
        // Step t + 1 reads every unit of h_t.
        storageBarrier();
    }
}
