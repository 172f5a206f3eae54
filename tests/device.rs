//! Buffer pool reuse, command batching and the ordering rules they rely on.

mod common;

use common::{device, random_vec};
use kiln::device::{
    Device, GpuBuffer, Matmul, MatmulTiling, Operand, Reduce, ReduceOp, Tuning, UnaryOp,
};

/// One "training-like" step: upload a batch, two layers, a reduction, a readback.
fn step(d: &Device, w: &kiln::device::GpuBuffer, seed: u64) -> f32 {
    let x = d.upload(&random_vec(32 * 64, seed, -1.0, 1.0)).unwrap();
    let h = d.matmul(&x, w, &Matmul::new(32, 64, 64)).unwrap();
    let a = d.unary(UnaryOp::Relu, &h).unwrap();
    let (b, _) = d
        .binary(
            kiln::device::BinaryOp::Mul,
            Operand::new(&a, &[32, 64]),
            Operand::new(&x, &[32, 64]),
        )
        .unwrap();
    let s = d
        .reduce(&b, &Reduce::axis(ReduceOp::Sum, &[32 * 64], 0).unwrap())
        .unwrap();
    d.read::<f32>(&s).unwrap()[0]
}

#[test]
fn identical_steps_allocate_no_new_buffers_after_the_first() {
    // A private device so other tests' allocations do not mix into the counts.
    let d = Device::new().unwrap();
    let w = d.upload(&random_vec(64 * 64, 1, -0.1, 0.1)).unwrap();
    step(&d, &w, 0);
    let after_first = d.pool_stats();
    for i in 1..=20 {
        step(&d, &w, i);
    }
    let after = d.pool_stats();
    assert_eq!(
        after.allocations, after_first.allocations,
        "steps 2..21 created buffers: {after_first:?} -> {after:?}"
    );
    // Five buffers per step (batch, matmul, relu, product, sum), all reused.
    assert_eq!(after.reuses, after_first.reuses + 20 * 5, "{after:?}");
    assert_eq!(after.live_bytes, after_first.live_bytes);
}

#[test]
fn dispatches_are_batched_into_one_submit_per_sync() {
    let d = Device::new().unwrap();
    let x = d.upload(&random_vec(1000, 2, -1.0, 1.0)).unwrap();
    let before = d.dispatch_stats();
    let mut y = d.unary(UnaryOp::Tanh, &x).unwrap();
    for _ in 0..49 {
        y = d.unary(UnaryOp::MulScalar(1.01), &y).unwrap();
    }
    let _ = d.read::<f32>(&y).unwrap();
    let after = d.dispatch_stats();
    assert_eq!(after.dispatches - before.dispatches, 50);
    assert_eq!(after.submits - before.submits, 1);
}

#[test]
fn an_upload_never_lands_in_a_buffer_that_pending_work_still_reads() {
    let d = device();
    for n in [1usize, 100, 5000] {
        let first = random_vec(n, 3, -1.0, 1.0);
        let second = random_vec(n, 4, -1.0, 1.0);
        let a = d.upload(&first).unwrap();
        let negated = d.unary(UnaryOp::Neg, &a).unwrap();
        drop(a); // still read by the recorded, unsubmitted negation
        let b = d.upload(&second).unwrap(); // same size bucket
        let got = d.read::<f32>(&negated).unwrap();
        let want: Vec<f32> = first.iter().map(|v| -v).collect();
        assert_eq!(got, want, "n = {n}");
        assert_eq!(d.read::<f32>(&b).unwrap(), second);
    }
}

#[test]
fn kernel_outputs_may_reuse_buffers_released_mid_batch() {
    let d = device();
    let x = random_vec(4096, 5, -2.0, 2.0);
    let gx = d.upload(&x).unwrap();
    let t = d.unary(UnaryOp::Exp, &gx).unwrap();
    let u = d.unary(UnaryOp::Neg, &t).unwrap();
    drop(t); // u's computation is recorded; t's buffer may now serve a new output
    let v = d.unary(UnaryOp::Square, &gx).unwrap();
    let got_u = d.read::<f32>(&u).unwrap();
    let got_v = d.read::<f32>(&v).unwrap();
    for i in 0..x.len() {
        let want_u = -f64::from(x[i]).exp();
        assert!(
            (f64::from(got_u[i]) - want_u).abs() <= 1e-6 * want_u.abs(),
            "u[{i}]"
        );
        assert_eq!(got_v[i], x[i] * x[i], "v[{i}]");
    }
}

#[test]
fn pool_capacity_bounds_idle_memory() {
    let d = Device::new().unwrap();
    d.set_pool_capacity(1 << 20);
    let buffers: Vec<_> = (0..8)
        .map(|_| d.upload(&vec![1.0f32; 128 * 1024]).unwrap())
        .collect();
    d.synchronize().unwrap();
    drop(buffers); // 8 x 512 KiB released, but only 1 MiB may stay idle
    assert!(
        d.pool_stats().cached_bytes <= 1 << 20,
        "{:?}",
        d.pool_stats()
    );
    d.trim_pool();
    assert_eq!(d.pool_stats().cached_bytes, 0);

    // With no room in the pool, a buffer released while recorded work still reads
    // it is let go, not destroyed: that work must still see its data.
    d.set_pool_capacity(0);
    let x = random_vec(3000, 6, -1.0, 1.0);
    let a = d.upload(&x).unwrap();
    let negated = d.unary(UnaryOp::Neg, &a).unwrap();
    drop(a);
    let want: Vec<f32> = x.iter().map(|v| -v).collect();
    assert_eq!(d.read::<f32>(&negated).unwrap(), want);
}

#[test]
fn autotune_measures_every_candidate_once_then_reads_its_cache() {
    use kiln::device::Tuning;
    let d = device();
    let file = std::env::temp_dir().join(format!("kiln-tune-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let before = d.tuning();
    let candidates = Tuning::candidates(d.adapter_info(), d.features(), d.limits());
    let first = d.autotune(&file).unwrap();
    assert_eq!(first.measured.len(), candidates.len());
    assert!(first.measured.iter().all(|(_, s)| *s > 0.0));
    assert!(candidates.contains(&first.chosen));
    assert_eq!(d.tuning().matmul, first.chosen);
    let second = d.autotune(&file).unwrap();
    assert!(
        second.measured.is_empty(),
        "the cache file is read, not re-measured"
    );
    assert_eq!(second.chosen, first.chosen);
    // A file naming a tiling this adapter cannot run is measured over.
    std::fs::write(&file, "matmul = shared:9x9x9:1x1\n").unwrap();
    assert_eq!(d.autotune(&file).unwrap().measured.len(), candidates.len());
    d.set_tuning(before);
    std::fs::remove_file(&file).unwrap();
}

/// Whether `Device::together` fuses in this run (`KILN_FUSION=0` turns it off).
fn fusion_on() -> bool {
    std::env::var("KILN_FUSION").map_or(true, |v| v != "0")
}

/// Runs `launch` alone, then again inside `Device::together`; returns both
/// runs' outputs read back and the dispatches the second took.
fn alone_then_together(
    d: &Device,
    launch: impl Fn() -> kiln::device::Result<[GpuBuffer; 3]>,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, u64) {
    let read = |outs: [GpuBuffer; 3]| -> Vec<Vec<f32>> {
        outs.iter().map(|b| d.read::<f32>(b).unwrap()).collect()
    };
    let alone = read(launch().unwrap());
    let before = d.dispatch_stats().dispatches;
    let outs = d.together(&launch).unwrap();
    let dispatches = d.dispatch_stats().dispatches - before;
    (alone, read(outs), dispatches)
}

#[test]
fn independent_kernels_launched_together_run_as_one_dispatch_with_the_same_results() {
    let d = Device::new().unwrap();
    // A layer's backward pass: weight gradient A^T G and input gradient G W^T,
    // plus G^T G, all reading G.
    let (m, k, n) = (37, 45, 10);
    let a = d.upload(&random_vec(m * k, 1, -1.0, 1.0)).unwrap();
    let w = d.upload(&random_vec(k * n, 2, -1.0, 1.0)).unwrap();
    let g = d.upload(&random_vec(m * n, 3, -1.0, 1.0)).unwrap();
    // Every tiling the tuner may pick here, and the GPUs' shared-memory ones.
    let mut tilings = Tuning::candidates(d.adapter_info(), d.features(), d.limits());
    tilings.extend([Tuning::GPU.matmul, "shared:32x32x8:2x2".parse().unwrap()]);
    tilings.retain(|t| {
        t.validate(d.limits(), d.features(), d.adapter_info())
            .is_ok()
    });
    for tiling in tilings {
        let (want, got, dispatches) = alone_then_together(&d, || {
            Ok([
                d.matmul_with(&a, &g, &Matmul::new(k, n, m).transpose_a(true), tiling)?,
                d.matmul_with(&g, &w, &Matmul::new(m, k, n).transpose_b(true), tiling)?,
                d.matmul_with(&g, &g, &Matmul::new(n, n, m).transpose_a(true), tiling)?,
            ])
        });
        // Shared-memory tilings fuse while the three parts' tiles fit in
        // the adapter's workgroup memory side by side.
        let fusable = match tiling {
            MatmulTiling::Shared { bm, bn, bk, .. } => {
                3 * 4 * bk * (bm + bn) <= d.limits().max_compute_workgroup_storage_size
            }
            _ => true,
        };
        let fused = fusion_on() && fusable;
        assert_eq!(dispatches, if fused { 1 } else { 3 }, "{tiling}");
        // Each part runs the same code on the same data: bit for bit equal.
        assert_eq!(got, want, "{tiling}");
    }
}

#[test]
fn kernels_that_depend_on_each_other_are_not_fused() {
    let d = Device::new().unwrap();
    let x = d.upload(&random_vec(300, 4, -1.0, 1.0)).unwrap();
    let w = d.upload(&random_vec(300 * 8, 5, -1.0, 1.0)).unwrap();
    let (want, got, dispatches) = alone_then_together(&d, || {
        // Second reads the first's output; third is independent of the second
        // and joins it.
        let h = d.matmul(&x, &w, &Matmul::new(1, 8, 300))?;
        let y = d.matmul(&h, &h, &Matmul::new(8, 8, 1).transpose_a(true))?;
        let z = d.matmul(&x, &w, &Matmul::new(2, 8, 150))?;
        Ok([h, y, z])
    });
    assert_eq!(dispatches, if fusion_on() { 2 } else { 3 });
    assert_eq!(got, want);
    // Nothing is held back once `together` returns, even on error.
    let before = d.dispatch_stats();
    let err = d.together(|| -> kiln::device::Result<()> {
        d.unary(UnaryOp::Tanh, &x)?;
        d.matmul(&x, &w, &Matmul::new(2, 8, 300)).map(|_| ())
    });
    assert!(err.is_err());
    assert_eq!(d.dispatch_stats().dispatches - before.dispatches, 1);
}
