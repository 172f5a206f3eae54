//! Loss functions. Each returns a scalar tensor (shape `[]`) unless the
//! reduction is [`Reduction::None`].

use crate::ops::arith::binary;
use crate::ops::record;
use crate::tensor::Tensor;
use kiln_device::{DeviceError, Elementwise, Result};

/// How per-sample losses are combined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reduction {
    /// The average over (non-ignored) samples.
    #[default]
    Mean,
    /// The sum over (non-ignored) samples.
    Sum,
    /// One loss per sample (per element for elementwise losses).
    None,
}

fn shape_error(op: &'static str, message: String) -> DeviceError {
    DeviceError::Shape { op, message }
}

fn reduce(per_item: Tensor, reduction: Reduction, count: usize) -> Result<Tensor> {
    match reduction {
        Reduction::Mean => per_item.sum_all()?.mul_scalar(1.0 / count.max(1) as f32),
        Reduction::Sum => per_item.sum_all(),
        Reduction::None => Ok(per_item),
    }
}

/// Mean squared error, `mean((pred - target)^2)`.
pub fn mse_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.shape() != target.shape() {
        return Err(shape_error(
            "mse_loss",
            format!(
                "prediction {:?} and target {:?} differ in shape",
                pred.shape(),
                target.shape()
            ),
        ));
    }
    pred.sub(target)?.square()?.mean_all()
}

/// Binary cross-entropy on logits against targets in [0, 1], computed as
/// `max(x, 0) - x t + log(1 + exp(-|x|))` so it never overflows.
pub fn binary_cross_entropy_with_logits(
    logits: &Tensor,
    targets: &Tensor,
    reduction: Reduction,
) -> Result<Tensor> {
    if logits.shape() != targets.shape() {
        return Err(shape_error(
            "binary_cross_entropy_with_logits",
            format!(
                "logits {:?} and targets {:?} differ in shape",
                logits.shape(),
                targets.shape()
            ),
        ));
    }
    let per_item = binary(
        logits,
        targets,
        Elementwise::new(
            "binary_cross_entropy_with_logits",
            "max(x0, 0.0) - x0 * x1 + log(1.0 + exp(-abs(x0)))",
        ),
        "x0 * (kiln_sigmoid(x2) - x3)",
        "-x0 * x2",
    )?;
    let count = per_item.numel();
    reduce(per_item, reduction, count)
}

/// Options of [`cross_entropy_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CrossEntropy {
    /// How per-sample losses are combined (default: the mean).
    pub reduction: Reduction,
    /// Samples with this label contribute neither loss nor gradient, and are not
    /// counted by the mean.
    pub ignore_index: Option<u32>,
}

/// Sparse categorical cross-entropy of `logits` `[n, classes]` against class
/// ids, averaged over the samples, through log-softmax (stable for any logits).
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    cross_entropy_with(logits, labels, CrossEntropy::default())
}

/// [`cross_entropy`] with a reduction and an ignore index.
pub fn cross_entropy_with(
    logits: &Tensor,
    labels: &[u32],
    options: CrossEntropy,
) -> Result<Tensor> {
    Ok(cross_entropy_counting_hits(logits, labels, options)?.0)
}

/// [`cross_entropy_with`], and how many samples' label is the argmax of
/// their logits (a classifier's correct predictions; as argmax, the first
/// of tied maxima is the prediction) as a scalar tensor
/// without a graph, where the loss's kernel counts them in the same pass:
/// batches of up to 1024 samples and fewer than 512 classes. A training loop
/// can keep its accuracy that way at no extra kernel.
pub fn cross_entropy_counting_hits(
    logits: &Tensor,
    labels: &[u32],
    options: CrossEntropy,
) -> Result<(Tensor, Option<Tensor>)> {
    let (loss, hits, _) = fused_cross_entropy(logits, labels, options, None)?;
    Ok((loss, hits))
}

/// [`cross_entropy_with`] that also adds the batch to `tally`, a `[2]` f32
/// tensor updated in place on the device: the sum of the samples' losses
/// (unscaled by the reduction) and the count of samples whose label has the
/// largest logit. The loss's kernel does this in the same pass for batches
/// of up to 1024 samples and fewer than 512 classes, and the returned flag
/// says whether it did; for other batches the caller keeps its own count.
/// A training loop keeps its running loss and accuracy this way without a
/// kernel or a sync per batch.
///
/// ```
/// # fn main() -> kiln_device::Result<()> {
/// use kiln_graph::{loss, Device, Tensor};
/// let device = Device::new()?;
/// let tally = Tensor::zeros(&device, &[2])?;
/// let logits = Tensor::from_slice(&device, &[2.0, 0.0, 0.0, 1.0], &[2, 2])?;
/// let (_loss, tallied) =
///     loss::cross_entropy_tallied(&logits, &[0, 0], loss::CrossEntropy::default(), &tally)?;
/// assert!(tallied);
/// let totals = tally.to_vec()?; // [summed losses, correct predictions]
/// assert_eq!(totals[1], 1.0);
/// # Ok(()) }
/// ```
pub fn cross_entropy_tallied(
    logits: &Tensor,
    labels: &[u32],
    options: CrossEntropy,
    tally: &Tensor,
) -> Result<(Tensor, bool)> {
    if tally.shape() != [2] {
        return Err(shape_error(
            "cross_entropy",
            format!("the tally must have shape [2], got {:?}", tally.shape()),
        ));
    }
    let (loss, _, tallied) = fused_cross_entropy(logits, labels, options, Some(tally))?;
    Ok((loss, tallied))
}

/// The fused cross-entropy: the loss, the batch's hits and whether `tally`
/// took the batch, where the kernel could do each.
fn fused_cross_entropy(
    logits: &Tensor,
    labels: &[u32],
    options: CrossEntropy,
    tally: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>, bool)> {
    const OP: &str = "cross_entropy";
    let &[n, classes] = logits.shape() else {
        return Err(shape_error(
            OP,
            format!("logits must be [batch, classes], got {:?}", logits.shape()),
        ));
    };
    if labels.len() != n {
        return Err(shape_error(
            OP,
            format!("{} labels for a batch of {n}", labels.len()),
        ));
    }
    let ignored = |l: u32| options.ignore_index == Some(l);
    if let Some(&bad) = labels
        .iter()
        .find(|&&l| !ignored(l) && l as usize >= classes)
    {
        return Err(shape_error(
            OP,
            format!("label {bad} out of range for {classes} classes"),
        ));
    }
    // One fused kernel gives every row's loss, their total (for up to 1024
    // rows) and the gradient of the scaled loss, which the backward pass
    // multiplies by the incoming gradient, or takes as it is when backward
    // starts at this loss: one dispatch per step for a classifier, where
    // log-softmax, a one-hot selection and their backward passes took eleven.
    let ids: Vec<u32> = labels
        .iter()
        .map(|&l| if ignored(l) { u32::MAX } else { l })
        .collect();
    let counted = labels.iter().filter(|&&l| !ignored(l)).count();
    let loss_scale = match options.reduction {
        Reduction::Mean => 1.0 / counted.max(1) as f32,
        Reduction::Sum | Reduction::None => 1.0,
    };
    let device = logits.device();
    let ids = device.upload(&ids)?;
    let fused = match tally {
        Some(t) => device.softmax_cross_entropy_tallied(
            logits.buffer(),
            &ids,
            n,
            classes,
            loss_scale,
            t.buffer(),
        )?,
        None => device.softmax_cross_entropy(logits.buffer(), &ids, n, classes, loss_scale)?,
    };
    let tallied = fused.tallied;
    let row_loss = Tensor::from_buffer(device, fused.row_loss, &[n])?;
    let grad = Tensor::from_buffer(device, fused.grad, &[n, classes])?;
    let hits = fused
        .hits
        .map(|h| Tensor::from_buffer(device, h, &[]))
        .transpose()?;
    // The kernel adds a classifier batch's losses up itself.
    let out = match (options.reduction, fused.total) {
        (Reduction::None, _) => row_loss,
        (_, Some(total)) => Tensor::from_buffer(device, total, &[])?,
        (_, None) => row_loss.sum_all()?,
    };
    let loss = record(&[logits], out, OP, move |g| {
        // Backward from this loss itself: the fused gradient is final.
        if crate::autograd::is_unit_seed(g) {
            return Ok(vec![Some(grad.clone())]);
        }
        // A per-row gradient scales its row; the reduced loss's scales all.
        let g = if g.rank() == 1 {
            g.reshape(&[n, 1])?
        } else {
            g.clone()
        };
        Ok(vec![Some(g.mul(&grad)?)])
    });
    Ok((loss, hits, tallied))
}

/// Categorical cross-entropy against probability (e.g. one-hot or smoothed)
/// targets of the same shape `[n, classes]`, averaged over the samples.
pub fn categorical_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (&[n, _], true) = (logits.shape(), logits.shape() == targets.shape()) else {
        return Err(shape_error(
            "categorical_cross_entropy",
            format!(
                "logits {:?} and targets {:?} must both be [batch, classes]",
                logits.shape(),
                targets.shape()
            ),
        ));
    };
    let per_sample = logits.log_softmax()?.mul(targets)?.sum(1, false)?.neg()?;
    reduce(per_sample, Reduction::Mean, n)
}
