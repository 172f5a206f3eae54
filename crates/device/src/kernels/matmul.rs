//! Batched matrix multiply with optional transposes.

use super::elementwise::{Elementwise, Operand, View};
use super::{expect_f32, expect_len, to_u32, EXPR_HELPERS};
use crate::binding::Bound;
use crate::buffer::{DType, GpuBuffer};
use crate::device::{Device, Loops, TextureOperands, TEXTURE_ROW_TEXELS};
use crate::error::{DeviceError, Result};
use crate::kernel::Specialize;
use crate::tuning::MatmulTiling;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

const PARAMS_SRC: &str = include_str!("../../../../shaders/matmul_params.wgsl");
const REGISTER_SRC: &str = include_str!("../../../../shaders/matmul_register.wgsl");
const REGISTER_VEC4_SRC: &str = include_str!("../../../../shaders/matmul_register_vec4.wgsl");
const SUBGROUP_SRC: &str = include_str!("../../../../shaders/matmul_subgroup.wgsl");
const SHARED_SRC: &str = include_str!("../../../../shaders/matmul_shared.wgsl");
const SHARED_VEC4_SRC: &str = include_str!("../../../../shaders/matmul_shared_vec4.wgsl");

/// Shape of a (batched) product `C[z] = op(A[z]) * op(B[z])`.
///
/// `op(A)` is `m x k`; with `trans_a` A is stored `k x m`. Likewise `op(B)` is
/// `k x n`, stored `n x k` with `trans_b`. Matrix `z` of A starts at
/// `z * batch_stride_a` (0 reuses one matrix for every batch). C is a contiguous
/// `batch x m x n`.
///
/// ```no_run
/// # fn main() -> Result<(), kiln_device::DeviceError> {
/// use kiln_device::{Device, Matmul};
/// let device = Device::new()?;
/// let a = device.upload(&[1.0f32, 2.0, 3.0, 4.0])?; // 2x2
/// let b = device.upload(&[1.0f32, 0.0, 0.0, 1.0])?; // identity
/// let c = device.matmul(&a, &b, &Matmul::new(2, 2, 2))?;
/// assert_eq!(device.read::<f32>(&c)?, vec![1.0, 2.0, 3.0, 4.0]);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matmul {
    /// Number of products.
    pub batch: usize,
    /// Rows of `op(A)` and of C.
    pub m: usize,
    /// Columns of `op(B)` and of C.
    pub n: usize,
    /// Columns of `op(A)`, rows of `op(B)`: the summed dimension.
    pub k: usize,
    /// A is stored `k x m` and used transposed.
    pub trans_a: bool,
    /// B is stored `n x k` and used transposed.
    pub trans_b: bool,
    /// Elements between consecutive matrices of A (0: one A for every product).
    pub batch_stride_a: usize,
    /// Elements between consecutive matrices of B (0: one B for every product).
    pub batch_stride_b: usize,
}

impl Matmul {
    /// Multiply-adds the product takes, over all its batch entries.
    pub fn multiply_adds(&self) -> usize {
        self.batch * self.m * self.n * self.k
    }

    /// A single `m x k` by `k x n` product.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Self {
            batch: 1,
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            batch_stride_a: m * k,
            batch_stride_b: k * n,
        }
    }

    /// `batch` products of contiguous matrices.
    pub fn batched(batch: usize, m: usize, n: usize, k: usize) -> Self {
        Self {
            batch,
            ..Self::new(m, n, k)
        }
    }

    /// Sets whether A is stored transposed (`k x m`).
    pub fn transpose_a(mut self, t: bool) -> Self {
        self.trans_a = t;
        self
    }

    /// Sets whether B is stored transposed (`n x k`).
    pub fn transpose_b(mut self, t: bool) -> Self {
        self.trans_b = t;
        self
    }

    /// Multiply-adds performed, times two.
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.n * self.k) as f64
    }
}

/// An elementwise function the product kernel applies to each element of C
/// as it stores it, instead of a separate pass over C: a layer's bias and
/// activation, or an activation's derivative applied to the input gradient
/// that a backward product computes. The expression reads the product
/// element as `x0` and its [`EpilogueOperand`] as `x1`, and may use the
/// scalars `s0..s3` and the helpers of [`Elementwise`] expressions.
///
/// ```
/// # fn main() -> Result<(), kiln_device::DeviceError> {
/// use kiln_device::{Device, Elementwise, Epilogue, EpilogueOperand, Matmul};
/// let device = Device::new()?;
/// let a = device.upload(&[1.0f32, -2.0, 3.0, -4.0])?; // 2x2
/// let b = device.upload(&[1.0f32, 0.0, 0.0, 1.0])?; // identity
/// let bias = device.upload(&[0.5f32, 1.0])?;
/// let relu = Elementwise::new("bias_relu", "max(x0 + x1, 0.0)");
/// let epilogue = Epilogue { op: relu, operand: EpilogueOperand::Column(&bias) };
/// let c = device.matmul_fused(&a, &b, &Matmul::new(2, 2, 2), &epilogue)?;
/// assert_eq!(device.read::<f32>(&c)?, vec![1.5, 0.0, 3.5, 0.0]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Epilogue<'a> {
    /// The expression applied to each element of C (`x0`) and its operand (`x1`).
    pub op: Elementwise<'a>,
    /// What the expression reads as `x1`.
    pub operand: EpilogueOperand<'a>,
}

/// The f32 values an [`Epilogue`] reads besides the product.
#[derive(Clone, Copy, Debug)]
pub enum EpilogueOperand<'a> {
    /// One per column of C, shared by every row and batch entry (a bias).
    Column(&'a GpuBuffer),
    /// One per element of C, laid out as C is (batch, row, column).
    Element(&'a GpuBuffer),
}

impl<'a> EpilogueOperand<'a> {
    fn buffer(self) -> &'a GpuBuffer {
        match self {
            Self::Column(b) | Self::Element(b) => b,
        }
    }
}

impl Epilogue<'_> {
    /// What tells kernels with different epilogues apart.
    fn key(&self) -> String {
        let scalars = self.op.scalars.map(f32::to_bits);
        let operand = match self.operand {
            EpilogueOperand::Column(_) => "column",
            EpilogueOperand::Element(_) => "element",
        };
        format!("{}:{operand}:{scalars:?}", self.op.expr)
    }

    /// Checks the operand against C's `rows x n` (all batch entries' rows).
    fn validate(&self, rows: usize, n: usize) -> Result<()> {
        let (buffer, wanted, per) = match self.operand {
            EpilogueOperand::Column(b) => (b, n, format!("{n} columns")),
            EpilogueOperand::Element(b) => (b, rows * n, format!("a {rows} x {n} product")),
        };
        expect_f32("matmul", "epilogue operand", buffer)?;
        if buffer.len() != wanted {
            return Err(DeviceError::Shape {
                op: "matmul",
                message: format!(
                    "the epilogue operand holds {} values for {per}",
                    buffer.len()
                ),
            });
        }
        Ok(())
    }

    /// The epilogue applied as a separate elementwise pass over `product`
    /// (`rows x n`), for the products not computed by one kernel.
    fn apply(
        &self,
        device: &Device,
        product: &GpuBuffer,
        rows: usize,
        n: usize,
    ) -> Result<GpuBuffer> {
        let (c_shape, column_shape) = ([rows, n], [n]);
        let operand = match self.operand {
            EpilogueOperand::Column(b) => Operand::new(b, &column_shape),
            EpilogueOperand::Element(b) => Operand::new(b, &c_shape),
        };
        let operands = [Operand::new(product, &c_shape), operand];
        Ok(device.elementwise(&self.op, &operands)?.0)
    }
}

/// WGSL `fn epilogue(v, index, col)`, which every kernel applies to what it
/// stores at `c[index]` (column `col`): the identity, or the epilogue's
/// expression with its operand at binding 4.
fn epilogue_source(epilogue: Option<&Epilogue>) -> String {
    let Some(e) = epilogue else {
        return "fn epilogue(v: f32, index: u32, col: u32) -> f32 {\n    return v;\n}\n".into();
    };
    let x1 = match e.operand {
        EpilogueOperand::Column(_) => "operand[col]",
        EpilogueOperand::Element(_) => "operand[index]",
    };
    let mut s = format!(
        "{EXPR_HELPERS}\n@group(0) @binding(4) var<storage, read> operand: array<f32>;\n\n\
         fn epilogue(v: f32, index: u32, col: u32) -> f32 {{\n    let x0 = v;\n    let x1 = {x1};\n"
    );
    for (i, value) in e.op.scalars.iter().enumerate() {
        let _ = writeln!(s, "    let s{i} = bitcast<f32>({:#x}u);", value.to_bits());
    }
    let _ = writeln!(s, "    return {};\n}}", e.op.expr);
    s
}

/// How a product's C is stored: through an epilogue, and in planes of rows
/// (see [`Device::matmul_fused_planar`]).
#[derive(Clone, Copy, Default)]
struct Stored<'e> {
    epilogue: Option<&'e Epilogue<'e>>,
    plane: Option<usize>,
}

/// WGSL `fn c_index(row, col)`: where C's element goes within its batch
/// entry, row-major or in planes of `plane` rows.
fn c_index_source(plane: Option<usize>) -> String {
    let body = match plane {
        None => "row * p.n + col".to_string(),
        Some(plane) => format!("(row / {plane}u * p.n + col) * {plane}u + row % {plane}u"),
    };
    format!("fn c_index(row: u32, col: u32) -> u32 {{\n    return {body};\n}}\n")
}

/// What a product kernel does besides computing C: an epilogue on what it
/// stores, and the column sums of op(B) over k (a dense layer's bias
/// gradient, when B is the output's gradient), written by the invocations of
/// the first row block.
#[derive(Clone, Copy, Default)]
struct Extras<'e> {
    epilogue: Option<&'e Epilogue<'e>>,
    column_sums: Option<&'e GpuBuffer>,
    /// C stored in planes of this many rows.
    plane: Option<usize>,
}

impl Extras<'_> {
    fn key(&self) -> String {
        let epilogue = self.epilogue.map(Epilogue::key).unwrap_or_default();
        let plane = self
            .plane
            .map(|p| format!(":planes{p}"))
            .unwrap_or_default();
        format!("{epilogue}:{}{plane}", self.column_sums.is_some())
    }

    /// The buffers after A, B and C, in binding order (4, 5).
    fn buffers(&self) -> impl Iterator<Item = &GpuBuffer> {
        self.epilogue
            .map(|e| e.operand.buffer())
            .into_iter()
            .chain(self.column_sums)
    }
}

/// The WGSL that sums columns `col0 + j` of op(B) over k into `column_sums`
/// (bound after the epilogue's operand), for the invocations where `first` holds,
/// each taking the columns of the loop header `columns`. B is f32 storage,
/// read one element at a time whatever the kernel's loads.
fn column_sums_source(
    binding: u32,
    first: &str,
    columns: &str,
    ops: &Operands,
    trans_b: bool,
) -> (String, String) {
    let declaration = format!(
        "@group(0) @binding({binding}) var<storage, read_write> column_sums: array<f32>;\n"
    );
    let index = if trans_b {
        "col * p.k + kk"
    } else {
        "kk * p.n + col"
    };
    let element = if ops.b_texture {
        "load_b(i >> 2u)[i & 3u]"
    } else if ops.vec4 {
        "b[i >> 2u][i & 3u]"
    } else {
        "b[i]"
    };
    let block = format!(
        "    if ({first}) {{\n        \
         for ({columns}) {{\n            \
         let col = col0 + j;\n            \
         if (col < p.n) {{\n                \
         var total = 0.0;\n                \
         for (var kk = 0u; kk < p.k; kk++) {{\n                    \
         let i = {index};\n                    \
         total += {element};\n                \
         }}\n                \
         column_sums[col] = total;\n            \
         }}\n        \
         }}\n    \
         }}\n"
    );
    (declaration, block)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_batch: u32,
    b_batch: u32,
    c_batch: u32,
    z0: u32,
    y0: u32,
}

impl Device {
    /// Computes `op(A) * op(B)` with this device's tuned tiling. A and B may
    /// each hold f32 or f16 (half the memory traffic; products and sums stay
    /// f32, as on tensor cores); C is f32.
    pub fn matmul(&self, a: &GpuBuffer, b: &GpuBuffer, spec: &Matmul) -> Result<GpuBuffer> {
        self.matmul_with(a, b, spec, self.default_tiling(spec))
    }

    /// Computes `op(A) * op(B)` with an explicit tiling (for tests and tuning).
    pub fn matmul_with(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        tiling: MatmulTiling,
    ) -> Result<GpuBuffer> {
        self.matmul_variant(a, b, spec, tiling, self.half_loads())
    }

    /// How kernels on this device read f16 storage: natively where the
    /// adapter has SHADER_F16 (multiplying in f16 too after
    /// [`Device::set_half_arithmetic`]), else unpacked from 32-bit words.
    pub fn half_loads(&self) -> HalfLoads {
        if !self.features().contains(wgpu::Features::SHADER_F16) {
            HalfLoads::Packed
        } else if self.half_arithmetic() {
            HalfLoads::NativeArithmetic
        } else {
            HalfLoads::Native
        }
    }

    /// Computes `op(A) * op(B)` with an explicit tiling and way of reading f16
    /// operands (kernel tests run every combination the device can take).
    pub fn matmul_variant(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        tiling: MatmulTiling,
        half: HalfLoads,
    ) -> Result<GpuBuffer> {
        self.matmul_impl(a, b, spec, (tiling, half), Stored::default())
    }

    /// `epilogue(op(A) * op(B))` with this device's tuned tiling, the
    /// epilogue applied as the product is stored (see [`Epilogue`]).
    pub fn matmul_fused(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        epilogue: &Epilogue,
    ) -> Result<GpuBuffer> {
        self.matmul_fused_with(a, b, spec, epilogue, self.default_tiling(spec))
    }

    /// [`Device::matmul_fused`] storing C as `[m / plane, n, plane]`: each
    /// block of `plane` consecutive rows transposed, so row `q * plane + s`,
    /// column `j` lands at `(q * n + j) * plane + s`. A convolution's product
    /// (rows of output positions, columns of channels) comes out as NCHW
    /// planes this way, without a pass to reorder it. An element epilogue
    /// operand is read in the same layout. Needs `batch == 1` and `plane`
    /// dividing `m`.
    ///
    /// ```
    /// # fn main() -> Result<(), kiln_device::DeviceError> {
    /// use kiln_device::{Device, Elementwise, Epilogue, EpilogueOperand, Matmul};
    /// let device = Device::new()?;
    /// let a = device.upload(&[1.0f32, 2.0, 3.0, 4.0])?; // 4x1: positions
    /// let b = device.upload(&[1.0f32, 10.0])?; // 1x2: channels
    /// let bias = device.upload(&[0.0f32, 0.5])?;
    /// let add = Epilogue { op: Elementwise::new("bias", "x0 + x1"), operand: EpilogueOperand::Column(&bias) };
    /// let c = device.matmul_fused_planar(&a, &b, &Matmul::new(4, 2, 1), &add, 2)?;
    /// // Two images of 2 positions: [channel 0 plane, channel 1 plane] each.
    /// assert_eq!(device.read::<f32>(&c)?, vec![1.0, 2.0, 10.5, 20.5, 3.0, 4.0, 30.5, 40.5]);
    /// # Ok(()) }
    /// ```
    pub fn matmul_fused_planar(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        epilogue: &Epilogue,
        plane: usize,
    ) -> Result<GpuBuffer> {
        self.matmul_fused_planar_with(a, b, spec, epilogue, plane, self.default_tiling(spec))
    }

    /// [`Device::matmul_fused_planar`] with an explicit tiling (for tests).
    pub fn matmul_fused_planar_with(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        epilogue: &Epilogue,
        plane: usize,
        tiling: MatmulTiling,
    ) -> Result<GpuBuffer> {
        if spec.batch != 1 || plane == 0 || spec.m % plane != 0 {
            return Err(DeviceError::Shape {
                op: "matmul",
                message: format!(
                    "planes of {plane} rows need a single product whose m ({}) they divide, batch {}",
                    spec.m, spec.batch
                ),
            });
        }
        let stored = Stored {
            epilogue: Some(epilogue),
            plane: Some(plane),
        };
        self.matmul_impl(a, b, spec, (tiling, self.half_loads()), stored)
    }

    /// [`Device::matmul_fused`] with an explicit tiling (for tests).
    pub fn matmul_fused_with(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        epilogue: &Epilogue,
        tiling: MatmulTiling,
    ) -> Result<GpuBuffer> {
        let stored = Stored {
            epilogue: Some(epilogue),
            plane: None,
        };
        self.matmul_impl(a, b, spec, (tiling, self.half_loads()), stored)
    }

    /// `op(A) * op(B)` and, where the product kernel can add them up as it
    /// goes, the sums of op(B)'s columns over k: for a dense layer's weight
    /// gradient `X^T G` they are the bias gradient, which then costs no
    /// reduction of its own. The sums come back `None` where they cannot be
    /// had this way (the caller reduces instead): a batch of products, f16 B,
    /// a split or empty k, or a shared-memory tiling.
    pub fn matmul_column_sums(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
    ) -> Result<(GpuBuffer, Option<GpuBuffer>)> {
        self.matmul_column_sums_with(a, b, spec, self.default_tiling(spec))
    }

    /// [`Device::matmul_column_sums`] with an explicit tiling (for tests).
    pub fn matmul_column_sums_with(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        tiling: MatmulTiling,
    ) -> Result<(GpuBuffer, Option<GpuBuffer>)> {
        let half = self.half_loads();
        let (tiling, half) = self.prepare_matmul(a, b, spec, tiling, half)?;
        let Matmul { batch, m, n, k, .. } = *spec;
        let summable = batch == 1
            && k > 0
            && m * n > 0
            && b.dtype() == DType::F32
            && self.split_k(spec, tiling).is_none()
            && !matches!(tiling, MatmulTiling::Shared { .. });
        if !summable {
            let product = self.matmul_impl(a, b, spec, (tiling, half), Stored::default())?;
            return Ok((product, None));
        }
        let out = self.empty(m * n, DType::F32)?;
        let sums = self.empty(n, DType::F32)?;
        let extras = Extras {
            epilogue: None,
            column_sums: Some(&sums),
            plane: None,
        };
        self.dispatch_matmul([a, b, &out], spec, (tiling, half), 0..1, extras)?;
        Ok((out, Some(sums)))
    }

    fn matmul_impl(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        (tiling, half): (MatmulTiling, HalfLoads),
        Stored { epilogue, plane }: Stored,
    ) -> Result<GpuBuffer> {
        let (tiling, half) = self.prepare_matmul(a, b, spec, tiling, half)?;
        let Matmul { batch, m, n, k, .. } = *spec;
        if let Some(e) = epilogue {
            e.validate(batch * m, n)?;
        }
        // Products not made by one kernel take the epilogue as a second pass.
        let unfused = if k == 0 || batch * m * n == 0 {
            // An empty sum (C is all zeros), or no C at all.
            Some(self.zeros(batch * m * n, DType::F32)?)
        } else if let Some(splits) = self.split_k(spec, tiling) {
            Some(self.matmul_split_k(a, b, spec, tiling, splits, half)?)
        } else {
            None
        };
        if let Some(product) = unfused {
            return match (plane, product.is_empty()) {
                (_, true) => Ok(product),
                (Some(plane), false) => self.store_planar(&product, epilogue, [m, n], plane),
                (None, false) => match epilogue {
                    Some(e) => e.apply(self, &product, batch * m, n),
                    None => Ok(product),
                },
            };
        }
        let out = self.empty(batch * m * n, DType::F32)?;
        if !out.is_empty() {
            let extras = Extras {
                epilogue,
                column_sums: None,
                plane,
            };
            self.dispatch_matmul([a, b, &out], spec, (tiling, half), 0..batch, extras)?;
        }
        Ok(out)
    }

    /// The row-major `m x n` product reordered into planes of `plane` rows
    /// (see [`Device::matmul_fused_planar`]), through the epilogue if any: one
    /// pass over views in the planar order.
    fn store_planar(
        &self,
        product: &GpuBuffer,
        epilogue: Option<&Epilogue>,
        [m, n]: [usize; 2],
        plane: usize,
    ) -> Result<GpuBuffer> {
        let shape = [m / plane, n, plane];
        let rows = View {
            buffer: product,
            strides: &[plane * n, 1, n],
            offset: 0,
        };
        let Some(e) = epilogue else {
            return self.elementwise_views(&Elementwise::new("planes", "x0"), &[rows], &shape);
        };
        let (buffer, strides) = match e.operand {
            EpilogueOperand::Column(b) => (b, [0, 1, 0]),
            EpilogueOperand::Element(b) => (b, [n * plane, plane, 1]),
        };
        let operand = View {
            buffer,
            strides: &strides,
            offset: 0,
        };
        self.elementwise_views(&e.op, &[rows, operand], &shape)
    }

    /// Computes only the batch entries `entries` of `op(A) * op(B)`, into `out`,
    /// which holds the whole `batch x m x n` result; other entries keep their
    /// values. Recurrences use it: entry `t` reads what step `t - 1` wrote into
    /// the same buffers, so the sequence lives in one allocation.
    pub fn matmul_entries_into(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        out: &GpuBuffer,
        spec: &Matmul,
        entries: std::ops::Range<usize>,
    ) -> Result<()> {
        const OP: &str = "matmul_entries_into";
        let (tiling, half) =
            self.prepare_matmul(a, b, spec, self.default_tiling(spec), self.half_loads())?;
        expect_f32(OP, "C", out)?;
        expect_len(OP, "C", out, spec.batch * spec.m * spec.n)?;
        if entries.end > spec.batch || spec.k == 0 {
            return Err(DeviceError::Shape {
                op: OP,
                message: format!(
                    "entries {entries:?} of a batch of {} with k = {}",
                    spec.batch, spec.k
                ),
            });
        }
        self.dispatch_matmul(
            [a, b, out],
            spec,
            (tiling, half),
            entries,
            Extras::default(),
        )
    }

    /// The tuned tiling, except that on CPU adapters a product too small to
    /// be worth spreading over cores takes register tiles (fitted into one
    /// workgroup by `prepare_matmul`), which can chain with its neighbours
    /// into one dispatch (see `Device::together`), and that on GPUs a
    /// product whose output blocks would be too few to fill the device takes
    /// the tiling tuned for small products.
    fn default_tiling(&self, spec: &Matmul) -> MatmulTiling {
        let tuning = self.tuning();
        match tuning.matmul {
            MatmulTiling::Subgroup { .. } if self.kernels_for_cpu() && fits_one_workgroup(spec) => {
                MatmulTiling::SUBGROUP_FALLBACK
            }
            t if !self.kernels_for_cpu() && output_blocks(spec, t) < GPU_BUSY_WORKGROUPS => {
                tuning.small_matmul
            }
            t => t,
        }
    }

    /// Checks the operands against `spec`, and adapts `tiling` and `half` to
    /// the shape and operand types.
    fn prepare_matmul(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        tiling: MatmulTiling,
        half: HalfLoads,
    ) -> Result<(MatmulTiling, HalfLoads)> {
        const OP: &str = "matmul";
        if half != HalfLoads::Packed && !self.features().contains(wgpu::Features::SHADER_F16) {
            return Err(DeviceError::Shape {
                op: OP,
                message: format!("{half:?} f16 loads need an adapter with SHADER_F16"),
            });
        }
        let (tiling, half) = half_arithmetic_route(a, b, spec, tiling, half);
        expect_float(OP, "A", a)?;
        expect_float(OP, "B", b)?;
        let Matmul { batch, m, k, .. } = *spec;
        if batch > 0 {
            expect_len(OP, "A", a, (batch - 1) * spec.batch_stride_a + m * k)?;
            expect_len(OP, "B", b, (batch - 1) * spec.batch_stride_b + k * spec.n)?;
        }
        tiling
            .validate(self.limits(), self.features(), self.adapter_info())
            .map_err(|message| DeviceError::Shape { op: OP, message })?;
        let tiling = match tiling {
            MatmulTiling::Subgroup { tm, .. } if !vec4_fits(spec, tm, 4) => {
                MatmulTiling::SUBGROUP_FALLBACK
            }
            t => t,
        };
        let tiling = match tiling {
            // A product this small takes microseconds on one core: one
            // workgroup, which can also chain with its neighbours into one
            // dispatch (see `Device::together`).
            MatmulTiling::Register { .. } if self.kernels_for_cpu() => {
                let lanes = if fits_one_workgroup(spec) {
                    1
                } else {
                    cpu_lanes_wanted()
                };
                tiling.fitted(spec.m, spec.n, lanes)
            }
            // Few rows: shrink the workgroup so lanes do not idle on clamped rows.
            MatmulTiling::Subgroup { tm, sg, wg } => {
                let lanes = m.div_ceil(tm as usize).next_multiple_of(sg as usize) as u32;
                MatmulTiling::Subgroup {
                    tm,
                    sg,
                    wg: wg.min(lanes.max(sg)),
                }
            }
            t => t,
        };
        Ok((tiling, half))
    }

    /// Dispatches the kernel for batch entries `entries` of `a x b`, writing
    /// into `out`.
    fn dispatch_matmul(
        &self,
        [a, b, out]: [&GpuBuffer; 3],
        spec: &Matmul,
        (tiling, half): (MatmulTiling, HalfLoads),
        entries: std::ops::Range<usize>,
        extras: Extras,
    ) -> Result<()> {
        const OP: &str = "matmul";
        let Matmul { m, n, k, .. } = *spec;
        let vec4 = vec4_loads_fit(spec, tiling);
        // A copy takes the operand's whole buffer, so only products that
        // read most of it qualify (not one step's slice of a sequence's
        // buffer), and only large ones: below that the copy is not worth
        // its command.
        let worth_copy = |buffer: &GpuBuffer, batch_stride: usize, read: usize| {
            let read = entries.len().saturating_sub(1) * batch_stride + read;
            read >= TEXTURE_MIN_ELEMENTS && 2 * read >= buffer.len()
        };
        let worth_a = worth_copy(a, spec.batch_stride_a, m * k);
        let worth_b = worth_copy(b, spec.batch_stride_b, k * n);
        // Measured on lavapipe with the column-by-column subgroup step: on
        // the host the defaults were tuned on, a texture beat storage loads
        // of A only where B is transposed (5-10% on MiniLM's and the CNN's
        // forward products), and elsewhere storage loads were 0-25% faster;
        // on a Zen 3 host, textures for both operands made every large
        // product 20-60% faster. The autotuner measures which this host is.
        let operand_textures = self.tuning().operand_textures;
        let (a_wanted, b_wanted) = match self.texture_operands() {
            _ if !(self.kernels_for_cpu() && vec4 && tiling.has_texture_path()) => (false, false),
            TextureOperands::Always => (true, true),
            TextureOperands::Auto => (
                worth_a && (operand_textures || (spec.trans_b && !spec.trans_a)),
                worth_b && operand_textures,
            ),
            TextureOperands::Never => (false, false),
        };
        let a_texture = match a_wanted {
            true => self.texture_operand(a, 0)?,
            false => None,
        };
        let b_texture = match b_wanted {
            true => self.texture_operand(b, 1)?,
            false => None,
        };
        let operands = Operands {
            a: a.dtype(),
            b: b.dtype(),
            half,
            vec4,
            a_texture: a_texture.is_some(),
            b_texture: b_texture.is_some(),
        };
        let variant = Variant {
            tiling,
            trans: (spec.trans_a, spec.trans_b),
            operands,
            epilogue: extras.epilogue.map(|e| {
                let column = matches!(e.operand, EpilogueOperand::Column(_));
                (column, e.op.scalars.map(f32::to_bits))
            }),
            column_sums: extras.column_sums.is_some(),
            plane: extras.plane,
        };
        let expr = extras.epilogue.map(|e| e.op.expr);
        let key = self.variant_key(variant, expr, || {
            format!(
                "{tiling}:{}{}:{operands:?}:{}",
                spec.trans_a,
                spec.trans_b,
                extras.key()
            )
        });
        let kernel = self.kernel_with_loops(&key, product_loops(self), || {
            specialise(tiling, spec.trans_a, spec.trans_b, operands, extras)
        })?;
        let mut resources = Vec::new();
        for (texture, operand) in [(&a_texture, a), (&b_texture, b)] {
            self.check_same_device(operand, OP)?;
            resources.push(match texture {
                Some(view) => Bound::Texture(view),
                None => Bound::Buffer(operand.raw()),
            });
        }
        for buffer in [out].into_iter().chain(extras.buffers()) {
            self.check_same_device(buffer, OP)?;
            resources.push(Bound::Buffer(buffer.raw()));
        }
        let (block_m, block_n) = tiling.block();
        let groups_x = to_u32(OP, "n blocks", n.div_ceil(block_n as usize))?;
        let groups_y = to_u32(OP, "m blocks", m.div_ceil(block_m as usize))?;
        let mut params = Params {
            m: to_u32(OP, "m", m)?,
            n: to_u32(OP, "n", n)?,
            k: to_u32(OP, "k", k)?,
            a_batch: to_u32(OP, "batch stride of A", spec.batch_stride_a)?,
            b_batch: to_u32(OP, "batch stride of B", spec.batch_stride_b)?,
            c_batch: to_u32(OP, "m * n", m * n)?,
            z0: 0,
            y0: 0,
        };
        // Batches and row blocks beyond the per-dimension workgroup limit go
        // in several dispatches (a point cloud's millions of rows through a
        // narrow layer fit every buffer, but not one grid).
        let max = self.limits().max_compute_workgroups_per_dimension;
        let mut z0 = entries.start;
        while z0 < entries.end {
            let count = (entries.end - z0).min(max as usize);
            params.z0 = to_u32(OP, "batch", z0)?;
            let mut y0 = 0;
            while y0 < groups_y {
                let rows = (groups_y - y0).min(max);
                params.y0 = y0;
                self.dispatch_bound(
                    &kernel,
                    bytemuck::bytes_of(&params),
                    &resources,
                    [groups_x, rows, count as u32],
                )?;
                y0 += rows;
            }
            z0 += count;
        }
        Ok(())
    }
}

/// Whether a product on a CPU adapter is small enough to run as one
/// workgroup: up to 32K multiply-adds, about the cost of handing a dispatch
/// to another thread.
fn fits_one_workgroup(spec: &Matmul) -> bool {
    spec.multiply_adds() <= 1 << 15
}

/// Output tiles a product should have on a CPU adapter to give every core one
/// SIMD vector of lanes (see [`MatmulTiling::fitted`]).
fn cpu_lanes_wanted() -> usize {
    const SIMD_LANES: usize = 8;
    SIMD_LANES * super::host_cores()
}

/// Elements of an operand from which a product on a CPU adapter may read it
/// through a texture: below it the copy is not worth its command.
const TEXTURE_MIN_ELEMENTS: usize = 1 << 16;

/// Workgroups a GPU product should have to keep the device busy: today's
/// discrete GPUs have 30 to 140 compute units, each running a few
/// workgroups at once. Fewer output blocks than this take the tiling tuned
/// for small products, and weight gradients are split along k to reach it.
/// Not measured yet (no GPU run so far).
const GPU_BUSY_WORKGROUPS: usize = 256;

/// The shortest chunk of k a GPU's split product gives a workgroup: eight
/// k tiles of 16, so loading and storing its block stays a small part of
/// the work.
const GPU_MIN_CHUNK: usize = 128;

/// Workgroups `tiling` gives the product `spec`, over all its batch entries.
fn output_blocks(spec: &Matmul, tiling: MatmulTiling) -> usize {
    let (block_m, block_n) = tiling.block();
    spec.batch * spec.m.div_ceil(block_m as usize) * spec.n.div_ceil(block_n as usize)
}

/// The largest count of chunks, from 2 up to `most`, that divides k into
/// chunks of at least `min_chunk`, preferring chunks that are multiples of 4
/// (they keep the vec4 kernels usable).
fn chunk_count(k: usize, most: usize, min_chunk: usize) -> Option<usize> {
    let fits =
        |s: usize, quad: bool| k % s == 0 && k / s >= min_chunk && (!quad || (k / s) % 4 == 0);
    (2..=most)
        .rev()
        .find(|&s| fits(s, true))
        .or_else(|| (2..=most).rev().find(|&s| fits(s, false)))
}

impl Device {
    /// How many chunks to split k into, for products with few outputs and a
    /// long k (weight gradients `A^T B` over a large batch: a convolution's,
    /// a transformer layer's): each output block's workgroup would otherwise
    /// walk all of k alone while the rest of the device idles. Only the
    /// `A^T B` layout is split, because there k never serves as a row
    /// stride, so each chunk is a batch entry of the same kernel.
    ///
    /// On CPU adapters the outputs must be few (up to 16K) and k long against
    /// them. On GPUs the tiling's output blocks must be too few to keep the
    /// device busy: enough chunks are made to fill it, each at least
    /// [`GPU_MIN_CHUNK`] long.
    fn split_k(&self, spec: &Matmul, tiling: MatmulTiling) -> Option<usize> {
        let Matmul { batch, m, n, k, .. } = *spec;
        if batch != 1 || !spec.trans_a || spec.trans_b {
            return None;
        }
        if self.kernels_for_cpu() {
            if m * n > 16_384 || k < 2048 || k < 8 * m.max(n) {
                return None;
            }
            return chunk_count(k, 64, 64);
        }
        let blocks = output_blocks(spec, tiling);
        if blocks >= GPU_BUSY_WORKGROUPS {
            return None;
        }
        chunk_count(k, GPU_BUSY_WORKGROUPS.div_ceil(blocks), GPU_MIN_CHUNK)
    }
}

impl Device {
    /// `A^T B` as `splits` partial products over chunks of k, summed.
    fn matmul_split_k(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        tiling: MatmulTiling,
        splits: usize,
        half: HalfLoads,
    ) -> Result<GpuBuffer> {
        let chunk = spec.k / splits;
        let partial = Matmul {
            batch: splits,
            k: chunk,
            batch_stride_a: chunk * spec.m,
            batch_stride_b: chunk * spec.n,
            ..*spec
        };
        let partials = self.matmul_variant(a, b, &partial, tiling, half)?;
        self.reduce(
            &partials,
            &crate::kernels::reduce::Reduce {
                op: crate::kernels::reduce::ReduceOp::Sum,
                outer: 1,
                len: splits,
                inner: spec.m * spec.n,
            },
        )
    }
}

/// Where f16 arithmetic applies (both operands f16, vec4 loads), the tiling
/// it runs on: vec4 shared-memory and register tilings have an f16 kernel,
/// subgroup and scalar shared ones run on register tiles instead. Elsewhere
/// [`HalfLoads::NativeArithmetic`] reads as [`HalfLoads::Native`].
fn half_arithmetic_route(
    a: &GpuBuffer,
    b: &GpuBuffer,
    spec: &Matmul,
    tiling: MatmulTiling,
    half: HalfLoads,
) -> (MatmulTiling, HalfLoads) {
    if half != HalfLoads::NativeArithmetic {
        return (tiling, half);
    }
    let with_f16_kernel = match tiling {
        MatmulTiling::Register { .. } | MatmulTiling::Shared { vec4: true, .. } => tiling,
        _ => MatmulTiling::SUBGROUP_FALLBACK,
    };
    let both_half = a.dtype() == DType::F16 && b.dtype() == DType::F16;
    if both_half && vec4_loads_fit(spec, with_f16_kernel) {
        (with_f16_kernel, half)
    } else {
        (tiling, HalfLoads::Native)
    }
}

/// True when the register kernel may read both operands as `vec4`s: k and the
/// extents read along their contiguous axis are multiples of 4, and so are the
/// batch strides (so every vec4 is aligned).
fn vec4_loads_fit(spec: &Matmul, tiling: MatmulTiling) -> bool {
    match tiling {
        MatmulTiling::Register { tm, tn, .. } => vec4_fits(spec, tm, tn),
        MatmulTiling::Subgroup { tm, .. } => vec4_fits(spec, tm, 4),
        MatmulTiling::Shared { vec4, tm, tn, .. } => vec4 && vec4_fits(spec, tm, tn),
    }
}

/// The vec4 condition for a kernel computing `tm x tn` blocks.
fn vec4_fits(spec: &Matmul, tm: u32, tn: u32) -> bool {
    let rows_ok = !spec.trans_a || (spec.m % 4 == 0 && tm % 4 == 0);
    let cols_ok = spec.trans_b || (spec.n % 4 == 0 && tn % 4 == 0);
    spec.k % 4 == 0
        && spec.batch_stride_a % 4 == 0
        && spec.batch_stride_b % 4 == 0
        && rows_ok
        && cols_ok
}

/// How a matmul kernel variant reads f16 operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HalfLoads {
    /// As WGSL `f16` (`enable f16;`): needs SHADER_F16.
    Native,
    /// As 32-bit words holding two halves, through `unpack2x16float`: core
    /// WGSL, so any adapter.
    Packed,
    /// As WGSL `f16`, multiplying in f16 too: each output's four k steps at
    /// a time are summed in f16 (a `dot` of two `vec4<f16>` on register
    /// tiles, a multiply-add chain on vec4 shared-memory tiles, which then
    /// hold f16), and those partial sums are summed in f32, so rounding stays
    /// that of four-term f16 sums however long k is. Needs SHADER_F16. Only
    /// products whose operands are both f16 and whose shape takes vec4 loads
    /// (see [`Matmul`]) run it, on the tiling asked for where it is a
    /// register or vec4 shared one, else on register tiles; others run as
    /// [`HalfLoads::Native`].
    NativeArithmetic,
}

/// How the product kernels' loops are built. With kernels for GPUs,
/// without wgpu's loop counters (`Loops::Bounded`): every loop in them runs
/// over k or a tile's fixed extent, a counted loop keeps a driver from
/// unrolling it, and on an H200 the product at N=4096 ran at 30.5 TFLOP/s
/// without the counters against 22.3 with them (benches/RESULTS.md). With
/// kernels for CPU adapters the counters stay: lavapipe ran the products no
/// faster without them, and compiled them 1.8 times slower (its compiler
/// then unrolls).
pub(crate) fn product_loops(device: &Device) -> Loops {
    match device.kernels_for_cpu() {
        true => Loops::Counted,
        false => Loops::Bounded,
    }
}

/// A fingerprint of the f32 kernels `tilings` generate, plain and with A
/// transposed: the autotuner's cache keys on it, so a change to the kernel
/// generator (not only to Kiln's version) times the candidates again. FNV-1a,
/// stable across Rust versions.
pub(crate) fn kernels_fingerprint(tilings: &[MatmulTiling]) -> u64 {
    let ops = Operands {
        a: DType::F32,
        b: DType::F32,
        half: HalfLoads::Native,
        vec4: true,
        a_texture: false,
        b_texture: false,
    };
    let mut hash = FNV_OFFSET;
    for &tiling in tilings {
        for trans_a in [false, true] {
            let source = specialise(tiling, trans_a, false, ops, Extras::default());
            hash = fnv1a(hash, source.as_bytes());
        }
    }
    hash
}

/// Where an FNV-1a hash starts.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `bytes`, continuing from `hash`: stable across Rust releases,
/// unlike the standard library's hasher, so it can name cache files.
pub(crate) fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What tells one matmul kernel variant from another, as values, but for
/// its epilogue's expression (see [`VariantKeys`]). Every product looks its
/// kernel up; formatting these into the kernel cache's string key (the
/// tiling, the operands' types, the epilogue) took about 8% of the MNIST
/// MLP step's host time, so each variant's key is formatted once.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Variant {
    tiling: MatmulTiling,
    trans: (bool, bool),
    operands: Operands,
    /// Whether the epilogue's operand is per column, and its scalars' bits.
    epilogue: Option<(bool, [u32; 4])>,
    column_sums: bool,
    plane: Option<usize>,
}

/// The kernel cache keys of the matmul variants a device has launched: by
/// [`Variant`], then by epilogue expression, compared in place so that a
/// lookup allocates nothing.
#[derive(Default)]
pub(crate) struct VariantKeys {
    keys: HashMap<Variant, Vec<ExprKey>>,
    count: usize,
}

/// An epilogue expression (none without an epilogue) and the key it gives.
type ExprKey = (Option<Box<str>>, Arc<str>);

/// Variants whose keys a device remembers; past it, the memo starts over
/// (a key costs one formatting to make again).
const MAX_VARIANT_KEYS: usize = 4096;

impl Device {
    /// The kernel cache key of `variant` with epilogue expression `expr`,
    /// formatted by `format` the first time.
    fn variant_key(
        &self,
        variant: Variant,
        expr: Option<&str>,
        format: impl FnOnce() -> String,
    ) -> Arc<str> {
        let mut memo = crate::device::lock(&self.shared.matmul_keys);
        let found = memo.keys.get(&variant).and_then(|by_expr| {
            by_expr
                .iter()
                .find(|(e, _)| e.as_deref() == expr)
                .map(|(_, key)| key.clone())
        });
        if let Some(key) = found {
            return key;
        }
        if memo.count >= MAX_VARIANT_KEYS {
            *memo = VariantKeys::default();
        }
        let key: Arc<str> = format().into();
        memo.count += 1;
        let entry = (expr.map(Box::from), key.clone());
        memo.keys.entry(variant).or_default().push(entry);
        key
    }
}

/// The storage types of a kernel's operands and how it loads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Operands {
    a: DType,
    b: DType,
    half: HalfLoads,
    /// Loads come four elements at a time (see [`vec4_loads_fit`]).
    vec4: bool,
    /// A is read through a texture (see [`Device::texture_operand`]); f32
    /// with vec4 loads only.
    a_texture: bool,
    /// B likewise.
    b_texture: bool,
}

impl Operands {
    fn native_half(&self) -> bool {
        self.half != HalfLoads::Packed && (self.a == DType::F16 || self.b == DType::F16)
    }

    /// Products in f16 (only routed here with both operands f16 and vec4 loads).
    fn half_arithmetic(&self) -> bool {
        self.half == HalfLoads::NativeArithmetic
    }
}

fn expect_float(op: &'static str, name: &str, b: &GpuBuffer) -> Result<()> {
    if b.dtype() == DType::F16 {
        Ok(())
    } else {
        expect_f32(op, name, b)
    }
}

/// The binding of operand `name` and its loader `load_<name>(i)`, returning
/// element `i` (or the `i`-th group of four, for vec4 loads) as f32, or as
/// `vec4<f16>` for f16 arithmetic.
fn operand_source(name: &str, binding: u32, dtype: DType, ops: &Operands) -> String {
    if (name == "a" && ops.a_texture) || (name == "b" && ops.b_texture) {
        let mask = TEXTURE_ROW_TEXELS - 1;
        let shift = TEXTURE_ROW_TEXELS.trailing_zeros();
        return format!(
            "@group(0) @binding({binding}) var {name}: texture_2d<f32>;\n\
             fn load_{name}(i: u32) -> vec4<f32> {{\n    \
             return textureLoad({name}, vec2<u32>(i & {mask}u, i >> {shift}u), 0);\n}}\n"
        );
    }
    let (element, body) = match (dtype, ops.vec4, ops.half) {
        (DType::F16, true, HalfLoads::NativeArithmetic) => ("vec4<f16>", format!("{name}[i]")),
        (DType::F16, false, _) if ops.native_half() => ("f16", format!("f32({name}[i])")),
        (DType::F16, true, _) if ops.native_half() => ("vec4<f16>", format!("vec4<f32>({name}[i])")),
        (DType::F16, false, HalfLoads::Packed) => (
            "u32",
            format!("select(unpack2x16float({name}[i >> 1u]).x, unpack2x16float({name}[i >> 1u]).y, (i & 1u) == 1u)"),
        ),
        (DType::F16, true, HalfLoads::Packed) => (
            "vec2<u32>",
            format!("vec4<f32>(unpack2x16float({name}[i].x), unpack2x16float({name}[i].y))"),
        ),
        (_, false, _) => ("f32", format!("{name}[i]")),
        (_, true, _) => ("vec4<f32>", format!("{name}[i]")),
    };
    let value = match (ops.vec4, ops.half_arithmetic()) {
        (true, true) => "vec4<f16>",
        (true, false) => "vec4<f32>",
        _ => "f32",
    };
    format!(
        "@group(0) @binding({binding}) var<storage, read> {name}: array<{element}>;\n\
         fn load_{name}(i: u32) -> {value} {{\n    return {body};\n}}\n"
    )
}

fn specialise(
    tiling: MatmulTiling,
    trans_a: bool,
    trans_b: bool,
    ops: Operands,
    extras: Extras,
) -> String {
    let vec4 = ops.vec4;
    // Column sums bind after the epilogue's operand; tilings without a block
    // for them are never asked (see `Device::matmul_column_sums`).
    let sums_binding = if extras.epilogue.is_some() { 5 } else { 4 };
    let column_sums = |first: &str, columns: &str| match extras.column_sums {
        Some(_) => column_sums_source(sums_binding, first, columns, &ops, trans_b),
        None => (String::new(), String::new()),
    };
    let mut declarations = String::new();
    let spec = match tiling {
        MatmulTiling::Register { tm, tn, wg_x, wg_y } => {
            let (source, offsets, step) = if vec4 {
                let step = if ops.half_arithmetic() {
                    vec4_half_step(tm, tn, trans_a, trans_b)
                } else {
                    vec4_step(tm, tn, trans_a, trans_b)
                };
                (
                    REGISTER_VEC4_SRC,
                    vec4_offsets(tm, tn, trans_a, trans_b),
                    step,
                )
            } else {
                (
                    REGISTER_SRC,
                    register_offsets(tm, tn),
                    register_step(tm, tn),
                )
            };
            // Each invocation of the first row block sums its own columns.
            let (declaration, sums) = column_sums("row0 == 0u", "var j = 0u; j < TN; j++");
            declarations = declaration;
            Specialize::new(source)
                .constant_u32("TM", tm)
                .constant_u32("TN", tn)
                .constant_u32("WG_X", wg_x)
                .constant_u32("WG_Y", wg_y)
                .replace("OFFSETS", &offsets)
                .replace("STEP", &step)
                .replace("COLUMN_SUMS", &sums)
                .replace("STORE", &register_store(tm, tn))
        }
        MatmulTiling::Subgroup { tm, sg, wg } => {
            // The lanes of the first workgroup of rows share its columns.
            let (declaration, sums) =
                column_sums("wid.y + p.y0 == 0u", "var j = lid.x; j < TN; j += WG");
            declarations = declaration;
            Specialize::new(SUBGROUP_SRC)
                .constant_u32("TM", tm)
                .constant_u32("TN", 4 * sg)
                .constant_u32("SG", sg)
                .constant_u32("WG", wg)
                .replace("OFFSETS", &subgroup_offsets(tm, 4 * sg, trans_a, trans_b))
                .replace("STEP", &subgroup_step(tm, 4 * sg, trans_a, trans_b))
                .replace("COLUMN_SUMS", &sums)
                .replace("STORE", &register_store(tm, 4 * sg))
        }
        MatmulTiling::Shared {
            bm,
            bn,
            bk,
            tm,
            tn,
            pipelined,
            ..
        } => {
            let threads = (bn / tn) * (bm / tm);
            // Both kernels: the block, its depth, each invocation's tile.
            let both = Specialize::new(if vec4 { SHARED_VEC4_SRC } else { SHARED_SRC })
                .constant_u32("BM", bm)
                .constant_u32("BN", bn)
                .constant_u32("BK", bk)
                .constant_u32("TM", tm)
                .constant_u32("TN", tn)
                .constant_u32("WG_X", bn / tn)
                .constant_u32("WG_Y", bm / tm)
                .constant_u32("THREADS", threads);
            if vec4 {
                both.constant_u32("BM4", bm / 4)
                    .constant_u32("BN4", bn / 4)
                    .constant_u32("BK4", bk / 4)
                    .constant_u32("TM4", tm / 4)
                    .constant_u32("TN4", tn / 4)
                    .constant_u32("A_FETCHES", (bk * bm / 4).div_ceil(threads))
                    .constant_u32("B_FETCHES", (bk * bn / 4).div_ceil(threads))
                    .constant_bool("PIPELINED", pipelined)
                    .constant_u32("STAGES", if pipelined { 2 } else { 1 })
                    .constant_bool("HALF_MATH", ops.half_arithmetic())
                    .alias("Tile", if ops.half_arithmetic() { "f16" } else { "f32" })
                    .replace("ACCUMULATORS", &shared_accumulators(tm / 4, tn / 4))
                    .replace(
                        "MULTIPLY",
                        &shared_multiply(tm / 4, tn / 4, ops.half_arithmetic()),
                    )
                    .replace("STORE", &shared_store(tm / 4, tn / 4))
            } else {
                both.replace("ACCUMULATORS", &shared_scalar_accumulators(tm, tn))
                    .replace("MULTIPLY", &shared_scalar_multiply(tm, tn))
                    .replace("STORE", &shared_scalar_store(tm, tn))
            }
        }
    };
    let body = spec
        .constant_bool("TRANS_A", trans_a)
        .constant_bool("TRANS_B", trans_b)
        .build();
    // `enable` must open the module.
    let enable = if ops.native_half() {
        "enable f16;\n"
    } else {
        ""
    };
    let a = operand_source("a", 1, ops.a, &ops);
    let b = operand_source("b", 2, ops.b, &ops);
    let epilogue = epilogue_source(extras.epilogue);
    let c_index = c_index_source(extras.plane);
    format!("{enable}{PARAMS_SRC}\n{a}{b}\n{epilogue}\n{c_index}\n{declarations}\n{body}")
}

const LANES: [&str; 4] = ["x", "y", "z", "w"];

fn zeroed_accumulators(s: &mut String, tm: u32, tn: u32) {
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(s, "    var acc_{i}_{j} = 0.0;");
        }
    }
}

/// vec4 start indices: per row of A (along k) or per group of four rows (along
/// m, when A is transposed); likewise per column or column group of B.
fn vec4_offsets(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_a_offsets(tm, trans_a);
    if trans_b {
        for j in 0..tn {
            let _ = writeln!(
                s,
                "    let b_off_{j} = (b_base + min(col0 + {j}u, p.n - 1u) * p.k) / 4u;"
            );
        }
    } else {
        for q in 0..tn / 4 {
            let _ = writeln!(
                s,
                "    let b_off_{q} = (b_base + min(col0 + {}u, p.n - 4u)) / 4u;",
                4 * q
            );
        }
    }
    zeroed_accumulators(&mut s, tm, tn);
    s
}

/// vec4 start indices of A's rows (along k), or of groups of four rows (along m)
/// when A is transposed.
fn vec4_a_offsets(tm: u32, trans_a: bool) -> String {
    let mut s = String::new();
    if trans_a {
        for g in 0..tm / 4 {
            let _ = writeln!(
                s,
                "    let a_off_{g} = (a_base + min(row0 + {}u, p.m - 4u)) / 4u;",
                4 * g
            );
        }
    } else {
        for i in 0..tm {
            let _ = writeln!(
                s,
                "    let a_off_{i} = (a_base + min(row0 + {i}u, p.m - 1u) * p.k) / 4u;"
            );
        }
    }
    s
}

/// The vec4 loads of A and B for four k steps.
fn vec4_loads(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_a_loads(tm, trans_a);
    if trans_b {
        for j in 0..tn {
            let _ = writeln!(s, "        let b_{j} = load_b(b_off_{j} + kq);");
        }
    } else {
        for t in 0..4 {
            for q in 0..tn / 4 {
                let _ = writeln!(
                    s,
                    "        let b_{t}_{q} = load_b(b_off_{q} + (4u * kq + {t}u) * n4);"
                );
            }
        }
    }
    s
}

/// Four k steps: vec4 loads, then 4 * TM * TN multiply-adds on their lanes,
/// accumulator by accumulator (as in [`subgroup_step`], so a spilled one is
/// loaded and stored once per four k steps: `register:16x16:8x4` at N=1024
/// went from 16 to 17-18 GFLOP/s on lavapipe, 16.6 to 18.2 on llvmpipe's GL).
fn vec4_step(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_loads(tm, tn, trans_a, trans_b);
    for i in 0..tm {
        for j in 0..tn {
            for (t, lane_t) in LANES.iter().enumerate() {
                let a_val = vec4_a_value(i, t, trans_a);
                let b_val = if trans_b {
                    format!("b_{j}.{lane_t}")
                } else {
                    format!("b_{t}_{}.{}", j / 4, LANES[(j % 4) as usize])
                };
                let _ = writeln!(
                    s,
                    "        acc_{i}_{j} = fma({a_val}, {b_val}, acc_{i}_{j});"
                );
            }
        }
    }
    s
}

/// Four k steps in f16 arithmetic: the same loads as [`vec4_step`] (as
/// `vec4<f16>`), then per output one four-term f16 `dot` added to the f32
/// accumulator. Operands loaded along m or n are regathered into vectors
/// along k first.
fn vec4_half_step(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_loads(tm, tn, trans_a, trans_b);
    let along_k = |parts: [String; 4]| format!("vec4<f16>({})", parts.join(", "));
    for i in 0..tm {
        let a_row = if trans_a {
            along_k(std::array::from_fn(|t| vec4_a_value(i, t, true)))
        } else {
            format!("a_{i}")
        };
        let _ = writeln!(s, "        let ak_{i} = {a_row};");
    }
    for j in 0..tn {
        let b_col = if trans_b {
            format!("b_{j}")
        } else {
            along_k(std::array::from_fn(|t| {
                format!("b_{t}_{}.{}", j / 4, LANES[(j % 4) as usize])
            }))
        };
        let _ = writeln!(s, "        let bk_{j} = {b_col};");
    }
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(s, "        acc_{i}_{j} += f32(dot(ak_{i}, bk_{j}));");
        }
    }
    s
}

/// The vec4 loads of A for four k steps.
fn vec4_a_loads(tm: u32, trans_a: bool) -> String {
    let mut s = String::new();
    if trans_a {
        for t in 0..4 {
            for g in 0..tm / 4 {
                let _ = writeln!(
                    s,
                    "        let a_{t}_{g} = load_a(a_off_{g} + (4u * kq + {t}u) * m4);"
                );
            }
        }
    } else {
        for i in 0..tm {
            let _ = writeln!(s, "        let a_{i} = load_a(a_off_{i} + kq);");
        }
    }
    s
}

/// A's value for row `i` at k step `t` of a four-step chunk.
fn vec4_a_value(i: u32, t: usize, trans_a: bool) -> String {
    if trans_a {
        format!("a_{t}_{}.{}", i / 4, LANES[(i % 4) as usize])
    } else {
        format!("a_{i}.{}", LANES[t])
    }
}

/// Offsets for the subgroup kernel: A as in the vec4 kernel; B at the four
/// columns this lane loads for the subgroup.
fn subgroup_offsets(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_a_offsets(tm, trans_a);
    if trans_b {
        for cc in 0..4 {
            let _ = writeln!(
                s,
                "    let b_off_{cc} = (b_base + min(my_col + {cc}u, p.n - 1u) * p.k) / 4u;"
            );
        }
    } else {
        let _ = writeln!(s, "    let b_off = (b_base + min(my_col, p.n - 4u)) / 4u;");
    }
    zeroed_accumulators(&mut s, tm, tn);
    s
}

/// Four k steps of the subgroup kernel: this lane's vec4 loads, then column by
/// column the four broadcasts of that column's B values from the lane that
/// loaded them and the column's `4 * tm` multiply-adds.
///
/// Column by column, not k step by k step: the `tm * tn` accumulators do not
/// fit in registers, and this order loads and stores each spilled one once
/// per four k steps instead of four times. On lavapipe it took the f32
/// product at N=1024 from about 43 to 53 GFLOP/s.
fn subgroup_step(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_a_loads(tm, trans_a);
    for t in 0..4 {
        let _ = if trans_b {
            writeln!(s, "        let bl_{t} = load_b(b_off_{t} + kq);")
        } else {
            writeln!(
                s,
                "        let bl_{t} = load_b(b_off + (4u * kq + {t}u) * n4);"
            )
        };
    }
    for j in 0..tn {
        for (t, lane_t) in LANES.iter().enumerate() {
            let local = if trans_b {
                format!("bl_{}.{lane_t}", j % 4)
            } else {
                format!("bl_{t}.{}", LANES[(j % 4) as usize])
            };
            let _ = writeln!(
                s,
                "        let bv_{t}_{j} = subgroupBroadcast({local}, {}u);",
                j / 4
            );
        }
        for i in 0..tm {
            for t in 0..4 {
                let a_val = vec4_a_value(i, t, trans_a);
                let _ = writeln!(
                    s,
                    "        acc_{i}_{j} = fma({a_val}, bv_{t}_{j}, acc_{i}_{j});"
                );
            }
        }
    }
    s
}

/// Clamped start offsets of the TM rows of A and TN columns of B, and zeroed
/// accumulators.
fn register_offsets(tm: u32, tn: u32) -> String {
    let mut s = String::new();
    for i in 0..tm {
        let _ = writeln!(
            s,
            "    let r_{i} = min(row0 + {i}u, p.m - 1u);\n    \
             let a_off_{i} = a_base + select(r_{i} * p.k, r_{i}, TRANS_A);"
        );
    }
    for j in 0..tn {
        let _ = writeln!(
            s,
            "    let c_{j} = min(col0 + {j}u, p.n - 1u);\n    \
             let b_off_{j} = b_base + select(c_{j}, c_{j} * p.k, TRANS_B);"
        );
    }
    zeroed_accumulators(&mut s, tm, tn);
    s
}

/// One k step: TM + TN loads, TM * TN multiply-adds.
fn register_step(tm: u32, tn: u32) -> String {
    let mut s = String::new();
    for i in 0..tm {
        let _ = writeln!(s, "        let a_{i} = load_a(a_off_{i} + ak);");
    }
    for j in 0..tn {
        let _ = writeln!(s, "        let b_{j} = load_b(b_off_{j} + bk);");
    }
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(s, "        acc_{i}_{j} += a_{i} * b_{j};");
        }
    }
    s
}

/// The shared-memory vec4 kernel's accumulators: `acc_i_e_j` holds row
/// `e` of the invocation's row quad `i` and its column quad `j`.
fn shared_accumulators(tm4: u32, tn4: u32) -> String {
    let mut s = String::new();
    for i in 0..tm4 {
        for e in 0..4 {
            for j in 0..tn4 {
                let _ = writeln!(s, "    var acc_{i}_{e}_{j} = vec4<f32>(0.0);");
            }
        }
    }
    s
}

/// The shared-memory vec4 kernel's multiply of one staged k tile (k steps
/// `sk` on of `a_tiles` and `b_tiles`): a loop over the tile's
/// depth, unrolled inside over the invocation's quads. With `half`, each
/// four k steps of an output are an f16 multiply-add chain added to its f32
/// accumulator, so that loop takes four k steps at a time. (Unrolling the
/// depth as well made the kernels compile 1.5-2.5 times slower on lavapipe,
/// which runs them in CI, to save one loop test per 16 to 64 multiply-adds.)
fn shared_multiply(tm4: u32, tn4: u32, half: bool) -> String {
    // The invocation's column quads of B and row quads of A at k step `kk`,
    // named with `t`.
    let loads = |s: &mut String, kk: &str, t: &str| {
        let step = format!("[sk + {kk}]");
        tile_reads(
            s,
            &format!("b{t}"),
            tn4,
            &format!("b_tiles{step}"),
            "lid.x",
            "WG_X",
        );
        tile_reads(
            s,
            &format!("a{t}"),
            tm4,
            &format!("a_tiles{step}"),
            "lid.y",
            "WG_Y",
        );
    };
    let each_output = |s: &mut String, out: &dyn Fn(&str, u32, &str, u32) -> String| {
        for i in 0..tm4 {
            for (e, lane) in LANES.iter().enumerate() {
                for j in 0..tn4 {
                    let acc = format!("acc_{i}_{e}_{j}");
                    let _ = writeln!(s, "            {}", out(&acc, i, lane, j));
                }
            }
        }
    };
    let mut s = String::new();
    if half {
        s.push_str("        for (var k4 = 0u; k4 < BK; k4 += 4u) {\n");
        for t in 0..4 {
            loads(&mut s, &format!("k4 + {t}u"), &t.to_string());
        }
        each_output(&mut s, &|acc, i, lane, j| {
            let mut part = "vec4<Tile>(0.0)".to_string();
            for t in 0..4 {
                part = format!("fma(vec4<Tile>(a{t}_{i}.{lane}), b{t}_{j}, {part})");
            }
            format!("{acc} += vec4<f32>({part});")
        });
    } else {
        s.push_str("        for (var kk = 0u; kk < BK; kk++) {\n");
        loads(&mut s, "kk", "");
        each_output(&mut s, &|acc, i, lane, j| {
            format!("{acc} = fma(vec4<f32>(a_{i}.{lane}), b_{j}, {acc});")
        });
    }
    s.push_str("        }\n");
    s
}

/// Stores the shared-memory vec4 kernel's accumulators, row by row, through
/// the epilogue (`store_quad` skips what lies past the edge).
fn shared_store(tm4: u32, tn4: u32) -> String {
    let mut s = String::new();
    for i in 0..tm4 {
        for e in 0..4 {
            let _ = writeln!(
                s,
                "    {{\n        let r = row_base + 4u * (lid.y + {i}u * WG_Y) + {e}u;\n        if (r < p.m) {{"
            );
            for j in 0..tn4 {
                let _ = writeln!(
                    s,
                    "            store_quad(c_base, r, col_base + 4u * (lid.x + {j}u * WG_X), acc_{i}_{e}_{j});"
                );
            }
            s.push_str("        }\n    }\n");
        }
    }
    s
}

/// Declares `{name}_{q}` for `q < count`: what the invocation reads from
/// one k step `step` of a k-major shared-memory tile (an array), its `q`-th
/// element (or quad) at `{step}[{first} + q * {stride}]`.
fn tile_reads(s: &mut String, name: &str, count: u32, step: &str, first: &str, stride: &str) {
    for q in 0..count {
        let _ = writeln!(
            s,
            "            let {name}_{q} = {step}[{first} + {q}u * {stride}];"
        );
    }
}

/// The scalar shared-memory kernel's accumulators: `acc_i_j` for the
/// invocation's row `i` and column `j`.
fn shared_scalar_accumulators(tm: u32, tn: u32) -> String {
    let mut s = String::new();
    zeroed_accumulators(&mut s, tm, tn);
    s
}

/// The scalar shared-memory kernel's multiply of one staged k tile: a loop
/// over its depth, unrolled inside over the invocation's rows and columns.
fn shared_scalar_multiply(tm: u32, tn: u32) -> String {
    let mut s = String::from("        for (var kk = 0u; kk < BK; kk++) {\n");
    tile_reads(&mut s, "a", tm, "a_tile[kk]", "lid.y", "WG_Y");
    tile_reads(&mut s, "b", tn, "b_tile[kk]", "lid.x", "WG_X");
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(s, "            acc_{i}_{j} += a_{i} * b_{j};");
        }
    }
    s.push_str("        }\n");
    s
}

/// Stores the scalar shared-memory kernel's accumulators through the
/// epilogue (`store_one` skips what lies outside C).
fn shared_scalar_store(tm: u32, tn: u32) -> String {
    let mut s = String::new();
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(
                s,
                "    store_one(c_base, row_base + lid.y + {i}u * WG_Y, col_base + lid.x + {j}u * WG_X, acc_{i}_{j});"
            );
        }
    }
    s
}

/// Stores the named accumulators `acc_i_j` to C through the epilogue, in one
/// loop over an array of them rather than `tm * tn` unrolled stores. On
/// lavapipe the loop measured 10-20% faster on large products (the unrolled
/// stores' code size hurts the main loop), and the epilogue is compiled once
/// rather than per store (an inlined GELU per store took half a minute to
/// compile). The subgroup and register tilings that use it are CPU-adapter
/// kernels; the shared-memory one stores from an array loop already.
fn register_store(tm: u32, tn: u32) -> String {
    let values: Vec<String> = (0..tm)
        .flat_map(|i| (0..tn).map(move |j| format!("acc_{i}_{j}")))
        .collect();
    let count = tm * tn;
    format!(
        "    var tile = array<f32, {count}>({});\n    \
         for (var e = 0u; e < {count}u; e++) {{\n        \
         let row = row0 + e / {tn}u;\n        \
         let col = col0 + e % {tn}u;\n        \
         if (row < p.m && col < p.n) {{\n            \
         let index = c_base + c_index(row, col);\n            \
         c[index] = epilogue(tile[e], index, col);\n        \
         }}\n    \
         }}\n",
        values.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tuning_fingerprint_follows_the_generated_kernels() {
        let narrow: MatmulTiling = "subgroup:4:8:32".parse().unwrap();
        let wide: MatmulTiling = "subgroup:4:8:64".parse().unwrap();
        let both = kernels_fingerprint(&[narrow, wide]);
        assert_eq!(both, kernels_fingerprint(&[narrow, wide]));
        assert_ne!(kernels_fingerprint(&[narrow]), kernels_fingerprint(&[wide]));
        assert_ne!(kernels_fingerprint(&[narrow]), both);
    }
}
