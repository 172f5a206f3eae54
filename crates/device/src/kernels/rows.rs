//! How row kernels (layer norm, softmax) spread a `rows x cols` matrix over
//! invocations. The kernel is written once over `row_index`, `ROW_LANES` and
//! `row_reduce`; the host appends one of two layouts to it.

use super::grid_2d;
use crate::device::Device;
use crate::error::Result;

/// Helpers for a row kernel written once over `Vec`, the unit it reads rows
/// in: `W` columns per access, `Cols` their column indices, `hmax` / `hsum`
/// across a `Vec`, `lane_of(v, i)` its column `i`, `columns(c)` the column
/// indices of `Vec` number `c`, `row_vecs()` the `Vec`s in a row of
/// `p.cols` columns.
const SCALAR_ROWS: &str = "\
alias Vec = f32;
alias Cols = u32;
const W: u32 = 1u;
fn hmax(v: Vec) -> f32 { return v; }
fn hsum(v: Vec) -> f32 { return v; }
fn lane_of(v: Vec, i: u32) -> f32 { return v; }
fn columns(c: u32) -> Cols { return c; }
fn row_vecs() -> u32 { return p.cols / W; }
";
/// The same helpers over four columns per access.
const VEC4_ROWS: &str = "\
alias Vec = vec4<f32>;
alias Cols = vec4<u32>;
const W: u32 = 4u;
fn hmax(v: Vec) -> f32 { return max(max(v.x, v.y), max(v.z, v.w)); }
fn hsum(v: Vec) -> f32 { return (v.x + v.y) + (v.z + v.w); }
fn lane_of(v: Vec, i: u32) -> f32 { return v[i]; }
fn columns(c: u32) -> Cols { return 4u * c + vec4<u32>(0u, 1u, 2u, 3u); }
fn row_vecs() -> u32 { return p.cols / W; }
";

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

    /// Whether the kernel reads rows of `cols` columns as vec4s: where each
    /// invocation owns its rows (CPU adapters pay per load instruction, not
    /// per byte, and a GPU lane reading a row of its own reads 16 bytes at a
    /// time) and the rows are whole vec4s. Lanes sharing a row stride
    /// through it column by column instead, as many as it has.
    pub(crate) fn reads_vec4(self, cols: usize) -> bool {
        self == Self::PerInvocation && cols % 4 == 0
    }

    /// The width helpers (`Vec`, `W`, ...) for a kernel of `cols` columns
    /// (see [`RowLayout::reads_vec4`]).
    pub(crate) fn width_source(self, cols: usize) -> &'static str {
        match self.reads_vec4(cols) {
            true => VEC4_ROWS,
            false => SCALAR_ROWS,
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
