//! Layers of kiln-models beyond their ops: batch-norm running statistics and
//! their checkpoints, pooling layers' shapes, and a network with batch norm
//! that must learn.

mod common;

use common::{assert_close, device, random_vec};
use kiln::graph::optim::{Adam, Optimizer};
use kiln::graph::{loss, Conv2d, Tensor};
use kiln::models::{
    Activation, AttentionPooling, AvgPool2D, BatchNorm2D, Conv2D, Dense, Embedding, Flatten,
    GlobalAvgPool2D, Layer, Lstm, MaxPool2D, Mode, Sequential,
};

/// Per-channel mean and unbiased variance of `[n, c, rest]` data.
fn channel_stats(x: &[f32], [n, c, rest]: [usize; 3]) -> (Vec<f64>, Vec<f64>) {
    (0..c)
        .map(|ch| {
            let vals: Vec<f64> = (0..n)
                .flat_map(|b| (0..rest).map(move |i| (b, i)))
                .map(|(b, i)| f64::from(x[(b * c + ch) * rest + i]))
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var =
                vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (vals.len() - 1) as f64;
            (mean, var)
        })
        .unzip()
}

#[test]
fn batch_norm_tracks_running_statistics_and_uses_them_in_eval() {
    let d = device();
    let (n, c, h, w) = (4, 3, 5, 6);
    let bn = BatchNorm2D::new(d, c).unwrap();
    let gamma = random_vec(c, 801, 0.5, 1.5);
    let beta = random_vec(c, 802, -0.5, 0.5);
    d.copy_into(&d.upload(&gamma).unwrap(), bn.gamma.buffer())
        .unwrap();
    d.copy_into(&d.upload(&beta).unwrap(), bn.beta.buffer())
        .unwrap();

    let (mut want_mean, mut want_var) = (vec![0.0f64; c], vec![1.0f64; c]);
    for step in 0..3 {
        // Each batch has its own offset and spread, so the averages move.
        let lo = -1.0 + step as f32;
        let data = random_vec(n * c * h * w, 810 + step, lo, lo + 2.0 + step as f32);
        let x = Tensor::from_slice(d, &data, &[n, c, h, w]).unwrap();
        bn.forward(&x, &mut Mode::training(1)).unwrap();
        let (mean, var) = channel_stats(&data, [n, c, h * w]);
        for ch in 0..c {
            want_mean[ch] = 0.9 * want_mean[ch] + 0.1 * mean[ch];
            want_var[ch] = 0.9 * want_var[ch] + 0.1 * var[ch];
        }
    }
    let got_mean = bn.running_mean.to_vec().unwrap();
    let got_var = bn.running_var.to_vec().unwrap();
    assert_close("running mean", &got_mean, &want_mean, 1e-5, 1e-6);
    assert_close("running variance", &got_var, &want_var, 1e-5, 1e-6);

    let data = random_vec(2 * c * h * w, 820, -3.0, 3.0);
    let x = Tensor::from_slice(d, &data, &[2, c, h, w]).unwrap();
    let y = bn.forward(&x, &mut Mode::eval()).unwrap().to_vec().unwrap();
    let want: Vec<f64> = data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = i / (h * w) % c;
            (f64::from(v) - want_mean[ch]) / (want_var[ch] + 1e-5).sqrt() * f64::from(gamma[ch])
                + f64::from(beta[ch])
        })
        .collect();
    assert_close("eval output", &y, &want, 1e-4, 1e-5);
    // Evaluation leaves the statistics alone.
    assert_eq!(bn.running_mean.to_vec().unwrap(), got_mean);
}

#[test]
fn batch_norm_statistics_are_saved_loaded_and_not_trained() {
    let d = device();
    let model = || {
        Sequential::new()
            .push(Conv2D::new(d, 2, 3, [3, 3], Conv2d::default(), Activation::None, 5).unwrap())
            .push(BatchNorm2D::new(d, 3).unwrap())
    };
    let trained = model();
    let x =
        Tensor::from_slice(d, &random_vec(2 * 2 * 6 * 6, 830, 0.0, 4.0), &[2, 2, 6, 6]).unwrap();
    trained.forward(&x, &mut Mode::training(1)).unwrap();

    let names: Vec<String> = trained.named_state().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "0.weight",
            "0.bias",
            "1.gamma",
            "1.beta",
            "1.running_mean",
            "1.running_var"
        ]
    );
    // Optimizers see parameters only.
    assert_eq!(trained.parameters().len(), 4);

    let dir = std::env::temp_dir().join(format!("kiln-bn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bn.safetensors");
    trained.save(&path, &Default::default()).unwrap();
    let loaded = model();
    loaded.load_weights(&path).unwrap();
    for ((name, a), (_, b)) in trained.named_state().iter().zip(loaded.named_state()) {
        assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "{name}");
    }
    let eval = |m: &Sequential| m.forward(&x, &mut Mode::eval()).unwrap().to_vec().unwrap();
    assert_eq!(eval(&trained), eval(&loaded));

    // A checkpoint without the statistics is refused, naming what is missing.
    let plain = Sequential::new()
        .push(Conv2D::new(d, 2, 3, [3, 3], Conv2d::default(), Activation::None, 5).unwrap());
    let old = dir.join("plain.safetensors");
    plain.save(&old, &Default::default()).unwrap();
    let err = model().load_weights(&old).unwrap_err().to_string();
    assert!(err.contains("1.gamma") || err.contains("missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pooling_layers_report_the_shapes_they_produce() {
    let d = device();
    let layers: Vec<Box<dyn Layer>> = vec![
        Box::new(MaxPool2D::new(2)),
        Box::new(MaxPool2D::new(2).same()),
        Box::new(AvgPool2D::new(3)),
        Box::new(AvgPool2D::new(3).same()),
        Box::new(GlobalAvgPool2D),
    ];
    for layer in &layers {
        for [h, w] in [[7, 9], [8, 6]] {
            let x =
                Tensor::from_slice(d, &random_vec(2 * 3 * h * w, 840, -1.0, 1.0), &[2, 3, h, w])
                    .unwrap();
            let y = layer.forward(&x, &mut Mode::eval()).unwrap();
            assert_eq!(
                y.shape()[1..],
                layer.output_shape(&[3, h, w]),
                "{} on {h}x{w}",
                layer.kind()
            );
        }
    }
}

#[test]
fn zero_strides_and_kernels_are_errors_and_summaries_survive_them() {
    let d = device();
    let x =
        Tensor::from_slice(d, &random_vec(2 * 3 * 6 * 6, 841, -1.0, 1.0), &[2, 3, 6, 6]).unwrap();
    fn refused(layer: impl Layer + 'static, x: &Tensor) {
        let kind = layer.kind();
        let err = layer
            .forward(x, &mut Mode::eval())
            .err()
            .unwrap_or_else(|| panic!("{kind}: a zero stride ran"))
            .to_string();
        assert!(err.contains("positive"), "{kind}: {err}");
        let summary = Sequential::new().push(layer).summary(&[3, 6, 6]);
        assert!(summary.contains(kind), "{summary}");
    }
    refused(MaxPool2D::new(0), &x);
    refused(MaxPool2D::new(0).same(), &x);
    refused(AvgPool2D::new(0).same(), &x);
    let zero_stride = Conv2d {
        stride: [0, 0],
        ..Conv2d::default()
    };
    let err = Conv2D::new(d, 3, 4, [3, 3], zero_stride, Activation::Relu, 0)
        .err()
        .expect("a zero stride")
        .to_string();
    assert!(err.contains("positive"), "{err}");
    let err = Conv2D::new(d, 3, 4, [0, 3], Conv2d::default(), Activation::Relu, 0)
        .err()
        .expect("a zero kernel")
        .to_string();
    assert!(err.contains("positive"), "{err}");
    // Fields set after construction reach forward's own check.
    let mut conv = Conv2D::new(d, 3, 4, [3, 3], Conv2d::default(), Activation::Relu, 0).unwrap();
    conv.conv = zero_stride;
    refused(conv, &x);
}

/// Images of a bright vertical or horizontal bar at a random place, far from
/// zero mean (offset 20 to 21): batch norm has to remove the offset.
fn bars(n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let noise = random_vec(n * 64 + 2 * n, seed, 0.0, 1.0);
    let mut images = Vec::with_capacity(n * 64);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as u32;
        let at = (noise[n * 64 + 2 * i] * 8.0) as usize % 8;
        let offset = 20.0 + noise[n * 64 + 2 * i + 1];
        for p in 0..64 {
            let (row, col) = (p / 8, p % 8);
            let on = if label == 0 { col == at } else { row == at };
            images.push(offset + noise[i * 64 + p] + if on { 3.0 } else { 0.0 });
        }
        labels.push(label);
    }
    (images, labels)
}

#[test]
fn a_cnn_with_batch_norm_learns_and_evaluates_with_running_statistics() {
    let d = device();
    let model = Sequential::new()
        .push(Conv2D::new(d, 1, 6, [3, 3], Conv2d::default(), Activation::None, 11).unwrap())
        .push(BatchNorm2D::new(d, 6).unwrap())
        .push(Activation::Relu)
        .push(MaxPool2D::new(2))
        .push(Flatten)
        .push(Dense::new(d, 6 * 3 * 3, 2, Activation::None, 13).unwrap());
    let (x, y) = bars(256, 850);
    let mut opt = Adam::new(model.parameters(), 1e-2);
    for epoch in 0..12 {
        for b in 0..8 {
            let xs =
                Tensor::from_slice(d, &x[b * 32 * 64..(b + 1) * 32 * 64], &[32, 1, 8, 8]).unwrap();
            let logits = model
                .forward(&xs, &mut Mode::training(epoch * 8 + b as u32))
                .unwrap();
            let l = loss::cross_entropy(&logits, &y[b * 32..(b + 1) * 32]).unwrap();
            opt.zero_grad();
            l.backward().unwrap();
            opt.step().unwrap();
        }
    }
    let (tx, ty) = bars(200, 860);
    let logits = model
        .forward(
            &Tensor::from_slice(d, &tx, &[200, 1, 8, 8]).unwrap(),
            &mut Mode::eval(),
        )
        .unwrap()
        .to_vec()
        .unwrap();
    let correct = logits
        .chunks(2)
        .zip(&ty)
        .filter(|(l, &t)| u32::from(l[1] > l[0]) == t)
        .count();
    assert!(correct >= 196, "{correct}/200 held-out images right");
}

#[test]
fn padding_never_changes_what_stacked_lstms_return() {
    // Embedding(mask_zero) -> LSTM(return_sequences) -> LSTM: the mask reaches
    // both LSTMs, so trailing padding leaves the final state as it was.
    let d = device();
    let model = Sequential::new()
        .push(Embedding::new(d, 20, 6, 1).unwrap().mask_zero())
        .push(Lstm::new(d, 6, 5, 2).unwrap().return_sequences())
        .push(Lstm::new(d, 5, 4, 3).unwrap());
    assert_eq!(
        model
            .summary(&[7])
            .lines()
            .nth(2)
            .unwrap()
            .split_whitespace()
            .nth(2),
        Some("[7,")
    );
    let run = |ids: &[f32], steps: usize| {
        let x = Tensor::from_slice(d, ids, &[ids.len() / steps, steps]).unwrap();
        model
            .forward(&x, &mut Mode::eval())
            .unwrap()
            .to_vec()
            .unwrap()
    };
    let short = run(&[5.0, 7.0, 3.0, 11.0, 2.0, 9.0], 3);
    let padded = run(&[5.0, 7.0, 3.0, 0.0, 0.0, 11.0, 2.0, 9.0, 0.0, 0.0], 5);
    assert_eq!(short.len(), 2 * 4);
    assert_close(
        "padded vs short",
        &padded,
        &short.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
        1e-5,
        1e-6,
    );
    // Without the mask the padding would change the state.
    let unmasked = Sequential::new()
        .push(Embedding::new(d, 20, 6, 1).unwrap())
        .push(Lstm::new(d, 6, 5, 2).unwrap().return_sequences())
        .push(Lstm::new(d, 5, 4, 3).unwrap());
    let x = Tensor::from_slice(d, &[5.0, 7.0, 3.0, 0.0, 0.0], &[1, 5]).unwrap();
    let y = unmasked
        .forward(&x, &mut Mode::eval())
        .unwrap()
        .to_vec()
        .unwrap();
    assert!(y.iter().zip(&short[..4]).any(|(a, b)| (a - b).abs() > 1e-4));
}

#[test]
fn an_lstm_refuses_sequences_without_time_steps() {
    let d = device();
    let lstm = Lstm::new(d, 4, 3, 0).unwrap();
    let x = Tensor::zeros(d, &[2, 0, 4]).unwrap();
    let err = lstm
        .forward(&x, &mut Mode::eval())
        .expect_err("zero steps")
        .to_string();
    assert!(err.contains("no time steps"), "{err}");
}

#[test]
fn embedding_rejects_inputs_that_are_not_ids() {
    let d = device();
    let e = Embedding::new(d, 10, 3, 1).unwrap();
    for bad in [10.0f32, -1.0, 2.5] {
        let x = Tensor::from_slice(d, &[1.0, bad], &[1, 2]).unwrap();
        let err = e.forward(&x, &mut Mode::eval()).unwrap_err().to_string();
        assert!(
            err.contains("not an id below the vocabulary size 10"),
            "{err}"
        );
    }
}

#[test]
fn an_embedding_takes_host_copied_ids_without_waiting_for_the_device() {
    let d = device();
    let (vocab, dim) = (10, 3);
    let e = Embedding::new(d, vocab, dim, 1).unwrap().mask_zero();
    let table = e.table.to_vec().unwrap();
    let ids = [3.0f32, 0.0, 7.0, 7.0, 1.0, 9.0];
    let x = Tensor::from_slice_with_host_copy(d, &ids, &[2, 3]).unwrap();
    d.synchronize().unwrap();
    let before = d.dispatch_stats().submits;
    let mut mode = Mode::training(0);
    let out = e.forward(&x, &mut mode).unwrap();
    assert_eq!(d.dispatch_stats().submits, before, "the ids were read back");
    assert_eq!(out.shape(), [2, 3, dim]);
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&id| table[id as usize * dim..][..dim].to_vec())
        .collect();
    assert_eq!(out.to_vec().unwrap(), want);
    let mask = mode.mask.expect("mask_zero sets a mask").to_vec().unwrap();
    assert_eq!(mask, [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    // Out-of-range ids are still refused from the host copy.
    let bad = Tensor::from_slice_with_host_copy(d, &[1.0, 10.0], &[1, 2]).unwrap();
    let err = e.forward(&bad, &mut Mode::eval()).unwrap_err().to_string();
    assert!(
        err.contains("not an id below the vocabulary size 10"),
        "{err}"
    );
}

#[test]
fn attention_pooling_weighs_the_real_steps_by_softmax_of_their_scores() {
    let d = device();
    let (b, t, f) = (2, 4, 3);
    let pool = AttentionPooling::new(d, f, 7).unwrap();
    let query = pool.query.to_vec().unwrap();
    let data = random_vec(b * t * f, 870, -1.0, 1.0);
    let mask = [1.0f32, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
    let x = Tensor::from_slice(d, &data, &[b, t, f]).unwrap();
    let mut mode = Mode::eval();
    mode.mask = Some(Tensor::from_slice(d, &mask, &[b, t]).unwrap());
    let got = pool.forward(&x, &mut mode).unwrap().to_vec().unwrap();
    assert!(
        mode.mask.is_none(),
        "the pooled output has no steps to mask"
    );
    let mut want = Vec::new();
    for bi in 0..b {
        let step = |ti: usize| &data[(bi * t + ti) * f..(bi * t + ti + 1) * f];
        let real: Vec<usize> = (0..t).filter(|&ti| mask[bi * t + ti] > 0.5).collect();
        let scores: Vec<f64> = real
            .iter()
            .map(|&ti| {
                step(ti)
                    .iter()
                    .zip(&query)
                    .map(|(a, q)| f64::from(a * q))
                    .sum()
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
        let norm: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        for j in 0..f {
            want.push(
                real.iter()
                    .zip(&scores)
                    .map(|(&ti, s)| (s - max).exp() / norm * f64::from(step(ti)[j]))
                    .sum(),
            );
        }
    }
    assert_close("attention pooling", &got, &want, 1e-5, 1e-6);
}

#[test]
fn layers_of_size_zero_are_refused_with_the_size_named() {
    let d = device();
    let err = |r: Result<(), kiln::models::ModelError>| r.unwrap_err().to_string();
    let dense = err(Dense::new(d, 784, 0, Activation::Relu, 1).map(drop));
    assert!(
        dense.contains("Dense: outputs must be at least 1"),
        "{dense}"
    );
    let dense = err(Dense::new(d, 0, 10, Activation::Relu, 1).map(drop));
    assert!(
        dense.contains("Dense: inputs must be at least 1"),
        "{dense}"
    );
    let lstm = err(Lstm::new(d, 32, 0, 1).map(drop));
    assert!(lstm.contains("Lstm: units must be at least 1"), "{lstm}");
    let embedding = err(Embedding::new(d, 0, 32, 1).map(drop));
    assert!(
        embedding.contains("Embedding: vocab must be at least 1"),
        "{embedding}"
    );
    let pooling = err(AttentionPooling::new(d, 0, 1).map(drop));
    assert!(pooling.contains("AttentionPooling: features"), "{pooling}");
    assert!(Dense::new(d, 1, 1, Activation::None, 1).is_ok());
}

#[test]
fn a_checkpoint_that_fails_part_way_leaves_the_model_as_it_was() {
    let d = device();
    let model = || {
        Sequential::new()
            .push(Dense::new(d, 3, 4, Activation::Relu, 11).unwrap())
            .push(Dense::new(d, 4, 2, Activation::None, 12).unwrap())
    };
    let target = model();
    let before: Vec<Vec<f32>> = target
        .parameters()
        .iter()
        .map(|p| p.to_vec().unwrap())
        .collect();
    // Every name right, the first tensors right too, the last misshapen.
    let mut tensors: Vec<kiln::models::checkpoint::NamedValues> = model()
        .named_state()
        .into_iter()
        .map(|(name, t)| {
            (
                name,
                t.shape().to_vec(),
                random_vec(t.numel(), 13, -1.0, 1.0),
            )
        })
        .collect();
    let last = tensors.last_mut().unwrap();
    last.1 = vec![3];
    last.2.push(0.5);
    let path =
        std::env::temp_dir().join(format!("kiln-partial-{}.safetensors", std::process::id()));
    kiln::models::checkpoint::save(&path, &tensors, &Default::default()).unwrap();
    let err = target.load_weights(&path).unwrap_err().to_string();
    assert!(err.contains("tensor 1.bias has shape [3]"), "{err}");
    let after: Vec<Vec<f32>> = target
        .parameters()
        .iter()
        .map(|p| p.to_vec().unwrap())
        .collect();
    assert_eq!(after, before);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn set_trainable_freezes_one_layer_and_refuses_a_layer_that_is_not_there() {
    let d = device();
    let model = Sequential::new()
        .push(Dense::new(d, 3, 4, Activation::Relu, 1).unwrap())
        .push(Dense::new(d, 4, 2, Activation::None, 2).unwrap());
    model.set_trainable(0, false).unwrap();
    let trainable: Vec<(String, bool)> = model
        .named_parameters()
        .into_iter()
        .map(|(name, p)| (name, p.is_requires_grad()))
        .collect();
    for (name, wants_grad) in &trainable {
        assert_eq!(*wants_grad, !name.starts_with("0."), "{name}");
    }
    model.set_trainable(0, true).unwrap();
    assert!(model.parameters().iter().all(Tensor::is_requires_grad));
    let err = model.set_trainable(2, false).unwrap_err().to_string();
    assert!(err.contains("no layer 2; the model has 2"), "{err}");
}
