//! Elementwise arithmetic and activations with broadcasting, all through one
//! mechanism: an op is a forward expression, evaluated by the generated
//! elementwise kernel, and per input a gradient expression, evaluated by the
//! same kernel in the backward pass. Expressions compose by substitution, so
//! a chain such as bias + activation becomes one kernel each way
//! ([`Tensor::add_then`]).
//!
//! Gradient expressions read `x0` = the incoming gradient, `x1` = the op's
//! output and `x2`, `x3` = its inputs. Only the variables an expression uses
//! are bound, a gradient that is the incoming one (`x0`) costs no kernel, and
//! equal gradient expressions are evaluated once.

use super::{record, sum_to_shape};
use crate::tensor::Tensor;
use kiln_device::{DeviceError, Elementwise, Operand, Result, UnaryOp};

/// Evaluates an elementwise expression over tensors, with broadcasting (no graph).
pub(crate) fn map(op: &Elementwise<'_>, inputs: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = inputs.first() else {
        return Err(DeviceError::Shape {
            op: op.name,
            message: "an elementwise expression needs at least one input tensor".into(),
        });
    };
    let device = first.device();
    let operands: Vec<Operand<'_>> = inputs
        .iter()
        .map(|t| Operand::new(t.buffer(), t.shape()))
        .collect();
    let (buffer, shape) = device.elementwise(op, &operands)?;
    Tensor::from_buffer(device, buffer, &shape)
}

/// `expr` with every variable `x<i>` replaced by `rename(i)`, in one pass (a
/// replacement is never renamed again).
pub(crate) fn rename_vars(expr: &str, mut rename: impl FnMut(usize) -> String) -> String {
    let bytes = expr.as_bytes();
    let mut out = String::with_capacity(expr.len());
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let digits = bytes[i + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let ends_word = bytes
            .get(i + 1 + digits)
            .is_none_or(|b| !(b.is_ascii_alphanumeric() || *b == b'_'));
        if bytes[i] == b'x' && starts_word && digits > 0 && ends_word {
            let index = expr[i + 1..i + 1 + digits].parse().expect("digits");
            out.push_str(&rename(index));
            i += 1 + digits;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

/// The indices `i` of the variables `x<i>` that `expr` reads.
fn variables(expr: &str) -> Vec<usize> {
    let mut found = Vec::new();
    rename_vars(expr, |i| {
        found.push(i);
        String::new()
    });
    found
}

/// Whether `expr` reads a variable `x<i>` for which `wanted(i)` holds.
pub(crate) fn reads_var(expr: &str, wanted: impl FnMut(usize) -> bool) -> bool {
    variables(expr).into_iter().any(wanted)
}

/// `op(x0 + x1)` as an expression, with the op's scalars and name: a bias
/// (or residual) and an activation in one kernel.
pub(crate) fn after_sum(op: UnaryOp) -> (String, [f32; 4], &'static str) {
    let unary = op.elementwise();
    let expr = rename_vars(unary.expr, |_| "(x0 + x1)".to_string());
    (expr, unary.scalars, unary.name)
}

/// A product epilogue's expression and scalars for a layer's bias (`x1`)
/// and then `activation`, if any: [`after_sum`], or the plain sum.
pub(crate) fn bias_then(activation: Option<UnaryOp>) -> (String, [f32; 4]) {
    match activation {
        Some(op) => {
            let (expr, scalars, _) = after_sum(op);
            (expr, scalars)
        }
        None => ("x0 + x1".to_string(), [0.0; 4]),
    }
}

/// Evaluates `expr` over those of `inputs` it names, renumbered from `x0`:
/// unused inputs are not bound (so they cannot keep a broadcast input from
/// the packed vec4 path).
pub(crate) fn map_used(
    name: &'static str,
    expr: &str,
    scalars: [f32; 4],
    inputs: &[&Tensor],
) -> Result<Tensor> {
    let mut used: Vec<usize> = Vec::new();
    let compact = rename_vars(expr, |i| {
        let slot = used.iter().position(|&u| u == i).unwrap_or_else(|| {
            used.push(i);
            used.len() - 1
        });
        format!("x{slot}")
    });
    let bound: Vec<&Tensor> = used
        .iter()
        .map(|&i| {
            inputs.get(i).copied().ok_or_else(|| DeviceError::Shape {
                op: name,
                message: format!(
                    "expression {expr:?} reads x{i}, only {} inputs",
                    inputs.len()
                ),
            })
        })
        .collect::<Result<_>>()?;
    if bound.is_empty() {
        return Err(DeviceError::Shape {
            op: name,
            message: format!("expression {expr:?} reads no input"),
        });
    }
    map(&Elementwise::new(name, &compact).scalars(&scalars), &bound)
}

/// An elementwise op: `forward` over the inputs `x0..`, and for each input its
/// gradient (see the module docs for the variables).
pub(crate) struct Rule {
    pub name: &'static str,
    pub forward: String,
    pub partials: Vec<String>,
    pub scalars: [f32; 4],
}

/// Runs `rule` over `inputs` (broadcasting) as one kernel and records its
/// backward pass.
pub(crate) fn fused(inputs: &[&Tensor], rule: Rule) -> Result<Tensor> {
    let out = map_used(rule.name, &rule.forward, rule.scalars, inputs)?;
    // Keep for the backward pass only what some gradient reads (an add keeps
    // nothing), so activations are not held longer than they must be.
    let mut reads = vec![false; inputs.len() + 2];
    for i in rule.partials.iter().flat_map(|p| variables(p)) {
        if let Some(r) = reads.get_mut(i) {
            *r = true;
        }
    }
    let keep = |read: bool, t: &Tensor| read.then(|| t.detach());
    let y = keep(reads[1], &out);
    let saved: Vec<Option<Tensor>> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| keep(reads[i + 2], t))
        .collect();
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
    let needed: Vec<bool> = inputs.iter().map(|t| t.is_requires_grad()).collect();
    Ok(record(inputs, out, rule.name, move |g| {
        // Variables no gradient reads are never bound; `g` fills their slots.
        let mut vars: Vec<&Tensor> = vec![g, y.as_ref().unwrap_or(g)];
        vars.extend(saved.iter().map(|t| t.as_ref().unwrap_or(g)));
        let mut done: Vec<(&str, Tensor)> = Vec::new();
        let mut grads = Vec::with_capacity(shapes.len());
        for ((partial, shape), &need) in rule.partials.iter().zip(&shapes).zip(&needed) {
            if !need {
                grads.push(None);
                continue;
            }
            let full = if partial == "x0" {
                g.clone()
            } else if let Some((_, t)) = done.iter().find(|(e, _)| e == partial) {
                t.clone()
            } else {
                let t = map_used("elementwise_grad", partial, rule.scalars, &vars)?;
                done.push((partial, t.clone()));
                t
            };
            grads.push(Some(sum_to_shape(&full, shape)?));
        }
        Ok(grads)
    }))
}

/// A broadcasting binary op; `grad_a` / `grad_b` as in the module docs.
pub(crate) fn binary(
    a: &Tensor,
    b: &Tensor,
    op: Elementwise<'static>,
    grad_a: &str,
    grad_b: &str,
) -> Result<Tensor> {
    fused(
        &[a, b],
        Rule {
            name: op.name,
            forward: op.expr.to_string(),
            partials: vec![grad_a.to_string(), grad_b.to_string()],
            scalars: op.scalars,
        },
    )
}

/// The gradient of a unary op, as in the module docs (`x1` its output, `x2`
/// its input).
fn derivative(op: UnaryOp) -> &'static str {
    match op {
        UnaryOp::Neg => "-x0",
        UnaryOp::Abs => "x0 * sign(x2)",
        UnaryOp::Exp => "x0 * x1",
        UnaryOp::Log => "x0 / x2",
        UnaryOp::Sqrt => "0.5 * x0 / x1",
        UnaryOp::Rsqrt => "-0.5 * x0 * x1 * x1 * x1",
        UnaryOp::Recip => "-x0 * x1 * x1",
        UnaryOp::Square => "2.0 * x0 * x2",
        UnaryOp::Sin => "x0 * cos(x2)",
        UnaryOp::Cos => "-x0 * sin(x2)",
        // From the output (positive exactly where the input is), so a fused
        // dense layer need not keep its pre-activation.
        UnaryOp::Relu => "select(0.0, x0, x1 > 0.0)",
        UnaryOp::LeakyRelu(_) => "select(s0 * x0, x0, x2 > 0.0)",
        UnaryOp::Sigmoid => "x0 * x1 * (1.0 - x1)",
        UnaryOp::Tanh => "x0 * (1.0 - x1 * x1)",
        // Exact GELU, x * Phi(x): the derivative is Phi(x) + x * phi(x).
        UnaryOp::Gelu => {
            "x0 * (0.5 * (1.0 + kiln_erf(x2 * 0.70710678118654752)) \
             + x2 * 0.39894228040143268 * exp(-0.5 * x2 * x2))"
        }
        UnaryOp::Erf => "x0 * 1.1283791670955126 * exp(-x2 * x2)",
        UnaryOp::AddScalar(_) => "x0",
        UnaryOp::MulScalar(_) => "x0 * s0",
        // PyTorch's: 0 for an exponent of 0, also at 0 where the rule
        // would give 0 * inf.
        UnaryOp::PowScalar(_) => "select(x0 * s0 * kiln_pow(x2, s0 - 1.0), 0.0, s0 == 0.0)",
    }
}

/// The gradient of `op` from the incoming gradient (`x0`) and the op's
/// output (`x1`) alone, where its derivative needs nothing else: what an op
/// fused after another kernel, which never writes the op's input, can use.
pub(crate) fn output_derivative(op: UnaryOp) -> Option<String> {
    let expr = derivative(op);
    (!reads_var(expr, |i| i >= 2)).then(|| expr.to_string())
}

fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    let forward = op.elementwise();
    fused(
        &[x],
        Rule {
            name: forward.name,
            forward: forward.expr.to_string(),
            partials: vec![derivative(op).to_string()],
            scalars: forward.scalars,
        },
    )
}

impl Tensor {
    /// `op(self + other)` as one kernel, broadcasting like numpy: a layer's
    /// bias and activation, or a residual sum and its activation, without the
    /// intermediate sum ever being written. The backward pass is one kernel
    /// too (plus the sum over broadcast axes).
    pub fn add_then(&self, other: &Tensor, op: UnaryOp) -> Result<Tensor> {
        let (forward, scalars, name) = after_sum(op);
        // The unary derivative reads its own input as x2: here that is the
        // sum of this op's two inputs, x2 + x3.
        let partial = rename_vars(derivative(op), |i| match i {
            2 => "(x2 + x3)".to_string(),
            i => format!("x{i}"),
        });
        fused(
            &[self, other],
            Rule {
                name,
                forward,
                partials: vec![partial.clone(), partial],
                scalars,
            },
        )
    }

    /// `self + other`, broadcasting like numpy.
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        binary(self, other, Elementwise::new("add", "x0 + x1"), "x0", "x0")
    }

    /// `self - other`, broadcasting like numpy.
    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        binary(self, other, Elementwise::new("sub", "x0 - x1"), "x0", "-x0")
    }

    /// `self * other` elementwise, broadcasting like numpy.
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        binary(
            self,
            other,
            Elementwise::new("mul", "x0 * x1"),
            "x0 * x3",
            "x0 * x2",
        )
    }

    /// `self / other` elementwise, broadcasting like numpy.
    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        binary(
            self,
            other,
            Elementwise::new("div", "x0 / x1"),
            "x0 / x3",
            "-x0 * x1 / x3",
        )
    }

    /// `self^other` elementwise, broadcasting, as PyTorch defines it: a
    /// negative `self` takes an integer `other` (NaN otherwise), `0^0 = 1`.
    /// The gradient for `self` is 0 where `other` is 0, and the one for
    /// `other` 0 where `self` is 0 and `other` at least 0.
    pub fn pow(&self, other: &Tensor) -> Result<Tensor> {
        binary(
            self,
            other,
            kiln_device::BinaryOp::Pow.elementwise(),
            "select(x0 * x3 * kiln_pow(x2, x3 - 1.0), 0.0, x3 == 0.0)",
            "select(x0 * x1 * log(x2), 0.0, x2 == 0.0 && x3 >= 0.0)",
        )
    }

    /// The larger of the two, elementwise; the gradient goes to the larger,
    /// half to each on ties (as PyTorch splits it).
    pub fn maximum(&self, other: &Tensor) -> Result<Tensor> {
        binary(
            self,
            other,
            Elementwise::new("maximum", "max(x0, x1)"),
            "select(select(0.0, x0, x2 > x3), 0.5 * x0, x2 == x3)",
            "select(select(0.0, x0, x3 > x2), 0.5 * x0, x2 == x3)",
        )
    }

    /// `|self|` elementwise (gradient 0 at 0).
    pub fn abs(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Abs)
    }

    /// `-self`.
    pub fn neg(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Neg)
    }

    /// `self + s`.
    pub fn add_scalar(&self, s: f32) -> Result<Tensor> {
        unary(self, UnaryOp::AddScalar(s))
    }

    /// `self * s`.
    pub fn mul_scalar(&self, s: f32) -> Result<Tensor> {
        unary(self, UnaryOp::MulScalar(s))
    }

    /// `self^p` elementwise, as PyTorch defines it: a negative input takes an
    /// integer `p` (NaN otherwise), `0^0 = 1`.
    pub fn pow_scalar(&self, p: f32) -> Result<Tensor> {
        unary(self, UnaryOp::PowScalar(p))
    }

    /// `self * self`.
    pub fn square(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Square)
    }

    /// `e^self` elementwise.
    pub fn exp(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Exp)
    }

    /// Natural logarithm, elementwise.
    pub fn log(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Log)
    }

    /// Square root, elementwise.
    pub fn sqrt(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Sqrt)
    }

    /// `max(self, 0)` elementwise (gradient 0 at 0).
    pub fn relu(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Relu)
    }

    /// `self` where positive, else `slope * self`.
    pub fn leaky_relu(&self, slope: f32) -> Result<Tensor> {
        unary(self, UnaryOp::LeakyRelu(slope))
    }

    /// Logistic sigmoid, `1 / (1 + e^-self)`.
    pub fn sigmoid(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Sigmoid)
    }

    /// Hyperbolic tangent, elementwise.
    pub fn tanh(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Tanh)
    }

    /// Exact GELU, `x * Phi(x)`.
    pub fn gelu(&self) -> Result<Tensor> {
        unary(self, UnaryOp::Gelu)
    }

    /// Any named unary op, with its gradient.
    pub fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        unary(self, op)
    }
}
