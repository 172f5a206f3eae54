//! Layers: each maps a tensor to a tensor and owns named parameters.

use crate::checkpoint::ModelError;
use kiln_graph::device::UnaryOp;
use kiln_graph::{Conv2d, Device, Padding, Tensor};

/// Whether a forward pass trains (dropout active) and the seed of its random
/// streams; layers that draw random numbers advance `seed`. `mask` carries a
/// `[batch, steps]` padding mask (1 real, 0 padding) from the layer that knows
/// it (an `Embedding` with `mask_zero`) to the sequence layers after it, as
/// Keras propagates masks.
#[derive(Clone, Debug)]
pub struct Mode {
    /// Training mode: dropout active, batch norm uses and updates batch statistics.
    pub training: bool,
    /// Seed of the next random draw; see [`Mode::next_seed`].
    pub seed: u32,
    /// `[batch, steps]` padding mask (1 real, 0 padding) set by an `Embedding`
    /// with `mask_zero`, for the sequence layers after it.
    pub mask: Option<Tensor>,
}

impl Mode {
    /// Training mode, random streams starting from `seed`.
    pub fn training(seed: u32) -> Self {
        Self {
            training: true,
            seed,
            mask: None,
        }
    }

    /// Evaluation (inference) mode: dropout off, batch norm uses its running
    /// statistics.
    pub fn eval() -> Self {
        Self {
            training: false,
            seed: 0,
            mask: None,
        }
    }

    /// The seed for one random draw (a dropout call), advancing `seed` so
    /// consecutive layers and steps get different streams.
    pub fn next_seed(&mut self) -> u32 {
        let seed = self.seed;
        self.seed = seed.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
        seed
    }
}

/// A building block of a model.
pub trait Layer: Send + Sync {
    /// A short kind name (`dense`, `dropout`) for summaries.
    fn kind(&self) -> &'static str;
    /// Applies the layer to a batch `x` (first dimension the batch).
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor, ModelError>;
    /// Parameters with names local to the layer (`weight`, `bias`).
    fn params(&self) -> Vec<(&'static str, Tensor)>;
    /// State that is saved with the model but not trained by gradients, such as
    /// batch-norm running statistics (PyTorch's "buffers").
    fn buffers(&self) -> Vec<(&'static str, Tensor)> {
        Vec::new()
    }
    /// Per-sample output shape for a per-sample input shape, for summaries.
    fn output_shape(&self, input: &[usize]) -> Vec<usize>;
    /// Whether the output is a softmax's probabilities rather than logits
    /// (a training loop whose losses take logits refuses such a model).
    fn outputs_probabilities(&self) -> bool {
        false
    }
    /// Whether the layer reads its input's values on the host (as
    /// [`crate::Embedding`] reads its ids). Kiln's training loop asks a
    /// model's first layer, the one its batches feed, and builds them with
    /// [`Tensor::from_slice_with_host_copy`] when it says so, so the read
    /// does not wait for the device; for other layers the copy would be a
    /// cost for nothing.
    fn reads_input_on_host(&self) -> bool {
        false
    }
}

/// Elementwise activation applied after a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    /// The identity: outputs stay linear (logits).
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
    /// Exact (erf) GELU, `x * Phi(x)`.
    Gelu,
    /// Softmax over the last axis. For training with cross-entropy, prefer
    /// `None` (logits): the loss applies log-softmax itself, stably.
    Softmax,
}

impl Activation {
    /// The activation of `x`, as an op of its own (see
    /// [`Activation::apply_dense`] for the form fused into a layer's product).
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

    /// `activation(x weight + bias)`: one kernel where the activation can
    /// be fused into the product (see [`Tensor::dense`]).
    pub fn apply_dense(
        self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
    ) -> kiln_graph::Result<Tensor> {
        let op = match self {
            Activation::None => None,
            Activation::Softmax => return x.dense(weight, bias, None)?.softmax(),
            Activation::Relu => Some(UnaryOp::Relu),
            Activation::Sigmoid => Some(UnaryOp::Sigmoid),
            Activation::Tanh => Some(UnaryOp::Tanh),
            Activation::Gelu => Some(UnaryOp::Gelu),
        };
        x.dense(weight, bias, op)
    }

    /// `activation(conv2d(x, weight) + bias)`: bias and activation in the
    /// convolution's product kernel where they can be (see
    /// [`Tensor::conv2d_then`]).
    pub fn apply_conv(
        self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        conv: kiln_graph::Conv2d,
    ) -> kiln_graph::Result<Tensor> {
        let op = match self {
            Activation::Relu => UnaryOp::Relu,
            Activation::Sigmoid => UnaryOp::Sigmoid,
            Activation::Tanh => UnaryOp::Tanh,
            Activation::Gelu => UnaryOp::Gelu,
            Activation::None | Activation::Softmax => {
                return self.apply(&x.conv2d(weight, Some(bias), conv)?)
            }
        };
        x.conv2d_then(weight, bias, conv, op)
    }
}

/// An activation on its own is a layer too (Keras's `Activation`), e.g. after
/// a batch normalisation.
impl Layer for Activation {
    fn kind(&self) -> &'static str {
        "activation"
    }

    fn forward(&self, x: &Tensor, _mode: &mut Mode) -> Result<Tensor, ModelError> {
        Ok(self.apply(x)?)
    }

    fn outputs_probabilities(&self) -> bool {
        *self == Activation::Softmax
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        Vec::new()
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        input.to_vec()
    }
}

/// A fully connected layer, `activation(x W + b)`, like Keras's `Dense`.
/// `W` is `[in, out]`, Glorot-uniform initialised; `b` starts at zero.
pub struct Dense {
    /// `[in, out]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
    /// Applied to `x W + b`.
    pub activation: Activation,
}

impl Dense {
    /// A layer from `inputs` to `outputs` features; `seed` drives the weight
    /// initialisation.
    pub fn new(
        device: &Device,
        inputs: usize,
        outputs: usize,
        activation: Activation,
        seed: u64,
    ) -> Result<Self, ModelError> {
        require_positive("Dense", &[("inputs", inputs), ("outputs", outputs)])?;
        let limit = (6.0 / (inputs + outputs) as f32).sqrt();
        Ok(Self {
            weight: Tensor::uniform(device, &[inputs, outputs], -limit, limit, seed)?
                .requires_grad(true),
            bias: Tensor::zeros(device, &[outputs])?.requires_grad(true),
            activation,
        })
    }
}

/// Refuses a layer with a size of 0 (`sizes` names each): it would hold no
/// weights to train, and a product with no outputs helps no one.
pub(crate) fn require_positive(layer: &str, sizes: &[(&str, usize)]) -> Result<(), ModelError> {
    match sizes.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(ModelError::Invalid(format!(
            "{layer}: {name} must be at least 1, got 0"
        ))),
        None => Ok(()),
    }
}

impl Layer for Dense {
    fn kind(&self) -> &'static str {
        "dense"
    }

    fn forward(&self, x: &Tensor, _mode: &mut Mode) -> Result<Tensor, ModelError> {
        Ok(self.activation.apply_dense(x, &self.weight, &self.bias)?)
    }

    fn outputs_probabilities(&self) -> bool {
        self.activation == Activation::Softmax
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        vec![("weight", self.weight.clone()), ("bias", self.bias.clone())]
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        let mut out = input.to_vec();
        if let Some(last) = out.last_mut() {
            *last = self.bias.numel();
        }
        out
    }
}

/// Inverted dropout: active only in training mode.
pub struct Dropout {
    /// Probability of zeroing each element in training; survivors are scaled by
    /// `1 / (1 - p)`.
    pub p: f32,
}

impl Dropout {
    /// Dropout with drop probability `p`.
    pub fn new(p: f32) -> Self {
        Self { p }
    }
}

impl Layer for Dropout {
    fn kind(&self) -> &'static str {
        "dropout"
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor, ModelError> {
        let seed = mode.next_seed();
        Ok(x.dropout(self.p, seed, mode.training)?)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        Vec::new()
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        input.to_vec()
    }
}

/// 2-D convolution over NCHW input, like Keras's `Conv2D` (Glorot-uniform
/// weights `[out, in, kh, kw]`, zero bias).
pub struct Conv2D {
    /// `[out_channels, in_channels, kh, kw]`.
    pub weight: Tensor,
    /// `[out_channels]`.
    pub bias: Tensor,
    /// Stride, padding and dilation.
    pub conv: Conv2d,
    /// Applied after the bias.
    pub activation: Activation,
}

impl Conv2D {
    /// A convolution from `in_channels` to `out_channels` with a `[kh, kw]`
    /// kernel; `seed` drives the weight initialisation. Zero channels, kernel
    /// sizes, strides or dilations are an error.
    pub fn new(
        device: &Device,
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        conv: Conv2d,
        activation: Activation,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let sizes = [
            kernel,
            conv.stride,
            conv.dilation,
            [in_channels, out_channels],
        ];
        if sizes.iter().flatten().any(|&v| v == 0) {
            return Err(ModelError::Invalid(format!(
                "Conv2D: channels {in_channels} -> {out_channels}, kernel {kernel:?}, stride {:?} \
                 and dilation {:?} must all be positive",
                conv.stride, conv.dilation
            )));
        }
        let area = kernel[0] * kernel[1];
        let limit = (6.0 / ((in_channels + out_channels) * area) as f32).sqrt();
        let shape = [out_channels, in_channels, kernel[0], kernel[1]];
        Ok(Self {
            weight: Tensor::uniform(device, &shape, -limit, limit, seed)?.requires_grad(true),
            bias: Tensor::zeros(device, &[out_channels])?.requires_grad(true),
            conv,
            activation,
        })
    }
}

impl Layer for Conv2D {
    fn kind(&self) -> &'static str {
        "conv2d"
    }

    fn forward(&self, x: &Tensor, _mode: &mut Mode) -> Result<Tensor, ModelError> {
        Ok(self
            .activation
            .apply_conv(x, &self.weight, &self.bias, self.conv)?)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        vec![("weight", self.weight.clone()), ("bias", self.bias.clone())]
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        let w = self.weight.shape();
        // A zero kernel or stride is forward's error to report; the summary
        // only must not panic on it.
        let out = |size: usize, d: usize| {
            let span = self.conv.dilation[d] * w[2 + d].saturating_sub(1) + 1;
            (size + 2 * self.conv.padding[d]).saturating_sub(span) / self.conv.stride[d].max(1) + 1
        };
        match input {
            [_, h, wd] => vec![w[0], out(*h, 0), out(*wd, 1)],
            _ => vec![w[0]],
        }
    }
}

/// Window, stride and border handling shared by the pooling layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolWindow {
    /// Window size, `[height, width]`.
    pub kernel: [usize; 2],
    /// Step between windows, `[height, width]`.
    pub stride: [usize; 2],
    /// Border handling: `Valid` (no padding) or `Same` (`ceil(size / stride)`
    /// outputs).
    pub padding: Padding,
}

impl PoolWindow {
    /// Pool size and stride both `size`, no padding: Keras's default.
    pub fn new(size: usize) -> Self {
        Self {
            kernel: [size, size],
            stride: [size, size],
            padding: Padding::Valid,
        }
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        // A zero stride is forward's error to report; the summary only must
        // not panic on it.
        let stride = |d: usize| self.stride[d].max(1);
        let out = |size: usize, d: usize| match self.padding {
            Padding::Valid => size.saturating_sub(self.kernel[d]) / stride(d) + 1,
            Padding::Same => size.div_ceil(stride(d)),
        };
        match input {
            [c, h, w] => vec![*c, out(*h, 0), out(*w, 1)],
            other => other.to_vec(),
        }
    }
}

/// Which reduction a [`Pool2D`] applies to each window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// The window's largest value.
    Max,
    /// With "same" padding, padded cells are not counted in the average.
    Avg,
}

/// Max or average pooling over windows; build it with [`MaxPool2D::new`]
/// (Keras's `MaxPooling2D`) or [`AvgPool2D::new`] (`AveragePooling2D`): `size`
/// x `size` windows, stride `size`, no padding, then `.same()` for
/// `padding="same"` or set `window` for other strides.
pub struct Pool2D {
    /// Max or average.
    pub kind: PoolKind,
    /// Window size, stride and padding.
    pub window: PoolWindow,
}

impl Pool2D {
    /// Keras's `padding="same"`: `ceil(size / stride)` outputs.
    pub fn same(mut self) -> Self {
        self.window.padding = Padding::Same;
        self
    }
}

/// Constructor of max pooling layers: `MaxPool2D::new(2)`.
pub struct MaxPool2D;

impl MaxPool2D {
    #[allow(clippy::new_ret_no_self)] // named like the Keras layer it stands for
    /// Max pooling over `size x size` windows with stride `size`, no padding.
    pub fn new(size: usize) -> Pool2D {
        Pool2D {
            kind: PoolKind::Max,
            window: PoolWindow::new(size),
        }
    }
}

/// Constructor of average pooling layers: `AvgPool2D::new(2)`.
pub struct AvgPool2D;

impl AvgPool2D {
    #[allow(clippy::new_ret_no_self)] // named like the Keras layer it stands for
    /// Average pooling over `size x size` windows with stride `size`, no padding.
    pub fn new(size: usize) -> Pool2D {
        Pool2D {
            kind: PoolKind::Avg,
            window: PoolWindow::new(size),
        }
    }
}

impl Layer for Pool2D {
    fn kind(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "max_pool2d",
            PoolKind::Avg => "avg_pool2d",
        }
    }

    fn forward(&self, x: &Tensor, _mode: &mut Mode) -> Result<Tensor, ModelError> {
        let w = self.window;
        Ok(match self.kind {
            PoolKind::Max => x.max_pool2d_padded(w.kernel, w.stride, w.padding)?,
            PoolKind::Avg => x.avg_pool2d_padded(w.kernel, w.stride, w.padding)?,
        })
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        Vec::new()
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        self.window.output_shape(input)
    }
}

/// Mean over the spatial dims, `[n, c, h, w] -> [n, c]`, like Keras's
/// `GlobalAveragePooling2D`.
pub struct GlobalAvgPool2D;

impl Layer for GlobalAvgPool2D {
    fn kind(&self) -> &'static str {
        "global_avg_pool2d"
    }

    fn forward(&self, x: &Tensor, _mode: &mut Mode) -> Result<Tensor, ModelError> {
        Ok(x.global_avg_pool2d()?)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        Vec::new()
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        input.first().map(|&c| vec![c]).unwrap_or_default()
    }
}

/// Batch normalisation over channels (dim 1) of `[n, c, h, w]` or `[n, c]`
/// input, like PyTorch's `BatchNorm2d` / `BatchNorm1d`.
///
/// Training mode normalises with the batch's statistics and updates the running
/// ones: `running = (1 - momentum) * running + momentum * batch` (PyTorch's
/// convention, the complement of Keras's: momentum 0.1 here is Keras's 0.9,
/// and Keras's default 0.99 is 0.01 here), with the unbiased batch
/// variance. Evaluation mode normalises with the running statistics. `gamma`
/// starts at one, `beta` at zero; the running mean at zero and variance at one.
pub struct BatchNorm2D {
    /// Scale per channel, `[c]`, starting at one.
    pub gamma: Tensor,
    /// Shift per channel, `[c]`, starting at zero.
    pub beta: Tensor,
    /// Running mean per channel, `[c]`, used in evaluation mode (a buffer, not trained).
    pub running_mean: Tensor,
    /// Running (unbiased) variance per channel, `[c]`, used in evaluation mode (a
    /// buffer, not trained).
    pub running_var: Tensor,
    /// Weight of each batch in the running statistics, PyTorch's convention
    /// (default 0.1).
    pub momentum: f32,
    /// Added to the variance before its square root (default 1e-5).
    pub eps: f32,
}

impl BatchNorm2D {
    /// Batch normalisation over `channels` channels with PyTorch's defaults
    /// (momentum 0.1, eps 1e-5).
    pub fn new(device: &Device, channels: usize) -> Result<Self, ModelError> {
        Ok(Self {
            gamma: Tensor::ones(device, &[channels])?.requires_grad(true),
            beta: Tensor::zeros(device, &[channels])?.requires_grad(true),
            running_mean: Tensor::zeros(device, &[channels])?,
            running_var: Tensor::ones(device, &[channels])?,
            momentum: 0.1,
            eps: 1e-5,
        })
    }

    /// Folds a batch's statistics into the running ones, in place (the buffers
    /// keep their identity, so checkpoints and clones see the update).
    fn update_running(
        &self,
        mean: &Tensor,
        variance: &Tensor,
        count: usize,
    ) -> Result<(), ModelError> {
        let _guard = kiln_graph::NoGradGuard::new();
        let m = self.momentum;
        let unbiased = count as f32 / (count.max(2) - 1) as f32;
        let mean = self
            .running_mean
            .mul_scalar(1.0 - m)?
            .add(&mean.detach().mul_scalar(m)?)?;
        let var = self
            .running_var
            .mul_scalar(1.0 - m)?
            .add(&variance.detach().mul_scalar(m * unbiased)?)?;
        self.running_mean.assign(&mean)?;
        self.running_var.assign(&var)?;
        Ok(())
    }
}

impl Layer for BatchNorm2D {
    fn kind(&self) -> &'static str {
        "batch_norm"
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor, ModelError> {
        if !mode.training {
            return Ok(x.batch_norm_eval(
                &self.gamma,
                &self.beta,
                &self.running_mean,
                &self.running_var,
                self.eps,
            )?);
        }
        let out = x.batch_norm_train(&self.gamma, &self.beta, self.eps)?;
        self.update_running(&out.mean, &out.variance, out.count)?;
        Ok(out.output)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        vec![("gamma", self.gamma.clone()), ("beta", self.beta.clone())]
    }

    fn buffers(&self) -> Vec<(&'static str, Tensor)> {
        vec![
            ("running_mean", self.running_mean.clone()),
            ("running_var", self.running_var.clone()),
        ]
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        input.to_vec()
    }
}

/// Merges every dim but the batch: `[n, ...] -> [n, features]`.
pub struct Flatten;

impl Layer for Flatten {
    fn kind(&self) -> &'static str {
        "flatten"
    }

    fn forward(&self, x: &Tensor, _mode: &mut Mode) -> Result<Tensor, ModelError> {
        Ok(x.flatten()?)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        Vec::new()
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        vec![input.iter().product()]
    }
}

/// Gives each sample a shape, e.g. `[784] -> [1, 28, 28]` for a CNN.
pub struct Reshape {
    /// Per-sample output shape; the element count must match the input's.
    pub shape: Vec<usize>,
}

impl Layer for Reshape {
    fn kind(&self) -> &'static str {
        "reshape"
    }

    fn forward(&self, x: &Tensor, _mode: &mut Mode) -> Result<Tensor, ModelError> {
        let mut shape = vec![x.shape().first().copied().unwrap_or(1)];
        shape.extend_from_slice(&self.shape);
        Ok(x.reshape(&shape)?)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        Vec::new()
    }

    fn output_shape(&self, _input: &[usize]) -> Vec<usize> {
        self.shape.clone()
    }
}
