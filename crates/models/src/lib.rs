//! # kiln-models
//!
//! Layers, models and checkpoints for Kiln, built on `kiln-graph`. This crate is
//! being built; for now it only re-exports the device layer it stands on.

pub use kiln_device as device;
