//! The reference workloads, each measured against its reference in the same
//! run and reported as rows of the one results table.

pub mod bert;
pub mod conv;
pub mod lstm;
pub mod matmul;
pub mod mlp;

use crate::support::Row;
use kiln::graph::optim::{Adam, Optimizer};
use kiln::train::Trainer;
use kiln::zoo::Architecture;
use kiln::Device;

/// A workload: its name (what `cargo bench --bench suite -- NAME` selects) and
/// what runs it.
pub type Workload = (&'static str, fn(&Device) -> anyhow::Result<Vec<Row>>);

/// Every workload, cheapest first.
pub const ALL: [Workload; 6] = [
    ("dispatch", matmul::dispatch),
    ("mlp", mlp::run),
    ("matmul", matmul::run),
    ("conv", conv::run),
    ("lstm", lstm::run),
    ("bert", bert::run),
];

/// Deterministic benchmark data in [-0.5, 0.5) (a small LCG is enough).
pub fn random(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(747796405).wrapping_add(2891336453);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// Whether a bench switch is set to anything but `0` (so `=0` turns it off,
/// as the library's `KILN_*=0` switches do).
pub fn switched_on(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v != "0")
}

/// Prints where one step's time went when `KILN_PROFILE` is set.
pub fn maybe_profile(
    device: &Device,
    title: &str,
    mut step: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if !switched_on("KILN_PROFILE") {
        return Ok(());
    }
    // Profiling runs kernels that fusion otherwise composes, and lavapipe
    // compiles a kernel at its first launch (a millisecond or more, counted
    // in that launch's time): one step first, then the one reported.
    device.set_profiling(true)?;
    step()?;
    device.set_profiling(true)?;
    step()?;
    println!("{title}:");
    crate::support::print_profile(&device.profile(), 25);
    device.set_profiling(false)?;
    Ok(())
}

/// A reference model with Adam at 1e-3 (the references' optimizer), ready
/// to train.
pub fn adam_trainer(device: &Device, architecture: Architecture) -> anyhow::Result<Trainer<Adam>> {
    let model = architecture.build(device, 0)?;
    let optimizer = Adam::new(model.parameters(), 1e-3);
    Ok(Trainer::new(model, optimizer, device))
}

/// Pixels per MNIST image.
pub const MNIST_FEATURES: usize = 784;

/// `n` MNIST-shaped samples (784 pixels in [0, 1]) and labels cycling
/// through the ten classes: what the MLP and CNN steps train on.
pub fn mnist_like_batch(n: usize) -> (Vec<f32>, Vec<u32>) {
    let x = (0..n * MNIST_FEATURES)
        .map(|i| ((i * 7919) % 256) as f32 / 255.0)
        .collect();
    let labels = (0..n as u32).map(|i| i % 10).collect();
    (x, labels)
}

/// One training step of a classifier as `fit` runs it
/// (`Trainer::train_on_batch` on `labels.len()` samples of `features`
/// values: the batch uploaded, forward, loss, backward and the update,
/// launched together); with `read`, the loss is read back, which waits for
/// the device.
pub fn training_step(
    trainer: &mut Trainer<impl Optimizer>,
    (x, features): (&[f32], usize),
    labels: &[u32],
    read: bool,
) -> anyhow::Result<()> {
    let loss = trainer.train_on_batch(x, features, labels)?;
    if read {
        loss.item()?;
    }
    Ok(())
}
