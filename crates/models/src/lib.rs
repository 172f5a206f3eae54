#![warn(missing_docs)]
//! # kiln-models
//!
//! Layers, models and checkpoints for Kiln, on top of `kiln-graph`.
//!
//! - [`layers`]: [`Dense`], [`Conv2D`], [`MaxPool2D`], [`AvgPool2D`],
//!   [`GlobalAvgPool2D`], [`BatchNorm2D`], [`Flatten`], [`Reshape`], [`Dropout`]
//!   and the [`Layer`] trait; [`Embedding`], [`Lstm`] and [`AttentionPooling`] for
//!   token sequences.
//! - [`Sequential`]: a stack of layers, Keras style, with named parameters
//!   (`0.weight`, `0.bias`, ...), freezing, and safetensors save/load; a load
//!   checks every tensor before copying any, so a bad file changes nothing.
//! - [`bert`]: BERT encoders loaded from Hugging Face checkpoints.
//! - [`checkpoint`]: safetensors files written atomically (temporary file, then
//!   rename), so an interrupted save never replaces a good checkpoint.
//!
//! ```no_run
//! # fn main() -> Result<(), kiln_models::ModelError> {
//! use kiln_models::{Activation, Dense, Sequential};
//! let device = kiln_graph::Device::new()?;
//! let model = Sequential::new()
//!     .push(Dense::new(&device, 784, 64, Activation::Relu, 1)?)
//!     .push(Dense::new(&device, 64, 10, Activation::None, 2)?);
//! model.save("mlp.safetensors", &Default::default())?;
//! # Ok(()) }
//! ```

pub mod bert;
pub mod checkpoint;
pub mod layers;
mod sequence;
mod sequential;

pub use checkpoint::ModelError;
pub use layers::{
    Activation, AvgPool2D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, Layer,
    MaxPool2D, Mode, Pool2D, PoolKind, PoolWindow, Reshape,
};
pub use sequence::{AttentionPooling, Embedding, Lstm};
pub use sequential::Sequential;
