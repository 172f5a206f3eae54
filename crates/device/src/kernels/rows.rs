//! How row kernels (layer norm, softmax) spread a `rows x cols` matrix over
//! invocations. The kernel is written once over `row_index`, `ROW_LANES` and
//! `row_reduce`; the host appends one of two layouts to it.

use super::grid_2d;
use crate::device::Device;
use crate::error::Result;

const PER_INVOCATION_SRC: &str = include_str!("../../../../shaders/rows_per_invocation.wgsl");
const PER_WORKGROUP_SRC: &str = include_str!("../../../../shaders/rows_per_workgroup.wgsl");

/// Rows per workgroup (a row per invocation), or invocations per row.
pub(crate) const ROW_WORKGROUP: u32 = 64;

/// Which invocations take a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowLayout {
    /// One invocation walks the whole row: no shared memory or barriers,
    /// which CPU adapters pay dearly for.
    PerInvocation,
    /// A workgroup strides along the row (coalesced reads on a GPU) and
    /// merges its lanes' partial results in shared memory.
    PerWorkgroup,
}

impl RowLayout {
    /// The WGSL that defines `row_index`, `ROW_LANES` and `row_reduce`.
    pub(crate) fn source(self) -> &'static str {
        match self {
            Self::PerInvocation => PER_INVOCATION_SRC,
            Self::PerWorkgroup => PER_WORKGROUP_SRC,
        }
    }

    /// The dispatch grid for `rows` rows; kernels read its x extent as
    /// `p.row_groups`.
    pub(crate) fn grid(self, device: &Device, rows: usize) -> Result<[u32; 3]> {
        let workgroups = match self {
            Self::PerInvocation => rows.div_ceil(ROW_WORKGROUP as usize),
            Self::PerWorkgroup => rows,
        };
        grid_2d(
            workgroups as u64,
            device.limits().max_compute_workgroups_per_dimension,
        )
    }
}

impl Device {
    /// GPUs give each row a workgroup, CPU adapters an invocation.
    pub(crate) fn row_layout(&self) -> RowLayout {
        match self.kernels_for_cpu() {
            true => RowLayout::PerInvocation,
            false => RowLayout::PerWorkgroup,
        }
    }
}
