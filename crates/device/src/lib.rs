#![warn(missing_docs)]
//! # kiln-device
//!
//! Kiln's GPU layer, on wgpu: it picks an adapter (a GPU, else a CPU adapter such
//! as Mesa lavapipe), opens it with the adapter's real limits, and runs Kiln's WGSL
//! kernels on pooled buffers.
//!
//! - [`Device`]: the opened adapter. Dispatches are recorded and submitted together
//!   at sync points (reads, [`Device::synchronize`]), many per submit.
//! - [`GpuBuffer`]: a pooled storage buffer; dropping it returns it for reuse, so
//!   steady-state training allocates nothing.
//! - Kernels: [`Device::matmul`] (batched, transposes, per-adapter tiling),
//!   [`Device::elementwise`] (one generator for every elementwise op, with
//!   broadcasting), [`Device::reduce`], [`Device::softmax`].
//!
//! ```no_run
//! # fn main() -> Result<(), kiln_device::DeviceError> {
//! use kiln_device::{Device, Matmul, UnaryOp};
//! let device = Device::new()?; // KILN_DEVICE=auto|gpu|cpu[:filter]
//! let a = device.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?; // 2x3
//! let b = device.upload(&[1.0f32, -1.0, 0.5, 2.0, 0.0, 1.0])?; // 3x2
//! let c = device.matmul(&a, &b, &Matmul::new(2, 2, 3))?;
//! let y = device.unary(UnaryOp::Relu, &c)?;
//! println!("{:?}", device.read::<f32>(&y)?);
//! # Ok(()) }
//! ```

mod adapter;
pub mod autotune;
mod binding;
mod buffer;
mod device;
mod error;
mod fusion;
mod info;
mod kernel;
pub mod kernels;
mod pool;
mod profile;
pub mod shape_tuning;
mod tuning;

pub use adapter::{
    is_cpu, kernels_for_cpu, list_adapters, DeviceKind, DeviceSelector, ListedAdapter,
};
pub use autotune::{cache_dir, AutotuneReport};
pub use buffer::{DType, Element, GpuBuffer};
pub use device::{Device, DispatchStats, TextureOperands, MAX_PARAM_BYTES, TEXTURE_ROW_TEXELS};
pub use error::{DeviceError, Result};
pub use half;
pub use info::DeviceReport;
pub use kernel::{Kernel, Specialize};
pub use kernels::conv::ConvGeometry;
pub use kernels::elementwise::{broadcast_shapes, BinaryOp, Elementwise, Operand, UnaryOp, View};
pub use kernels::lstm::{LstmBackward, LstmForward, LstmShape};
pub use kernels::matmul::{Epilogue, EpilogueOperand, HalfLoads, Matmul};
pub use kernels::norm::LayerNormOutput;
pub use kernels::reduce::{Reduce, ReduceOp, ReduceStrategy};
pub use kernels::softmax::{CrossEntropyOutput, SoftmaxInput};
pub use pool::{bucket_size, PoolStats};
pub use profile::KernelTime;
pub use shape_tuning::{
    ShapeTuning, CPU_SHAPE_TUNING_MULTIPLY_ADDS, SHAPE_TUNING_MIN_MULTIPLY_ADDS,
};
pub use tuning::{MatmulTiling, Tuning};
pub use wgpu;

// Devices and their buffers are shared across threads (one device serving
// several training or inference threads): a change that loses Send or Sync
// fails to compile here rather than in users' code.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Device>();
    shareable::<GpuBuffer>();
};
