//! Mixed precision: products under `autocast` against f64 references built from
//! the f16-rounded operands (exact products, so the f32 dot-product bound of
//! 1e-4 of the absolute terms applies), and the loss scaler's unscaling,
//! overflow skipping, growth and rescue of gradients too small for f16.

mod common;

use common::{assert_close_scaled, device, random_vec};
use kiln::device::half::f16;
use kiln::graph::amp::{self, LossScaler};
use kiln::graph::optim::{Adam, Optimizer, RmsProp, Sgd};
use kiln::graph::Tensor;

fn round16(v: &[f32]) -> Vec<f64> {
    v.iter()
        .map(|&x| f64::from(f16::from_f32(x).to_f32()))
        .collect()
}

/// `C = A B` for row-major `m x k` and `k x n`, with the abs-term scale.
fn product(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0; m * n];
    let mut scale = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let t = a[i * k + p] * b[p * n + j];
                c[i * n + j] += t;
                scale[i * n + j] += t.abs();
            }
        }
    }
    (c, scale)
}

fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = x[i * cols + j];
        }
    }
    t
}

#[test]
fn autocast_products_and_their_gradients_use_rounded_operands() {
    let d = device();
    let (m, k, n) = (13, 37, 11);
    let (a, b) = (
        random_vec(m * k, 1, -2.0, 2.0),
        random_vec(k * n, 2, -2.0, 2.0),
    );
    // loss = sum(C * r): dC = r, dA = r B^T, dB = A^T r, all from halves.
    let r = random_vec(m * n, 3, -1.0, 1.0);
    let ta = Tensor::from_slice(d, &a, &[m, k])
        .unwrap()
        .requires_grad(true);
    let tb = Tensor::from_slice(d, &b, &[k, n])
        .unwrap()
        .requires_grad(true);
    let tr = Tensor::from_slice(d, &r, &[m, n]).unwrap();
    let c = amp::autocast(|| ta.matmul(&tb)).unwrap();
    c.mul(&tr).unwrap().sum_all().unwrap().backward().unwrap();

    let (a16, b16, r16) = (round16(&a), round16(&b), round16(&r));
    let (want_c, scale_c) = product(&a16, &b16, m, k, n);
    assert_close_scaled("C", &c.to_vec().unwrap(), &want_c, &scale_c, 1e-4);
    let (want_da, scale_da) = product(&r16, &transpose(&b16, k, n), m, n, k);
    let da = ta.grad().unwrap().to_vec().unwrap();
    assert_close_scaled("dA", &da, &want_da, &scale_da, 1e-4);
    let (want_db, scale_db) = product(&transpose(&a16, m, k), &r16, k, m, n);
    let db = tb.grad().unwrap().to_vec().unwrap();
    assert_close_scaled("dB", &db, &want_db, &scale_db, 1e-4);

    // The rounding is real: f32 products of the same data differ from these.
    let exact = ta.matmul(&tb).unwrap().to_vec().unwrap();
    assert!(exact
        .iter()
        .zip(c.to_vec().unwrap())
        .any(|(x, y)| (x - y).abs() > 1e-4));
    // And autocast ends with its closure.
    let after = ta.matmul(&tb).unwrap().to_vec().unwrap();
    assert_eq!(after, exact);
}

/// One SGD step with learning rate `1 / factor` on the loss
/// `sum((x W) * r) * factor`, with or without autocast and a scaler; returns
/// the weights before and after and whether the step ran.
fn sgd_step(
    factor: f32,
    mixed: bool,
    scaler: Option<&mut LossScaler>,
) -> (Vec<f32>, Vec<f32>, bool) {
    let d = device();
    let w0 = random_vec(24 * 5, 4, -1.0, 1.0);
    let w = Tensor::from_slice(d, &w0, &[24, 5])
        .unwrap()
        .requires_grad(true);
    let x = Tensor::from_slice(d, &random_vec(6 * 24, 5, -1.0, 1.0), &[6, 24]).unwrap();
    let r = Tensor::from_slice(d, &random_vec(6 * 5, 6, -1.0, 1.0), &[6, 5]).unwrap();
    let mut opt = Sgd::new(vec![w.clone()], 1.0 / factor);
    let _autocast = amp::AutocastGuard::with(mixed);
    let loss = x
        .matmul(&w)
        .unwrap()
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .mul_scalar(factor)
        .unwrap();
    opt.zero_grad();
    let stepped = match scaler {
        Some(s) => {
            s.backward(&loss).unwrap();
            s.step(&mut opt).unwrap()
        }
        None => {
            loss.backward().unwrap();
            opt.step().unwrap();
            true
        }
    };
    (w0, w.to_vec().unwrap(), stepped)
}

#[test]
fn loss_scaling_divides_the_gradients_back() {
    let (w0, plain, _) = sgd_step(1e-3, false, None);
    let mut scaler = LossScaler::new().initial_scale(1024.0);
    let (_, scaled, stepped) = sgd_step(1e-3, false, Some(&mut scaler));
    assert!(stepped);
    for i in 0..w0.len() {
        let (dp, ds) = (plain[i] - w0[i], scaled[i] - w0[i]);
        assert!(
            (dp - ds).abs() <= 1e-5 * dp.abs() + 1e-7,
            "weight {i}: step {ds} with scaling, {dp} without"
        );
    }
    assert!(plain.iter().zip(&w0).any(|(a, b)| a != b));
}

#[test]
fn overflowing_steps_are_skipped_and_the_scale_backs_off() {
    // 2^120 times a gradient near 1 overflows f16 (and f32 further on).
    // Five good steps counted towards growth before it: an overflow restarts
    // the count.
    let mut scaler = LossScaler::new();
    scaler.restore(2f32.powi(120), 5, 0);
    let (w0, w, stepped) = sgd_step(1.0, true, Some(&mut scaler));
    assert!(!stepped);
    assert_eq!(w, w0, "a skipped step must not touch the weights");
    assert_eq!(scaler.scale(), 2f32.powi(119));
    assert_eq!(scaler.skipped_steps(), 1);
    assert_eq!(scaler.good_steps(), 0);
}

/// Each optimizer with weight decay, stepped once plainly and once through
/// a scaler of 1024: the scale divides the loss's gradient back before the
/// decay joins it (or, decoupled, without touching the decay), so both
/// steps agree. Decay comparable to the gradient, so a scale applied to
/// the sum instead would change the step's direction.
#[test]
fn loss_scaling_leaves_weight_decay_unscaled() {
    let d = device();
    let w0 = random_vec(40, 21, -1.0, 1.0);
    let r = Tensor::from_slice(d, &random_vec(40, 22, -1.0, 1.0), &[40]).unwrap();
    type Make = fn(Tensor) -> Box<dyn Optimizer>;
    let makers: [(&str, Make); 4] = [
        ("sgd", |w| {
            Box::new(Sgd::new(vec![w], 0.1).momentum(0.9).weight_decay(0.5))
        }),
        ("adam", |w| {
            Box::new(Adam::new(vec![w], 0.1).weight_decay(0.5))
        }),
        ("adamw", |w| Box::new(Adam::adamw(vec![w], 0.1, 0.5))),
        ("rmsprop", |w| {
            Box::new(RmsProp::new(vec![w], 0.01).weight_decay(0.5))
        }),
    ];
    for (name, make) in makers {
        let mut after = Vec::new();
        for scaled in [false, true] {
            let w = Tensor::from_slice(d, &w0, &[40])
                .unwrap()
                .requires_grad(true);
            let mut opt = make(w.clone());
            let loss = w.mul(&r).unwrap().sum_all().unwrap();
            if scaled {
                let mut scaler = LossScaler::new().initial_scale(1024.0);
                scaler.backward(&loss).unwrap();
                assert!(scaler.step(opt.as_mut()).unwrap());
            } else {
                loss.backward().unwrap();
                opt.step().unwrap();
            }
            after.push(w.to_vec().unwrap());
        }
        for i in 0..w0.len() {
            let (plain, scaled) = (after[0][i] - w0[i], after[1][i] - w0[i]);
            assert!(
                (plain - scaled).abs() <= 1e-4 * plain.abs() + 1e-7,
                "{name} weight {i}: step {scaled} with scaling, {plain} without"
            );
        }
        assert!(after[0].iter().zip(&w0).any(|(a, b)| a != b), "{name}");
    }
}

/// `step_all` asks every optimizer before stepping any: one refusing its
/// settings leaves the others' weights and the scaler as they were.
#[test]
fn stepping_several_optimizers_is_all_or_nothing() {
    let d = device();
    let w0 = random_vec(8, 23, -1.0, 1.0);
    let a = Tensor::from_slice(d, &w0, &[8])
        .unwrap()
        .requires_grad(true);
    let b = Tensor::from_slice(d, &w0, &[8])
        .unwrap()
        .requires_grad(true);
    let mut good = Adam::new(vec![a.clone()], 0.1);
    let mut bad = Sgd::new(vec![b.clone()], -1.0);
    let mut scaler = LossScaler::new().initial_scale(8.0);
    let loss = a.mul(&b).unwrap().sum_all().unwrap();
    scaler.backward(&loss).unwrap();
    let err = scaler
        .step_all(&mut [&mut good, &mut bad])
        .unwrap_err()
        .to_string();
    assert!(err.contains("learning rate -1"), "{err}");
    assert_eq!(a.to_vec().unwrap(), w0);
    assert_eq!(b.to_vec().unwrap(), w0);
    assert_eq!(good.state().unwrap().step, 0);
    assert_eq!((scaler.scale(), scaler.good_steps()), (8.0, 0));
}

#[test]
fn the_scale_grows_after_an_interval_of_finite_steps() {
    let d = device();
    let w = Tensor::from_slice(d, &random_vec(8, 7, -1.0, 1.0), &[8])
        .unwrap()
        .requires_grad(true);
    let mut opt = Adam::new(vec![w.clone()], 1e-3);
    let mut scaler = LossScaler::new().initial_scale(8.0).growth_interval(3);
    for step in 1..=6 {
        opt.zero_grad();
        scaler
            .backward(&w.square().unwrap().sum_all().unwrap())
            .unwrap();
        assert!(scaler.step(&mut opt).unwrap());
        let want = if step >= 6 {
            32.0
        } else if step >= 3 {
            16.0
        } else {
            8.0
        };
        assert_eq!(scaler.scale(), want, "after step {step}");
    }
}

#[test]
fn scaling_rescues_gradients_that_f16_would_flush_to_zero() {
    // Gradients below 1e-8 round to zero in f16 (smallest subnormal 6e-8).
    let (w0, unscaled, _) = sgd_step(1e-8, true, None);
    assert_eq!(unscaled, w0, "without scaling the f16 gradients vanish");
    let (_, reference, _) = sgd_step(1e-8, false, None);
    let mut scaler = LossScaler::new();
    let (_, rescued, stepped) = sgd_step(1e-8, true, Some(&mut scaler));
    assert!(stepped);
    let steps =
        |w: &[f32]| -> Vec<f64> { w.iter().zip(&w0).map(|(a, b)| f64::from(a - b)).collect() };
    let (want, got) = (steps(&reference), steps(&rescued));
    let largest = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(
        largest > 0.1,
        "the reference step must be visible: {largest}"
    );
    for i in 0..w0.len() {
        // Both operands rounded to f16 (~3 digits each), sums of 6 terms.
        assert!(
            (want[i] - got[i]).abs() <= 5e-3 * largest,
            "weight {i}: step {} with scaling, {} in f32",
            got[i],
            want[i]
        );
    }
}

/// `got` within `tol` of the largest `want` magnitude, element by element:
/// for checks against exact (unrounded) references, where f16 operands put
/// every element off by about 1e-3 of the terms, while a wrong transpose,
/// a missed derivative or a missing term is off by the whole.
fn assert_near(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= tol * scale,
            "{what}[{i}]: got {g}, want {w} (error {err:e}, scale {scale:e})"
        );
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

#[test]
fn autocast_dense_layers_and_batched_products_have_the_right_gradients() {
    // Under autocast every product reads f16 copies; the structure of the
    // backward pass (the tanh derivative folded into the upper layer's
    // input-gradient product, bias gradients summed outside the f16
    // products, batched and shared operands) must still be the f32 one.
    let d = device();
    let (rows, k, h, n) = (10, 8, 6, 4);
    let x = random_vec(rows * k, 11, -1.0, 1.0);
    let w1 = random_vec(k * h, 12, -1.0, 1.0);
    let b1 = random_vec(h, 13, -1.0, 1.0);
    let w2 = random_vec(h * n, 14, -1.0, 1.0);
    let b2 = random_vec(n, 15, -1.0, 1.0);
    let r = random_vec(rows * n, 16, -1.0, 1.0);
    let leaf =
        |v: &[f32], shape: &[usize]| Tensor::from_slice(d, v, shape).unwrap().requires_grad(true);
    let (tx, tw1, tb1, tw2, tb2) = (
        leaf(&x, &[2, 5, k]),
        leaf(&w1, &[k, h]),
        leaf(&b1, &[h]),
        leaf(&w2, &[h, n]),
        leaf(&b2, &[n]),
    );
    let y = amp::autocast(|| {
        tx.dense(&tw1, &tb1, Some(kiln::device::UnaryOp::Tanh))?
            .dense(&tw2, &tb2, None)
    })
    .unwrap();
    let tr = Tensor::from_slice(d, &r, &[2, 5, n]).unwrap();
    y.mul(&tr).unwrap().sum_all().unwrap().backward().unwrap();

    // f64 reference: z = x W1 + b1, a = tanh z, y = a W2 + b2.
    let (x, w1, b1, w2, b2, r) = (
        f64s(&x),
        f64s(&w1),
        f64s(&b1),
        f64s(&w2),
        f64s(&b2),
        f64s(&r),
    );
    let (z, _) = product(&x, &w1, rows, k, h);
    let a: Vec<f64> = z
        .iter()
        .enumerate()
        .map(|(i, v)| (v + b1[i % h]).tanh())
        .collect();
    let (ay, _) = product(&a, &w2, rows, h, n);
    let want_y: Vec<f64> = ay.iter().enumerate().map(|(i, v)| v + b2[i % n]).collect();
    let (want_dw2, _) = product(&transpose(&a, rows, h), &r, h, rows, n);
    let want_db2: Vec<f64> = (0..n)
        .map(|j| (0..rows).map(|i| r[i * n + j]).sum())
        .collect();
    let (da, _) = product(&r, &transpose(&w2, h, n), rows, n, h);
    let dz: Vec<f64> = da.iter().zip(&a).map(|(g, a)| g * (1.0 - a * a)).collect();
    let (want_dw1, _) = product(&transpose(&x, rows, k), &dz, k, rows, h);
    let want_db1: Vec<f64> = (0..h)
        .map(|j| (0..rows).map(|i| dz[i * h + j]).sum())
        .collect();
    let (want_dx, _) = product(&dz, &transpose(&w1, k, h), rows, h, k);
    let grad = |t: &Tensor| t.grad().unwrap().to_vec().unwrap();
    let tol = 1e-2;
    assert_near("y", &y.to_vec().unwrap(), &want_y, tol);
    assert_near("dW2", &grad(&tw2), &want_dw2, tol);
    assert_near("db2", &grad(&tb2), &want_db2, tol);
    assert_near("dW1", &grad(&tw1), &want_dw1, tol);
    assert_near("db1", &grad(&tb1), &want_db1, tol);
    assert_near("dx", &grad(&tx), &want_dx, tol);

    // Batched products, [3, 4, 6] x [3, 6, 5], and one B shared by a batch
    // of A, [2, 5, 8] x [8, 3].
    for (batch, m, kk, nn, shared) in [(3, 4, 6, 5, false), (2, 5, 8, 3, true)] {
        let a = random_vec(batch * m * kk, 21, -1.0, 1.0);
        let b = random_vec(
            if shared { kk * nn } else { batch * kk * nn },
            22,
            -1.0,
            1.0,
        );
        let r = random_vec(batch * m * nn, 23, -1.0, 1.0);
        let ta = leaf(&a, &[batch, m, kk]);
        let tb = if shared {
            leaf(&b, &[kk, nn])
        } else {
            leaf(&b, &[batch, kk, nn])
        };
        let c = amp::autocast(|| ta.matmul(&tb)).unwrap();
        let tr = Tensor::from_slice(d, &r, &[batch, m, nn]).unwrap();
        c.mul(&tr).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b, r) = (f64s(&a), f64s(&b), f64s(&r));
        let (mut want_c, mut want_da) = (Vec::new(), Vec::new());
        let mut want_db = vec![0.0; b.len()];
        for e in 0..batch {
            let ae = &a[e * m * kk..(e + 1) * m * kk];
            let be = if shared {
                &b[..]
            } else {
                &b[e * kk * nn..(e + 1) * kk * nn]
            };
            let re = &r[e * m * nn..(e + 1) * m * nn];
            want_c.extend(product(ae, be, m, kk, nn).0);
            want_da.extend(product(re, &transpose(be, kk, nn), m, nn, kk).0);
            let db = product(&transpose(ae, m, kk), re, kk, m, nn).0;
            let at = if shared { 0 } else { e * kk * nn };
            for (i, v) in db.into_iter().enumerate() {
                want_db[at + i] += v;
            }
        }
        let what = if shared { "shared B" } else { "batched" };
        assert_near(&format!("{what} C"), &c.to_vec().unwrap(), &want_c, tol);
        assert_near(&format!("{what} dA"), &grad(&ta), &want_da, tol);
        assert_near(&format!("{what} dB"), &grad(&tb), &want_db, tol);
    }
}
