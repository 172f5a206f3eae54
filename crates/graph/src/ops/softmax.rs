//! Softmax and log-softmax over the last axis.

use super::arith::map;
use super::record;
use crate::tensor::Tensor;
use kiln_device::{DeviceError, Elementwise, Result, SoftmaxInput};

fn rows_cols(t: &Tensor, op: &'static str) -> Result<(usize, usize)> {
    match t.shape().last() {
        Some(&cols) if cols > 0 => Ok((t.numel() / cols, cols)),
        _ => Err(DeviceError::Shape {
            op,
            message: format!("needs a non-empty last axis, shape is {:?}", t.shape()),
        }),
    }
}

impl Tensor {
    /// Softmax over the last axis.
    pub fn softmax(&self) -> Result<Tensor> {
        let (rows, cols) = rows_cols(self, "softmax")?;
        let buffer = self.device().softmax(self.buffer(), rows, cols)?;
        let out = Tensor::from_buffer(self.device(), buffer, self.shape())?;
        let y = out.detach();
        Ok(record(&[self], out, "softmax", move |g| {
            // dx = y * (g - sum(g * y))
            let gy_sum = g.mul(&y)?.sum(y.rank() - 1, true)?;
            let rule = Elementwise::new("softmax_grad", "x2 * (x0 - x1)");
            Ok(vec![Some(map(&rule, &[g, &gy_sum, &y])?)])
        }))
    }

    /// Softmax over the last axis of `scale * self + bias`, in one kernel:
    /// attention's `softmax(q k^T / sqrt(d) + mask)` without two extra passes
    /// over the scores. `bias` (a constant: it gets no gradient) is
    /// `[groups, cols]` and is added to consecutive blocks of rows, e.g. a
    /// `[batch, keys]` padding mask for scores `[batch, heads, queries, keys]`.
    pub fn softmax_scaled(&self, scale: f32, bias: Option<&Tensor>) -> Result<Tensor> {
        let (rows, cols) = rows_cols(self, "softmax_scaled")?;
        if bias.is_some_and(Tensor::is_requires_grad) {
            return Err(DeviceError::Shape {
                op: "softmax_scaled",
                message: "the bias is a constant mask; detach it".into(),
            });
        }
        let input = SoftmaxInput {
            scale,
            bias: bias.map(Tensor::buffer),
        };
        let buffer = self
            .device()
            .softmax_scaled(self.buffer(), rows, cols, input)?;
        let out = Tensor::from_buffer(self.device(), buffer, self.shape())?;
        let y = out.detach();
        Ok(record(&[self], out, "softmax_scaled", move |g| {
            // dx = scale * y * (g - sum(g * y))
            let gy_sum = g.mul(&y)?.sum(y.rank() - 1, true)?;
            let rule =
                Elementwise::new("softmax_scaled_grad", "s0 * x2 * (x0 - x1)").scalars(&[scale]);
            Ok(vec![Some(map(&rule, &[g, &gy_sum, &y])?)])
        }))
    }

    /// Log-softmax over the last axis, stable for large logits.
    pub fn log_softmax(&self) -> Result<Tensor> {
        let (rows, cols) = rows_cols(self, "log_softmax")?;
        let buffer = self.device().log_softmax(self.buffer(), rows, cols)?;
        let out = Tensor::from_buffer(self.device(), buffer, self.shape())?;
        let y = out.detach();
        Ok(record(&[self], out, "log_softmax", move |g| {
            // dx = g - softmax(x) * sum(g), with softmax(x) = exp(y)
            let g_sum = g.sum(y.rank() - 1, true)?;
            let rule = Elementwise::new("log_softmax_grad", "x0 - exp(x2) * x1");
            Ok(vec![Some(map(&rule, &[g, &g_sum, &y])?)])
        }))
    }
}
