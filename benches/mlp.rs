//! Training throughput of the reference MNIST MLP (784-64-64-10, Adam, batch 32),
//! with PyTorch CPU measured in the same run when it is installed, and where the
//! time goes (dispatches and submits per step).
//!
//! ```text
//! cargo bench --bench mlp
//! ```

mod support;

use kiln::graph::optim::{Adam, Optimizer};
use kiln::graph::{loss, Tensor};
use kiln::models::Mode;
use kiln::zoo::Architecture;
use std::time::Instant;

const BATCH: usize = 32;
const STEPS: usize = 400;

fn main() -> anyhow::Result<()> {
    let device = kiln::Device::new()?;
    let info = device.adapter_info();
    println!("adapter: {} ({:?})", info.name, info.backend);
    let model = Architecture::Mlp.build(&device, 0)?;
    let mut opt = Adam::new(model.parameters(), 1e-3);
    let x: Vec<f32> = (0..BATCH * 784)
        .map(|i| ((i * 7919) % 256) as f32 / 255.0)
        .collect();
    let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % 10).collect();

    let mut step = |read: bool| -> anyhow::Result<()> {
        let xt = Tensor::from_slice(&device, &x, &[BATCH, 784])?;
        let logits = model.forward(&xt, &mut Mode::training(0))?;
        let l = loss::cross_entropy(&logits, &labels)?;
        opt.zero_grad();
        l.backward()?;
        opt.step()?;
        if read {
            l.item()?;
        }
        Ok(())
    };
    for _ in 0..20 {
        step(true)?;
    }
    let before = device.dispatch_stats();
    let start = Instant::now();
    for i in 0..STEPS {
        // Read the loss every 50 steps, as `fit` does for its progress bar.
        step(i % 50 == 49)?;
    }
    device.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    let after = device.dispatch_stats();
    let kiln_rate = (STEPS * BATCH) as f64 / seconds;
    let dispatches = (after.dispatches - before.dispatches) as f64 / STEPS as f64;
    let submits = (after.submits - before.submits) as f64 / STEPS as f64;

    println!();
    println!("MNIST MLP training step, batch {BATCH}");
    println!("{:<28} {:>12}", "", "samples/s");
    println!("{:<28} {:>12.0}", "kiln", kiln_rate);
    match torch_samples_per_second() {
        Ok(torch) => {
            println!("{:<28} {:>12.0}", "pytorch cpu (same run)", torch);
            println!("{:<28} {:>12.2}", "ratio kiln / pytorch", kiln_rate / torch);
        }
        Err(why) => println!("(no PyTorch reference: {why})"),
    }
    println!();
    println!("where the time goes, per step:");
    println!("  dispatches           {dispatches:.1}");
    println!("  submits              {submits:.2}");
    println!(
        "  step time            {:.0} us",
        1e6 * seconds / STEPS as f64
    );
    println!(
        "  time per dispatch    {:.1} us",
        1e6 * seconds / STEPS as f64 / dispatches
    );
    Ok(())
}

fn torch_samples_per_second() -> Result<f64, String> {
    let script = r#"
import os, time, torch
torch.set_num_threads(os.cpu_count())
model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                            torch.nn.ReLU(), torch.nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), 1e-3)
x = torch.rand(32, 784); y = torch.arange(32) % 10
def step():
    opt.zero_grad(); loss = torch.nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
for _ in range(20): step()
start = time.perf_counter()
for _ in range(400): step()
print(400 * 32 / (time.perf_counter() - start))
"#;
    let values = support::numbers(support::run_python("torch", script, &[])?)?;
    values
        .first()
        .copied()
        .ok_or_else(|| "no output from the PyTorch script".into())
}
