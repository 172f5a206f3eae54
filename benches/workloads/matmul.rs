//! Matmul throughput (square N from 256 to 4096, f32; f16 operands at 1024
//! and 4096, and multiplied in f16 where the adapter can; a MiniLM layer's
//! weight gradient `X^T G` over the training bench's 1024 tokens) against
//! numpy's sgemm (OpenBLAS), or cuBLAS through PyTorch with
//! `KILN_BENCH_REFERENCE=cuda`, in the same run, and the cost of one dispatch
//! with and without batching. `KILN_BENCH_SWEEP=1` adds rows for every other
//! tiling the autotuner could pick, at N = 4096 on GPUs and 1024 elsewhere;
//! `KILN_BENCH_SWEEP=TILING,TILING,...` for those tilings instead (block
//! shapes the tuner does not offer, tried without a rebuild), each timed only
//! once its product matches the tuner's pick.

use super::random;
use crate::support::{self, Row};
use kiln::device::{DType, Device, GpuBuffer, Matmul, MatmulTiling, Tuning, UnaryOp};
use std::time::{Duration, Instant};

const SIZES: [usize; 5] = [256, 512, 1024, 2048, 4096];

pub fn run(device: &Device) -> anyhow::Result<Vec<Row>> {
    // Read first, so that a misspelt list fails before minutes of products.
    let sweep = sweep_tilings(device)?;
    // cuBLAS through PyTorch (TF32 off) on a GPU machine, numpy's OpenBLAS
    // elsewhere.
    let (mut reference, reference_name) = match support::cuda_reference() {
        true => (
            support::Reference::start("torch", TORCH_SGEMM),
            "cublas sgemm",
        ),
        false => (
            support::Reference::start("numpy", NUMPY_SGEMM),
            "numpy sgemm",
        ),
    };
    let tiling = device.tuning().matmul;
    let mut rows = Vec::new();
    // One figure per size, each Kiln window followed by the reference's at the
    // same size.
    // `tiling: None` runs the product as `Device::matmul` would (the tiling
    // for its size, k split where that pays).
    let mut measure = |name: String, tiling: Option<MatmulTiling>, spec: Matmul, dtype: DType| {
        let request = format!(
            "{},{},{},{}",
            spec.m,
            spec.n,
            spec.k,
            u8::from(spec.trans_a)
        );
        let ((gflops, ()), figure) = support::alternate(
            WINDOWS,
            || Ok((matmul_gflops(device, tiling, spec, dtype)?, ())),
            &mut reference,
            &request,
        )?;
        rows.push(
            Row::new(name, "GFLOP/s", gflops).against(reference_name, figure.as_ref().copied()),
        );
        anyhow::Ok(())
    };
    let square = |n: usize| Matmul::new(n, n, n);
    // As `Device::matmul` runs them, labelled with the tiling it takes (on
    // GPUs, asking times the candidates on the shape first, where large
    // products are tuned by shape, so that no window holds the tuning).
    for n in SIZES {
        let used = device.matmul_tiling(&square(n));
        measure(
            format!("matmul f32 N={n} ({used})"),
            None,
            square(n),
            DType::F32,
        )?;
    }
    // Few outputs, long k: on a GPU its output blocks under large tiles would
    // leave most of the device idle, so it takes the small products' tiling
    // and k is split.
    let (hidden, tokens) = (384, 1024);
    measure(
        format!("matmul f32 A^T B {hidden}x{hidden}x{tokens} (Device::matmul)"),
        None,
        Matmul::new(hidden, hidden, tokens).transpose_a(true),
        DType::F32,
    )?;
    // f16 storage, f32 arithmetic: what mixed precision's products run.
    for n in [1024, 4096] {
        let used = device.matmul_tiling(&square(n));
        measure(
            format!("matmul f16 operands N={n} ({used})"),
            None,
            square(n),
            DType::F16,
        )?;
    }
    // f16 arithmetic too (`set_half_arithmetic`) where the adapter has it: at
    // 4096 on GPUs, beside the row above; at 1024 on CPU adapters, where
    // subgroup tilings hand it to register tiles and 4096 would take minutes.
    // Labelled without a tiling, since it may not run the one asked for.
    if device.set_half_arithmetic(true).is_ok() {
        let n = if support::cuda_reference() {
            4096
        } else {
            1024
        };
        let measured = measure(
            format!("matmul f16 arithmetic N={n}"),
            Some(tiling),
            square(n),
            DType::F16,
        );
        device.set_half_arithmetic(false)?;
        measured?;
    }
    // Every other tiling the autotuner could pick (or those named), at
    // N=4096 on GPUs and 1024 on CPU adapters (4096 would take minutes
    // there), one window each: how close the candidates the tuner passed
    // over come. A tiling that cannot run here is reported and skipped.
    if let Some(sweep) = sweep {
        let n = if support::cuda_reference() {
            4096
        } else {
            1024
        };
        let pick = device.matmul_tiling(&square(n));
        let check = SweepCheck::new(device, pick, square(n))?;
        for t in sweep.into_iter().filter(|&t| t != pick) {
            let timed = check
                .agrees(t)
                .and_then(|()| matmul_gflops(device, Some(t), square(n), DType::F32));
            match timed {
                Ok(gflops) => rows.push(Row::new(
                    format!("matmul f32 N={n} ({t})"),
                    "GFLOP/s",
                    gflops,
                )),
                Err(e) => eprintln!("sweep: {t} skipped: {e:#}"),
            }
        }
    }
    Ok(rows)
}

/// The tilings `KILN_BENCH_SWEEP` asks for: `None` when unset or `0`, the
/// autotuner's candidates for `1`, else the comma-separated list it holds.
fn sweep_tilings(device: &Device) -> anyhow::Result<Option<Vec<MatmulTiling>>> {
    let setting = std::env::var("KILN_BENCH_SWEEP").unwrap_or_default();
    Ok(match setting.trim() {
        "" | "0" => None,
        "1" => Some(Tuning::candidates(
            device.adapter_info(),
            device.features(),
            device.limits(),
        )),
        list => Some(
            list.split(',')
                .map(|t| t.trim().parse::<MatmulTiling>())
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("KILN_BENCH_SWEEP: {e}"))?,
        ),
    })
}

/// A sweep's guard against timing a wrong kernel: the sweep may name
/// tilings no kernel test ran, so each one's product must match the product
/// of the tuner's pick (which the tests cover) before it is timed.
struct SweepCheck<'d> {
    device: &'d Device,
    a: GpuBuffer,
    b: GpuBuffer,
    spec: Matmul,
    expected: Vec<f32>,
    /// The largest expected magnitude: errors are measured against it.
    scale: f32,
}

impl<'d> SweepCheck<'d> {
    fn new(device: &'d Device, tiling: MatmulTiling, spec: Matmul) -> anyhow::Result<Self> {
        let a = device.upload(&random(spec.m * spec.k, 7))?;
        let b = device.upload(&random(spec.k * spec.n, 8))?;
        let expected = device.read::<f32>(&device.matmul_with(&a, &b, &spec, tiling)?)?;
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        Ok(Self {
            device,
            a,
            b,
            spec,
            expected,
            scale,
        })
    }

    /// Fails unless `tiling` gives the expected product to within 1e-4 of
    /// its largest element (f32 sums in another order differ by about 1e-6
    /// there; a wrong kernel by the whole scale).
    fn agrees(&self, tiling: MatmulTiling) -> anyhow::Result<()> {
        let got = self.device.read::<f32>(
            &self
                .device
                .matmul_with(&self.a, &self.b, &self.spec, tiling)?,
        )?;
        // A NaN counts as the worst error (`f32::max` would pass over it).
        let worst = got
            .iter()
            .zip(&self.expected)
            .map(|(g, e)| (g - e).abs())
            .fold(
                0f32,
                |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
            );
        if worst > 1e-4 * self.scale {
            anyhow::bail!(
                "its product is wrong: off by up to {worst:e} where elements reach {:e}",
                self.scale
            );
        }
        Ok(())
    }
}

/// Alternating windows per figure (each at least two seconds of Kiln's), the
/// best of each side counting: three rather than two, because this VM's
/// stalls of a second or more have cost single figures a fifth.
const WINDOWS: usize = 3;

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

fn matmul_gflops(
    device: &Device,
    tiling: Option<MatmulTiling>,
    spec: Matmul,
    dtype: DType,
) -> anyhow::Result<f64> {
    let upload = |len: usize, seed: u32| device.cast(&device.upload(&random(len, seed))?, dtype);
    let a = upload(spec.m * spec.k, 1)?;
    let b = upload(spec.k * spec.n, 2)?;
    // Several products per submit so the figure is kernel time, not submit
    // time: as many as a square 2048 product's work takes, and on GPUs at
    // least ten, as the CUDA reference runs between synchronizations. With
    // fewer the device idles through each submit and wait (78 us on the
    // H200): 2% of one product at N=4096, about a third of two at 1024.
    let side = (spec.multiply_adds() as f64).cbrt() as usize;
    let least = if device.is_cpu() { 1 } else { 10 };
    let reps = (2048 / side.max(1)).max(least);
    let seconds = time_per_call(Duration::from_secs(2), || {
        let outs: Vec<GpuBuffer> = (0..reps)
            .map(|_| match tiling {
                Some(tiling) => device.matmul_with(&a, &b, &spec, tiling),
                None => device.matmul(&a, &b, &spec),
            })
            .collect::<Result<_, _>>()?;
        device.synchronize()?;
        drop(outs);
        Ok(())
    })?;
    Ok(spec.flops() * reps as f64 / seconds / 1e9)
}

/// Microseconds per dispatch of a 1024-element op: recorded 1000 to a submit,
/// and submitted and waited for one at a time.
pub fn dispatch(device: &Device) -> anyhow::Result<Vec<Row>> {
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
    Ok(vec![
        Row::new("dispatch, batched (1000 per submit)", "us", batched * 1e6),
        Row::new("dispatch, unbatched (submit + wait)", "us", unbatched * 1e6),
    ])
}

/// numpy's float32 matmul throughput for the request "m,n,k,transpose_a"
/// (A stored [k, m] when transposed), over a second.
const NUMPY_SGEMM: &str = r#"
import time
import numpy as np
def measure(request):
    m, n, k, trans_a = (int(v) for v in request.split(","))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    product = (lambda: a.T @ b) if trans_a else (lambda: a @ b)
    product()
    reps, start = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - start < 1.0:
        product()
        reps += 1
    return 2 * m * n * k * reps / (time.perf_counter() - start) / 1e9
"#;

/// cuBLAS's float32 matmul throughput through PyTorch on the GPU (TF32 off,
/// see the prelude) for the same requests, over a second.
const TORCH_SGEMM: &str = r#"
import time
def measure(request):
    m, n, k, trans_a = (int(v) for v in request.split(","))
    a = torch.randn((k, m) if trans_a else (m, k), device=DEV)
    b = torch.randn(k, n, device=DEV)
    product = (lambda: a.t() @ b) if trans_a else (lambda: a @ b)
    product()
    sync()
    reps, start = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - start < 1.0:
        for _ in range(10):
            product()
        sync()
        reps += 10
    return 2 * m * n * k * reps / (time.perf_counter() - start) / 1e9
"#;
