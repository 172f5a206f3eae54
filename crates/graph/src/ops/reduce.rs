//! Sums and means over axes, and broadcasting a tensor to a larger shape.

use super::arith::map;
use super::record;
use crate::tensor::Tensor;
use kiln_device::{DeviceError, Elementwise, Reduce, ReduceOp, Result};

fn check_axis(t: &Tensor, axis: usize, op: &'static str) -> Result<()> {
    if axis < t.rank() {
        Ok(())
    } else {
        Err(DeviceError::Shape {
            op,
            message: format!("axis {axis} out of range for shape {:?}", t.shape()),
        })
    }
}

fn reduced_shape(shape: &[usize], axis: usize, keepdim: bool) -> Vec<usize> {
    let mut out = shape.to_vec();
    if keepdim {
        out[axis] = 1;
    } else {
        out.remove(axis);
    }
    out
}

impl Tensor {
    /// Sum over `axis`; `keepdim` keeps it with size 1.
    pub fn sum(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.reduce_axis(ReduceOp::Sum, "sum", axis, keepdim)
    }

    /// Mean over `axis`.
    pub fn mean(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.reduce_axis(ReduceOp::Mean, "mean", axis, keepdim)
    }

    /// Maximum over `axis`. The gradient goes to the maximal elements, split
    /// evenly between ties.
    pub fn max(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.reduce_axis(ReduceOp::Max, "max", axis, keepdim)
    }

    /// Minimum over `axis`, with the gradient rule of [`Tensor::max`].
    pub fn min(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.reduce_axis(ReduceOp::Min, "min", axis, keepdim)
    }

    /// Sum of every element, as a scalar (shape `[]`).
    pub fn sum_all(&self) -> Result<Tensor> {
        self.reshape(&[self.numel()])?.sum(0, false)
    }

    /// Mean of every element, as a scalar (shape `[]`).
    pub fn mean_all(&self) -> Result<Tensor> {
        self.reshape(&[self.numel()])?.mean(0, false)
    }

    fn reduce_axis(
        &self,
        op: ReduceOp,
        name: &'static str,
        axis: usize,
        keepdim: bool,
    ) -> Result<Tensor> {
        check_axis(self, axis, name)?;
        let spec = Reduce::axis(op, self.shape(), axis)?;
        let buffer = self.device().reduce(self.buffer(), &spec)?;
        let out = Tensor::from_buffer(
            self.device(),
            buffer,
            &reduced_shape(self.shape(), axis, keepdim),
        )?;
        let in_shape = self.shape().to_vec();
        let keep_shape = reduced_shape(&in_shape, axis, true);
        let len = in_shape[axis];
        let (x, extreme) = (self.detach(), out.detach());
        Ok(record(&[self], out, name, move |g| {
            let g = g.reshape(&keep_shape)?;
            let grad = match op {
                ReduceOp::Sum => g.broadcast_to(&in_shape)?,
                ReduceOp::Mean => g.mul_scalar(1.0 / len as f32)?.broadcast_to(&in_shape)?,
                ReduceOp::Max | ReduceOp::Min => {
                    let extreme = extreme.reshape(&keep_shape)?;
                    let hit = Elementwise::new("extreme_mask", "select(0.0, 1.0, x0 == x1)");
                    let mask = map(&hit, &[&x, &extreme])?;
                    let ties = mask.sum(axis, true)?;
                    let share = Elementwise::new("extreme_grad", "x0 * x1 / x2");
                    map(&share, &[&g, &mask, &ties])?
                }
            };
            Ok(vec![Some(grad)])
        }))
    }

    /// Repeats the tensor along size-1 (or missing leading) dims to `shape`.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let bad = || DeviceError::Shape {
            op: "broadcast_to",
            message: format!("cannot broadcast {:?} to {shape:?}", self.shape()),
        };
        if shape.len() < self.rank() {
            return Err(bad());
        }
        let offset = shape.len() - self.rank();
        let mut strides = vec![0usize; shape.len()];
        let mut stride = 1;
        for d in (0..self.rank()).rev() {
            let extent = self.shape()[d];
            if extent != 1 {
                if extent != shape[offset + d] {
                    return Err(bad());
                }
                strides[offset + d] = stride;
            }
            stride *= extent;
        }
        let buffer = self
            .device()
            .strided_copy(self.buffer(), shape, &strides, 0)?;
        let out = Tensor::from_buffer(self.device(), buffer, shape)?;
        let in_shape = self.shape().to_vec();
        Ok(record(&[self], out, "broadcast_to", move |g| {
            Ok(vec![Some(super::sum_to_shape(g, &in_shape)?)])
        }))
    }
}
