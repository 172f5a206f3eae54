//! Batched matrix multiply with optional transposes.

use super::{expect_f32, expect_len, to_u32};
use crate::buffer::{DType, GpuBuffer};
use crate::device::Device;
use crate::error::{DeviceError, Result};
use crate::kernel::Specialize;
use crate::tuning::MatmulTiling;
use std::fmt::Write;

const REGISTER_SRC: &str = include_str!("../../../../shaders/matmul_register.wgsl");
const SHARED_SRC: &str = include_str!("../../../../shaders/matmul_shared.wgsl");

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
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub batch_stride_a: usize,
    pub batch_stride_b: usize,
}

impl Matmul {
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

    pub fn transpose_a(mut self, t: bool) -> Self {
        self.trans_a = t;
        self
    }

    pub fn transpose_b(mut self, t: bool) -> Self {
        self.trans_b = t;
        self
    }

    /// Multiply-adds performed, times two.
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.n * self.k) as f64
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
    _pad: u32,
}

impl Device {
    /// Computes `op(A) * op(B)` with this device's tuned tiling.
    pub fn matmul(&self, a: &GpuBuffer, b: &GpuBuffer, spec: &Matmul) -> Result<GpuBuffer> {
        self.matmul_with(a, b, spec, self.tuning().matmul)
    }

    /// Computes `op(A) * op(B)` with an explicit tiling (for tests and tuning).
    pub fn matmul_with(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        tiling: MatmulTiling,
    ) -> Result<GpuBuffer> {
        const OP: &str = "matmul";
        expect_f32(OP, "A", a)?;
        expect_f32(OP, "B", b)?;
        let Matmul { batch, m, n, k, .. } = *spec;
        if batch > 0 {
            expect_len(OP, "A", a, (batch - 1) * spec.batch_stride_a + m * k)?;
            expect_len(OP, "B", b, (batch - 1) * spec.batch_stride_b + k * n)?;
        }
        tiling
            .validate(self.limits())
            .map_err(|message| DeviceError::Shape { op: OP, message })?;
        if k == 0 {
            // An empty sum: C is all zeros.
            return self.zeros(batch * m * n, DType::F32);
        }
        let out = self.empty(batch * m * n, DType::F32)?;
        if out.is_empty() {
            return Ok(out);
        }
        let kernel = self.kernel(
            &format!("{tiling}:{}{}", spec.trans_a, spec.trans_b),
            || specialise(tiling, spec.trans_a, spec.trans_b),
        )?;
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
            _pad: 0,
        };
        // Batches beyond the per-dimension workgroup limit go in several dispatches.
        let max_z = self.limits().max_compute_workgroups_per_dimension as usize;
        let mut z0 = 0;
        while z0 < batch {
            let count = (batch - z0).min(max_z);
            params.z0 = to_u32(OP, "batch", z0)?;
            self.dispatch(
                &kernel,
                bytemuck::bytes_of(&params),
                &[a, b, &out],
                [groups_x, groups_y, count as u32],
            )?;
            z0 += count;
        }
        Ok(out)
    }
}

fn specialise(tiling: MatmulTiling, trans_a: bool, trans_b: bool) -> String {
    let spec = match tiling {
        MatmulTiling::Register { tm, tn, wg_x, wg_y } => Specialize::new(REGISTER_SRC)
            .constant_u32("TM", tm)
            .constant_u32("TN", tn)
            .constant_u32("WG_X", wg_x)
            .constant_u32("WG_Y", wg_y)
            .replace("OFFSETS", &register_offsets(tm, tn))
            .replace("STEP", &register_step(tm, tn))
            .replace("STORE", &register_store(tm, tn)),
        MatmulTiling::Shared {
            bm, bn, bk, tm, tn, ..
        } => Specialize::new(SHARED_SRC)
            .constant_u32("BM", bm)
            .constant_u32("BN", bn)
            .constant_u32("BK", bk)
            .constant_u32("BK_BM", bk * bm)
            .constant_u32("BK_BN", bk * bn)
            .constant_u32("TM", tm)
            .constant_u32("TN", tn)
            .constant_u32("TMN", tm * tn)
            .constant_u32("WG_X", bn / tn)
            .constant_u32("WG_Y", bm / tm)
            .constant_u32("THREADS", (bn / tn) * (bm / tm)),
    };
    spec.constant_bool("TRANS_A", trans_a)
        .constant_bool("TRANS_B", trans_b)
        .build()
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
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(s, "    var acc_{i}_{j} = 0.0;");
        }
    }
    s
}

/// One k step: TM + TN loads, TM * TN multiply-adds.
fn register_step(tm: u32, tn: u32) -> String {
    let mut s = String::new();
    for i in 0..tm {
        let _ = writeln!(s, "        let a_{i} = a[a_off_{i} + ak];");
    }
    for j in 0..tn {
        let _ = writeln!(s, "        let b_{j} = b[b_off_{j} + bk];");
    }
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(s, "        acc_{i}_{j} += a_{i} * b_{j};");
        }
    }
    s
}

fn register_store(tm: u32, tn: u32) -> String {
    let mut s = String::new();
    for i in 0..tm {
        let _ = writeln!(s, "    if (row0 + {i}u < p.m) {{");
        let _ = writeln!(s, "        let c_row_{i} = c_base + (row0 + {i}u) * p.n + col0;");
        for j in 0..tn {
            let _ = writeln!(
                s,
                "        if (col0 + {j}u < p.n) {{ c[c_row_{i} + {j}u] = acc_{i}_{j}; }}"
            );
        }
        let _ = writeln!(s, "    }}");
    }
    s
}
