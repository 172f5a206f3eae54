//! The reference models of the Keras tutorials Kiln reproduces, by name.

use kiln_graph::Conv2d;
use kiln_graph::Device;
use kiln_models::{
    Activation, AttentionPooling, Conv2D, Dense, Embedding, Flatten, Lstm, MaxPool2D, ModelError,
    Reshape, Sequential,
};

/// Architectures the CLI can build and rebuild from a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Architecture {
    /// Dense(64, relu) -> Dense(64, relu) -> Dense(10) on 784 inputs.
    Mlp,
    /// Conv(32, 3x3, relu) -> MaxPool 2 -> Conv(64, 3x3, relu) -> MaxPool 2 ->
    /// Conv(64, 3x3, relu) -> Flatten -> Dense(64, relu) -> Dense(10), on 28x28x1.
    Cnn,
    /// Embedding(10000, 32, padding masked) -> LSTM(64) -> Dense(64, relu) ->
    /// Dense(2), on 200 token ids (the Keras IMDB sentiment classifier).
    Lstm,
    /// Embedding(10000, 32, masked) -> LSTM(128, return_sequences) -> LSTM(128)
    /// -> Dense(64, relu) -> Dense(2).
    LstmStacked,
    /// Embedding(10000, 32, masked) -> LSTM(64, return_sequences) -> attention
    /// pooling -> Dense(64, relu) -> Dense(2).
    LstmAttention,
}

/// Vocabulary of the reference text models (padding and unknown included).
pub const TEXT_VOCAB: usize = 10_000;
/// Tokens per review the reference text models read.
pub const TEXT_LENGTH: usize = 200;

impl Architecture {
    /// The name used on the command line and in checkpoint metadata (`"mlp"`,
    /// `"lstm-stacked"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Mlp => "mlp",
            Architecture::Cnn => "cnn",
            Architecture::Lstm => "lstm",
            Architecture::LstmStacked => "lstm-stacked",
            Architecture::LstmAttention => "lstm-attention",
        }
    }

    /// The architecture [`Architecture::name`] calls `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "mlp" => Some(Architecture::Mlp),
            "cnn" => Some(Architecture::Cnn),
            "lstm" => Some(Architecture::Lstm),
            "lstm-stacked" => Some(Architecture::LstmStacked),
            "lstm-attention" => Some(Architecture::LstmAttention),
            _ => None,
        }
    }

    /// A freshly initialised model; the output layer gives logits (softmax is
    /// part of the loss, and of `predict`).
    pub fn build(self, device: &Device, seed: u64) -> Result<Sequential, ModelError> {
        match self {
            Architecture::Mlp => mlp(device, 784, 10, seed),
            Architecture::Cnn => cnn(device, 10, seed),
            Architecture::Lstm => lstm_classifier(device, TEXT_VOCAB, 32, 64, seed),
            Architecture::LstmStacked => text_classifier(
                device,
                TEXT_VOCAB,
                32,
                TextEncoder::Stacked { units: 128 },
                seed,
            ),
            Architecture::LstmAttention => text_classifier(
                device,
                TEXT_VOCAB,
                32,
                TextEncoder::Attention { units: 64 },
                seed,
            ),
        }
    }

    /// Whether the model reads token ids (text) rather than pixels.
    pub fn reads_text(self) -> bool {
        matches!(
            self,
            Architecture::Lstm | Architecture::LstmStacked | Architecture::LstmAttention
        )
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
        .push(Dense::new(
            device,
            64,
            64,
            Activation::Relu,
            seed.wrapping_add(1),
        )?)
        .push(Dense::new(
            device,
            64,
            classes,
            Activation::None,
            seed.wrapping_add(2),
        )?))
}

/// The Keras MNIST CNN on 28x28 single-channel images (flattened input).
pub fn cnn(device: &Device, classes: usize, seed: u64) -> Result<Sequential, ModelError> {
    let k3 = [3, 3];
    let valid = Conv2d::default();
    let model = Sequential::new()
        .push(Reshape {
            shape: vec![1, 28, 28],
        })
        .push(Conv2D::new(
            device,
            1,
            32,
            k3,
            valid,
            Activation::Relu,
            seed,
        )?)
        .push(MaxPool2D::new(2))
        .push(Conv2D::new(
            device,
            32,
            64,
            k3,
            valid,
            Activation::Relu,
            seed.wrapping_add(1),
        )?)
        .push(MaxPool2D::new(2))
        .push(Conv2D::new(
            device,
            64,
            64,
            k3,
            valid,
            Activation::Relu,
            seed.wrapping_add(2),
        )?)
        .push(Flatten);
    dense_head(model, device, 3 * 3 * 64, classes, seed)
}

/// The reference models' classifier head on `inputs` features: Dense(64,
/// relu) -> Dense(classes), seeded from `seed + 3` and `seed + 4`.
fn dense_head(
    model: Sequential,
    device: &Device,
    inputs: usize,
    classes: usize,
    seed: u64,
) -> Result<Sequential, ModelError> {
    let hidden = Dense::new(device, inputs, 64, Activation::Relu, seed.wrapping_add(3))?;
    let logits = Dense::new(device, 64, classes, Activation::None, seed.wrapping_add(4))?;
    Ok(model.push(hidden).push(logits))
}

/// A small CNN for quick checks: Conv(8, 3x3, relu) -> MaxPool 2 -> Dense(classes).
pub fn tiny_cnn(device: &Device, classes: usize, seed: u64) -> Result<Sequential, ModelError> {
    Ok(Sequential::new()
        .push(Reshape {
            shape: vec![1, 28, 28],
        })
        .push(Conv2D::new(
            device,
            1,
            8,
            [3, 3],
            Conv2d::default(),
            Activation::Relu,
            seed,
        )?)
        .push(MaxPool2D::new(2))
        .push(Flatten)
        .push(Dense::new(
            device,
            8 * 13 * 13,
            classes,
            Activation::None,
            seed.wrapping_add(1),
        )?))
}

/// How a text classifier turns embedded tokens into one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextEncoder {
    /// One LSTM, its last state.
    Lstm {
        /// Hidden units of the LSTM.
        units: usize,
    },
    /// Two LSTMs, the first returning its whole sequence to the second.
    Stacked {
        /// Hidden units of each LSTM.
        units: usize,
    },
    /// One LSTM returning its sequence, pooled by attention.
    Attention {
        /// Hidden units of the LSTM.
        units: usize,
    },
}

/// `Embedding(vocab, dim)` with id 0 masked as padding -> `encoder` ->
/// `Dense(64, relu)` -> `Dense(2)` logits (negative, positive).
pub fn text_classifier(
    device: &Device,
    vocab: usize,
    dim: usize,
    encoder: TextEncoder,
    seed: u64,
) -> Result<Sequential, ModelError> {
    let model = Sequential::new().push(Embedding::new(device, vocab, dim, seed)?.mask_zero());
    let (model, units) = match encoder {
        TextEncoder::Lstm { units } => (
            model.push(Lstm::new(device, dim, units, seed.wrapping_add(1))?),
            units,
        ),
        TextEncoder::Stacked { units } => (
            model
                .push(Lstm::new(device, dim, units, seed.wrapping_add(1))?.return_sequences())
                .push(Lstm::new(device, units, units, seed.wrapping_add(2))?),
            units,
        ),
        TextEncoder::Attention { units } => (
            model
                .push(Lstm::new(device, dim, units, seed.wrapping_add(1))?.return_sequences())
                .push(AttentionPooling::new(device, units, seed.wrapping_add(2))?),
            units,
        ),
    };
    dense_head(model, device, units, 2, seed)
}

/// The Keras IMDB classifier: `Embedding(vocab, dim)` with id 0 masked as
/// padding -> `LSTM(units)` -> `Dense(64, relu)` -> `Dense(2)`.
pub fn lstm_classifier(
    device: &Device,
    vocab: usize,
    dim: usize,
    units: usize,
    seed: u64,
) -> Result<Sequential, ModelError> {
    text_classifier(device, vocab, dim, TextEncoder::Lstm { units }, seed)
}
