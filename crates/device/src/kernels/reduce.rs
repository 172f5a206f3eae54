//! Sum, mean, max and min over one axis.

use super::{expect_f32, expect_len, grid_2d, to_u32, LINEAR_WORKGROUP};
use crate::buffer::{DType, GpuBuffer};
use crate::device::Device;
use crate::error::{DeviceError, Result};
use crate::kernel::Specialize;

const THREAD_SRC: &str = include_str!("../../../../shaders/reduce_thread.wgsl");
const WORKGROUP_SRC: &str = include_str!("../../../../shaders/reduce_workgroup.wgsl");
const REDUCE_WORKGROUP: u32 = 256;
/// Below this many outputs a CPU adapter reduces in workgroups of 8 (see
/// `Device::reduce_with`).
const THREAD_SPLIT_OUTPUTS: usize = 2048;

/// How a reduction combines the values along its axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum; 0 over an empty axis.
    Sum,
    /// Arithmetic mean.
    Mean,
    /// Largest value; an error over an empty axis.
    Max,
    /// Smallest value; an error over an empty axis.
    Min,
}

impl ReduceOp {
    fn init(self) -> &'static str {
        match self {
            ReduceOp::Sum | ReduceOp::Mean => "0.0",
            ReduceOp::Max => "-3.4028235e38",
            ReduceOp::Min => "3.4028235e38",
        }
    }

    fn combine(self) -> &'static str {
        match self {
            ReduceOp::Sum | ReduceOp::Mean => "acc + v",
            ReduceOp::Max => "max(acc, v)",
            ReduceOp::Min => "min(acc, v)",
        }
    }
}

/// Which kernel a reduction uses; [`ReduceStrategy::Auto`] picks by shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReduceStrategy {
    /// A workgroup per output for few, long reductions (`len >= 512`, under
    /// 4096 outputs, not strided on a CPU adapter), else one invocation per output.
    #[default]
    Auto,
    /// One invocation per output.
    Thread,
    /// One workgroup per output.
    Workgroup,
}

/// A reduction of the middle axis of a contiguous `[outer, len, inner]` view; the
/// result is `[outer, inner]`. Any single axis of a row-major tensor is such a
/// view: `outer` is the product of the dims before it, `inner` of those after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reduce {
    /// How values are combined.
    pub op: ReduceOp,
    /// Product of the dimensions before the reduced axis.
    pub outer: usize,
    /// Length of the reduced axis.
    pub len: usize,
    /// Product of the dimensions after the reduced axis.
    pub inner: usize,
}

impl Reduce {
    /// The reduction of `axis` of a tensor of shape `shape`.
    pub fn axis(op: ReduceOp, shape: &[usize], axis: usize) -> Result<Self> {
        if axis >= shape.len() {
            return Err(DeviceError::Shape {
                op: "reduce",
                message: format!("axis {axis} out of range for shape {shape:?}"),
            });
        }
        Ok(Self {
            op,
            outer: shape[..axis].iter().product(),
            len: shape[axis],
            inner: shape[axis + 1..].iter().product(),
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    outer: u32,
    len: u32,
    inner: u32,
    row: u32,
    scale: f32,
    _pad: [u32; 3],
}

impl Device {
    /// Reduces one axis; see [`Reduce`].
    pub fn reduce(&self, x: &GpuBuffer, spec: &Reduce) -> Result<GpuBuffer> {
        self.reduce_with(x, spec, ReduceStrategy::Auto)
    }

    /// Reduces one axis with an explicit kernel choice (for tests and tuning).
    pub fn reduce_with(
        &self,
        x: &GpuBuffer,
        spec: &Reduce,
        strategy: ReduceStrategy,
    ) -> Result<GpuBuffer> {
        const OP: &str = "reduce";
        expect_f32(OP, "input", x)?;
        let outputs = spec.outer * spec.inner;
        expect_len(OP, "input", x, outputs * spec.len)?;
        if spec.len == 0 && matches!(spec.op, ReduceOp::Max | ReduceOp::Min) {
            return Err(DeviceError::Shape {
                op: OP,
                message: "max/min over an empty axis has no value".into(),
            });
        }
        let out = self.empty(outputs, DType::F32)?;
        if outputs == 0 {
            return Ok(out);
        }
        // A workgroup per output gives few, long reductions the parallelism a
        // GPU needs. On a CPU adapter a strided one (columns: `inner > 1`) is
        // better walked by one invocation per output, neighbouring lanes
        // reading neighbouring elements: 310 against 2,840 us for the column
        // sums of a [1024, 384] matrix on lavapipe.
        let strided_on_cpu = spec.inner > 1 && self.kernels_for_cpu();
        let strategy = match strategy {
            ReduceStrategy::Auto if spec.len >= 512 && outputs < 4096 && !strided_on_cpu => {
                ReduceStrategy::Workgroup
            }
            ReduceStrategy::Auto => ReduceStrategy::Thread,
            s => s,
        };
        let finish = if spec.op == ReduceOp::Mean {
            "acc * p.scale"
        } else {
            "acc"
        };
        // A CPU adapter runs a workgroup on one thread: few outputs (a conv
        // bias gradient's 32 channels over 21,632 rows) in one workgroup of
        // 256 would leave the other cores idle, so there they go in
        // workgroups of 8, one SIMD batch of lavapipe's.
        let thread_group = match self.kernels_for_cpu() && outputs < THREAD_SPLIT_OUTPUTS {
            true => 8,
            false => LINEAR_WORKGROUP,
        };
        let (source, per_group) = match strategy {
            ReduceStrategy::Workgroup => (WORKGROUP_SRC, 1),
            _ => (THREAD_SRC, thread_group),
        };
        let key = format!("reduce:{strategy:?}:{:?}:{per_group}", spec.op);
        let kernel = self.kernel(&key, || {
            Specialize::new(source)
                .constant("INIT", "f32", spec.op.init())
                .constant_u32("WG", REDUCE_WORKGROUP)
                .constant_u32("TWG", thread_group)
                .replace("COMBINE", spec.op.combine())
                .replace("FINISH", finish)
                .build()
        })?;
        let groups = (outputs as u64).div_ceil(u64::from(per_group));
        let grid = grid_2d(groups, self.limits().max_compute_workgroups_per_dimension)?;
        let params = Params {
            outer: to_u32(OP, "outer", spec.outer)?,
            len: to_u32(OP, "len", spec.len)?,
            inner: to_u32(OP, "inner", spec.inner)?,
            row: grid[0] * per_group,
            scale: 1.0 / spec.len.max(1) as f32,
            _pad: [0; 3],
        };
        self.dispatch(&kernel, bytemuck::bytes_of(&params), &[x, &out], grid)?;
        Ok(out)
    }
}
