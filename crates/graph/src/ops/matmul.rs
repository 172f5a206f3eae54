//! Matrix products: 2-D, batched 3-D, and 3-D by a shared 2-D matrix; and a
//! dense layer's product, bias and activation as one kernel.

use super::arith::{bias_then, map_used, output_derivative, reads_var};
use super::{record, record_factored, sum_to_shape};
use crate::autograd::OutputFactor;
use crate::tensor::Tensor;
use kiln_device::{
    DType, DeviceError, Elementwise, Epilogue, EpilogueOperand, Matmul, Result, UnaryOp,
};

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

/// How the operands of `a x b` line up, from their shapes.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    /// `[b, m, k] x [k, n]`: one B for every batch entry.
    shared_b: bool,
    /// The output keeps a batch axis.
    batched_out: bool,
}

impl Geometry {
    fn of(a: &[usize], b: &[usize]) -> Result<Self> {
        let (batch, m, k, n, shared_b) = match (a, b) {
            (&[m, k], &[k2, n]) if k == k2 => (1, m, k, n, false),
            (&[ba, m, k], &[bb, k2, n]) if k == k2 && ba == bb => (ba, m, k, n, false),
            (&[ba, m, k], &[k2, n]) if k == k2 => (ba, m, k, n, true),
            _ => {
                return Err(DeviceError::Shape {
                    op: "matmul",
                    message: format!("cannot multiply {a:?} by {b:?}"),
                })
            }
        };
        Ok(Self {
            batch,
            m,
            k,
            n,
            shared_b,
            batched_out: a.len() == 3,
        })
    }

    fn out_shape(&self) -> Vec<usize> {
        if self.batched_out {
            vec![self.batch, self.m, self.n]
        } else {
            vec![self.m, self.n]
        }
    }

    /// The forward product. A shared B times a contiguous batch of A is one
    /// product over the flattened batch * m rows: fewer, fuller workgroups
    /// than `batch` small products.
    fn spec(&self) -> Matmul {
        let Self { batch, m, k, n, .. } = *self;
        if self.shared_b {
            Matmul::new(batch * m, n, k)
        } else {
            Matmul::batched(batch, m, n, k)
        }
    }

    /// The gradients of A and B (where `needs`) from the output's gradient
    /// `g`, with `sa`, `sb` the operands as the forward product read them.
    fn backward(
        &self,
        g: &Tensor,
        sa: &Tensor,
        sb: &Tensor,
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        // The two products only read g and the operands: one dispatch.
        g.device().together(|| {
            let ga = needs[0].then(|| self.input_grad(g, sa, sb)).transpose()?;
            let gb = needs[1]
                .then(|| self.weight_grad(g, sa, sb, false))
                .transpose()?;
            Ok([ga, gb.map(|(gb, _)| gb)])
        })
    }

    /// dA = dC * B^T (for a shared B, again over the flattened rows).
    fn input_grad(&self, g: &Tensor, sa: &Tensor, sb: &Tensor) -> Result<Tensor> {
        product(g, sb, self.input_grad_spec(), sa.shape().to_vec())
    }

    fn input_grad_spec(&self) -> Matmul {
        let Self { batch, m, k, n, .. } = *self;
        if self.shared_b {
            Matmul::new(batch * m, k, n).transpose_b(true)
        } else {
            Matmul::batched(batch, m, k, n).transpose_b(true)
        }
    }

    /// dA with the output factor of A's producer applied as the product is
    /// stored (`x1` of the factor being A itself, that producer's output),
    /// marked so the producer does not apply it again.
    fn input_grad_factored(
        &self,
        g: &Tensor,
        sb: &Tensor,
        a: &Tensor,
        factor: &OutputFactor,
    ) -> Result<Tensor> {
        let epilogue = Epilogue {
            op: Elementwise::new("output_factor", &factor.expr).scalars(&factor.scalars),
            operand: EpilogueOperand::Element(a.buffer()),
        };
        let device = g.device();
        let buffer =
            device.matmul_fused(g.buffer(), sb.buffer(), &self.input_grad_spec(), &epilogue)?;
        let grad = Tensor::from_buffer(device, buffer, a.shape())?;
        crate::autograd::mark_factored(&grad);
        Ok(grad)
    }

    /// dB = A^T * dC; for a shared B, summed over the batch, which is one
    /// product over the flattened batch*m rows. With `column_sums`, also the
    /// sums of dC's columns over those rows (a bias's gradient) where the
    /// product kernel can add them up as it goes.
    fn weight_grad(
        &self,
        g: &Tensor,
        sa: &Tensor,
        sb: &Tensor,
        column_sums: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let Self { batch, m, k, n, .. } = *self;
        let spec = if self.shared_b {
            Matmul::new(k, n, batch * m).transpose_a(true)
        } else {
            Matmul {
                trans_a: true,
                batch_stride_a: m * k,
                batch_stride_b: m * n,
                ..Matmul::batched(batch, k, n, m)
            }
        };
        if !column_sums {
            return Ok((product(sa, g, spec, sb.shape().to_vec())?, None));
        }
        let device = g.device();
        let (gb, sums) = device.matmul_column_sums(sa.buffer(), g.buffer(), &spec)?;
        let sums = sums
            .map(|s| Tensor::from_buffer(device, s, &[n]))
            .transpose()?;
        Ok((Tensor::from_buffer(device, gb, sb.shape())?, sums))
    }
}

impl Tensor {
    /// Matrix product. Shapes: `[m, k] x [k, n]`, `[b, m, k] x [b, k, n]`, or
    /// `[b, m, k] x [k, n]` (the same matrix for every batch, as in a linear layer
    /// over a sequence).
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        let geometry = Geometry::of(self.shape(), other.shape())?;
        // Under autocast the product reads f16 copies, and the backward pass
        // keeps those (half the memory) and rounds the incoming gradient too.
        let dtype = crate::amp::matmul_operand_dtype();
        let (sa, sb) = (stored_as(self, dtype)?, stored_as(other, dtype)?);
        let out = product(&sa, &sb, geometry.spec(), geometry.out_shape())?;
        // Gradients nobody asked for are not computed (a first layer's input,
        // the layer above a frozen one).
        let needs = [self.is_requires_grad(), other.is_requires_grad()];
        Ok(record(&[self, other], out, "matmul", move |g| {
            let g = &stored_as(g, dtype)?;
            Ok(geometry.backward(g, &sa, &sb, needs)?.into())
        }))
    }

    /// A dense layer, `activation(self x weight + bias)`, with `weight`
    /// `[k, n]`, `bias` `[n]` and `self` `[m, k]` or `[b, m, k]`.
    ///
    /// The bias and activation are applied by the product kernel as it stores
    /// its output, so the pre-activation is never written, when the
    /// activation's derivative can be had from its output (ReLU, sigmoid,
    /// tanh); other activations (GELU) take a second kernel. The backward pass
    /// sums the bias gradient in the weight gradient's kernel where it can.
    ///
    /// ```
    /// # fn main() -> kiln_device::Result<()> {
    /// use kiln_graph::{device::UnaryOp, Device, Tensor};
    /// let device = Device::new()?;
    /// let x = Tensor::from_slice(&device, &[1.0, -2.0], &[1, 2])?;
    /// let w = Tensor::from_slice(&device, &[1.0, 0.0, 0.0, 1.0], &[2, 2])?;
    /// let b = Tensor::from_slice(&device, &[0.5, 1.0], &[2])?;
    /// let y = x.dense(&w, &b, Some(UnaryOp::Relu))?;
    /// assert_eq!(y.to_vec()?, vec![1.5, 0.0]);
    /// # Ok(()) }
    /// ```
    pub fn dense(
        &self,
        weight: &Tensor,
        bias: &Tensor,
        activation: Option<UnaryOp>,
    ) -> Result<Tensor> {
        let partial = match activation {
            None => Some("x0".to_string()),
            Some(op) => output_derivative(op),
        };
        let fusable = weight.rank() == 2
            && bias.shape() == [weight.shape()[1]]
            && bias.buffer().dtype() == DType::F32;
        let (Some(partial), true) = (partial, fusable) else {
            return match (activation, fusable) {
                // The derivative needs the pre-activation: the product adds
                // the bias (and its gradient gets summed with the weight's),
                // then the activation is its own kernel.
                (Some(op), true) => self.dense(weight, bias, None)?.unary(op),
                (None, _) => self.matmul(weight)?.add(bias),
                (Some(op), false) => self.matmul(weight)?.add_then(bias, op),
            };
        };
        let geometry = Geometry::of(self.shape(), weight.shape())?;
        let (expr, scalars) = bias_then(activation);
        let epilogue = Epilogue {
            op: Elementwise::new("dense", &expr).scalars(&scalars),
            operand: EpilogueOperand::Column(bias.buffer()),
        };
        let dtype = crate::amp::matmul_operand_dtype();
        let (sa, sb) = (stored_as(self, dtype)?, stored_as(weight, dtype)?);
        let device = self.device();
        let buffer = device.matmul_fused(sa.buffer(), sb.buffer(), &geometry.spec(), &epilogue)?;
        let out = Tensor::from_buffer(device, buffer, &geometry.out_shape())?;
        // The activation's derivative reads the incoming gradient (x0) and at
        // most the output (x1), kept only if it does.
        let output = reads_var(&partial, |i| i == 1).then(|| out.detach());
        let needs = [
            self.is_requires_grad(),
            weight.is_requires_grad(),
            bias.is_requires_grad(),
        ];
        // When the input is another dense layer's activation, this layer's
        // input gradient can take that activation's derivative as its
        // product is stored (if this layer is the input's only consumer).
        let input = (needs[0]
            && self.buffer().dtype() == DType::F32
            && self.grad_fn().is_some_and(|f| f.output_factor.is_some()))
        .then(|| self.clone());
        let n = geometry.n;
        let factor = (partial != "x0").then(|| OutputFactor {
            expr: partial.clone(),
            scalars,
        });
        let inputs = [self, weight, bias];
        Ok(record_factored(&inputs, out, "dense", factor, move |g| {
            let pre = if partial == "x0" || crate::autograd::is_factored(g) {
                g.clone()
            } else {
                let y = output.as_ref().unwrap_or(g);
                map_used("dense_grad", &partial, scalars, &[g, y])?
            };
            let g = &stored_as(&pre, dtype)?;
            let folded = input
                .as_ref()
                .and_then(|a| Some((a, crate::autograd::foldable_factor(a)?)));
            // The input and weight gradients only read g and the operands:
            // one dispatch.
            let (ga, gw, mut gb) = g.device().together(|| {
                let ga = match folded {
                    Some((a, factor)) => Some(geometry.input_grad_factored(g, &sb, a, &factor)?),
                    None => needs[0]
                        .then(|| geometry.input_grad(g, &sa, &sb))
                        .transpose()?,
                };
                // The bias gradient comes with the weight's where the product
                // kernel can sum the columns of g as it goes.
                Ok(match needs[1] {
                    true => {
                        let (gw, sums) = geometry.weight_grad(g, &sa, &sb, needs[2])?;
                        (ga, Some(gw), sums)
                    }
                    false => (ga, None, None),
                })
            })?;
            if needs[2] && gb.is_none() {
                gb = Some(sum_to_shape(&pre, &[n])?);
            }
            Ok(vec![ga, gw, gb])
        }))
    }
}
