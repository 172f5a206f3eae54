//! Layers: each maps a tensor to a tensor and owns named parameters.

use crate::checkpoint::ModelError;
use kiln_graph::{Device, Tensor};

/// Whether a forward pass trains (dropout active) and the seed of its random
/// streams. Layers that draw random numbers advance `seed`.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    pub training: bool,
    pub seed: u32,
}

impl Mode {
    pub fn training(seed: u32) -> Self {
        Self {
            training: true,
            seed,
        }
    }

    pub fn eval() -> Self {
        Self {
            training: false,
            seed: 0,
        }
    }
}

/// A building block of a model.
pub trait Layer: Send + Sync {
    /// A short kind name (`dense`, `dropout`) for summaries.
    fn kind(&self) -> &'static str;
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor, ModelError>;
    /// Parameters with names local to the layer (`weight`, `bias`).
    fn params(&self) -> Vec<(&'static str, Tensor)>;
    /// Output shape for an input of `input` features, for summaries.
    fn output_features(&self, input: usize) -> usize;
}

/// Elementwise activation applied after a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    None,
    Relu,
    Sigmoid,
    Tanh,
    Gelu,
    /// Softmax over the last axis. For training with cross-entropy, prefer
    /// `None` (logits): the loss applies log-softmax itself, stably.
    Softmax,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> kiln_graph::Result<Tensor> {
        match self {
            Activation::None => Ok(x.clone()),
            Activation::Relu => x.relu(),
            Activation::Sigmoid => x.sigmoid(),
            Activation::Tanh => x.tanh(),
            Activation::Gelu => x.gelu(),
            Activation::Softmax => x.softmax(),
        }
    }
}

/// A fully connected layer, `activation(x W + b)`, like Keras's `Dense`.
/// `W` is `[in, out]`, Glorot-uniform initialised; `b` starts at zero.
pub struct Dense {
    pub weight: Tensor,
    pub bias: Tensor,
    pub activation: Activation,
}

impl Dense {
    pub fn new(
        device: &Device,
        inputs: usize,
        outputs: usize,
        activation: Activation,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let limit = (6.0 / (inputs + outputs) as f32).sqrt();
        Ok(Self {
            weight: Tensor::uniform(device, &[inputs, outputs], -limit, limit, seed)?
                .requires_grad(true),
            bias: Tensor::zeros(device, &[outputs])?.requires_grad(true),
            activation,
        })
    }
}

impl Layer for Dense {
    fn kind(&self) -> &'static str {
        "dense"
    }

    fn forward(&self, x: &Tensor, _mode: &mut Mode) -> Result<Tensor, ModelError> {
        let y = x.matmul(&self.weight)?.add(&self.bias)?;
        Ok(self.activation.apply(&y)?)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        vec![("weight", self.weight.clone()), ("bias", self.bias.clone())]
    }

    fn output_features(&self, _input: usize) -> usize {
        self.bias.numel()
    }
}

/// Inverted dropout: active only in training mode.
pub struct Dropout {
    pub p: f32,
}

impl Dropout {
    pub fn new(p: f32) -> Self {
        Self { p }
    }
}

impl Layer for Dropout {
    fn kind(&self) -> &'static str {
        "dropout"
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor, ModelError> {
        let seed = mode.seed;
        // A new stream per dropout call: consecutive layers and steps differ.
        mode.seed = mode
            .seed
            .wrapping_mul(747_796_405)
            .wrapping_add(2_891_336_453);
        Ok(x.dropout(self.p, seed, mode.training)?)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        Vec::new()
    }

    fn output_features(&self, input: usize) -> usize {
        input
    }
}
