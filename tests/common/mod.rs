//! Helpers shared by the integration tests: one device per test binary, seeded
//! random inputs and tolerance checks against f64 references.
#![allow(dead_code)] // each test binary uses a different subset

use kiln::device::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::OnceCell;
use std::sync::{Mutex, OnceLock};

/// What a `KILN_*` setting that overrides a per-adapter default decides:
/// `1` on, `0` off, else `default`.
pub fn setting_or(name: &str, default: bool) -> bool {
    match std::env::var(name).as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => default,
    }
}

/// The devices a test binary's tests share: as many as tests run at once
/// (up to `MAX_SHARED_DEVICES`), each test thread taking the least used one
/// for its whole run (opening a device costs ~100 ms). One device for all
/// would compile one kernel at a time: lavapipe compiles each kernel on its
/// device's queue thread, so tests that mostly compile kernels (every
/// tiling, every op's backward) waited on each other however many cores
/// there were. Threads a test spawns share the device it hands them.
pub fn device() -> &'static Device {
    const MAX_SHARED_DEVICES: usize = 4;
    static DEVICES: [OnceLock<Device>; MAX_SHARED_DEVICES] =
        [const { OnceLock::new() }; MAX_SHARED_DEVICES];
    static USERS: Mutex<[usize; MAX_SHARED_DEVICES]> = Mutex::new([0; MAX_SHARED_DEVICES]);

    /// A test thread's hold on a device, let go when the thread ends.
    struct Claim(usize);
    impl Drop for Claim {
        fn drop(&mut self) {
            USERS.lock().unwrap_or_else(|e| e.into_inner())[self.0] -= 1;
        }
    }
    thread_local! {
        static CLAIM: OnceCell<Claim> = const { OnceCell::new() };
    }

    let slot = CLAIM.with(|claim| {
        claim
            .get_or_init(|| {
                let slots = std::thread::available_parallelism()
                    .map_or(1, usize::from)
                    .clamp(1, MAX_SHARED_DEVICES);
                let mut users = USERS.lock().unwrap_or_else(|e| e.into_inner());
                let slot = (0..slots).min_by_key(|&i| users[i]).unwrap_or(0);
                users[slot] += 1;
                Claim(slot)
            })
            .0
    });
    DEVICES[slot]
        .get_or_init(|| Device::new().unwrap_or_else(|e| panic!("tests need an adapter: {e}")))
}

/// `n` values uniform in `[lo, hi)`, reproducible from `seed`.
pub fn random_vec(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Asserts `|got - want| <= rtol * |want| + atol` for every element.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs();
        let bound = rtol * w.abs() + atol;
        assert!(
            err <= bound && g.is_finite() == w.is_finite(),
            "{what}: element {i}: got {g}, want {w} (error {err:e} > bound {bound:e})"
        );
        if err > worst.1 {
            worst = (i, err);
        }
    }
}

/// Asserts `|got - want| <= rtol * scale[i]` where `scale` is the sum of absolute
/// terms that formed each value: the standard error bound for a dot product or a
/// sum, which stays meaningful when terms cancel.
pub fn assert_close_scaled(what: &str, got: &[f32], want: &[f64], scale: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for i in 0..got.len() {
        let err = (f64::from(got[i]) - want[i]).abs();
        let bound = rtol * scale[i] + 1e-30;
        assert!(
            err <= bound,
            "{what}: element {i}: got {}, want {} (error {err:e} > bound {bound:e})",
            got[i],
            want[i]
        );
    }
}

/// numpy's broadcast rule, written out here rather than taken from the
/// library under test: shapes aligned at the right, each dim equal across
/// inputs or 1 (missing dims count as 1).
pub fn numpy_broadcast(shapes: &[&[usize]]) -> Vec<usize> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    (0..rank)
        .map(|d| {
            let dims = shapes
                .iter()
                .map(|s| (s.len() + d).checked_sub(rank).map_or(1, |i| s[i]));
            let big = dims.clone().max().unwrap_or(1);
            assert!(
                dims.clone().all(|v| v == 1 || v == big),
                "{shapes:?} do not broadcast"
            );
            // A zero-length dim wins over 1, as in numpy.
            if dims.clone().any(|v| v == 0) {
                0
            } else {
                big
            }
        })
        .collect()
}

/// numpy-style broadcast evaluation in f64.
pub fn broadcast_reference(
    shapes: &[&[usize]],
    values: &[&[f32]],
    f: impl Fn(&[f64]) -> f64,
) -> (Vec<f64>, Vec<usize>) {
    let out = numpy_broadcast(shapes);
    let numel: usize = out.iter().product();
    let mut result = Vec::with_capacity(numel);
    let mut args = vec![0.0; shapes.len()];
    for idx in 0..numel {
        // Unravel idx over `out`, then ravel into each input with size-1 dims pinned.
        let mut coords = vec![0; out.len()];
        let mut rem = idx;
        for d in (0..out.len()).rev() {
            coords[d] = rem % out[d];
            rem /= out[d];
        }
        for (i, shape) in shapes.iter().enumerate() {
            let offset = out.len() - shape.len();
            let mut flat = 0;
            for (d, &extent) in shape.iter().enumerate() {
                let c = if extent == 1 { 0 } else { coords[offset + d] };
                flat = flat * extent + c;
            }
            args[i] = f64::from(values[i][flat]);
        }
        result.push(f(&args));
    }
    (result, out)
}

/// erf in f64 to ~1e-14: the Maclaurin series where it converges without
/// cancellation, the continued fraction of erfc beyond.
pub fn erf(x: f64) -> f64 {
    if x.abs() < 3.0 {
        let (mut term, mut sum, x2) = (x, x, x * x);
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        return sum * 2.0 / std::f64::consts::PI.sqrt();
    }
    let z = x.abs();
    let mut k = z;
    for n in (1..80).rev() {
        k = z + f64::from(n) / 2.0 / k;
    }
    let erfc = (-z * z).exp() / std::f64::consts::PI.sqrt() / k;
    x.signum() * (1.0 - erfc)
}
