//! # kiln-graph
//!
//! Tensors on GPU buffers and reverse-mode autodiff for Kiln. This crate is being
//! built on top of [`kiln_device`]; for now it only re-exports the device layer it
//! stands on.

pub use kiln_device as device;
