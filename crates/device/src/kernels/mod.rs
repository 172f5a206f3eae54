//! Host side of the WGSL kernels in `shaders/`: shape checks, specialisation and
//! dispatch geometry. Each kernel has a CPU reference in the integration tests.

pub mod cast;
pub mod conv;
pub mod elementwise;
pub mod lstm;
pub mod matmul;
pub mod norm;
pub mod reduce;
mod rows;
pub mod softmax;

use crate::buffer::{DType, GpuBuffer};
use crate::error::{DeviceError, Result};

/// Functions every generated expression may call (`kiln_erf`, `kiln_sigmoid`,
/// `kiln_tanh`, `kiln_gelu`, `kiln_pow`, `kiln_uniform`).
pub(crate) const EXPR_HELPERS: &str = concat!(
    include_str!("../../../../shaders/expr_helpers.wgsl"),
    "\nalias TanhT = f32;\n",
    include_str!("../../../../shaders/tanh.wgsl"),
);

/// Invocations per workgroup for one-element-per-invocation kernels.
pub(crate) const LINEAR_WORKGROUP: u32 = 256;

/// Cores of the host: a CPU adapter runs each workgroup on one of its
/// threads, one per core, so kernels size their grids to keep all busy.
pub(crate) fn host_cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Splits `groups` workgroups over x and y so neither exceeds the per-dimension
/// limit; kernels rebuild the linear index as `y * x_count + x`.
pub(crate) fn grid_2d(groups: u64, max_per_dim: u32) -> Result<[u32; 3]> {
    let max = u64::from(max_per_dim);
    let x = groups.min(max);
    let y = if x == 0 { 0 } else { groups.div_ceil(x) };
    if y > max {
        return Err(DeviceError::Shape {
            op: "dispatch",
            message: format!("{groups} workgroups do not fit a {max} x {max} grid"),
        });
    }
    Ok([x as u32, y as u32, 1])
}

/// Refuses a buffer that does not hold f32 for a kernel that reads it as
/// f32 (an f16 buffer would be read as garbage): `op` and `name` say which
/// operation and operand.
pub fn expect_f32(op: &'static str, name: &str, b: &GpuBuffer) -> Result<()> {
    if b.dtype() == DType::F32 {
        Ok(())
    } else {
        Err(DeviceError::Shape {
            op,
            message: format!("{name} must hold f32, it holds {:?}", b.dtype()),
        })
    }
}

pub(crate) fn expect_len(op: &'static str, name: &str, b: &GpuBuffer, needed: usize) -> Result<()> {
    if b.len() >= needed {
        Ok(())
    } else {
        Err(DeviceError::Shape {
            op,
            message: format!(
                "{name} holds {} elements but the shape needs {needed}",
                b.len()
            ),
        })
    }
}

/// Converts a size to the u32 the kernels index with, or explains why it can't.
pub(crate) fn to_u32(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| DeviceError::Shape {
        op,
        message: format!("{what} = {v} exceeds the 32-bit indexing of Kiln kernels"),
    })
}

impl crate::Device {
    /// Dispatch geometry for a kernel with one invocation per element and
    /// workgroups of 256: the grid, and the invocations per grid row (`row_threads`)
    /// from which the kernel rebuilds its index as `gid.y * row_threads + gid.x`.
    pub fn linear_grid(&self, elements: usize) -> Result<([u32; 3], u32)> {
        let groups = (elements as u64).div_ceil(u64::from(LINEAR_WORKGROUP));
        let grid = grid_2d(groups, self.limits().max_compute_workgroups_per_dimension)?;
        Ok((grid, grid[0] * LINEAR_WORKGROUP))
    }
}
