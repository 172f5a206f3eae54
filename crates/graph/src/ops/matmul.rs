//! Matrix products: 2-D, batched 3-D, and 3-D by a shared 2-D matrix.

use super::record;
use crate::tensor::Tensor;
use kiln_device::{DType, DeviceError, Matmul, Result};

/// `op(a) * op(b)` on raw tensors (no graph).
fn product(a: &Tensor, b: &Tensor, spec: Matmul, shape: Vec<usize>) -> Result<Tensor> {
    let buffer = a.device().matmul(a.buffer(), b.buffer(), &spec)?;
    Tensor::from_buffer(a.device(), buffer, &shape)
}

/// `t` without its graph, stored as `dtype` (a cast only where it differs).
fn stored_as(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.buffer().dtype() == dtype {
        return Ok(t.detach());
    }
    let buffer = t.device().cast(t.buffer(), dtype)?;
    Tensor::from_buffer(t.device(), buffer, t.shape())
}

impl Tensor {
    /// Matrix product. Shapes: `[m, k] x [k, n]`, `[b, m, k] x [b, k, n]`, or
    /// `[b, m, k] x [k, n]` (the same matrix for every batch, as in a linear layer
    /// over a sequence).
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.shape().to_vec(), other.shape().to_vec());
        let mismatch = || DeviceError::Shape {
            op: "matmul",
            message: format!("cannot multiply {a:?} by {b:?}"),
        };
        let (batch, m, k, n, shared_b) = match (a.as_slice(), b.as_slice()) {
            (&[m, k], &[k2, n]) if k == k2 => (1, m, k, n, false),
            (&[ba, m, k], &[bb, k2, n]) if k == k2 && ba == bb => (ba, m, k, n, false),
            (&[ba, m, k], &[k2, n]) if k == k2 => (ba, m, k, n, true),
            _ => return Err(mismatch()),
        };
        let out_shape = if a.len() == 2 {
            vec![m, n]
        } else {
            vec![batch, m, n]
        };
        // A shared B times a contiguous batch of A is one product over the
        // flattened batch * m rows: fewer, fuller workgroups than `batch`
        // small products.
        let spec = if shared_b {
            Matmul::new(batch * m, n, k)
        } else {
            Matmul::batched(batch, m, n, k)
        };
        // Under autocast the product reads f16 copies, and the backward pass
        // keeps those (half the memory) and rounds the incoming gradient too.
        let dtype = crate::amp::matmul_operand_dtype();
        let (sa, sb) = (stored_as(self, dtype)?, stored_as(other, dtype)?);
        let out = product(&sa, &sb, spec, out_shape)?;
        // Gradients nobody asked for are not computed (a first layer's input,
        // the layer above a frozen one).
        let needs = [self.is_requires_grad(), other.is_requires_grad()];
        Ok(record(&[self, other], out, "matmul", move |g| {
            let g = &stored_as(g, dtype)?;
            // dA = dC * B^T (for a shared B, again over the flattened rows).
            let ga = if !needs[0] {
                None
            } else if shared_b {
                let spec = Matmul::new(batch * m, k, n).transpose_b(true);
                Some(product(g, &sb, spec, sa.shape().to_vec())?)
            } else {
                let spec = Matmul::batched(batch, m, k, n).transpose_b(true);
                Some(product(g, &sb, spec, sa.shape().to_vec())?)
            };
            if !needs[1] {
                return Ok(vec![ga, None]);
            }
            // dB = A^T * dC; for a shared B, summed over the batch, which is one
            // product over the flattened batch*m rows.
            let gb = if shared_b {
                let spec = Matmul::new(k, n, batch * m).transpose_a(true);
                product(&sa, g, spec, vec![k, n])?
            } else {
                let spec = Matmul {
                    trans_a: true,
                    batch_stride_a: m * k,
                    batch_stride_b: m * n,
                    ..Matmul::batched(batch, k, n, m)
                };
                product(&sa, g, spec, sb.shape().to_vec())?
            };
            Ok(vec![ga, Some(gb)])
        }))
    }
}
