#![warn(missing_docs)]
//! # kiln-graph
//!
//! Tensors on GPU buffers with reverse-mode automatic differentiation.
//!
//! Every op runs its forward kernel at once (recorded into the device's batch)
//! and, when an input requires gradients, returns a tensor that remembers its
//! inputs and a backward closure. [`Tensor::backward`] walks that graph from a
//! scalar loss in reverse topological order; each backward closure is itself
//! made of GPU ops, so gradients never leave the device.
//!
//! ```text
//!   x ──┐                 forward (GPU kernels, recorded, batched)
//!       ├─ matmul ─ h ─ relu ─ a ─ cross_entropy ─ loss
//!   W ──┘                                            │
//!                         backward(): loss.grad = 1  ▼
//!   W.grad ◀─ matmul' ◀─ h.grad ◀─ relu' ◀─ a.grad ◀─┘
//!                         (GPU kernels too)
//!   optimizer.step(): generated update kernels, in place, up to 8 tensors a dispatch
//! ```
//!
//! The graph is dropped with the last tensor that references it, and with it
//! every intermediate buffer goes back to the device's pool.
//!
//! ```no_run
//! # fn main() -> Result<(), kiln_device::DeviceError> {
//! use kiln_graph::{Device, Tensor};
//! let device = Device::new()?;
//! let w = Tensor::from_slice(&device, &[0.5, -1.0, 2.0], &[3, 1])?.requires_grad(true);
//! let x = Tensor::from_slice(&device, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
//! let loss = x.matmul(&w)?.relu()?.sum_all()?;
//! loss.backward()?;
//! println!("{:?}", w.grad().unwrap().to_vec()?);
//! # Ok(()) }
//! ```

pub mod amp;
mod autograd;
pub mod loss;
mod ops;
pub mod optim;
mod tensor;

pub use autograd::{is_grad_enabled, no_grad, NoGradGuard};
pub use kiln_device as device;
pub use kiln_device::{Device, DeviceError, Elementwise, Result};

/// Evaluates an elementwise expression (see [`Elementwise`]) over tensors with
/// broadcasting, without recording a graph.
pub fn map(op: &Elementwise<'_>, inputs: &[&Tensor]) -> Result<Tensor> {
    ops::arith::map(op, inputs)
}
pub use ops::{BatchNormOutput, Conv2d, Padding};
pub use tensor::{SplitMix64, Tensor};
