//! Training throughput of the reference MNIST MLP (784-64-64-10, Adam, batch
//! 32) against PyTorch CPU.

use crate::support::{self, Row};
use kiln::zoo::Architecture;
use kiln::Device;

const BATCH: usize = 32;
const STEPS: usize = 400;
/// Timed windows of `STEPS` steps each, for Kiln and PyTorch; the best counts.
const WINDOWS: usize = 5;

pub fn run(device: &Device) -> anyhow::Result<Vec<Row>> {
    let mut trainer = super::adam_trainer(device, Architecture::Mlp)?;
    let (x, labels) = super::mnist_like_batch(BATCH);
    let mut step =
        |read: bool| super::training_step(&mut trainer, (&x, super::MNIST_FEATURES), &labels, read);
    for _ in 0..20 {
        step(true)?;
    }
    // Read the loss every 50 steps, as `fit` does for its progress bar. A step
    // takes milliseconds, so the best of a few windows, alternating with
    // PyTorch's, keeps a moment's interference on this shared machine out of
    // the ratio.
    let mut torch = support::Reference::start("torch", TORCH_MLP);
    let ((rate, counts), torch_rate) = support::alternate(
        WINDOWS,
        || {
            let (seconds, counts) = support::measure_steps(device, STEPS, |i| step(i % 50 == 49))?;
            Ok(((STEPS * BATCH) as f64 / seconds, counts))
        },
        &mut torch,
        &STEPS.to_string(),
    )?;
    super::maybe_profile(device, "MLP training step", || step(true))?;
    Ok(vec![Row::new(
        format!("MNIST MLP training, batch {BATCH}"),
        "samples/s",
        rate,
    )
    .against(support::torch_name(), torch_rate.as_ref().copied())
    .per_step(counts)])
}

/// The same model, optimizer and batch in PyTorch; each request is a number
/// of steps to time, with one thread and with all (for ops this small one
/// thread is often faster and always steadier on a shared machine), best
/// figure returned.
const TORCH_MLP: &str = r#"
import os, time, torch
model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                            torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(DEV)
opt = torch.optim.Adam(model.parameters(), 1e-3)
x = torch.rand(32, 784, device=DEV); y = torch.arange(32, device=DEV) % 10
def step():
    opt.zero_grad(); loss = torch.nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
for _ in range(20): step()
def measure(steps):
    best = 0.0
    for threads in sorted({1, os.cpu_count()}):
        torch.set_num_threads(threads)
        sync(); start = time.perf_counter()
        for _ in range(int(steps)): step()
        sync(); best = max(best, int(steps) * 32 / (time.perf_counter() - start))
    return best
"#;
