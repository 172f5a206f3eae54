//! Optimizers against CPU references of their published formulas, a small MLP
//! that must learn, and flat memory over many steps.

mod common;

use common::{device, random_vec};
use kiln::device::Device;
use kiln::graph::optim::{
    clip_grad_norm, Adam, CosineLr, LinearWarmup, LrSchedule, Optimizer, OptimizerState, RmsProp,
    Sgd, StepLr,
};
use kiln::graph::{loss, Tensor};

const N: usize = 37;
/// Elements `check_optimizer` updates: `N` in small pieces and one tensor of
/// 2503 that spans several workgroups and ends in a partial vec4.
const CHECKED: usize = N + 2503;

/// Runs 5 steps where step t's gradient is a fixed random vector c_t (the
/// gradient of sum(w * c_t)), and compares w after every step with `reference`,
/// which applies the same update in f64. The N weights are split into
/// `PIECES` tensors of uneven sizes, more than one grouped update kernel
/// takes, so group boundaries and several dispatches are exercised, and a
/// last large tensor spans several workgroups with a partial
/// vec4 at its end (`CHECKED` elements in all).
fn check_optimizer(
    name: &str,
    make: impl Fn(Vec<Tensor>) -> Box<dyn Optimizer>,
    mut reference: impl FnMut(&mut [f64], &[f64], usize),
) {
    const PIECES: usize = 11;
    let d = device();
    let total = CHECKED;
    let w0 = random_vec(total, 1, -1.0, 1.0);
    // Cut points spread unevenly over 0..N.
    let mut cuts: Vec<usize> = (1..PIECES)
        .map(|k| (k * k * N) / (PIECES * PIECES))
        .collect();
    cuts.insert(0, 0);
    cuts.push(N);
    cuts.push(total);
    cuts.dedup();
    let ranges: Vec<std::ops::Range<usize>> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
    let ws: Vec<Tensor> = ranges
        .iter()
        .map(|r| {
            Tensor::from_slice(d, &w0[r.clone()], &[r.len()])
                .unwrap()
                .requires_grad(true)
        })
        .collect();
    let mut opt = make(ws.clone());
    let mut w_ref: Vec<f64> = w0.iter().map(|&v| f64::from(v)).collect();
    let mut scale: Vec<f64> = w_ref.iter().map(|w| w.abs().max(1e-2)).collect();
    for t in 1..=5 {
        let c = random_vec(total, 10 + t as u64, -2.0, 2.0);
        opt.zero_grad();
        let mut loss = None;
        for (w, r) in ws.iter().zip(&ranges) {
            let ct = Tensor::from_slice(d, &c[r.clone()], &[r.len()]).unwrap();
            let part = w.mul(&ct).unwrap().sum_all().unwrap();
            loss = Some(match loss {
                None => part,
                Some(l) => part.add(&l).unwrap(),
            });
        }
        loss.unwrap().backward().unwrap();
        opt.step().unwrap();
        let g: Vec<f64> = c.iter().map(|&v| f64::from(v)).collect();
        reference(&mut w_ref, &g, t);
        let got: Vec<f32> = ws.iter().flat_map(|w| w.to_vec().unwrap()).collect();
        for i in 0..total {
            // f32 rounding scales with the largest value the weight has held,
            // which matters where a weight passes near zero.
            scale[i] = scale[i].max(w_ref[i].abs());
            let err = (f64::from(got[i]) - w_ref[i]).abs();
            assert!(
                err <= 1e-5 * scale[i],
                "{name}, step {t}, element {i}: got {}, want {}",
                got[i],
                w_ref[i]
            );
        }
    }
}

fn sgd_reference(
    lr: f64,
    momentum: f64,
    nesterov: bool,
    wd: f64,
) -> impl FnMut(&mut [f64], &[f64], usize) {
    let mut v = vec![0.0; CHECKED];
    move |w, grad, _t| {
        for i in 0..w.len() {
            let mut g = grad[i] + wd * w[i];
            if momentum != 0.0 {
                v[i] = momentum * v[i] + g;
                g = if nesterov { g + momentum * v[i] } else { v[i] };
            }
            w[i] -= lr * g;
        }
    }
}

/// Adam in f64, with its settings `(beta1, beta2, eps)` given as the f32s
/// the optimizer holds (PyTorch's defaults: 0.9, 0.999, 1e-8).
fn adam_reference(
    lr: f64,
    (b1, b2, eps): (f32, f32, f32),
    wd: f64,
    decoupled: bool,
) -> impl FnMut(&mut [f64], &[f64], usize) {
    let (b1, b2, eps) = (f64::from(b1), f64::from(b2), f64::from(eps));
    let (mut m, mut v) = (vec![0.0; CHECKED], vec![0.0; CHECKED]);
    move |w, grad, t| {
        for i in 0..w.len() {
            let mut g = grad[i];
            if decoupled {
                w[i] *= 1.0 - lr * wd;
            } else {
                g += wd * w[i];
            }
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let m_hat = m[i] / (1.0 - b1.powi(t as i32));
            let v_hat = v[i] / (1.0 - b2.powi(t as i32));
            w[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
}

#[test]
fn sgd_variants_match_reference() {
    check_optimizer(
        "sgd",
        |p| Box::new(Sgd::new(p, 0.1)),
        sgd_reference(0.1, 0.0, false, 0.0),
    );
    check_optimizer(
        "sgd momentum",
        |p| Box::new(Sgd::new(p, 0.05).momentum(0.9)),
        sgd_reference(0.05, 0.9, false, 0.0),
    );
    check_optimizer(
        "sgd nesterov + weight decay",
        |p| {
            Box::new(
                Sgd::new(p, 0.05)
                    .momentum(0.8)
                    .nesterov(true)
                    .weight_decay(0.01),
            )
        },
        sgd_reference(0.05, 0.8, true, 0.01),
    );
}

#[test]
fn adam_variants_match_reference() {
    const DEFAULTS: (f32, f32, f32) = (0.9, 0.999, 1e-8);
    check_optimizer(
        "adam",
        |p| Box::new(Adam::new(p, 0.01)),
        adam_reference(0.01, DEFAULTS, 0.0, false),
    );
    check_optimizer(
        "adam + l2",
        |p| Box::new(Adam::new(p, 0.01).weight_decay(0.1)),
        adam_reference(0.01, DEFAULTS, 0.1, false),
    );
    check_optimizer(
        "adamw",
        |p| Box::new(Adam::adamw(p, 0.01, 0.1)),
        adam_reference(0.01, DEFAULTS, 0.1, true),
    );
    // Other betas, and an eps near the gradients' size (they lie in [-2, 2]),
    // so that each of the three visibly changes every step: a builder that
    // dropped one, or a kernel reading them from the wrong place, fails here.
    check_optimizer(
        "adam, other betas and eps",
        |p| Box::new(Adam::new(p, 0.01).betas(0.8, 0.95).eps(0.5)),
        adam_reference(0.01, (0.8, 0.95, 0.5), 0.0, false),
    );
}

fn rmsprop_reference(
    lr: f64,
    alpha: f64,
    eps: f64,
    momentum: f64,
    wd: f64,
) -> impl FnMut(&mut [f64], &[f64], usize) {
    let (mut s, mut b) = (vec![0.0; CHECKED], vec![0.0; CHECKED]);
    move |w, grad, _t| {
        for i in 0..w.len() {
            let g = grad[i] + wd * w[i];
            s[i] = alpha * s[i] + (1.0 - alpha) * g * g;
            let mut step = g / (s[i].sqrt() + eps);
            if momentum != 0.0 {
                b[i] = momentum * b[i] + step;
                step = b[i];
            }
            w[i] -= lr * step;
        }
    }
}

#[test]
fn rmsprop_variants_match_reference() {
    check_optimizer(
        "rmsprop",
        |p| Box::new(RmsProp::new(p, 0.01)),
        rmsprop_reference(0.01, 0.99, 1e-8, 0.0, 0.0),
    );
    check_optimizer(
        "rmsprop with Keras's alpha and eps, momentum and decay",
        |p| {
            Box::new(
                RmsProp::new(p, 0.01)
                    .alpha(0.9)
                    .eps(1e-7)
                    .momentum(0.5)
                    .weight_decay(0.01),
            )
        },
        rmsprop_reference(0.01, 0.9, 1e-7, 0.5, 0.01),
    );
}

#[test]
fn optimizer_state_round_trips_and_resumes_identically() {
    let d = device();
    type Make = fn(Vec<Tensor>) -> Box<dyn Optimizer>;
    let makers: [(&str, Make); 3] = [
        ("adam", |p| Box::new(Adam::new(p, 0.05))),
        ("sgd momentum", |p| {
            Box::new(Sgd::new(p, 0.05).momentum(0.9))
        }),
        ("rmsprop momentum", |p| {
            Box::new(RmsProp::new(p, 0.01).momentum(0.5))
        }),
    ];
    for (name, make) in makers {
        let w0 = random_vec(N, 3, -1.0, 1.0);
        let run = |opt: &mut dyn Optimizer, w: &Tensor, steps: std::ops::Range<u64>| {
            for t in steps {
                let c = Tensor::from_slice(d, &random_vec(N, 50 + t, -1.0, 1.0), &[N]).unwrap();
                opt.zero_grad();
                w.mul(&c)
                    .unwrap()
                    .square()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                opt.step().unwrap();
            }
        };
        let w = Tensor::from_slice(d, &w0, &[N])
            .unwrap()
            .requires_grad(true);
        let mut opt = make(vec![w.clone()]);
        run(opt.as_mut(), &w, 0..3);
        let saved_state = opt.state().unwrap();
        let saved_w = w.to_vec().unwrap();
        run(opt.as_mut(), &w, 3..5);

        let resumed = Tensor::from_slice(d, &saved_w, &[N])
            .unwrap()
            .requires_grad(true);
        let mut opt2 = make(vec![resumed.clone()]);
        opt2.load_state(&saved_state).unwrap();
        run(opt2.as_mut(), &resumed, 3..5);
        assert_eq!(resumed.to_vec().unwrap(), w.to_vec().unwrap(), "{name}");
    }
    // A state for other shapes is refused with a clear message.
    let other = Tensor::zeros(d, &[N + 1]).unwrap().requires_grad(true);
    let mut adam = Adam::new(vec![other], 0.1);
    let w = Tensor::zeros(d, &[N]).unwrap().requires_grad(true);
    let mut source = Adam::new(vec![w.clone()], 0.1);
    w.square().unwrap().sum_all().unwrap().backward().unwrap();
    source.step().unwrap();
    let err = adam
        .load_state(&source.state().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("m.0 holds 37 values but parameter 0 has shape [38]"),
        "{err}"
    );
}

#[test]
fn gradient_clipping_by_global_norm() {
    let d = device();
    let a = Tensor::from_slice(d, &random_vec(10, 60, -1.0, 1.0), &[10])
        .unwrap()
        .requires_grad(true);
    let b = Tensor::from_slice(d, &random_vec(6, 61, -1.0, 1.0), &[2, 3])
        .unwrap()
        .requires_grad(true);
    let ca = random_vec(10, 62, -3.0, 3.0);
    let cb = random_vec(6, 63, -3.0, 3.0);
    let loss = a
        .mul(&Tensor::from_slice(d, &ca, &[10]).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .add(
            &b.mul(&Tensor::from_slice(d, &cb, &[2, 3]).unwrap())
                .unwrap()
                .sum_all()
                .unwrap(),
        )
        .unwrap();
    loss.backward().unwrap();
    let norm: f64 = ca
        .iter()
        .chain(&cb)
        .map(|&v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt();
    let got = clip_grad_norm(&[a.clone(), b.clone()], 1.0)
        .unwrap()
        .unwrap()
        .item()
        .unwrap();
    assert!(
        (f64::from(got) - norm).abs() < 1e-5 * norm,
        "{got} vs {norm}"
    );
    let scale = 1.0 / (norm + 1e-6);
    let ga = a.grad().unwrap().to_vec().unwrap();
    for i in 0..10 {
        assert!(
            (f64::from(ga[i]) - f64::from(ca[i]) * scale).abs() < 1e-6,
            "a[{i}]"
        );
    }
    let gb = b.grad().unwrap().to_vec().unwrap();
    for i in 0..6 {
        assert!(
            (f64::from(gb[i]) - f64::from(cb[i]) * scale).abs() < 1e-6,
            "b[{i}] (a 2-D gradient)"
        );
    }
    // Below the limit nothing changes.
    clip_grad_norm(&[a, b.clone()], 100.0).unwrap();
    assert_eq!(b.grad().unwrap().to_vec().unwrap(), gb);
}

#[test]
fn learning_rate_schedules() {
    let step = StepLr {
        base: 0.1,
        step_size: 10,
        gamma: 0.5,
    };
    assert_eq!(
        (step.lr(0), step.lr(9), step.lr(10), step.lr(25)),
        (0.1, 0.1, 0.05, 0.025)
    );
    let cosine = CosineLr {
        base: 1.0,
        min: 0.1,
        total_steps: 100,
    };
    assert!((cosine.lr(0) - 1.0).abs() < 1e-6 && (cosine.lr(50) - 0.55).abs() < 1e-6);
    assert!((cosine.lr(100) - 0.1).abs() < 1e-6 && (cosine.lr(500) - 0.1).abs() < 1e-6);
    let warm = LinearWarmup {
        warmup_steps: 4,
        after: cosine,
    };
    assert_eq!((warm.lr(0), warm.lr(3)), (0.25, 1.0));
    assert!((warm.lr(54) - 0.55).abs() < 1e-6);
}

#[test]
fn optimizers_skip_frozen_parameters() {
    let d = device();
    let w = Tensor::from_slice(d, &[1.0, 2.0], &[2])
        .unwrap()
        .requires_grad(true);
    let frozen = Tensor::from_slice(d, &[3.0, 4.0], &[2])
        .unwrap()
        .requires_grad(true);
    let optimizers: Vec<Box<dyn Optimizer>> = vec![
        Box::new(Sgd::new(vec![w.clone(), frozen.clone()], 0.1).momentum(0.9)),
        Box::new(Adam::new(vec![w.clone(), frozen.clone()], 0.1)),
        Box::new(RmsProp::new(vec![w.clone(), frozen.clone()], 0.1)),
    ];
    for mut opt in optimizers {
        w.mul(&frozen)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // Frozen after its gradient was computed: the optimizer itself must
        // skip it.
        frozen.set_requires_grad(false);
        assert!(frozen.grad().is_some());
        let before = w.to_vec().unwrap();
        opt.step().unwrap();
        assert_eq!(frozen.to_vec().unwrap(), vec![3.0, 4.0]);
        assert_ne!(w.to_vec().unwrap(), before);
        frozen.set_requires_grad(true);
        opt.zero_grad();
    }
}

/// Points in the square, labelled inside/outside a circle, away from its edge.
fn circle_data(n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let raw = random_vec(4 * n, seed, -1.0, 1.0);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for p in raw.chunks(2) {
        let r2 = p[0] * p[0] + p[1] * p[1];
        if (r2 - 0.5).abs() < 0.05 {
            continue;
        }
        x.extend_from_slice(p);
        y.push(u32::from(r2 < 0.5));
        if y.len() == n {
            break;
        }
    }
    (x, y)
}

struct Mlp {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl Mlp {
    fn new(d: &Device, hidden: usize) -> Self {
        let s1 = (6.0f32 / 2.0).sqrt();
        let s2 = (6.0f32 / hidden as f32).sqrt();
        Self {
            w1: Tensor::uniform(d, &[2, hidden], -s1, s1, 1)
                .unwrap()
                .requires_grad(true),
            b1: Tensor::zeros(d, &[hidden]).unwrap().requires_grad(true),
            w2: Tensor::uniform(d, &[hidden, 2], -s2, s2, 2)
                .unwrap()
                .requires_grad(true),
            b2: Tensor::zeros(d, &[2]).unwrap().requires_grad(true),
        }
    }

    fn params(&self) -> Vec<Tensor> {
        vec![
            self.w1.clone(),
            self.b1.clone(),
            self.w2.clone(),
            self.b2.clone(),
        ]
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x
            .matmul(&self.w1)
            .unwrap()
            .add(&self.b1)
            .unwrap()
            .relu()
            .unwrap();
        h.matmul(&self.w2).unwrap().add(&self.b2).unwrap()
    }
}

fn accuracy(logits: &Tensor, labels: &[u32]) -> f32 {
    let v = logits.to_vec().unwrap();
    let correct = v
        .chunks(2)
        .zip(labels)
        .filter(|(row, &l)| u32::from(row[1] > row[0]) == l)
        .count();
    correct as f32 / labels.len() as f32
}

#[test]
fn two_layer_mlp_learns_a_separable_problem() {
    let d = device();
    let (x, y) = circle_data(512, 7);
    let (x_test, y_test) = circle_data(512, 8);
    let xt = Tensor::from_slice(d, &x, &[y.len(), 2]).unwrap();
    let xt_test = Tensor::from_slice(d, &x_test, &[y_test.len(), 2]).unwrap();
    let model = Mlp::new(d, 32);
    let mut opt = Adam::new(model.params(), 0.02);
    for _ in 0..400 {
        opt.zero_grad();
        let loss = loss::cross_entropy(&model.forward(&xt), &y).unwrap();
        loss.backward().unwrap();
        opt.step().unwrap();
    }
    let train = accuracy(&kiln::graph::no_grad(|| model.forward(&xt)), &y);
    let test = accuracy(&kiln::graph::no_grad(|| model.forward(&xt_test)), &y_test);
    assert!(
        train > 0.99 && test > 0.99,
        "train {train}, held-out {test}"
    );
}

#[test]
fn training_step_memory_is_flat_over_1000_steps() {
    let d = Device::new().unwrap(); // private pool statistics
    let (x, y) = circle_data(64, 9);
    let xt = Tensor::from_slice(&d, &x, &[y.len(), 2]).unwrap();
    let model = Mlp::new(&d, 16);
    let mut opt = Adam::new(model.params(), 0.01);
    let step = |opt: &mut Adam| {
        opt.zero_grad();
        let loss = loss::cross_entropy(&model.forward(&xt), &y).unwrap();
        loss.backward().unwrap();
        opt.step().unwrap();
        loss.item().unwrap()
    };
    for _ in 0..10 {
        step(&mut opt);
    }
    let warm = d.pool_stats();
    let first = step(&mut opt);
    let mut last = first;
    for _ in 0..989 {
        last = step(&mut opt);
    }
    let end = d.pool_stats();
    assert_eq!(end.allocations, warm.allocations, "{warm:?} -> {end:?}");
    assert_eq!(end.live_bytes, warm.live_bytes, "{warm:?} -> {end:?}");
    assert!(last < first, "loss did not fall: {first} -> {last}");
}

#[test]
fn a_repeated_training_step_records_the_same_work_and_builds_no_bind_groups() {
    // The reference MLP's step as `fit` runs it (`train_on_batch`: one
    // `together` block, the backward passes open their own inside it).
    // Once warm, every step must take the same dispatches; one that reads
    // its loss (a submit) must build no bind group, since the pool hands
    // each kernel the buffers it had; one that does not must submit
    // nothing. These are what a GPU step costs the host.
    let d = Device::new().unwrap(); // private statistics
    let model = kiln::zoo::Architecture::Mlp.build(&d, 0).unwrap();
    let opt = Adam::new(model.parameters(), 1e-3);
    let mut trainer = kiln::train::Trainer::new(model, opt, &d);
    let x = random_vec(32 * 784, 70, 0.0, 1.0);
    let labels: Vec<u32> = (0..32).map(|i| i % 10).collect();
    let mut step = |read: bool| {
        let before = d.dispatch_stats();
        let loss = trainer.train_on_batch(&x, 784, &labels).unwrap();
        if read {
            loss.item().unwrap();
        }
        let after = d.dispatch_stats();
        (
            after.dispatches - before.dispatches,
            after.bind_groups - before.bind_groups,
            after.submits - before.submits,
        )
    };
    for _ in 0..5 {
        step(true);
    }
    let reading: Vec<_> = (0..4).map(|_| step(true)).collect();
    let dispatches = reading[0].0;
    assert!(dispatches > 0, "{reading:?}");
    assert!(
        reading.iter().all(|&s| s == (dispatches, 0, 1)),
        "(dispatches, bind groups, submits) per step, loss read: {reading:?}"
    );
    // Without the read, each step's upload takes a new buffer (a retired one
    // would be overwritten before the commands reading it ran), so the
    // kernels reading the batch or labels get new bind groups; nothing else.
    let unread: Vec<_> = (0..4).map(|_| step(false)).collect();
    assert!(
        unread
            .iter()
            .all(|&(n, _, submits)| n == dispatches && submits == 0),
        "(dispatches, bind groups, submits) per step, loss not read: {unread:?}"
    );
}

#[test]
fn a_model_starting_with_an_embedding_steps_without_waiting_for_the_device() {
    use kiln::models::{Activation, Dense, Embedding, Flatten, Sequential};
    // The embedding reads its ids on the host; the trainer's batches carry
    // them there (a host copy), so an unread step submits nothing. Read
    // back from the device instead, every step would submit and wait.
    let d = Device::new().unwrap(); // private statistics
    let model = Sequential::new()
        .push(Embedding::new(&d, 50, 8, 1).unwrap())
        .push(Flatten)
        .push(Dense::new(&d, 6 * 8, 2, Activation::None, 2).unwrap());
    assert!(model.layers()[0].reads_input_on_host());
    assert!(!model.layers()[2].reads_input_on_host());
    let optimizer = Adam::new(model.parameters(), 1e-2);
    let mut trainer = kiln::train::Trainer::new(model, optimizer, &d);
    let ids: Vec<f32> = (0..4 * 6).map(|i| ((i * 7) % 50) as f32).collect();
    let labels = [0, 1, 1, 0];
    let first = trainer
        .train_on_batch(&ids, 6, &labels)
        .unwrap()
        .item()
        .unwrap();
    let before = d.dispatch_stats();
    for _ in 0..3 {
        trainer.train_on_batch(&ids, 6, &labels).unwrap();
    }
    assert_eq!(d.dispatch_stats().submits, before.submits);
    let later = trainer
        .train_on_batch(&ids, 6, &labels)
        .unwrap()
        .item()
        .unwrap();
    assert!(later < first, "loss {first} -> {later}");
}

#[test]
fn clipping_many_gradients_matches_their_global_norm() {
    let d = device();
    // Odd counts and sizes: the pairwise sum of norms carries a last one.
    for (count, seed) in [(1usize, 70u64), (5, 71), (8, 72)] {
        let mut reference = 0.0f64;
        let params: Vec<Tensor> = (0..count)
            .map(|i| {
                let n = 3 + 97 * i;
                let g = random_vec(n, seed * 100 + i as u64, -1.0, 1.0);
                reference += g.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>();
                let p = Tensor::zeros(d, &[n]).unwrap().requires_grad(true);
                p.set_grad(Some(Tensor::from_slice(d, &g, &[n]).unwrap()));
                p
            })
            .collect();
        let norm = d
            .together(|| clip_grad_norm(&params, 0.5))
            .unwrap()
            .unwrap()
            .item()
            .unwrap();
        let reference = reference.sqrt();
        assert!(
            (f64::from(norm) - reference).abs() < 1e-5 * reference,
            "{count}: {norm} vs {reference}"
        );
        let clipped: f64 = params
            .iter()
            .flat_map(|p| p.grad().unwrap().to_vec().unwrap())
            .map(|v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            (clipped - 0.5).abs() < 1e-5,
            "{count}: clipped to {clipped}"
        );
    }
}

/// The trainer tests' model: the zoo's MLP on the two circle features, SGD
/// at `lr`.
fn circle_trainer(lr: f32) -> kiln::train::Trainer<Sgd> {
    let d = device();
    let model = kiln::zoo::mlp(d, 2, 2, 0).unwrap();
    let optimizer = Sgd::new(model.parameters(), lr);
    kiln::train::Trainer::new(model, optimizer, d)
}

/// Options for `epochs` silent epochs of batches of `batch_size`.
fn quiet(epochs: usize, batch_size: usize) -> kiln::train::FitOptions {
    kiln::train::FitOptions {
        epochs,
        batch_size,
        progress: false,
        log_epochs: false,
        ..Default::default()
    }
}

#[test]
fn a_diverging_run_stops_with_an_error_and_keeps_its_checkpoint() {
    use kiln::data::Dataset;
    use kiln::train::FitOptions;
    let (x, y) = circle_data(256, 80);
    let data = Dataset::new(2, x, y, 2).unwrap();
    let mut trainer = circle_trainer(0.1);
    let dir = std::env::temp_dir().join(format!("kiln-diverge-{}", std::process::id()));
    let path = dir.join("checkpoint.safetensors");
    let options = FitOptions {
        checkpoint: Some(path.clone()),
        ..quiet(1, 32)
    };
    trainer.fit(&data, &options).unwrap();
    let saved = std::fs::read(&path).unwrap();
    trainer.optimizer.set_learning_rate(1e30);
    let more = FitOptions {
        epochs: 3,
        ..options.clone()
    };
    let err = trainer.fit(&data, &more).unwrap_err().to_string();
    assert!(err.contains("diverged") && err.contains("epoch 1"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), saved);
    // A rate that can only do harm is refused before any step.
    trainer.optimizer.set_learning_rate(f32::NAN);
    let err = trainer.fit(&data, &more).unwrap_err().to_string();
    assert!(err.contains("learning rate NaN"), "{err}");

    // One step per epoch: the epoch's loss is taken before its only update,
    // so it is finite even when that update wrecks the weights. The weights
    // are checked too, and the checkpoint keeps epoch 1.
    let (x, y) = circle_data(32, 81);
    let data = Dataset::new(2, x, y, 2).unwrap();
    let mut trainer = circle_trainer(0.1);
    trainer.fit(&data, &options).unwrap();
    let saved = std::fs::read(&path).unwrap();
    trainer.optimizer.set_learning_rate(1e38);
    let err = trainer.fit(&data, &more).unwrap_err().to_string();
    assert!(
        err.contains("epoch 2 left weights whose overall norm is not finite")
            && err.contains("still holds epoch 1"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), saved);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_on_batch_takes_the_step_fit_takes_and_refuses_bad_batches() {
    use kiln::data::Dataset;
    use kiln::train::Loss;
    let (x, y) = circle_data(48, 85);
    // One epoch of one batch: fit's step over the whole (shuffled) data is
    // train_on_batch's over it in order, up to the order of the sums.
    let mut fitted = circle_trainer(0.5);
    let data = Dataset::new(2, x.clone(), y.clone(), 2).unwrap();
    fitted.fit(&data, &quiet(1, 48)).unwrap();
    let mut stepped = circle_trainer(0.5);
    let params = |t: &kiln::train::Trainer<Sgd>| -> Vec<f32> {
        let tensors = t.model.parameters();
        tensors.iter().flat_map(|p| p.to_vec().unwrap()).collect()
    };
    let before = params(&stepped);
    let loss = stepped.train_on_batch(&x, 2, &y).unwrap();
    assert_eq!(loss.shape(), [] as [usize; 0]);
    let first = loss.item().unwrap();
    let (want, got) = (params(&fitted), params(&stepped));
    let moved = before.iter().zip(&got).filter(|(a, b)| a != b).count();
    assert!(
        moved > before.len() / 2,
        "{moved} of {} moved",
        before.len()
    );
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!(
            (w - g).abs() <= 1e-5 + 1e-5 * w.abs(),
            "parameter {i}: fit {w}, stepped {g}"
        );
    }
    // More steps on the batch lower its loss.
    for _ in 0..20 {
        stepped.train_on_batch(&x, 2, &y).unwrap();
    }
    let later = stepped.train_on_batch(&x, 2, &y).unwrap().item().unwrap();
    assert!(later < first, "loss {first} -> {later}");
    // Bad batches are refused with what is wrong, for either loss.
    let err = stepped
        .train_on_batch(&x[1..], 2, &y)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("95 inputs are not 48 samples of 2 features"),
        "{err}"
    );
    // A batch that splits evenly into other samples is still refused: the
    // size of a sample is not guessed from the labels.
    let err = stepped
        .train_on_batch(&x, 2, &y[..24])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("96 inputs are not 24 samples of 2 features"),
        "{err}"
    );
    let err = stepped.train_on_batch(&[], 2, &[]).unwrap_err().to_string();
    assert!(err.contains("the batch is empty (0 labels"), "{err}");
    let mut poisoned = x.clone();
    poisoned[5] = f32::NAN;
    let err = stepped
        .train_on_batch(&poisoned, 2, &y)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input 5 is NaN (sample 2, feature 1)"),
        "{err}"
    );
    let mislabelled: Vec<u32> = y.iter().map(|&l| l + 1).collect();
    for loss in [Loss::SparseCategoricalCrossEntropy, Loss::MeanSquaredError] {
        stepped.loss = loss;
        let err = stepped.train_on_batch(&x, 2, &mislabelled).unwrap_err();
        assert!(
            err.to_string()
                .contains("label 2 out of range for 2 classes"),
            "{loss:?}: {err}"
        );
    }
}

#[test]
fn datasets_built_field_by_field_are_checked_before_training() {
    use kiln::data::Dataset;
    let (x, y) = circle_data(64, 81);
    let mut trainer = circle_trainer(0.1);
    let options = quiet(1, 16);
    let short = Dataset {
        x: x[..x.len() - 1].to_vec(),
        ..Dataset::new(2, x.clone(), y.clone(), 2).unwrap()
    };
    let err = trainer.fit(&short, &options).unwrap_err().to_string();
    assert!(err.contains("do not make 64 samples"), "{err}");
    let mislabelled = Dataset {
        y: y.iter().map(|&l| l + 1).collect(),
        ..Dataset::new(2, x.clone(), y.clone(), 2).unwrap()
    };
    let err = trainer.evaluate(&mislabelled, 16).unwrap_err().to_string();
    assert!(err.contains("out of range for 2 classes"), "{err}");
    let err = Dataset::new(0, vec![], y.clone(), 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least one feature"), "{err}");
}

#[test]
fn accuracy_takes_the_first_of_tied_logits_as_the_prediction() {
    // A model whose logits are all equal predicts class 0 (argmax), so its
    // accuracy is the share of label 0, not 100%: through the loss kernel's
    // count (cross-entropy, batches up to 1024) and the tally's own kernels
    // (larger batches, mean squared error).
    use kiln::data::Dataset;
    use kiln::models::{Activation, Dense, Sequential};
    use kiln::train::{Loss, Trainer};
    let d = device();
    let n = 1200;
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7 + i / 5) % 3).collect();
    let zeros = labels.iter().filter(|&&l| l == 0).count() as f32 / n as f32;
    let x = random_vec(n * 4, 82, -1.0, 1.0);
    let data = Dataset::new(4, x, labels, 3).unwrap();
    let dense = Dense {
        weight: Tensor::zeros(d, &[4, 3]).unwrap(),
        bias: Tensor::zeros(d, &[3]).unwrap(),
        activation: Activation::None,
    };
    let model = Sequential::new().push(dense);
    let optimizer = Sgd::new(model.parameters(), 0.1);
    let mut trainer = Trainer::new(model, optimizer, d);
    for (loss, batch) in [
        (Loss::SparseCategoricalCrossEntropy, 100),
        (Loss::SparseCategoricalCrossEntropy, 1200),
        (Loss::MeanSquaredError, 100),
    ] {
        trainer.loss = loss;
        let (_, accuracy) = trainer.evaluate(&data, batch).unwrap();
        assert!(
            (accuracy - zeros).abs() < 1e-6,
            "{loss:?} batch {batch}: accuracy {accuracy}, share of label 0 {zeros}"
        );
    }
}

#[test]
fn early_stopping_counts_patience_across_a_resume_as_an_unbroken_run_would() {
    use kiln::data::Dataset;
    use kiln::train::{EarlyStopping, FitOptions};
    let (x, y) = circle_data(64, 83);
    let data = Dataset::new(2, x, y, 2).unwrap();
    // A rate too small to improve the loss by min_delta: every epoch after
    // the first counts against the patience of 2, so runs stop after 3.
    let trainer = || circle_trainer(1e-20);
    let options = |epochs| FitOptions {
        early_stopping: Some(EarlyStopping {
            patience: 2,
            min_delta: 0.1,
        }),
        ..quiet(epochs, 32)
    };
    let mut unbroken = trainer();
    assert_eq!(unbroken.fit(&data, &options(10)).unwrap().epochs.len(), 3);
    // Two epochs, then a resumed run: it stops at epoch 3 too, not after
    // three epochs of its own.
    let mut resumed = trainer();
    resumed.fit(&data, &options(2)).unwrap();
    let more = resumed.fit(&data, &options(10)).unwrap();
    assert_eq!(more.epochs.len(), 1);
    assert_eq!(resumed.epochs_done, 3);
    // A run that already stopped has nothing left to do.
    assert!(resumed.fit(&data, &options(10)).unwrap().epochs.is_empty());
    assert_eq!(resumed.epochs_done, 3);
}

#[test]
fn a_resumed_mixed_precision_run_scales_its_loss_as_the_unbroken_run_would() {
    use kiln::data::Dataset;
    use kiln::graph::amp::LossScaler;
    use kiln::train::FitOptions;
    let (x, y) = circle_data(96, 85);
    let data = Dataset::new(2, x, y, 2).unwrap();
    // A scale at which f16 gradients overflow, and growth after 3 good
    // steps: the scale falls and rises every few of the 12 steps an epoch,
    // so a resumed run that started the scale afresh would skip other steps.
    let trainer = || {
        let mut trainer = circle_trainer(0.05);
        trainer.loss_scaler = LossScaler::new()
            .initial_scale(2f32.powi(30))
            .growth_interval(3);
        trainer
    };
    let dir = std::env::temp_dir().join(format!("kiln-amp-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("checkpoint.safetensors");
    let options = |epochs| FitOptions {
        mixed_precision: true,
        checkpoint: Some(path.clone()),
        ..quiet(epochs, 8)
    };
    let mut unbroken = trainer();
    unbroken.fit(&data, &options(3)).unwrap();
    let mut first = trainer();
    first.fit(&data, &options(2)).unwrap();
    let mut resumed = trainer();
    resumed.resume(&path).unwrap();
    let scaler = |t: &kiln::train::Trainer<Sgd>| {
        let s = &t.loss_scaler;
        (s.scale(), s.good_steps(), s.skipped_steps())
    };
    assert_eq!(scaler(&resumed), scaler(&first));
    assert!(first.loss_scaler.skipped_steps() > 0, "no step overflowed");
    resumed.fit(&data, &options(3)).unwrap();
    assert_eq!(scaler(&resumed), scaler(&unbroken));
    let weights = |t: &kiln::train::Trainer<Sgd>| -> Vec<Vec<f32>> {
        t.model
            .parameters()
            .iter()
            .map(|p| p.to_vec().unwrap())
            .collect()
    };
    assert_eq!(weights(&resumed), weights(&unbroken));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn validation_split_holds_out_what_keras_does() {
    // Keras trains on the first floor(n * (1 - split)) samples and validates
    // on the rest, taken before shuffling.
    use kiln::data::Dataset;
    let dataset = |n: usize| {
        let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
        Dataset::new(1, x, vec![0; n], 1).unwrap()
    };
    for (n, split, held_out) in [
        (10, 0.33, 4),
        (10, 0.0, 0),
        (60_000, 0.1, 6_000),
        (50_000, 0.2, 10_000),
        (7, 0.5, 4),
    ] {
        let data = dataset(n);
        assert_eq!(data.validation_size(split), held_out, "{n} x {split}");
        let (train, validation) = data.split_validation(split).unwrap();
        assert_eq!(validation.len(), held_out, "{n} x {split}");
        assert_eq!(
            train.x,
            data.x[..n - held_out],
            "{n} x {split}: the first ones train"
        );
    }
}

#[test]
fn a_model_ending_in_softmax_is_refused_by_the_logit_losses() {
    // Keras users end classifiers in softmax; the trainer's losses apply it
    // themselves, so such a model would train through two softmaxes.
    use kiln::data::Dataset;
    use kiln::models::{Activation, Dense, Sequential};
    use kiln::train::Trainer;
    let d = device();
    let (x, y) = circle_data(32, 84);
    let data = Dataset::new(2, x.clone(), y, 2).unwrap();
    // Softmax as the output layer's activation, or as a layer of its own
    // after it (Keras's `Dense(2)` then `Activation('softmax')`).
    let hidden = || Dense::new(d, 2, 8, Activation::Relu, 0).unwrap();
    let models = [
        Sequential::new()
            .push(hidden())
            .push(Dense::new(d, 8, 2, Activation::Softmax, 1).unwrap()),
        Sequential::new()
            .push(hidden())
            .push(Dense::new(d, 8, 2, Activation::None, 1).unwrap())
            .push(Activation::Softmax),
    ];
    for model in models {
        let optimizer = Sgd::new(model.parameters(), 0.1);
        let mut trainer = Trainer::new(model, optimizer, d);
        let options = quiet(1, 32);
        for err in [
            trainer.fit(&data, &options).unwrap_err(),
            trainer.evaluate(&data, 16).unwrap_err(),
            trainer.predict(&x, 2).unwrap_err(),
            trainer.train_on_batch(&x, 2, &data.y).unwrap_err(),
        ] {
            assert!(err.to_string().contains("end the model on logits"), "{err}");
        }
    }
}

#[test]
fn optimizer_settings_that_would_wreck_the_weights_are_refused_at_the_step() {
    type Make = Box<dyn Fn(Vec<Tensor>) -> Box<dyn Optimizer>>;
    let d = device();
    let w0 = random_vec(8, 90, -1.0, 1.0);
    let cases: Vec<(Make, &str)> = vec![
        (
            Box::new(|p| Box::new(Adam::new(p, 0.1).betas(0.9, 1.0))),
            "Adam: beta2 1 must be in [0, 1)",
        ),
        (
            Box::new(|p| Box::new(Adam::new(p, -0.1))),
            "learning rate -0.1",
        ),
        (
            Box::new(|p| Box::new(Adam::new(p, 0.1).eps(f32::NAN))),
            "eps NaN",
        ),
        (
            Box::new(|p| Box::new(Sgd::new(p, 0.1).momentum(-0.5))),
            "SGD: momentum -0.5 must be a finite number, at least 0",
        ),
        (
            Box::new(|p| Box::new(RmsProp::new(p, 0.1).alpha(1.5))),
            "RMSProp: alpha 1.5 must be in [0, 1]",
        ),
    ];
    for (make, expected) in cases {
        let w = Tensor::from_slice(d, &w0, &[8])
            .unwrap()
            .requires_grad(true);
        let mut opt = make(vec![w.clone()]);
        w.square().unwrap().sum_all().unwrap().backward().unwrap();
        let err = opt.step().unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
        assert_eq!(
            w.to_vec().unwrap(),
            w0,
            "{expected}: the weights are untouched"
        );
    }
    // Settings at the edges of their ranges still step.
    let w = Tensor::from_slice(d, &w0, &[8])
        .unwrap()
        .requires_grad(true);
    let mut edge = RmsProp::new(vec![w.clone()], 0.0).alpha(1.0);
    w.square().unwrap().sum_all().unwrap().backward().unwrap();
    edge.step().unwrap();
    assert_eq!(w.to_vec().unwrap(), w0);

    // An f16 parameter would be read as f32 garbage by the update kernel.
    let h = Tensor::from_slice(d, &w0, &[8])
        .unwrap()
        .to_dtype(kiln::device::DType::F16)
        .unwrap()
        .requires_grad(true);
    h.set_grad(Some(Tensor::from_slice(d, &w0, &[8]).unwrap()));
    let err = Sgd::new(vec![h.clone()], 0.1)
        .step()
        .unwrap_err()
        .to_string();
    assert!(err.contains("a parameter must hold f32"), "{err}");
    // Refused before anything changes: no step counted, no state made, the
    // f32 parameter beside it not updated.
    let beside = Tensor::from_slice(d, &w0, &[8])
        .unwrap()
        .requires_grad(true);
    beside.set_grad(Some(Tensor::from_slice(d, &w0, &[8]).unwrap()));
    let mut adam = Adam::new(vec![beside.clone(), h], 0.1);
    let err = adam.step().unwrap_err().to_string();
    assert!(err.contains("a parameter must hold f32"), "{err}");
    assert_eq!(adam.state().unwrap(), OptimizerState::default());
    assert_eq!(beside.to_vec().unwrap(), w0);

    // A parameter listed twice would be updated twice in one dispatch, by
    // invocations racing for its elements.
    let mut twice = Adam::new(vec![w.clone(), beside.clone(), w.clone()], 0.1);
    let err = twice.step().unwrap_err().to_string();
    assert!(
        err.contains("parameters 0 and 2 are the same tensor"),
        "{err}"
    );
    assert_eq!(w.to_vec().unwrap(), w0);
    // Frozen ones are never written, so they may repeat.
    let frozen = Tensor::from_slice(d, &w0, &[8]).unwrap();
    let mut repeated = Adam::new(vec![frozen.clone(), beside.clone(), frozen.clone()], 0.1);
    repeated.step().unwrap();
    assert_eq!(frozen.to_vec().unwrap(), w0);
    assert_ne!(beside.to_vec().unwrap(), w0);
    // A model whose layers share a weight lists it once.
    use kiln::models::{Activation, Dense, Sequential};
    let first = Dense::new(d, 4, 4, Activation::Relu, 1).unwrap();
    let mut second = Dense::new(d, 4, 4, Activation::None, 2).unwrap();
    second.weight = first.weight.clone();
    let tied = first.weight.clone();
    let model = Sequential::new().push(first).push(second);
    assert_eq!(model.named_parameters().len(), 4);
    let params = model.parameters();
    assert_eq!(params.len(), 3);
    assert!(params[0].same_as(&tied));
    let x = Tensor::from_slice(d, &random_vec(8, 95, -1.0, 1.0), &[2, 4]).unwrap();
    let mut step = Adam::new(params, 0.1);
    let y = model
        .forward(&x, &mut kiln::models::Mode::training(0))
        .unwrap();
    y.square().unwrap().sum_all().unwrap().backward().unwrap();
    let before = tied.to_vec().unwrap();
    step.step().unwrap();
    assert_ne!(tied.to_vec().unwrap(), before);

    // Clipping to 0 or below would stop or reverse training without a sign.
    for bad in [0.0, -1.0, f32::NAN] {
        let err = clip_grad_norm(std::slice::from_ref(&w), bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be above 0"), "{bad}: {err}");
    }
    let norm = clip_grad_norm(std::slice::from_ref(&w), f32::INFINITY)
        .unwrap()
        .unwrap();
    let expected = 2.0 * w0.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm.item().unwrap() - expected).abs() < 1e-4 * expected);
}

#[test]
fn a_state_that_does_not_fit_is_refused_whole_and_changes_nothing() {
    let d = device();
    let w = Tensor::from_slice(d, &random_vec(N, 91, -1.0, 1.0), &[N])
        .unwrap()
        .requires_grad(true);
    let step = |opt: &mut dyn Optimizer| {
        opt.zero_grad();
        w.square().unwrap().sum_all().unwrap().backward().unwrap();
        opt.step().unwrap();
    };
    let mut adam = Adam::new(vec![w.clone()], 0.1);
    step(&mut adam);
    let own = adam.state().unwrap();
    // The first kind fits, the second does not: neither is taken.
    let mut bad = own.clone();
    for (name, values) in &mut bad.tensors {
        values.iter_mut().for_each(|v| *v += 1.0);
        if name == "v.0" {
            values.pop();
        }
    }
    bad.step = 99;
    let err = adam.load_state(&bad).unwrap_err().to_string();
    assert!(err.contains("v.0 holds 36 values"), "{err}");
    assert_eq!(adam.state().unwrap(), own);
    // Another optimizer's state names buffers this one does not keep.
    let mut sgd = Sgd::new(vec![w.clone()], 0.1).momentum(0.9);
    step(&mut sgd);
    let err = adam
        .load_state(&sgd.state().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("velocity.0 is not this optimizer's"), "{err}");
    assert_eq!(adam.state().unwrap(), own);
    // And so does a state for more parameters.
    let mut more = own.clone();
    more.tensors.push(("m.1".into(), vec![0.5; N]));
    assert!(adam.load_state(&more).is_err());
    assert_eq!(adam.state().unwrap(), own);
}

#[test]
fn a_model_with_the_wrong_number_of_outputs_is_refused_with_what_to_change() {
    use kiln::data::Dataset;
    use kiln::train::Loss;
    let (x, y) = circle_data(64, 92);
    // Two outputs (circle_trainer) for three classes.
    let data = Dataset::new(2, x, y, 3).unwrap();
    let mut trainer = circle_trainer(0.1);
    let before = trainer.model.parameters()[0].to_vec().unwrap();
    for loss in [Loss::SparseCategoricalCrossEntropy, Loss::MeanSquaredError] {
        trainer.loss = loss;
        let err = trainer.fit(&data, &quiet(1, 16)).unwrap_err().to_string();
        assert!(err.contains("must give 3 outputs per sample"), "{err}");
        let err = trainer.evaluate(&data, 64).unwrap_err().to_string();
        assert!(err.contains("must give 3 outputs per sample"), "{err}");
    }
    assert_eq!(trainer.model.parameters()[0].to_vec().unwrap(), before);
}

#[test]
fn resuming_refuses_another_runs_checkpoint_and_changes_nothing() {
    use kiln::data::Dataset;
    use kiln::train::Trainer;
    let d = device();
    let (x, y) = circle_data(64, 93);
    let data = Dataset::new(2, x, y, 2).unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-resume-check-{}", std::process::id()));
    let path = dir.join("checkpoint.safetensors");
    let options = kiln::train::FitOptions {
        checkpoint: Some(path.clone()),
        ..quiet(1, 16)
    };
    let momentum_trainer = |dataset: &str| {
        let model = kiln::zoo::mlp(d, 2, 2, 7).unwrap();
        let optimizer = Sgd::new(model.parameters(), 0.1).momentum(0.9);
        let mut trainer = Trainer::new(model, optimizer, d);
        trainer.metadata.insert("dataset".into(), dataset.into());
        trainer
    };
    momentum_trainer("circles").fit(&data, &options).unwrap();
    let weights = |model: &kiln::models::Sequential| -> Vec<Vec<f32>> {
        model
            .parameters()
            .iter()
            .map(|p| p.to_vec().unwrap())
            .collect()
    };

    // Saved by a run on other data.
    let mut other = momentum_trainer("squares");
    let fresh = weights(&other.model);
    let err = other.resume(&path).unwrap_err().to_string();
    assert!(
        err.contains("dataset = circles") && err.contains("dataset = squares"),
        "{err}"
    );
    assert_eq!(weights(&other.model), fresh);
    assert_eq!(other.epochs_done, 0);

    // Same run, but an optimizer whose state does not fit: the weights,
    // read and checked first, are not copied in either.
    let model = kiln::zoo::mlp(d, 2, 2, 7).unwrap();
    let optimizer = Adam::new(model.parameters(), 0.1);
    let mut adam = Trainer::new(model, optimizer, d);
    adam.metadata.insert("dataset".into(), "circles".into());
    let err = adam.resume(&path).unwrap_err().to_string();
    assert!(err.contains("velocity.0 is not this optimizer's"), "{err}");
    assert_eq!(weights(&adam.model), fresh);
    assert_eq!(adam.epochs_done, 0);

    // The same optimizer over the same parameters listed in another order:
    // the two hidden biases have one size, so only their names tell that
    // each would take the other's velocity.
    let model = kiln::zoo::mlp(d, 2, 2, 7).unwrap();
    let mut params = model.parameters();
    params.swap(1, 3);
    assert_eq!(params[1].shape(), params[3].shape());
    let optimizer = Sgd::new(params, 0.1).momentum(0.9);
    let mut reordered = Trainer::new(model, optimizer, d);
    reordered
        .metadata
        .insert("dataset".into(), "circles".into());
    let err = reordered.resume(&path).unwrap_err().to_string();
    assert!(
        err.contains(r#"["0.weight","0.bias","1.weight","1.bias""#)
            && err.contains(r#"["0.weight","1.bias","1.weight","0.bias""#),
        "{err}"
    );
    assert_eq!(weights(&reordered.model), fresh);

    // A history that does not parse (early stopping replays it) and a
    // format this Kiln does not write are refused, not dropped or guessed.
    let saved = std::fs::read(&path).unwrap();
    for (key, value, expected) in [
        (
            "history",
            "{\"epochs\": [",
            "its training history does not parse",
        ),
        ("format", "kiln-checkpoint-9", "format kiln-checkpoint-9"),
    ] {
        let edited = dir.join("edited.safetensors");
        std::fs::write(&edited, with_metadata(&saved, key, value)).unwrap();
        let mut same = momentum_trainer("circles");
        let err = same.resume(&edited).unwrap_err().to_string();
        assert!(err.contains(expected), "{key}: {err}");
        assert_eq!(weights(&same.model), fresh);
        assert_eq!(same.epochs_done, 0);
    }

    // The same settings resume.
    let mut same = momentum_trainer("circles");
    same.resume(&path).unwrap();
    assert_eq!(same.epochs_done, 1);
    assert_ne!(weights(&same.model), fresh);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A safetensors file's bytes with metadata `key` set to `value`: the
/// header is JSON after its 8-byte little-endian length.
fn with_metadata(file: &[u8], key: &str, value: &str) -> Vec<u8> {
    let len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&file[8..8 + len]).unwrap();
    header["__metadata__"][key] = serde_json::Value::String(value.into());
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&file[8 + len..]);
    out
}

#[test]
fn predict_runs_in_batches_so_large_inputs_fit_the_binding_limit() {
    use kiln::models::{Activation, Dense, Sequential};
    use kiln::train::{Trainer, PREDICT_BATCH};
    let d = device();
    // A hidden layer so wide that its activations for all the samples at
    // once would exceed a storage binding, while one batch's fit.
    let hidden = 1 << 16;
    let limit = d.limits().max_storage_buffer_binding_size as usize;
    let n = limit / (hidden * 4) + 3;
    assert!(PREDICT_BATCH * hidden * 4 <= limit && n * hidden * 4 > limit);
    let model = Sequential::new()
        .push(Dense::new(d, 3, hidden, Activation::Relu, 3).unwrap())
        .push(Dense::new(d, hidden, 2, Activation::None, 4).unwrap());
    let trainer = Trainer::new(model, Sgd::new(vec![], 0.1), d);
    let x = random_vec(n * 3, 94, -1.0, 1.0);
    let all = trainer.predict(&x, 3).unwrap();
    assert_eq!(all.len(), n * 2);
    for row in all.chunks(2) {
        assert!((row[0] + row[1] - 1.0).abs() < 1e-5, "{row:?}");
    }
    // The same rows as predicting a few samples alone.
    let last = &x[(n - 2) * 3..];
    let alone = trainer.predict(last, 3).unwrap();
    for (a, b) in alone.iter().zip(&all[(n - 2) * 2..]) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let err = trainer.predict(&x[..4], 3).unwrap_err().to_string();
    assert!(
        err.contains("4 inputs do not make samples of 3 features"),
        "{err}"
    );
}
