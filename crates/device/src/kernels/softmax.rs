//! Softmax and log-softmax along the last axis.

use super::{expect_f32, expect_len, grid_2d, to_u32};
use crate::buffer::{DType, GpuBuffer};
use crate::device::Device;
use crate::error::{DeviceError, Result};
use crate::kernel::Specialize;

const SRC: &str = include_str!("../../../../shaders/softmax.wgsl");
const SOFTMAX_WORKGROUP: u32 = 64;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    row_groups: u32,
    rows_per_bias: u32,
    scale: f32,
    _pad: [u32; 3],
}

/// What the softmax kernels normalise: `scale * x + bias` along each row.
#[derive(Clone, Copy)]
pub struct SoftmaxInput<'a> {
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

impl Device {
    /// Softmax over the last axis of a `rows x cols` matrix.
    pub fn softmax(&self, x: &GpuBuffer, rows: usize, cols: usize) -> Result<GpuBuffer> {
        self.softmax_impl(x, rows, cols, SoftmaxInput::default(), false)
    }

    /// Log-softmax over the last axis, computed as `x - max - log(sum(exp(x - max)))`
    /// so it never overflows.
    pub fn log_softmax(&self, x: &GpuBuffer, rows: usize, cols: usize) -> Result<GpuBuffer> {
        self.softmax_impl(x, rows, cols, SoftmaxInput::default(), true)
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
        self.softmax_impl(x, rows, cols, input, false)
    }

    fn softmax_impl(
        &self,
        x: &GpuBuffer,
        rows: usize,
        cols: usize,
        input: SoftmaxInput,
        log: bool,
    ) -> Result<GpuBuffer> {
        let op = if log { "log_softmax" } else { "softmax" };
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
        if out.is_empty() {
            return Ok(out);
        }
        let has_bias = input.bias.is_some();
        // Like reductions: a workgroup per row pays off only for long rows
        // that are too few to keep the adapter busy one invocation each.
        let row_per_thread = cols < 512 || rows >= 4096;
        let kernel = self.kernel(
            &format!("softmax:{log}:{has_bias}:{row_per_thread}"),
            || {
                Specialize::new(SRC)
                    .constant_u32("WG", SOFTMAX_WORKGROUP)
                    .constant_bool("LOG", log)
                    .constant_bool("BIAS", has_bias)
                    .constant_bool("ROW_PER_THREAD", row_per_thread)
                    .build()
            },
        )?;
        let groups = if row_per_thread {
            rows.div_ceil(SOFTMAX_WORKGROUP as usize)
        } else {
            rows
        };
        let grid = grid_2d(
            groups as u64,
            self.limits().max_compute_workgroups_per_dimension,
        )?;
        let params = Params {
            rows: to_u32(op, "rows", rows)?,
            cols: to_u32(op, "cols", cols)?,
            row_groups: grid[0],
            rows_per_bias: to_u32(op, "rows per bias row", rows_per_bias)?,
            scale: input.scale,
            _pad: [0; 3],
        };
        // Without a bias the binding still needs a buffer: `x` again, read-only
        // in both places, and never read through it.
        let bias = input.bias.unwrap_or(x);
        self.dispatch(&kernel, bytemuck::bytes_of(&params), &[x, bias, &out], grid)?;
        Ok(out)
    }
}
