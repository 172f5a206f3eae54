//! Softmax and log-softmax along the last axis.

use super::{expect_f32, expect_len, grid_2d, to_u32};
use crate::buffer::{DType, GpuBuffer};
use crate::device::Device;
use crate::error::Result;
use crate::kernel::Specialize;

const SRC: &str = include_str!("../../../../shaders/softmax.wgsl");
const SOFTMAX_WORKGROUP: u32 = 64;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    row_groups: u32,
    _pad: u32,
}

impl Device {
    /// Softmax over the last axis of a `rows x cols` matrix.
    pub fn softmax(&self, x: &GpuBuffer, rows: usize, cols: usize) -> Result<GpuBuffer> {
        self.softmax_impl(x, rows, cols, false)
    }

    /// Log-softmax over the last axis, computed as `x - max - log(sum(exp(x - max)))`
    /// so it never overflows.
    pub fn log_softmax(&self, x: &GpuBuffer, rows: usize, cols: usize) -> Result<GpuBuffer> {
        self.softmax_impl(x, rows, cols, true)
    }

    fn softmax_impl(
        &self,
        x: &GpuBuffer,
        rows: usize,
        cols: usize,
        log: bool,
    ) -> Result<GpuBuffer> {
        let op = if log { "log_softmax" } else { "softmax" };
        expect_f32(op, "input", x)?;
        expect_len(op, "input", x, rows * cols)?;
        let out = self.empty(rows * cols, DType::F32)?;
        if out.is_empty() {
            return Ok(out);
        }
        let kernel = self.kernel(&format!("softmax:{log}"), || {
            Specialize::new(SRC)
                .constant_u32("WG", SOFTMAX_WORKGROUP)
                .constant_bool("LOG", log)
                .build()
        })?;
        let grid = grid_2d(
            rows as u64,
            self.limits().max_compute_workgroups_per_dimension,
        )?;
        let params = Params {
            rows: to_u32(op, "rows", rows)?,
            cols: to_u32(op, "cols", cols)?,
            row_groups: grid[0],
            _pad: 0,
        };
        self.dispatch(&kernel, bytemuck::bytes_of(&params), &[x, &out], grid)?;
        Ok(out)
    }
}
