#![warn(missing_docs)]
//! # Kiln
//!
//! Deep-learning training in Rust on any GPU through wgpu (Vulkan, Metal, DX12),
//! with a CPU adapter (Mesa lavapipe / llvmpipe) where there is no GPU.
//!
//! This crate is the facade: it re-exports the parts a user needs.
//!
//! - [`device`]: adapter selection, buffers and GPU kernels (`kiln-device`).
//! - [`graph`]: tensors and autodiff (`kiln-graph`).
//! - [`models`]: layers and models (`kiln-models`).
//! - [`data`], [`train`], [`zoo`], [`pretrained`]: datasets, the training loop,
//!   ready-made architectures, fine-tuned pretrained classifiers.
//!
//! ```no_run
//! # fn main() -> Result<(), kiln::device::DeviceError> {
//! let device = kiln::Device::new()?; // honours KILN_DEVICE=auto|gpu|cpu[:filter]
//! println!("{}", kiln::device::DeviceReport(&device));
//! # Ok(()) }
//! ```

pub mod data;
pub mod pretrained;
pub mod train;
pub mod zoo;

pub use kiln_device as device;
pub use kiln_graph as graph;
pub use kiln_models as models;

pub use kiln_device::{Device, DeviceError};

/// Compiles the README's Rust examples as doctests so they cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
