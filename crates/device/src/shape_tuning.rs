//! Matrix product tilings chosen shape by shape. The autotuner
//! ([`crate::autotune`]) picks one tiling for large products and one for
//! small ones from a few probe shapes; on a GPU, how a tiling fares on one
//! product also depends on how its output blocks fill the device. Blocks run
//! in waves of (compute units x blocks resident on each), and a product
//! whose last wave is mostly empty leaves most of the device idle for that
//! wave: under 128 x 64 blocks a 4096 x 4096 product is 2048 blocks, which
//! on 132 compute units holding three each is 5.2 waves, so the sixth runs
//! a fifth full. Which block shape wastes least differs from shape to shape
//! and device to device, and what is resident per compute unit cannot be
//! queried, so it is measured: the first time a large product of a new
//! shape runs, every candidate tiling is timed on that shape and the
//! fastest kept, in memory and in a file beside the tuning cache, as
//! PyTorch's `cudnn.benchmark` does for convolutions.
//!
//! CPU adapters tune the other end: small and middling products. Their
//! autotuner's probes are square-ish and large, and the tiling that wins
//! them can take twice as long as another on a batch of 32 rows or a
//! weight gradient over a short k (a subgroup tiling of eight rows per lane
//! computes half its lane-rows as clamped copies on 32 rows). Large
//! products, where the candidates come within a few percent of each other
//! there, would take seconds each to time.
//!
//! On by default where the autotuner runs; `KILN_SHAPE_TUNING=0` turns it
//! off. [`Device::set_shape_tuning`] sets it in code.

use crate::autotune::{probe_data, write_atomically};
use crate::device::{lock, switched_off, Device};
use crate::kernels::matmul::Matmul;
use crate::tuning::{MatmulTiling, Tuning};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

/// On GPUs, products with fewer multiply-adds keep the tuned class's tiling
/// by default: about a 406 x 406 x 406 product. MiniLM's per-head attention
/// products over 16 sequences of 128 tokens (192 heads of 128 x 128 x 32,
/// 2^26.6) and the reference CNN's second convolution at batch 32
/// (3872 x 64 x 288, 2^26.1) are just above. Smaller ones take a few
/// microseconds on a GPU, where launching costs about as much as any
/// tiling saves.
pub const SHAPE_TUNING_MIN_MULTIPLY_ADDS: usize = 1 << 26;

/// On CPU adapters, the products tuned by shape by default: from a 64 x 64
/// x 64 product (smaller ones cost little more than their dispatch, whatever
/// the tiling) up to where GPUs start. Larger ones take 5 ms and up each on
/// a 2-core host (N=4096: 5 s), and on MiniLM's the candidates came within a
/// few percent of each other. The MNIST MLP's products at batch 32
/// (32 x 64 x 784 and its weight gradient, 2^20.6) and most of the CNN's and
/// the LSTM's fall inside.
pub const CPU_SHAPE_TUNING_MULTIPLY_ADDS: std::ops::Range<usize> = (1 << 18)..(1 << 26);

/// Shapes whose larger operand holds more elements than this (a
/// 8192 x 8192 matrix) keep their class's tiling: timing copies both
/// operands, and such products run many waves of blocks, where the last
/// one matters least.
const MAX_TIMED_ELEMENTS: usize = 1 << 26;

/// The most shapes one device tunes; past it new shapes keep their class's
/// tiling. A model has a few dozen; this bounds a program that makes
/// products of ever new shapes (each tuned shape costs a second or so).
const MAX_SHAPES: usize = 1024;

/// Where per-shape choices are kept, and for which products.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeTuning {
    /// The file the choices are read from and written to.
    pub file: PathBuf,
    /// Products with fewer multiply-adds are not tuned by shape.
    pub min_multiply_adds: usize,
    /// Nor those with this many or more (`usize::MAX`: no bound).
    pub max_multiply_adds: usize,
}

/// What identifies a product to its tiling choice: its extents and
/// layouts. Batch strides and operand types are left out (the choice for
/// f32 operands serves f16 ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
}

impl Shape {
    fn of(spec: &Matmul) -> Self {
        Self {
            batch: spec.batch,
            m: spec.m,
            n: spec.n,
            k: spec.k,
            trans_a: spec.trans_a,
            trans_b: spec.trans_b,
        }
    }

    /// A contiguous product of this shape.
    fn spec(&self) -> Matmul {
        let mut spec = Matmul::new(self.m, self.n, self.k)
            .transpose_a(self.trans_a)
            .transpose_b(self.trans_b);
        spec.batch = self.batch;
        spec.batch_stride_a = self.m * self.k;
        spec.batch_stride_b = self.k * self.n;
        spec
    }

    /// `batch x m x n x k`, with `t` after m and n for a transposed A and B
    /// (`1x4096x4096x4096`, `8x128tx384x64`): how the file names shapes.
    fn name(&self) -> String {
        let t = |on: bool| if on { "t" } else { "" };
        format!(
            "{}x{}{}x{}{}x{}",
            self.batch,
            self.m,
            t(self.trans_a),
            self.n,
            t(self.trans_b),
            self.k
        )
    }

    fn parse(name: &str) -> Option<Self> {
        let parts: Vec<&str> = name.split('x').collect();
        let [batch, m, n, k] = parts[..] else {
            return None;
        };
        let extent = |s: &str| -> Option<(usize, bool)> {
            match s.strip_suffix('t') {
                Some(digits) => Some((digits.parse().ok()?, true)),
                None => Some((s.parse().ok()?, false)),
            }
        };
        let (m, trans_a) = extent(m)?;
        let (n, trans_b) = extent(n)?;
        Some(Self {
            batch: batch.parse().ok()?,
            m,
            n,
            k: k.parse().ok()?,
            trans_a,
            trans_b,
        })
    }
}

/// A device's per-shape choices and what is waiting to be tuned.
#[derive(Debug, Default)]
pub(crate) struct ShapeTilings {
    /// `None` while per-shape tuning is off.
    setting: Option<ShapeTuning>,
    chosen: HashMap<Shape, MatmulTiling>,
    /// The time each candidate took on each tuned shape, for the file.
    timings: HashMap<Shape, Vec<(MatmulTiling, f64)>>,
    /// Shapes met where products could not be timed (while launches were
    /// gathered into one dispatch, a profile was being taken or another
    /// thread was timing): timed when an outermost `together` block ends,
    /// or when met again.
    pending: Vec<Shape>,
    /// Shapes whose timing failed, not tried again.
    failed: HashSet<Shape>,
}

/// Reads a choices file: one `SHAPE = TILING` line per shape, `#` lines
/// being comments. Lines that do not read, or name a tiling `runs` refuses
/// (one this adapter cannot run), are left out: their shapes are timed
/// again.
fn parse_choices(text: &str, runs: impl Fn(MatmulTiling) -> bool) -> HashMap<Shape, MatmulTiling> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .filter_map(|(shape, tiling)| {
            let shape = Shape::parse(shape.trim())?;
            let tiling: MatmulTiling = tiling.trim().parse().ok()?;
            runs(tiling).then_some((shape, tiling))
        })
        .collect()
}

impl ShapeTilings {
    /// The file's text: each choice, and below it the timings it was made
    /// from (those measured in this process).
    fn text(&self) -> String {
        let mut shapes: Vec<&Shape> = self.chosen.keys().collect();
        shapes.sort_by_key(|s| (s.batch, s.m, s.n, s.k, s.trans_a, s.trans_b));
        let mut text =
            String::from("# Matrix product tilings by shape (batch x m x n x k, t: transposed)\n");
        for shape in shapes {
            text.push_str(&format!("{} = {}\n", shape.name(), self.chosen[shape]));
            for (tiling, seconds) in self.timings.get(shape).into_iter().flatten() {
                text.push_str(&format!("#   {tiling}: {:.3} ms\n", seconds * 1e3));
            }
        }
        text
    }
}

impl Device {
    /// Turns per-shape tiling choices on, kept in `setting.file` (read now
    /// if it exists), or off with `None` (see the [module
    /// docs](crate::shape_tuning)). While on, [`Device::matmul`] and the
    /// other products that choose their own tiling time every candidate on
    /// each new shape from `setting.min_multiply_adds` up to (not including)
    /// `setting.max_multiply_adds` and keep the fastest.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), kiln_device::DeviceError> {
    /// use kiln_device::{Device, Matmul, ShapeTuning};
    /// let device = Device::new()?;
    /// device.set_shape_tuning(Some(ShapeTuning {
    ///     file: std::env::temp_dir().join("kiln-shapes.txt"),
    ///     min_multiply_adds: 1 << 20,
    ///     max_multiply_adds: usize::MAX,
    /// }));
    /// let spec = Matmul::new(256, 256, 256);
    /// let a = device.upload(&vec![0.5f32; 256 * 256])?;
    /// let product = device.matmul(&a, &a, &spec)?; // times the candidates first
    /// println!("256^3 runs with {}", device.matmul_tiling(&spec));
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_shape_tuning(&self, setting: Option<ShapeTuning>) {
        let runs = |t: MatmulTiling| {
            t.validate(self.limits(), self.features(), self.adapter_info())
                .is_ok()
        };
        let chosen = setting
            .as_ref()
            .and_then(|s| std::fs::read_to_string(&s.file).ok())
            .map(|text| parse_choices(&text, runs))
            .unwrap_or_default();
        let mut tilings = lock(&self.shared.shape_tilings);
        *tilings = ShapeTilings {
            setting,
            chosen,
            ..ShapeTilings::default()
        };
    }

    /// The per-shape setting in force, if any.
    pub fn shape_tuning(&self) -> Option<ShapeTuning> {
        lock(&self.shared.shape_tilings).setting.clone()
    }

    /// Turns per-shape tuning on as the device opens, for the products the
    /// adapter's class gains on, unless `KILN_SHAPE_TUNING=0`. Called once
    /// the autotuner has run, with its cache file, beside which the choices
    /// by shape are kept.
    pub(crate) fn open_shape_tuning(&self, tuning_file: &std::path::Path) {
        if switched_off("KILN_SHAPE_TUNING") {
            return;
        }
        let multiply_adds = match self.kernels_for_cpu() {
            true => CPU_SHAPE_TUNING_MULTIPLY_ADDS,
            false => SHAPE_TUNING_MIN_MULTIPLY_ADDS..usize::MAX,
        };
        let stem = tuning_file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.set_shape_tuning(Some(ShapeTuning {
            file: tuning_file.with_file_name(format!("{stem}-shapes.txt")),
            min_multiply_adds: multiply_adds.start,
            max_multiply_adds: multiply_adds.end,
        }));
    }

    /// The tiling `spec` takes by its shape, timing the candidates on it
    /// first where that can be done now; `None` where per-shape tuning is
    /// off, the product is too small or too large, or its shape is not tuned
    /// (yet). The caller has checked the operands against `spec`.
    pub(crate) fn shape_tiling(&self, spec: &Matmul) -> Option<MatmulTiling> {
        let shape = Shape::of(spec);
        {
            let tilings = lock(&self.shared.shape_tilings);
            let setting = tilings.setting.as_ref()?;
            if let Some(&tiling) = tilings.chosen.get(&shape) {
                return Some(tiling);
            }
            let operand = (spec.batch.saturating_mul(spec.k)).saturating_mul(spec.m.max(spec.n));
            if spec.multiply_adds() < setting.min_multiply_adds
                || spec.multiply_adds() >= setting.max_multiply_adds
                || operand > MAX_TIMED_ELEMENTS
                || tilings.failed.contains(&shape)
                || tilings.chosen.len() >= MAX_SHAPES
            {
                return None;
            }
        }
        self.tune_or_defer(vec![shape]);
        lock(&self.shared.shape_tilings).chosen.get(&shape).copied()
    }

    /// Times the shapes met while that could not be done, where it now can
    /// (called as an outermost `together` block ends).
    pub(crate) fn tune_pending_shapes(&self) {
        let pending = std::mem::take(&mut lock(&self.shared.shape_tilings).pending);
        if !pending.is_empty() {
            self.tune_or_defer(pending);
        }
    }

    /// Times `shapes` if products can be timed now without disturbing
    /// anyone, else leaves them pending. Timing holds the profiler's lock
    /// throughout: no one switches profiling on or off under it, and one
    /// thread times at a time. Where the lock is taken (another thread
    /// timing or switching the profiler) the shapes wait rather than this
    /// thread.
    fn tune_or_defer(&self, shapes: Vec<Shape>) {
        let profiler = match self.shared.profiler.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if profiler.is_none() || !self.can_time_products() {
            let mut tilings = lock(&self.shared.shape_tilings);
            for shape in shapes {
                if !tilings.pending.contains(&shape) {
                    tilings.pending.push(shape);
                }
            }
            return;
        }
        for shape in shapes {
            let done = {
                let tilings = lock(&self.shared.shape_tilings);
                tilings.chosen.contains_key(&shape) || tilings.failed.contains(&shape)
            };
            if !done {
                self.tune_shape(shape);
            }
        }
    }

    /// Times every candidate on `shape`, keeps the fastest and saves the
    /// choices. A failure is reported once and leaves the shape to its
    /// class's tiling: tuning is never worth an error. The caller holds the
    /// profiler's lock.
    fn tune_shape(&self, shape: Shape) {
        let timed = self.time_candidates(shape);
        let mut tilings = lock(&self.shared.shape_tilings);
        let timings = match timed {
            Ok(timings) if !timings.is_empty() => timings,
            failed => {
                let why = match failed {
                    Err(e) => e.to_string(),
                    Ok(_) => "every candidate failed".into(),
                };
                eprintln!(
                    "kiln: could not tune matmul for shape {} ({why}); it keeps the tuned tiling",
                    shape.name()
                );
                tilings.failed.insert(shape);
                return;
            }
        };
        let Some(&(fastest, _)) = timings.iter().min_by(|a, b| a.1.total_cmp(&b.1)) else {
            return;
        };
        tilings.chosen.insert(shape, fastest);
        tilings.timings.insert(shape, timings);
        let file = tilings.setting.as_ref().map(|s| s.file.clone());
        let text = tilings.text();
        drop(tilings);
        if let Some(file) = file {
            if let Err(e) = write_atomically(&file, &text) {
                eprintln!(
                    "kiln: could not save matmul tilings by shape to {} ({e}); the next run times them again",
                    file.display()
                );
            }
        }
    }

    /// Seconds each candidate takes on `shape` (candidates that fail are
    /// left out), the tuned class's tiling first so that it wins a tie.
    fn time_candidates(&self, shape: Shape) -> crate::Result<Vec<(MatmulTiling, f64)>> {
        let spec = shape.spec();
        let a = self.upload(&probe_data(spec.batch * spec.m * spec.k, 1))?;
        let b = self.upload(&probe_data(spec.batch * spec.k * spec.n, 2))?;
        let class = self.default_tiling(&spec);
        let mut candidates = vec![class];
        for t in Tuning::candidates(self.adapter_info(), self.features(), self.limits()) {
            if !candidates.contains(&t) {
                candidates.push(t);
            }
        }
        let mut timings = Vec::with_capacity(candidates.len());
        for tiling in candidates {
            match self.product_seconds(&a, &b, &spec, tiling) {
                Ok(seconds) => timings.push((tiling, seconds)),
                Err(e) => eprintln!("kiln: tuning shape {} left out {tiling}: {e}", shape.name()),
            }
        }
        Ok(timings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_names_read_back() {
        for (batch, m, n, k, ta, tb) in [
            (1, 4096, 4096, 4096, false, false),
            (8, 128, 384, 64, true, false),
            (3, 5, 7, 11, true, true),
        ] {
            let shape = Shape {
                batch,
                m,
                n,
                k,
                trans_a: ta,
                trans_b: tb,
            };
            assert_eq!(Shape::parse(&shape.name()), Some(shape));
        }
        assert_eq!(Shape::parse("8x128tx384x64").map(|s| s.trans_a), Some(true));
        for bad in [
            "",
            "1x2x3",
            "1x2x3x4x5",
            "ax2x3x4",
            "1x2tt x3x4",
            "1x2x3x4t",
        ] {
            assert_eq!(Shape::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn choices_files_keep_only_tilings_the_adapter_runs() {
        let keep: MatmulTiling = "shared:128x64x16:8x4:vec4".parse().unwrap();
        let other: MatmulTiling = "shared:64x64x16:4x4:vec4".parse().unwrap();
        let text = "# comment = shared:64x64x16:4x4:vec4\n\
                    1x4096x4096x4096 = shared:128x64x16:8x4:vec4\n\
                    #   shared:64x64x16:4x4:vec4: 1.000 ms\n\
                    1x512x512x512 = shared:64x64x16:4x4:vec4\n\
                    1x2x3 = shared:128x64x16:8x4:vec4\n\
                    1x8x8x8 = not a tiling\n";
        let chosen = parse_choices(text, |t| t == keep);
        assert_eq!(chosen.len(), 1);
        let shape = Shape::parse("1x4096x4096x4096").unwrap();
        assert_eq!(chosen.get(&shape), Some(&keep));
        assert_eq!(parse_choices(text, |t| t == keep || t == other).len(), 2);
    }
}
