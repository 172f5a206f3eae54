//! A stack of layers applied in order.

use crate::checkpoint::{self, ModelError, StagedState};
use crate::layers::{Layer, Mode};
use kiln_graph::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Layers applied one after another. Parameter `p` of layer `i` is named
/// `"{i}.{p}"` (e.g. `0.weight`), as in PyTorch's `nn.Sequential`. Layouts
/// are not all PyTorch's: a [`crate::Dense`] weight is `[in, out]` (Keras's),
/// so a PyTorch `Linear` weight (`[out, in]`) must be transposed to load; a
/// square one would otherwise load without error, transposed.
///
/// ```
/// # fn main() -> Result<(), kiln_models::ModelError> {
/// use kiln_graph::{Device, Tensor};
/// use kiln_models::{Activation, Dense, Mode, Sequential};
/// let device = Device::new()?;
/// // A 4 -> 8 -> 3 MLP giving class probabilities.
/// let model = Sequential::new()
///     .push(Dense::new(&device, 4, 8, Activation::Relu, 1)?)
///     .push(Dense::new(&device, 8, 3, Activation::Softmax, 2)?);
/// assert_eq!(model.parameter_count(), 4 * 8 + 8 + 8 * 3 + 3);
/// assert_eq!(model.named_parameters()[0].0, "0.weight");
///
/// let x = Tensor::from_slice(&device, &[0.5, -1.0, 2.0, 0.0, 1.0, 1.0, -0.5, 3.0], &[2, 4])?;
/// let probs = model.forward(&x, &mut Mode::eval())?;
/// assert_eq!(probs.shape(), &[2, 3]);
/// for row in probs.to_vec()?.chunks(3) {
///     assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
/// }
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct Sequential {
    layers: Vec<Box<dyn Layer>>,
}

impl Sequential {
    /// An empty model; add layers with [`Sequential::push`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a layer (builder style).
    pub fn push(mut self, layer: impl Layer + 'static) -> Self {
        self.layers.push(Box::new(layer));
        self
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }

    /// Runs `x` through every layer in order.
    pub fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor, ModelError> {
        let mut h = x.clone();
        for layer in &self.layers {
            h = layer.forward(&h, mode)?;
        }
        Ok(h)
    }

    /// Every layer's parameters (frozen ones too), named `"{i}.{name}"` (e.g.
    /// `0.weight`), layer by layer.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.named(|layer| layer.params())
    }

    /// Non-trainable state (batch-norm running statistics), named like the
    /// parameters: `"{i}.{name}"`.
    pub fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.named(|layer| layer.buffers())
    }

    /// What `get` returns for each layer, named `"{i}.{name}"`.
    fn named(
        &self,
        get: impl Fn(&dyn Layer) -> Vec<(&'static str, Tensor)>,
    ) -> Vec<(String, Tensor)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, layer)| {
                get(layer.as_ref())
                    .into_iter()
                    .map(move |(name, t)| (format!("{i}.{name}"), t))
            })
            .collect()
    }

    /// Everything a checkpoint holds: parameters, then buffers.
    pub fn named_state(&self) -> Vec<(String, Tensor)> {
        let mut state = self.named_parameters();
        state.extend(self.named_buffers());
        state
    }

    /// Every parameter (frozen ones too, which optimizers skip), in
    /// [`Sequential::named_parameters`] order: what an optimizer takes. A
    /// tensor two layers share (tied weights) is listed once, where it
    /// first appears, as in PyTorch: an optimizer steps each parameter once.
    pub fn parameters(&self) -> Vec<Tensor> {
        let mut unique: Vec<Tensor> = Vec::new();
        for (_, t) in self.named_parameters() {
            if !unique.iter().any(|u| u.same_as(&t)) {
                unique.push(t);
            }
        }
        unique
    }

    /// Freezes (or unfreezes) every parameter of layer `index`: its
    /// parameters get no gradients and optimizers leave them alone. As in
    /// PyTorch, a frozen layer still runs in training mode: a frozen
    /// `BatchNorm2D` normalises with each batch's statistics and keeps
    /// updating its running ones (Keras runs a frozen one in inference mode).
    pub fn set_trainable(&self, index: usize, trainable: bool) -> Result<(), ModelError> {
        let layer = self.layers.get(index).ok_or_else(|| {
            ModelError::Invalid(format!(
                "set_trainable: no layer {index}; the model has {} (counting from 0)",
                self.layers.len()
            ))
        })?;
        for (_, p) in layer.params() {
            p.set_requires_grad(trainable);
        }
        Ok(())
    }

    /// Number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(Tensor::numel).sum()
    }

    /// A Keras-like table of layers, per-sample output shapes and parameter
    /// counts, for samples of shape `input`.
    pub fn summary(&self, input: &[usize]) -> String {
        let mut shape = input.to_vec();
        let rows: Vec<(&str, String, usize)> = self
            .layers
            .iter()
            .map(|layer| {
                shape = layer.output_shape(&shape);
                let params = layer.params().iter().map(|(_, t)| t.numel()).sum();
                (layer.kind(), format!("{shape:?}"), params)
            })
            .collect();
        // Columns as wide as their longest entry (at least `least`), so
        // every row lines up.
        let width = |least: usize, len: fn(&(&str, String, usize)) -> usize| {
            rows.iter().map(len).fold(least, usize::max)
        };
        let kind_width = width(11, |r| r.0.len());
        let dims_width = width(14, |r| r.1.len());
        let mut out = format!(
            "{:<6} {:<kind_width$} {:>dims_width$} {:>10}\n",
            "layer", "kind", "output", "params"
        );
        for (i, (kind, dims, params)) in rows.iter().enumerate() {
            out += &format!("{i:<6} {kind:<kind_width$} {dims:>dims_width$} {params:>10}\n");
        }
        out += &format!("total parameters: {}", self.parameter_count());
        out
    }

    /// Saves the weights and buffers (and `metadata`) to a safetensors file,
    /// atomically.
    pub fn save(
        &self,
        path: impl AsRef<Path>,
        metadata: &HashMap<String, String>,
    ) -> Result<(), ModelError> {
        let mut tensors = Vec::new();
        for (name, t) in self.named_state() {
            tensors.push((name, t.shape().to_vec(), t.to_vec()?));
        }
        checkpoint::save(path.as_ref(), &tensors, metadata)
    }

    /// Loads weights saved by [`Sequential::save`] (or any safetensors file with
    /// the same names and shapes, F32/F16/BF16). Every parameter and buffer must be present
    /// with its shape; extra tensors are an error too, so a checkpoint of another
    /// architecture cannot load silently. Everything is checked before anything
    /// is copied: on an error the model keeps its weights.
    pub fn load_weights(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<HashMap<String, String>, ModelError> {
        let file = checkpoint::Checkpoint::open(path.as_ref())?;
        self.read_state(&file)?.apply()?;
        Ok(file.metadata())
    }

    /// Reads and checks `file`'s weights and buffers for this model (see
    /// [`Sequential::load_weights`]) without changing it; optimizer state
    /// (names starting `optimizer.`) is left to the optimizer.
    pub fn read_state(&self, file: &checkpoint::Checkpoint) -> Result<StagedState, ModelError> {
        let state = self.named_state();
        let expected: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
        file.check_names(&expected, &["optimizer."])?;
        let mut staged = StagedState::default();
        for (name, t) in &state {
            staged.push(t, file.tensor_f32(name, t.shape())?);
        }
        Ok(staged)
    }
}
