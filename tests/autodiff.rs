//! Autodiff: every op's forward against an f64 CPU reference and its gradient
//! against central differences of that reference, on seeded random inputs with
//! broadcasting and odd shapes.
//!
//! Tolerances: forward values within 1e-4 relative + 1e-5 absolute; gradients
//! within 1e-3 relative + 1e-4 of the largest reference gradient (the GPU runs in
//! f32; the reference differences in f64 with step 1e-6).

mod common;

use common::{broadcast_reference, device, erf, random_vec};
use kiln::device::UnaryOp;
use kiln::graph::{loss, Padding, Tensor};

type CpuFn<'a> = dyn Fn(&[Vec<f64>]) -> Vec<f64> + 'a;

struct Input {
    data: Vec<f32>,
    shape: Vec<usize>,
}

fn input(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Input {
    Input {
        data: random_vec(shape.iter().product(), seed, lo, hi),
        shape: shape.to_vec(),
    }
}

/// Backpropagates `sum(y * r)` for a seeded random `r` and returns `r`: a
/// random upstream gradient, which a backward pass that ignored it could
/// not match (a constant one could).
fn backward_weighted(y: &Tensor, seed: u64) -> Vec<f32> {
    let r = random_vec(y.numel(), seed, -1.0, 1.0);
    let weights = Tensor::from_slice(y.device(), &r, y.shape()).unwrap();
    y.mul(&weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    r
}

/// Checks `gpu` against `cpu`: forward values, then the gradient of
/// `sum(f(x) * r)` for fixed random weights `r` with respect to every input.
fn grad_check(
    name: &str,
    inputs: &[Input],
    gpu: impl Fn(&[Tensor]) -> kiln::graph::Result<Tensor>,
    cpu: &CpuFn<'_>,
) {
    grad_check_frozen(name, inputs, &[], gpu, cpu);
}

/// Checks `gpu`'s forward values against `cpu`'s, the inputs at `frozen`
/// needing no gradient; returns the input tensors, the output and the inputs
/// in f64 for the gradient checks.
fn forward_check(
    name: &str,
    inputs: &[Input],
    frozen: &[usize],
    gpu: impl Fn(&[Tensor]) -> kiln::graph::Result<Tensor>,
    cpu: &CpuFn<'_>,
) -> (Vec<Tensor>, Tensor, Vec<Vec<f64>>) {
    let d = device();
    let tensors: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(k, i)| {
            Tensor::from_slice(d, &i.data, &i.shape)
                .unwrap()
                .requires_grad(!frozen.contains(&k))
        })
        .collect();
    let y = gpu(&tensors).unwrap();
    let x64: Vec<Vec<f64>> = inputs
        .iter()
        .map(|i| i.data.iter().map(|&v| f64::from(v)).collect())
        .collect();
    let want = cpu(&x64);
    let got = y.to_vec().unwrap();
    assert_eq!(got.len(), want.len(), "{name}: output size");
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (f64::from(g) - w).abs() <= 1e-4 * w.abs() + 1e-5,
            "{name}: forward element {i}: got {g}, want {w}"
        );
    }
    (tensors, y, x64)
}

/// [`grad_check`] with the inputs at `frozen` needing no gradient (ops take
/// other branches then: a frozen weight skips its product), and checked to
/// get none.
fn grad_check_frozen(
    name: &str,
    inputs: &[Input],
    frozen: &[usize],
    gpu: impl Fn(&[Tensor]) -> kiln::graph::Result<Tensor>,
    cpu: &CpuFn<'_>,
) {
    let (tensors, y, x64) = forward_check(name, inputs, frozen, gpu, cpu);
    let r = backward_weighted(&y, 999);

    let objective =
        |x: &[Vec<f64>]| -> f64 { cpu(x).iter().zip(&r).map(|(v, &w)| v * f64::from(w)).sum() };
    for (k, t) in tensors.iter().enumerate() {
        if frozen.contains(&k) {
            assert!(
                t.grad().is_none(),
                "{name}: frozen input {k} got a gradient"
            );
            continue;
        }
        let analytic = t
            .grad()
            .unwrap_or_else(|| panic!("{name}: no gradient for input {k}"));
        assert_eq!(
            analytic.shape(),
            t.shape(),
            "{name}: gradient shape of input {k}"
        );
        let analytic = analytic.to_vec().unwrap();
        let mut numeric = Vec::with_capacity(analytic.len());
        for i in 0..analytic.len() {
            let h = 1e-6;
            let mut plus = x64.clone();
            plus[k][i] += h;
            let mut minus = x64.clone();
            minus[k][i] -= h;
            numeric.push((objective(&plus) - objective(&minus)) / (2.0 * h));
        }
        let scale = numeric.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for i in 0..analytic.len() {
            let err = (f64::from(analytic[i]) - numeric[i]).abs();
            assert!(
                err <= 1e-3 * numeric[i].abs() + 1e-4 * scale.max(1e-3),
                "{name}: d/d(input {k})[{i}]: got {}, want {} (error {err:e})",
                analytic[i],
                numeric[i]
            );
        }
    }
}

/// CPU reference of a broadcasting binary op.
fn cpu_binary(shapes: [Vec<usize>; 2], f: fn(f64, f64) -> f64) -> Box<CpuFn<'static>> {
    Box::new(move |x: &[Vec<f64>]| {
        let (idx_a, idx_b, _) = broadcast_indices(&shapes[0], &shapes[1]);
        idx_a
            .iter()
            .zip(&idx_b)
            .map(|(&i, &j)| f(x[0][i], x[1][j]))
            .collect()
    })
}

/// For each element of the broadcast output, the element of `a` and of `b` it reads.
fn broadcast_indices(a: &[usize], b: &[usize]) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let na: usize = a.iter().product();
    let nb: usize = b.iter().product();
    let ia: Vec<f32> = (0..na).map(|i| i as f32).collect();
    let ib: Vec<f32> = (0..nb).map(|i| i as f32).collect();
    let (pairs, shape) = broadcast_reference(&[a, b], &[&ia, &ib], |v| v[0] * 1e6 + v[1]);
    let ia = pairs.iter().map(|p| (p / 1e6).floor() as usize).collect();
    let ib = pairs.iter().map(|p| (p % 1e6).round() as usize).collect();
    (ia, ib, shape)
}

#[test]
fn broadcasting_arithmetic_gradients() {
    let cases: [(&[usize], &[usize]); 4] = [
        (&[3, 4], &[3, 4]),
        (&[3, 1, 5], &[4, 5]),
        (&[2, 3], &[3]),
        (&[1], &[2, 7]),
    ];
    for (c, (sa, sb)) in cases.iter().enumerate() {
        let a = input(sa, c as u64, -2.0, 2.0);
        // Divisors kept away from zero.
        let b = input(sb, 100 + c as u64, 0.5, 2.0);
        let shapes = [sa.to_vec(), sb.to_vec()];
        let inputs = [a, b];
        grad_check(
            &format!("add {sa:?} {sb:?}"),
            &inputs,
            |t| t[0].add(&t[1]),
            &*cpu_binary(shapes.clone(), |x, y| x + y),
        );
        grad_check(
            &format!("sub {sa:?} {sb:?}"),
            &inputs,
            |t| t[0].sub(&t[1]),
            &*cpu_binary(shapes.clone(), |x, y| x - y),
        );
        grad_check(
            &format!("mul {sa:?} {sb:?}"),
            &inputs,
            |t| t[0].mul(&t[1]),
            &*cpu_binary(shapes.clone(), |x, y| x * y),
        );
        grad_check(
            &format!("div {sa:?} {sb:?}"),
            &inputs,
            |t| t[0].div(&t[1]),
            &*cpu_binary(shapes.clone(), |x, y| x / y),
        );
    }
}

#[test]
fn unary_gradients() {
    type Case = (
        &'static str,
        f32,
        f32,
        fn(&Tensor) -> kiln::graph::Result<Tensor>,
        fn(f64) -> f64,
    );
    let cases: Vec<Case> = vec![
        ("neg", -3.0, 3.0, |t| t.neg(), |x| -x),
        ("add_scalar", -3.0, 3.0, |t| t.add_scalar(0.5), |x| x + 0.5),
        (
            "mul_scalar",
            -3.0,
            3.0,
            |t| t.mul_scalar(-1.5),
            |x| -1.5 * x,
        ),
        (
            "pow_scalar",
            0.2,
            3.0,
            |t| t.pow_scalar(1.7),
            |x| x.powf(1.7),
        ),
        (
            "pow_scalar of negative inputs, integer exponent",
            -3.0,
            3.0,
            |t| t.pow_scalar(3.0),
            |x| x.powi(3),
        ),
        ("square", -3.0, 3.0, |t| t.square(), |x| x * x),
        ("exp", -3.0, 3.0, |t| t.exp(), f64::exp),
        ("log", 0.2, 3.0, |t| t.log(), f64::ln),
        ("sqrt", 0.2, 3.0, |t| t.sqrt(), f64::sqrt),
        ("relu", -3.0, 3.0, |t| t.relu(), |x| x.max(0.0)),
        (
            "leaky_relu",
            -3.0,
            3.0,
            |t| t.leaky_relu(0.1),
            |x| if x > 0.0 { x } else { 0.1 * x },
        ),
        (
            "sigmoid",
            -5.0,
            5.0,
            |t| t.sigmoid(),
            |x| 1.0 / (1.0 + (-x).exp()),
        ),
        ("tanh", -3.0, 3.0, |t| t.tanh(), f64::tanh),
        (
            "gelu",
            -4.0,
            4.0,
            |t| t.gelu(),
            |x| 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        ),
    ];
    // The ops without a method of their own, through `Tensor::unary`.
    let more: Vec<Case> = vec![
        (
            "rsqrt",
            0.3,
            3.0,
            |t| t.unary(UnaryOp::Rsqrt),
            |x| 1.0 / x.sqrt(),
        ),
        ("recip", 0.3, 3.0, |t| t.unary(UnaryOp::Recip), |x| 1.0 / x),
        ("sin", -3.0, 3.0, |t| t.unary(UnaryOp::Sin), f64::sin),
        ("cos", -3.0, 3.0, |t| t.unary(UnaryOp::Cos), f64::cos),
        ("erf", -2.0, 2.0, |t| t.unary(UnaryOp::Erf), erf),
    ];
    for (i, (name, lo, hi, gpu, cpu)) in cases.into_iter().chain(more).enumerate() {
        let x = input(&[3, 7], 200 + i as u64, lo, hi);
        grad_check(name, &[x], |t| gpu(&t[0]), &|x: &[Vec<f64>]| {
            x[0].iter().map(|&v| cpu(v)).collect()
        });
    }
}

#[test]
fn fused_add_then_activation_gradients() {
    // op(x + bias) in one kernel, bias broadcast over rows, for every
    // activation Dense uses (and one with a parameter).
    type Case = (UnaryOp, fn(f64) -> f64);
    let cases: Vec<Case> = vec![
        (UnaryOp::Relu, |z| z.max(0.0)),
        (UnaryOp::Sigmoid, |z| 1.0 / (1.0 + (-z).exp())),
        (UnaryOp::Tanh, f64::tanh),
        (UnaryOp::Gelu, |z| {
            0.5 * z * (1.0 + erf(z / std::f64::consts::SQRT_2))
        }),
        (
            UnaryOp::LeakyRelu(0.2),
            |z| if z > 0.0 { z } else { 0.2 * z },
        ),
    ];
    for (i, (op, f)) in cases.into_iter().enumerate() {
        let seed = 300 + 2 * i as u64;
        grad_check(
            &format!("add_then {op:?}"),
            &[
                input(&[4, 6], seed, -2.0, 2.0),
                input(&[6], seed + 1, -1.0, 1.0),
            ],
            |t| t[0].add_then(&t[1], op),
            &|x: &[Vec<f64>]| (0..24).map(|j| f(x[0][j] + x[1][j % 6])).collect(),
        );
    }
}

fn cpu_matmul(
    a: &[f64],
    b: &[f64],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    shared_b: bool,
) -> Vec<f64> {
    let mut c = vec![0.0; batch * m * n];
    for z in 0..batch {
        let bo = if shared_b { 0 } else { z * k * n };
        for i in 0..m {
            for j in 0..n {
                c[(z * m + i) * n + j] = (0..k)
                    .map(|p| a[(z * m + i) * k + p] * b[bo + p * n + j])
                    .sum();
            }
        }
    }
    c
}

#[test]
fn matmul_gradients() {
    grad_check(
        "matmul 2-D",
        &[input(&[5, 7], 1, -1.0, 1.0), input(&[7, 3], 2, -1.0, 1.0)],
        |t| t[0].matmul(&t[1]),
        &|x: &[Vec<f64>]| cpu_matmul(&x[0], &x[1], 1, 5, 7, 3, false),
    );
    grad_check(
        "matmul batched",
        &[
            input(&[3, 4, 6], 3, -1.0, 1.0),
            input(&[3, 6, 5], 4, -1.0, 1.0),
        ],
        |t| t[0].matmul(&t[1]),
        &|x: &[Vec<f64>]| cpu_matmul(&x[0], &x[1], 3, 4, 6, 5, false),
    );
    grad_check(
        "matmul batched by shared",
        &[
            input(&[2, 5, 8], 5, -1.0, 1.0),
            input(&[8, 3], 6, -1.0, 1.0),
        ],
        |t| t[0].matmul(&t[1]),
        &|x: &[Vec<f64>]| cpu_matmul(&x[0], &x[1], 2, 5, 8, 3, true),
    );
    // Either operand frozen: its product is skipped, the other's still
    // runs (plain and batched-by-shared, whose weight gradient sums over
    // the batch).
    for frozen in [0, 1] {
        grad_check_frozen(
            &format!("matmul 2-D, operand {frozen} frozen"),
            &[input(&[5, 7], 7, -1.0, 1.0), input(&[7, 3], 8, -1.0, 1.0)],
            &[frozen],
            |t| t[0].matmul(&t[1]),
            &|x: &[Vec<f64>]| cpu_matmul(&x[0], &x[1], 1, 5, 7, 3, false),
        );
        grad_check_frozen(
            &format!("matmul batched by shared, operand {frozen} frozen"),
            &[
                input(&[2, 5, 8], 9, -1.0, 1.0),
                input(&[8, 3], 10, -1.0, 1.0),
            ],
            &[frozen],
            |t| t[0].matmul(&t[1]),
            &|x: &[Vec<f64>]| cpu_matmul(&x[0], &x[1], 2, 5, 8, 3, true),
        );
    }
}

#[test]
fn dense_layer_gradients() {
    // activation(x W + b): fused into the product for None, ReLU, sigmoid and
    // tanh (their derivatives read the output); GELU and leaky ReLU take the
    // unfused path. 2-D input and a [batch, steps, features] sequence.
    type Case = (Option<UnaryOp>, fn(f64) -> f64);
    let cases: Vec<Case> = vec![
        (None, |z| z),
        (Some(UnaryOp::Relu), |z| z.max(0.0)),
        (Some(UnaryOp::Sigmoid), |z| 1.0 / (1.0 + (-z).exp())),
        (Some(UnaryOp::Tanh), f64::tanh),
        (Some(UnaryOp::Gelu), |z| {
            0.5 * z * (1.0 + erf(z / std::f64::consts::SQRT_2))
        }),
        (Some(UnaryOp::LeakyRelu(0.2)), |z| {
            if z > 0.0 {
                z
            } else {
                0.2 * z
            }
        }),
    ];
    let (k, n) = (7, 6);
    for (i, (op, f)) in cases.into_iter().enumerate() {
        for x_shape in [vec![5, k], vec![2, 3, k]] {
            let seed = 400 + 3 * i as u64;
            let rows = x_shape[..x_shape.len() - 1].iter().product::<usize>();
            grad_check(
                &format!("dense {op:?} {x_shape:?}"),
                &[
                    input(&x_shape, seed, -1.0, 1.0),
                    input(&[k, n], seed + 1, -1.0, 1.0),
                    input(&[n], seed + 2, -1.0, 1.0),
                ],
                |t| t[0].dense(&t[1], &t[2], op),
                &|x: &[Vec<f64>]| {
                    let product = cpu_matmul(&x[0], &x[1], 1, rows, k, n, false);
                    (0..rows * n).map(|j| f(product[j] + x[2][j % n])).collect()
                },
            );
        }
    }
    // A frozen weight under a trainable bias (fine-tuning a head's bias
    // only): the bias gradient cannot ride on the skipped weight product,
    // and the input gradient still flows; also a frozen input (data).
    for (frozen, what) in [(vec![1], "weight"), (vec![0], "input")] {
        for op in [None, Some(UnaryOp::Relu)] {
            grad_check_frozen(
                &format!("dense {op:?}, frozen {what}"),
                &[
                    input(&[5, k], 450, -1.0, 1.0),
                    input(&[k, n], 451, -1.0, 1.0),
                    input(&[n], 452, -1.0, 1.0),
                ],
                &frozen,
                |t| t[0].dense(&t[1], &t[2], op),
                &move |x: &[Vec<f64>]| {
                    let product = cpu_matmul(&x[0], &x[1], 1, 5, k, n, false);
                    let f = |z: f64| if op.is_some() { z.max(0.0) } else { z };
                    (0..5 * n).map(|j| f(product[j] + x[2][j % n])).collect()
                },
            );
        }
    }
    // A weight per batch entry ([3, 6, 5]) cannot fuse: the product, then
    // the bias and activation as ops of their own.
    for op in [None, Some(UnaryOp::Relu)] {
        grad_check(
            &format!("dense {op:?} with a batched weight"),
            &[
                input(&[3, 4, 6], 460, -1.0, 1.0),
                input(&[3, 6, 5], 461, -1.0, 1.0),
                input(&[5], 462, -1.0, 1.0),
            ],
            |t| t[0].dense(&t[1], &t[2], op),
            &move |x: &[Vec<f64>]| {
                let product = cpu_matmul(&x[0], &x[1], 3, 4, 6, 5, false);
                let f = |z: f64| if op.is_some() { z.max(0.0) } else { z };
                (0..3 * 4 * 5)
                    .map(|j| f(product[j] + x[2][j % 5]))
                    .collect()
            },
        );
    }
}

/// Whether a dense layer's weight-gradient product also sums its bias
/// gradient (the register and subgroup tilings of CPU adapters); with
/// shared-memory tilings the bias gradient is a reduction of its own.
fn bias_gradients_ride_on_products(d: &kiln::Device) -> bool {
    let x = d.upload(&random_vec(24, 7, -1.0, 1.0)).unwrap();
    let g = d.upload(&random_vec(20, 8, -1.0, 1.0)).unwrap();
    let spec = kiln::device::Matmul::new(6, 5, 4).transpose_a(true);
    d.matmul_column_sums(&x, &g, &spec).unwrap().1.is_some()
}

#[test]
fn a_dense_layer_is_one_kernel_forward_where_the_activation_allows() {
    // Its own device, so other tests' dispatches do not count.
    let d = kiln::Device::new().unwrap();
    let x = Tensor::from_slice(&d, &random_vec(12, 1, -1.0, 1.0), &[4, 3]).unwrap();
    let w = Tensor::from_slice(&d, &random_vec(15, 2, -1.0, 1.0), &[3, 5])
        .unwrap()
        .requires_grad(true);
    let b = Tensor::from_slice(&d, &random_vec(5, 3, -1.0, 1.0), &[5])
        .unwrap()
        .requires_grad(true);
    let dispatches = |op: Option<UnaryOp>| {
        let before = d.dispatch_stats().dispatches;
        x.dense(&w, &b, op).unwrap();
        d.dispatch_stats().dispatches - before
    };
    assert_eq!(dispatches(Some(UnaryOp::Relu)), 1);
    assert_eq!(dispatches(None), 1);
    // GELU's derivative needs the pre-activation, which the fused kernel
    // never writes: product, then bias + GELU.
    assert_eq!(dispatches(Some(UnaryOp::Gelu)), 2);
    // Backward from a cross-entropy loss (whose own gradient is ready): the
    // ReLU mask, then the weight gradient with the bias's in the same kernel
    // (or in one of its own); x needs none.
    // The same for GELU: its derivative, then the weight and bias gradients.
    let backward = if bias_gradients_ride_on_products(&d) {
        2
    } else {
        3
    };
    for op in [UnaryOp::Relu, UnaryOp::Gelu] {
        // (Fresh gradients: accumulating would add a kernel per parameter.)
        w.zero_grad();
        b.zero_grad();
        let y = x.dense(&w, &b, Some(op)).unwrap();
        let l = loss::cross_entropy(&y, &[0, 4, 2, 1]).unwrap();
        let before = d.dispatch_stats().dispatches;
        l.backward().unwrap();
        assert_eq!(d.dispatch_stats().dispatches - before, backward, "{op:?}");
        assert!(w.grad().is_some() && b.grad().is_some());
    }
}

#[test]
fn stacked_dense_layers_pass_activation_derivatives_down() {
    // A dense layer whose input is another's ReLU, sigmoid or tanh applies
    // that derivative in its input-gradient product; the lower layer then
    // skips its own. Checked against central differences for each, and for
    // an activation read by two layers, whose summed gradient must arrive
    // without the derivative.
    type Act = fn(f64) -> f64;
    let acts: [(UnaryOp, Act); 3] = [
        (UnaryOp::Relu, |z| z.max(0.0)),
        (UnaryOp::Sigmoid, |z| 1.0 / (1.0 + (-z).exp())),
        (UnaryOp::Tanh, f64::tanh),
    ];
    let (rows, k, h, n) = (5, 7, 6, 4);
    let layer = |x: &[f64], w: &[f64], b: &[f64], rows, k, n, f: &dyn Fn(f64) -> f64| {
        let product = cpu_matmul(x, w, 1, rows, k, n, false);
        (0..rows * n)
            .map(|j| f(product[j] + b[j % n]))
            .collect::<Vec<_>>()
    };
    // The upper layer with ReLU, and without an activation (a classifier's
    // logits over a hidden layer); the last case feeds a [2, 3, k] input
    // (6 rows).
    let uppers: [(Option<UnaryOp>, Act); 2] =
        [(Some(UnaryOp::Relu), |z| z.max(0.0)), (None, |z| z)];
    for (i, (op, f)) in acts.into_iter().enumerate() {
        for (j, (upper, g)) in uppers.into_iter().enumerate() {
            let seed = 430 + 5 * i as u64 + 100 * j as u64;
            let x_shape = if i == 2 && j == 1 {
                vec![2, 3, k]
            } else {
                vec![rows, k]
            };
            let rows: usize = x_shape[..x_shape.len() - 1].iter().product();
            grad_check(
                &format!("dense {op:?} into dense {upper:?}, input {x_shape:?}"),
                &[
                    input(&x_shape, seed, -1.0, 1.0),
                    input(&[k, h], seed + 1, -1.0, 1.0),
                    input(&[h], seed + 2, -1.0, 1.0),
                    input(&[h, n], seed + 3, -1.0, 1.0),
                    input(&[n], seed + 4, -1.0, 1.0),
                ],
                |t| {
                    t[0].dense(&t[1], &t[2], Some(op))?
                        .dense(&t[3], &t[4], upper)
                },
                &|x: &[Vec<f64>]| {
                    let hidden = layer(&x[0], &x[1], &x[2], rows, k, h, &f);
                    layer(&hidden, &x[3], &x[4], rows, h, n, &g)
                },
            );
        }
    }
    grad_check(
        "dense sigmoid read by two dense layers",
        &[
            input(&[rows, k], 460, -1.0, 1.0),
            input(&[k, h], 461, -1.0, 1.0),
            input(&[h], 462, -1.0, 1.0),
            input(&[h, n], 463, -1.0, 1.0),
            input(&[n], 464, -1.0, 1.0),
            input(&[h, n], 465, -1.0, 1.0),
        ],
        |t| {
            let hidden = t[0].dense(&t[1], &t[2], Some(UnaryOp::Sigmoid))?;
            let zeros = Tensor::zeros(t[0].device(), &[n])?;
            hidden.dense(&t[3], &t[4], None)?.add(&hidden.dense(
                &t[5],
                &zeros,
                Some(UnaryOp::Tanh),
            )?)
        },
        &|x: &[Vec<f64>]| {
            let hidden = layer(&x[0], &x[1], &x[2], rows, k, h, &|z| {
                1.0 / (1.0 + (-z).exp())
            });
            let first = layer(&hidden, &x[3], &x[4], rows, h, n, &|z| z);
            let second = layer(&hidden, &x[5], &[0.0; 4], rows, h, n, &f64::tanh);
            first.iter().zip(&second).map(|(a, b)| a + b).collect()
        },
    );
}

#[test]
fn a_two_layer_mlp_backward_takes_two_kernels() {
    // From a cross-entropy loss, whose gradient is ready: the top layer's
    // weight and bias gradients and its input gradient with the ReLU mask
    // applied as stored (two independent products fused into one kernel),
    // then the bottom layer's weight and bias gradients (one); the input
    // batch needs none. Without fusion it is three. Where bias gradients are
    // reductions of their own, each layer adds one, and they do not share a
    // dispatch with the products.
    let d = kiln::Device::new().unwrap();
    let param = |shape: &[usize], seed| {
        let len = shape.iter().product();
        Tensor::from_slice(&d, &random_vec(len, seed, -1.0, 1.0), shape)
            .unwrap()
            .requires_grad(true)
    };
    let x = Tensor::from_slice(&d, &random_vec(24, 1, -1.0, 1.0), &[4, 6]).unwrap();
    let (w1, b1, w2, b2) = (
        param(&[6, 8], 2),
        param(&[8], 3),
        param(&[8, 5], 4),
        param(&[5], 5),
    );
    let logits = x
        .dense(&w1, &b1, Some(UnaryOp::Relu))
        .unwrap()
        .dense(&w2, &b2, None)
        .unwrap();
    let l = loss::cross_entropy(&logits, &[0, 4, 2, 1]).unwrap();
    let bias_reductions = if bias_gradients_ride_on_products(&d) {
        0
    } else {
        2
    };
    let before = d.dispatch_stats().dispatches;
    l.backward().unwrap();
    let fused = std::env::var("KILN_FUSION").map_or(true, |v| v != "0");
    assert_eq!(
        d.dispatch_stats().dispatches - before,
        if fused { 2 } else { 3 } + bias_reductions
    );
    for p in [&w1, &b1, &w2, &b2] {
        assert!(p.grad().is_some());
    }
}

#[test]
fn shape_and_reduction_gradients() {
    // [2, 3, 4] permuted to [4, 2, 3].
    grad_check(
        "permute",
        &[input(&[2, 3, 4], 10, -1.0, 1.0)],
        |t| t[0].permute(&[2, 0, 1]),
        &|x: &[Vec<f64>]| {
            let mut out = Vec::new();
            for l in 0..4 {
                for i in 0..2 {
                    for j in 0..3 {
                        out.push(x[0][i * 12 + j * 4 + l]);
                    }
                }
            }
            out
        },
    );
    grad_check(
        "transpose then reshape",
        &[input(&[3, 5], 11, -1.0, 1.0)],
        |t| t[0].t()?.reshape(&[15]),
        &|x: &[Vec<f64>]| (0..15).map(|i| x[0][(i % 3) * 5 + i / 3]).collect(),
    );
    for axis in 0..3 {
        let shape = [3, 4, 5];
        let reduce = move |x: &[f64], mean: bool| -> Vec<f64> {
            let (outer, len, inner) = (
                shape[..axis].iter().product::<usize>(),
                shape[axis],
                shape[axis + 1..].iter().product::<usize>(),
            );
            let mut out = vec![0.0; outer * inner];
            for o in 0..outer {
                for l in 0..len {
                    for i in 0..inner {
                        out[o * inner + i] += x[(o * len + l) * inner + i];
                    }
                }
            }
            if mean {
                out.iter_mut().for_each(|v| *v /= len as f64);
            }
            out
        };
        // The same values either way; keepdim changes the shape the
        // gradient comes back through.
        for keepdim in [false, true] {
            grad_check(
                &format!("sum axis {axis} keepdim {keepdim}"),
                &[input(&shape, 12, -1.0, 1.0)],
                |t| t[0].sum(axis, keepdim),
                &move |x: &[Vec<f64>]| reduce(&x[0], false),
            );
            grad_check(
                &format!("mean axis {axis} keepdim {keepdim}"),
                &[input(&shape, 13, -1.0, 1.0)],
                |t| t[0].mean(axis, keepdim),
                &move |x: &[Vec<f64>]| reduce(&x[0], true),
            );
        }
    }
    grad_check(
        "broadcast_to",
        &[input(&[3, 1], 14, -1.0, 1.0)],
        |t| t[0].broadcast_to(&[2, 3, 4]),
        &|x: &[Vec<f64>]| (0..24).map(|i| x[0][(i / 4) % 3]).collect(),
    );
}

fn cpu_log_softmax(x: &[f64], cols: usize) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            row.iter().map(move |v| v - lse).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn softmax_and_loss_gradients() {
    grad_check(
        "softmax",
        &[input(&[4, 7], 20, -5.0, 5.0)],
        |t| t[0].softmax(),
        &|x: &[Vec<f64>]| cpu_log_softmax(&x[0], 7).iter().map(|v| v.exp()).collect(),
    );
    grad_check(
        "log_softmax",
        &[input(&[2, 3, 5], 21, -5.0, 5.0)],
        |t| t[0].log_softmax(),
        &|x: &[Vec<f64>]| cpu_log_softmax(&x[0], 5),
    );
    let labels = [3u32, 0, 6, 2, 2];
    grad_check(
        "cross_entropy",
        &[input(&[5, 7], 22, -4.0, 4.0)],
        |t| loss::cross_entropy(&t[0], &labels),
        &|x: &[Vec<f64>]| {
            let lp = cpu_log_softmax(&x[0], 7);
            let total: f64 = labels
                .iter()
                .enumerate()
                .map(|(i, &l)| -lp[i * 7 + l as usize])
                .sum();
            vec![total / labels.len() as f64]
        },
    );
    grad_check(
        "mse_loss",
        &[input(&[4, 3], 23, -2.0, 2.0), input(&[4, 3], 24, -2.0, 2.0)],
        |t| loss::mse_loss(&t[0], &t[1]),
        &|x: &[Vec<f64>]| {
            vec![
                x[0].iter()
                    .zip(&x[1])
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f64>()
                    / 12.0,
            ]
        },
    );
}

#[test]
fn shared_subexpressions_accumulate_gradients() {
    // y = x * x + x uses x three times: dy/dx = 2x + 1.
    grad_check(
        "x*x + x",
        &[input(&[6], 30, -2.0, 2.0)],
        |t| t[0].mul(&t[0])?.add(&t[0]),
        &|x: &[Vec<f64>]| x[0].iter().map(|v| v * v + v).collect(),
    );
}

#[test]
fn wrong_shapes_name_the_op_and_both_shapes() {
    let d = device();
    let a = Tensor::zeros(d, &[3, 4]).unwrap();
    let b = Tensor::zeros(d, &[5, 6]).unwrap();
    assert_eq!(
        a.matmul(&b).unwrap_err().to_string(),
        "matmul: cannot multiply [3, 4] by [5, 6]"
    );
    let c = Tensor::zeros(d, &[2, 3]).unwrap();
    let e = Tensor::zeros(d, &[4]).unwrap();
    assert_eq!(
        c.add(&e).unwrap_err().to_string(),
        "add: cannot broadcast shapes [2, 3] and [4]"
    );
    assert!(c
        .reshape(&[4, 2])
        .unwrap_err()
        .to_string()
        .contains("cannot reshape [2, 3] to [4, 2]"));
    let loss = c.sum(0, false).unwrap();
    assert!(loss.backward().unwrap_err().to_string().contains("scalar"));

    // Sizes whose arithmetic overflows are errors, not panics or (wrapped)
    // wrong results.
    let img = Tensor::zeros(d, &[1, 1, 5, 5]).unwrap();
    let err = img
        .pad2d_with([[0, 0], [usize::MAX, 1]], 0.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("overflows shape [1, 1, 5, 5]"), "{err}");
    let w = Tensor::zeros(d, &[1, 1, 3, 3]).unwrap();
    let huge = kiln::graph::Conv2d {
        dilation: [1 << 63, 1],
        ..Default::default()
    };
    let err = img.conv2d(&w, None, huge).unwrap_err().to_string();
    assert!(err.contains("does not fit a 5x5 input"), "{err}");
    let far = kiln::graph::Conv2d {
        stride: [1 << 40, 1],
        ..Default::default()
    };
    let err = img.conv2d(&w, None, far).unwrap_err().to_string();
    assert!(err.contains("below 2^32"), "{err}");
    assert!(img.broadcast_to(&[usize::MAX, 2, 5, 5]).is_err());
    // An empty batch keeps its feature count, as PyTorch's flatten does.
    let empty = Tensor::zeros(d, &[0, 3, 4]).unwrap();
    assert_eq!(empty.flatten().unwrap().shape(), [0, 12]);
}

#[test]
fn backward_after_an_in_place_write_of_an_input_is_refused() {
    use kiln::graph::optim::{Optimizer, Sgd};
    let d = device();
    let x = Tensor::from_slice(d, &random_vec(6, 70, -1.0, 1.0), &[2, 3]).unwrap();
    let w = Tensor::from_slice(d, &random_vec(6, 71, -1.0, 1.0), &[3, 2])
        .unwrap()
        .requires_grad(true);
    let mut opt = Sgd::new(vec![w.clone()], 0.1);
    let loss = x.matmul(&w).unwrap().square().unwrap().sum_all().unwrap();
    loss.backward().unwrap();
    opt.step().unwrap();
    // The product's gradient for x would read the stepped w.
    let x = x.requires_grad(true);
    let stale = x.matmul(&w).unwrap().square().unwrap().sum_all().unwrap();
    opt.zero_grad();
    stale.backward().unwrap();
    opt.step().unwrap();
    let err = stale.backward().unwrap_err().to_string();
    assert!(
        err.contains("input 1 [3, 2] of matmul was written in place"),
        "{err}"
    );
    // So would a square's after an assign.
    let y = w.square().unwrap().sum_all().unwrap();
    w.assign(&Tensor::zeros(d, &[3, 2]).unwrap()).unwrap();
    let err = y.backward().unwrap_err().to_string();
    assert!(err.contains("of square was written in place"), "{err}");
    let err = w
        .assign(&Tensor::zeros(d, &[2, 3]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot write [2, 3]"), "{err}");
    // A forward pass after the writes records the new versions.
    w.zero_grad();
    w.square().unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(w.grad().unwrap().to_vec().unwrap(), vec![0.0; 6]);
}

#[test]
fn a_host_copy_answers_reads_until_a_write_through_any_view() {
    let d = device();
    let values = random_vec(6, 72, -1.0, 1.0);
    let x = Tensor::from_slice_with_host_copy(d, &values, &[2, 3]).unwrap();
    let view = x.reshape(&[3, 2]).unwrap();
    let detached = x.detach();
    d.synchronize().unwrap();
    let before = d.dispatch_stats().submits;
    for t in [&x, &view, &detached] {
        assert_eq!(t.to_vec().unwrap(), values);
    }
    assert_eq!(
        d.dispatch_stats().submits,
        before,
        "a read went to the device"
    );
    // A graph through a view, then a write through another: every view
    // reads the new values, and the graph knows its input changed.
    let leaf = x.clone().requires_grad(true);
    let y = leaf
        .reshape(&[3, 2])
        .unwrap()
        .square()
        .unwrap()
        .sum_all()
        .unwrap();
    let new = random_vec(6, 73, -1.0, 1.0);
    let new_tensor = Tensor::from_slice(d, &new, &[2, 3]).unwrap();
    detached.assign(&new_tensor).unwrap();
    for t in [&x, &view, &detached] {
        assert_eq!(t.to_vec().unwrap(), new);
    }
    let err = y.backward().unwrap_err().to_string();
    assert!(err.contains("of square was written in place"), "{err}");
    let err = Tensor::from_slice_with_host_copy(d, &values, &[4])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("shape [4] needs 4 values, got 6"), "{err}");
}

#[test]
fn no_grad_detach_and_freezing() {
    let d = device();
    let w = Tensor::uniform(d, &[4], -1.0, 1.0, 1)
        .unwrap()
        .requires_grad(true);
    let frozen = Tensor::uniform(d, &[4], -1.0, 1.0, 2)
        .unwrap()
        .requires_grad(true);
    frozen.set_requires_grad(false);
    let y = kiln::graph::no_grad(|| w.mul(&w)).unwrap();
    assert!(!y.is_requires_grad());
    assert!(!w.detach().is_requires_grad());
    let loss = w.mul(&frozen).unwrap().sum_all().unwrap();
    loss.backward().unwrap();
    assert!(frozen.grad().is_none(), "a frozen tensor got a gradient");
    let got = w.grad().unwrap().to_vec().unwrap();
    assert_eq!(got, frozen.to_vec().unwrap());
}

#[test]
fn selection_gradients() {
    grad_check(
        "slice",
        &[input(&[3, 5, 4], 40, -1.0, 1.0)],
        |t| t[0].slice(1, 1, 4),
        &|x: &[Vec<f64>]| {
            let mut out = Vec::new();
            for i in 0..3 {
                for j in 1..4 {
                    for k in 0..4 {
                        out.push(x[0][i * 20 + j * 4 + k]);
                    }
                }
            }
            out
        },
    );
    grad_check(
        "concat axis 1",
        &[
            input(&[2, 3], 41, -1.0, 1.0),
            input(&[2, 1], 42, -1.0, 1.0),
            input(&[2, 2], 43, -1.0, 1.0),
        ],
        |t| Tensor::concat(&[&t[0], &t[1], &t[2]], 1),
        &|x: &[Vec<f64>]| {
            let mut out = Vec::new();
            for r in 0..2 {
                out.extend_from_slice(&x[0][r * 3..r * 3 + 3]);
                out.push(x[1][r]);
                out.extend_from_slice(&x[2][r * 2..r * 2 + 2]);
            }
            out
        },
    );
    grad_check(
        "stack axis 1",
        &[input(&[2, 3], 44, -1.0, 1.0), input(&[2, 3], 45, -1.0, 1.0)],
        |t| Tensor::stack(&[&t[0], &t[1]], 1),
        &|x: &[Vec<f64>]| {
            let mut out = Vec::new();
            for r in 0..2 {
                out.extend_from_slice(&x[0][r * 3..r * 3 + 3]);
                out.extend_from_slice(&x[1][r * 3..r * 3 + 3]);
            }
            out
        },
    );
    let d = device();
    let a = Tensor::zeros(d, &[2, 3]).unwrap();
    let b = Tensor::zeros(d, &[3, 3]).unwrap();
    assert!(Tensor::concat(&[&a, &b], 1)
        .unwrap_err()
        .to_string()
        .contains("[[2, 3], [3, 3]]"));
}

#[test]
fn max_min_pow_maximum_abs_gradients() {
    for axis in 0..2 {
        let reduce = move |x: &[f64], max: bool| -> Vec<f64> {
            let (rows, cols) = (4, 6);
            let get = |r: usize, c: usize| x[r * cols + c];
            let pick = |a: f64, b: f64| if max { a.max(b) } else { a.min(b) };
            if axis == 0 {
                (0..cols)
                    .map(|c| (1..rows).fold(get(0, c), |m, r| pick(m, get(r, c))))
                    .collect()
            } else {
                (0..rows)
                    .map(|r| (1..cols).fold(get(r, 0), |m, c| pick(m, get(r, c))))
                    .collect()
            }
        };
        grad_check(
            &format!("max axis {axis}"),
            &[input(&[4, 6], 50, -1.0, 1.0)],
            |t| t[0].max(axis, false),
            &move |x: &[Vec<f64>]| reduce(&x[0], true),
        );
        grad_check(
            &format!("min axis {axis}"),
            &[input(&[4, 6], 51, -1.0, 1.0)],
            |t| t[0].min(axis, true),
            &move |x: &[Vec<f64>]| reduce(&x[0], false),
        );
    }
    grad_check(
        "pow",
        &[input(&[3, 4], 52, 0.5, 2.0), input(&[4], 53, -1.5, 1.5)],
        |t| t[0].pow(&t[1]),
        &|x: &[Vec<f64>]| (0..12).map(|i| x[0][i].powf(x[1][i % 4])).collect(),
    );
    // At a base of 0, PyTorch gives the exponent a gradient of 0 (not
    // 0 * log 0 = NaN), 0^1 the base a gradient of 1 (0^0 = 1), and an
    // exponent of 0 the base a gradient of 0 (not 0 * 0^-1 = 0 * inf).
    let d = common::device();
    let a = Tensor::from_slice(d, &[0.0, 0.0, 1.5, 0.0, -2.0], &[5])
        .unwrap()
        .requires_grad(true);
    let b = Tensor::from_slice(d, &[2.0, 1.0, 2.0, 0.0, 0.0], &[5])
        .unwrap()
        .requires_grad(true);
    a.pow(&b).unwrap().sum_all().unwrap().backward().unwrap();
    let (ga, gb) = (
        a.grad().unwrap().to_vec().unwrap(),
        b.grad().unwrap().to_vec().unwrap(),
    );
    assert_eq!(ga[..2], [0.0, 1.0], "{ga:?}");
    assert!((ga[2] - 3.0).abs() < 1e-5, "{ga:?}");
    assert_eq!(ga[3..], [0.0, 0.0], "{ga:?}");
    assert_eq!(gb[..2], [0.0, 0.0], "{gb:?}");
    assert!((gb[2] - 2.25 * 1.5f32.ln()).abs() < 1e-5, "{gb:?}");
    assert_eq!(gb[3], 0.0, "{gb:?}");
    let x = Tensor::from_slice(d, &[0.0, 1.5, -2.0], &[3])
        .unwrap()
        .requires_grad(true);
    x.pow_scalar(0.0)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(x.grad().unwrap().to_vec().unwrap(), [0.0, 0.0, 0.0]);
    // Ties split the gradient half and half, as PyTorch's maximum does.
    let a = Tensor::from_slice(d, &[1.0, 2.0, 5.0], &[3])
        .unwrap()
        .requires_grad(true);
    let b = Tensor::from_slice(d, &[1.0, 3.0, 4.0], &[3])
        .unwrap()
        .requires_grad(true);
    a.maximum(&b)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(a.grad().unwrap().to_vec().unwrap(), [0.5, 0.0, 1.0]);
    assert_eq!(b.grad().unwrap().to_vec().unwrap(), [0.5, 1.0, 0.0]);
    grad_check(
        "maximum",
        &[input(&[3, 4], 54, -1.0, 1.0), input(&[3, 4], 55, -1.0, 1.0)],
        |t| t[0].maximum(&t[1]),
        &|x: &[Vec<f64>]| (0..12).map(|i| x[0][i].max(x[1][i])).collect(),
    );
    grad_check(
        "abs",
        &[input(&[9], 56, -2.0, 2.0)],
        |t| t[0].abs(),
        &|x: &[Vec<f64>]| x[0].iter().map(|v| v.abs()).collect(),
    );
}

#[test]
fn max_splits_the_gradient_between_ties() {
    let d = device();
    let x = Tensor::from_slice(d, &[1.0, 3.0, 3.0, 2.0], &[4])
        .unwrap()
        .requires_grad(true);
    x.max(0, false).unwrap().backward().unwrap();
    assert_eq!(
        x.grad().unwrap().to_vec().unwrap(),
        vec![0.0, 0.5, 0.5, 0.0]
    );
}

/// Batch-norm reference over `[n, c, rest]`: per channel, the mean and biased
/// variance of the batch (or the given statistics), then gamma and beta.
fn cpu_batch_norm(
    x: &[f64],
    [n, c, rest]: [usize; 3],
    gamma: &[f64],
    beta: &[f64],
    stats: Option<(&[f64], &[f64])>,
) -> Vec<f64> {
    let at = |b: usize, ch: usize, i: usize| x[(b * c + ch) * rest + i];
    let mut out = vec![0.0; x.len()];
    for ch in 0..c {
        let (mean, var) = match stats {
            Some((m, v)) => (m[ch], v[ch]),
            None => {
                let vals: Vec<f64> = (0..n)
                    .flat_map(|b| (0..rest).map(move |i| at(b, ch, i)))
                    .collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                (mean, var)
            }
        };
        for b in 0..n {
            for i in 0..rest {
                out[(b * c + ch) * rest + i] =
                    (at(b, ch, i) - mean) / (var + 1e-5).sqrt() * gamma[ch] + beta[ch];
            }
        }
    }
    out
}

#[test]
fn batch_norm_gradients() {
    for (i, shape) in [vec![4, 3, 2, 5], vec![6, 5], vec![2, 7, 3, 3]]
        .into_iter()
        .enumerate()
    {
        let (n, c) = (shape[0], shape[1]);
        let rest = shape[2..].iter().product::<usize>();
        let seed = 700 + 10 * i as u64;
        grad_check(
            &format!("batch_norm_train {shape:?}"),
            &[
                input(&shape, seed, -2.0, 3.0),
                input(&[c], seed + 1, 0.5, 1.5),
                input(&[c], seed + 2, -0.5, 0.5),
            ],
            |t| Ok(t[0].batch_norm_train(&t[1], &t[2], 1e-5)?.output),
            &move |x: &[Vec<f64>]| cpu_batch_norm(&x[0], [n, c, rest], &x[1], &x[2], None),
        );
        grad_check(
            &format!("batch_norm_eval {shape:?}"),
            &[
                input(&shape, seed + 3, -2.0, 3.0),
                input(&[c], seed + 4, 0.5, 1.5),
                input(&[c], seed + 5, -0.5, 0.5),
                input(&[c], seed + 6, -0.5, 0.5),
                input(&[c], seed + 7, 0.5, 2.0),
            ],
            |t| t[0].batch_norm_eval(&t[1], &t[2], &t[3], &t[4], 1e-5),
            &move |x: &[Vec<f64>]| {
                cpu_batch_norm(&x[0], [n, c, rest], &x[1], &x[2], Some((&x[3], &x[4])))
            },
        );
    }
}

#[test]
fn batch_norm_reports_batch_statistics() {
    let d = device();
    let (n, c, rest) = (5, 3, 4);
    let data = random_vec(n * c * rest, 790, -1.0, 4.0);
    let x = Tensor::from_slice(d, &data, &[n, c, 2, 2]).unwrap();
    let ones = Tensor::ones(d, &[c]).unwrap();
    let zeros = Tensor::zeros(d, &[c]).unwrap();
    let out = x.batch_norm_train(&ones, &zeros, 1e-5).unwrap();
    assert_eq!(out.count, n * rest);
    let (mean, var) = (out.mean.to_vec().unwrap(), out.variance.to_vec().unwrap());
    for ch in 0..c {
        let vals: Vec<f64> = (0..n)
            .flat_map(|b| (0..rest).map(move |i| (b, i)))
            .map(|(b, i)| f64::from(data[(b * c + ch) * rest + i]))
            .collect();
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        let v = vals.iter().map(|x| (x - m).powi(2)).sum::<f64>() / vals.len() as f64;
        assert!(
            (f64::from(mean[ch]) - m).abs() < 1e-5,
            "mean {ch}: {} vs {m}",
            mean[ch]
        );
        assert!(
            (f64::from(var[ch]) - v).abs() < 1e-4 * v,
            "variance {ch}: {} vs {v}",
            var[ch]
        );
    }
    let err = x.batch_norm_train(&Tensor::ones(d, &[4]).unwrap(), &zeros, 1e-5);
    assert!(err.is_err_and(|e| e.to_string().contains("must be [3]")));
}

/// Layer norm in f64 (eps 1e-5) of `rows` rows of `cols` values `value(r, c)`.
fn cpu_layer_norm(
    rows: usize,
    cols: usize,
    value: impl Fn(usize, usize) -> f64,
    gamma: &[f64],
    beta: &[f64],
) -> Vec<f64> {
    let mut out = Vec::new();
    for r in 0..rows {
        let row: Vec<f64> = (0..cols).map(|c| value(r, c)).collect();
        let mean = row.iter().sum::<f64>() / cols as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
        for c in 0..cols {
            out.push((row[c] - mean) / (var + 1e-5).sqrt() * gamma[c] + beta[c]);
        }
    }
    out
}

#[test]
fn layer_norm_gradients() {
    // Short rows, a 3-D input, rows longer than a workgroup is wide, and
    // 201 rows: several workgroups, the last partial, wherever rows share a
    // workgroup (64 to one on CPU adapters).
    // Rows of whole vec4s (300, 12 columns) are read four at a time where an
    // invocation takes a row.
    for (i, shape) in [
        vec![3, 5],
        vec![2, 3, 7],
        vec![2, 300],
        vec![3, 67, 5],
        vec![67, 12],
    ]
    .into_iter()
    .enumerate()
    {
        let cols = *shape.last().unwrap();
        let rows: usize = shape.iter().product::<usize>() / cols;
        let cpu = move |x: &[Vec<f64>]| {
            cpu_layer_norm(rows, cols, |r, c| x[0][r * cols + c], &x[1], &x[2])
        };
        let seed = 60 + 3 * i as u64;
        grad_check(
            &format!("layer_norm {shape:?}"),
            &[
                input(&shape, seed, -2.0, 2.0),
                input(&[cols], seed + 1, 0.5, 1.5),
                input(&[cols], seed + 2, -0.5, 0.5),
            ],
            |t| t[0].layer_norm(&t[1], &t[2], 1e-5),
            &cpu,
        );
    }
}

#[test]
fn add_layer_norm_gradients() {
    // LayerNorm(x + r) in one kernel: both summands get the gradient. 201
    // rows take several workgroups, the last partial, as in layer_norm's.
    for (i, shape) in [[2, 2, 6], [3, 67, 5], [3, 5, 8]].into_iter().enumerate() {
        let cols = shape[2];
        let rows = shape[0] * shape[1];
        let cpu = move |x: &[Vec<f64>]| {
            let sum = |r: usize, c: usize| x[0][r * cols + c] + x[1][r * cols + c];
            cpu_layer_norm(rows, cols, sum, &x[2], &x[3])
        };
        let seed = 90 + 4 * i as u64;
        grad_check(
            &format!("add_layer_norm {shape:?}"),
            &[
                input(&shape, seed, -2.0, 2.0),
                input(&shape, seed + 1, -1.0, 1.0),
                input(&[cols], seed + 2, 0.5, 1.5),
                input(&[cols], seed + 3, -0.5, 0.5),
            ],
            |t| t[0].add_layer_norm(&t[1], &t[2], &t[3], 1e-5),
            &cpu,
        );
    }
}

#[test]
fn embedding_gradient_adds_up_repeated_ids() {
    let ids = [3u32, 1, 3, 0, 3, 1];
    grad_check(
        "embedding",
        &[input(&[5, 4], 70, -1.0, 1.0)],
        |t| t[0].embedding(&ids, &[2, 3]),
        &|x: &[Vec<f64>]| {
            ids.iter()
                .flat_map(|&id| x[0][id as usize * 4..id as usize * 4 + 4].to_vec())
                .collect()
        },
    );
    let d = device();
    let table = Tensor::zeros(d, &[5, 4]).unwrap();
    assert!(table
        .embedding(&[5], &[1])
        .unwrap_err()
        .to_string()
        .contains("id 5 out of range"));
}

#[test]
fn a_loss_backward_from_itself_uses_its_fused_gradient() {
    // `loss.backward()` seeds with exactly 1, so cross-entropy hands back the
    // gradient its forward kernel computed, with no multiply; checked against
    // central differences, then accumulated by a second backward pass.
    let d = device();
    let labels = [2u32, 9, 0, 1, 9, 2];
    let x = random_vec(18, 85, -3.0, 3.0);
    let cpu = |x: &[f64]| -> f64 {
        let lp = cpu_log_softmax(x, 3);
        let counted: Vec<usize> = (0..6).filter(|&i| labels[i] != 9).collect();
        -counted
            .iter()
            .map(|&i| lp[i * 3 + labels[i] as usize])
            .sum::<f64>()
            / counted.len() as f64
    };
    let options = loss::CrossEntropy {
        reduction: loss::Reduction::Mean,
        ignore_index: Some(9),
    };
    let logits = Tensor::from_slice(d, &x, &[6, 3])
        .unwrap()
        .requires_grad(true);
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let numeric: Vec<f64> = (0..18)
        .map(|i| {
            let h = 1e-6;
            let (mut plus, mut minus) = (x64.clone(), x64.clone());
            plus[i] += h;
            minus[i] -= h;
            (cpu(&plus) - cpu(&minus)) / (2.0 * h)
        })
        .collect();
    for pass in 1..=2 {
        let l = loss::cross_entropy_with(&logits, &labels, options).unwrap();
        assert!((f64::from(l.item().unwrap()) - cpu(&x64)).abs() < 1e-5);
        l.backward().unwrap();
        let got = logits.grad().unwrap().to_vec().unwrap();
        for i in 0..18 {
            let want = f64::from(pass) * numeric[i];
            assert!(
                (f64::from(got[i]) - want).abs() < 1e-5,
                "pass {pass}, element {i}: got {}, want {want}",
                got[i]
            );
        }
    }
}

#[test]
fn loss_variants() {
    let targets = random_vec(12, 80, 0.0, 1.0);
    grad_check(
        "bce with logits",
        &[input(&[3, 4], 81, -30.0, 30.0)],
        |t| {
            let tt = Tensor::from_slice(device(), &targets, &[3, 4])?;
            loss::binary_cross_entropy_with_logits(&t[0], &tt, loss::Reduction::Mean)
        },
        &|x: &[Vec<f64>]| {
            let total: f64 = x[0]
                .iter()
                .zip(&targets)
                .map(|(&z, &t)| z.max(0.0) - z * f64::from(t) + (1.0 + (-z.abs()).exp()).ln())
                .sum();
            vec![total / 12.0]
        },
    );
    // With respect to the targets too (soft labels that are themselves
    // outputs), and with the sum and per-element reductions.
    let bce = |z: f64, t: f64| z.max(0.0) - z * t + (1.0 + (-z.abs()).exp()).ln();
    grad_check(
        "bce with logits and targets, sum",
        &[input(&[3, 4], 83, -5.0, 5.0), input(&[3, 4], 84, 0.0, 1.0)],
        |t| loss::binary_cross_entropy_with_logits(&t[0], &t[1], loss::Reduction::Sum),
        &|x: &[Vec<f64>]| vec![x[0].iter().zip(&x[1]).map(|(&z, &t)| bce(z, t)).sum()],
    );
    grad_check(
        "bce with logits and targets, per element",
        &[input(&[2, 5], 85, -5.0, 5.0), input(&[2, 5], 86, 0.0, 1.0)],
        |t| loss::binary_cross_entropy_with_logits(&t[0], &t[1], loss::Reduction::None),
        &|x: &[Vec<f64>]| x[0].iter().zip(&x[1]).map(|(&z, &t)| bce(z, t)).collect(),
    );
    let labels = [2u32, 9, 0, 9];
    let options = loss::CrossEntropy {
        reduction: loss::Reduction::Sum,
        ignore_index: Some(9),
    };
    grad_check(
        "cross_entropy sum, ignore 9",
        &[input(&[4, 3], 82, -3.0, 3.0)],
        |t| loss::cross_entropy_with(&t[0], &labels, options),
        &|x: &[Vec<f64>]| {
            let lp = cpu_log_softmax(&x[0], 3);
            vec![-lp[2] - lp[6]]
        },
    );
    // Per-sample losses (ignored rows give 0), and a mean over counted rows.
    let labels = [2u32, 9, 0, 9, 1];
    let per_row = |x: &[Vec<f64>]| -> Vec<f64> {
        let lp = cpu_log_softmax(&x[0], 3);
        labels
            .iter()
            .enumerate()
            .map(|(i, &l)| if l == 9 { 0.0 } else { -lp[i * 3 + l as usize] })
            .collect()
    };
    for reduction in [loss::Reduction::None, loss::Reduction::Mean] {
        let options = loss::CrossEntropy {
            reduction,
            ignore_index: Some(9),
        };
        grad_check(
            &format!("cross_entropy {reduction:?}, ignore 9"),
            &[input(&[5, 3], 84, -3.0, 3.0)],
            |t| loss::cross_entropy_with(&t[0], &labels, options),
            &|x: &[Vec<f64>]| {
                let rows = per_row(x);
                match reduction {
                    loss::Reduction::None => rows,
                    _ => vec![rows.iter().sum::<f64>() / 3.0],
                }
            },
        );
    }
    let probs = [0.1f32, 0.7, 0.2, 0.5, 0.25, 0.25];
    grad_check(
        "categorical cross entropy",
        &[input(&[2, 3], 83, -3.0, 3.0)],
        |t| {
            let p = Tensor::from_slice(device(), &probs, &[2, 3])?;
            loss::categorical_cross_entropy(&t[0], &p)
        },
        &|x: &[Vec<f64>]| {
            let lp = cpu_log_softmax(&x[0], 3);
            vec![-(0..6).map(|i| f64::from(probs[i]) * lp[i]).sum::<f64>() / 2.0]
        },
    );
}

#[test]
fn dropout_is_seeded_scaled_and_differentiable() {
    let d = device();
    let n = 20_000;
    let x = Tensor::from_slice(d, &random_vec(n, 90, 0.5, 1.5), &[n])
        .unwrap()
        .requires_grad(true);
    let y = x.dropout(0.3, 42, true).unwrap();
    let (xv, yv) = (x.to_vec().unwrap(), y.to_vec().unwrap());
    let dropped = yv.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
    assert!((dropped - 0.3).abs() < 0.02, "dropped fraction {dropped}");
    for (a, b) in xv.iter().zip(&yv) {
        assert!(
            *b == 0.0 || (b - a / 0.7).abs() <= 1e-6 * b.abs(),
            "{a} -> {b}"
        );
    }
    assert_eq!(
        x.dropout(0.3, 42, true).unwrap().to_vec().unwrap(),
        yv,
        "same seed, same mask"
    );
    assert_ne!(
        x.dropout(0.3, 43, true).unwrap().to_vec().unwrap(),
        yv,
        "other seed, other mask"
    );
    assert_eq!(
        x.dropout(0.3, 42, false).unwrap().to_vec().unwrap(),
        xv,
        "identity in eval"
    );
    // d(sum(y * r))/dx is r times the mask times 1/(1-p), for random r.
    let r = backward_weighted(&y, 91);
    let g = x.grad().unwrap().to_vec().unwrap();
    for i in 0..n {
        let want = if yv[i] == 0.0 { 0.0 } else { r[i] / 0.7 };
        assert!(
            (g[i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
            "grad {i}: {} vs {want}",
            g[i]
        );
    }
}

#[test]
fn f16_storage_converts_and_passes_gradients_through() {
    let d = device();
    let x = Tensor::from_slice(d, &[1.5, -2.25, 1000.0, 0.1], &[4])
        .unwrap()
        .requires_grad(true);
    let h = x.to_dtype(kiln::device::DType::F16).unwrap();
    assert_eq!(h.dtype(), kiln::device::DType::F16);
    let back = h.to_vec().unwrap();
    assert_eq!(back[..3], [1.5, -2.25, 1000.0]);
    assert!((back[3] - 0.1).abs() < 1e-4);
    // f32 ops refuse f16 storage with a clear error, and work after converting back.
    let err = h.relu().unwrap_err().to_string();
    assert!(err.contains("F16"), "{err}");
    let y = h
        .to_dtype(kiln::device::DType::F32)
        .unwrap()
        .mul_scalar(3.0)
        .unwrap();
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec().unwrap(), vec![3.0; 4]);
    // A random gradient crosses the f16 step rounded to f16 (it is stored
    // there on its way back), into an f32 leaf and into an f16 one.
    use kiln::device::{half::f16, DType};
    let values = random_vec(21, 92, -4.0, 4.0);
    let rounded: Vec<f32> = random_vec(21, 93, -1.0, 1.0)
        .iter()
        .map(|&v| f16::from_f32(v).to_f32())
        .collect();
    let x = Tensor::from_slice(d, &values, &[3, 7])
        .unwrap()
        .requires_grad(true);
    let y = x
        .to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    backward_weighted(&y, 93);
    assert_eq!(x.grad().unwrap().to_vec().unwrap(), rounded);
    let x16 = Tensor::from_slice(d, &values, &[3, 7])
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap()
        .requires_grad(true);
    backward_weighted(&x16.to_dtype(DType::F32).unwrap(), 93);
    let grad = x16.grad().unwrap();
    assert_eq!(grad.dtype(), DType::F16);
    assert_eq!(grad.to_vec().unwrap(), rounded);
    // A second backward adds to the f16 gradient (exactly: it doubles).
    backward_weighted(&x16.to_dtype(DType::F32).unwrap(), 93);
    let grad = x16.grad().unwrap();
    assert_eq!(grad.dtype(), DType::F16);
    let doubled: Vec<f32> = rounded.iter().map(|v| 2.0 * v).collect();
    assert_eq!(grad.to_vec().unwrap(), doubled);
    // Two casts of one f16 tensor in one pass: their f16 gradients add up,
    // and with an autocast product's f32 gradient beside them too.
    x16.zero_grad();
    let r = Tensor::from_slice(d, &random_vec(21, 94, -1.0, 1.0), &[3, 7]).unwrap();
    let twice = x16
        .to_dtype(DType::F32)
        .unwrap()
        .add(&x16.to_dtype(DType::F32).unwrap().mul(&r).unwrap())
        .unwrap();
    twice.sum_all().unwrap().backward().unwrap();
    let want: Vec<f32> = r
        .to_vec()
        .unwrap()
        .iter()
        .map(|&v| f16::from_f32(1.0 + f16::from_f32(v).to_f32()).to_f32())
        .collect();
    assert_eq!(x16.grad().unwrap().to_vec().unwrap(), want);
    x16.zero_grad();
    let w = Tensor::from_slice(d, &random_vec(7 * 2, 95, -1.0, 1.0), &[7, 2]).unwrap();
    let mixed = kiln::graph::amp::autocast(|| x16.matmul(&w))
        .unwrap()
        .sum_all()
        .unwrap()
        .add(&x16.to_dtype(DType::F32).unwrap().sum_all().unwrap())
        .unwrap();
    mixed.backward().unwrap();
    let g = x16.grad().unwrap().to_vec().unwrap();
    let wv = w.to_vec().unwrap();
    for (i, gi) in g.iter().enumerate() {
        // d/dx[r][c] = sum_j w[c][j] (w rounded to f16 under autocast) + 1.
        let c = i % 7;
        let want: f32 = (0..2)
            .map(|j| f16::from_f32(wv[c * 2 + j]).to_f32())
            .sum::<f32>()
            + 1.0;
        assert!((gi - want).abs() < 2e-3, "grad {i}: {gi} vs {want}");
    }
}

/// f64 reference of PyTorch's conv2d (cross-correlation), NCHW.
#[allow(clippy::too_many_arguments)]
fn cpu_conv2d(
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    [n, c, h, wd]: [usize; 4],
    [o, kh, kw]: [usize; 3],
    stride: [usize; 2],
    pad: [usize; 2],
    dil: [usize; 2],
) -> Vec<f64> {
    let oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) / stride[0] + 1;
    let ow = (wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) / stride[1] + 1;
    let mut out = vec![0.0; n * o * oh * ow];
    for b_ in 0..n {
        for oc in 0..o {
            for y in 0..oh {
                for xx in 0..ow {
                    let mut acc = b.map_or(0.0, |b| b[oc]);
                    for ic in 0..c {
                        for a in 0..kh {
                            for bb in 0..kw {
                                let iy = (y * stride[0] + a * dil[0]) as isize - pad[0] as isize;
                                let ix = (xx * stride[1] + bb * dil[1]) as isize - pad[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                acc += x[((b_ * c + ic) * h + iy as usize) * wd + ix as usize]
                                    * w[((oc * c + ic) * kh + a) * kw + bb];
                            }
                        }
                    }
                    out[((b_ * o + oc) * oh + y) * ow + xx] = acc;
                }
            }
        }
    }
    out
}

#[test]
fn pad2d_gradients() {
    // Uneven pads on every side, a fill that is not zero, and a rank-3 input
    // (the last two dims are padded, whatever comes before).
    let cases: [(Vec<usize>, [[usize; 2]; 2]); 2] = [
        (vec![2, 3, 4, 5], [[1, 2], [0, 3]]),
        (vec![3, 2, 6], [[2, 0], [1, 1]]),
    ];
    for (i, (shape, pads)) in cases.into_iter().enumerate() {
        let fill = 0.75;
        let r = shape.len();
        let (h, w) = (shape[r - 2], shape[r - 1]);
        let (hp, wp) = (h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1]);
        let outer: usize = shape[..r - 2].iter().product();
        grad_check(
            &format!("pad2d_with {shape:?} {pads:?}"),
            &[input(&shape, 395 + i as u64, -1.0, 1.0)],
            |t| t[0].pad2d_with(pads, fill),
            &move |x: &[Vec<f64>]| {
                let mut out = vec![f64::from(fill); outer * hp * wp];
                for o in 0..outer {
                    for y in 0..h {
                        for xx in 0..w {
                            out[(o * hp + y + pads[0][0]) * wp + xx + pads[1][0]] =
                                x[0][(o * h + y) * w + xx];
                        }
                    }
                }
                out
            },
        );
    }
}

#[test]
fn conv2d_gradients() {
    use kiln::graph::Conv2d;
    // (input [n, c, h, w], weight [o, kh, kw], stride, padding, dilation)
    type Case = ([usize; 4], [usize; 3], [usize; 2], [usize; 2], [usize; 2]);
    // Patches of c * kh * kw = 27, 27, 30, 18, 25 (rows padded to a multiple
    // of 4 for the products) and 36.
    let cases: [Case; 6] = [
        ([2, 3, 7, 6], [5, 3, 3], [1, 1], [0, 0], [1, 1]),
        ([2, 4, 6, 6], [3, 3, 3], [1, 2], [1, 0], [1, 1]),
        ([2, 3, 9, 7], [4, 3, 3], [2, 2], [1, 1], [1, 1]),
        ([1, 5, 8, 10], [3, 2, 3], [2, 1], [1, 2], [1, 1]),
        ([3, 2, 9, 9], [2, 3, 3], [1, 2], [0, 1], [2, 2]),
        ([2, 1, 5, 5], [7, 5, 5], [1, 1], [2, 2], [1, 1]),
    ];
    for (i, (xs, [o, kh, kw], stride, padding, dilation)) in cases.into_iter().enumerate() {
        let c = xs[1];
        let conv = Conv2d {
            stride,
            padding,
            dilation,
        };
        let seed = 300 + 10 * i as u64;
        grad_check(
            &format!("conv2d {xs:?} w [{o}, {c}, {kh}, {kw}] {conv:?}"),
            &[
                input(&xs, seed, -1.0, 1.0),
                input(&[o, c, kh, kw], seed + 1, -1.0, 1.0),
                input(&[o], seed + 2, -1.0, 1.0),
            ],
            |t| t[0].conv2d(&t[1], Some(&t[2]), conv),
            &move |x: &[Vec<f64>]| {
                cpu_conv2d(
                    &x[0],
                    &x[1],
                    Some(&x[2]),
                    xs,
                    [o, kh, kw],
                    stride,
                    padding,
                    dilation,
                )
            },
        );
    }
    // Without a bias: the product stored plainly, then moved to NCHW.
    let (xs, [o, kh, kw], stride, padding) = ([2, 3, 7, 6], [4, 3, 3], [2, 1], [1, 0]);
    let conv = Conv2d {
        stride,
        padding,
        dilation: [1, 1],
    };
    grad_check(
        "conv2d without a bias",
        &[
            input(&xs, 370, -1.0, 1.0),
            input(&[o, xs[1], kh, kw], 371, -1.0, 1.0),
        ],
        |t| t[0].conv2d(&t[1], None, conv),
        &move |x: &[Vec<f64>]| {
            cpu_conv2d(&x[0], &x[1], None, xs, [o, kh, kw], stride, padding, [1, 1])
        },
    );
    // A layer's convolution: input [2, 3, 9, 7], four 3x3 filters, stride
    // [2, 1], padding [1, 1] and a bias, then `f`, with the inputs at
    // `frozen` needing no gradient.
    let (xs, [o, kh, kw]) = ([2, 3, 9, 7], [4, 3, 3]);
    let conv = Conv2d {
        stride: [2, 1],
        padding: [1, 1],
        dilation: [1, 1],
    };
    type Gpu<'a> = &'a dyn Fn(&[Tensor]) -> kiln::graph::Result<Tensor>;
    let layer_case = |name: &str, seed: u64, frozen: &[usize], gpu: Gpu, f: fn(f64) -> f64| {
        grad_check_frozen(
            name,
            &[
                input(&xs, seed, -1.0, 1.0),
                input(&[o, 3, kh, kw], seed + 1, -1.0, 1.0),
                input(&[o], seed + 2, -1.0, 1.0),
            ],
            frozen,
            gpu,
            &move |x: &[Vec<f64>]| {
                let z = cpu_conv2d(
                    &x[0],
                    &x[1],
                    Some(&x[2]),
                    xs,
                    [o, kh, kw],
                    conv.stride,
                    conv.padding,
                    conv.dilation,
                );
                z.into_iter().map(f).collect()
            },
        );
    };
    // With the layer's activation: bias and ReLU, sigmoid or tanh in the
    // product's epilogue, GELU as a kernel of its own.
    type Act = (UnaryOp, fn(f64) -> f64);
    let acts: [Act; 4] = [
        (UnaryOp::Relu, |z| z.max(0.0)),
        (UnaryOp::Sigmoid, |z| 1.0 / (1.0 + (-z).exp())),
        (UnaryOp::Tanh, f64::tanh),
        (UnaryOp::Gelu, |z| {
            0.5 * z * (1.0 + erf(z / std::f64::consts::SQRT_2))
        }),
    ];
    for (i, (op, f)) in acts.into_iter().enumerate() {
        let gpu = move |t: &[Tensor]| t[0].conv2d_then(&t[1], &t[2], conv, op);
        layer_case(
            &format!("conv2d then {op:?}"),
            360 + 3 * i as u64,
            &[],
            &gpu,
            f,
        );
    }
    // A frozen input (a network's first layer, whose images need no
    // gradient) skips the input gradient's product and col2im; a frozen
    // weight skips the weight gradient's product.
    for frozen in [0, 1] {
        let gpu = move |t: &[Tensor]| t[0].conv2d(&t[1], Some(&t[2]), conv);
        let name = format!("conv2d with input {frozen} frozen");
        layer_case(&name, 380 + 3 * frozen as u64, &[frozen], &gpu, |z| z);
    }
    let d = device();
    let x = Tensor::zeros(d, &[1, 3, 5, 5]).unwrap();
    let w = Tensor::zeros(d, &[2, 4, 3, 3]).unwrap();
    let err = x
        .conv2d(&w, None, Conv2d::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has 3 channels") && err.contains("expects 4"),
        "{err}"
    );
}

/// Pooling reference; `same` pads as TensorFlow (extra cell at the end) and
/// ignores padded cells.
fn cpu_pool(
    x: &[f64],
    [n, c, h, w]: [usize; 4],
    k: [usize; 2],
    s: [usize; 2],
    max: bool,
    same: bool,
) -> Vec<f64> {
    let out_and_pad = |size: usize, d: usize| {
        if same {
            let out = size.div_ceil(s[d]);
            let total = ((out - 1) * s[d] + k[d]).saturating_sub(size);
            (out, (total / 2) as isize)
        } else {
            ((size - k[d]) / s[d] + 1, 0)
        }
    };
    let ((oh, ph), (ow, pw)) = (out_and_pad(h, 0), out_and_pad(w, 1));
    let mut out = Vec::new();
    for b in 0..n {
        for ch in 0..c {
            for y in 0..oh {
                for xx in 0..ow {
                    let mut vals = Vec::new();
                    for a in 0..k[0] {
                        for bb in 0..k[1] {
                            let row = (y * s[0] + a) as isize - ph;
                            let col = (xx * s[1] + bb) as isize - pw;
                            if (0..h as isize).contains(&row) && (0..w as isize).contains(&col) {
                                let (row, col) = (row as usize, col as usize);
                                vals.push(x[((b * c + ch) * h + row) * w + col]);
                            }
                        }
                    }
                    out.push(if max {
                        vals.iter().cloned().fold(f64::MIN, f64::max)
                    } else {
                        vals.iter().sum::<f64>() / vals.len() as f64
                    });
                }
            }
        }
    }
    out
}

#[test]
fn max_pooling_sends_a_tied_windows_gradient_to_its_first_maximum() {
    // As PyTorch: overlapping 2x2 windows at stride 1 over a plane whose
    // top-left 2x2 block ties; each window's gradient goes to the first of
    // its tied maxima in row-major order, the others get none from it.
    let d = device();
    #[rustfmt::skip]
    let x = [
        5.0, 5.0, 1.0,
        5.0, 5.0, 2.0,
        0.0, 3.0, 4.0,
    ];
    let t = Tensor::from_slice(d, &x, &[1, 1, 3, 3])
        .unwrap()
        .requires_grad(true);
    let y = t.max_pool2d([2, 2], [1, 1]).unwrap();
    assert_eq!(y.to_vec().unwrap(), vec![5.0, 5.0, 5.0, 5.0]);
    let g = Tensor::from_slice(d, &[1.0, 10.0, 100.0, 1000.0], &[1, 1, 2, 2]).unwrap();
    y.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
    #[rustfmt::skip]
    let want = vec![
        1.0, 10.0, 0.0,
        100.0, 1000.0, 0.0,
        0.0, 0.0, 0.0,
    ];
    assert_eq!(t.grad().unwrap().to_vec().unwrap(), want);
}

#[test]
fn pooling_gradients() {
    for (i, (shape, k, s)) in [
        ([2, 3, 6, 6], [2, 2], [2, 2]),
        ([1, 5, 7, 9], [3, 2], [2, 3]),
        ([2, 2, 5, 5], [3, 3], [1, 1]),
        // Disjoint windows (the max pool's scatter) that leave a row and
        // columns uncovered.
        ([2, 3, 7, 9], [2, 2], [2, 2]),
        ([1, 2, 7, 8], [3, 2], [3, 2]),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 400 + 10 * i as u64;
        grad_check(
            &format!("max_pool2d {shape:?} k {k:?} s {s:?}"),
            &[input(&shape, seed, -1.0, 1.0)],
            |t| t[0].max_pool2d(k, s),
            &move |x: &[Vec<f64>]| cpu_pool(&x[0], shape, k, s, true, false),
        );
        grad_check(
            &format!("avg_pool2d {shape:?} k {k:?} s {s:?}"),
            &[input(&shape, seed + 1, -1.0, 1.0)],
            |t| t[0].avg_pool2d(k, s),
            &move |x: &[Vec<f64>]| cpu_pool(&x[0], shape, k, s, false, false),
        );
    }
    // "same": odd sizes need the extra cell at the end, and stride 3 over 8
    // leaves windows that overhang both borders.
    for (i, (shape, k, s)) in [
        ([2, 3, 7, 5], [2, 2], [2, 2]),
        ([1, 2, 8, 6], [3, 3], [3, 1]),
        ([2, 5, 4, 7], [3, 2], [1, 2]),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 460 + 10 * i as u64;
        grad_check(
            &format!("max_pool2d same {shape:?} k {k:?} s {s:?}"),
            &[input(&shape, seed, -1.0, 1.0)],
            |t| t[0].max_pool2d_padded(k, s, Padding::Same),
            &move |x: &[Vec<f64>]| cpu_pool(&x[0], shape, k, s, true, true),
        );
        grad_check(
            &format!("avg_pool2d same {shape:?} k {k:?} s {s:?}"),
            &[input(&shape, seed + 1, -1.0, 1.0)],
            |t| t[0].avg_pool2d_padded(k, s, Padding::Same),
            &move |x: &[Vec<f64>]| cpu_pool(&x[0], shape, k, s, false, true),
        );
    }
    grad_check(
        "global_avg_pool2d then flatten",
        &[input(&[2, 3, 4, 5], 450, -1.0, 1.0)],
        |t| t[0].global_avg_pool2d()?.flatten(),
        &|x: &[Vec<f64>]| {
            x[0].chunks(20)
                .map(|c| c.iter().sum::<f64>() / 20.0)
                .collect()
        },
    );
}

/// LSTM reference over `[b, t, e]` input, Keras gate order (i, f, g, o) and
/// weight layout; masked steps keep the previous state and repeat its output.
fn cpu_lstm(x: &[Vec<f64>], mask: &[f32], [b, t, e, h]: [usize; 4]) -> Vec<f64> {
    let (input, w_ih, w_hh, bias) = (&x[0], &x[1], &x[2], &x[3]);
    let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
    let mut out = Vec::with_capacity(b * t * h);
    for bi in 0..b {
        let (mut hs, mut cs) = (vec![0.0; h], vec![0.0; h]);
        for ti in 0..t {
            if mask[bi * t + ti] > 0.5 {
                let pre: Vec<f64> = (0..4 * h)
                    .map(|k| {
                        let from_x: f64 = (0..e)
                            .map(|i| input[(bi * t + ti) * e + i] * w_ih[i * 4 * h + k])
                            .sum();
                        let from_h: f64 = (0..h).map(|j| hs[j] * w_hh[j * 4 * h + k]).sum();
                        bias[k] + from_x + from_h
                    })
                    .collect();
                for j in 0..h {
                    let (i, f) = (sigmoid(pre[j]), sigmoid(pre[h + j]));
                    let (g, o) = (pre[2 * h + j].tanh(), sigmoid(pre[3 * h + j]));
                    cs[j] = f * cs[j] + i * g;
                    hs[j] = o * cs[j].tanh();
                }
            }
            out.extend_from_slice(&hs);
        }
    }
    out
}

#[test]
fn lstm_gradients_with_masking() {
    // A hidden size that is not a multiple of 4 runs step by step (recurrent
    // matmul, then the gate kernel, one lane per sample and unit: 20 x 5 =
    // 100 lanes take two workgroups of 64, the second partial); the others
    // run as one dispatch per
    // sequence, whose workgroups split the batch into groups of 8 rows (17
    // and 5 samples leave partial groups; 17 on two cores puts two groups in
    // a workgroup and one sample in another). Backward items take 1, 2 and
    // 4 quads of units at 4, 8 and 16 units.
    let cases = [
        [3, 5, 3, 3],
        [20, 4, 3, 5],
        [2, 4, 8, 4],
        [17, 3, 2, 4],
        [5, 6, 3, 8],
        [3, 4, 2, 16],
    ];
    for (case, [b, t, e, h]) in cases.into_iter().enumerate() {
        // Sample 0 has no padding, sample 1 trailing padding, sample 2 leading
        // padding and a hole; later samples repeat these.
        let masks = [
            vec![1.0; t],
            (0..t).map(|i| if i + 2 < t { 1.0 } else { 0.0 }).collect(),
            (0..t)
                .map(|i| if i == 0 || i == 2 { 0.0 } else { 1.0 })
                .collect::<Vec<f32>>(),
        ];
        let mask: Vec<f32> = masks.iter().cycle().take(b).flatten().copied().collect();
        let seed = 900 + 10 * case as u64;
        let inputs = [
            input(&[b, t, e], seed, -1.0, 1.0),
            input(&[e, 4 * h], seed + 1, -0.6, 0.6),
            input(&[h, 4 * h], seed + 2, -0.6, 0.6),
            input(&[4 * h], seed + 3, -0.5, 0.5),
        ];
        let gpu_mask = mask.clone();
        grad_check(
            &format!("lstm sequence b{b} t{t} e{e} h{h}"),
            &inputs,
            |x| {
                let m = Tensor::from_slice(x[0].device(), &gpu_mask, &[b, t])?;
                x[0].lstm(&x[1], &x[2], &x[3], Some(&m))
            },
            &|x: &[Vec<f64>]| cpu_lstm(x, &mask, [b, t, e, h]),
        );
        // Only the last step's output, as return_sequences=False uses it.
        let gpu_mask = mask.clone();
        grad_check(
            &format!("lstm last step b{b} t{t} e{e} h{h}"),
            &inputs,
            |x| {
                let m = Tensor::from_slice(x[0].device(), &gpu_mask, &[b, t])?;
                x[0].lstm(&x[1], &x[2], &x[3], Some(&m))?.slice(1, t - 1, t)
            },
            &|x: &[Vec<f64>]| {
                let all = cpu_lstm(x, &mask, [b, t, e, h]);
                all.chunks(t * h)
                    .flat_map(|s| s[(t - 1) * h..].to_vec())
                    .collect()
            },
        );
        // No mask, with the input (data) or the input kernel frozen: the
        // backward skips their products.
        let unmasked = vec![1.0; b * t];
        for frozen in [vec![], vec![0], vec![1, 3]] {
            grad_check_frozen(
                &format!("lstm unmasked b{b} t{t} e{e} h{h}, frozen {frozen:?}"),
                &inputs,
                &frozen,
                |x| x[0].lstm(&x[1], &x[2], &x[3], None),
                &|x: &[Vec<f64>]| cpu_lstm(x, &unmasked, [b, t, e, h]),
            );
        }
    }
}

#[test]
fn lstm_forward_matches_the_reference_at_wider_hidden_sizes() {
    // Too many weights for finite differences: the forward pass alone, at
    // hidden sizes whose rows of h take each lane of a CPU adapter's
    // per-unit kernel (one unit per lane, subgroups of 8 sharing h) fewer
    // than one quad (24 units: 6 quads) and two (64 units), with masking
    // and a batch that splits unevenly over workgroups.
    for (case, [b, t, e, h]) in [[17, 5, 3, 24], [9, 4, 2, 64]].into_iter().enumerate() {
        let mask: Vec<f32> = (0..b * t)
            .map(|i| if i % 7 == 3 { 0.0 } else { 1.0 })
            .collect();
        let seed = 950 + 10 * case as u64;
        let inputs = [
            input(&[b, t, e], seed, -1.0, 1.0),
            input(&[e, 4 * h], seed + 1, -0.6, 0.6),
            input(&[h, 4 * h], seed + 2, -0.3, 0.3),
            input(&[4 * h], seed + 3, -0.5, 0.5),
        ];
        let gpu_mask = mask.clone();
        forward_check(
            &format!("lstm b{b} t{t} e{e} h{h}"),
            &inputs,
            &[0, 1, 2, 3],
            |x| {
                let m = Tensor::from_slice(x[0].device(), &gpu_mask, &[b, t])?;
                x[0].lstm(&x[1], &x[2], &x[3], Some(&m))
            },
            &|x: &[Vec<f64>]| cpu_lstm(x, &mask, [b, t, e, h]),
        );
    }
}

#[test]
fn lstm_shape_errors_name_the_expected_shapes() {
    let d = device();
    let x = Tensor::zeros(d, &[2, 3, 4]).unwrap();
    let err = x
        .lstm(
            &Tensor::zeros(d, &[4, 8]).unwrap(),
            &Tensor::zeros(d, &[2, 8]).unwrap(),
            &Tensor::zeros(d, &[7]).unwrap(),
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("bias [8]") && err.contains("[7]"), "{err}");
}

/// Multi-head attention reference in f64: per sample and head,
/// softmax(q k^T / sqrt(d) + bias) v, where `bias(sample, head, query, key)`
/// is added to the scaled scores.
fn cpu_attention(
    x: &[Vec<f64>],
    bias: &dyn Fn(usize, usize, usize, usize) -> f64,
    [b, t, h, heads]: [usize; 4],
) -> Vec<f64> {
    let d = h / heads;
    let at = |m: &[f64], bi: usize, ti: usize, j: usize| m[(bi * t + ti) * h + j];
    let mut out = vec![0.0; b * t * h];
    for bi in 0..b {
        for head in 0..heads {
            for i in 0..t {
                let scores: Vec<f64> = (0..t)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|c| {
                                at(&x[0], bi, i, head * d + c) * at(&x[1], bi, j, head * d + c)
                            })
                            .sum();
                        dot / (d as f64).sqrt() + bias(bi, head, i, j)
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let norm: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for c in 0..d {
                    out[(bi * t + i) * h + head * d + c] = (0..t)
                        .map(|j| (scores[j] - max).exp() / norm * at(&x[2], bi, j, head * d + c))
                        .sum();
                }
            }
        }
    }
    out
}

#[test]
fn scaled_softmax_with_a_bias_gradient() {
    // [2, 3, 5] scores, a [2, 5] bias shared by each sample's 3 rows, or
    // none (the bias kept at zero in the reference).
    let (groups, block, cols, scale) = (2, 3, 5, 0.6);
    let bias = random_vec(groups * cols, 960, -1.5, 1.5);
    for with_bias in [true, false] {
        let bias64: Vec<f64> = bias
            .iter()
            .map(|&v| if with_bias { f64::from(v) } else { 0.0 })
            .collect();
        grad_check(
            &format!("softmax_scaled, bias {with_bias}"),
            &[input(&[groups, block, cols], 961, -2.0, 2.0)],
            |x| {
                let b = Tensor::from_slice(x[0].device(), &bias, &[groups, cols])?;
                x[0].softmax_scaled(scale as f32, with_bias.then_some(&b))
            },
            &|x: &[Vec<f64>]| {
                let mut out = Vec::new();
                for (r, row) in x[0].chunks(cols).enumerate() {
                    let z: Vec<f64> = row
                        .iter()
                        .zip(&bias64[(r / block) * cols..])
                        .map(|(v, b)| scale * v + b)
                        .collect();
                    let m = z.iter().cloned().fold(f64::MIN, f64::max);
                    let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
                    out.extend(z.iter().map(|v| (v - m).exp() / sum));
                }
                out
            },
        );
    }
}

#[test]
fn attention_with_a_general_bias_matches_the_fused_padding_path() {
    use kiln::models::bert::multi_head_attention;
    use kiln::models::Mode;
    let d = device();
    let (b, t, h, heads) = (2, 4, 6, 2);
    let qkv: Vec<Tensor> = (0..3)
        .map(|i| {
            Tensor::from_slice(d, &random_vec(b * t * h, 970 + i, -1.0, 1.0), &[b, t, h]).unwrap()
        })
        .collect();
    let mask: Vec<f32> = (0..b * t)
        .map(|i| if i % t == 3 && i >= t { -1e9 } else { 0.0 })
        .collect();
    let padding = Tensor::from_slice(d, &mask, &[b, 1, 1, t]).unwrap();
    // The same mask spelt out per head and query takes the unfused path.
    let full: Vec<f32> = (0..b * heads * t * t)
        .map(|i| mask[(i / (heads * t * t)) * t + i % t])
        .collect();
    let full = Tensor::from_slice(d, &full, &[b, heads, t, t]).unwrap();
    let run = |bias: &Tensor| {
        multi_head_attention(
            &qkv[0],
            &qkv[1],
            &qkv[2],
            bias,
            heads,
            0.0,
            &mut Mode::eval(),
        )
        .unwrap()
        .to_vec()
        .unwrap()
    };
    let (fused, general) = (run(&padding), run(&full));
    for (i, (f, g)) in fused.iter().zip(&general).enumerate() {
        assert!((f - g).abs() < 1e-5, "element {i}: {f} vs {g}");
    }
}

/// Gradient check of multi-head attention over random q, k, v `[b, t, h]`
/// with an additive `bias` of `bias_shape`, whose value for (sample, head,
/// query, key) the reference reads from `bias_at`.
fn attention_grad_check(
    name: &str,
    [b, t, h, heads]: [usize; 4],
    (bias, bias_shape): (Vec<f32>, Vec<usize>),
    bias_at: &dyn Fn(usize, usize, usize, usize) -> f64,
    seed: u64,
) {
    use kiln::models::bert::multi_head_attention;
    use kiln::models::Mode;
    grad_check(
        name,
        &[
            input(&[b, t, h], seed, -1.0, 1.0),
            input(&[b, t, h], seed + 1, -1.0, 1.0),
            input(&[b, t, h], seed + 2, -1.0, 1.0),
        ],
        |x| {
            let bias = Tensor::from_slice(x[0].device(), &bias, &bias_shape)?;
            multi_head_attention(&x[0], &x[1], &x[2], &bias, heads, 0.0, &mut Mode::eval())
                .map_err(|e| kiln::graph::DeviceError::Backend(e.to_string()))
        },
        &|x: &[Vec<f64>]| cpu_attention(x, bias_at, [b, t, h, heads]),
    );
}

#[test]
fn multi_head_attention_gradients_with_a_padding_mask() {
    let (b, t, h, heads) = (2, 5, 6, 3);
    // Sample 1's last two keys are padding.
    let mask: Vec<f64> = (0..b * t)
        .map(|i| if i >= t && i % t >= 3 { -1e9 } else { 0.0 })
        .collect();
    let bias = mask.iter().map(|&m| m as f32).collect();
    attention_grad_check(
        "multi_head_attention",
        [b, t, h, heads],
        (bias, vec![b, 1, 1, t]),
        &|bi, _, _, j| mask[bi * t + j],
        980,
    );
}

#[test]
fn multi_head_attention_gradients_with_a_bias_per_head_and_query() {
    // A finite random bias that differs by sample, head, query and key (a
    // relative-position or causal bias) takes the unfused path: scale the
    // scores, add the bias, softmax.
    let (b, t, h, heads) = (2, 4, 6, 3);
    let bias = random_vec(b * heads * t * t, 985, -2.0, 2.0);
    let bias64: Vec<f64> = bias.iter().map(|&v| f64::from(v)).collect();
    attention_grad_check(
        "multi_head_attention, general bias",
        [b, t, h, heads],
        (bias, vec![b, heads, t, t]),
        &|bi, head, i, j| bias64[((bi * heads + head) * t + i) * t + j],
        986,
    );
}
