//! Reshapes and transposes.

use super::{contiguous_strides, record};
use crate::tensor::Tensor;
use kiln_device::{DeviceError, Result};

impl Tensor {
    /// The same data viewed with another shape of equal size (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let numel = crate::tensor::numel_of(shape);
        if numel != self.numel() {
            return Err(DeviceError::Shape {
                op: "reshape",
                message: format!("cannot reshape {:?} to {shape:?}", self.shape()),
            });
        }
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let out = Tensor::from_parts(self.device(), self.shared_storage(), shape.to_vec(), None);
        let in_shape = self.shape().to_vec();
        Ok(record(&[self], out, "reshape", move |g| {
            Ok(vec![Some(g.reshape(&in_shape)?)])
        }))
    }

    /// Reorders the dims: output dim `i` is input dim `dims[i]`.
    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        let rank = self.rank();
        let mut seen = vec![false; rank];
        let valid = dims.len() == rank
            && dims
                .iter()
                .all(|&d| d < rank && !std::mem::replace(&mut seen[d], true));
        if !valid {
            return Err(DeviceError::Shape {
                op: "permute",
                message: format!(
                    "{dims:?} is not a permutation of the dims of {:?}",
                    self.shape()
                ),
            });
        }
        let contiguous = contiguous_strides(self.shape());
        let shape: Vec<usize> = dims.iter().map(|&d| self.shape()[d]).collect();
        let strides: Vec<usize> = dims.iter().map(|&d| contiguous[d]).collect();
        let buffer = self
            .device()
            .strided_copy(self.buffer(), &shape, &strides, 0)?;
        let out = Tensor::from_buffer(self.device(), buffer, &shape)?;
        let mut inverse = vec![0; rank];
        for (i, &d) in dims.iter().enumerate() {
            inverse[d] = i;
        }
        Ok(record(&[self], out, "permute", move |g| {
            Ok(vec![Some(g.permute(&inverse)?)])
        }))
    }

    /// Swaps two dims.
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor> {
        let mut dims: Vec<usize> = (0..self.rank()).collect();
        if d0 >= dims.len() || d1 >= dims.len() {
            return Err(DeviceError::Shape {
                op: "transpose",
                message: format!("dims {d0}, {d1} out of range for {:?}", self.shape()),
            });
        }
        dims.swap(d0, d1);
        self.permute(&dims)
    }

    /// Transpose of a matrix (the last two dims).
    pub fn t(&self) -> Result<Tensor> {
        let r = self.rank();
        if r < 2 {
            return Err(DeviceError::Shape {
                op: "t",
                message: format!("needs at least 2 dims, shape is {:?}", self.shape()),
            });
        }
        self.transpose(r - 2, r - 1)
    }
}
