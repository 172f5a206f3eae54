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
        let last = self
            .rank()
            .checked_sub(1)
            .ok_or_else(|| DeviceError::Shape {
                op: "layer_norm",
                message: "needs at least one dim".into(),
            })?;
        let features = &self.shape()[last..];
        if gamma.shape() != features || beta.shape() != features {
            return Err(DeviceError::Shape {
                op: "layer_norm",
                message: format!(
                    "gamma {:?} and beta {:?} must match the last axis of {:?}",
                    gamma.shape(),
                    beta.shape(),
                    self.shape()
                ),
            });
        }
        let cols = features[0];
        let rows = self.numel() / cols.max(1);
        let device = self.device();
        let fwd = device.layer_norm(
            self.buffer(),
            gamma.buffer(),
            beta.buffer(),
            rows,
            cols,
            eps,
        )?;
        let out = Tensor::from_buffer(device, fwd.out, self.shape())?;
        let stats = Tensor::from_buffer(device, fwd.stats, &[rows, 2])?;
        let (x, gamma_saved) = (self.detach(), gamma.detach());
        let needs = [gamma.is_requires_grad(), beta.is_requires_grad()];
        Ok(record(&[self, gamma, beta], out, "layer_norm", move |g| {
            let device = x.device();
            let (dx, gxhat) = device.layer_norm_backward(
                x.buffer(),
                gamma_saved.buffer(),
                g.buffer(),
                stats.buffer(),
                rows,
                cols,
            )?;
            let dx = Tensor::from_buffer(device, dx, x.shape())?;
            let dgamma = if needs[0] {
                Some(Tensor::from_buffer(device, gxhat, &[rows, cols])?.sum(0, false)?)
            } else {
                None
            };
            let dbeta = if needs[1] {
                Some(g.reshape(&[rows, cols])?.sum(0, false)?)
            } else {
                None
            };
            Ok(vec![Some(dx), dgamma, dbeta])
        }))
    }
}

/// What a training-mode batch normalisation returns: the output and the batch
/// statistics per channel, which the caller folds into its running averages.
pub struct BatchNormOutput {
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
