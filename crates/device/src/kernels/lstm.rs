//! Host side of the fused LSTM step kernels (`shaders/lstm_step*.wgsl`). The
//! caller (kiln-graph's `lstm` op) owns the time loop: per step one recurrent
//! matmul into a slot of a sequence buffer, then one of these kernels.

use super::{expect_f32, expect_len, grid_2d, to_u32};
use crate::buffer::GpuBuffer;
use crate::device::Device;
use crate::error::Result;
use crate::kernel::Specialize;

const FORWARD_SRC: &str = include_str!("../../../../shaders/lstm_step.wgsl");
const BACKWARD_SRC: &str = include_str!("../../../../shaders/lstm_step_backward.wgsl");
const WORKGROUP: u32 = 64;

/// Sizes of an LSTM sequence: `steps` time steps of `batch` samples with
/// `hidden` units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LstmShape {
    pub steps: usize,
    pub batch: usize,
    pub hidden: usize,
}

/// Buffers of the forward step (time-major; see `shaders/lstm_step.wgsl`).
pub struct LstmForward<'a> {
    /// `[T, B, 4H]` input projections `x_t W_ih`.
    pub xproj: &'a GpuBuffer,
    /// `[T, B, 4H]` recurrent products; slot t must hold `h_{t-1} W_hh`.
    pub rec: &'a GpuBuffer,
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
    /// `[T + 1, B, H]`; slot t + 1 must hold `d_gates_{t+1} W_hh^T` (zero for T).
    pub dh_rec: &'a GpuBuffer,
    pub mask: &'a GpuBuffer,
    pub gates: &'a GpuBuffer,
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

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    hidden: u32,
    t: u32,
    row_threads: u32,
}

impl Device {
    /// Runs forward step `t`: gates, `c_t` and `h_t` from slot `t` of the
    /// projections and recurrent products.
    pub fn lstm_forward_step(&self, shape: &LstmShape, t: usize, b: &LstmForward) -> Result<()> {
        const OP: &str = "lstm_forward_step";
        let len = shape.lengths();
        expect_buffers(
            OP,
            &[
                ("xproj", b.xproj, len.gates),
                ("rec", b.rec, len.gates),
                ("bias", b.bias, 4 * shape.hidden),
                ("mask", b.mask, len.mask),
                ("gates", b.gates, len.gates),
                ("cells", b.cells, len.states),
                ("states", b.states, len.states),
            ],
        )?;
        let kernel = self.kernel("lstm_step", || Specialize::new(FORWARD_SRC).build())?;
        let (params, grid) = self.lstm_launch(OP, shape, t)?;
        self.dispatch(
            &kernel,
            bytemuck::bytes_of(&params),
            &[b.xproj, b.rec, b.bias, b.mask, b.gates, b.cells, b.states],
            grid,
        )
    }

    /// Runs backward step `t` (call for `t = T-1` down to 0).
    pub fn lstm_backward_step(&self, shape: &LstmShape, t: usize, b: &LstmBackward) -> Result<()> {
        const OP: &str = "lstm_backward_step";
        let len = shape.lengths();
        expect_buffers(
            OP,
            &[
                ("d_out", b.d_out, len.outputs),
                ("dh_rec", b.dh_rec, len.states),
                ("mask", b.mask, len.mask),
                ("gates", b.gates, len.gates),
                ("cells", b.cells, len.states),
                ("d_gates", b.d_gates, len.gates),
                ("dc", b.dc, len.carry),
                ("dh_carry", b.dh_carry, len.carry),
            ],
        )?;
        let kernel = self.kernel("lstm_step_backward", || {
            Specialize::new(BACKWARD_SRC).build()
        })?;
        let (params, grid) = self.lstm_launch(OP, shape, t)?;
        self.dispatch(
            &kernel,
            bytemuck::bytes_of(&params),
            &[
                b.d_out, b.dh_rec, b.mask, b.gates, b.cells, b.d_gates, b.dc, b.dh_carry,
            ],
            grid,
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
