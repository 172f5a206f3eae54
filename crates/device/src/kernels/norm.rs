//! Layer normalisation over the last axis, forward and backward, optionally
//! of a residual sum `x + r` that is never written out. CPU adapters take a
//! row per invocation, GPUs a row per workgroup (see `kernels::rows`).

use super::rows::ROW_WORKGROUP;
use super::{expect_f32, expect_len, to_u32};
use crate::buffer::{DType, GpuBuffer};
use crate::device::Device;
use crate::error::Result;
use crate::kernel::Specialize;

const FORWARD_SRC: &str = include_str!("../../../../shaders/layer_norm.wgsl");
const BACKWARD_SRC: &str = include_str!("../../../../shaders/layer_norm_backward.wgsl");
/// Parameters, input bindings and the residual sum, shared by both.
const INPUT_SRC: &str = include_str!("../../../../shaders/layer_norm_input.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    row_groups: u32,
    eps: f32,
}

/// What [`Device::layer_norm`] returns: the output and each row's
/// `(mean, 1 / std)`, which the backward pass reads.
pub struct LayerNormOutput {
    /// The normalised `rows x cols` output.
    pub out: GpuBuffer,
    /// `2 * rows` values: each row's mean and `1 / sqrt(var + eps)`.
    pub stats: GpuBuffer,
}

impl Device {
    /// `(x - mean) / sqrt(var + eps) * gamma + beta` along each row of a
    /// `rows x cols` matrix (biased variance), where x is `x + residual` when
    /// a residual is given; `gamma` and `beta` hold `cols`.
    #[allow(clippy::too_many_arguments)] // the op's natural inputs
    pub fn layer_norm(
        &self,
        x: &GpuBuffer,
        residual: Option<&GpuBuffer>,
        gamma: &GpuBuffer,
        beta: &GpuBuffer,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<LayerNormOutput> {
        const OP: &str = "layer_norm";
        let r = residual.unwrap_or(x);
        for (name, b, len) in [
            ("x", x, rows * cols),
            ("residual", r, rows * cols),
            ("gamma", gamma, cols),
            ("beta", beta, cols),
        ] {
            expect_f32(OP, name, b)?;
            expect_len(OP, name, b, len)?;
        }
        let out = self.empty(rows * cols, DType::F32)?;
        let stats = self.empty(2 * rows, DType::F32)?;
        if out.is_empty() {
            return Ok(LayerNormOutput { out, stats });
        }
        let kernel = self.norm_kernel("layer_norm", FORWARD_SRC, residual.is_some(), cols)?;
        let grid = self.row_layout().grid(self, rows)?;
        let params = Params {
            rows: to_u32(OP, "rows", rows)?,
            cols: to_u32(OP, "cols", cols)?,
            row_groups: grid[0],
            eps,
        };
        self.dispatch(
            &kernel,
            bytemuck::bytes_of(&params),
            // Without a residual, `x` again fills its (unread) binding.
            &[x, r, gamma, beta, &out, &stats],
            grid,
        )?;
        Ok(LayerNormOutput { out, stats })
    }

    /// The gradient with respect to `x` (and the residual: the same) of
    /// [`Device::layer_norm`] given the output's gradient `g`, and `g * xhat`
    /// per element (its column sums are the gradient of `gamma`).
    #[allow(clippy::too_many_arguments)] // the op's natural inputs
    pub fn layer_norm_backward(
        &self,
        x: &GpuBuffer,
        residual: Option<&GpuBuffer>,
        gamma: &GpuBuffer,
        g: &GpuBuffer,
        stats: &GpuBuffer,
        rows: usize,
        cols: usize,
    ) -> Result<(GpuBuffer, GpuBuffer)> {
        const OP: &str = "layer_norm_backward";
        let r = residual.unwrap_or(x);
        for (name, b, len) in [
            ("x", x, rows * cols),
            ("residual", r, rows * cols),
            ("gamma", gamma, cols),
            ("gradient", g, rows * cols),
            ("stats", stats, 2 * rows),
        ] {
            expect_f32(OP, name, b)?;
            expect_len(OP, name, b, len)?;
        }
        let dx = self.empty(rows * cols, DType::F32)?;
        let gxhat = self.empty(rows * cols, DType::F32)?;
        if dx.is_empty() {
            return Ok((dx, gxhat));
        }
        let kernel = self.norm_kernel(
            "layer_norm_backward",
            BACKWARD_SRC,
            residual.is_some(),
            cols,
        )?;
        let grid = self.row_layout().grid(self, rows)?;
        let params = Params {
            rows: to_u32(OP, "rows", rows)?,
            cols: to_u32(OP, "cols", cols)?,
            row_groups: grid[0],
            eps: 0.0,
        };
        self.dispatch(
            &kernel,
            bytemuck::bytes_of(&params),
            &[x, r, gamma, g, stats, &dx, &gxhat],
            grid,
        )?;
        Ok((dx, gxhat))
    }

    fn norm_kernel(
        &self,
        name: &str,
        source: &'static str,
        residual: bool,
        cols: usize,
    ) -> Result<std::sync::Arc<crate::kernel::Kernel>> {
        let layout = self.row_layout();
        let vec4 = layout.reads_vec4(cols);
        self.kernel(&format!("{name}:{residual}:{layout:?}:{vec4}"), || {
            let width = layout.width_source(cols);
            Specialize::new(&format!(
                "{width}\n{INPUT_SRC}\n{}\n{source}",
                layout.source()
            ))
            .constant_u32("WG", ROW_WORKGROUP)
            .constant_bool("RESIDUAL", residual)
            .build()
        })
    }
}
