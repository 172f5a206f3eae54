//! A training loop written out by hand, as in PyTorch: shuffle, batch,
//! forward, loss, backward, clip, step, with SGD (Nesterov momentum, weight
//! decay) on a cosine learning-rate schedule, on the real MNIST. `Trainer::fit`
//! does all of this (and more) for you; this is for when you want control.
//!
//! ```text
//! scripts/install-vulkan-cpu.sh && scripts/fetch-mnist.sh
//! cargo run --release --example custom_loop
//! ```

use kiln::data::{shuffled_indices, Dataset};
use kiln::graph::optim::{clip_grad_norm, CosineLr, LrSchedule, Optimizer, Sgd};
use kiln::graph::{loss, NoGradGuard, Tensor};
use kiln::models::{Activation, Dense, Mode, Sequential};

const EPOCHS: usize = 3;
const BATCH: usize = 64;

fn main() -> anyhow::Result<()> {
    let device = kiln::Device::new()?;
    let mnist = kiln::data::mnist::load()?;
    let model = Sequential::new()
        .push(Dense::new(&device, 784, 128, Activation::Relu, 7)?)
        .push(Dense::new(&device, 128, 10, Activation::None, 8)?);

    let steps_per_epoch = mnist.train.len().div_ceil(BATCH);
    let schedule = CosineLr {
        base: 0.1,
        min: 0.001,
        total_steps: EPOCHS * steps_per_epoch,
    };
    let mut optimizer = Sgd::new(model.parameters(), schedule.base)
        .momentum(0.9)
        .nesterov(true)
        .weight_decay(1e-4);

    let (mut xb, mut yb) = (Vec::new(), Vec::new());
    let mut step = 0;
    for epoch in 0..EPOCHS {
        let order = shuffled_indices(mnist.train.len(), epoch as u64);
        let mut last_loss = None;
        for (i, batch) in order.chunks(BATCH).enumerate() {
            mnist.train.gather(batch, &mut xb, &mut yb)?;
            let x = Tensor::from_slice(&device, &xb, &[yb.len(), 784])?;
            optimizer.set_learning_rate(schedule.lr(step));
            // Kernels launched inside `together` that do not depend on each
            // other run as one dispatch (fewer launches; same results).
            let loss = device.together(|| -> anyhow::Result<Tensor> {
                // The seed varies per step so that dropout, if any, draws new masks.
                let logits = model.forward(&x, &mut Mode::training(step as u32))?;
                let loss = loss::cross_entropy(&logits, &yb)?;
                optimizer.zero_grad();
                loss.backward()?;
                clip_grad_norm(optimizer.params(), 5.0)?;
                optimizer.step()?;
                Ok(loss)
            })?;
            step += 1;
            // Reading the loss waits for the GPU, so do it now and then only.
            if i % 200 == 0 {
                last_loss = Some(loss.item()?);
            }
        }
        let accuracy = accuracy(&device, &model, &mnist.test)?;
        println!(
            "epoch {}: loss {:.4} (last sampled), lr {:.4}, test accuracy {:.2}%",
            epoch + 1,
            last_loss.unwrap_or(f32::NAN),
            optimizer.learning_rate(),
            accuracy * 100.0
        );
    }
    Ok(())
}

/// The fraction of `data` whose largest logit is its label.
fn accuracy(device: &kiln::Device, model: &Sequential, data: &Dataset) -> anyhow::Result<f32> {
    // No graph is recorded for evaluation.
    let _no_grad = NoGradGuard::new();
    let (mut xb, mut yb) = (Vec::new(), Vec::new());
    let all: Vec<usize> = (0..data.len()).collect();
    let mut correct = 0;
    for batch in all.chunks(1000) {
        data.gather(batch, &mut xb, &mut yb)?;
        let x = Tensor::from_slice(device, &xb, &[yb.len(), data.features])?;
        let logits = model.forward(&x, &mut Mode::eval())?.to_vec()?;
        for (row, &label) in logits.chunks(data.classes).zip(&yb) {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(class, _)| class);
            correct += usize::from(best == Some(label as usize));
        }
    }
    Ok(correct as f32 / data.len() as f32)
}
