//! Host side of the LSTM kernels. Where the hidden size is a multiple of 4,
//! one dispatch runs a whole sequence (`shaders/lstm_sequence*.wgsl`);
//! otherwise the caller (kiln-graph's `lstm` op) owns the time loop: per step
//! one recurrent matmul into a slot of a sequence buffer, then one of the step
//! kernels (`shaders/lstm_step*.wgsl`).

use super::{expect_f32, expect_len, grid_2d, to_u32};
use crate::buffer::GpuBuffer;
use crate::device::Device;
use crate::error::Result;
use crate::kernel::Specialize;
use std::fmt::Write;

const FORWARD_SRC: &str = include_str!("../../../../shaders/lstm_step.wgsl");
const BACKWARD_SRC: &str = include_str!("../../../../shaders/lstm_step_backward.wgsl");
const SEQUENCE_SRC: &str = include_str!("../../../../shaders/lstm_sequence.wgsl");
const SEQUENCE_BACKWARD_SRC: &str = include_str!("../../../../shaders/lstm_sequence_backward.wgsl");
const SEQUENCE_COMMON_SRC: &str = include_str!("../../../../shaders/lstm_sequence_common.wgsl");
const PER_UNIT_SRC: &str = include_str!("../../../../shaders/lstm_sequence_per_unit.wgsl");
/// The cell's arithmetic, with its tanh for the kernel's `V`.
const CELL_SRC: &str = concat!(
    include_str!("../../../../shaders/lstm_cell.wgsl"),
    "\nalias TanhT = V;\n",
    include_str!("../../../../shaders/tanh.wgsl"),
);
const UPDATE_SRC: &str = include_str!("../../../../shaders/lstm_update.wgsl");
const UPDATE_BACKWARD_SRC: &str = include_str!("../../../../shaders/lstm_update_backward.wgsl");
const WORKGROUP: u32 = 64;
/// Rows (samples) each invocation of the sequence kernels takes per step:
/// each load of W_hh serves this many. On lavapipe (batch 32, 64 units, 200
/// steps) 8 rows ran the forward sequence in 22 ms, 4 rows in 31, 16 in 27.
const SEQUENCE_ROWS: usize = 8;
/// Invocations per workgroup of the sequence kernels (16 to 64 measured
/// alike on lavapipe).
const SEQUENCE_WORKGROUP: u32 = 32;
/// The largest hidden size the per-unit forward kernel takes: each lane
/// keeps its unit's 4H weights in registers, and LLVM's time to compile the
/// kernel grows steeply with them.
const PER_UNIT_MAX_HIDDEN: usize = 64;

/// How the sequence kernels lay their work over lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SequenceLayout {
    /// Items of [`SEQUENCE_ROWS`] rows by a quad of units, reading W_hh at
    /// every step (`shaders/lstm_sequence.wgsl` and its backward).
    Quads,
    /// Forward only: a unit per lane, its weights loaded once, rows shared
    /// through broadcasts in subgroups of `sg` lanes
    /// (`shaders/lstm_sequence_per_unit.wgsl`).
    UnitPerLane { sg: u32 },
}

/// Sizes of an LSTM sequence: `steps` time steps of `batch` samples with
/// `hidden` units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LstmShape {
    /// Time steps `T`.
    pub steps: usize,
    /// Samples `B`.
    pub batch: usize,
    /// Hidden units `H`.
    pub hidden: usize,
}

/// Buffers of the forward step (time-major; see `shaders/lstm_step.wgsl`).
pub struct LstmForward<'a> {
    /// `[T, B, 4H]` input projections `x_t W_ih`.
    pub xproj: &'a GpuBuffer,
    /// `[4H]`.
    pub bias: &'a GpuBuffer,
    /// `[T, B]` of 1 (real step) or 0 (padding).
    pub mask: &'a GpuBuffer,
    /// `[T, B, 4H]` activated gates, written.
    pub gates: &'a GpuBuffer,
    /// `[T + 1, B, H]` cell states; slot 0 is the initial state.
    pub cells: &'a GpuBuffer,
    /// `[T + 1, B, H]` hidden states; slot 0 is the initial state.
    pub states: &'a GpuBuffer,
}

/// Buffers of the backward step (see `shaders/lstm_step_backward.wgsl`).
pub struct LstmBackward<'a> {
    /// `[T, B, H]` gradient of the output sequence.
    pub d_out: &'a GpuBuffer,
    /// `[T, B]` of 1 (real step) or 0 (padding), as in the forward step.
    pub mask: &'a GpuBuffer,
    /// `[T, B, 4H]` activated gates the forward step wrote.
    pub gates: &'a GpuBuffer,
    /// `[T + 1, B, H]` cell states the forward step wrote.
    pub cells: &'a GpuBuffer,
    /// `[T, B, 4H]` gradient of the gate pre-activations, written.
    pub d_gates: &'a GpuBuffer,
    /// `[B, H]` cell-state gradient carried to the step before (start at zero).
    pub dc: &'a GpuBuffer,
    /// `[B, H]` hidden-state gradient carried through masked steps (start at zero).
    pub dh_carry: &'a GpuBuffer,
}

/// Element counts of the sequence buffers for one shape.
struct Lengths {
    /// `[T, B, 4H]`.
    gates: usize,
    /// `[T + 1, B, H]`.
    states: usize,
    /// `[T, B, H]`.
    outputs: usize,
    /// `[T, B]`.
    mask: usize,
    /// `[B, H]`.
    carry: usize,
}

impl LstmShape {
    fn lengths(&self) -> Lengths {
        let (t, b, h) = (self.steps, self.batch, self.hidden);
        Lengths {
            gates: t * b * 4 * h,
            states: (t + 1) * b * h,
            outputs: t * b * h,
            mask: t * b,
            carry: b * h,
        }
    }
}

/// Each buffer must hold f32 and at least its length.
fn expect_buffers(op: &'static str, buffers: &[(&str, &GpuBuffer, usize)]) -> Result<()> {
    for &(name, buf, len) in buffers {
        expect_f32(op, name, buf)?;
        expect_len(op, name, buf, len)?;
    }
    Ok(())
}

impl LstmForward<'_> {
    /// The forward kernels' bindings, each checked: the projections, then
    /// `recurrent` (the step kernel's recurrent products, the sequence
    /// kernel's W_hh), then the rest.
    fn bindings<'s>(
        &'s self,
        op: &'static str,
        shape: &LstmShape,
        recurrent: (&'static str, &'s GpuBuffer, usize),
    ) -> Result<[&'s GpuBuffer; 7]> {
        let len = shape.lengths();
        let named = [
            ("xproj", self.xproj, len.gates),
            recurrent,
            ("bias", self.bias, 4 * shape.hidden),
            ("mask", self.mask, len.mask),
            ("gates", self.gates, len.gates),
            ("cells", self.cells, len.states),
            ("states", self.states, len.states),
        ];
        expect_buffers(op, &named)?;
        Ok(named.map(|(_, buffer, _)| buffer))
    }
}

impl LstmBackward<'_> {
    /// The backward kernels' bindings, each checked: the output's gradient,
    /// then `recurrent` (the step kernel's recurrent gradients, the sequence
    /// kernel's W_hh), then the rest.
    fn bindings<'s>(
        &'s self,
        op: &'static str,
        shape: &LstmShape,
        recurrent: (&'static str, &'s GpuBuffer, usize),
    ) -> Result<[&'s GpuBuffer; 8]> {
        let len = shape.lengths();
        let named = [
            ("d_out", self.d_out, len.outputs),
            recurrent,
            ("mask", self.mask, len.mask),
            ("gates", self.gates, len.gates),
            ("cells", self.cells, len.states),
            ("d_gates", self.d_gates, len.gates),
            ("dc", self.dc, len.carry),
            ("dh_carry", self.dh_carry, len.carry),
        ];
        expect_buffers(op, &named)?;
        Ok(named.map(|(_, buffer, _)| buffer))
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    hidden: u32,
    t: u32,
    row_threads: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SequenceParams {
    batch: u32,
    steps: u32,
    rows: u32,
    _pad: u32,
}

/// `KILN_LSTM_SEQUENCE` as "use the sequence kernels", if set to 0 or 1.
fn sequence_kernels_setting() -> Option<bool> {
    static SETTING: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *SETTING.get_or_init(|| crate::device::on_or_off("KILN_LSTM_SEQUENCE"))
}

/// `KILN_LSTM_PER_UNIT=0`: the quad kernels even where the per-unit ones
/// could run (to compare the two).
fn per_unit_setting() -> Option<bool> {
    static SETTING: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *SETTING.get_or_init(|| crate::device::on_or_off("KILN_LSTM_PER_UNIT"))
}

/// Rows (samples) per workgroup of the sequence kernels. A CPU adapter runs
/// each workgroup on one thread: enough items (row groups x unit quads) to
/// fill a workgroup, but at least as many workgroups as the host has cores
/// where the batch allows; a per-unit workgroup is full with any rows. A GPU
/// gets one row group per workgroup, the most workgroups the batch makes
/// (not yet measured on one).
fn sequence_rows_per_workgroup(shape: &LstmShape, cpu: bool, layout: SequenceLayout) -> usize {
    if layout != SequenceLayout::Quads {
        return shape.batch.div_ceil(super::host_cores()).max(1);
    }
    if !cpu {
        return SEQUENCE_ROWS;
    }
    let quads = shape.hidden / 4;
    let filling = SEQUENCE_ROWS * (SEQUENCE_WORKGROUP as usize / quads).max(1);
    let shared = shape
        .batch
        .div_ceil(super::host_cores())
        .next_multiple_of(SEQUENCE_ROWS);
    filling.min(shared)
}

/// Unit quads per item of the backward kernel: 4 where they divide the
/// hidden size's quads, so that each W_hh^T load serves as many rows and
/// each gradient load as many sums as in the forward kernel.
fn backward_quads(hidden: usize) -> usize {
    [4, 2, 1]
        .into_iter()
        .find(|n| (hidden / 4) % n == 0)
        .unwrap_or(1)
}

/// The sequence kernel for `hidden` units, with its per-item sums unrolled
/// over [`SEQUENCE_ROWS`] rows and the four gates (forward) or
/// [`backward_quads`] unit quads (backward).
fn sequence_source(hidden: usize, backward: bool) -> String {
    let tr = SEQUENCE_ROWS;
    let nq = backward_quads(hidden);
    let mut accumulate = String::new();
    let pad = "            ";
    // Four sums per row: the gates (forward) or the item's quads (backward).
    let sums_per_row = if backward { nq } else { 4 };
    for u in 0..tr {
        let _ = writeln!(
            accumulate,
            "{pad}let r{u} = min(first + {u}u, p.batch - 1u);"
        );
        for v in 0..sums_per_row {
            let _ = writeln!(accumulate, "{pad}var s{u}_{v} = vec4<f32>(0.0);");
        }
    }
    if backward {
        // s{u}_{n}: units of quad q0 + n of row u, over d_gates_{t+1}'s
        // columns c = 4 * c4 + cc, each against row c of W_hh^T.
        let _ = writeln!(accumulate, "{pad}if (t + 1u < p.steps) {{");
        for u in 0..tr {
            let _ = writeln!(
                accumulate,
                "{pad}    let d{u}_base = ((t + 1u) * p.batch + r{u}) * H;"
            );
        }
        let _ = writeln!(accumulate, "{pad}    for (var c4 = 0u; c4 < H; c4++) {{");
        for u in 0..tr {
            let _ = writeln!(
                accumulate,
                "{pad}        let d{u} = d_gates[d{u}_base + c4];"
            );
        }
        for (cc, lane) in ["x", "y", "z", "w"].iter().enumerate() {
            for n in 0..nq {
                let _ = writeln!(
                    accumulate,
                    "{pad}        let w{cc}_{n} = w_t[(4u * c4 + {cc}u) * QUADS + q0 + {n}u];"
                );
                for u in 0..tr {
                    let _ = writeln!(
                        accumulate,
                        "{pad}        s{u}_{n} = fma(vec4<f32>(d{u}.{lane}), w{cc}_{n}, s{u}_{n});"
                    );
                }
            }
        }
        let _ = writeln!(accumulate, "{pad}    }}\n{pad}}}");
    } else {
        // s{u}_{g}: gate g of units 4q..4q+3 of row u, over h_{t-1}'s units
        // k = 4 * k4 + kk.
        for u in 0..tr {
            let _ = writeln!(
                accumulate,
                "{pad}let h{u}_base = (t * p.batch + r{u}) * QUADS;"
            );
        }
        let _ = writeln!(accumulate, "{pad}for (var k4 = 0u; k4 < QUADS; k4++) {{");
        for u in 0..tr {
            let _ = writeln!(accumulate, "{pad}    let h{u} = states[h{u}_base + k4];");
        }
        for (kk, lane) in ["x", "y", "z", "w"].iter().enumerate() {
            let _ = writeln!(
                accumulate,
                "{pad}    let w_row{kk} = (4u * k4 + {kk}u) * H + q;"
            );
            for g in 0..4 {
                let _ = writeln!(
                    accumulate,
                    "{pad}    let w{kk}_{g} = w_hh[w_row{kk} + {g}u * QUADS];"
                );
                for u in 0..tr {
                    let _ = writeln!(
                        accumulate,
                        "{pad}    s{u}_{g} = fma(vec4<f32>(h{u}.{lane}), w{kk}_{g}, s{u}_{g});"
                    );
                }
            }
        }
        let _ = writeln!(accumulate, "{pad}}}");
    }
    let rows: Vec<String> = (0..tr)
        .map(|u| {
            let sums: Vec<String> = (0..sums_per_row).map(|v| format!("s{u}_{v}")).collect();
            format!("array<vec4<f32>, {sums_per_row}>({})", sums.join(", "))
        })
        .collect();
    let _ = writeln!(
        accumulate,
        "{pad}let sums = array<array<vec4<f32>, {sums_per_row}>, TR>({});",
        rows.join(", ")
    );
    let source = if backward {
        SEQUENCE_BACKWARD_SRC
    } else {
        SEQUENCE_SRC
    };
    Specialize::new(&format!(
        "{SEQUENCE_COMMON_SRC}\n{}\n{source}",
        cell_source(backward)
    ))
    .alias("V", "vec4<f32>")
    .constant_u32("H", hidden as u32)
    .constant_u32("QUADS", (hidden / 4) as u32)
    .constant_u32("TR", tr as u32)
    .constant_u32("NQ", nq as u32)
    .constant_u32("WG", SEQUENCE_WORKGROUP)
    .replace("ACCUMULATE", &accumulate)
    .build()
}

/// The per-unit forward sequence kernel for `hidden` units in subgroups of
/// `sg` lanes. The weights (`w{k}`: row k of W_hh at the lane's unit's four
/// gates) and one row's recurrent sums (`rec`: the unit's four gate sums over
/// h_{t-1}) are generated unrolled over the hidden size, so the weights stay
/// named values rather than an array indexed in a loop. Each lane loads
/// quads lane, lane + sg, ... of the row of h (h_quad); quad q comes from lane
/// q % sg. Four partial sums keep the multiply-adds in independent chains.
fn per_unit_source(hidden: usize, sg: u32) -> String {
    let sg = sg as usize;
    let pad = "            ";
    let mut weights = String::new();
    for k in 0..hidden {
        let at: Vec<String> = (0..4)
            .map(|g| format!("w_hh[{k}u * 4u * H + {g}u * H + unit]"))
            .collect();
        let _ = writeln!(weights, "    let w{k} = vec4<f32>({});", at.join(", "));
    }
    let quads = hidden / 4;
    let mut recurrent = String::new();
    for l in 0..quads.div_ceil(sg) {
        let _ = writeln!(
            recurrent,
            "{pad}let hq{l} = h_quad(h_base, lane + {}u);",
            l * sg
        );
    }
    for s in 0..4 {
        let _ = writeln!(recurrent, "{pad}var s{s} = vec4<f32>(0.0);");
    }
    for q in 0..quads {
        let _ = writeln!(
            recurrent,
            "{pad}let h{q} = subgroupBroadcast(hq{}, {}u);",
            q / sg,
            q % sg
        );
        for (kk, part) in ["x", "y", "z", "w"].iter().enumerate() {
            let _ = writeln!(
                recurrent,
                "{pad}s{kk} = fma(vec4<f32>(h{q}.{part}), w{}, s{kk});",
                4 * q + kk
            );
        }
    }
    let _ = writeln!(recurrent, "{pad}let rec = (s0 + s1) + (s2 + s3);");
    Specialize::new(&format!(
        "{SEQUENCE_COMMON_SRC}\n{}\n{PER_UNIT_SRC}",
        cell_source(false)
    ))
    .alias("V", "f32")
    .constant_u32("H", hidden as u32)
    .constant_u32("SG", sg as u32)
    .replace("WEIGHTS", &weights)
    .replace("RECURRENT", &recurrent)
    .build()
}

/// The cell's arithmetic and the update of one element, forward or backward.
fn cell_source(backward: bool) -> String {
    let update = if backward {
        UPDATE_BACKWARD_SRC
    } else {
        UPDATE_SRC
    };
    format!("{CELL_SRC}\n{update}")
}

/// A step kernel: one unit per invocation.
fn step_source(source: &str, backward: bool) -> String {
    Specialize::new(&format!("{}\n{source}", cell_source(backward)))
        .alias("V", "f32")
        .build()
}

impl Device {
    /// Runs forward step `t`: gates, `c_t` and `h_t` from slot `t` of the
    /// projections and of the recurrent products `rec` (`[T, B, 4H]`, slot t
    /// holding `h_{t-1} W_hh`).
    pub fn lstm_forward_step(
        &self,
        shape: &LstmShape,
        t: usize,
        rec: &GpuBuffer,
        b: &LstmForward,
    ) -> Result<()> {
        const OP: &str = "lstm_forward_step";
        let gates = shape.lengths().gates;
        let buffers = b.bindings(OP, shape, ("rec", rec, gates))?;
        let kernel = self.kernel("lstm_step", || step_source(FORWARD_SRC, false))?;
        let (params, grid) = self.lstm_launch(OP, shape, t)?;
        self.dispatch(&kernel, bytemuck::bytes_of(&params), &buffers, grid)
    }

    /// Runs backward step `t` (call for `t = T-1` down to 0); slot t + 1 of
    /// `dh_rec` (`[T + 1, B, H]`) must hold `d_gates_{t+1} W_hh^T` (zero for
    /// the last step).
    pub fn lstm_backward_step(
        &self,
        shape: &LstmShape,
        t: usize,
        dh_rec: &GpuBuffer,
        b: &LstmBackward,
    ) -> Result<()> {
        const OP: &str = "lstm_backward_step";
        let states = shape.lengths().states;
        let buffers = b.bindings(OP, shape, ("dh_rec", dh_rec, states))?;
        let kernel = self.kernel("lstm_step_backward", || step_source(BACKWARD_SRC, true))?;
        let (params, grid) = self.lstm_launch(OP, shape, t)?;
        self.dispatch(&kernel, bytemuck::bytes_of(&params), &buffers, grid)
    }

    /// Whether [`Device::lstm_forward_sequence`] and
    /// [`Device::lstm_backward_sequence`] take this shape: hidden sizes that
    /// are a multiple of 4 (the kernels read units four at a time).
    pub fn lstm_sequence_fits(&self, shape: &LstmShape) -> bool {
        if shape.hidden % 4 != 0 || shape.hidden == 0 || shape.batch == 0 {
            return false;
        }
        // One workgroup per group of rows, in one grid dimension: a batch of
        // more groups than that holds takes the step kernels' 2-D grids.
        [false, true].into_iter().all(|backward| {
            let layout = self.sequence_layout(shape.hidden, backward);
            let rows = sequence_rows_per_workgroup(shape, self.kernels_for_cpu(), layout);
            shape.batch.div_ceil(rows.max(1))
                <= self.limits().max_compute_workgroups_per_dimension as usize
        })
    }

    /// Whether an LSTM of this shape should run on the sequence kernels
    /// rather than a kernel per step: wherever they fit, with kernels for a
    /// CPU adapter; never with kernels for a GPU. `KILN_LSTM_SEQUENCE=1` or
    /// `0` decides instead (to compare the two on an adapter).
    ///
    /// A sequence kernel runs the recurrence in a few workgroups (a batch of
    /// 32 in 4), which fills a CPU's cores but leaves a GPU idle: on an
    /// H200 the IMDB LSTM trained at 1954 samples/s a kernel per step
    /// against 1468 on the sequence kernels, whose backward pass alone took
    /// 15.5 of the step's 21 ms. On lavapipe the sequence kernels are the
    /// faster.
    pub fn lstm_prefers_sequence(&self, shape: &LstmShape) -> bool {
        sequence_kernels_setting().unwrap_or(self.kernels_for_cpu())
            && self.lstm_sequence_fits(shape)
    }

    /// Runs the whole sequence forward in one dispatch: every step's gates,
    /// cells and hidden states from the projections and `w_hh` (`[H, 4H]`).
    pub fn lstm_forward_sequence(
        &self,
        shape: &LstmShape,
        w_hh: &GpuBuffer,
        b: &LstmForward,
    ) -> Result<()> {
        const OP: &str = "lstm_forward_sequence";
        self.expect_sequence_fits(OP, shape)?;
        let h = shape.hidden;
        let buffers = b.bindings(OP, shape, ("w_hh", w_hh, 4 * h * h))?;
        self.dispatch_sequence(OP, shape, false, &buffers)
    }

    /// Runs backward through the whole sequence in one dispatch: every
    /// step's gate gradients into `b.d_gates`, from the output's gradient and
    /// the forward pass's gates and cells.
    pub fn lstm_backward_sequence(
        &self,
        shape: &LstmShape,
        w_hh: &GpuBuffer,
        b: &LstmBackward,
    ) -> Result<()> {
        const OP: &str = "lstm_backward_sequence";
        self.expect_sequence_fits(OP, shape)?;
        let h = shape.hidden;
        let mut buffers = b.bindings(OP, shape, ("w_hh", w_hh, 4 * h * h))?;
        // W_hh^T, so that a vec4 load holds four units of one column.
        let w_t = self.strided_copy(w_hh, &[4 * h, h], &[1, 4 * h], 0)?;
        buffers[1] = &w_t;
        self.dispatch_sequence(OP, shape, true, &buffers)
    }

    /// The sequence kernels' layout for `hidden` units: forward, a unit per
    /// lane on CPU adapters with fixed-size subgroups where the units fill
    /// whole subgroups of one workgroup; quads otherwise, and backward.
    fn sequence_layout(&self, hidden: usize, backward: bool) -> SequenceLayout {
        // A workgroup of at most PER_UNIT_MAX_HIDDEN lanes: within every
        // adapter's limits (WebGPU guarantees 256).
        match self.fixed_subgroup_size() {
            Some(sg)
                if !backward
                    && self.kernels_for_cpu()
                    && per_unit_setting() != Some(false)
                    && hidden % sg as usize == 0
                    && hidden <= PER_UNIT_MAX_HIDDEN =>
            {
                SequenceLayout::UnitPerLane { sg }
            }
            _ => SequenceLayout::Quads,
        }
    }

    fn expect_sequence_fits(&self, op: &'static str, shape: &LstmShape) -> Result<()> {
        if self.lstm_sequence_fits(shape) {
            return Ok(());
        }
        Err(crate::error::DeviceError::Shape {
            op,
            message: format!(
                "hidden size {} and batch {}: the sequence kernels need a positive \
                 multiple of 4 units and a batch of at most one grid of row groups",
                shape.hidden, shape.batch
            ),
        })
    }

    fn dispatch_sequence(
        &self,
        op: &'static str,
        shape: &LstmShape,
        backward: bool,
        buffers: &[&GpuBuffer],
    ) -> Result<()> {
        if shape.steps == 0 {
            return Ok(());
        }
        let layout = self.sequence_layout(shape.hidden, backward);
        let rows = sequence_rows_per_workgroup(shape, self.kernels_for_cpu(), layout);
        // Rows per workgroup are a parameter, not a constant, so that a
        // batch of another size (an epoch's last) reuses the kernel.
        let kernel = self.kernel(
            &format!("lstm_sequence:{backward}:{}:{layout:?}", shape.hidden),
            || match layout {
                SequenceLayout::Quads => sequence_source(shape.hidden, backward),
                SequenceLayout::UnitPerLane { sg } => per_unit_source(shape.hidden, sg),
            },
        )?;
        let params = SequenceParams {
            batch: to_u32(op, "batch", shape.batch)?,
            steps: to_u32(op, "steps", shape.steps)?,
            rows: to_u32(op, "rows per workgroup", rows)?,
            _pad: 0,
        };
        let groups = to_u32(op, "workgroups", shape.batch.div_ceil(rows))?;
        self.dispatch(
            &kernel,
            bytemuck::bytes_of(&params),
            buffers,
            [groups, 1, 1],
        )
    }

    fn lstm_launch(
        &self,
        op: &'static str,
        shape: &LstmShape,
        t: usize,
    ) -> Result<(Params, [u32; 3])> {
        if t >= shape.steps {
            return Err(crate::error::DeviceError::Shape {
                op,
                message: format!("step {t} of a {}-step sequence", shape.steps),
            });
        }
        let lanes = (shape.batch * shape.hidden) as u64;
        let grid = grid_2d(
            lanes.div_ceil(u64::from(WORKGROUP)),
            self.limits().max_compute_workgroups_per_dimension,
        )?;
        let params = Params {
            batch: to_u32(op, "batch", shape.batch)?,
            hidden: to_u32(op, "hidden", shape.hidden)?,
            t: to_u32(op, "step", t)?,
            row_threads: grid[0] * WORKGROUP,
        };
        Ok((params, grid))
    }
}
