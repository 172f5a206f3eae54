//! Choosing the matmul tiling by measurement. The first time Kiln opens an
//! adapter, every candidate tiling for that kind of adapter times a few
//! products of shapes training actually uses; the fastest is kept and written
//! to `<cache>/tuning/<adapter, backend, driver>-kiln<version>-<kernels>.txt`
//! (CPU adapters also name the host CPU), so later runs start with it at the
//! cost of a file read. `KILN_MATMUL` (a fixed tiling), `KILN_AUTOTUNE=0` or
//! `KILN_KERNEL_CLASS` (the built-in defaults) skip it.

use crate::buffer::GpuBuffer;
use crate::device::{Device, Loops};
use crate::error::Result;
use crate::kernels::matmul::{fnv1a, kernels_fingerprint, Matmul, FNV_OFFSET};
use crate::tuning::{MatmulTiling, Tuning};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where Kiln keeps downloads and measurements: `$KILN_CACHE`, else
/// `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`. An empty variable counts
/// as unset, as in the fetch scripts.
pub fn cache_dir() -> PathBuf {
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = set("KILN_CACHE") {
        return dir.into();
    }
    if let Some(dir) = set("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("kiln");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("kiln")
}

/// What [`Device::autotune`] decided and how.
#[derive(Clone, Debug)]
pub struct AutotuneReport {
    /// The tiling chosen for ordinary products, now in the device's [`Tuning`].
    pub chosen: MatmulTiling,
    /// Seconds each candidate took over the probe shapes; empty when the
    /// choice came from the cache file. Where texture operands are a choice
    /// (see `measured_textures`), each candidate's time relative to the
    /// fastest instead, shape by shape (a geometric mean; 1 = fastest on
    /// every shape).
    pub measured: Vec<(MatmulTiling, f64)>,
    /// The choice for small products ([`Tuning::small_matmul`]).
    pub chosen_small: MatmulTiling,
    /// Seconds each candidate took over the small probe shapes; empty on CPU
    /// adapters (which keep one tiling) and when the cache file was read.
    pub measured_small: Vec<(MatmulTiling, f64)>,
    /// Whether large products read both operands through textures (see
    /// [`Tuning::operand_textures`]).
    pub operand_textures: bool,
    /// How long the probe shapes took under each tiling with the texture
    /// path, reading large operands through textures, relative to the
    /// fastest as in `measured`; empty where there is no such choice or the
    /// cache file was read. Where it is not empty, `measured` holds the same
    /// products without textures, both by the host's clock.
    pub measured_textures: Vec<(MatmulTiling, f64)>,
    /// The file the choice was read from or written to.
    pub cache_file: PathBuf,
}

/// What the probe shapes took under each tiling: seconds, or a relative
/// time (see [`AutotuneReport::measured`]).
type Timings = Vec<(MatmulTiling, f64)>;

/// A probe's product: `m, n, k` and whether A and B are transposed.
type Probe = (usize, usize, usize, bool, bool);

/// Shapes the probe times on CPU adapters: a square product, a layer's
/// forward at batch 32, a weight gradient (`A^T B`) and a MiniLM-sized
/// layer's forward over 1024 tokens (`A x B^T`: Hugging Face stores weights
/// `[out, in]`). The last keeps the choice honest for transformers: on a
/// Zen 3 VM the first three could not tell two tilings apart that ran
/// MiniLM's training 10% apart.
const CPU_PROBES: [Probe; 4] = [
    (512, 512, 512, false, false),
    (32, 256, 784, false, false),
    (784, 64, 128, true, false),
    (1024, 384, 384, false, true),
];

/// On GPUs, shapes large enough to fill one (a 512 x 512 product makes 16
/// workgroups of 128 x 128 tiles, for over a hundred multiprocessors): a
/// square product, a BERT-base-sized layer's forward over 1024 tokens and
/// its weight gradient.
const GPU_PROBES: [Probe; 3] = [
    (2048, 2048, 2048, false, false),
    (1024, 3072, 768, false, false),
    (768, 3072, 1024, true, false),
];

/// On GPUs, products too small to fill one under large tiles (see
/// [`Tuning::small_matmul`]): a MiniLM-sized layer over 1024 tokens (8
/// sequences of 128), its forward, feed-forward up and down projections.
const GPU_SMALL_PROBES: [Probe; 3] = [
    (1024, 384, 384, false, false),
    (1024, 1536, 384, false, false),
    (1024, 384, 1536, false, false),
];

impl Device {
    /// The cache file of this adapter's tuning. Its name holds the adapter,
    /// Kiln's version and a fingerprint of the candidate kernels' code, so
    /// new drivers and changed kernels are timed afresh; kernels compiled
    /// without some of wgpu's runtime checks (`KILN_LOOP_COUNTERS=0`,
    /// `KILN_INDEX_CLAMPS=0`) are tuned apart. On a
    /// CPU adapter it also holds a fingerprint of the host CPU: its model,
    /// vector extensions and core count.
    pub fn tuning_cache_file(&self) -> PathBuf {
        let info = self.adapter_info();
        let candidates = Tuning::candidates(info, self.features(), self.limits());
        let host = match self.is_cpu() {
            true => format!("-host{:016x}", host_cpu_fingerprint()),
            false => String::new(),
        };
        let key = format!(
            "{}-{:?}-{}-{}-{}{host}-kiln{}-{:016x}{}",
            info.name,
            info.backend,
            info.driver,
            info.driver_info,
            info.device,
            env!("CARGO_PKG_VERSION"),
            kernels_fingerprint(&candidates)
                ^ probes_fingerprint(self.probes())
                ^ probes_fingerprint(self.small_probes().unwrap_or_default())
                ^ fnv1a(FNV_OFFSET, b"operand textures")
                ^ match crate::kernels::matmul::product_loops(self) {
                    Loops::Bounded => fnv1a(FNV_OFFSET, b"loops bounded"),
                    Loops::Counted => 0,
                },
            self.kernel_checks().cache_suffix()
        );
        let file: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        cache_dir().join("tuning").join(format!("{file}.txt"))
    }

    /// Sets the matmul tiling from `cache_file` if it holds one this adapter
    /// can run, else measures every candidate, keeps the fastest and writes it
    /// to `cache_file` (a failed write only costs the next run a re-measure).
    pub fn autotune(&self, cache_file: &Path) -> Result<AutotuneReport> {
        let candidates = Tuning::candidates(self.adapter_info(), self.features(), self.limits());
        if let Some(cached) = std::fs::read_to_string(cache_file)
            .ok()
            .and_then(|text| parse_cache(&text))
            .filter(|t| candidates.contains(&t.matmul) && candidates.contains(&t.small_matmul))
        {
            self.set_tuning(cached);
            return Ok(AutotuneReport {
                chosen: cached.matmul,
                measured: Vec::new(),
                chosen_small: cached.small_matmul,
                measured_small: Vec::new(),
                operand_textures: cached.operand_textures,
                measured_textures: Vec::new(),
                cache_file: cache_file.to_path_buf(),
            });
        }
        // Nobody switches the profiler, which times the candidates, until
        // the choice is made.
        let _profiler = crate::device::lock(&self.shared.profiler);
        // A candidate that fails (a driver refusing one kernel) is left
        // out, not the end of tuning: the others are still measured, and
        // the choice among them cached.
        let mut failed: Vec<(MatmulTiling, String)> = Vec::new();
        let (chosen, measured, measured_textures, operand_textures) =
            if self.texture_choice(&candidates) {
                let (plain, textured) =
                    self.time_with_and_without_textures(&candidates, &mut failed)?;
                // A tie goes to storage loads (the first of equals).
                let (chosen, textures, _) = plain
                    .iter()
                    .map(|&(t, score)| (t, false, score))
                    .chain(textured.iter().map(|&(t, score)| (t, true, score)))
                    .min_by(|a, b| a.2.total_cmp(&b.2))
                    .ok_or_else(every_candidate_failed)?;
                (chosen, plain, textured, textures)
            } else {
                let (chosen, measured) = self.fastest(&candidates, self.probes(), &mut failed)?;
                (chosen, measured, Vec::new(), false)
            };
        let (chosen_small, measured_small) = match self.small_probes() {
            Some(probes) => self.fastest(&candidates, probes, &mut failed)?,
            None => (chosen, Vec::new()),
        };
        let tuning = Tuning {
            matmul: chosen,
            small_matmul: chosen_small,
            operand_textures,
        };
        self.set_tuning(tuning);
        let measurements = Measurements {
            tilings: &measured,
            small_tilings: &measured_small,
            textured: &measured_textures,
            failed: &failed,
        };
        if let Err(e) = write_cache(cache_file, tuning, &measurements) {
            eprintln!(
                "kiln: could not save the matmul tuning to {} ({e}); the next run measures again",
                cache_file.display()
            );
        }
        Ok(AutotuneReport {
            chosen,
            measured,
            chosen_small,
            measured_small,
            operand_textures,
            measured_textures,
            cache_file: cache_file.to_path_buf(),
        })
    }

    /// The candidate the probe shapes take least device time under, and
    /// every candidate's time; a candidate that fails is added to `failed`.
    fn fastest(
        &self,
        candidates: &[MatmulTiling],
        probes: &[Probe],
        failed: &mut Vec<(MatmulTiling, String)>,
    ) -> Result<(MatmulTiling, Timings)> {
        let mut measured = Vec::with_capacity(candidates.len());
        for &tiling in candidates {
            if failed.iter().any(|(t, _)| *t == tiling) {
                continue;
            }
            match self.probe(tiling, probes) {
                Ok(seconds) => measured.push((tiling, seconds)),
                Err(e) => {
                    eprintln!("kiln: autotuning left out {tiling}: {e}");
                    failed.push((tiling, e.to_string()));
                }
            }
        }
        let chosen = measured
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|m| m.0)
            .ok_or_else(every_candidate_failed)?;
        Ok((chosen, measured))
    }

    /// Whether reading large operands through textures is the tuner's to
    /// decide: CPU adapters with a tiling that has the path, unless
    /// `KILN_TEXTURES=0` or a test fixed the mode (see
    /// [`Tuning::operand_textures`]).
    fn texture_choice(&self, candidates: &[MatmulTiling]) -> bool {
        self.kernels_for_cpu()
            && self.texture_operands() == crate::TextureOperands::Auto
            && candidates.iter().any(|t| t.has_texture_path())
    }

    /// How long the probe shapes take under each candidate with storage
    /// loads, and under each with the texture path with large operands
    /// through textures, as the geometric mean over the shapes of its time
    /// over the fastest's (1 = fastest on every shape): a sum of seconds
    /// would let the largest shape decide alone, and the batch-32 layer is
    /// what the MNIST MLP runs. By the host's clock around submit and wait:
    /// a texture's copy is a command, not a kernel, which the device's
    /// kernel times would leave out. Both ways are timed because the tiling
    /// that wins one need not win the other. Rounds alternate over every
    /// pair, best of each kept: a host's speed drifts between runs.
    fn time_with_and_without_textures(
        &self,
        candidates: &[MatmulTiling],
        failed: &mut Vec<(MatmulTiling, String)>,
    ) -> Result<(Timings, Timings)> {
        let operands = self
            .probes()
            .iter()
            .enumerate()
            .map(|(i, probe)| self.probe_operands(i, probe))
            .collect::<Result<Vec<_>>>()?;
        // Seconds per shape.
        let run = |tiling: MatmulTiling, textures: bool| -> Result<Vec<f64>> {
            self.set_tuning(Tuning {
                operand_textures: textures,
                ..Tuning::same(tiling)
            });
            operands
                .iter()
                .map(|(a, b, spec)| {
                    let start = Instant::now();
                    let out: GpuBuffer = self.matmul_with(a, b, spec, tiling)?;
                    self.synchronize()?;
                    drop(out);
                    Ok(start.elapsed().as_secs_f64())
                })
                .collect()
        };
        let mut pairs: Vec<(MatmulTiling, bool, Vec<f64>)> = Vec::new();
        for &tiling in candidates {
            let ways: &[bool] = match tiling.has_texture_path() {
                true => &[false, true],
                false => &[false],
            };
            for &textures in ways {
                // The first run compiles the kernels, and shows whether
                // they run at all.
                match run(tiling, textures) {
                    Ok(_) => pairs.push((tiling, textures, vec![f64::MAX; operands.len()])),
                    Err(e) => {
                        eprintln!("kiln: autotuning left out {tiling}: {e}");
                        failed.push((tiling, e.to_string()));
                        break;
                    }
                }
            }
        }
        let failed_tilings: Vec<MatmulTiling> = failed.iter().map(|f| f.0).collect();
        pairs.retain(|p| !failed_tilings.contains(&p.0));
        let start = Instant::now();
        for round in 0.. {
            for (tiling, textures, best) in &mut pairs {
                for (best, seconds) in best.iter_mut().zip(run(*tiling, *textures)?) {
                    *best = best.min(seconds);
                }
            }
            if round >= 2 && start.elapsed() > Duration::from_millis(300) {
                break;
            }
        }
        let fastest: Vec<f64> = (0..operands.len())
            .map(|shape| pairs.iter().map(|p| p.2[shape]).fold(f64::MAX, f64::min))
            .collect();
        let relative = |times: &[f64]| -> f64 {
            let logs: f64 = times.iter().zip(&fastest).map(|(t, f)| (t / f).ln()).sum();
            (logs / times.len() as f64).exp()
        };
        let timed = |textures: bool| -> Timings {
            pairs
                .iter()
                .filter(|p| p.1 == textures)
                .map(|p| (p.0, relative(&p.2)))
                .collect()
        };
        Ok((timed(false), timed(true)))
    }

    /// Sized for the hardware, whichever kernels it is given
    /// (`KILN_KERNEL_CLASS`): GPU-sized products take seconds on a CPU.
    fn probes(&self) -> &'static [Probe] {
        if self.is_cpu() {
            &CPU_PROBES
        } else {
            &GPU_PROBES
        }
    }

    /// The shapes that choose [`Tuning::small_matmul`]: on GPUs only, since
    /// CPU adapters fit their register tiles to small products instead.
    fn small_probes(&self) -> Option<&'static [Probe]> {
        (!self.is_cpu()).then_some(&GPU_SMALL_PROBES[..])
    }

    /// The operands of probe number `i` (its values seeded by `i`) and its
    /// product.
    fn probe_operands(&self, i: usize, probe: &Probe) -> Result<(GpuBuffer, GpuBuffer, Matmul)> {
        let &(m, n, k, trans_a, trans_b) = probe;
        let a = self.upload(&probe_data(m * k, i as u32))?;
        let b = self.upload(&probe_data(k * n, 7 + i as u32))?;
        let spec = Matmul::new(m, n, k)
            .transpose_a(trans_a)
            .transpose_b(trans_b);
        Ok((a, b, spec))
    }

    /// Seconds `tiling` takes for `probes`, best of a few runs each.
    fn probe(&self, tiling: MatmulTiling, probes: &[Probe]) -> Result<f64> {
        let mut total = 0.0;
        for (i, probe) in probes.iter().enumerate() {
            let (a, b, spec) = self.probe_operands(i, probe)?;
            total += self.product_seconds(&a, &b, &spec, tiling)?;
        }
        Ok(total)
    }

    /// Seconds the product `spec` of `a` and `b` takes under `tiling`: the
    /// best of at least three runs and 30 ms, after a first run that
    /// compiles the kernel.
    pub(crate) fn product_seconds(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        spec: &Matmul,
        tiling: MatmulTiling,
    ) -> Result<f64> {
        let run = || -> Result<f64> {
            self.kernel_seconds(|| {
                let out: GpuBuffer = self.matmul_with(a, b, spec, tiling)?;
                drop(out);
                Ok(())
            })
        };
        run()?;
        let (mut best, start) = (f64::MAX, Instant::now());
        for rep in 0.. {
            best = best.min(run()?);
            if rep >= 2 && start.elapsed() > Duration::from_millis(30) {
                break;
            }
        }
        Ok(best)
    }

    /// Seconds the kernels `work` launches take: by the device's clock where
    /// it has timestamps (a submit and wait costs more than a GPU's product
    /// of a probe's size), else by the host's around submitting and waiting.
    /// The caller holds the profiler's lock.
    pub(crate) fn kernel_seconds(&self, work: impl FnOnce() -> Result<()>) -> Result<f64> {
        self.switch_profiling(true)?;
        let start = Instant::now();
        let done = work().and_then(|()| self.synchronize());
        let wall = start.elapsed().as_secs_f64();
        let times = self.profile();
        self.switch_profiling(false)?;
        done?;
        Ok(
            match times.iter().all(|t| t.device_clock) && !times.is_empty() {
                true => times.iter().map(|t| t.seconds).sum(),
                false => wall,
            },
        )
    }
}

/// Tells host CPUs apart in a CPU adapter's cache file name. Such an
/// adapter's speed is the host's: lavapipe compiles each kernel for the CPU
/// it runs on and spreads workgroups over its cores, and how the tilings
/// rank moves with both. A cache directory shared between hosts (a home
/// directory on a network share, a CI cache restored on another runner
/// type) must not hand one host's choice to another. Speed-dependent fields
/// (`cpu MHz`, `bogomips`) are left out, so one host keeps one file.
fn host_cpu_fingerprint() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut identity = format!(
        "{}{}threads={threads}\n",
        std::env::consts::ARCH,
        vector_features()
    );
    identity.push_str(&cpu_identity(&cpuinfo));
    fnv1a(FNV_OFFSET, identity.as_bytes())
}

/// The fields of `/proc/cpuinfo`'s first processor that name the model
/// (x86 and Arm spellings); empty where there is no such file.
fn cpu_identity(cpuinfo: &str) -> String {
    const FIELDS: [&str; 10] = [
        "vendor_id",
        "cpu family",
        "model",
        "model name",
        "stepping",
        "CPU implementer",
        "CPU architecture",
        "CPU variant",
        "CPU part",
        "CPU revision",
    ];
    let first = cpuinfo.split("\n\n").next().unwrap_or_default();
    first
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| FIELDS.contains(&key.trim()))
        .map(|(key, value)| format!("{}={}\n", key.trim(), value.trim()))
        .collect()
}

/// The vector extensions the JIT may use, where the OS does not say
/// (and a VM may report a generic model name).
fn vector_features() -> String {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ]
        .iter()
        .map(|(name, on)| format!(" {name}={on}"))
        .collect()
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        String::new()
    }
}

/// Tells probe sets apart in cache file names.
fn probes_fingerprint(probes: &[Probe]) -> u64 {
    fnv1a(FNV_OFFSET, format!("{probes:?}").as_bytes())
}

pub(crate) fn probe_data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) as f32 / 65536.0 - 0.5
        })
        .collect()
}

/// The tilings recorded in a cache file (`matmul = <tiling>`, and
/// `small_matmul = <tiling>`, which when missing is the same).
fn parse_cache(text: &str) -> Option<Tuning> {
    let entry = |name: &str| -> Option<&str> {
        text.lines()
            .filter_map(|line| line.split_once('='))
            .find(|(key, _)| key.trim() == name)
            .map(|(_, value)| value.trim())
    };
    let matmul: MatmulTiling = entry("matmul")?.parse().ok()?;
    // Missing (files from before it) means the same; present but unreadable
    // means a damaged file, measured again.
    let small_matmul = match entry("small_matmul") {
        Some(value) => value.parse().ok()?,
        None => matmul,
    };
    // Missing: off, as before it was measured.
    let operand_textures = match entry("operand_textures") {
        Some(value) => value.parse().ok()?,
        None => false,
    };
    Some(Tuning {
        matmul,
        small_matmul,
        operand_textures,
    })
}

fn every_candidate_failed() -> crate::DeviceError {
    crate::DeviceError::Backend("every candidate tiling failed".into())
}

/// What the autotuner measured, written beside its choices.
struct Measurements<'a> {
    tilings: &'a [(MatmulTiling, f64)],
    small_tilings: &'a [(MatmulTiling, f64)],
    /// The same probes with large operands through textures; where there
    /// are any, every figure is a time relative to the fastest, by the
    /// host's clock.
    textured: &'a [(MatmulTiling, f64)],
    failed: &'a [(MatmulTiling, String)],
}

/// Writes the choices and the measurements (for people reading the file),
/// through a temporary file renamed into place.
fn write_cache(path: &Path, chosen: Tuning, measured: &Measurements) -> std::io::Result<()> {
    let mut text = format!(
        "matmul = {}\nsmall_matmul = {}\noperand_textures = {}\n",
        chosen.matmul, chosen.small_matmul, chosen.operand_textures
    );
    if measured.textured.is_empty() {
        for (probes, timings) in [
            ("probe", measured.tilings),
            ("small probe", measured.small_tilings),
        ] {
            for (t, seconds) in timings {
                text.push_str(&format!(
                    "# {t}: {:.3} ms over the {probes} shapes\n",
                    seconds * 1e3
                ));
            }
        }
    } else {
        for (how, timings) in [
            ("", measured.tilings),
            (" with texture operands", measured.textured),
        ] {
            for (t, relative) in timings {
                text.push_str(&format!(
                    "# {t}{how}: {relative:.3}x the fastest, shape by shape (host clock)\n"
                ));
            }
        }
    }
    for (t, why) in measured.failed {
        text.push_str(&format!("# {t}: failed: {why}\n"));
    }
    write_atomically(path, &text)
}

/// Writes `text` to `path` through a temporary file renamed into place, so
/// that a reader never sees half a file.
pub(crate) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A name of its own per write: two devices of one process may tune at
    // once, and one must not rename the other's half-written file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_identity_keeps_the_model_and_drops_the_clock() {
        let host = |model: &str, mhz: &str| {
            format!(
                "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n\
                 model\t\t: {model}\nmodel name\t: AMD EPYC\ncpu MHz\t\t: {mhz}\n\
                 bogomips\t: {mhz}\n\nprocessor\t: 1\nmodel\t\t: 99\n"
            )
        };
        let zen3 = cpu_identity(&host("1", "2445.40"));
        assert_eq!(
            zen3,
            "vendor_id=AuthenticAMD\ncpu family=25\nmodel=1\nmodel name=AMD EPYC\n"
        );
        // The clock drifts on one host; the model tells two hosts apart.
        assert_eq!(cpu_identity(&host("1", "3100.00")), zen3);
        assert_ne!(cpu_identity(&host("17", "2445.40")), zen3);
        assert_eq!(cpu_identity(""), "");
        assert_eq!(host_cpu_fingerprint(), host_cpu_fingerprint());
    }

    #[test]
    fn cache_files_parse_whole_or_not_at_all() {
        let both =
            parse_cache("matmul = register:8x8:8x8\nsmall_matmul = register:4x4:8x8\n").unwrap();
        assert_eq!(both.small_matmul.to_string(), "register:4x4:8x8");
        // Files from before small products were tuned apart.
        let old = parse_cache("matmul = register:8x8:8x8\n# register:8x8:8x8: 1 ms\n").unwrap();
        assert_eq!(old.small_matmul, old.matmul);
        // A damaged line is measured again, not read as missing.
        assert!(parse_cache("matmul = register:8x8:8x8\nsmall_matmul = regis").is_none());
        assert!(parse_cache("matmul = nonsense\n").is_none());
        assert!(parse_cache("").is_none());
    }
}
