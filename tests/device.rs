//! Buffer pool reuse, command batching and the ordering rules they rely on.

mod common;

use common::{device, random_vec};
use kiln::device::{
    Device, DeviceError, Elementwise, GpuBuffer, Matmul, MatmulTiling, Operand, Reduce, ReduceOp,
    Tuning, UnaryOp,
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
fn an_index_picks_among_the_adapters_a_selector_accepts() {
    // Index 0 is the adapter the kind alone picks; an index past the last
    // is refused, saying how many there are.
    let open = |s: &str| Device::with_selector(&s.parse().unwrap());
    let (plain, first) = (open("cpu").unwrap(), open("cpu:0").unwrap());
    let name = |d: &Device| {
        let info = d.adapter_info();
        (info.name.clone(), info.backend)
    };
    assert_eq!(name(&first), name(&plain));
    let err = open("cpu:99").unwrap_err().to_string();
    assert!(
        err.contains("asks for adapter 99 (counting from 0)") && err.contains("kiln info --all"),
        "{err}"
    );
}

#[test]
fn each_listed_selector_opens_the_adapter_it_is_listed_with() {
    // `kiln info --all` prints these; KILN_DEVICE set to one must open that
    // adapter, whichever backends are present.
    let listed = kiln::device::list_adapters();
    let usable: Vec<_> = listed
        .iter()
        .filter_map(|a| Some((a.selector.as_ref()?, &a.info)))
        .collect();
    assert!(!usable.is_empty(), "no usable adapter listed: {listed:?}");
    for (selector, info) in usable {
        let opens = selector.resolve().unwrap();
        assert_eq!(
            (&opens.name, opens.backend),
            (&info.name, info.backend),
            "KILN_DEVICE={selector}"
        );
    }
    assert!(listed
        .iter()
        .all(|a| a.unusable.is_some() != a.selector.is_some()));
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
fn a_repeating_step_gets_the_same_buffers_and_builds_its_bind_groups_once() {
    // Six same-sized intermediates dropped in a different order every step
    // (as a step's gradients held in a hash map are): the pool must still
    // hand each kernel the same buffers, so no step after the first builds
    // a bind group. Own device: the counts are per device.
    let d = Device::new().unwrap();
    let x = d.upload(&random_vec(4096, 9, -1.0, 1.0)).unwrap();
    let run = |order: &[usize]| -> u64 {
        let before = d.dispatch_stats().bind_groups;
        let mut chain: Vec<GpuBuffer> = Vec::new();
        for i in 0..6 {
            let input = chain.last().unwrap_or(&x);
            let next = d.unary(UnaryOp::MulScalar(1.0 + i as f32), input).unwrap();
            chain.push(next);
        }
        let mut slots: Vec<Option<GpuBuffer>> = chain.into_iter().map(Some).collect();
        for &i in order {
            drop(slots[i].take());
        }
        d.synchronize().unwrap();
        d.dispatch_stats().bind_groups - before
    };
    assert!(run(&[0, 1, 2, 3, 4, 5]) > 0, "the first step builds them");
    let orders = [
        [5, 3, 1, 0, 2, 4],
        [2, 4, 0, 5, 1, 3],
        [1, 0, 3, 2, 5, 4],
        [4, 5, 2, 3, 0, 1],
        [3, 1, 5, 4, 2, 0],
        [0, 2, 4, 1, 3, 5],
    ];
    for order in orders {
        assert_eq!(run(&order), 0, "release order {order:?}");
    }
}

#[test]
fn an_output_avoids_buffers_that_launches_held_for_fusion_still_read() {
    // Inside `together`, `first` reads `p`, then `p` and an unrelated
    // buffer are dropped (both retired). The next launch's output must take
    // the unrelated one even though `p`'s is older: writing `p`'s buffer
    // would make it depend on `first` and split the fused dispatch.
    let d = Device::new().unwrap();
    let n = 2048;
    let p = d.upload(&random_vec(n, 10, -1.0, 1.0)).unwrap();
    let spare = d.upload(&random_vec(n, 11, -1.0, 1.0)).unwrap();
    let x = d.upload(&random_vec(n, 12, -1.0, 1.0)).unwrap();
    d.synchronize().unwrap();
    let before = d.dispatch_stats().dispatches;
    let (first, second) = d
        .together(|| -> kiln::device::Result<_> {
            let first = d.unary(UnaryOp::Neg, &p)?;
            drop(p);
            drop(spare);
            let second = d.unary(UnaryOp::Neg, &x)?;
            Ok((first, second))
        })
        .unwrap();
    let got = d.read::<f32>(&first).unwrap();
    let dispatches = d.dispatch_stats().dispatches - before;
    assert_eq!(dispatches, if fusion_on() { 1 } else { 2 });
    assert_eq!(got, negated(n, 10));
    assert_eq!(d.read::<f32>(&second).unwrap(), negated(n, 12));
}

#[test]
fn a_submit_forced_while_held_launches_are_recorded_keeps_their_inputs_from_uploads() {
    // Dispatch parameters go to a fixed arena; once it is full, the next
    // dispatch submits what is recorded first. If that happens while
    // `together` records its held launches, a buffer one of them still reads
    // (dropped inside the block, so retired) must not be freed by that
    // submit: an upload taking it would write it before the launch runs.
    let d = Device::new().unwrap();
    let small = d.upload(&random_vec(64, 20, -1.0, 1.0)).unwrap();
    let filler = || drop(d.unary(UnaryOp::Neg, &small).unwrap());
    // How many dispatches fill the arena: the count before one submits.
    d.synchronize().unwrap();
    let submits = d.dispatch_stats().submits;
    let mut per_arena = 0;
    while d.dispatch_stats().submits == submits {
        filler();
        per_arena += 1;
    }
    let per_arena = per_arena - 1;
    // Fill it exactly, then hold a launch reading a buffer dropped at once.
    d.synchronize().unwrap();
    for _ in 0..per_arena {
        filler();
    }
    let before = d.dispatch_stats().submits;
    let n = 3001;
    let p_values = random_vec(n, 21, -1.0, 1.0);
    let y = d
        .together(|| -> kiln::device::Result<_> {
            let p = d.upload(&p_values)?;
            let y = d.unary(UnaryOp::Neg, &p)?;
            drop(p);
            Ok(y)
        })
        .unwrap();
    assert_eq!(
        d.dispatch_stats().submits,
        before + 1,
        "recording the held launch should have submitted the full arena first"
    );
    // An upload of the same size, before y's dispatch is submitted.
    let q = d.upload(&random_vec(n, 22, -1.0, 1.0)).unwrap();
    let want: Vec<f32> = p_values.iter().map(|v| -v).collect();
    let got = d.read::<f32>(&y).unwrap();
    assert!(
        got == want,
        "the held launch read the later upload: starts {:?}, want {:?}",
        &got[..3],
        &want[..3]
    );
    drop(q);
}

#[test]
fn a_together_block_that_panics_still_ends_and_later_blocks_fuse_again() {
    let d = Device::new().unwrap();
    let x = d.upload(&random_vec(1024, 30, -1.0, 1.0)).unwrap();
    let y = d.upload(&random_vec(1024, 31, -1.0, 1.0)).unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        d.together(|| -> kiln::device::Result<()> {
            let _ = d.unary(UnaryOp::Neg, &x)?;
            panic!("a bug in the block");
        })
    }));
    assert!(panicked.is_err());
    d.synchronize().unwrap();
    // On another thread: a block left open would keep every other thread's
    // blocks from gathering.
    let before = d.dispatch_stats().dispatches;
    let (nx, ny) = std::thread::scope(|s| {
        s.spawn(|| {
            d.together(|| -> kiln::device::Result<_> {
                Ok((d.unary(UnaryOp::Neg, &x)?, d.unary(UnaryOp::Neg, &y)?))
            })
            .unwrap()
        })
        .join()
        .unwrap()
    });
    assert_eq!(d.read::<f32>(&nx).unwrap(), negated(1024, 30));
    assert_eq!(d.read::<f32>(&ny).unwrap(), negated(1024, 31));
    let dispatches = d.dispatch_stats().dispatches - before;
    assert_eq!(dispatches, if fusion_on() { 1 } else { 2 });
}

/// `-x` for the values `random_vec(n, seed, -1.0, 1.0)` uploaded.
fn negated(n: usize, seed: u64) -> Vec<f32> {
    random_vec(n, seed, -1.0, 1.0).iter().map(|v| -v).collect()
}

#[test]
fn an_inner_together_block_leaves_the_outer_block_gathering() {
    // Backward passes open blocks of their own inside a training step's
    // block; ending the outer block there split every step into more
    // dispatches.
    let d = Device::new().unwrap();
    let n = 1024;
    let x = d.upload(&random_vec(n, 40, -1.0, 1.0)).unwrap();
    let y = d.upload(&random_vec(n, 41, -1.0, 1.0)).unwrap();
    let z = d.upload(&random_vec(n, 42, -1.0, 1.0)).unwrap();
    d.synchronize().unwrap();
    let before = d.dispatch_stats().dispatches;
    let (nx, ny, nz) = d
        .together(|| -> kiln::device::Result<_> {
            let nx = d.unary(UnaryOp::Neg, &x)?;
            let ny = d.together(|| d.unary(UnaryOp::Neg, &y))?;
            let nz = d.unary(UnaryOp::Neg, &z)?;
            Ok((nx, ny, nz))
        })
        .unwrap();
    assert_eq!(d.read::<f32>(&nx).unwrap(), negated(n, 40));
    assert_eq!(d.read::<f32>(&ny).unwrap(), negated(n, 41));
    assert_eq!(d.read::<f32>(&nz).unwrap(), negated(n, 42));
    let dispatches = d.dispatch_stats().dispatches - before;
    assert_eq!(dispatches, if fusion_on() { 1 } else { 3 });
}

#[test]
fn outermost_together_blocks_submit_when_asked() {
    let d = Device::new().unwrap();
    let x = d.upload(&random_vec(256, 45, -1.0, 1.0)).unwrap();
    d.synchronize().unwrap();
    let submits_of_a_block = |d: &Device| {
        let before = d.dispatch_stats().submits;
        let y = d
            .together(|| {
                let inner = d.together(|| d.unary(UnaryOp::Neg, &x))?;
                d.unary(UnaryOp::Neg, &inner)
            })
            .unwrap();
        let submits = d.dispatch_stats().submits - before;
        assert_eq!(d.read::<f32>(&y).unwrap(), random_vec(256, 45, -1.0, 1.0));
        submits
    };
    // GPUs submit each block by default, CPU adapters gather blocks, unless
    // a setting decides.
    assert_eq!(
        d.submit_blocks(),
        common::setting_or("KILN_SUBMIT_BLOCKS", !d.is_cpu())
    );
    d.set_submit_blocks(false);
    assert_eq!(submits_of_a_block(&d), 0);
    d.set_submit_blocks(true);
    // One submit, at the end of the outer block only; none without fusion,
    // which opens no blocks.
    assert_eq!(submits_of_a_block(&d), if fusion_on() { 1 } else { 0 });
    d.set_submit_blocks(false);
    assert_eq!(submits_of_a_block(&d), 0);
}

#[test]
fn a_together_block_on_one_thread_leaves_another_threads_block_gathering() {
    // Thread A opens a block and launches; thread B then runs a block of its
    // own, whose launch records A's held one first (dispatches keep the order
    // they were made in). A's block must still be gathering afterwards.
    let d = Device::new().unwrap();
    let n = 1024;
    let inputs: Vec<GpuBuffer> = (50..54)
        .map(|seed| d.upload(&random_vec(n, seed, -1.0, 1.0)).unwrap())
        .collect();
    d.synchronize().unwrap();
    let before = d.dispatch_stats().dispatches;
    let a_launched = std::sync::Barrier::new(2);
    let b_done = std::sync::Barrier::new(2);
    let (a_out, b_out) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            d.together(|| -> kiln::device::Result<_> {
                let first = d.unary(UnaryOp::Neg, &inputs[0])?;
                a_launched.wait();
                b_done.wait();
                let second = d.unary(UnaryOp::Neg, &inputs[1])?;
                Ok([first, second, d.unary(UnaryOp::Neg, &inputs[2])?])
            })
            .unwrap()
        });
        a_launched.wait();
        let b_out = d.together(|| d.unary(UnaryOp::Neg, &inputs[3])).unwrap();
        b_done.wait();
        (a.join().unwrap(), b_out)
    });
    for (out, seed) in a_out.iter().zip(50..) {
        assert_eq!(d.read::<f32>(out).unwrap(), negated(n, seed));
    }
    assert_eq!(d.read::<f32>(&b_out).unwrap(), negated(n, 53));
    // A's first launch, B's, then A's last two fused into one dispatch.
    let dispatches = d.dispatch_stats().dispatches - before;
    assert_eq!(dispatches, if fusion_on() { 3 } else { 4 });
}

#[test]
fn trimming_the_pool_spares_buffers_that_recorded_work_still_reads() {
    // x is dropped after a dispatch that reads it is recorded, not yet
    // submitted: trimming must not destroy its buffer under that dispatch.
    let d = Device::new().unwrap();
    let values = random_vec(4096, 40, -1.0, 1.0);
    let x = d.upload(&values).unwrap();
    d.synchronize().unwrap();
    let y = d.unary(UnaryOp::Neg, &x).unwrap();
    drop(x);
    d.trim_pool();
    let want: Vec<f32> = values.iter().map(|v| -v).collect();
    assert_eq!(d.read::<f32>(&y).unwrap(), want);
    // Idle buffers are gone afterwards; the pool works on.
    d.trim_pool();
    let z = d.upload(&values).unwrap();
    assert_eq!(d.read::<f32>(&z).unwrap(), values);
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
fn profiling_times_each_kernel_by_the_devices_clock_where_it_has_one() {
    let d = Device::new().unwrap();
    let (m, n, k) = (96, 64, 128);
    let a = d.upload(&random_vec(m * k, 5, -1.0, 1.0)).unwrap();
    let b = d.upload(&random_vec(k * n, 6, -1.0, 1.0)).unwrap();
    let spec = Matmul::new(m, n, k);
    let product = d.matmul(&a, &b, &spec).unwrap();
    let expected = d
        .read::<f32>(&d.unary(UnaryOp::Tanh, &product).unwrap())
        .unwrap();
    d.set_profiling(true).unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    for _ in 0..3 {
        let c = d.matmul(&a, &b, &spec).unwrap();
        out.push(d.unary(UnaryOp::Tanh, &c).unwrap());
    }
    let wall = started.elapsed().as_secs_f64();
    let profile = d.profile();
    d.set_profiling(false).unwrap();
    // Timing changes nothing about the results.
    for y in &out {
        assert!(d.read::<f32>(y).unwrap() == expected);
    }
    assert_eq!(profile.len(), 2, "{profile:?}");
    let timestamps = d
        .features()
        .contains(kiln::device::wgpu::Features::TIMESTAMP_QUERY);
    for entry in &profile {
        assert_eq!(entry.calls, 3, "{entry:?}");
        assert_eq!(entry.device_clock, timestamps, "{entry:?}");
        assert!(
            entry.seconds > 0.0 && entry.seconds < wall,
            "{entry:?} in {wall} s"
        );
    }
}

#[test]
fn profiling_while_another_thread_submits_and_reads_raises_no_error() {
    // The autotuner profiles on first use of a product, whatever other
    // threads do: their submits must not copy timestamps into the read-back
    // buffer while the profiling thread has it mapped (a validation error
    // on whichever thread submitted next).
    let d = Device::new().unwrap();
    let x = random_vec(4096, 8, -2.0, 2.0);
    let want: Vec<f32> = x.iter().map(|v| -v).collect();
    let gx = d.upload(&x).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let y = d.unary(UnaryOp::Neg, &gx).unwrap();
                assert_eq!(d.read::<f32>(&y).unwrap(), want);
                reads += 1;
            }
            reads
        });
        let profiled = (|| -> Result<(), DeviceError> {
            for _ in 0..40 {
                d.set_profiling(true)?;
                for _ in 0..10 {
                    let y = d.unary(UnaryOp::Exp, &gx)?;
                    drop(d.unary(UnaryOp::Neg, &y)?);
                }
                d.synchronize()?;
                d.set_profiling(false)?;
            }
            Ok(())
        })();
        // Stopped whatever happened, so that a failure cannot leave the
        // reader running.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads = reader.join();
        profiled.unwrap();
        assert!(reads.unwrap() > 0);
    });
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
    // GPUs also time the candidates on small products; CPU adapters keep
    // one tiling for both.
    assert!(candidates.contains(&first.chosen_small));
    assert_eq!(d.tuning().small_matmul, first.chosen_small);
    match d.is_cpu() {
        true => {
            assert!(first.measured_small.is_empty());
            assert_eq!(first.chosen_small, first.chosen);
        }
        false => assert_eq!(first.measured_small.len(), candidates.len()),
    }
    // On CPU adapters with the texture path each tiling is also timed with
    // large operands through textures, and the fastest of either way wins.
    let has_texture_path = d.kernels_for_cpu()
        && candidates
            .iter()
            .any(|t| t.to_string().starts_with("subgroup"));
    assert_eq!(!first.measured_textures.is_empty(), has_texture_path);
    if has_texture_path {
        assert!(first
            .measured_textures
            .iter()
            .all(|(t, s)| t.to_string().starts_with("subgroup") && *s > 0.0));
        let best = first
            .measured
            .iter()
            .chain(&first.measured_textures)
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        assert_eq!(first.chosen, best.0);
        assert_eq!(
            first.operand_textures,
            first.measured_textures.contains(best)
        );
    }
    assert_eq!(d.tuning().operand_textures, first.operand_textures);
    let second = d.autotune(&file).unwrap();
    assert!(
        second.measured.is_empty(),
        "the cache file is read, not re-measured"
    );
    assert_eq!(second.chosen, first.chosen);
    assert_eq!(second.chosen_small, first.chosen_small);
    assert_eq!(second.operand_textures, first.operand_textures);
    // Both choices are read back from a file, a missing small one is the
    // large one.
    let (large, small) = (candidates[0], candidates[candidates.len() - 1]);
    std::fs::write(&file, format!("matmul = {large}\nsmall_matmul = {small}\n")).unwrap();
    let read = d.autotune(&file).unwrap();
    assert!(read.measured.is_empty());
    assert_eq!((read.chosen, read.chosen_small), (large, small));
    assert_eq!(d.tuning().small_matmul, small);
    std::fs::write(&file, format!("matmul = {small}\n")).unwrap();
    assert_eq!(d.autotune(&file).unwrap().chosen_small, small);
    // A file naming a tiling this adapter cannot run is measured over.
    std::fs::write(&file, "matmul = shared:9x9x9:1x1\n").unwrap();
    assert_eq!(d.autotune(&file).unwrap().measured.len(), candidates.len());
    let bad_small = format!("matmul = {large}\nsmall_matmul = shared:9x9x9:1x1\n");
    std::fs::write(&file, bad_small).unwrap();
    assert_eq!(d.autotune(&file).unwrap().measured.len(), candidates.len());
    d.set_tuning(before);
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn a_cpu_adapters_tuning_is_cached_per_host_cpu() {
    let d = device();
    let file = d.tuning_cache_file();
    let name = file.file_name().unwrap().to_string_lossy();
    // lavapipe's speed is the host's; a GPU's is its own.
    assert_eq!(name.contains("-host"), d.is_cpu(), "{name}");
    assert_eq!(d.tuning_cache_file(), file, "one host keeps one file");
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
        // Shared-memory tilings fuse as many parts as their tiles fit in the
        // adapter's workgroup memory side by side. No product here takes vec4
        // loads (k is 37, 10 or 37), so vec4 tilings run their scalar kernel,
        // single-buffered.
        let per_dispatch = match tiling {
            MatmulTiling::Shared {
                bm, bn, bk, tm, tn, ..
            } => {
                let scalar = MatmulTiling::Shared {
                    bm,
                    bn,
                    bk,
                    tm,
                    tn,
                    vec4: false,
                    pipelined: false,
                };
                d.limits().max_compute_workgroup_storage_size / scalar.shared_memory_bytes()
            }
            _ => 3,
        };
        let expected = match fusion_on() {
            true => 3u64.div_ceil(u64::from(per_dispatch.clamp(1, 3))),
            false => 3,
        };
        assert_eq!(dispatches, expected, "{tiling}");
        // Each part runs the same code on the same data: bit for bit equal.
        assert_eq!(got, want, "{tiling}");
    }
}

#[test]
fn independent_elementwise_and_reduction_kernels_share_dispatches() {
    let d = Device::new().unwrap();
    // Three elementwise kernels of different kinds: plain, reading scalars,
    // and reading a broadcast (strided) operand; odd and vec4 lengths.
    let (rows, cols) = (33, 20);
    let x = d.upload(&random_vec(rows * cols, 11, -1.0, 1.0)).unwrap();
    let bias = d.upload(&random_vec(cols, 12, -1.0, 1.0)).unwrap();
    let odd = d.upload(&random_vec(1001, 13, -1.0, 1.0)).unwrap();
    let scaled = Elementwise::new("scaled", "x0 * s0 + s1").scalars(&[1.5, -0.25]);
    let biased = Elementwise::new("biased", "tanh(x0 + x1)");
    let (want, got, dispatches) = alone_then_together(&d, || {
        Ok([
            d.unary(UnaryOp::Exp, &odd)?,
            d.elementwise(&scaled, &[Operand::new(&x, &[rows, cols])])?
                .0,
            d.elementwise(
                &biased,
                &[
                    Operand::new(&x, &[rows, cols]),
                    Operand::new(&bias, &[cols]),
                ],
            )?
            .0,
        ])
    });
    assert_eq!(dispatches, if fusion_on() { 1 } else { 3 });
    assert_eq!(got, want);
    // Full sums of long and short vectors take different reduction kernels.
    // On CPU adapters the short ones run in workgroups of 8 and cannot share
    // a dispatch with the long ones' workgroups of 256; interleaved, each
    // kind still fuses. Elsewhere both take workgroups of 256 and all fuse.
    let long = d.upload(&random_vec(5000, 14, -1.0, 1.0)).unwrap();
    let short = d.upload(&random_vec(100, 15, -1.0, 1.0)).unwrap();
    let sum = |b: &GpuBuffer| d.reduce(b, &Reduce::axis(ReduceOp::Sum, &[b.len()], 0)?);
    let (want, got, dispatches) = alone_then_together(&d, || {
        let (a, b, c) = (sum(&long)?, sum(&short)?, sum(&long)?);
        let _fourth = sum(&short)?;
        Ok([a, b, c])
    });
    let kinds = if d.kernels_for_cpu() { 2 } else { 1 };
    assert_eq!(dispatches, if fusion_on() { kinds } else { 4 });
    assert_eq!(got, want);
}

#[test]
fn one_threads_together_does_not_hold_another_threads_launches() {
    use std::sync::mpsc::channel;
    let d = Device::new().unwrap();
    let x = d.upload(&random_vec(1000, 16, -1.0, 1.0)).unwrap();
    let (inside, wait_inside) = channel();
    let (done, wait_done) = channel();
    std::thread::scope(|s| {
        let (d, x) = (&d, &x);
        s.spawn(move || {
            d.together(|| -> kiln::device::Result<()> {
                let _held = d.unary(UnaryOp::Exp, x)?;
                inside.send(()).unwrap();
                wait_done.recv().unwrap();
                Ok(())
            })
            .unwrap();
        });
        wait_inside.recv().unwrap();
        // Recorded at once, not held for (and fused into) the other
        // thread's group; what that thread holds is recorded first, so
        // dispatches keep the order they were made in.
        let before = d.dispatch_stats().dispatches;
        let y = d.unary(UnaryOp::Tanh, x);
        let recorded = d.dispatch_stats().dispatches - before;
        done.send(()).unwrap();
        let y = y.unwrap();
        // (Without fusion nothing is held: the other thread's kernel was
        // recorded when it was launched.)
        assert_eq!(recorded, if fusion_on() { 2 } else { 1 });
        let want: Vec<f32> = random_vec(1000, 16, -1.0, 1.0)
            .iter()
            .map(|v| v.tanh())
            .collect();
        let got = d.read::<f32>(&y).unwrap();
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-6));
    });
}

#[test]
fn kernels_that_depend_on_each_other_are_not_fused() {
    let d = Device::new().unwrap();
    let x = d.upload(&random_vec(64 * 300, 4, -1.0, 1.0)).unwrap();
    let w = d.upload(&random_vec(300 * 64, 5, -1.0, 1.0)).unwrap();
    let (want, got, dispatches) = alone_then_together(&d, || {
        // Second reads the first's output; third is independent of the second
        // and joins it. All take several workgroups, so none chain.
        let h = d.matmul(&x, &w, &Matmul::new(64, 64, 300))?;
        let y = d.matmul(&h, &h, &Matmul::new(64, 64, 64).transpose_a(true))?;
        let z = d.matmul(&x, &w, &Matmul::new(128, 64, 150))?;
        Ok([h, y, z])
    });
    assert_eq!(dispatches, if fusion_on() { 2 } else { 3 });
    assert_eq!(got, want);
    // Nothing is held back once `together` returns, even on error.
    let before = d.dispatch_stats();
    let err = d.together(|| -> kiln::device::Result<()> {
        d.unary(UnaryOp::Tanh, &x)?;
        d.matmul(&x, &w, &Matmul::new(1000, 8, 300)).map(|_| ())
    });
    assert!(err.is_err());
    assert_eq!(d.dispatch_stats().dispatches - before.dispatches, 1);
}

/// Test kernels for chains. Each takes `n` elements and a scalar `a`.
const CHAIN_PARAMS: &str =
    "struct Params {\n    n: u32,\n    a: f32,\n    pad0: u32,\n    pad1: u32,\n}\n\
    @group(0) @binding(0) var<uniform> p: Params;\n";

/// A chain test kernel: `body` after `CHAIN_PARAMS`.
fn chain_kernel(
    d: &Device,
    name: &str,
    body: &str,
) -> kiln::device::Result<std::sync::Arc<kiln::device::Kernel>> {
    d.kernel(&format!("test-chain:{name}"), || {
        format!("{CHAIN_PARAMS}{body}")
    })
}

/// The parameter block of `CHAIN_PARAMS`.
fn chain_params(n: usize, a: f32) -> Vec<u8> {
    [n as u32, a.to_bits(), 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// `y = a * x + 1` by however many 32-invocation workgroups it is given.
const AFFINE: &str = "@group(0) @binding(1) var<storage, read> x: array<f32>;\n\
    @group(0) @binding(2) var<storage, read_write> y: array<f32>;\n\
    @compute @workgroup_size(32)\n\
    fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) l: u32,\n\
    \x20       @builtin(num_workgroups) groups: vec3<u32>) {\n\
    \x20   for (var i = wid.x * 32u + l; i < p.n; i += 32u * groups.x) {\n\
    \x20       y[i] = p.a * x[i] + 1.0;\n    }\n}\n";

/// `total[0] = sum(x)` by one workgroup of `threads` (a power of two),
/// through workgroup memory.
fn total_source(threads: u32) -> String {
    format!(
        "@group(0) @binding(1) var<storage, read> x: array<f32>;\n\
        @group(0) @binding(2) var<storage, read_write> total: array<f32>;\n\
        var<workgroup> partial: array<f32, {threads}>;\n\
        @compute @workgroup_size({threads})\n\
        fn main(@builtin(local_invocation_index) l: u32) {{\n\
        \x20   var s = 0.0;\n\
        \x20   for (var i = l; i < p.n; i += {threads}u) {{\n        s += x[i];\n    }}\n\
        \x20   partial[l] = s;\n    workgroupBarrier();\n\
        \x20   for (var half = {}u; half > 0u; half /= 2u) {{\n\
        \x20       if (l < half) {{\n            partial[l] += partial[l + half];\n        }}\n\
        \x20       workgroupBarrier();\n    }}\n\
        \x20   if (l == 0u) {{\n        total[0] = partial[0];\n    }}\n}}\n",
        threads / 2
    )
}

/// `y = x - a * total[0]` by one workgroup of 16.
const SHIFT: &str = "@group(0) @binding(1) var<storage, read> x: array<f32>;\n\
    @group(0) @binding(2) var<storage, read> total: array<f32>;\n\
    @group(0) @binding(3) var<storage, read_write> y: array<f32>;\n\
    @compute @workgroup_size(16)\n\
    fn main(@builtin(local_invocation_index) l: u32) {\n\
    \x20   for (var i = l; i < p.n; i += 16u) {\n        y[i] = x[i] - p.a * total[0];\n    }\n}\n";

/// Runs AFFINE (on `affine_groups` workgroups), then TOTAL of its output and
/// AFFINE of it again (independent of each other), then SHIFT of the second
/// by the total: a chain of three stages when every launch is one workgroup.
fn affine_total_shift(
    d: &Device,
    x: &GpuBuffer,
    affine_groups: u32,
) -> kiln::device::Result<[GpuBuffer; 3]> {
    let (affine, total, shift) = (
        chain_kernel(d, "affine", AFFINE)?,
        chain_kernel(d, "total64", &total_source(64))?,
        chain_kernel(d, "shift", SHIFT)?,
    );
    let n = x.len();
    let params = |a: f32| chain_params(n, a);
    let y = d.empty(n, kiln::device::DType::F32)?;
    let t = d.empty(1, kiln::device::DType::F32)?;
    let z = d.empty(n, kiln::device::DType::F32)?;
    let out = d.empty(n, kiln::device::DType::F32)?;
    d.dispatch(&affine, &params(0.5), &[x, &y], [affine_groups, 1, 1])?;
    d.dispatch(&total, &params(0.0), &[&y, &t], [1, 1, 1])?;
    d.dispatch(&affine, &params(-2.0), &[&y, &z], [1, 1, 1])?;
    d.dispatch(&shift, &params(0.25), &[&z, &t, &out], [1, 1, 1])?;
    Ok([y, t, out])
}

#[test]
fn dependent_one_workgroup_kernels_chain_into_one_dispatch() {
    let d = Device::new().unwrap();
    let data = random_vec(1000, 9, -1.0, 1.0);
    let x = d.upload(&data).unwrap();
    // CPU reference.
    let y: Vec<f32> = data.iter().map(|v| 0.5 * v + 1.0).collect();
    let total: f32 = y.iter().sum();
    let out: Vec<f32> = y.iter().map(|v| (-2.0 * v + 1.0) - 0.25 * total).collect();
    for (affine_groups, chained_dispatches) in [(1, 1), (2, 2)] {
        let (want, got, dispatches) =
            alone_then_together(&d, || affine_total_shift(&d, &x, affine_groups));
        // A launch of several workgroups cannot join a chain: it runs alone
        // and the three launches after it chain.
        assert_eq!(
            dispatches,
            if fusion_on() { chained_dispatches } else { 4 },
            "first launch on {affine_groups} workgroups"
        );
        assert_eq!(got, want, "first launch on {affine_groups} workgroups");
        assert_eq!(got[0], y);
        assert!(
            (got[1][0] - total).abs() <= 1e-4 * total.abs().max(1.0),
            "{} vs {total}",
            got[1][0]
        );
        for (g, w) in got[2].iter().zip(&out) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
        }
    }
}

#[test]
fn a_chain_that_cannot_fuse_still_fuses_its_stages() {
    let d = Device::new().unwrap();
    let data = random_vec(500, 10, -1.0, 1.0);
    let x = d.upload(&data).unwrap();
    let launch = || -> kiln::device::Result<[GpuBuffer; 3]> {
        let affine = chain_kernel(&d, "affine", AFFINE)?;
        // Barriers on 16 invocations cannot sit in a chain of 32.
        let total = chain_kernel(&d, "total16", &total_source(16))?;
        let params = |a: f32| chain_params(data.len(), a);
        let y = d.empty(data.len(), kiln::device::DType::F32)?;
        let z = d.empty(data.len(), kiln::device::DType::F32)?;
        let t = d.empty(1, kiln::device::DType::F32)?;
        d.dispatch(&affine, &params(3.0), &[&x, &y], [1, 1, 1])?;
        d.dispatch(&affine, &params(-1.0), &[&x, &z], [1, 1, 1])?;
        d.dispatch(&total, &params(0.0), &[&y, &t], [1, 1, 1])?;
        Ok([y, z, t])
    };
    let (want, got, dispatches) = alone_then_together(&d, launch);
    // The two independent launches still share a dispatch.
    assert_eq!(dispatches, if fusion_on() { 2 } else { 3 });
    assert_eq!(got, want);
    let total: f32 = data.iter().map(|v| 3.0 * v + 1.0).sum();
    assert!((got[2][0] - total).abs() <= 1e-4 * total.abs().max(1.0));
}

#[test]
fn dispatches_that_do_not_match_their_kernel_are_refused_before_recording() {
    // wgpu would fail the whole submit over them (every thread's work in
    // it); refused here, they cost nothing and later work still runs.
    let d = Device::new().unwrap();
    let affine = chain_kernel(&d, "affine", AFFINE).unwrap();
    let n = 100;
    let x = d.upload(&random_vec(n, 60, -1.0, 1.0)).unwrap();
    let y = d.upload(&vec![0.0f32; n]).unwrap();
    let params = chain_params(n, 2.0);
    let too_many_params = [params.clone(), params.clone()].concat();
    for (buffers, params, why) in [
        (vec![&x], &params[..], "1 buffers given, the kernel binds 2"),
        (vec![&x, &y, &y], &params[..], "3 buffers given"),
        (
            vec![&x, &y],
            &too_many_params[..],
            "32 bytes of parameters for a 16-byte",
        ),
    ] {
        let err = d
            .dispatch(&affine, params, &buffers, [1, 1, 1])
            .unwrap_err();
        assert!(matches!(err, DeviceError::Shape { .. }), "{err}");
        assert!(err.to_string().contains(why), "{err}");
    }
    d.dispatch(&affine, &params, &[&x, &y], [4, 1, 1]).unwrap();
    let want: Vec<f32> = random_vec(n, 60, -1.0, 1.0)
        .iter()
        .map(|v| 2.0 * v + 1.0)
        .collect();
    assert_eq!(d.read::<f32>(&y).unwrap(), want);
}

#[test]
fn a_buffer_copied_over_itself_is_unchanged_and_spoils_no_submit() {
    let d = Device::new().unwrap();
    let x = d.upload(&random_vec(64, 61, -1.0, 1.0)).unwrap();
    d.copy_into(&x, &x).unwrap();
    let neg = d.unary(UnaryOp::Neg, &x).unwrap();
    assert_eq!(d.read::<f32>(&x).unwrap(), random_vec(64, 61, -1.0, 1.0));
    assert_eq!(d.read::<f32>(&neg).unwrap(), negated(64, 61));
}

#[test]
fn oversized_matmul_tiles_are_refused() {
    let d = Device::new().unwrap();
    let validate = |tiling: &str| {
        let tiling: MatmulTiling = tiling.parse().unwrap();
        tiling.validate(d.limits(), d.features(), d.adapter_info())
    };
    let err = validate("register:64x64:4x4").unwrap_err();
    assert!(err.contains("4096 outputs per invocation"), "{err}");
    assert!(validate("register:16x16:4x4").is_ok());
    // A subgroup tiling's lanes each keep tm rows of 4 * sg columns: on an
    // adapter with subgroups of 32, tm = 8 would be 1024 accumulators.
    let mut info = d.adapter_info().clone();
    (info.subgroup_min_size, info.subgroup_max_size) = (32, 32);
    let features = d.features() | kiln::device::wgpu::Features::SUBGROUP;
    let validate_32 = |tiling: &str| {
        let tiling: MatmulTiling = tiling.parse().unwrap();
        tiling.validate(d.limits(), features, &info)
    };
    let err = validate_32("subgroup:8:32:64").unwrap_err();
    assert!(err.contains("1024 outputs per invocation"), "{err}");
    assert!(validate_32("subgroup:2:32:64").is_ok());
    // vec4 shared tiles read four rows, columns and k steps at a time.
    for bad in ["shared:32x32x8:2x4:vec4", "shared:32x32x6:4x4:vec4"] {
        let err = validate(bad).unwrap_err();
        assert!(err.contains("multiples of 4"), "{bad}: {err}");
    }
    assert!(validate("shared:32x32x8:4x4:vec4").is_ok());
    // Double-buffered tiles are vec4 only.
    let err = validate("shared:32x32x8:4x4:pipelined").unwrap_err();
    assert!(err.contains("vec4 only"), "{err}");
}

#[test]
fn a_buffer_dropped_while_its_reader_is_held_keeps_its_contents() {
    let d = Device::new().unwrap();
    let values = random_vec(1000, 18, -1.0, 1.0);
    let other = random_vec(1000, 19, -1.0, 1.0);
    let x = d.upload(&values).unwrap();
    d.synchronize().unwrap(); // nothing recorded: a drop now would free at once
    let (y, _z) = d
        .together(|| -> kiln::device::Result<_> {
            let y = d.unary(UnaryOp::Tanh, &x)?; // held, reads x
            drop(x);
            // An upload of the same size must not land in x before tanh reads it.
            let z = d.upload(&other)?;
            Ok((y, z))
        })
        .unwrap();
    let got = d.read::<f32>(&y).unwrap();
    for (g, v) in got.iter().zip(&values) {
        assert!((g - v.tanh()).abs() < 1e-6, "{g} vs tanh({v})");
    }
}

#[test]
fn products_tuned_by_shape_take_the_fastest_candidate_and_keep_it_in_a_file() {
    use kiln::device::ShapeTuning;
    // A device of its own: the setting changes how its products run.
    let d = Device::new().unwrap();
    let file = std::env::temp_dir().join(format!("kiln-shapes-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let setting = ShapeTuning {
        file: file.clone(),
        min_multiply_adds: 64 * 48 * 40,
        max_multiply_adds: 1 << 20,
    };
    d.set_shape_tuning(Some(setting.clone()));
    assert_eq!(d.shape_tuning(), Some(setting.clone()));
    let candidates = Tuning::candidates(d.adapter_info(), d.features(), d.limits());
    let product = |spec: &Matmul, seed: u64| {
        let (a_len, b_len) = (spec.m * spec.k, spec.k * spec.n);
        let a = random_vec(a_len, seed, -1.0, 1.0);
        let b = random_vec(b_len, seed + 1, -1.0, 1.0);
        let c = d
            .matmul(&d.upload(&a).unwrap(), &d.upload(&b).unwrap(), spec)
            .unwrap();
        (a, b, c)
    };

    // Too small or too large to be tuned by shape: nothing is timed or
    // written.
    product(&Matmul::new(8, 8, 8), 1);
    product(&Matmul::new(128, 96, 96), 2);
    assert!(!file.exists());

    // A new shape large enough: every candidate is timed on it, the
    // fastest kept and written, and the product is right.
    let spec = Matmul::new(64, 48, 40).transpose_b(true);
    let (a, b, c) = product(&spec, 3);
    let got = d.read::<f32>(&c).unwrap();
    for i in 0..spec.m {
        for j in 0..spec.n {
            let want: f64 = (0..spec.k)
                .map(|p| f64::from(a[i * spec.k + p]) * f64::from(b[j * spec.k + p]))
                .sum();
            let g = f64::from(got[i * spec.n + j]);
            assert!(
                (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "C[{i},{j}]: {g} vs {want}"
            );
        }
    }
    let chosen = d.matmul_tiling(&spec);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains(&format!("1x64x48tx40 = {chosen}\n")),
        "{text}"
    );
    // Each candidate's time is listed under the choice, and the choice is
    // the fastest.
    let timings: Vec<(String, f64)> = text
        .lines()
        .skip_while(|line| !line.starts_with("1x64x48tx40 = "))
        .skip(1)
        .map_while(|line| {
            let (tiling, ms) = line.strip_prefix("#   ")?.split_once(": ")?;
            Some((tiling.to_string(), ms.strip_suffix(" ms")?.parse().ok()?))
        })
        .collect();
    for t in &candidates {
        assert!(
            timings.iter().any(|(name, _)| *name == t.to_string()),
            "{t} not timed:\n{text}"
        );
    }
    // (Compared as written, to the microsecond: a tie there may go
    // either way.)
    let fastest = timings.iter().map(|t| t.1).fold(f64::MAX, f64::min);
    let chosen_ms = timings
        .iter()
        .find(|t| t.0 == chosen.to_string())
        .unwrap()
        .1;
    assert!(chosen_ms <= fastest, "{chosen} is not the fastest:\n{text}");

    // Met inside a `together` block (where timing would submit gathered
    // launches midway): timed as the block ends.
    // (B transposed again: the same kernels as above, compiled once.)
    let inside = Matmul::new(72, 40, 48).transpose_b(true);
    d.together(|| {
        product(&inside, 5);
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.contains("1x72x40tx48 = "), !fusion_on(), "{text}");
        Ok::<(), DeviceError>(())
    })
    .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("1x72x40tx48 = "), "{text}");

    // The file is read back, not measured again: a choice written into it
    // is the one `Device::matmul` runs. (What a profile names a kernel by
    // starts with its tiling's kind and the parameters no shape adapts;
    // where the candidates differ in those, one that differs is taken.)
    let prefix = |t: MatmulTiling| match t {
        MatmulTiling::Subgroup { tm, sg, .. } => format!("subgroup:{tm}:{sg}:"),
        MatmulTiling::Register { .. } => "register:".to_string(),
        t => format!("{t}:"),
    };
    let other = *candidates
        .iter()
        .find(|&&t| prefix(t) != prefix(chosen))
        .or_else(|| candidates.iter().find(|&&t| t != chosen))
        .unwrap_or(&chosen);
    std::fs::write(&file, format!("1x64x48tx40 = {other}\n")).unwrap();
    d.set_shape_tuning(Some(setting));
    assert_eq!(d.matmul_tiling(&spec), other);
    d.set_profiling(true).unwrap();
    let (_, _, again) = product(&spec, 3);
    d.synchronize().unwrap();
    let ran = d.profile();
    d.set_profiling(false).unwrap();
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(
        ran[0].kernel.starts_with(&prefix(other)),
        "{other} chosen, {} ran",
        ran[0].kernel
    );
    assert_eq!(d.read::<f32>(&again).unwrap().len(), spec.m * spec.n);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        format!("1x64x48tx40 = {other}\n"),
        "a known shape is not timed again"
    );

    // A spec the operands do not hold is refused before anything is
    // timed: no product of its size is made up to time.
    let (a, b) = (
        d.upload(&[1.0f32; 16]).unwrap(),
        d.upload(&[1.0f32; 16]).unwrap(),
    );
    let wrong = Matmul::new(256, 256, 256);
    assert!(matches!(
        d.matmul(&a, &b, &wrong),
        Err(DeviceError::Shape { .. })
    ));
    assert!(!std::fs::read_to_string(&file)
        .unwrap()
        .contains("1x1048576"));

    d.set_shape_tuning(None);
    assert_eq!(d.shape_tuning(), None);
    std::fs::remove_file(&file).unwrap();
}
