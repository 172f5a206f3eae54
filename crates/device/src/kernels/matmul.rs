//! Batched matrix multiply with optional transposes.

use super::elementwise::{Elementwise, Operand, View};
use super::{expect_f32, expect_len, to_u32};
use crate::binding::Bound;
use crate::buffer::{DType, GpuBuffer};
use crate::device::{Device, Loops, TextureOperands};
use crate::error::{DeviceError, Result};
use crate::tuning::MatmulTiling;
use std::collections::HashMap;
use std::sync::Arc;

mod source;

use source::specialise;

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
    /// Multiply-adds the product takes, over all its batch entries
    /// (`usize::MAX` for extents whose product does not fit: a spec is
    /// checked against its operands only when it runs).
    pub fn multiply_adds(&self) -> usize {
        [self.m, self.n, self.k]
            .iter()
            .fold(self.batch, |acc, &e| acc.saturating_mul(e))
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
        2.0 * self.batch as f64 * self.m as f64 * self.n as f64 * self.k as f64
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

/// How a product's C is stored: through an epilogue, and in planes of rows
/// (see [`Device::matmul_fused_planar`]).
#[derive(Clone, Copy, Default)]
struct Stored<'e> {
    epilogue: Option<&'e Epilogue<'e>>,
    plane: Option<usize>,
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
        self.matmul_with(a, b, spec, self.checked_tiling(a, b, spec)?)
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
        let tiling = self.checked_tiling(a, b, spec)?;
        self.matmul_fused_with(a, b, spec, epilogue, tiling)
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
        let tiling = self.checked_tiling(a, b, spec)?;
        self.matmul_fused_planar_with(a, b, spec, epilogue, plane, tiling)
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
        let tiling = self.checked_tiling(a, b, spec)?;
        self.matmul_column_sums_with(a, b, spec, tiling)
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

    /// [`Device::matmul_tiling`] for operands `a` and `b`, checked against
    /// `spec` first: tuning by shape times a product of that shape, which
    /// must be the one the operands hold (a mistaken spec is an error, not
    /// a product of its size to time).
    fn checked_tiling(&self, a: &GpuBuffer, b: &GpuBuffer, spec: &Matmul) -> Result<MatmulTiling> {
        expect_operands(a, b, spec)?;
        Ok(self.matmul_tiling(spec))
    }

    /// The tiling [`Device::matmul`] runs `spec` with: the one chosen for
    /// its shape where products are tuned by shape (timing the candidates on
    /// it first if it is new; see [`crate::shape_tuning`]), else the tuned
    /// tiling for its size (see [`crate::Tuning`]).
    pub fn matmul_tiling(&self, spec: &Matmul) -> MatmulTiling {
        self.shape_tiling(spec)
            .unwrap_or_else(|| self.default_tiling(spec))
    }

    /// The tuned tiling, except that on CPU adapters a product too small to
    /// be worth spreading over cores takes register tiles (fitted into one
    /// workgroup by `prepare_matmul`), which can chain with its neighbours
    /// into one dispatch (see `Device::together`), and that on GPUs a
    /// product whose output blocks would be too few to fill the device takes
    /// the tiling tuned for small products.
    pub(crate) fn default_tiling(&self, spec: &Matmul) -> MatmulTiling {
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
        expect_operands(a, b, spec)?;
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
                let lanes = spec.m.div_ceil(tm as usize).next_multiple_of(sg as usize) as u32;
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

/// Checks that A and B are float buffers holding what `spec` reads.
fn expect_operands(a: &GpuBuffer, b: &GpuBuffer, spec: &Matmul) -> Result<()> {
    const OP: &str = "matmul";
    expect_float(OP, "A", a)?;
    expect_float(OP, "B", b)?;
    let Matmul { batch, m, k, .. } = *spec;
    if batch > 0 {
        expect_len(OP, "A", a, (batch - 1) * spec.batch_stride_a + m * k)?;
        expect_len(OP, "B", b, (batch - 1) * spec.batch_stride_b + k * spec.n)?;
    }
    Ok(())
}

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
