//! Layers over token sequences: [`Embedding`] (ids to vectors, optionally
//! masking padding), [`Lstm`] and [`AttentionPooling`].

use crate::checkpoint::ModelError;
use crate::layers::{require_positive, Layer, Mode};
use kiln_graph::{Device, SplitMix64, Tensor};

/// Maps integer ids (given as f32 values, the way datasets hold features) to
/// rows of a `[vocab, dim]` table, like Keras's `Embedding` (uniform
/// initialisation in [-0.05, 0.05]). With `mask_zero`, id 0 is padding: the
/// layer puts a `[batch, steps]` mask in [`Mode::mask`] for the layers after it.
///
/// The ids are needed on the host, where the backward pass groups repeated
/// ids (a scatter-add without atomics). Batches built with
/// [`Tensor::from_slice_with_host_copy`] (as `fit` builds them for a model
/// that starts with an embedding: see [`Layer::reads_input_on_host`]) carry them
/// there; other inputs are read back, a wait for the device once per batch.
pub struct Embedding {
    /// `[vocab, dim]` embedding vectors, one row per id.
    pub table: Tensor,
    /// Whether id 0 is padding; see [`Embedding::mask_zero`].
    pub mask_zero: bool,
}

impl Embedding {
    /// A `[vocab, dim]` table, uniform in [-0.05, 0.05] from `seed`, no masking.
    pub fn new(device: &Device, vocab: usize, dim: usize, seed: u64) -> Result<Self, ModelError> {
        require_positive("Embedding", &[("vocab", vocab), ("dim", dim)])?;
        Ok(Self {
            table: Tensor::uniform(device, &[vocab, dim], -0.05, 0.05, seed)?.requires_grad(true),
            mask_zero: false,
        })
    }

    /// Treat id 0 as padding and mask it for later layers.
    pub fn mask_zero(mut self) -> Self {
        self.mask_zero = true;
        self
    }
}

impl Layer for Embedding {
    fn reads_input_on_host(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "embedding"
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor, ModelError> {
        let values = x.to_vec()?;
        let vocab = self.table.shape()[0];
        let mut ids = Vec::with_capacity(values.len());
        for &v in &values {
            if v < 0.0 || v.fract() != 0.0 || v as usize >= vocab {
                return Err(ModelError::Invalid(format!(
                    "embedding: input {v} is not an id below the vocabulary size {vocab}"
                )));
            }
            ids.push(v as u32);
        }
        if self.mask_zero {
            let mask: Vec<f32> = ids.iter().map(|&id| f32::from(id != 0)).collect();
            mode.mask = Some(Tensor::from_slice(x.device(), &mask, x.shape())?);
        }
        Ok(self.table.embedding(&ids, x.shape())?)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        vec![("table", self.table.clone())]
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        let mut out = input.to_vec();
        out.push(self.table.shape()[1]);
        out
    }
}

/// A long short-term memory layer over `[batch, steps, features]`, like
/// Keras's `LSTM`: Glorot-uniform input weights, orthogonal recurrent weights,
/// zero bias except 1 for the forget gate. Returns the last step's state
/// `[batch, units]`, or every step's with `return_sequences`. Honours the
/// padding mask in [`Mode::mask`] (masked steps keep the state).
pub struct Lstm {
    /// `[features, 4 * units]`, gates in the order input, forget, cell, output.
    pub w_ih: Tensor,
    /// `[units, 4 * units]`.
    pub w_hh: Tensor,
    /// `[4 * units]`.
    pub bias: Tensor,
    /// Return every step's state, `[batch, steps, units]`, instead of the last one.
    pub return_sequences: bool,
}

impl Lstm {
    /// An LSTM from `features` inputs per step to `units` hidden units, returning
    /// the last state; `seed` drives the initialisation.
    pub fn new(
        device: &Device,
        features: usize,
        units: usize,
        seed: u64,
    ) -> Result<Self, ModelError> {
        require_positive("Lstm", &[("features", features), ("units", units)])?;
        let limit = (6.0 / (features + 4 * units) as f32).sqrt();
        let mut bias = vec![0.0f32; 4 * units];
        bias[units..2 * units].fill(1.0);
        Ok(Self {
            w_ih: Tensor::uniform(device, &[features, 4 * units], -limit, limit, seed)?
                .requires_grad(true),
            w_hh: Tensor::from_slice(
                device,
                &orthogonal_rows(units, 4 * units, seed.wrapping_add(1)),
                &[units, 4 * units],
            )?
            .requires_grad(true),
            bias: Tensor::from_slice(device, &bias, &[4 * units])?.requires_grad(true),
            return_sequences: false,
        })
    }

    /// Return every step's state (`[batch, steps, units]`), e.g. to stack LSTMs.
    pub fn return_sequences(mut self) -> Self {
        self.return_sequences = true;
        self
    }

    fn units(&self) -> usize {
        self.w_hh.shape()[0]
    }
}

impl Layer for Lstm {
    fn kind(&self) -> &'static str {
        "lstm"
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor, ModelError> {
        let mask = mode
            .mask
            .as_ref()
            .filter(|m| x.shape().get(..2) == Some(m.shape()));
        let states = x.lstm(&self.w_ih, &self.w_hh, &self.bias, mask)?;
        if self.return_sequences {
            return Ok(states);
        }
        // The sequence axis is gone, and its mask with it.
        mode.mask = None;
        let &[batch, steps, units] = states.shape() else {
            unreachable!("lstm returns [batch, steps, units]")
        };
        Ok(states
            .slice(1, steps - 1, steps)?
            .reshape(&[batch, units])?)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        vec![
            ("w_ih", self.w_ih.clone()),
            ("w_hh", self.w_hh.clone()),
            ("bias", self.bias.clone()),
        ]
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        match (self.return_sequences, input) {
            (true, [steps, _]) => vec![*steps, self.units()],
            _ => vec![self.units()],
        }
    }
}

/// Pools a sequence `[batch, steps, features]` into `[batch, features]` with
/// attention: a learned query vector scores every step by dot product, a
/// softmax over the real (unmasked) steps turns the scores into weights, and
/// the output is the weighted sum of the steps. Put it after an
/// `Lstm::return_sequences()` in place of keeping only the last state.
pub struct AttentionPooling {
    /// `[features, 1]`.
    pub query: Tensor,
}

impl AttentionPooling {
    /// Pooling over steps of `features` values, with a Glorot-uniform query from
    /// `seed`.
    pub fn new(device: &Device, features: usize, seed: u64) -> Result<Self, ModelError> {
        require_positive("AttentionPooling", &[("features", features)])?;
        let limit = (6.0 / (features + 1) as f32).sqrt();
        Ok(Self {
            query: Tensor::uniform(device, &[features, 1], -limit, limit, seed)?
                .requires_grad(true),
        })
    }
}

impl Layer for AttentionPooling {
    fn kind(&self) -> &'static str {
        "attention_pool"
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor, ModelError> {
        let &[batch, steps, features] = x.shape() else {
            return Err(ModelError::Invalid(format!(
                "attention pooling: input must be [batch, steps, features], got {:?}",
                x.shape()
            )));
        };
        let mut scores = x.matmul(&self.query)?.reshape(&[batch, steps])?;
        if let Some(mask) = mode.mask.take().filter(|m| m.shape() == [batch, steps]) {
            // Padded steps get a score of -1e9: a weight of exactly 0 after the
            // softmax (exp underflows), so they add nothing.
            let penalty = kiln_graph::no_grad(|| mask.add_scalar(-1.0)?.mul_scalar(1e9))?;
            scores = scores.add(&penalty)?;
        }
        let weights = scores.softmax()?.reshape(&[batch, 1, steps])?;
        Ok(weights.matmul(x)?.reshape(&[batch, features])?)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        vec![("query", self.query.clone())]
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        input.last().map(|&f| vec![f]).unwrap_or_default()
    }
}

/// The orthogonal initialiser's random stream for `seed`, tagged apart from
/// [`SplitMix64::uniform_stream`], which for many seeds is the bare seed's
/// stream one draw on: seeded with the bare seed, this stream was the
/// uniform one of the same seed, one draw behind (a stacked LSTM's second
/// input kernel copied the draws of the first one's recurrent kernel).
fn orthogonal_stream(seed: u64) -> SplitMix64 {
    SplitMix64::new(seed ^ 0xD1B5_4A32_D192_ED03)
}

/// `rows x cols` (rows <= cols) with orthonormal rows, from Gram-Schmidt on a
/// seeded Gaussian matrix: Keras's orthogonal initialiser for recurrent weights.
fn orthogonal_rows(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = orthogonal_stream(seed);
    let mut gaussian = || {
        // Box-Muller from two uniforms in (0, 1].
        let u1 = 1.0 - f64::from(rng.unit_f32());
        let u2 = f64::from(rng.unit_f32());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    let mut m: Vec<Vec<f64>> = (0..rows)
        .map(|_| (0..cols).map(|_| gaussian()).collect())
        .collect();
    for i in 0..rows {
        for j in 0..i {
            let dot: f64 = m[i].iter().zip(&m[j]).map(|(a, b)| a * b).sum();
            let (head, tail) = m.split_at_mut(i);
            for (a, b) in tail[0].iter_mut().zip(&head[j]) {
                *a -= dot * b;
            }
        }
        let norm = m[i].iter().map(|a| a * a).sum::<f64>().sqrt();
        m[i].iter_mut().for_each(|a| *a /= norm);
    }
    m.into_iter().flatten().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthogonal_rows_are_orthonormal() {
        let (rows, cols) = (6, 24);
        let m = orthogonal_rows(rows, cols, 3);
        for i in 0..rows {
            for j in 0..rows {
                let dot: f32 = (0..cols).map(|k| m[i * cols + k] * m[j * cols + k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5, "row {i} . row {j} = {dot}");
            }
        }
    }

    #[test]
    fn orthogonal_and_uniform_streams_share_no_draws() {
        // The draws behind orthogonal_rows(.., seed) and those behind
        // Tensor::uniform(.., seed), for the seeds the reference models use.
        let draws =
            |mut rng: SplitMix64| -> Vec<u64> { (0..4096).map(|_| rng.next_u64()).collect() };
        for seed in 0..8u64 {
            let orthogonal = draws(orthogonal_stream(seed));
            for other in 0..8u64 {
                let uniform = draws(SplitMix64::uniform_stream(other));
                assert!(
                    !uniform.iter().any(|u| orthogonal.contains(u)),
                    "orthogonal {seed} and uniform {other} share draws"
                );
            }
        }
    }
}
