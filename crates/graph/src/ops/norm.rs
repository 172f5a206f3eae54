//! Layer normalisation (one fused kernel each way) and batch normalisation
//! (composed from differentiable ops, so its gradient comes from their checked
//! rules).

use super::record;
use crate::tensor::Tensor;
use kiln_device::{DeviceError, Result};

impl Tensor {
    /// Normalises over the last axis to zero mean and unit variance (biased
    /// variance, as PyTorch), then scales by `gamma` and shifts by `beta`, both
    /// shaped like the last axis.
    pub fn layer_norm(&self, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        layer_norm(self, None, gamma, beta, eps)
    }

    /// `(self + residual).layer_norm(gamma, beta, eps)` in one kernel each way:
    /// a post-LayerNorm block's residual sum is never written out.
    pub fn add_layer_norm(
        &self,
        residual: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        if residual.shape() != self.shape() {
            return Err(DeviceError::Shape {
                op: "add_layer_norm",
                message: format!(
                    "the residual {:?} must have the input's shape {:?}",
                    residual.shape(),
                    self.shape()
                ),
            });
        }
        layer_norm(self, Some(residual), gamma, beta, eps)
    }
}

fn layer_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let last = x.rank().checked_sub(1).ok_or_else(|| DeviceError::Shape {
        op: "layer_norm",
        message: "needs at least one dim".into(),
    })?;
    let features = &x.shape()[last..];
    if gamma.shape() != features || beta.shape() != features {
        return Err(DeviceError::Shape {
            op: "layer_norm",
            message: format!(
                "gamma {:?} and beta {:?} must match the last axis of {:?}",
                gamma.shape(),
                beta.shape(),
                x.shape()
            ),
        });
    }
    let cols = features[0];
    let rows = x.numel() / cols.max(1);
    let device = x.device();
    let fwd = device.layer_norm(
        x.buffer(),
        residual.map(Tensor::buffer),
        gamma.buffer(),
        beta.buffer(),
        rows,
        cols,
        eps,
    )?;
    let out = Tensor::from_buffer(device, fwd.out, x.shape())?;
    let stats = Tensor::from_buffer(device, fwd.stats, &[rows, 2])?;
    let saved_x = x.detach();
    let saved_r = residual.map(Tensor::detach);
    let saved_gamma = gamma.detach();
    let needs_gamma = gamma.is_requires_grad();
    let needs_beta = beta.is_requires_grad();
    let mut inputs = vec![x];
    inputs.extend(residual);
    inputs.extend([gamma, beta]);
    Ok(record(&inputs, out, "layer_norm", move |g| {
        let device = saved_x.device();
        // beta's gradient (column sums of g) and the row-wise backward kernel
        // only read g: one dispatch where they fuse; gamma's gradient sums
        // the latter's output, so it follows.
        let (dbeta, dx, gxhat) = device.together(|| {
            let dbeta = needs_beta
                .then(|| g.reshape(&[rows, cols])?.sum(0, false))
                .transpose()?;
            let (dx, gxhat) = device.layer_norm_backward(
                saved_x.buffer(),
                saved_r.as_ref().map(Tensor::buffer),
                saved_gamma.buffer(),
                g.buffer(),
                stats.buffer(),
                rows,
                cols,
            )?;
            Ok((dbeta, dx, gxhat))
        })?;
        let dx = Tensor::from_buffer(device, dx, saved_x.shape())?;
        let dgamma = if needs_gamma {
            Some(Tensor::from_buffer(device, gxhat, &[rows, cols])?.sum(0, false)?)
        } else {
            None
        };
        // The sum's two terms get the same gradient.
        let mut grads = vec![Some(dx.clone())];
        if saved_r.is_some() {
            grads.push(Some(dx));
        }
        grads.extend([dgamma, dbeta]);
        Ok(grads)
    }))
}

/// What a training-mode batch normalisation returns: the output and the batch
/// statistics per channel, which the caller folds into its running averages.
pub struct BatchNormOutput {
    /// The normalised, scaled and shifted input, shaped as the input.
    pub output: Tensor,
    /// Mean per channel, `[c]`.
    pub mean: Tensor,
    /// Biased variance per channel, `[c]` (the one used to normalise).
    pub variance: Tensor,
    /// Values each channel's statistics were taken over (`n * h * w`), for the
    /// unbiased correction of running variances.
    pub count: usize,
}

impl Tensor {
    /// `[n, c, ...]` viewed as `[n, c, rest]`, after checking that `gamma` and
    /// `beta` have one value per channel.
    fn channels_view(&self, gamma: &Tensor, beta: &Tensor, op: &'static str) -> Result<Tensor> {
        let &[n, c, ..] = self.shape() else {
            return Err(DeviceError::Shape {
                op,
                message: format!("input must be [n, c, ...], got {:?}", self.shape()),
            });
        };
        if gamma.shape() != [c] || beta.shape() != [c] {
            return Err(DeviceError::Shape {
                op,
                message: format!(
                    "gamma {:?} and beta {:?} must be [{c}] for input {:?}",
                    gamma.shape(),
                    beta.shape(),
                    self.shape()
                ),
            });
        }
        self.reshape(&[n, c, self.numel() / (n * c).max(1)])
    }

    /// Batch normalisation with statistics of this batch (training mode):
    /// normalises each channel (dim 1) over the batch and every later dim, with
    /// the biased variance, then scales by `gamma` and shifts by `beta` (`[c]`).
    /// Works for `[n, c]` (BatchNorm1d) and `[n, c, h, w]` (BatchNorm2d).
    /// Composed from differentiable ops, so its gradient is theirs.
    pub fn batch_norm_train(
        &self,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<BatchNormOutput> {
        let x = self.channels_view(gamma, beta, "batch_norm")?;
        let (n, c, rest) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let mean = x.mean(2, true)?.mean(0, true)?;
        let centered = x.sub(&mean)?;
        let variance = centered.square()?.mean(2, true)?.mean(0, true)?;
        let inv_std = variance.add_scalar(eps)?.pow_scalar(-0.5)?;
        let per_channel = [1, c, 1];
        let output = centered
            .mul(&inv_std.mul(&gamma.reshape(&per_channel)?)?)?
            .add(&beta.reshape(&per_channel)?)?
            .reshape(self.shape())?;
        Ok(BatchNormOutput {
            output,
            mean: mean.reshape(&[c])?,
            variance: variance.reshape(&[c])?,
            count: n * rest,
        })
    }

    /// Batch normalisation with given (running) statistics, as in evaluation:
    /// `(x - mean) / sqrt(variance + eps) * gamma + beta`, per channel (dim 1).
    pub fn batch_norm_eval(
        &self,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        variance: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let x = self.channels_view(gamma, beta, "batch_norm")?;
        let c = x.shape()[1];
        if mean.shape() != [c] || variance.shape() != [c] {
            return Err(DeviceError::Shape {
                op: "batch_norm",
                message: format!(
                    "running mean {:?} and variance {:?} must be [{c}]",
                    mean.shape(),
                    variance.shape()
                ),
            });
        }
        // Folded into one scale and one shift per channel before touching x.
        let scale = variance.add_scalar(eps)?.pow_scalar(-0.5)?.mul(gamma)?;
        let shift = beta.sub(&mean.mul(&scale)?)?;
        let per_channel = [1, c, 1];
        x.mul(&scale.reshape(&per_channel)?)?
            .add(&shift.reshape(&per_channel)?)?
            .reshape(self.shape())
    }
}
