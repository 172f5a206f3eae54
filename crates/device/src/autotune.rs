//! Choosing the matmul tiling by measurement. The first time Kiln opens an
//! adapter, every candidate tiling for that kind of adapter times a few
//! products of shapes training actually uses; the fastest is kept and written
//! to `<cache>/tuning/<adapter, backend, driver>-kiln<version>-<kernels>.txt`
//! (CPU adapters also name the host CPU), so later runs start with it at the
//! cost of a file read. `KILN_MATMUL` (a fixed tiling), `KILN_AUTOTUNE=0` or
//! `KILN_KERNEL_CLASS` (the built-in defaults) skip it.

use crate::buffer::GpuBuffer;
use crate::device::Device;
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
    /// choice came from the cache file.
    pub measured: Vec<(MatmulTiling, f64)>,
    /// The choice for small products ([`Tuning::small_matmul`]).
    pub chosen_small: MatmulTiling,
    /// Seconds each candidate took over the small probe shapes; empty on CPU
    /// adapters (which keep one tiling) and when the cache file was read.
    pub measured_small: Vec<(MatmulTiling, f64)>,
    /// Whether large products read both operands through textures (see
    /// [`Tuning::operand_textures`]).
    pub operand_textures: bool,
    /// Seconds the probe shapes took with those textures off and on; `None`
    /// where there is no such choice or the cache file was read.
    pub measured_textures: Option<(f64, f64)>,
    /// The file the choice was read from or written to.
    pub cache_file: PathBuf,
}

/// A probe's product: `m, n, k` and whether A is transposed.
type Probe = (usize, usize, usize, bool);

/// Shapes the probe times on CPU adapters: a square product, a layer's
/// forward at batch 32, and a weight gradient (`A^T B`).
const CPU_PROBES: [Probe; 3] = [
    (512, 512, 512, false),
    (32, 256, 784, false),
    (784, 64, 128, true),
];

/// On GPUs, shapes large enough to fill one (a 512 x 512 product makes 16
/// workgroups of 128 x 128 tiles, for over a hundred multiprocessors): a
/// square product, a BERT-base-sized layer's forward over 1024 tokens and
/// its weight gradient.
const GPU_PROBES: [Probe; 3] = [
    (2048, 2048, 2048, false),
    (1024, 3072, 768, false),
    (768, 3072, 1024, true),
];

/// On GPUs, products too small to fill one under large tiles (see
/// [`Tuning::small_matmul`]): a MiniLM-sized layer over 1024 tokens (8
/// sequences of 128), its forward, feed-forward up and down projections.
const GPU_SMALL_PROBES: [Probe; 3] = [
    (1024, 384, 384, false),
    (1024, 1536, 384, false),
    (1024, 384, 1536, false),
];

impl Device {
    /// The cache file of this adapter's tuning. Its name holds the adapter,
    /// Kiln's version and a fingerprint of the candidate kernels' code, so
    /// new drivers and changed kernels are timed afresh; kernels compiled
    /// without loop counters (`KILN_LOOP_COUNTERS=0`) are tuned apart. On a
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
                ^ fnv1a(FNV_OFFSET, b"operand textures"),
            if self.loop_counters() {
                ""
            } else {
                "-no-loop-counters"
            }
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
                measured_textures: None,
                cache_file: cache_file.to_path_buf(),
            });
        }
        // A candidate that fails (a driver refusing one kernel) is left
        // out, not the end of tuning: the others are still measured, and
        // the choice among them cached.
        let mut failed: Vec<(MatmulTiling, String)> = Vec::new();
        let mut fastest = |probes: &[Probe]| -> Result<(MatmulTiling, Vec<(MatmulTiling, f64)>)> {
            let mut measured = Vec::with_capacity(candidates.len());
            for &tiling in &candidates {
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
                .ok_or_else(|| {
                    crate::DeviceError::Backend("every candidate tiling failed".into())
                })?;
            Ok((chosen, measured))
        };
        let (chosen, measured) = fastest(self.probes())?;
        let (chosen_small, measured_small) = match self.small_probes() {
            Some(probes) => fastest(probes)?,
            None => (chosen, Vec::new()),
        };
        let mut tuning = Tuning {
            matmul: chosen,
            small_matmul: chosen_small,
            operand_textures: false,
        };
        self.set_tuning(tuning);
        let textures_measured = match self.time_operand_textures(tuning) {
            Ok(seconds) => seconds,
            Err(e) => {
                eprintln!("kiln: autotuning left texture operands off: {e}");
                None
            }
        };
        if let Some((off, on)) = textures_measured {
            tuning.operand_textures = on < off;
            self.set_tuning(tuning);
        }
        let measurements = Measurements {
            tilings: &measured,
            small_tilings: &measured_small,
            textures: textures_measured,
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
            operand_textures: tuning.operand_textures,
            measured_textures: textures_measured,
            cache_file: cache_file.to_path_buf(),
        })
    }

    /// Seconds the probe shapes take under `tuning` with large operands read
    /// through textures off and on (see [`Tuning::operand_textures`]), where
    /// the choice exists: CPU adapters whose tiling has the texture path,
    /// unless `KILN_TEXTURES=0` or a test fixed the mode. By the host's clock
    /// around submit and wait: a texture's copy is a command, not a kernel,
    /// so the device's kernel times would leave it out.
    fn time_operand_textures(&self, tuning: Tuning) -> Result<Option<(f64, f64)>> {
        if !(self.kernels_for_cpu()
            && matches!(tuning.matmul, MatmulTiling::Subgroup { .. })
            && self.texture_operands() == crate::TextureOperands::Auto)
        {
            return Ok(None);
        }
        let probes = self.probes();
        let operands = probes
            .iter()
            .enumerate()
            .map(|(i, &(m, n, k, trans_a))| {
                let a = self.upload(&probe_data(m * k, i as u32))?;
                let b = self.upload(&probe_data(k * n, 7 + i as u32))?;
                Ok((a, b, Matmul::new(m, n, k).transpose_a(trans_a)))
            })
            .collect::<Result<Vec<_>>>()?;
        let run = |textures: bool| -> Result<f64> {
            self.set_tuning(Tuning {
                operand_textures: textures,
                ..tuning
            });
            let start = Instant::now();
            for (a, b, spec) in &operands {
                let out: GpuBuffer = self.matmul_with(a, b, spec, tuning.matmul)?;
                drop(out);
            }
            self.synchronize()?;
            Ok(start.elapsed().as_secs_f64())
        };
        // Alternating, best of each: a host's speed drifts between runs.
        let timed = (|| {
            let (mut off, mut on) = (f64::MAX, f64::MAX);
            run(false)?;
            run(true)?;
            let start = Instant::now();
            for round in 0.. {
                off = off.min(run(false)?);
                on = on.min(run(true)?);
                if round >= 2 && start.elapsed() > Duration::from_millis(100) {
                    break;
                }
            }
            Ok((off, on))
        })();
        self.set_tuning(tuning);
        timed.map(Some)
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

    /// Seconds `tiling` takes for `probes`, best of a few runs each.
    fn probe(&self, tiling: MatmulTiling, probes: &[Probe]) -> Result<f64> {
        let mut total = 0.0;
        for (i, &(m, n, k, trans_a)) in probes.iter().enumerate() {
            let a = self.upload(&probe_data(m * k, i as u32))?;
            let b = self.upload(&probe_data(k * n, 7 + i as u32))?;
            let spec = Matmul::new(m, n, k).transpose_a(trans_a);
            // The first run compiles the kernel.
            let run = || -> Result<f64> {
                self.kernel_seconds(|| {
                    let out: GpuBuffer = self.matmul_with(&a, &b, &spec, tiling)?;
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
            total += best;
        }
        Ok(total)
    }

    /// Seconds the kernels `work` launches take: by the device's clock where
    /// it has timestamps (a submit and wait costs more than a GPU's product
    /// of a probe's size), else by the host's around submitting and waiting.
    fn kernel_seconds(&self, work: impl FnOnce() -> Result<()>) -> Result<f64> {
        self.set_profiling(true)?;
        let start = Instant::now();
        let done = work().and_then(|()| self.synchronize());
        let wall = start.elapsed().as_secs_f64();
        let times = self.profile();
        self.set_profiling(false)?;
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

fn probe_data(n: usize, seed: u32) -> Vec<f32> {
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

/// What the autotuner measured, written beside its choices.
struct Measurements<'a> {
    tilings: &'a [(MatmulTiling, f64)],
    small_tilings: &'a [(MatmulTiling, f64)],
    textures: Option<(f64, f64)>,
    failed: &'a [(MatmulTiling, String)],
}

/// Writes the choices and the measurements (for people reading the file),
/// through a temporary file renamed into place.
fn write_cache(path: &Path, chosen: Tuning, measured: &Measurements) -> std::io::Result<()> {
    let mut text = format!(
        "matmul = {}\nsmall_matmul = {}\noperand_textures = {}\n",
        chosen.matmul, chosen.small_matmul, chosen.operand_textures
    );
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
    if let Some((off, on)) = measured.textures {
        text.push_str(&format!(
            "# {}: operands from storage {:.3} ms, through textures {:.3} ms \
             over the probe shapes (host clock)\n",
            chosen.matmul,
            off * 1e3,
            on * 1e3
        ));
    }
    for (t, why) in measured.failed {
        text.push_str(&format!("# {t}: failed: {why}\n"));
    }
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
