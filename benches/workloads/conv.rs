//! Convolution throughput for the reference MNIST CNN's three conv layers at
//! batch 32 (forward + both backward passes), and training samples/s of the
//! whole model, against PyTorch CPU.

use crate::support::{self, Row, StepCounts};
use kiln::graph::{Conv2d, Tensor};
use kiln::zoo::Architecture;
use kiln::Device;
use std::time::{Duration, Instant};

const BATCH: usize = 32;
const MODEL_STEPS: usize = 30;

/// One conv layer of the reference model: input `[BATCH, c, h, w]`, `out`
/// filters of 3x3, stride 1, no padding.
struct ConvCase {
    name: &'static str,
    c: usize,
    h: usize,
    w: usize,
    out: usize,
}

const CASES: [ConvCase; 3] = [
    ConvCase {
        name: "conv1 1->32 @28x28",
        c: 1,
        h: 28,
        w: 28,
        out: 32,
    },
    ConvCase {
        name: "conv2 32->64 @13x13",
        c: 32,
        h: 13,
        w: 13,
        out: 64,
    },
    ConvCase {
        name: "conv3 64->64 @5x5",
        c: 64,
        h: 5,
        w: 5,
        out: 64,
    },
];

impl ConvCase {
    /// Forward, input-gradient and weight-gradient products: three times the
    /// forward's 2 * n * oh * ow * out * c * 9 flops.
    fn flops(&self) -> f64 {
        let (oh, ow) = (self.h - 2, self.w - 2);
        3.0 * 2.0 * (BATCH * oh * ow * self.out * self.c * 9) as f64
    }
}

/// Alternating timed windows, Kiln's and PyTorch's, per measurement; the
/// best of each counts.
const WINDOWS: usize = 3;

pub fn run(device: &Device) -> anyhow::Result<Vec<Row>> {
    let mut torch = support::Reference::start("torch", TORCH_CONV);
    let mut rows = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        // PyTorch answers passes per second.
        let (rate, torch_passes) = support::alternate(
            WINDOWS,
            || Ok((case.flops() / time_conv(device, case)? / 1e9, ())),
            &mut torch,
            &format!("conv {i}"),
        )?;
        let reference = torch_passes.map(|per_second| case.flops() * per_second / 1e9);
        rows.push(
            Row::new(
                format!("{} fwd+bwd, batch {BATCH}", case.name),
                "GFLOP/s",
                rate.0,
            )
            .against(support::torch_name(), reference.as_ref().copied()),
        );
    }
    // The last window also profiles a step (when KILN_PROFILE is set).
    let mut window = 0;
    let ((rate, counts), torch_rate) = support::alternate(
        WINDOWS,
        || {
            window += 1;
            model_samples_per_second(device, window == WINDOWS)
        },
        &mut torch,
        "model",
    )?;
    rows.push(
        Row::new(
            format!("reference CNN training, batch {BATCH}"),
            "samples/s",
            rate,
        )
        .against(support::torch_name(), torch_rate.as_ref().copied())
        .per_step(counts),
    );
    Ok(rows)
}

/// Seconds per forward + backward of one conv layer (median-free mean over at
/// least a second of repetitions, each waited for).
fn time_conv(device: &Device, case: &ConvCase) -> anyhow::Result<f64> {
    let x = Tensor::uniform(device, &[BATCH, case.c, case.h, case.w], -1.0, 1.0, 1)?
        .requires_grad(true);
    let w = Tensor::uniform(device, &[case.out, case.c, 3, 3], -0.3, 0.3, 2)?.requires_grad(true);
    let b = Tensor::uniform(device, &[case.out], -0.1, 0.1, 3)?.requires_grad(true);
    let run = || -> anyhow::Result<()> {
        for t in [&x, &w, &b] {
            t.zero_grad();
        }
        x.conv2d(&w, Some(&b), Conv2d::default())?
            .sum_all()?
            .backward()?;
        device.synchronize()?;
        Ok(())
    };
    for _ in 0..3 {
        run()?;
    }
    let (start, mut reps) = (Instant::now(), 0);
    while reps < 5 || start.elapsed() < Duration::from_secs(1) {
        run()?;
        reps += 1;
    }
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

fn model_samples_per_second(device: &Device, profile: bool) -> anyhow::Result<(f64, StepCounts)> {
    let mut trainer = super::adam_trainer(device, Architecture::Cnn)?;
    let (x, labels) = super::mnist_like_batch(BATCH);
    let mut step =
        || super::training_step(&mut trainer, (&x, super::MNIST_FEATURES), &labels, false);
    for _ in 0..3 {
        step()?;
    }
    let (seconds, counts) = support::measure_steps(device, MODEL_STEPS, |_| step())?;
    if profile {
        super::maybe_profile(device, "CNN training step", step)?;
    }
    Ok(((MODEL_STEPS * BATCH) as f64 / seconds, counts))
}

/// The same layers and model in PyTorch. Requests: `conv I` answers forward
/// + backward passes per second of case `I`, `model` training samples/s.
const TORCH_CONV: &str = r#"
import os, time, torch
torch.set_num_threads(os.cpu_count())
F = torch.nn.functional
def per_second(fn, min_seconds=1.0):
    fn(); sync()
    reps, start = 0, time.perf_counter()
    while reps < 5 or time.perf_counter() - start < min_seconds:
        fn(); reps += 1
        if reps % 5 == 0: sync()
    sync()
    return reps / (time.perf_counter() - start)
def conv_case(c, h, out):
    x = torch.rand(32, c, h, h, device=DEV, requires_grad=True)
    w = (torch.rand(out, c, 3, 3, device=DEV) - 0.5).requires_grad_()
    b = torch.rand(out, device=DEV, requires_grad=True)
    def run():
        x.grad = w.grad = b.grad = None
        F.conv2d(x, w, b).sum().backward()
    return run
cases = [conv_case(c, h, out) for c, h, out in [(1, 28, 32), (32, 13, 64), (64, 5, 64)]]
model = torch.nn.Sequential(
    torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(32, 64, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(64, 64, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    torch.nn.Linear(576, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(DEV)
opt = torch.optim.Adam(model.parameters(), 1e-3)
x = torch.rand(32, 1, 28, 28, device=DEV); y = torch.arange(32, device=DEV) % 10
def step():
    opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
for _ in range(10): step()
def measure(request):
    if request == "model":
        return 32 * per_second(step)
    return per_second(cases[int(request.split()[1])])
"#;
