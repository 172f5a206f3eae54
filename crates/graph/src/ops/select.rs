//! Slicing, concatenation and stacking, built on the device's strided copy
//! (gather) and strided write (its adjoint).

use super::{contiguous_strides, record};
use crate::tensor::Tensor;
use kiln_device::{DeviceError, Result};

/// The view of `shape` covering `start..end` along `axis`: (shape, strides, offset).
fn slab(shape: &[usize], axis: usize, start: usize, end: usize) -> (Vec<usize>, Vec<usize>, usize) {
    let strides = contiguous_strides(shape);
    let mut view = shape.to_vec();
    view[axis] = end - start;
    (view, strides.clone(), start * strides[axis])
}

impl Tensor {
    /// Elements `start..end` along `axis`.
    pub fn slice(&self, axis: usize, start: usize, end: usize) -> Result<Tensor> {
        if axis >= self.rank() || start > end || end > self.shape()[axis] {
            return Err(DeviceError::Shape {
                op: "slice",
                message: format!(
                    "range {start}..{end} on axis {axis} does not fit shape {:?}",
                    self.shape()
                ),
            });
        }
        let (shape, strides, offset) = slab(self.shape(), axis, start, end);
        let buffer = self
            .device()
            .strided_copy(self.buffer(), &shape, &strides, offset)?;
        let out = Tensor::from_buffer(self.device(), buffer, &shape)?;
        let in_shape = self.shape().to_vec();
        Ok(record(&[self], out, "slice", move |g| {
            let grad = Tensor::zeros(g.device(), &in_shape)?;
            g.device()
                .strided_write(grad.buffer(), &shape, &strides, offset, g.buffer())?;
            Ok(vec![Some(grad)])
        }))
    }

    /// Joins tensors along an existing `axis`; all other dims must agree.
    pub fn concat(tensors: &[&Tensor], axis: usize) -> Result<Tensor> {
        let first = tensors.first().ok_or_else(|| DeviceError::Shape {
            op: "concat",
            message: "needs at least one tensor".into(),
        })?;
        let agrees = |t: &Tensor| {
            t.rank() == first.rank()
                && axis < t.rank()
                && (0..t.rank()).all(|d| d == axis || t.shape()[d] == first.shape()[d])
        };
        if !tensors.iter().all(|t| agrees(t)) {
            return Err(DeviceError::Shape {
                op: "concat",
                message: format!(
                    "shapes {:?} do not agree outside axis {axis}",
                    tensors
                        .iter()
                        .map(|t| t.shape().to_vec())
                        .collect::<Vec<_>>()
                ),
            });
        }
        let mut shape = first.shape().to_vec();
        shape[axis] = tensors.iter().map(|t| t.shape()[axis]).sum();
        let out = Tensor::zeros(first.device(), &shape)?;
        let mut starts = Vec::with_capacity(tensors.len());
        let mut start = 0;
        for t in tensors {
            let end = start + t.shape()[axis];
            let (view, strides, offset) = slab(&shape, axis, start, end);
            first
                .device()
                .strided_write(out.buffer(), &view, &strides, offset, t.buffer())?;
            starts.push((start, end));
            start = end;
        }
        Ok(record(tensors, out, "concat", move |g| {
            starts
                .iter()
                .map(|&(s, e)| Ok(Some(g.slice(axis, s, e)?)))
                .collect()
        }))
    }

    /// Joins equally shaped tensors along a new `axis`.
    pub fn stack(tensors: &[&Tensor], axis: usize) -> Result<Tensor> {
        let expanded: Vec<Tensor> = tensors
            .iter()
            .map(|t| {
                let mut s = t.shape().to_vec();
                if axis > s.len() {
                    return Err(DeviceError::Shape {
                        op: "stack",
                        message: format!("axis {axis} out of range for shape {s:?}"),
                    });
                }
                s.insert(axis, 1);
                t.reshape(&s)
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = expanded.iter().collect();
        Tensor::concat(&refs, axis)
    }
}
