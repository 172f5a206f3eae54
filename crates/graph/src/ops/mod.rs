//! Differentiable ops. Each forward runs device kernels; each backward rule is
//! written with the same tensor ops, so gradients are computed on the GPU.

pub(crate) mod arith;
mod conv;
pub use conv::{Conv2d, Padding};
mod embedding;
mod lstm;
mod matmul;
mod norm;
pub use norm::BatchNormOutput;
mod random;
mod reduce;
mod select;
mod shape;
mod softmax;

use crate::autograd::{is_grad_enabled, GradFn, OutputFactor};
use crate::tensor::Tensor;
use kiln_device::Result;

/// Attaches the graph to an op's output (computed without one) when an input
/// needs gradients. `backward` maps the output's gradient to one entry per input.
pub(crate) fn record(
    inputs: &[&Tensor],
    out: Tensor,
    op: &'static str,
    backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Tensor {
    record_factored(inputs, out, op, None, backward)
}

/// [`record`] for an op whose backward rule starts with `output_factor` and
/// skips it for a gradient that arrives [`is_factored`](crate::autograd::is_factored).
pub(crate) fn record_factored(
    inputs: &[&Tensor],
    out: Tensor,
    op: &'static str,
    output_factor: Option<OutputFactor>,
    backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Tensor {
    let needs_grad = is_grad_enabled() && inputs.iter().any(|t| t.is_requires_grad());
    if !needs_grad {
        return out;
    }
    let grad_fn = GradFn {
        op,
        inputs: inputs.iter().map(|t| (*t).clone()).collect(),
        versions: inputs.iter().map(|t| t.version()).collect(),
        backward: Box::new(backward),
        output_factor,
    };
    Tensor::from_parts(
        out.device(),
        out.shared_storage(),
        out.shape().to_vec(),
        Some(grad_fn),
    )
}

/// Row-major element strides of `shape`.
pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// Sums `grad` down to `shape`, undoing numpy broadcasting: the gradient of a
/// broadcast input is the sum over the dims it was repeated along.
pub(crate) fn sum_to_shape(grad: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if grad.shape() == shape {
        return Ok(grad.clone());
    }
    let mut g = grad.clone();
    let extra = g.rank() - shape.len();
    for axis in 0..g.rank() {
        let target = if axis < extra { 1 } else { shape[axis - extra] };
        if target == 1 && g.shape()[axis] != 1 {
            g = g.sum(axis, true)?;
        }
    }
    g.reshape(shape)
}
