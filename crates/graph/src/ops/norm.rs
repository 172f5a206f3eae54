//! Layer normalisation, composed from differentiable ops so its gradient comes
//! from the same (checked) rules.

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
        let centered = self.sub(&self.mean(last, true)?)?;
        let variance = centered.square()?.mean(last, true)?;
        let inv_std = variance.add_scalar(eps)?.pow_scalar(-0.5)?;
        centered.mul(&inv_std)?.mul(gamma)?.add(beta)
    }
}
