//! Loss functions.

use crate::tensor::Tensor;
use kiln_device::{DeviceError, Result};

/// Mean squared error, `mean((pred - target)^2)`.
pub fn mse_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.shape() != target.shape() {
        return Err(DeviceError::Shape {
            op: "mse_loss",
            message: format!(
                "prediction {:?} and target {:?} differ in shape",
                pred.shape(),
                target.shape()
            ),
        });
    }
    pred.sub(target)?.square()?.mean_all()
}

/// Sparse categorical cross-entropy of `logits` `[n, classes]` against class
/// ids, averaged over the samples, computed through log-softmax so it is stable
/// for large logits.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let (n, classes) = match logits.shape() {
        &[n, c] => (n, c),
        s => {
            return Err(DeviceError::Shape {
                op: "cross_entropy",
                message: format!("logits must be [batch, classes], got {s:?}"),
            })
        }
    };
    if labels.len() != n {
        return Err(DeviceError::Shape {
            op: "cross_entropy",
            message: format!("{} labels for a batch of {n}", labels.len()),
        });
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(DeviceError::Shape {
            op: "cross_entropy",
            message: format!("label {bad} out of range for {classes} classes"),
        });
    }
    // One-hot weights scaled by -1/n turn the loss into sum(log_softmax * w).
    let mut weights = vec![0.0f32; n * classes];
    for (i, &l) in labels.iter().enumerate() {
        weights[i * classes + l as usize] = -1.0 / n as f32;
    }
    let w = Tensor::from_slice(logits.device(), &weights, &[n, classes])?;
    logits.log_softmax()?.mul(&w)?.sum_all()
}
