//! The [`Device`]: one opened adapter with its buffer pool, kernel cache and the
//! command recorder that batches dispatches into few submits.
//!
//! Work is *recorded*, not executed, until a sync point: reading a buffer back,
//! [`Device::synchronize`], or the recorder filling up. At that point every recorded
//! dispatch goes into one command buffer and one submit, which is what makes small
//! kernels affordable on adapters where a submit costs tens of microseconds.

use crate::adapter::{self, DeviceSelector};
use crate::binding::{BindGroupCache, Bound, KernelLayout};
use crate::buffer::{DType, Element, GpuBuffer};
use crate::error::{DeviceError, Result};
use crate::kernel::{Kernel, KernelCache};
use crate::pool::{bucket_size, BufferPool, FirstUse, PoolStats};
use crate::profile::{KernelTime, Profile, Timed};
use crate::tuning::Tuning;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};

mod gather;

use gather::{FusedPlan, Gathering};

/// Whether the environment variable `name` is `0`: how Kiln's `KILN_*`
/// switches turn a mechanism off, to compare with and without it.
pub(crate) fn switched_off(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "0")
}

/// A setting that overrides a default chosen per adapter: `Some(true)` for
/// `1`, `Some(false)` for `0`, else `None`.
pub(crate) fn on_or_off(name: &str) -> Option<bool> {
    match std::env::var(name).as_deref() {
        Ok("1") => Some(true),
        Ok("0") => Some(false),
        _ => None,
    }
}

/// Whether training steps are submitted as they are recorded (see
/// [`Device::set_submit_blocks`]): on GPUs, where the device then runs one
/// step while the host records the next, unless `KILN_SUBMIT_BLOCKS` is `0`;
/// on CPU adapters only with `KILN_SUBMIT_BLOCKS=1`.
fn submit_blocks_by_default(info: &wgpu::AdapterInfo) -> bool {
    on_or_off("KILN_SUBMIT_BLOCKS").unwrap_or_else(|| !adapter::is_cpu(info))
}

/// Which of wgpu's runtime checks a device's kernels keep (see
/// [`Device::kernel`]). Both stay on unless a setting turns one off, to
/// measure what it costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KernelChecks {
    /// A counter in every loop (`KILN_LOOP_COUNTERS=0` leaves it out).
    pub loop_counters: bool,
    /// Clamped indices into arrays other than storage buffers
    /// (`KILN_INDEX_CLAMPS=0` leaves them out).
    pub index_clamps: bool,
}

impl KernelChecks {
    fn from_env() -> Self {
        Self {
            loop_counters: !switched_off("KILN_LOOP_COUNTERS"),
            index_clamps: !switched_off("KILN_INDEX_CLAMPS"),
        }
    }

    /// Whether every check stays, as wgpu makes kernels by default.
    pub fn all(self) -> bool {
        self.loop_counters && self.index_clamps
    }

    /// What the tuning cache's file name says of the checks left out: a
    /// kernel's timing depends on them, so each combination is tuned apart.
    pub fn cache_suffix(self) -> String {
        let mut suffix = String::new();
        if !self.loop_counters {
            suffix += "-no-loop-counters";
        }
        if !self.index_clamps {
            suffix += "-no-index-clamps";
        }
        suffix
    }
}

/// Whether a kernel's loops keep wgpu's loop counters (see
/// [`Device::kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loops {
    /// Counted, as wgpu builds every kernel (unless `KILN_LOOP_COUNTERS=0`).
    Counted,
    /// Left uncounted: every loop of the kernel runs to a bound fixed by
    /// constants or by sizes the host checked at dispatch, in steps that
    /// cannot wrap past it (sizes fit a storage binding, far below
    /// `u32::MAX`). Counters there only cost: they keep a driver from
    /// unrolling the loops, and an array indexed in a loop left rolled
    /// lives in slow local memory on GPUs.
    Bounded,
}

/// Texels per row of an operand texture (see `Device::texture_operand`):
/// 4 KiB rows, the copy alignment wgpu asks for many times over.
pub const TEXTURE_ROW_TEXELS: u32 = 256;
/// Operand textures kept for reuse (one per size, operand and thread), and
/// their bytes at most: there is no free-memory query, so caches stay
/// bounded.
const MAX_OPERAND_TEXTURES: usize = 32;
const MAX_OPERAND_TEXTURE_BYTES: u64 = 256 << 20;
/// Readback buffers kept for reuse, in bytes at most.
const MAX_STAGING_BYTES: u64 = 64 << 20;
/// An operand texture and the view kernels bind.
type OperandTexture = (wgpu::Texture, wgpu::TextureView);

/// When a product reads its operands through textures. On lavapipe a
/// storage-buffer load whose index differs per lane is a loop over the lanes
/// with a bounds check each, while a texel fetch goes through the sampler
/// code. Which costs less depends on the host: on one EPYC VM textures paid
/// only for `A` of products whose B is transposed, on a Zen 3 one they made
/// large products 20-60% faster for both operands. So beyond that first
/// case the autotuner decides, per host ([`crate::Tuning::operand_textures`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextureOperands {
    /// Large f32 products on CPU adapters with the subgroup kernel: `A` of
    /// `A x B^T`, and both operands of any where
    /// [`crate::Tuning::operand_textures`] is on.
    Auto,
    /// Both operands of every product that can (for tests).
    Always,
    /// No product does (what `KILN_TEXTURES=0` selects).
    Never,
}

impl TextureOperands {
    /// `KILN_TEXTURES=0` turns them off, to compare.
    fn from_env() -> Self {
        if switched_off("KILN_TEXTURES") {
            Self::Never
        } else {
            Self::Auto
        }
    }
}

/// Bytes of uniform parameters one batch can hold; one slot per dispatch.
const PARAM_ARENA_BYTES: u64 = 1 << 20;
/// Largest parameter block a kernel may use.
pub const MAX_PARAM_BYTES: usize = 256;
/// Uploads queued without a submit before one is forced. wgpu stages
/// `write_buffer` data until the next submit; bounding it bounds staging memory.
const UPLOAD_FLUSH_BYTES: u64 = 64 << 20;
/// Bind groups kept for reuse (see [`crate::binding`]); a BERT training step
/// binds a few hundred distinct ones.
const BIND_GROUP_CACHE_ENTRIES: usize = 4096;
/// Idle bytes the buffer pool keeps by default.
const DEFAULT_POOL_CAPACITY: u64 = 2 << 30;

/// Dispatch and submit counters; see [`Device::dispatch_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Compute dispatches recorded so far.
    pub dispatches: u64,
    /// Command buffers submitted to the queue so far.
    pub submits: u64,
    /// Bind groups built so far. A repeating step builds none once its
    /// first runs are done: its buffers come back from the pool the same.
    pub bind_groups: u64,
}

enum Command {
    Dispatch {
        pipeline: wgpu::ComputePipeline,
        bind_group: wgpu::BindGroup,
        /// Where this dispatch's parameter block sits in the arena.
        param_offset: u32,
        /// Bytes of the block passed as immediate data, if the kernel takes it so.
        immediate_bytes: Option<u32>,
        workgroups: [u32; 3],
    },
    Copy {
        src: wgpu::Buffer,
        dst: wgpu::Buffer,
        size: u64,
    },
    Clear {
        buffer: wgpu::Buffer,
        size: u64,
    },
    /// `rows` full rows of texels and then `tail` more from `src` into
    /// `texture` (see [`Device::texture_operand`]).
    CopyToTexture {
        src: wgpu::Buffer,
        texture: wgpu::Texture,
        rows: u32,
        tail: u32,
    },
}

#[derive(Default)]
struct Recorder {
    commands: Vec<Command>,
    params: Vec<u8>,
    upload_bytes: u64,
    stats: DispatchStats,
    /// Inside [`Device::together`]: launches held back to be fused.
    gathering: Option<Gathering>,
    /// The buffers of held launches while they are being recorded: a submit
    /// forced midway (the parameter arena full) must not free those whose
    /// launches are still to be recorded after it.
    emitting: Vec<wgpu::Buffer>,
}

/// State shared by a [`Device`] and every buffer it handed out.
pub struct DeviceShared {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    pool: Mutex<BufferPool>,
    staging: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
    recorder: Mutex<Recorder>,
    /// True while commands or uploads are recorded but not submitted.
    pending: AtomicBool,
    kernels: Mutex<KernelCache>,
    bind_groups: Mutex<BindGroupCache>,
    errors: Arc<Mutex<Vec<String>>>,
    param_arena: wgpu::Buffer,
    param_align: u64,
    tuning: Mutex<Tuning>,
    /// f16 products multiply in f16 (see [`Device::set_half_arithmetic`]).
    half_arithmetic: AtomicBool,
    /// Which of wgpu's runtime checks kernels keep (see [`Device::kernel`]).
    checks: KernelChecks,
    /// Whether an outermost `together` block submits what it recorded (see
    /// [`Device::set_submit_blocks`]).
    submit_blocks: AtomicBool,
    /// When matmul reads A through a texture (see [`TextureOperands`]).
    texture_operands: Mutex<TextureOperands>,
    /// Textures holding operands, by height in rows of [`TEXTURE_ROW_TEXELS`],
    /// operand and the thread that fills them (see [`Device::texture_operand`]).
    textures: Mutex<HashMap<(u32, u8, std::thread::ThreadId), OperandTexture>>,
    /// Per-kernel times while profiling is on.
    profile: Mutex<Option<Profile>>,
    /// Held while the profiler is switched on or off, and by the tuners for
    /// as long as they time products with it, so that no one switches it
    /// under them (or they under someone else). Taken before any other
    /// lock.
    pub(crate) profiler: Mutex<()>,
    /// Fused kernels by their parts' keys; `None` where the parts cannot be
    /// fused (so that is found out once).
    fusions: Mutex<HashMap<String, Option<Arc<FusedPlan>>>>,
    /// Matmul variants' kernel cache keys (see `kernels::matmul::Variant`).
    pub(crate) matmul_keys: Mutex<crate::kernels::matmul::VariantKeys>,
    /// Matmul tilings chosen by product shape (see [`crate::shape_tuning`]).
    pub(crate) shape_tilings: Mutex<crate::shape_tuning::ShapeTilings>,
}

impl DeviceShared {
    pub(crate) fn release(&self, bucket: u64, buffer: wgpu::Buffer) {
        let pending = self.pending.load(Ordering::Acquire);
        let dropped = lock(&self.pool).release(bucket, buffer, pending);
        if let Some(buffer) = dropped {
            lock(&self.bind_groups).forget(&buffer);
        }
    }
}

/// Maps `range` of `buffer` for reading, waiting for the device: the submit
/// that fills the buffer must already be made.
pub(crate) fn map_for_reading(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    range: std::ops::Range<u64>,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, range, move |r| {
        let _ = tx.send(r);
    });
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| DeviceError::Backend(e.to_string()))?;
    rx.recv()
        .map_err(|_| DeviceError::Backend("readback callback never ran".into()))?
        .map_err(|e| DeviceError::Backend(format!("mapping a readback buffer failed: {e}")))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, never a
    // half-updated invariant that matters more than the panic itself.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An opened GPU (or CPU adapter). Cheap to clone; clones share everything.
///
/// ```no_run
/// # fn main() -> Result<(), kiln_device::DeviceError> {
/// let device = kiln_device::Device::new()?;          // honours KILN_DEVICE
/// let x = device.upload(&[1.0f32, -2.0, 3.0])?;
/// let y = device.unary(kiln_device::UnaryOp::Relu, &x)?;
/// assert_eq!(device.read::<f32>(&y)?, vec![1.0, 0.0, 3.0]);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Device {
    pub(crate) shared: Arc<DeviceShared>,
}

static FALLBACK_NOTE: Once = Once::new();

impl Device {
    /// Opens the adapter chosen by `KILN_DEVICE` (default `auto`).
    pub fn new() -> Result<Self> {
        Self::with_selector(&DeviceSelector::from_env()?)
    }

    /// Opens the best adapter matching `selector`.
    pub fn with_selector(selector: &DeviceSelector) -> Result<Self> {
        let chosen = adapter::choose(selector)?;
        if let Some(note) = chosen.fallback_note {
            FALLBACK_NOTE.call_once(|| eprintln!("{note}"));
        }
        Self::from_adapter(chosen.adapter)
    }

    /// Opens a device on a specific adapter, asking for all of its limits (wgpu's
    /// defaults are far lower: 8 storage buffers per stage, 16 KiB shared memory).
    pub fn from_adapter(adapter: wgpu::Adapter) -> Result<Self> {
        let info = adapter.get_info();
        // Timestamp queries serve only `set_profiling`.
        let mut wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::IMMEDIATES
            | wgpu::Features::TIMESTAMP_QUERY;
        // KILN_IMMEDIATES=0 passes kernel parameters in a uniform buffer even
        // where immediates work, as on adapters without them (CI tests both).
        if switched_off("KILN_IMMEDIATES") {
            wanted.remove(wgpu::Features::IMMEDIATES);
        }
        let features = adapter.features() & wanted;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| DeviceError::RequestDevice {
            adapter: info.name.clone(),
            message: e.to_string(),
        })?;

        // wgpu panics on uncaptured errors by default; Kiln validates its inputs
        // first, and anything that still slips through surfaces as an error at the
        // next sync point instead of aborting the process.
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            lock(&sink).push(e.to_string());
        }));
        let sink = errors.clone();
        device.set_device_lost_callback(move |reason, message| {
            lock(&sink).push(format!("device lost ({reason:?}): {message}"));
        });

        let param_align =
            u64::from(limits.min_uniform_buffer_offset_alignment).max(MAX_PARAM_BYTES as u64);
        let param_arena = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln params"),
            size: PARAM_ARENA_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let tuning = Tuning::for_adapter(&info, features, &limits);
        let submit_blocks = submit_blocks_by_default(&info);
        let opened = Self {
            shared: Arc::new(DeviceShared {
                device,
                queue,
                info,
                limits,
                features,
                pool: Mutex::new(BufferPool::new(DEFAULT_POOL_CAPACITY)),
                staging: Mutex::new(HashMap::new()),
                recorder: Mutex::new(Recorder::default()),
                pending: AtomicBool::new(false),
                kernels: Mutex::new(KernelCache::new(1024)),
                bind_groups: Mutex::new(BindGroupCache::new(BIND_GROUP_CACHE_ENTRIES)),
                errors,
                param_arena,
                param_align,
                tuning: Mutex::new(tuning),
                half_arithmetic: AtomicBool::new(false),
                checks: KernelChecks::from_env(),
                submit_blocks: AtomicBool::new(submit_blocks),
                texture_operands: Mutex::new(TextureOperands::from_env()),
                textures: Mutex::new(HashMap::new()),
                profile: Mutex::new(None),
                profiler: Mutex::new(()),
                fusions: Mutex::new(HashMap::new()),
                matmul_keys: Mutex::new(Default::default()),
                shape_tilings: Mutex::new(Default::default()),
            }),
        };
        opened.tune_on_open();
        Ok(opened)
    }

    /// Loads or measures the matmul tiling (see [`crate::autotune`]) unless
    /// `KILN_MATMUL` fixes it or `KILN_AUTOTUNE=0` asks for the defaults. A
    /// failed measurement keeps the defaults: tuning is never worth an error.
    fn tune_on_open(&self) {
        // Fixed only where the override took: one this adapter cannot run
        // was reported and left the defaults, which are tuned as usual.
        let fixed = crate::tuning::matmul_override().is_some_and(|t| self.tuning().matmul == t);
        // A kernel class set by hand is for testing code paths: its
        // defaults, not timings of another class's kernels on this adapter.
        let off = switched_off("KILN_AUTOTUNE") || adapter::kernel_class_override().is_some();
        if fixed || off {
            return;
        }
        let defaults = self.tuning();
        // Its name fingerprints every candidate's generated code: made once.
        let tuning_file = self.tuning_cache_file();
        match self.autotune(&tuning_file) {
            Ok(_) => self.open_shape_tuning(&tuning_file),
            Err(e) => {
                eprintln!("kiln: matmul autotuning failed ({e}); using the defaults");
                self.set_tuning(defaults);
            }
        }
    }

    /// Whether products can be timed now without disturbing recorded work:
    /// no launches are being gathered into one dispatch (timing would
    /// submit them midway) and no profile is being taken (timing uses and
    /// ends the profiler).
    pub(crate) fn can_time_products(&self) -> bool {
        lock(&self.shared.recorder).gathering.is_none() && lock(&self.shared.profile).is_none()
    }

    /// Name, vendor, backend and type of the opened adapter.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.shared.info
    }

    /// Limits the device was opened with (the adapter's own, not wgpu's defaults).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.shared.limits
    }

    /// Optional features the device was opened with (e.g. `SHADER_F16`, subgroups).
    pub fn features(&self) -> wgpu::Features {
        self.shared.features
    }

    /// The subgroup size where the device has subgroups of one fixed size
    /// (lavapipe's 8 lanes), for kernels that share values by broadcasts.
    pub(crate) fn fixed_subgroup_size(&self) -> Option<u32> {
        let info = &self.shared.info;
        (self.shared.features.contains(wgpu::Features::SUBGROUP)
            && info.subgroup_min_size == info.subgroup_max_size)
            .then_some(info.subgroup_min_size)
    }

    /// True on software adapters (lavapipe, llvmpipe).
    pub fn is_cpu(&self) -> bool {
        adapter::is_cpu(&self.shared.info)
    }

    /// Whether kernels are chosen as for a CPU adapter: [`Device::is_cpu`]
    /// unless `KILN_KERNEL_CLASS` says otherwise (see
    /// [`crate::kernels_for_cpu`]).
    pub fn kernels_for_cpu(&self) -> bool {
        adapter::kernels_for_cpu(&self.shared.info)
    }

    /// Which of wgpu's runtime checks kernels keep (`KILN_LOOP_COUNTERS=0`
    /// and `KILN_INDEX_CLAMPS=0` leave them out; see [`Device::kernel`]).
    pub(crate) fn kernel_checks(&self) -> KernelChecks {
        self.shared.checks
    }

    /// The raw wgpu device and queue, for code that builds its own pipelines.
    pub fn wgpu(&self) -> (&wgpu::Device, &wgpu::Queue) {
        (&self.shared.device, &self.shared.queue)
    }

    /// Kernel tile parameters in use on this device.
    pub fn tuning(&self) -> Tuning {
        *lock(&self.shared.tuning)
    }

    /// Replaces the kernel tile parameters that later launches use (what
    /// [`Device::autotune`] sets).
    pub fn set_tuning(&self, tuning: Tuning) {
        *lock(&self.shared.tuning) = tuning;
    }

    /// Makes matrix products of two f16 operands (mixed precision's) multiply
    /// in f16 as well as read it, four-term f16 sums added up in f32 (see
    /// [`HalfLoads::NativeArithmetic`](crate::HalfLoads::NativeArithmetic)),
    /// at the cost of f16 rounding in every product. Meant for GPUs with
    /// packed half math, where the default vec4 shared-memory tiling keeps
    /// f16 tiles too (half the bytes); other tilings hand these products to
    /// register tiles. On an H200 it gained nothing: the product at N=4096
    /// ran at 21.3 TFLOP/s against 23.2 with f16 operands multiplied in f32
    /// (benches/RESULTS.md). Off by default. Fails on adapters without
    /// SHADER_F16.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), kiln_device::DeviceError> {
    /// let device = kiln_device::Device::new()?;
    /// if device.set_half_arithmetic(true).is_err() {
    ///     println!("no f16 arithmetic here; f16 products stay f32 inside");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn set_half_arithmetic(&self, on: bool) -> Result<()> {
        if on && !self.features().contains(wgpu::Features::SHADER_F16) {
            return Err(DeviceError::Shape {
                op: "set_half_arithmetic",
                message: format!(
                    "{} has no SHADER_F16; f16 operands are still read, products stay f32",
                    self.adapter_info().name
                ),
            });
        }
        self.shared.half_arithmetic.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Whether [`Device::set_half_arithmetic`] is on.
    pub fn half_arithmetic(&self) -> bool {
        self.shared.half_arithmetic.load(Ordering::Relaxed)
    }

    /// Submits (without waiting) what each outermost [`Device::together`]
    /// block recorded, when it ends; with fusion off there are no such
    /// blocks. A training loop that runs each step in one block then hands
    /// the device every step as it is recorded, so the device can run one
    /// step while the host records the next; otherwise work waits for the
    /// next read (every 50 steps in `fit`) or a full parameter arena.
    ///
    /// On by default on GPUs, off on CPU adapters (`KILN_SUBMIT_BLOCKS=1`
    /// or `0` decides instead). On an H200 a submit per step trained the
    /// MNIST MLP at 152K samples/s against 101K with a submit every 50 steps
    /// (the GPU idled while the host recorded them), the reference CNN at
    /// 57K against 32K. On lavapipe, which runs kernels on the same cores
    /// that record them, it cost the CNN about 15% and did not move the MLP
    /// or LSTM.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), kiln_device::DeviceError> {
    /// let device = kiln_device::Device::new()?;
    /// device.set_submit_blocks(true);
    /// assert!(device.submit_blocks());
    /// # Ok(()) }
    /// ```
    pub fn set_submit_blocks(&self, on: bool) {
        self.shared.submit_blocks.store(on, Ordering::Relaxed);
    }

    /// Whether [`Device::set_submit_blocks`] is on.
    pub fn submit_blocks(&self) -> bool {
        self.shared.submit_blocks.load(Ordering::Relaxed)
    }

    /// Sets when products read their A operand through a texture (see
    /// [`TextureOperands`]).
    pub fn set_texture_operands(&self, mode: TextureOperands) {
        *lock(&self.shared.texture_operands) = mode;
    }

    /// When products read their A operand through a texture (see
    /// [`Device::set_texture_operands`]).
    pub fn texture_operands(&self) -> TextureOperands {
        *lock(&self.shared.texture_operands)
    }

    /// A texture holding `buffer`'s f32 values as `rgba32float` texels,
    /// [`TEXTURE_ROW_TEXELS`] to a row, filled by a copy recorded now (so it
    /// holds them for the next dispatch that reads it). `None` when the
    /// values do not fit the adapter's largest texture. Textures are kept by
    /// size and reused: commands run in order, so a later copy into one waits
    /// for the dispatches recorded before it. Each thread fills its own: the
    /// copy and the dispatch reading it are recorded under separate locks,
    /// and another thread's copy between them would replace the values.
    /// `slot` tells the operands of one product apart (0 for A, 1 for B):
    /// two of one size would otherwise share a texture.
    pub(crate) fn texture_operand(
        &self,
        buffer: &GpuBuffer,
        slot: u8,
    ) -> Result<Option<wgpu::TextureView>> {
        self.check_same_device(buffer, "texture operand")?;
        let texels = u32::try_from(buffer.len().div_ceil(4)).unwrap_or(u32::MAX);
        let height = texels.div_ceil(TEXTURE_ROW_TEXELS).max(1);
        if buffer.dtype() != DType::F32 || height > self.shared.limits.max_texture_dimension_2d {
            return Ok(None);
        }
        let (texture, view) = {
            let mut textures = lock(&self.shared.textures);
            let bytes = |h: u32| u64::from(h) * u64::from(TEXTURE_ROW_TEXELS) * 16;
            let held: u64 = textures.keys().map(|&(h, _, _)| bytes(h)).sum();
            let key = (height, slot, std::thread::current().id());
            if !textures.contains_key(&key)
                && (textures.len() >= MAX_OPERAND_TEXTURES
                    || held + bytes(height) > MAX_OPERAND_TEXTURE_BYTES)
            {
                // Dropped textures live on until the commands using them ran;
                // cached bind groups would keep them alive for longer.
                textures.clear();
                lock(&self.shared.bind_groups).forget_textures();
            }
            textures
                .entry(key)
                .or_insert_with(|| {
                    let texture = self.shared.device.create_texture(&wgpu::TextureDescriptor {
                        label: Some("kiln operand"),
                        size: wgpu::Extent3d {
                            width: TEXTURE_ROW_TEXELS,
                            height,
                            depth_or_array_layers: 1,
                        },
                        mip_level_count: 1,
                        sample_count: 1,
                        dimension: wgpu::TextureDimension::D2,
                        format: wgpu::TextureFormat::Rgba32Float,
                        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                        view_formats: &[],
                    });
                    let view = texture.create_view(&Default::default());
                    (texture, view)
                })
                .clone()
        };
        self.record(Command::CopyToTexture {
            src: buffer.raw().clone(),
            texture,
            rows: texels / TEXTURE_ROW_TEXELS,
            tail: texels % TEXTURE_ROW_TEXELS,
        })?;
        Ok(Some(view))
    }

    /// Allocation and reuse counters of the buffer pool.
    pub fn pool_stats(&self) -> PoolStats {
        lock(&self.shared.pool).stats()
    }

    /// Caps the idle memory the pool keeps; buffers released beyond it are freed.
    pub fn set_pool_capacity(&self, bytes: u64) {
        lock(&self.shared.pool).capacity = bytes;
    }

    /// Frees every idle pooled buffer, and the operand textures and readback
    /// buffers kept for reuse.
    pub fn trim_pool(&self) {
        lock(&self.shared.pool).trim();
        // Cached bind groups hold idle buffers too; they are rebuilt on demand.
        lock(&self.shared.bind_groups).clear();
        lock(&self.shared.textures).clear();
        lock(&self.shared.staging).clear();
    }

    /// Turns per-kernel timing on (clearing earlier times) or off. While on,
    /// each dispatch is submitted alone and waited for; see [`Device::profile`].
    /// It is on for the whole device: other threads' dispatches meanwhile are
    /// timed too, and one that lands in the same submit can be counted in
    /// another kernel's time, so profile one thread's work at a time.
    pub fn set_profiling(&self, on: bool) -> Result<()> {
        // Waits out any tuning, which times products with the profiler.
        let _switching = lock(&self.shared.profiler);
        self.switch_profiling(on)
    }

    /// [`Device::set_profiling`] for a caller that holds the profiler's
    /// lock (the tuners, timing products).
    pub(crate) fn switch_profiling(&self, on: bool) -> Result<()> {
        self.synchronize()?;
        *lock(&self.shared.profile) =
            on.then(|| Profile::new(&self.shared.device, &self.shared.queue));
        Ok(())
    }

    /// Time per kernel and launch size since profiling was turned on, most
    /// first; empty when it is off.
    pub fn profile(&self) -> Vec<KernelTime> {
        lock(&self.shared.profile)
            .as_ref()
            .map(Profile::report)
            .unwrap_or_default()
    }

    /// Dispatch, submit and bind-group counters since the device was opened.
    pub fn dispatch_stats(&self) -> DispatchStats {
        let stats = lock(&self.shared.recorder).stats;
        DispatchStats {
            bind_groups: lock(&self.shared.bind_groups).created(),
            ..stats
        }
    }

    /// Number of compiled kernels held.
    pub fn cached_kernels(&self) -> usize {
        lock(&self.shared.kernels).len()
    }

    // ----- buffers -------------------------------------------------------------

    /// Largest buffer, in bytes, a kernel can bind.
    pub fn max_buffer_bytes(&self) -> u64 {
        self.shared
            .limits
            .max_storage_buffer_binding_size
            .min(self.shared.limits.max_buffer_size)
    }

    /// [`Device::max_buffer_bytes`] in whole vec4s, the most a pooled or
    /// readback buffer takes: kernels read and write a buffer's last vec4
    /// whole.
    fn max_buffer_whole_vec4s(&self) -> u64 {
        self.max_buffer_bytes() / 16 * 16
    }

    /// Whether a buffer of `len` elements of `dtype` fits the adapter's
    /// limit; an error that says so if not. Callers that build the contents
    /// on the host first check here, before allocating host memory.
    pub fn check_buffer_len(&self, len: usize, dtype: DType) -> Result<()> {
        self.fitting_bytes(len, dtype).map(|_| ())
    }

    /// The bytes of a buffer of `len` elements of `dtype` (rounded up to
    /// whole words) and the adapter's limit, or the error if they exceed it.
    fn fitting_bytes(&self, len: usize, dtype: DType) -> Result<(u64, u64)> {
        let bytes = (len as u64)
            .saturating_mul(dtype.size_bytes() as u64)
            .checked_next_multiple_of(4)
            .unwrap_or(u64::MAX);
        let limit = self.max_buffer_whole_vec4s();
        if bytes > limit {
            return Err(DeviceError::BufferTooLarge {
                what: format!("{len} x {dtype:?}"),
                requested: bytes,
                limit,
            });
        }
        Ok((bytes, limit))
    }

    fn allocate(&self, len: usize, dtype: DType, first_use: FirstUse) -> Result<GpuBuffer> {
        let (bytes, limit) = self.fitting_bytes(len, dtype)?;
        let bucket = bucket_size(bytes).min(limit);
        let taken = {
            let rec = lock(&self.shared.recorder);
            lock(&self.shared.pool).take(bucket, first_use, |b| rec.holds(b))
        };
        if let Some(raw) = taken {
            return Ok(GpuBuffer::new(raw, bucket, len, dtype, self.shared.clone()));
        }
        let scope = self
            .shared
            .device
            .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let raw = self.shared.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln tensor"),
            size: bucket,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if pollster::block_on(scope.pop()).is_some() {
            return Err(DeviceError::OutOfMemory { bytes: bucket });
        }
        lock(&self.shared.pool).note_allocation(bucket);
        Ok(GpuBuffer::new(raw, bucket, len, dtype, self.shared.clone()))
    }

    /// An uninitialised buffer for `len` elements, to be written by a kernel.
    pub fn empty(&self, len: usize, dtype: DType) -> Result<GpuBuffer> {
        self.allocate(len, dtype, FirstUse::Gpu)
    }

    /// A buffer of `len` zeros.
    pub fn zeros(&self, len: usize, dtype: DType) -> Result<GpuBuffer> {
        let buffer = self.allocate(len, dtype, FirstUse::Gpu)?;
        let size = buffer.raw().size();
        self.record(Command::Clear {
            buffer: buffer.raw().clone(),
            size,
        })?;
        Ok(buffer)
    }

    /// Copies host data into a new device buffer.
    pub fn upload<T: Element>(&self, data: &[T]) -> Result<GpuBuffer> {
        let buffer = self.allocate(data.len(), T::DTYPE, FirstUse::Upload)?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let aligned = bytes.len() / 4 * 4;
        let queue = &self.shared.queue;
        queue.write_buffer(buffer.raw(), 0, &bytes[..aligned]);
        if aligned < bytes.len() {
            // write_buffer wants multiples of 4 bytes: pad the odd f16 tail.
            let mut tail = [0u8; 4];
            tail[..bytes.len() - aligned].copy_from_slice(&bytes[aligned..]);
            queue.write_buffer(buffer.raw(), aligned as u64, &tail);
        }
        self.shared.pending.store(true, Ordering::Release);
        let mut rec = lock(&self.shared.recorder);
        rec.upload_bytes += bytes.len() as u64;
        if rec.upload_bytes >= UPLOAD_FLUSH_BYTES {
            self.submit(&mut rec)?;
        }
        Ok(buffer)
    }

    /// Converts f32 data to half precision and uploads it.
    pub fn upload_f16(&self, data: &[f32]) -> Result<GpuBuffer> {
        let halves: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
        self.upload(&halves)
    }

    /// Reads a buffer back to the host, waiting for all recorded work.
    pub fn read<T: Element>(&self, buffer: &GpuBuffer) -> Result<Vec<T>> {
        if buffer.dtype() != T::DTYPE {
            return Err(DeviceError::DType {
                actual: buffer.dtype(),
                requested: T::DTYPE,
            });
        }
        self.check_same_device(buffer, "read")?;
        let bytes = buffer.size_bytes().next_multiple_of(4);
        if bytes == 0 {
            return Ok(Vec::new());
        }
        // Capped like the buffers it reads: a bucket of 2^31 bytes for a
        // tensor of 1.75 GiB would pass a limit of 2^31 - 1.
        let bucket = bucket_size(bytes)
            .min(self.max_buffer_whole_vec4s())
            .max(bytes);
        let pooled = lock(&self.shared.staging)
            .get_mut(&bucket)
            .and_then(Vec::pop);
        let staging = match pooled {
            Some(staging) => staging,
            None => {
                let scope = self
                    .shared
                    .device
                    .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let staging = self.shared.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("kiln readback"),
                    size: bucket,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                if pollster::block_on(scope.pop()).is_some() {
                    return Err(DeviceError::OutOfMemory { bytes: bucket });
                }
                staging
            }
        };
        self.record(Command::Copy {
            src: buffer.raw().clone(),
            dst: staging.clone(),
            size: bytes,
        })?;
        self.flush()?;

        map_for_reading(&self.shared.device, &staging, 0..bytes)?;
        let out = {
            let view = staging
                .get_mapped_range(0..bytes)
                .map_err(|e| DeviceError::Backend(e.to_string()))?;
            let all: &[T] = bytemuck::cast_slice(&view);
            all[..buffer.len()].to_vec()
        };
        staging.unmap();
        let mut pool = lock(&self.shared.staging);
        let kept: u64 = pool.iter().map(|(b, l)| b * l.len() as u64).sum();
        let list = pool.entry(bucket).or_default();
        // A few per size, for reads repeated every few steps; a large
        // tensor's read once (a checkpoint's) is not kept.
        if list.len() < 4 && kept + bucket <= MAX_STAGING_BYTES {
            list.push(staging);
        }
        drop(pool);
        self.take_errors()?;
        Ok(out)
    }

    /// Reads an f16 buffer back as f32.
    pub fn read_f16_as_f32(&self, buffer: &GpuBuffer) -> Result<Vec<f32>> {
        Ok(self
            .read::<half::f16>(buffer)?
            .into_iter()
            .map(f32::from)
            .collect())
    }

    /// Copies `src` into a new buffer on the device.
    pub fn copy(&self, src: &GpuBuffer) -> Result<GpuBuffer> {
        let dst = self.allocate(src.len(), src.dtype(), FirstUse::Gpu)?;
        self.copy_into(src, &dst)?;
        Ok(dst)
    }

    /// Copies `src` over `dst` (same element type and length), in recorded order.
    pub fn copy_into(&self, src: &GpuBuffer, dst: &GpuBuffer) -> Result<()> {
        self.check_same_device(src, "copy_into")?;
        self.check_same_device(dst, "copy_into")?;
        if src.len() != dst.len() || src.dtype() != dst.dtype() {
            return Err(DeviceError::Shape {
                op: "copy_into",
                message: format!("cannot copy {src:?} into {dst:?}"),
            });
        }
        let size = src.size_bytes().next_multiple_of(4);
        // A buffer over itself is left as it is (wgpu refuses such a copy).
        if size > 0 && src.raw() != dst.raw() {
            self.record(Command::Copy {
                src: src.raw().clone(),
                dst: dst.raw().clone(),
                size,
            })?;
        }
        Ok(())
    }

    // ----- kernels -------------------------------------------------------------

    /// Returns the compiled kernel for `key`, building it from `source()` the first
    /// time. Compilation errors come back as [`DeviceError::Shader`].
    ///
    /// wgpu adds two kinds of runtime checks to every kernel, which settings
    /// can leave out to measure what they cost:
    /// - a counter in every loop, so that a loop that never ends cannot be
    ///   assumed away by the driver's compiler; reports on wgpu's tracker
    ///   name shaders it made many times slower. `KILN_LOOP_COUNTERS=0`
    ///   leaves the counters out; the kernel must then have no endless loop.
    ///   On lavapipe it made no difference beyond noise (matmul at N=1024,
    ///   alternating). The matrix products for GPUs never have them (see
    ///   `Loops::Bounded`).
    /// - naga's bounds checks: on Vulkan a clamp of every index into an
    ///   array that is not a storage buffer (shared-memory tiles, arrays in
    ///   registers) to the array's last element, and of storage-buffer
    ///   indices too where the driver lacks `robustBufferAccess2` (NVIDIA's
    ///   has it); on Metal and DX12 the storage buffers' checks as well.
    ///   `KILN_INDEX_CLAMPS=0` leaves all of them out: an index past its
    ///   array is then undefined behaviour on the device, not a clamped read.
    ///   It is a setting for measuring, off unless asked for.
    pub fn kernel(&self, key: &str, source: impl FnOnce() -> String) -> Result<Arc<Kernel>> {
        self.kernel_with_loops(key, Loops::Counted, source)
    }

    /// [`Device::kernel`] with its loops' counters as `loops` says:
    /// [`Loops::Bounded`] leaves them out whatever the settings say.
    pub(crate) fn kernel_with_loops(
        &self,
        key: &str,
        loops: Loops,
        source: impl FnOnce() -> String,
    ) -> Result<Arc<Kernel>> {
        if let Some(k) = lock(&self.shared.kernels).get(key) {
            return Ok(k);
        }
        let device = &self.shared.device;
        let shader_error = |message: String| DeviceError::Shader {
            key: key.to_string(),
            message,
        };
        let max_immediate_bytes = if self.shared.features.contains(wgpu::Features::IMMEDIATES) {
            self.shared.limits.max_immediate_size
        } else {
            0
        };
        let original: Arc<str> = source().into();
        let KernelLayout {
            source,
            entries,
            immediate_bytes,
            writable,
            param_bytes,
            resources,
        } = KernelLayout::read(original.to_string(), max_immediate_bytes).map_err(shader_error)?;
        // Validation catches naga's and wgpu's checks; a backend compiler
        // refusing the translated shader (GL, Metal, DX12 link errors) or the
        // driver running out of memory report as internal and out-of-memory
        // errors. All three make this an error here, so that callers (the
        // fused kernels' fallback to running launches apart) see it, rather
        // than an invalid pipeline failing every later submit.
        let scopes = [
            wgpu::ErrorFilter::Internal,
            wgpu::ErrorFilter::OutOfMemory,
            wgpu::ErrorFilter::Validation,
        ]
        .map(|filter| device.push_error_scope(filter));
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(key),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(key),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: immediate_bytes.unwrap_or(0),
        });
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(key),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        let checks = KernelChecks {
            loop_counters: self.shared.checks.loop_counters && loops == Loops::Counted,
            ..self.shared.checks
        };
        let module = match checks.all() {
            true => device.create_shader_module(desc),
            // SAFETY: loop counters are left out only of kernels whose
            // callers vouch that every loop ends (`Loops::Bounded`), and
            // otherwise only the checks a setting (KILN_LOOP_COUNTERS=0,
            // KILN_INDEX_CLAMPS=0) asked to leave out, to measure their
            // cost. Kiln's kernels bound every loop by sizes fixed at
            // dispatch and keep every index inside its array: the kernel
            // tests pass with both checks off, the GPU kernel class's too,
            // on lavapipe. A kernel that breaks either is undefined
            // behaviour without its check (a hang, or a read or write
            // outside its array), which is why the settings are off by
            // default.
            false => unsafe {
                device.create_shader_module_trusted(
                    desc,
                    wgpu::ShaderRuntimeChecks {
                        force_loop_bounding: checks.loop_counters,
                        bounds_checks: checks.index_clamps,
                        ..wgpu::ShaderRuntimeChecks::checked()
                    },
                )
            },
        };
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[],
                // Kiln kernels initialise the shared memory they read.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        // Popped innermost first, each scope before the one it was pushed in.
        let errors: Vec<wgpu::Error> = scopes
            .into_iter()
            .rev()
            .filter_map(|scope| pollster::block_on(scope.pop()))
            .collect();
        if let Some(err) = errors.first() {
            return Err(shader_error(err.to_string()));
        }
        let kernel = Arc::new(Kernel {
            pipeline,
            layout,
            immediate_bytes,
            key: key.to_string(),
            source: original,
            writable: writable.into(),
            param_bytes,
            resources,
        });
        lock(&self.shared.kernels).insert(kernel.clone());
        Ok(kernel)
    }

    pub(crate) fn check_same_device(&self, buffer: &GpuBuffer, op: &'static str) -> Result<()> {
        if buffer.same_device(&self.shared) {
            Ok(())
        } else {
            Err(DeviceError::Shape {
                op,
                message: "buffer belongs to another device".into(),
            })
        }
    }

    /// Records one dispatch of `kernel` with a parameter block (binding 0) and
    /// storage buffers (bindings 1..). Nothing runs until the next sync point.
    pub fn dispatch(
        &self,
        kernel: &Kernel,
        params: &[u8],
        buffers: &[&GpuBuffer],
        workgroups: [u32; 3],
    ) -> Result<()> {
        if workgroups.contains(&0) {
            return Ok(());
        }
        if params.len() > MAX_PARAM_BYTES {
            return Err(DeviceError::Shape {
                op: "dispatch",
                message: format!(
                    "{}: {} bytes of parameters exceed the {MAX_PARAM_BYTES} a kernel may take",
                    kernel.key,
                    params.len()
                ),
            });
        }
        for b in buffers {
            self.check_same_device(b, "dispatch")?;
        }
        let bound: Vec<Bound> = buffers.iter().map(|b| Bound::Buffer(b.raw())).collect();
        self.dispatch_bound(kernel, params, &bound, workgroups)
    }

    /// [`Device::dispatch`] of checked resources, textures among them.
    pub(crate) fn dispatch_bound(
        &self,
        kernel: &Kernel,
        params: &[u8],
        resources: &[Bound],
        workgroups: [u32; 3],
    ) -> Result<()> {
        if workgroups.contains(&0) {
            return Ok(());
        }
        // Checked here, where every launch passes (kernels with grids of
        // their own too), so that wgpu never sees an oversized grid.
        let max = self.shared.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) {
            return Err(DeviceError::Shape {
                op: "dispatch",
                message: format!(
                    "{}: {workgroups:?} workgroups exceed the adapter's {max} per dimension; \
                     use a smaller batch",
                    kernel.key
                ),
            });
        }
        // Checked before anything is recorded: wgpu would fail the whole
        // submit (every thread's work in it) over a bind group of the wrong
        // size, and a fused block copies each part's parameters into a slot
        // of its declared size.
        let param_bytes = kernel.param_bytes.unwrap_or(0);
        if params.len() > param_bytes as usize {
            return Err(DeviceError::Shape {
                op: "dispatch",
                message: format!(
                    "{}: {} bytes of parameters for a {param_bytes}-byte block",
                    kernel.key,
                    params.len()
                ),
            });
        }
        if resources.len() != kernel.resources as usize {
            return Err(DeviceError::Shape {
                op: "dispatch",
                message: format!(
                    "{}: {} buffers given, the kernel binds {}",
                    kernel.key,
                    resources.len(),
                    kernel.resources
                ),
            });
        }
        let profiling = lock(&self.shared.profile).is_some();
        if profiling {
            // Earlier work must not count towards this kernel.
            self.synchronize()?;
        }
        let mut rec = lock(&self.shared.recorder);
        if self.hold(&mut rec, kernel, params, resources, workgroups)? {
            return Ok(());
        }
        self.record_dispatch(&mut rec, kernel, params, resources, workgroups)?;
        drop(rec);
        if profiling {
            let start = std::time::Instant::now();
            self.synchronize()?;
            let wall = start.elapsed().as_secs_f64();
            if let Some(profile) = lock(&self.shared.profile).as_mut() {
                let stamped = match profile.stamps.as_mut() {
                    Some(stamps) => stamps.read(&self.shared.device)?,
                    None => None,
                };
                let timed = stamped.map_or(Timed::Host(wall), Timed::Device);
                profile.add(&kernel.key, workgroups, timed);
            }
        }
        Ok(())
    }

    /// Appends one dispatch to the recorder.
    fn record_dispatch(
        &self,
        rec: &mut Recorder,
        kernel: &Kernel,
        params: &[u8],
        resources: &[Bound],
        workgroups: [u32; 3],
    ) -> Result<()> {
        if rec.params.len() as u64 + self.shared.param_align > PARAM_ARENA_BYTES {
            self.submit(rec)?;
        }
        let offset = rec.params.len() as u64;
        rec.params.extend_from_slice(params);
        rec.params
            .resize((offset + self.shared.param_align) as usize, 0);
        let arena = match kernel.immediate_bytes {
            None => Some((&self.shared.param_arena, MAX_PARAM_BYTES as u64)),
            Some(_) => None,
        };
        let bind_group = lock(&self.shared.bind_groups).get_or_create(
            &self.shared.device,
            &kernel.layout,
            arena,
            resources,
        );
        rec.commands.push(Command::Dispatch {
            pipeline: kernel.pipeline.clone(),
            bind_group,
            param_offset: offset as u32,
            immediate_bytes: kernel.immediate_bytes,
            workgroups,
        });
        rec.stats.dispatches += 1;
        self.shared.pending.store(true, Ordering::Release);
        Ok(())
    }

    fn record(&self, command: Command) -> Result<()> {
        let mut rec = lock(&self.shared.recorder);
        self.emit_gathered(&mut rec)?;
        rec.commands.push(command);
        self.shared.pending.store(true, Ordering::Release);
        Ok(())
    }

    /// Submits everything recorded so far in one command buffer. Does not wait.
    pub fn flush(&self) -> Result<()> {
        let mut rec = lock(&self.shared.recorder);
        self.submit(&mut rec)?;
        // Taken before another thread can submit: wgpu reports a failed
        // submit's errors as it submits, and they belong to this caller,
        // whose work (a read, say) did not run.
        let errors = self.take_errors();
        drop(rec);
        errors
    }

    /// Submits recorded work and waits until the device has finished it.
    pub fn synchronize(&self) -> Result<()> {
        self.flush()?;
        self.shared
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| DeviceError::Backend(e.to_string()))?;
        self.take_errors()
    }

    fn submit(&self, rec: &mut Recorder) -> Result<()> {
        self.emit_gathered(rec)?;
        if rec.commands.is_empty() && rec.upload_bytes == 0 {
            return Ok(());
        }
        let shared = &self.shared;
        if !rec.params.is_empty() {
            shared
                .queue
                .write_buffer(&shared.param_arena, 0, &rec.params);
        }
        let mut encoder = shared
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("kiln"),
            });
        let commands = std::mem::take(&mut rec.commands);
        // While profiling, a submit holding one dispatch is timed by the
        // device's clock around its pass.
        let mut profile = lock(&shared.profile);
        let stamps = profile
            .as_mut()
            .and_then(|p| p.stamps.as_mut())
            .filter(|_| {
                let dispatches = commands
                    .iter()
                    .filter(|c| matches!(c, Command::Dispatch { .. }));
                dispatches.count() == 1
            });
        let mut i = 0;
        while i < commands.len() {
            match &commands[i] {
                Command::Dispatch { .. } => {
                    // Consecutive dispatches share one compute pass.
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: None,
                        timestamp_writes: stamps.as_ref().map(|s| s.pass_writes()),
                    });
                    while let Some(Command::Dispatch {
                        pipeline,
                        bind_group,
                        param_offset,
                        immediate_bytes,
                        workgroups: [x, y, z],
                    }) = commands.get(i)
                    {
                        pass.set_pipeline(pipeline);
                        match immediate_bytes {
                            // The block was zero-padded to the arena's slot size.
                            Some(bytes) => {
                                let start = *param_offset as usize;
                                pass.set_bind_group(0, bind_group, &[]);
                                pass.set_immediates(0, &rec.params[start..start + *bytes as usize]);
                            }
                            None => pass.set_bind_group(0, bind_group, &[*param_offset]),
                        }
                        pass.dispatch_workgroups(*x, *y, *z);
                        i += 1;
                    }
                }
                Command::Copy { src, dst, size } => {
                    encoder.copy_buffer_to_buffer(src, 0, dst, 0, *size);
                    i += 1;
                }
                Command::Clear { buffer, size } => {
                    encoder.clear_buffer(buffer, 0, Some(*size));
                    i += 1;
                }
                Command::CopyToTexture {
                    src,
                    texture,
                    rows,
                    tail,
                } => {
                    let row_bytes = TEXTURE_ROW_TEXELS * 16;
                    // Full rows, then the last row's first `tail` texels.
                    for (first_row, height, width) in
                        [(0, *rows, TEXTURE_ROW_TEXELS), (*rows, 1, *tail)]
                    {
                        if height == 0 || width == 0 {
                            continue;
                        }
                        encoder.copy_buffer_to_texture(
                            wgpu::TexelCopyBufferInfo {
                                buffer: src,
                                layout: wgpu::TexelCopyBufferLayout {
                                    offset: u64::from(first_row) * u64::from(row_bytes),
                                    bytes_per_row: Some(row_bytes),
                                    rows_per_image: None,
                                },
                            },
                            wgpu::TexelCopyTextureInfo {
                                texture,
                                mip_level: 0,
                                origin: wgpu::Origin3d {
                                    x: 0,
                                    y: first_row,
                                    z: 0,
                                },
                                aspect: wgpu::TextureAspect::All,
                            },
                            wgpu::Extent3d {
                                width,
                                height,
                                depth_or_array_layers: 1,
                            },
                        );
                    }
                    i += 1;
                }
            }
        }
        if let Some(stamps) = stamps {
            stamps.resolve(&mut encoder);
        }
        // The lock is held until the submit is queued: a thread reading the
        // last timestamps maps their buffer under it, and a submit that
        // copies into the buffer while it is mapped fails validation.
        shared.queue.submit([encoder.finish()]);
        drop(profile);
        rec.params.clear();
        rec.upload_bytes = 0;
        rec.stats.submits += 1;
        // A submit made while held launches are being recorded (the
        // parameter arena filled up) leaves some of them still to record;
        // a buffer one of them reads, released meanwhile by another thread,
        // must not go to an upload, which would run before that launch.
        shared
            .pending
            .store(!rec.emitting.is_empty(), Ordering::Release);
        lock(&shared.pool).on_submit(|b| rec.emitting.contains(b));
        Ok(())
    }

    fn take_errors(&self) -> Result<()> {
        let mut errors = lock(&self.shared.errors);
        if errors.is_empty() {
            Ok(())
        } else {
            let msg = errors.join("; ");
            errors.clear();
            Err(DeviceError::Backend(msg))
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let info = &self.shared.info;
        write!(f, "Device({} / {:?})", info.name, info.backend)
    }
}
