//! Every elementwise op, unary or n-ary, with numpy broadcasting, comes from one
//! generated kernel: [`Elementwise`] names a WGSL expression over inputs `x0..x3`
//! and scalars `s0..s3`, and the template in `shaders/elementwise.wgsl` is
//! specialised per expression and per input layout.

use super::{grid_2d, to_u32, LINEAR_WORKGROUP};
use crate::buffer::{DType, GpuBuffer};
use crate::device::Device;
use crate::error::{DeviceError, Result};
use crate::kernel::Specialize;
use std::fmt::Write;

const TEMPLATE: &str = include_str!("../../../../shaders/elementwise.wgsl");
/// Most inputs one expression may read.
pub const MAX_INPUTS: usize = 4;

/// A buffer together with the logical shape it holds (row-major, contiguous).
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    /// The values, row-major.
    pub buffer: &'a GpuBuffer,
    /// Logical shape; broadcast against the other operands' shapes.
    pub shape: &'a [usize],
}

/// A strided view of a buffer, for [`Device::elementwise_views`]: element
/// `index` (unravelled over the view's shape) is read at
/// `offset + sum(index_d * strides[d])`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// The buffer read.
    pub buffer: &'a GpuBuffer,
    /// Elements to step per unit of each output dimension; 0 repeats along it.
    pub strides: &'a [usize],
    /// Element at which index `[0, 0, ...]` is read.
    pub offset: usize,
}

impl<'a> Operand<'a> {
    /// An operand holding `shape` in `buffer`.
    pub fn new(buffer: &'a GpuBuffer, shape: &'a [usize]) -> Self {
        Self { buffer, shape }
    }
}

/// An elementwise expression: `out = expr(x0, x1, ..., s0, ..., s3)`.
///
/// Helper functions `kiln_erf`, `kiln_sigmoid`, `kiln_tanh`, `kiln_gelu` and
/// `kiln_pow` (PyTorch's `pow`, where WGSL's is undefined for negative bases)
/// are available to the expression.
///
/// ```no_run
/// # fn main() -> Result<(), kiln_device::DeviceError> {
/// use kiln_device::{Device, Elementwise, Operand};
/// let device = Device::new()?;
/// let x = device.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?; // 2x3
/// let bias = device.upload(&[10.0f32, 20.0, 30.0])?;          // 3, broadcast over rows
/// let op = Elementwise::new("bias_relu", "max(x0 + x1, 0.0) * s0").scalars(&[0.5]);
/// let (y, shape) = device.elementwise(&op, &[Operand::new(&x, &[2, 3]), Operand::new(&bias, &[3])])?;
/// assert_eq!(shape, vec![2, 3]);
/// assert_eq!(device.read::<f32>(&y)?, vec![5.5, 11.0, 16.5, 7.0, 12.5, 18.0]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Elementwise<'a> {
    /// Name used in error messages.
    pub name: &'static str,
    /// WGSL expression of the inputs `x0..x3` and scalars `s0..s3`.
    pub expr: &'a str,
    /// Values of `s0..s3`; see [`Elementwise::scalars`].
    pub scalars: [f32; 4],
}

impl<'a> Elementwise<'a> {
    /// An expression with every scalar set to 0.
    pub fn new(name: &'static str, expr: &'a str) -> Self {
        Self {
            name,
            expr,
            scalars: [0.0; 4],
        }
    }

    /// Sets `s0..`.
    ///
    /// # Panics
    ///
    /// With more than four values: the kernels have four scalar slots.
    pub fn scalars(mut self, values: &[f32]) -> Self {
        assert!(values.len() <= 4, "at most four scalars");
        self.scalars[..values.len()].copy_from_slice(values);
        self
    }
}

/// Named unary ops; each is one expression for the generator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    /// `-x`.
    Neg,
    /// `|x|`.
    Abs,
    /// `e^x`.
    Exp,
    /// Natural logarithm.
    Log,
    /// Square root.
    Sqrt,
    /// `1 / sqrt(x)`.
    Rsqrt,
    /// `1 / x`.
    Recip,
    /// `x * x`.
    Square,
    /// Sine (radians).
    Sin,
    /// Cosine (radians).
    Cos,
    /// `max(x, 0)`.
    Relu,
    /// `x` where positive, else `slope * x`, with the slope given.
    LeakyRelu(f32),
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
    /// Exact (erf) GELU.
    Gelu,
    /// The error function.
    Erf,
    /// `x + s`.
    AddScalar(f32),
    /// `x * s`.
    MulScalar(f32),
    /// `x^s` (WGSL `pow`: undefined for negative `x`).
    PowScalar(f32),
}

impl UnaryOp {
    /// Short lower-case name (`"relu"`, `"leaky_relu"`, ...), used in kernel keys
    /// and error messages.
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Square => "square",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Relu => "relu",
            UnaryOp::LeakyRelu(_) => "leaky_relu",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Gelu => "gelu",
            UnaryOp::Erf => "erf",
            UnaryOp::AddScalar(_) => "add_scalar",
            UnaryOp::MulScalar(_) => "mul_scalar",
            UnaryOp::PowScalar(_) => "pow_scalar",
        }
    }

    /// The op as an expression of `x0` (and `s0` for its parameter).
    pub fn elementwise(self) -> Elementwise<'static> {
        let expr = match self {
            UnaryOp::Neg => "-x0",
            UnaryOp::Abs => "abs(x0)",
            UnaryOp::Exp => "exp(x0)",
            UnaryOp::Log => "log(x0)",
            UnaryOp::Sqrt => "sqrt(x0)",
            UnaryOp::Rsqrt => "inverseSqrt(x0)",
            UnaryOp::Recip => "1.0 / x0",
            UnaryOp::Square => "x0 * x0",
            UnaryOp::Sin => "sin(x0)",
            UnaryOp::Cos => "cos(x0)",
            UnaryOp::Relu => "max(x0, 0.0)",
            UnaryOp::LeakyRelu(_) => "select(s0 * x0, x0, x0 > 0.0)",
            UnaryOp::Sigmoid => "kiln_sigmoid(x0)",
            UnaryOp::Tanh => "kiln_tanh(x0)",
            UnaryOp::Gelu => "kiln_gelu(x0)",
            UnaryOp::Erf => "kiln_erf(x0)",
            UnaryOp::AddScalar(_) => "x0 + s0",
            UnaryOp::MulScalar(_) => "x0 * s0",
            UnaryOp::PowScalar(_) => "kiln_pow(x0, s0)",
        };
        let param = match self {
            UnaryOp::LeakyRelu(s)
            | UnaryOp::AddScalar(s)
            | UnaryOp::MulScalar(s)
            | UnaryOp::PowScalar(s) => s,
            _ => 0.0,
        };
        Elementwise::new(self.name(), expr).scalars(&[param])
    }
}

/// Named binary ops with broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b`.
    Div,
    /// Elementwise maximum.
    Max,
    /// Elementwise minimum.
    Min,
    /// `a^b` as PyTorch defines it: a negative `a` takes an integer `b`,
    /// `0^0 = 1`.
    Pow,
}

impl BinaryOp {
    /// The op as an expression of `x0` and `x1`.
    pub fn elementwise(self) -> Elementwise<'static> {
        let (name, expr) = match self {
            BinaryOp::Add => ("add", "x0 + x1"),
            BinaryOp::Sub => ("sub", "x0 - x1"),
            BinaryOp::Mul => ("mul", "x0 * x1"),
            BinaryOp::Div => ("div", "x0 / x1"),
            BinaryOp::Max => ("maximum", "max(x0, x1)"),
            BinaryOp::Min => ("minimum", "min(x0, x1)"),
            BinaryOp::Pow => ("pow", "kiln_pow(x0, x1)"),
        };
        Elementwise::new(name, expr)
    }
}

/// The numpy broadcast of several shapes, or `None` if they are incompatible.
pub fn broadcast_shapes(shapes: &[&[usize]]) -> Option<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for shape in shapes {
        let offset = rank - shape.len();
        for (d, &extent) in shape.iter().enumerate() {
            let o = &mut out[offset + d];
            if *o == 1 {
                *o = extent;
            } else if extent != 1 && extent != *o {
                return None;
            }
        }
    }
    Some(out)
}

/// How an input (or, in the output slot, the output) is indexed by the
/// generated kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Same shape as the output: element `idx`.
    Direct,
    /// One element, read for every output.
    Scalar,
    /// Through broadcast strides.
    Strided,
    /// A slot with no input (before a strided output).
    Unused,
    /// The output, written through the strides of slot [`OUTPUT_SLOT`].
    StridedOutput,
}

/// Parameter slot whose strides describe a strided output.
const OUTPUT_SLOT: usize = MAX_INPUTS - 1;

/// Refuses a view that may reach an element twice: written through, its
/// invocations would race for that element (the last writer winning, in an
/// order a GPU does not fix). The strides must nest: taken by stride, each
/// dimension of more than one element steps past everything the dimensions
/// inside it span, as in slices, transposes and concatenations' places.
/// (Some interleaved views that do reach each element once, such as shape
/// `[3, 2]` at strides `[2, 3]`, are refused too; no caller writes those.)
fn check_one_to_one(op: &'static str, shape: &[usize], strides: &[usize]) -> Result<()> {
    if shape.contains(&0) {
        return Ok(());
    }
    let mut dims: Vec<(usize, usize)> = shape
        .iter()
        .zip(strides)
        .filter(|(&n, _)| n > 1)
        .map(|(&n, &s)| (s, n))
        .collect();
    dims.sort_unstable();
    // The largest offset the dimensions so far reach from the view's start.
    let mut span = 0usize;
    for (stride, extent) in dims {
        if stride <= span {
            return Err(DeviceError::Shape {
                op,
                message: format!(
                    "the view {shape:?} with strides {strides:?} may reach an element twice \
                     (its strides do not nest); a write needs each element once"
                ),
            });
        }
        span = span.saturating_add((extent - 1).saturating_mul(stride));
    }
    Ok(())
}

/// Checks that a view stays inside `buffer`.
fn check_view(
    op: &'static str,
    buffer: &GpuBuffer,
    shape: &[usize],
    strides: &[usize],
    offset: usize,
) -> Result<()> {
    if shape.len() != strides.len() {
        return Err(DeviceError::Shape {
            op,
            message: format!("shape {shape:?} and strides {strides:?} differ in rank"),
        });
    }
    // Saturating: sizes from a caller may overflow, and a saturated element
    // count or reach fails the check below like any too-large view.
    let numel = shape.iter().fold(1usize, |n, &d| n.saturating_mul(d));
    let last = shape
        .iter()
        .zip(strides)
        .map(|(&n, &s)| n.saturating_sub(1).saturating_mul(s))
        .fold(offset, usize::saturating_add);
    if numel > 0 && last >= buffer.len() {
        return Err(DeviceError::Shape {
            op,
            message: format!(
                "view {shape:?} with strides {strides:?} at offset {offset} reaches element {last} of a {}-element buffer",
                buffer.len()
            ),
        });
    }
    Ok(())
}

/// Element strides of `shape` broadcast to `out` (0 along broadcast dims).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let offset = out.len() - shape.len();
    let mut strides = vec![0usize; out.len()];
    let mut stride = 1;
    for d in (0..shape.len()).rev() {
        if shape[d] != 1 {
            strides[offset + d] = stride;
        }
        stride *= shape[d];
    }
    strides
}

/// Merges adjacent dims that every input walks contiguously, so the kernel's
/// index arithmetic runs over as few dims as possible.
fn collapse(out: &[usize], strides: &mut [Vec<usize>]) -> Vec<usize> {
    let mut shape: Vec<usize> = Vec::new();
    let mut merged: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for d in 0..out.len() {
        if out[d] == 1 {
            continue; // size-1 dims never move the index
        }
        let can_merge = !shape.is_empty()
            && strides.iter().zip(&merged).all(|(s, m)| {
                let last = *m.last().expect("same length as shape");
                last == s[d] * out[d]
            });
        if can_merge {
            *shape.last_mut().expect("checked non-empty") *= out[d];
            for (s, m) in strides.iter().zip(merged.iter_mut()) {
                *m.last_mut().expect("checked non-empty") = s[d];
            }
        } else {
            shape.push(out[d]);
            for (s, m) in strides.iter().zip(merged.iter_mut()) {
                m.push(s[d]);
            }
        }
    }
    for (s, m) in strides.iter_mut().zip(merged) {
        *s = m;
    }
    shape
}

/// The fields of a kernel's parameter block beyond `numel` and `row_threads`.
/// A block holds only what its kernel reads, so that several kernels'
/// blocks fit the one block of a fused dispatch (see `Device::together`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ParamFields {
    /// `scalars: vec4<f32>`, for expressions that read `s0..s3`.
    scalars: bool,
    /// `offsets: vec4<u32>`, the first element of each strided slot.
    offsets: bool,
}

impl ParamFields {
    fn new(expr: &str, strided: bool) -> Self {
        let reads_scalar = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|token| matches!(token, "s0" | "s1" | "s2" | "s3"));
        Self {
            scalars: reads_scalar,
            offsets: strided,
        }
    }

    fn wgsl(self) -> String {
        let mut s = String::from(
            "struct Params {\n    numel: u32,\n    row_threads: u32,\n    _pad0: u32,\n    _pad1: u32,\n",
        );
        if self.scalars {
            s += "    scalars: vec4<f32>,\n";
        }
        if self.offsets {
            s += "    offsets: vec4<u32>,\n";
        }
        s + "}\n"
    }

    /// The block's bytes, laid out as [`ParamFields::wgsl`] declares it.
    fn bytes(self, numel: u32, row_threads: u32, scalars: [f32; 4], offsets: [u32; 4]) -> Vec<u8> {
        let mut words = vec![numel, row_threads, 0, 0];
        if self.scalars {
            words.extend(scalars.map(f32::to_bits));
        }
        if self.offsets {
            words.extend(offsets);
        }
        bytemuck::cast_slice(&words).to_vec()
    }
}

impl Device {
    /// Evaluates an elementwise expression over broadcast inputs; returns the
    /// result and its shape.
    pub fn elementwise(
        &self,
        op: &Elementwise<'_>,
        inputs: &[Operand<'_>],
    ) -> Result<(GpuBuffer, Vec<usize>)> {
        let name = op.name;
        if inputs.is_empty() || inputs.len() > MAX_INPUTS {
            return Err(DeviceError::Shape {
                op: name,
                message: format!("takes 1 to {MAX_INPUTS} inputs, got {}", inputs.len()),
            });
        }
        for (i, input) in inputs.iter().enumerate() {
            let numel: usize = input.shape.iter().product();
            if input.buffer.len() != numel || input.buffer.dtype() != DType::F32 {
                return Err(DeviceError::Shape {
                    op: name,
                    message: format!(
                        "input {i} has shape {:?} ({numel} f32) but its buffer holds {} {:?}",
                        input.shape,
                        input.buffer.len(),
                        input.buffer.dtype()
                    ),
                });
            }
        }
        let shapes: Vec<&[usize]> = inputs.iter().map(|i| i.shape).collect();
        let out_shape = broadcast_shapes(&shapes).ok_or_else(|| DeviceError::Shape {
            op: name,
            message: format!(
                "cannot broadcast shapes {}",
                shapes
                    .iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        })?;
        let numel: usize = out_shape.iter().product();
        let out = self.empty(numel, DType::F32)?;
        if numel == 0 {
            return Ok((out, out_shape));
        }

        let strides: Vec<Vec<usize>> = inputs
            .iter()
            .map(|i| broadcast_strides(i.shape, &out_shape))
            .collect();
        let access: Vec<Access> = inputs
            .iter()
            .map(|i| {
                let n: usize = i.shape.iter().product();
                if n == numel {
                    Access::Direct
                } else if n == 1 {
                    Access::Scalar
                } else {
                    Access::Strided
                }
            })
            .collect();
        let buffers: Vec<&GpuBuffer> = inputs.iter().map(|i| i.buffer).collect();
        self.run_elementwise(
            op,
            &buffers,
            &access,
            &out_shape,
            strides,
            &[0; MAX_INPUTS],
            &out,
        )?;
        Ok((out, out_shape))
    }

    /// Copies a strided view of `x` (element `i` of the result, unravelled over
    /// `shape`, is read at `offset + sum(index_d * strides[d])`) into a new
    /// contiguous buffer. Transposes, permutations, slices and broadcasts are all
    /// such views.
    pub fn strided_copy(
        &self,
        x: &GpuBuffer,
        shape: &[usize],
        strides: &[usize],
        offset: usize,
    ) -> Result<GpuBuffer> {
        let view = View {
            buffer: x,
            strides,
            offset,
        };
        self.elementwise_views(&Elementwise::new("strided_copy", "x0"), &[view], shape)
    }

    /// `op` over strided views of its inputs, all of shape `shape`, into a
    /// new contiguous buffer: a layout change and the arithmetic on its
    /// elements in one pass (a convolution's gradient, say, masked by its
    /// activation's derivative as it goes from NCHW to rows of channels).
    ///
    /// ```
    /// # fn main() -> Result<(), kiln_device::DeviceError> {
    /// use kiln_device::{Device, Elementwise, View};
    /// let device = Device::new()?;
    /// let a = device.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?; // 2x3
    /// let b = device.upload(&[1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0])?; // 2x3
    /// // Both transposed to 3x2, multiplied.
    /// let t = |buffer| View { buffer, strides: &[1, 3], offset: 0 };
    /// let y = device.elementwise_views(&Elementwise::new("mul", "x0 * x1"), &[t(&a), t(&b)], &[3, 2])?;
    /// assert_eq!(device.read::<f32>(&y)?, vec![1.0, 0.0, 0.0, 5.0, 3.0, 0.0]);
    /// # Ok(()) }
    /// ```
    pub fn elementwise_views(
        &self,
        op: &Elementwise<'_>,
        views: &[View<'_>],
        shape: &[usize],
    ) -> Result<GpuBuffer> {
        let name = op.name;
        if views.is_empty() || views.len() > MAX_INPUTS {
            return Err(DeviceError::Shape {
                op: name,
                message: format!("takes 1 to {MAX_INPUTS} views, got {}", views.len()),
            });
        }
        let mut offsets = [0; MAX_INPUTS];
        for (i, v) in views.iter().enumerate() {
            super::expect_f32(name, "input", v.buffer)?;
            check_view(name, v.buffer, shape, v.strides, v.offset)?;
            offsets[i] = v.offset;
        }
        let numel: usize = shape.iter().product();
        let out = self.empty(numel, DType::F32)?;
        if numel == 0 {
            return Ok(out);
        }
        let buffers: Vec<&GpuBuffer> = views.iter().map(|v| v.buffer).collect();
        let access = vec![Access::Strided; views.len()];
        let strides = views.iter().map(|v| v.strides.to_vec()).collect();
        self.run_elementwise(op, &buffers, &access, shape, strides, &offsets, &out)?;
        Ok(out)
    }

    /// The adjoint of [`Device::strided_copy`]: writes the contiguous `src`
    /// (holding `shape`) into a strided view of `dst`. The view must not overlap
    /// itself; elements of `dst` outside it are left as they are. Slices' and
    /// concatenations' writes are such views.
    pub fn strided_write(
        &self,
        dst: &GpuBuffer,
        shape: &[usize],
        strides: &[usize],
        offset: usize,
        src: &GpuBuffer,
    ) -> Result<()> {
        const OP: &str = "strided_write";
        super::expect_f32(OP, "destination", dst)?;
        super::expect_f32(OP, "source", src)?;
        check_view(OP, dst, shape, strides, offset)?;
        check_one_to_one(OP, shape, strides)?;
        let numel: usize = shape.iter().product();
        if src.len() != numel {
            return Err(DeviceError::Shape {
                op: OP,
                message: format!(
                    "source holds {} elements, the view {shape:?} {numel}",
                    src.len()
                ),
            });
        }
        if numel == 0 {
            return Ok(());
        }
        let copy = Elementwise::new(OP, "x0");
        let mut offsets = [0; MAX_INPUTS];
        offsets[OUTPUT_SLOT] = offset;
        let mut all_strides = vec![vec![0; shape.len()]; MAX_INPUTS];
        all_strides[OUTPUT_SLOT] = strides.to_vec();
        self.run_elementwise(
            &copy,
            &[src],
            &[
                Access::Direct,
                Access::Unused,
                Access::Unused,
                Access::StridedOutput,
            ],
            shape,
            all_strides,
            &offsets,
            dst,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn run_elementwise(
        &self,
        op: &Elementwise<'_>,
        buffers: &[&GpuBuffer],
        access: &[Access],
        out_shape: &[usize],
        mut strides: Vec<Vec<usize>>,
        offsets: &[usize; MAX_INPUTS],
        out: &GpuBuffer,
    ) -> Result<()> {
        let name = op.name;
        let numel: usize = out_shape.iter().product();
        let shape = collapse(out_shape, &mut strides);
        // Strided kernels are specialised to their (collapsed) shape and strides:
        // index arithmetic by constants compiles to multiplies and shifts, where
        // a division by a runtime extent costs tens of cycles per lane on CPU
        // adapters. Training loops repeat their shapes, so the cache absorbs it.
        let strided = access
            .iter()
            .any(|a| matches!(a, Access::Strided | Access::StridedOutput));
        let layout = strided.then_some((shape.as_slice(), strides.as_slice()));
        // Four elements per invocation where the output is written in order:
        // CPU adapters pay per load or store instruction and per invocation,
        // not per byte, so vec4 loads of whole inputs and one vec4 store cut
        // their cost about fourfold. Strided inputs stay scalar loads, from
        // one offset per invocation when the innermost extent keeps the four
        // elements in one row.
        let packed = numel % 4 == 0
            && !access.contains(&Access::StridedOutput)
            && shape
                .last()
                .is_none_or(|&extent| !strided || extent % 4 == 0);
        let key = kernel_key(op.expr, access, layout) + if packed { ":vec4" } else { "" };
        let fields = ParamFields::new(op.expr, strided);
        let kernel = self.kernel(&key, || generate(op.expr, access, layout, packed, fields))?;
        let lanes = if packed { numel / 4 } else { numel };

        let groups = (lanes as u64).div_ceil(u64::from(LINEAR_WORKGROUP));
        let grid = grid_2d(groups, self.limits().max_compute_workgroups_per_dimension)?;
        // The generated offset functions take extents and strides as 32-bit
        // constants.
        for &v in shape.iter().chain(strides.iter().flatten()) {
            to_u32(name, "extent or stride", v)?;
        }
        let mut offsets32 = [0; MAX_INPUTS];
        for (slot, &o) in offsets32.iter_mut().zip(offsets) {
            *slot = to_u32(name, "offset", o)?;
        }
        let params = fields.bytes(
            to_u32(name, "element count", lanes)?,
            grid[0] * LINEAR_WORKGROUP,
            op.scalars,
            offsets32,
        );
        let mut bindings = buffers.to_vec();
        bindings.push(out);
        self.dispatch(&kernel, &params, &bindings, grid)
    }

    /// Applies a unary op to every element.
    pub fn unary(&self, op: UnaryOp, x: &GpuBuffer) -> Result<GpuBuffer> {
        let shape = [x.len()];
        Ok(self
            .elementwise(&op.elementwise(), &[Operand::new(x, &shape)])?
            .0)
    }

    /// Applies a binary op with broadcasting; returns the result and its shape.
    pub fn binary(
        &self,
        op: BinaryOp,
        a: Operand<'_>,
        b: Operand<'_>,
    ) -> Result<(GpuBuffer, Vec<usize>)> {
        self.elementwise(&op.elementwise(), &[a, b])
    }
}

/// A collapsed shape and the strides of every slot over it.
type Layout<'a> = (&'a [usize], &'a [Vec<usize>]);

fn kernel_key(expr: &str, access: &[Access], layout: Option<Layout<'_>>) -> String {
    let modes: String = access
        .iter()
        .map(|a| match a {
            Access::Direct => 'd',
            Access::Scalar => 's',
            Access::Strided => 'b',
            Access::Unused => '_',
            Access::StridedOutput => 'w',
        })
        .collect();
    match layout {
        Some((shape, strides)) => format!("elementwise:{modes}:{shape:?}:{strides:?}:{expr}"),
        None => format!("elementwise:{modes}:{expr}"),
    }
}

/// `fn strided_offset_{slot}(idx)`: the offset of output element `idx` in slot
/// `slot`, unrolled over the dims with the extents and strides as constants.
fn offset_function(slot: usize, shape: &[usize], strides: &[usize]) -> String {
    let mut f = format!(
        "fn strided_offset_{slot}(idx: u32) -> u32 {{\n    var rem = idx;\n    var off = p.offsets[{slot}];\n"
    );
    for d in (0..shape.len()).rev() {
        let (extent, stride) = (shape[d], strides[d]);
        if d == 0 {
            let _ = writeln!(f, "    off += rem * {stride}u;");
        } else {
            let _ = writeln!(
                f,
                "    off += (rem % {extent}u) * {stride}u;\n    rem = rem / {extent}u;"
            );
        }
    }
    f + "    return off;\n}\n"
}

/// The kernel for `expr` over inputs read as `access` says. `packed` kernels
/// (output in order; strided inputs only where the innermost extent is a
/// multiple of 4) handle four consecutive elements per invocation: `idx`
/// counts vec4s, and the expression is evaluated per lane of the vec4 with
/// `idx` and `x{i}` rebound to that element.
fn generate(
    expr: &str,
    access: &[Access],
    layout: Option<Layout<'_>>,
    packed: bool,
    fields: ParamFields,
) -> String {
    let mut bindings = String::new();
    let mut loads = String::new();
    let index_of = |slot: usize| format!("strided_offset_{slot}(idx)");
    if let Some((shape, strides)) = layout {
        for (slot, a) in access.iter().enumerate() {
            if matches!(a, Access::Strided | Access::StridedOutput) {
                bindings += &offset_function(slot, shape, &strides[slot]);
            }
        }
    }
    let strided_output = access.last() == Some(&Access::StridedOutput);
    let inputs = access
        .iter()
        .filter(|a| !matches!(a, Access::Unused | Access::StridedOutput))
        .count();
    let element = if packed { "vec4<f32>" } else { "f32" };
    let mut per_lane = String::new();
    for (i, a) in access.iter().take(inputs).enumerate() {
        let direct_packed = packed && *a == Access::Direct;
        let _ = writeln!(
            bindings,
            "@group(0) @binding({}) var<storage, read> x{i}_buf: array<{}>;",
            i + 1,
            if direct_packed { "vec4<f32>" } else { "f32" }
        );
        if direct_packed {
            let _ = writeln!(loads, "    let v{i} = x{i}_buf[idx];");
            let _ = write!(per_lane, " let x{i} = v{i}[LANE];");
            continue;
        }
        if let (true, Access::Strided, Some((_, strides))) = (packed, a, layout) {
            // The four elements share a row: one offset, then the row's stride.
            let step = strides[i].last().copied().unwrap_or(0);
            let _ = writeln!(loads, "    let o{i} = strided_offset_{i}(idx * 4u);");
            let _ = write!(per_lane, " let x{i} = x{i}_buf[o{i} + LANEu * {step}u];");
            continue;
        }
        let index = match a {
            Access::Direct => "idx".to_string(),
            Access::Scalar => "0u".to_string(),
            Access::Strided => index_of(i),
            Access::Unused | Access::StridedOutput => unreachable!("not an input"),
        };
        let _ = writeln!(loads, "    let x{i} = x{i}_buf[{index}];");
    }
    let _ = writeln!(
        bindings,
        "@group(0) @binding({}) var<storage, read_write> out: array<{element}>;",
        inputs + 1
    );
    let store = if packed {
        let mut store = String::from("var r: vec4<f32>;\n    let base = idx * 4u;\n");
        for lane in 0..4 {
            let _ = writeln!(
                store,
                "    {{ let idx = base + {lane}u;{} r[{lane}] = {expr}; }}",
                per_lane.replace("LANE", &lane.to_string())
            );
        }
        store + "    out[idx] = r;"
    } else if strided_output {
        format!("out[{}] = {expr};", index_of(OUTPUT_SLOT))
    } else {
        format!("out[idx] = {expr};")
    };
    let scalars = match fields.scalars {
        true => "    let s0 = p.scalars.x;\n    let s1 = p.scalars.y;\n    let s2 = p.scalars.z;\n    let s3 = p.scalars.w;\n",
        false => "",
    };
    Specialize::new(TEMPLATE)
        .replace("PARAMS", &fields.wgsl())
        .replace("SCALARS", scalars)
        .replace("BINDINGS", &bindings)
        .replace("LOADS", &loads)
        .replace("STORE", &store)
        .replace("HELPERS", super::EXPR_HELPERS)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(
            broadcast_shapes(&[&[3, 1, 5], &[4, 1]]),
            Some(vec![3, 4, 5])
        );
        assert_eq!(broadcast_shapes(&[&[2, 3], &[3]]), Some(vec![2, 3]));
        assert_eq!(broadcast_shapes(&[&[2, 3], &[2]]), None);
        assert_eq!(broadcast_shapes(&[&[], &[7]]), Some(vec![7]));
    }

    #[test]
    fn collapse_merges_contiguous_dims() {
        // [2, 3, 4] + [4]: dims 0 and 1 merge for both inputs (x1 has stride 0 in both).
        let out = [2, 3, 4];
        let mut strides = vec![
            broadcast_strides(&[2, 3, 4], &out),
            broadcast_strides(&[4], &out),
        ];
        assert_eq!(collapse(&out, &mut strides), vec![6, 4]);
        assert_eq!(strides, vec![vec![4, 1], vec![0, 1]]);
        // A fully contiguous op collapses to one dim.
        let mut strides = vec![broadcast_strides(&[2, 3, 4], &out)];
        assert_eq!(collapse(&out, &mut strides), vec![24]);
    }
}
