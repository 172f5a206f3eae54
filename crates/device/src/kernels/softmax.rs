//! Softmax and log-softmax along the last axis, and the softmax cross-entropy
//! loss fused into the same pass.

use super::rows::{RowLayout, ROW_WORKGROUP};
use super::{expect_f32, expect_len, to_u32};
use crate::buffer::{DType, GpuBuffer};
use crate::device::Device;
use crate::error::{DeviceError, Result};
use crate::kernel::Specialize;

const SRC: &str = include_str!("../../../../shaders/softmax.wgsl");
/// The most rows a cross-entropy adds up in its own kernel (one workgroup
/// walking every row): past this a parallel reduction pays for its dispatch.
const TOTAL_MAX_ROWS: usize = 1024;

/// A cross-entropy batch's sum of row losses and count of correct rows.
type Totals = (GpuBuffer, GpuBuffer);

/// What [`Device::softmax_cross_entropy`] computes.
#[derive(Debug)]
pub struct CrossEntropyOutput {
    /// Each row's loss, times the loss scale.
    pub row_loss: GpuBuffer,
    /// The scaled loss's gradient with respect to the logits.
    pub grad: GpuBuffer,
    /// The sum of the row losses (one f32) where the kernel added them up
    /// itself: up to 1024 rows of fewer than 512 classes, a classifier's
    /// batch. Otherwise the caller reduces `row_loss`.
    pub total: Option<GpuBuffer>,
    /// With `total`: how many rows' label is the argmax of their logits (the
    /// first of tied maxima), a classifier's correct predictions, as one f32.
    pub hits: Option<GpuBuffer>,
    /// Whether the kernel added the batch to the tally it was given (see
    /// [`Device::softmax_cross_entropy_tallied`]): exactly when it computed
    /// `total`.
    pub tallied: bool,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    row_groups: u32,
    rows_per_bias: u32,
    scale: f32,
    loss_scale: f32,
    _pad: [u32; 2],
}

/// What the softmax kernels normalise: `scale * x + bias` along each row.
#[derive(Clone, Copy)]
pub struct SoftmaxInput<'a> {
    /// Multiplies `x` before the bias is added (attention's `1 / sqrt(d)`; 1 for a
    /// plain softmax).
    pub scale: f32,
    /// `[groups, cols]` added to consecutive blocks of `rows / groups` rows
    /// (attention: one padding mask per sequence, shared by all its heads and
    /// queries).
    pub bias: Option<&'a GpuBuffer>,
}

impl Default for SoftmaxInput<'_> {
    fn default() -> Self {
        Self {
            scale: 1.0,
            bias: None,
        }
    }
}

/// What the kernel writes for each row.
#[derive(Clone, Copy)]
enum Output<'a> {
    Softmax,
    LogSoftmax,
    /// The loss against a class id per row and its gradient; see
    /// [`Device::softmax_cross_entropy`].
    CrossEntropy {
        labels: &'a GpuBuffer,
        loss_scale: f32,
        tally: Option<&'a GpuBuffer>,
    },
}

impl Device {
    /// Softmax over the last axis of a `rows x cols` matrix.
    pub fn softmax(&self, x: &GpuBuffer, rows: usize, cols: usize) -> Result<GpuBuffer> {
        let input = SoftmaxInput::default();
        Ok(self.softmax_impl(x, rows, cols, input, Output::Softmax)?.0)
    }

    /// Log-softmax over the last axis, computed as `x - max - log(sum(exp(x - max)))`
    /// so it never overflows.
    pub fn log_softmax(&self, x: &GpuBuffer, rows: usize, cols: usize) -> Result<GpuBuffer> {
        let input = SoftmaxInput::default();
        Ok(self
            .softmax_impl(x, rows, cols, input, Output::LogSoftmax)?
            .0)
    }

    /// A classifier's cross-entropy in one pass over the `rows x cols` logits:
    /// returns each row's loss `-log softmax(x)[label]` and the loss's gradient
    /// with respect to the logits, `softmax(x) - onehot(label)`, both
    /// multiplied by `loss_scale` (`1 / rows` for a mean). `labels` holds one
    /// u32 class id per row; an id `>= cols` marks a row to ignore (zero loss
    /// and gradient). Separate log-softmax, selection and gradient kernels
    /// would cost several dispatches, which dominate a small model's step.
    pub fn softmax_cross_entropy(
        &self,
        logits: &GpuBuffer,
        labels: &GpuBuffer,
        rows: usize,
        cols: usize,
        loss_scale: f32,
    ) -> Result<CrossEntropyOutput> {
        self.cross_entropy_impl(logits, labels, rows, cols, loss_scale, None)
    }

    /// [`Device::softmax_cross_entropy`] that also adds the batch to `tally`,
    /// two f32 updated in place: the sum of its rows' losses (before
    /// `loss_scale`) and its count of correct rows. The kernel does so where
    /// it adds the batch up itself (see [`CrossEntropyOutput::total`]) and
    /// says so in [`CrossEntropyOutput::tallied`]. A training loop keeps its
    /// epoch's loss and accuracy on the device this way at no extra kernel.
    pub fn softmax_cross_entropy_tallied(
        &self,
        logits: &GpuBuffer,
        labels: &GpuBuffer,
        rows: usize,
        cols: usize,
        loss_scale: f32,
        tally: &GpuBuffer,
    ) -> Result<CrossEntropyOutput> {
        expect_f32("softmax_cross_entropy", "tally", tally)?;
        if tally.len() != 2 {
            return Err(DeviceError::Shape {
                op: "softmax_cross_entropy",
                message: format!(
                    "the tally must be 2 f32 (loss sum, correct count), got {}",
                    tally.len()
                ),
            });
        }
        if loss_scale <= 0.0 {
            return Err(DeviceError::Shape {
                op: "softmax_cross_entropy",
                message: format!("a tallied loss needs a positive loss scale, got {loss_scale}"),
            });
        }
        self.cross_entropy_impl(logits, labels, rows, cols, loss_scale, Some(tally))
    }

    fn cross_entropy_impl(
        &self,
        logits: &GpuBuffer,
        labels: &GpuBuffer,
        rows: usize,
        cols: usize,
        loss_scale: f32,
        tally: Option<&GpuBuffer>,
    ) -> Result<CrossEntropyOutput> {
        const OP: &str = "softmax_cross_entropy";
        if labels.dtype() != DType::U32 || labels.len() != rows {
            return Err(DeviceError::Shape {
                op: OP,
                message: format!(
                    "labels must be {rows} u32 class ids, got {} {:?}",
                    labels.len(),
                    labels.dtype()
                ),
            });
        }
        let output = Output::CrossEntropy {
            labels,
            loss_scale,
            tally,
        };
        let (grad, row_loss, totals) =
            self.softmax_impl(logits, rows, cols, SoftmaxInput::default(), output)?;
        let (total, hits) = totals.unzip();
        Ok(CrossEntropyOutput {
            row_loss: row_loss.expect("the cross-entropy output has row losses"),
            grad,
            tallied: tally.is_some() && total.is_some(),
            total,
            hits,
        })
    }

    /// Softmax over the last axis of `scale * x + bias` in one pass over `x`:
    /// attention's scaling and padding mask without two more full passes over
    /// the scores.
    pub fn softmax_scaled(
        &self,
        x: &GpuBuffer,
        rows: usize,
        cols: usize,
        input: SoftmaxInput,
    ) -> Result<GpuBuffer> {
        Ok(self.softmax_impl(x, rows, cols, input, Output::Softmax)?.0)
    }

    /// The rows' outputs, and with cross-entropy the rows' losses and, where
    /// the kernel adds them up, their total and the count of correct rows.
    fn softmax_impl(
        &self,
        x: &GpuBuffer,
        rows: usize,
        cols: usize,
        input: SoftmaxInput,
        output: Output,
    ) -> Result<(GpuBuffer, Option<GpuBuffer>, Option<Totals>)> {
        let (op, log, cross_entropy) = match output {
            Output::Softmax => ("softmax", false, false),
            Output::LogSoftmax => ("log_softmax", true, false),
            Output::CrossEntropy { .. } => ("softmax_cross_entropy", false, true),
        };
        expect_f32(op, "input", x)?;
        expect_len(op, "input", x, rows * cols)?;
        let rows_per_bias = match input.bias {
            Some(bias) => {
                expect_f32(op, "bias", bias)?;
                let groups = bias.len() / cols.max(1);
                if groups == 0 || bias.len() != groups * cols || rows % groups != 0 {
                    return Err(DeviceError::Shape {
                        op,
                        message: format!(
                            "bias of {} values is not [groups, {cols}] with groups dividing {rows} rows",
                            bias.len()
                        ),
                    });
                }
                rows / groups
            }
            None => rows.max(1),
        };
        let out = self.empty(rows * cols, DType::F32)?;
        let row_loss = cross_entropy
            .then(|| self.empty(rows, DType::F32))
            .transpose()?;
        if out.is_empty() {
            return Ok((out, row_loss, None));
        }
        let has_bias = input.bias.is_some();
        // A classifier's batch: one workgroup takes every row and adds the
        // losses up too, saving the loss's reduction a dispatch.
        let total = cross_entropy && cols < 512 && rows <= TOTAL_MAX_ROWS;
        let layout = match total {
            true => RowLayout::PerInvocation,
            false => self.softmax_layout(rows, cols),
        };
        let tally = match output {
            Output::CrossEntropy { tally, .. } if total => tally,
            _ => None,
        };
        let tallied = tally.is_some();
        let vec4 = layout.reads_vec4(cols);
        let kernel = self.kernel(
            &format!(
                "softmax:{log}:{has_bias}:{layout:?}:{cross_entropy}:{total}:{tallied}:{vec4}"
            ),
            || {
                let width = layout.width_source(cols);
                Specialize::new(&format!("{width}\n{SRC}\n{}", layout.source()))
                    .constant_u32("WG", ROW_WORKGROUP)
                    .constant_bool("LOG", log)
                    .constant_bool("BIAS", has_bias)
                    .constant_bool("CROSS_ENTROPY", cross_entropy)
                    .constant_bool("TOTAL", total)
                    .constant_bool("TALLY", tallied)
                    .build()
            },
        )?;
        let totals = match total {
            true => Some((self.empty(1, DType::F32)?, self.empty(1, DType::F32)?)),
            false => None,
        };
        let grid = match total {
            true => [1, 1, 1],
            false => layout.grid(self, rows)?,
        };
        let params = Params {
            rows: to_u32(op, "rows", rows)?,
            cols: to_u32(op, "cols", cols)?,
            row_groups: grid[0],
            rows_per_bias: to_u32(op, "rows per bias row", rows_per_bias)?,
            scale: input.scale,
            loss_scale: match output {
                Output::CrossEntropy { loss_scale, .. } => loss_scale,
                _ => 1.0,
            },
            _pad: [0; 2],
        };
        // Unused bindings still need buffers, which the kernel never touches:
        // `x` again for read-only ones and `out` again for `row_loss`, `total`,
        // `hits` and `tally`.
        let bias = input.bias.unwrap_or(x);
        let labels = match output {
            Output::CrossEntropy { labels, .. } => labels,
            _ => x,
        };
        let buffers = [
            x,
            bias,
            &out,
            labels,
            row_loss.as_ref().unwrap_or(&out),
            totals.as_ref().map_or(&out, |t| &t.0),
            totals.as_ref().map_or(&out, |t| &t.1),
            tally.unwrap_or(&out),
        ];
        self.dispatch(&kernel, bytemuck::bytes_of(&params), &buffers, grid)?;
        Ok((out, row_loss, totals))
    }

    /// Which invocations take a softmax row. CPU adapters give a workgroup
    /// only to long rows too few to keep their cores busy one invocation
    /// each (as reductions do). GPUs give one to every row of at least a
    /// workgroup's width, attention's scores among them: its lanes read the
    /// row coalesced, where a row per invocation would read rows far apart;
    /// shorter rows would leave most of a workgroup idle.
    fn softmax_layout(&self, rows: usize, cols: usize) -> RowLayout {
        let per_workgroup = match self.kernels_for_cpu() {
            true => cols >= 512 && rows < 4096,
            false => cols >= ROW_WORKGROUP as usize,
        };
        match per_workgroup {
            true => RowLayout::PerWorkgroup,
            false => RowLayout::PerInvocation,
        }
    }
}
