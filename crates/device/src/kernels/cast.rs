//! f32 <-> f16 conversion on the device.

use super::to_u32;
use crate::buffer::{DType, GpuBuffer};
use crate::device::Device;
use crate::error::{DeviceError, Result};
use crate::kernel::Specialize;

const SRC: &str = include_str!("../../../../shaders/cast.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    row_threads: u32,
    _pad: [u32; 2],
}

impl Device {
    /// Converts between f32 and f16 storage (a copy when the types agree).
    /// f16 rounds to nearest even; values beyond its finite range (65504)
    /// become infinities and NaN stays NaN, as IEEE rounding would have it
    /// (loss scaling relies on seeing overflow).
    pub fn cast(&self, x: &GpuBuffer, to: DType) -> Result<GpuBuffer> {
        let from = x.dtype();
        if from == to {
            return self.copy(x);
        }
        let to_half = match (from, to) {
            (DType::F32, DType::F16) => true,
            (DType::F16, DType::F32) => false,
            _ => {
                return Err(DeviceError::Shape {
                    op: "cast",
                    message: format!("cannot convert {from:?} to {to:?}"),
                })
            }
        };
        let out = self.empty(x.len(), to)?;
        if x.is_empty() {
            return Ok(out);
        }
        let invocations = if to_half {
            x.len().div_ceil(2)
        } else {
            x.len()
        };
        let (grid, row_threads) = self.linear_grid(invocations)?;
        let kernel = self.kernel(&format!("cast:{to_half}"), || {
            Specialize::new(SRC)
                .constant_bool("TO_HALF", to_half)
                .build()
        })?;
        let params = Params {
            n: to_u32("cast", "elements", x.len())?,
            row_threads,
            _pad: [0; 2],
        };
        self.dispatch(&kernel, bytemuck::bytes_of(&params), &[x, &out], grid)?;
        Ok(out)
    }
}
