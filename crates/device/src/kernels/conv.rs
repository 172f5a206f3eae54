//! Convolution as im2col + matmul. im2col gathers the (padded) input's
//! windows into rows; its adjoint col2im is a gather kernel too, so the
//! backward pass needs no atomics.

use super::to_u32;
use crate::buffer::{DType, GpuBuffer};
use crate::device::Device;
use crate::error::{DeviceError, Result};
use crate::kernel::Specialize;
use std::fmt::Write;

const IM2COL_SRC: &str = include_str!("../../../../shaders/im2col.wgsl");
const COL2IM_SRC: &str = include_str!("../../../../shaders/col2im.wgsl");
const MAX_POOL_SRC: &str = include_str!("../../../../shaders/max_pool.wgsl");
/// Which windows cover an input cell: shared by the gather kernels.
const WINDOW_SRC: &str = include_str!("../../../../shaders/conv_window.wgsl");

/// Geometry of a 2-D convolution over an already padded NCHW input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Padded input height and width.
    pub h: usize,
    /// Padded input width (see `h`).
    pub w: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Step between windows, `[vertical, horizontal]`; must be positive.
    pub stride: [usize; 2],
    /// Spacing between kernel taps, `[vertical, horizontal]`; 1 for a plain
    /// convolution.
    pub dilation: [usize; 2],
}

impl ConvGeometry {
    /// Output height and width, or an error if the window does not fit.
    pub fn output(&self) -> Result<(usize, usize)> {
        // Checked: a huge dilation must not wrap into a span that fits.
        let span = |dilation: usize, k: usize| dilation.checked_mul(k.max(1) - 1)?.checked_add(1);
        let (span_h, span_w) = (
            span(self.dilation[0], self.kh).unwrap_or(usize::MAX),
            span(self.dilation[1], self.kw).unwrap_or(usize::MAX),
        );
        if self.kh == 0 || self.kw == 0 || span_h > self.h || span_w > self.w {
            return Err(DeviceError::Shape {
                op: "conv2d",
                message: format!(
                    "a {}x{} kernel (dilation {:?}) does not fit a {}x{} input",
                    self.kh, self.kw, self.dilation, self.h, self.w
                ),
            });
        }
        if self.stride.contains(&0) || self.dilation.contains(&0) {
            return Err(DeviceError::Shape {
                op: "conv2d",
                message: "stride and dilation must be positive".into(),
            });
        }
        // The kernels take them as u32.
        if self
            .stride
            .iter()
            .chain(&self.dilation)
            .any(|&v| u32::try_from(v).is_err())
        {
            return Err(DeviceError::Shape {
                op: "conv2d",
                message: format!(
                    "stride {:?} and dilation {:?} must each be below 2^32",
                    self.stride, self.dilation
                ),
            });
        }
        Ok((
            (self.h - span_h) / self.stride[0] + 1,
            (self.w - span_w) / self.stride[1] + 1,
        ))
    }

    /// Whether the windows tile the input without overlap or gaps between
    /// them: stride equal to the kernel, no dilation.
    fn disjoint_windows(&self) -> bool {
        self.stride == [self.kh, self.kw] && self.dilation == [1, 1]
    }

    /// Elements of one im2col row: `c * kh * kw`.
    pub fn patch(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// `shader` with the geometry as the constants the window kernels read
    /// (N, C, H, W, OH, OW, KH, KW, SH, SW, DH, DW): index arithmetic then
    /// divides by constants, cheap on CPU adapters. Callers check first that
    /// the element counts fit u32, so every value does.
    fn constants(&self, shader: Specialize, (oh, ow): (usize, usize)) -> Specialize {
        let values = [
            ("N", self.n),
            ("C", self.c),
            ("H", self.h),
            ("W", self.w),
            ("OH", oh),
            ("OW", ow),
            ("KH", self.kh),
            ("KW", self.kw),
            ("SH", self.stride[0]),
            ("SW", self.stride[1]),
            ("DH", self.dilation[0]),
            ("DW", self.dilation[1]),
        ];
        values
            .iter()
            .fold(shader, |s, &(name, v)| s.constant_u32(name, v as u32))
    }
}

/// The WGSL element type and value of `pack` (1 or 4) consecutive results,
/// result `t` being `value(t)`: a kernel storing four at once writes one
/// vec4, which CPU adapters store for about the price of one f32.
fn packed_values(pack: u32, value: impl Fn(u32) -> String) -> (&'static str, String) {
    let values: Vec<String> = (0..pack).map(value).collect();
    match pack {
        1 => ("f32", values.concat()),
        _ => ("vec4<f32>", format!("vec4<f32>({})", values.join(", "))),
    }
}

/// The max pool's gradient over windows that do not overlap, from
/// invocation q = window q: its incoming gradient to its argmax, zeros to the
/// window's other cells, unrolled over the window.
fn scatter_window_body(g: &ConvGeometry) -> String {
    let mut body = String::from(
        "        if (q < N * C * OH * OW) {\n            \
         let ox = q % OW;\n            \
         let oy = (q / OW) % OH;\n            \
         let base = (q / (OW * OH)) * H * W;\n            \
         let grad = source[q];\n            \
         let at = argmax[q];\n            \
         let corner = oy * KH * W + ox * KW;\n",
    );
    for a in 0..g.kh {
        for b in 0..g.kw {
            let _ = writeln!(
                body,
                "            result[base + corner + {}u] = \
                 select(0.0, grad, at == corner + {}u);",
                a * g.w + b,
                a * g.w + b
            );
        }
    }
    body.push_str("        }");
    body
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct WindowParams {
    row_threads: u32,
    _pad: [u32; 3],
}

impl Device {
    /// The `[n * oh * ow, row_width]` matrix of input windows: each row the
    /// `c * kh * kw` window entries, then zeros up to `row_width` (at least
    /// the patch). A row width that is a multiple of 4 lets the product over
    /// the rows take vec4 loads when the patch is not.
    pub fn im2col(&self, x: &GpuBuffer, g: &ConvGeometry, row_width: usize) -> Result<GpuBuffer> {
        const OP: &str = "im2col";
        let (oh, ow) = g.output()?;
        super::expect_f32(OP, "input", x)?;
        super::expect_len(OP, "input", x, g.n * g.c * g.h * g.w)?;
        // Four entries per invocation where rows split into vec4s.
        let pack = if row_width % 4 == 0 { 4 } else { 1 };
        let (element, entries) = packed_values(pack, |t| format!("entry(origin, col + {t}u)"));
        let source = Specialize::new(IM2COL_SRC)
            .constant_u32("PACK", pack)
            .replace("ELEMENT", element)
            .replace("ENTRIES", &entries);
        let numel = g.n * oh * ow * row_width;
        self.run_rows_kernel(OP, source, g, row_width, x, (numel, numel / pack as usize))
    }

    /// The adjoint of [`Device::im2col`]: sums window columns (rows of
    /// `row_width`, padding ignored) back into an `[n, c, h, w]` (padded)
    /// image.
    pub fn col2im(
        &self,
        cols: &GpuBuffer,
        g: &ConvGeometry,
        row_width: usize,
    ) -> Result<GpuBuffer> {
        const OP: &str = "col2im";
        let (oh, ow) = g.output()?;
        super::expect_f32(OP, "columns", cols)?;
        super::expect_len(OP, "columns", cols, g.n * oh * ow * row_width)?;
        let source = Specialize::new(&format!("{COL2IM_SRC}\n{WINDOW_SRC}"));
        let numel = g.n * g.c * g.h * g.w;
        self.run_rows_kernel(OP, source, g, row_width, cols, (numel, numel))
    }

    /// Runs `source`, specialised to `g` and the im2col `row_width`, with
    /// `invocations` invocations writing a `numel`-element output.
    fn run_rows_kernel(
        &self,
        op: &'static str,
        source: Specialize,
        g: &ConvGeometry,
        row_width: usize,
        input: &GpuBuffer,
        (numel, invocations): (usize, usize),
    ) -> Result<GpuBuffer> {
        if row_width < g.patch() {
            return Err(DeviceError::Shape {
                op,
                message: format!(
                    "rows of {row_width} cannot hold a patch of {} ({} channels x {}x{})",
                    g.patch(),
                    g.c,
                    g.kh,
                    g.kw
                ),
            });
        }
        let (oh, ow) = g.output()?;
        to_u32(op, "elements", numel)?;
        let out = self.empty(numel, DType::F32)?;
        let (grid, row_threads) = self.linear_grid(invocations)?;
        let kernel = self.kernel(&format!("{op}:{g:?}:{row_width}"), || {
            g.constants(source, (oh, ow))
                .constant_u32("ROW_WIDTH", row_width as u32)
                .build()
        })?;
        let params = WindowParams {
            row_threads,
            _pad: [0; 3],
        };
        self.dispatch(&kernel, bytemuck::bytes_of(&params), &[input, &out], grid)?;
        Ok(out)
    }

    /// Max pooling over the windows of `g` (input already padded): the
    /// `[n, c, oh, ow]` maxima, and where each was in its input plane
    /// (`i * w + j`, u32) for [`Device::max_pool2d_backward`]. Ties go to the
    /// first maximum in row-major window order.
    pub fn max_pool2d(&self, x: &GpuBuffer, g: &ConvGeometry) -> Result<(GpuBuffer, GpuBuffer)> {
        const OP: &str = "max_pool2d";
        let (oh, ow) = g.output()?;
        super::expect_f32(OP, "input", x)?;
        super::expect_len(OP, "input", x, g.n * g.c * g.h * g.w)?;
        let outputs = g.n * g.c * oh * ow;
        let values = self.empty(outputs, DType::F32)?;
        let argmax = self.empty(outputs, DType::U32)?;
        self.dispatch_max_pool(g, false, [x, &argmax, &values], outputs)?;
        Ok((values, argmax))
    }

    /// The input gradient of [`Device::max_pool2d`]: each window's incoming
    /// gradient goes to its maximum; `[n, c, h, w]` (padded).
    pub fn max_pool2d_backward(
        &self,
        grad: &GpuBuffer,
        argmax: &GpuBuffer,
        g: &ConvGeometry,
    ) -> Result<GpuBuffer> {
        const OP: &str = "max_pool2d_backward";
        let (oh, ow) = g.output()?;
        super::expect_f32(OP, "gradient", grad)?;
        super::expect_len(OP, "gradient", grad, g.n * g.c * oh * ow)?;
        super::expect_len(OP, "argmax", argmax, g.n * g.c * oh * ow)?;
        if argmax.dtype() != DType::U32 {
            return Err(DeviceError::Shape {
                op: OP,
                message: format!("argmax must be u32, got {:?}", argmax.dtype()),
            });
        }
        let inputs = g.n * g.c * g.h * g.w;
        if g.disjoint_windows() {
            // Cells past the last whole window get no store: cleared first.
            let covered = oh * g.kh == g.h && ow * g.kw == g.w;
            let dx = if covered {
                self.empty(inputs, DType::F32)?
            } else {
                self.zeros(inputs, DType::F32)?
            };
            self.dispatch_max_pool(g, true, [grad, argmax, &dx], g.n * g.c * oh * ow)?;
            return Ok(dx);
        }
        let dx = self.empty(inputs, DType::F32)?;
        self.dispatch_max_pool(g, true, [grad, argmax, &dx], inputs)?;
        Ok(dx)
    }

    fn dispatch_max_pool(
        &self,
        g: &ConvGeometry,
        backward: bool,
        buffers: [&GpuBuffer; 3],
        results: usize,
    ) -> Result<()> {
        if results == 0 {
            return Ok(());
        }
        let (oh, ow) = g.output()?;
        to_u32("max_pool2d", "input elements", g.n * g.c * g.h * g.w)?;
        // Four results per invocation where they split into vec4s: on
        // lavapipe the CNN's first pooling (32x32x26x26) went from 0.75 to
        // 0.54 ms forward and from 2.5 to 1.55 ms backward.
        // The backward scatter over disjoint windows stores one cell at a
        // time.
        let scatter = backward && g.disjoint_windows();
        let pack: u32 = if results % 4 == 0 && !scatter { 4 } else { 1 };
        let kernel = self.kernel(&format!("max_pool:{backward}:{g:?}"), || {
            let source = format!("{MAX_POOL_SRC}\n{WINDOW_SRC}");
            let (result, backward_value) = packed_values(pack, |t| {
                format!("sum_over_covering_windows({pack}u * q + {t}u)")
            });
            let backward_body = if scatter {
                scatter_window_body(g)
            } else {
                format!(
                    "        if (q < N * C * H * W / PACK) {{\n            \
                     result[q] = {backward_value};\n        }}"
                )
            };
            let mut forward = String::new();
            for t in 0..pack {
                let _ = writeln!(
                    forward,
                    "        let m{t} = window_max({pack}u * q + {t}u);\n        \
                     argmax[{pack}u * q + {t}u] = m{t}.at;"
                );
            }
            let (_, values) = packed_values(pack, |t| format!("m{t}.value"));
            let _ = writeln!(forward, "        result[q] = {values};");
            let shader = Specialize::new(&source)
                .constant_bool("BACKWARD", backward)
                .constant_u32("PACK", pack)
                .replace("RESULT", result)
                .replace("BACKWARD_BODY", &backward_body)
                .replace("FORWARD", &forward);
            g.constants(shader, (oh, ow)).build()
        })?;
        let (grid, row_threads) = self.linear_grid(results / pack as usize)?;
        let params = WindowParams {
            row_threads,
            _pad: [0; 3],
        };
        self.dispatch(&kernel, bytemuck::bytes_of(&params), &buffers, grid)
    }
}
