//! Kernel benchmarks: matmul throughput against numpy's sgemm measured in the
//! same run, and the cost of a dispatch with and without batching.
//!
//! ```text
//! cargo bench --bench kernels                # default tiling for this adapter
//! KILN_BENCH_SWEEP=1 cargo bench --bench kernels   # also try other tilings
//! ```

mod support;

use kiln::device::{Device, GpuBuffer, Matmul, MatmulTiling, UnaryOp};
use std::time::{Duration, Instant};

const SIZES: [usize; 3] = [256, 512, 1024];

fn main() -> anyhow::Result<()> {
    let device = Device::new()?;
    let info = device.adapter_info();
    println!(
        "adapter: {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    println!();

    let numpy = numpy_sgemm_gflops(&SIZES);
    let mut tilings = vec![device.tuning().matmul];
    if std::env::var_os("KILN_BENCH_SWEEP").is_some() {
        for s in [
            "subgroup:4:8:64",
            "subgroup:8:8:64",
            "subgroup:4:8:32",
            "subgroup:2:8:64",
            "register:16x16:8x4",
            "register:8x16:8x4",
            "shared:64x64x16:4x4",
        ] {
            let t: MatmulTiling = s.parse().map_err(anyhow::Error::msg)?;
            if !tilings.contains(&t)
                && t.validate(device.limits(), device.features(), device.adapter_info())
                    .is_ok()
            {
                tilings.push(t);
            }
        }
    }

    println!("matmul, f32, C = A x B (square N)");
    println!(
        "{:<24} {:>6} {:>12} {:>14} {:>8}",
        "tiling", "N", "kiln GFLOP/s", "numpy GFLOP/s", "ratio"
    );
    for tiling in &tilings {
        for (i, &n) in SIZES.iter().enumerate() {
            let gflops = matmul_gflops(&device, *tiling, n)?;
            let (reference, ratio) = match &numpy {
                Ok(r) => (format!("{:.1}", r[i]), format!("{:.2}", gflops / r[i])),
                Err(_) => ("-".into(), "-".into()),
            };
            println!(
                "{:<24} {:>6} {:>12.1} {:>14} {:>8}",
                tiling.to_string(),
                n,
                gflops,
                reference,
                ratio
            );
        }
    }
    if let Err(why) = &numpy {
        println!("(no numpy reference: {why})");
    }
    println!();

    let (batched, unbatched) = dispatch_overhead(&device)?;
    println!("per-dispatch cost, 1024-element elementwise op");
    println!("{:<36} {:>10}", "mode", "us/dispatch");
    println!(
        "{:<36} {:>10.1}",
        "batched (1000 dispatches, 1 submit)", batched
    );
    println!(
        "{:<36} {:>10.1}",
        "unbatched (submit + wait each)", unbatched
    );
    println!("{:<36} {:>10.1}x", "batching speed-up", unbatched / batched);
    Ok(())
}

fn random(n: usize, seed: u32) -> Vec<f32> {
    // A small LCG is enough for benchmark data.
    let mut state = seed.wrapping_mul(747796405).wrapping_add(2891336453);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// Runs `f` until at least `min_time` has passed (after one warm-up call) and
/// returns seconds per call.
fn time_per_call(
    min_time: Duration,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?;
    let start = Instant::now();
    let mut calls = 0u32;
    while calls == 0 || start.elapsed() < min_time {
        f()?;
        calls += 1;
    }
    Ok(start.elapsed().as_secs_f64() / f64::from(calls))
}

fn matmul_gflops(device: &Device, tiling: MatmulTiling, n: usize) -> anyhow::Result<f64> {
    let a = device.upload(&random(n * n, 1))?;
    let b = device.upload(&random(n * n, 2))?;
    let spec = Matmul::new(n, n, n);
    // Several products per submit so the figure is kernel time, not submit time.
    let reps = (2048 / n).max(1);
    let seconds = time_per_call(Duration::from_secs(2), || {
        let outs: Vec<GpuBuffer> = (0..reps)
            .map(|_| device.matmul_with(&a, &b, &spec, tiling))
            .collect::<Result<_, _>>()?;
        device.synchronize()?;
        drop(outs);
        Ok(())
    })?;
    Ok(spec.flops() * reps as f64 / seconds / 1e9)
}

fn dispatch_overhead(device: &Device) -> anyhow::Result<(f64, f64)> {
    let x = device.upload(&random(1024, 3))?;
    let count = 1000;
    let batched = time_per_call(Duration::from_secs(1), || {
        let mut y = device.unary(UnaryOp::Neg, &x)?;
        for _ in 1..count {
            y = device.unary(UnaryOp::Neg, &y)?;
        }
        device.synchronize()?;
        Ok(())
    })? / f64::from(count);
    let unbatched = time_per_call(Duration::from_secs(1), || {
        let mut y = device.unary(UnaryOp::Neg, &x)?;
        device.synchronize()?;
        for _ in 1..100 {
            y = device.unary(UnaryOp::Neg, &y)?;
            device.synchronize()?;
        }
        Ok(())
    })? / 100.0;
    Ok((batched * 1e6, unbatched * 1e6))
}

/// numpy's float32 matmul throughput for each size, measured now on this machine.
fn numpy_sgemm_gflops(sizes: &[usize]) -> Result<Vec<f64>, String> {
    let script = r#"
import sys, time
import numpy as np
for n in map(int, sys.argv[1:]):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    reps, start = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - start < 1.0:
        a @ b
        reps += 1
    print(2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
"#;
    let args: Vec<String> = sizes.iter().map(|n| n.to_string()).collect();
    support::numbers(support::run_python("numpy", script, &args)?)
}
