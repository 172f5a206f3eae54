//! The reference models of the Keras tutorials Kiln reproduces, by name.

use kiln_graph::Device;
use kiln_models::{Activation, Dense, ModelError, Sequential};

/// Architectures the CLI can build and rebuild from a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Architecture {
    /// Dense(64, relu) -> Dense(64, relu) -> Dense(10) on 784 inputs.
    Mlp,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Mlp => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "mlp" => Some(Architecture::Mlp),
            _ => None,
        }
    }

    /// A freshly initialised model; the output layer gives logits (softmax is
    /// part of the loss, and of `predict`).
    pub fn build(self, device: &Device, seed: u64) -> Result<Sequential, ModelError> {
        match self {
            Architecture::Mlp => mlp(device, 784, 10, seed),
        }
    }
}

/// The Keras MNIST MLP: `inputs -> 64 relu -> 64 relu -> classes`.
pub fn mlp(
    device: &Device,
    inputs: usize,
    classes: usize,
    seed: u64,
) -> Result<Sequential, ModelError> {
    Ok(Sequential::new()
        .push(Dense::new(device, inputs, 64, Activation::Relu, seed)?)
        .push(Dense::new(device, 64, 64, Activation::Relu, seed + 1)?)
        .push(Dense::new(device, 64, classes, Activation::None, seed + 2)?))
}
