//! Elementwise arithmetic and activations with broadcasting.
//!
//! Backward rules are elementwise expressions too, evaluated by the same
//! generated kernel: `x0` is the incoming gradient, `x1`, `x2` the saved values.

use super::{record, sum_to_shape};
use crate::tensor::Tensor;
use kiln_device::{Elementwise, Operand, Result, UnaryOp};

/// Evaluates an elementwise expression over tensors, with broadcasting (no graph).
pub(crate) fn map(op: &Elementwise<'_>, inputs: &[&Tensor]) -> Result<Tensor> {
    let device = inputs[0].device();
    let operands: Vec<Operand<'_>> = inputs
        .iter()
        .map(|t| Operand::new(t.buffer(), t.shape()))
        .collect();
    let (buffer, shape) = device.elementwise(op, &operands)?;
    Tensor::from_buffer(device, buffer, &shape)
}

/// A broadcasting binary op. `grad_a` / `grad_b` are the partial derivatives
/// times the incoming gradient, as expressions of x0 = gradient, x1 = a, x2 = b.
pub(crate) fn binary(
    a: &Tensor,
    b: &Tensor,
    op: Elementwise<'static>,
    grad_a: &'static str,
    grad_b: &'static str,
) -> Result<Tensor> {
    let out = map(&op, &[a, b])?;
    let (sa, sb) = (a.detach(), b.detach());
    Ok(record(&[a, b], out, op.name, move |g| {
        let partial = |e: &'static str, shape: &[usize]| -> Result<Option<Tensor>> {
            let full = map(&Elementwise::new("binary_grad", e), &[g, &sa, &sb])?;
            Ok(Some(sum_to_shape(&full, shape)?))
        };
        Ok(vec![
            partial(grad_a, sa.shape())?,
            partial(grad_b, sb.shape())?,
        ])
    }))
}

/// A unary op whose derivative reads the input or the output.
fn unary(x: &Tensor, op: UnaryOp, grad: &'static str, saved: Saved) -> Result<Tensor> {
    let forward = op.elementwise();
    let out = map(&forward, &[x])?;
    let keep = match saved {
        Saved::Input => x.detach(),
        Saved::Output => out.detach(),
    };
    let scalars = forward.scalars;
    Ok(record(&[x], out, forward.name, move |g| {
        let mut rule = Elementwise::new("unary_grad", grad);
        rule.scalars = scalars;
        Ok(vec![Some(map(&rule, &[g, &keep])?)])
    }))
}

#[derive(Clone, Copy)]
enum Saved {
    Input,
    Output,
}

impl Tensor {
    /// `self + other`, broadcasting like numpy.
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        binary(self, other, Elementwise::new("add", "x0 + x1"), "x0", "x0")
    }

    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        binary(self, other, Elementwise::new("sub", "x0 - x1"), "x0", "-x0")
    }

    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        binary(
            self,
            other,
            Elementwise::new("mul", "x0 * x1"),
            "x0 * x2",
            "x0 * x1",
        )
    }

    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        binary(
            self,
            other,
            Elementwise::new("div", "x0 / x1"),
            "x0 / x2",
            "-x0 * x1 / (x2 * x2)",
        )
    }

    /// `self^other` elementwise, broadcasting (`self` positive where `other`
    /// is not an integer).
    pub fn pow(&self, other: &Tensor) -> Result<Tensor> {
        binary(
            self,
            other,
            Elementwise::new("pow", "pow(x0, x1)"),
            "x0 * x2 * pow(x1, x2 - 1.0)",
            "x0 * pow(x1, x2) * log(x1)",
        )
    }

    /// The larger of the two, elementwise; the gradient goes to the larger
    /// (to `self` on ties).
    pub fn maximum(&self, other: &Tensor) -> Result<Tensor> {
        binary(
            self,
            other,
            Elementwise::new("maximum", "max(x0, x1)"),
            "select(0.0, x0, x1 >= x2)",
            "select(x0, 0.0, x1 >= x2)",
        )
    }

    pub fn abs(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Abs, "x0 * sign(x1)", Saved::Input)
    }

    pub fn neg(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Neg, "-x0", Saved::Input)
    }

    pub fn add_scalar(&self, s: f32) -> Result<Tensor> {
        unary(self, UnaryOp::AddScalar(s), "x0", Saved::Input)
    }

    pub fn mul_scalar(&self, s: f32) -> Result<Tensor> {
        unary(self, UnaryOp::MulScalar(s), "x0 * s0", Saved::Input)
    }

    /// `self^p` elementwise (for positive inputs unless `p` is an integer).
    pub fn pow_scalar(&self, p: f32) -> Result<Tensor> {
        unary(
            self,
            UnaryOp::PowScalar(p),
            "x0 * s0 * pow(x1, s0 - 1.0)",
            Saved::Input,
        )
    }

    pub fn square(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Square, "2.0 * x0 * x1", Saved::Input)
    }

    pub fn exp(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Exp, "x0 * x1", Saved::Output)
    }

    pub fn log(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Log, "x0 / x1", Saved::Input)
    }

    pub fn sqrt(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Sqrt, "0.5 * x0 / x1", Saved::Output)
    }

    pub fn relu(&self) -> Result<Tensor> {
        unary(
            self,
            UnaryOp::Relu,
            "select(0.0, x0, x1 > 0.0)",
            Saved::Input,
        )
    }

    pub fn leaky_relu(&self, slope: f32) -> Result<Tensor> {
        unary(
            self,
            UnaryOp::LeakyRelu(slope),
            "select(s0 * x0, x0, x1 > 0.0)",
            Saved::Input,
        )
    }

    pub fn sigmoid(&self) -> Result<Tensor> {
        unary(
            self,
            UnaryOp::Sigmoid,
            "x0 * x1 * (1.0 - x1)",
            Saved::Output,
        )
    }

    pub fn tanh(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Tanh, "x0 * (1.0 - x1 * x1)", Saved::Output)
    }

    /// Exact GELU, `x * Phi(x)`; its derivative is `Phi(x) + x * phi(x)`.
    pub fn gelu(&self) -> Result<Tensor> {
        unary(
            self,
            UnaryOp::Gelu,
            "x0 * (0.5 * (1.0 + kiln_erf(x1 * 0.70710678118654752)) \
             + x1 * 0.39894228040143268 * exp(-0.5 * x1 * x1))",
            Saved::Input,
        )
    }
}
