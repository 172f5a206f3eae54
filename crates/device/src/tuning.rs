//! Kernel tile parameters per adapter.
//!
//! CPU adapters (lavapipe, llvmpipe) run each invocation as one SIMD lane and
//! scalarise per-lane loads, so shared-memory staging only adds copies there: big
//! register tiles per invocation win. Real GPUs want the opposite: a workgroup
//! stages tiles in shared memory and each invocation computes a small block.

use std::fmt;
use std::str::FromStr;

/// How the matmul kernel tiles its work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulTiling {
    /// Each invocation computes a `tm x tn` block straight from global memory, in a
    /// `wg_x x wg_y` workgroup. No shared memory.
    Register {
        /// Rows of C per invocation.
        tm: u32,
        /// Columns of C per invocation.
        tn: u32,
        /// Workgroup width, in invocations along the columns.
        wg_x: u32,
        /// Workgroup height, in invocations along the rows.
        wg_y: u32,
    },
    /// For CPU adapters with a fixed subgroup size `sg`: the lanes of a subgroup
    /// share `4 * sg` columns of B through broadcasts, each lane computing `tm`
    /// rows; `wg` lanes per workgroup. Shapes it cannot take (k not a multiple of
    /// 4, ...) run on [`MatmulTiling::SUBGROUP_FALLBACK`].
    Subgroup {
        /// Rows of C per lane.
        tm: u32,
        /// The adapter's subgroup size.
        sg: u32,
        /// Lanes per workgroup.
        wg: u32,
    },
    /// A workgroup stages `bm x bk` and `bk x bn` tiles in shared memory; each of its
    /// `(bm/tm) x (bn/tn)` invocations computes a `tm x tn` block. With `vec4`
    /// (`tm`, `tn` and `bk` multiples of 4) tiles are loaded and read four
    /// elements at a time where the shape allows (as for the register
    /// kernel's vec4 loads), element by element elsewhere. With `pipelined`
    /// (vec4 only) the tiles are double-buffered: each invocation fetches its
    /// share of the next k tile into registers before multiplying the current
    /// one, so global-memory latency overlaps arithmetic, at twice the shared
    /// memory and one barrier per tile instead of two.
    Shared {
        /// Rows of C per workgroup.
        bm: u32,
        /// Columns of C per workgroup.
        bn: u32,
        /// Depth (along `k`) of the tiles staged per step.
        bk: u32,
        /// Rows of C per invocation.
        tm: u32,
        /// Columns of C per invocation.
        tn: u32,
        /// Tiles are loaded and read four elements at a time where the shape allows.
        vec4: bool,
        /// Tiles are double-buffered (vec4 only).
        pipelined: bool,
    },
}

impl MatmulTiling {
    /// Whether its kernel can read operands through textures (on CPU
    /// adapters, with vec4 loads; see [`crate::TextureOperands`]).
    pub(crate) fn has_texture_path(self) -> bool {
        matches!(self, MatmulTiling::Subgroup { .. })
    }

    /// What a [`MatmulTiling::Subgroup`] tiling runs on for shapes it cannot take.
    pub const SUBGROUP_FALLBACK: MatmulTiling = MatmulTiling::Register {
        tm: 16,
        tn: 16,
        wg_x: 8,
        wg_y: 4,
    };

    /// Rows and columns of C one workgroup covers.
    pub fn block(&self) -> (u32, u32) {
        match *self {
            MatmulTiling::Register { tm, tn, wg_x, wg_y } => (tm * wg_y, tn * wg_x),
            MatmulTiling::Subgroup { tm, sg, wg } => (tm * wg, 4 * sg),
            MatmulTiling::Shared { bm, bn, .. } => (bm, bn),
        }
    }

    /// Invocations per workgroup.
    pub fn threads(&self) -> u32 {
        match *self {
            MatmulTiling::Register { wg_x, wg_y, .. } => wg_x * wg_y,
            MatmulTiling::Subgroup { wg, .. } => wg,
            MatmulTiling::Shared { bm, bn, tm, tn, .. } => (bm / tm) * (bn / tn),
        }
    }

    /// Bytes of workgroup memory a [`MatmulTiling::Shared`] kernel stages its
    /// f32 tiles in (both buffers when pipelined), the most it needs: f16
    /// arithmetic's tiles take half, and a vec4 tile pads its rows by four
    /// elements only when it is stored transposed. 0 for the other tilings.
    pub fn shared_memory_bytes(&self) -> u32 {
        match *self {
            MatmulTiling::Shared {
                bm,
                bn,
                bk,
                vec4,
                pipelined,
                ..
            } => {
                let padding = if vec4 { 8 } else { 0 };
                4 * bk * (bm + bn + padding) * if pipelined { 2 } else { 1 }
            }
            _ => 0,
        }
    }

    /// A register tiling shrunk to a small `m x n` product, for CPU adapters.
    ///
    /// A CPU adapter runs eight or so lanes of a workgroup as one SIMD vector
    /// and a workgroup on one core, and every lane pays for its whole tile
    /// even where it lies past the product's edge. A big tile on a small
    /// product (16x16 on a layer's 32x10 output) thus leaves one core doing
    /// eight times the useful work while the others idle. The tile halves,
    /// larger side first and not below 4x4 (which keeps vec4 loads), until
    /// the product has `lanes_wanted` tiles (one vector per core), then the
    /// workgroup shrinks to the tiles there are. Other tilings are returned
    /// unchanged.
    pub fn fitted(self, m: usize, n: usize, lanes_wanted: usize) -> MatmulTiling {
        let MatmulTiling::Register {
            mut tm,
            mut tn,
            wg_x,
            wg_y,
        } = self
        else {
            return self;
        };
        let tiles = |tm: u32, tn: u32| m.div_ceil(tm as usize) * n.div_ceil(tn as usize);
        while tiles(tm, tn) < lanes_wanted && tm.max(tn) > 4 {
            if tm >= tn {
                tm = (tm / 2).max(1);
            } else {
                tn = (tn / 2).max(1);
            }
        }
        // Powers of two, so that workgroups of different products nest when
        // they are fused (see `fusion`).
        let lanes_y = (m.div_ceil(tm as usize).max(1) as u32).next_power_of_two();
        let lanes_x = (n.div_ceil(tn as usize).max(1) as u32).next_power_of_two();
        MatmulTiling::Register {
            tm,
            tn,
            wg_x: wg_x.min(lanes_x),
            wg_y: wg_y.min(lanes_y),
        }
    }

    /// Checks the parameters against each other and the adapter.
    pub fn validate(
        &self,
        limits: &wgpu::Limits,
        features: wgpu::Features,
        info: &wgpu::AdapterInfo,
    ) -> Result<(), String> {
        if let MatmulTiling::Subgroup { tm, sg, wg } = *self {
            if !features.contains(wgpu::Features::SUBGROUP) {
                return Err(format!("{self}: the adapter has no subgroup operations"));
            }
            if info.subgroup_min_size != sg || info.subgroup_max_size != sg {
                return Err(format!(
                    "{self}: needs subgroups of exactly {sg} lanes, the adapter has {}..{}",
                    info.subgroup_min_size, info.subgroup_max_size
                ));
            }
            if wg % sg != 0 || tm == 0 {
                return Err(format!("{self}: wg must be a multiple of sg, tm positive"));
            }
        }
        if let MatmulTiling::Shared {
            bm,
            bn,
            bk,
            tm,
            tn,
            vec4,
            pipelined,
        } = *self
        {
            if bm % tm != 0 || bn % tn != 0 {
                return Err(format!("{self}: bm/bn must be multiples of tm/tn"));
            }
            if vec4 && (tm % 4 != 0 || tn % 4 != 0 || bk % 4 != 0) {
                return Err(format!(
                    "{self}: vec4 tiles need tm, tn and bk multiples of 4"
                ));
            }
            if pipelined && !vec4 {
                return Err(format!("{self}: pipelined tiles are vec4 only"));
            }
            let shared_bytes = self.shared_memory_bytes();
            if shared_bytes > limits.max_compute_workgroup_storage_size {
                return Err(format!(
                    "{self}: needs {shared_bytes} bytes of shared memory, adapter has {}",
                    limits.max_compute_workgroup_storage_size
                ));
            }
        }
        let outputs = match *self {
            MatmulTiling::Register { tm, tn, .. } | MatmulTiling::Shared { tm, tn, .. } => tm * tn,
            // Each lane keeps tm rows of the 4 * sg columns its subgroup
            // shares.
            MatmulTiling::Subgroup { tm, sg, .. } => tm * 4 * sg,
        };
        // Each output is an unrolled accumulator: past this, kernels take
        // minutes to compile and spill everything.
        if outputs > MAX_TILE_OUTPUTS {
            return Err(format!(
                "{self}: {outputs} outputs per invocation; at most {MAX_TILE_OUTPUTS}"
            ));
        }
        let (wg_x, wg_y) = match *self {
            MatmulTiling::Register { wg_x, wg_y, .. } => (wg_x, wg_y),
            MatmulTiling::Subgroup { wg, .. } => (wg, 1),
            MatmulTiling::Shared { bm, bn, tm, tn, .. } => (bn / tn, bm / tm),
        };
        if wg_x > limits.max_compute_workgroup_size_x || wg_y > limits.max_compute_workgroup_size_y
        {
            return Err(format!(
                "{self}: a {wg_x}x{wg_y} workgroup; the adapter allows {}x{}",
                limits.max_compute_workgroup_size_x, limits.max_compute_workgroup_size_y
            ));
        }
        let threads = self.threads();
        if threads == 0 || threads > limits.max_compute_invocations_per_workgroup {
            return Err(format!(
                "{self}: {threads} invocations per workgroup, adapter allows {}",
                limits.max_compute_invocations_per_workgroup
            ));
        }
        Ok(())
    }
}

/// Most outputs one invocation of a matmul kernel may compute.
pub const MAX_TILE_OUTPUTS: u32 = 256;

/// Largest number a tiling written as text may hold.
const MAX_TILING_PARAMETER: u32 = 4096;

impl fmt::Display for MatmulTiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MatmulTiling::Register { tm, tn, wg_x, wg_y } => {
                write!(f, "register:{tm}x{tn}:{wg_x}x{wg_y}")
            }
            MatmulTiling::Subgroup { tm, sg, wg } => write!(f, "subgroup:{tm}:{sg}:{wg}"),
            MatmulTiling::Shared {
                bm,
                bn,
                bk,
                tm,
                tn,
                vec4,
                pipelined,
            } => {
                write!(f, "shared:{bm}x{bn}x{bk}:{tm}x{tn}")?;
                if *vec4 {
                    write!(f, ":vec4")?;
                }
                if *pipelined {
                    write!(f, ":pipelined")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for MatmulTiling {
    type Err = String;

    /// Parses the [`Display`](fmt::Display) form, e.g. `register:8x16:8x8` or
    /// `shared:64x64x16:4x4:vec4`.
    fn from_str(s: &str) -> Result<Self, String> {
        let nums = |part: &str, n: usize| -> Result<Vec<u32>, String> {
            let v: Vec<u32> = part
                .split('x')
                .map(|x| x.trim().parse::<u32>().map_err(|e| format!("{s:?}: {e}")))
                .collect::<Result<_, _>>()?;
            // Capped, so that products of them (accumulators, shared
            // memory, threads) cannot overflow when validated.
            if v.len() == n && v.iter().all(|&x| (1..=MAX_TILING_PARAMETER).contains(&x)) {
                Ok(v)
            } else {
                Err(format!(
                    "{s:?}: expected {n} numbers from 1 to {MAX_TILING_PARAMETER} in {part:?}"
                ))
            }
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["register", t, w] => {
                let (t, w) = (nums(t, 2)?, nums(w, 2)?);
                Ok(MatmulTiling::Register {
                    tm: t[0],
                    tn: t[1],
                    wg_x: w[0],
                    wg_y: w[1],
                })
            }
            ["subgroup", tm, sg, wg] => {
                let v = nums(&format!("{tm}x{sg}x{wg}"), 3)?;
                Ok(MatmulTiling::Subgroup {
                    tm: v[0],
                    sg: v[1],
                    wg: v[2],
                })
            }
            ["shared", b, t, rest @ ..]
                if matches!(rest, [] | ["vec4"] | ["pipelined"] | ["vec4", "pipelined"]) =>
            {
                let (b, t) = (nums(b, 3)?, nums(t, 2)?);
                Ok(MatmulTiling::Shared {
                    bm: b[0],
                    bn: b[1],
                    bk: b[2],
                    tm: t[0],
                    tn: t[1],
                    vec4: rest.contains(&"vec4"),
                    pipelined: rest.contains(&"pipelined"),
                })
            }
            _ => Err(format!(
                "{s:?}: expected register:TMxTN:WGXxWGY, subgroup:TM:SG:WG or \
                 shared:BMxBNxBK:TMxTN[:vec4][:pipelined]"
            )),
        }
    }
}

/// Tile parameters for every tunable kernel on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// The tiling of matrix products.
    pub matmul: MatmulTiling,
    /// On GPUs, the tiling of products whose output blocks under `matmul`
    /// are too few to fill the device (a small batch's layers): smaller
    /// blocks, more of them. CPU adapters fit their register tiles to such
    /// products instead and keep this equal to `matmul`.
    pub small_matmul: MatmulTiling,
    /// On CPU adapters with the subgroup tiling: large products read both
    /// operands through textures (see [`crate::TextureOperands`]), where the
    /// autotuner found that faster on this host. Off, only `A` of `A x B^T`
    /// products does.
    pub operand_textures: bool,
}

impl Tuning {
    /// Register tiles for CPU adapters without fixed-size subgroups.
    pub const CPU: Tuning = Tuning::same(MatmulTiling::SUBGROUP_FALLBACK);

    /// Shared-memory tiles for discrete and integrated GPUs, read four
    /// elements at a time where the shape allows (on lavapipe, 2-5x faster
    /// than element by element), until the autotuner has timed the
    /// candidates: on an H200 it kept this block, pipelined, for small
    /// products and picked `shared:128x64x16:8x4:vec4` for large ones
    /// (`shared:128x128x8:8x8:vec4` while the kernels had loop counters).
    pub const GPU: Tuning = Tuning::same(MatmulTiling::Shared {
        bm: 64,
        bn: 64,
        bk: 16,
        tm: 4,
        tn: 4,
        vec4: true,
        pipelined: false,
    });

    /// `tiling` for products of every size.
    pub const fn same(tiling: MatmulTiling) -> Self {
        Self {
            matmul: tiling,
            small_matmul: tiling,
            operand_textures: false,
        }
    }

    /// Every matmul tiling the autotuner may pick on this adapter (kernel
    /// tests run each of them), the default first.
    pub fn candidates(
        info: &wgpu::AdapterInfo,
        features: wgpu::Features,
        limits: &wgpu::Limits,
    ) -> Vec<MatmulTiling> {
        let default = Self::defaults(info, features).matmul;
        let others: Vec<String> = if !crate::adapter::kernels_for_cpu(info) {
            [
                "shared:128x64x16:8x4",
                "shared:128x128x8:8x8",
                "shared:32x32x16:2x2",
                "shared:64x64x16:4x4",
                "shared:128x64x16:8x4:vec4",
                "shared:128x128x8:8x8:vec4",
                "shared:128x128x16:8x8:vec4",
                // Neighbours of the H200's pick that trade registers for
                // fewer shared-memory reads per multiply-add or fewer
                // barriers per k, and block counts that fill waves
                // differently (timed on each large shape, see
                // `shape_tuning`).
                "shared:128x64x16:8x8:vec4",
                "shared:64x128x16:4x8:vec4",
                "shared:128x64x32:8x4:vec4",
                "shared:256x64x16:8x8:vec4",
                "shared:128x128x32:8x8:vec4",
                // Small blocks for small products (`Tuning::small_matmul`).
                "shared:32x32x16:4x4:vec4",
                "shared:32x64x16:4x4:vec4",
                "shared:64x64x16:4x4:vec4:pipelined",
                "shared:128x64x16:8x4:vec4:pipelined",
                "shared:128x128x8:8x8:vec4:pipelined",
                "shared:128x128x16:8x8:vec4:pipelined",
            ]
            .map(String::from)
            .to_vec()
        } else if let MatmulTiling::Subgroup { sg, .. } = default {
            vec![
                format!("subgroup:8:{sg}:64"),
                format!("subgroup:2:{sg}:64"),
                format!("subgroup:4:{sg}:32"),
                "register:16x16:8x4".into(),
            ]
        } else {
            ["register:8x16:8x4", "register:8x8:8x8"]
                .map(String::from)
                .to_vec()
        };
        let mut out = Vec::new();
        let parsed = others
            .iter()
            .map(|s| s.parse::<MatmulTiling>().expect("candidate tilings parse"));
        for t in std::iter::once(default).chain(parsed) {
            if !out.contains(&t) && t.validate(limits, features, info).is_ok() {
                out.push(t);
            }
        }
        // The register tiling runs wherever compute shaders do: a list is
        // never empty, even on an adapter too small for every other.
        if out.is_empty() {
            out.push(Self::CPU.matmul);
        }
        out
    }

    /// The built-in choice for an adapter, before any measurement.
    pub fn defaults(info: &wgpu::AdapterInfo, features: wgpu::Features) -> Self {
        if !crate::adapter::kernels_for_cpu(info) {
            Self::GPU
        } else if features.contains(wgpu::Features::SUBGROUP)
            && info.subgroup_min_size == info.subgroup_max_size
            && info.subgroup_min_size >= 4
        {
            cpu_subgroup_tiling(info.subgroup_min_size).map_or(Self::CPU, Tuning::same)
        } else {
            Self::CPU
        }
    }

    /// The defaults for an adapter; `KILN_MATMUL` (e.g. `register:8x16:8x4`)
    /// overrides the matmul tiling, for products of every size, where this
    /// adapter can run it (else it is reported and the defaults stand).
    pub fn for_adapter(
        info: &wgpu::AdapterInfo,
        features: wgpu::Features,
        limits: &wgpu::Limits,
    ) -> Self {
        match matmul_override().map(|t| t.validate(limits, features, info).map(|()| t)) {
            Some(Ok(t)) => Tuning::same(t),
            Some(Err(e)) => {
                eprintln!("kiln: ignoring KILN_MATMUL: {e}");
                Self::defaults(info, features)
            }
            None => Self::defaults(info, features),
        }
    }
}

/// The subgroup tiling for a CPU adapter with subgroups of `sg` lanes: four
/// rows a lane (measured best on lavapipe's 8), fewer where wider subgroups
/// would pass [`MAX_TILE_OUTPUTS`] accumulators (2 at 32 lanes, 1 at 64);
/// none past 64 lanes or for workgroups of 64 that `sg` does not divide.
fn cpu_subgroup_tiling(sg: u32) -> Option<MatmulTiling> {
    let tm = (MAX_TILE_OUTPUTS / (4 * sg)).min(4);
    (tm > 0 && 64 % sg == 0).then_some(MatmulTiling::Subgroup { tm, sg, wg: 64 })
}

/// The tiling `KILN_MATMUL` fixes, if it is set to one that parses; a bad
/// value is reported (once) and ignored, so the autotuner still runs.
pub(crate) fn matmul_override() -> Option<MatmulTiling> {
    static PARSED: std::sync::OnceLock<Option<MatmulTiling>> = std::sync::OnceLock::new();
    *PARSED.get_or_init(|| {
        let s = std::env::var("KILN_MATMUL").ok()?;
        s.parse()
            .map_err(|e| eprintln!("kiln: ignoring KILN_MATMUL: {e}"))
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiling_round_trips_through_text() {
        let scalar: MatmulTiling = "shared:128x64x16:8x4".parse().unwrap();
        let pipelined: MatmulTiling = "shared:128x128x8:8x8:vec4:pipelined".parse().unwrap();
        assert!(matches!(
            pipelined,
            MatmulTiling::Shared {
                vec4: true,
                pipelined: true,
                ..
            }
        ));
        for t in [Tuning::CPU.matmul, Tuning::GPU.matmul, scalar, pipelined] {
            assert_eq!(t.to_string().parse::<MatmulTiling>().unwrap(), t);
        }
        assert_eq!(Tuning::GPU.matmul.to_string(), "shared:64x64x16:4x4:vec4");
        assert!("register:8x0:8x8".parse::<MatmulTiling>().is_err());
        assert!("shared:64x64:4x4".parse::<MatmulTiling>().is_err());
        assert!("shared:64x64x16:4x4:vec8".parse::<MatmulTiling>().is_err());
        assert!("shared:64x64x16:4x4:pipelined:vec4"
            .parse::<MatmulTiling>()
            .is_err());
    }

    #[test]
    fn cpu_subgroup_defaults_stay_within_the_accumulator_limit() {
        // An adapter with generous limits, so that only the tiling's own
        // accumulator count can fail it.
        let limits = wgpu::Limits {
            max_compute_invocations_per_workgroup: 1024,
            max_compute_workgroup_size_x: 1024,
            ..Default::default()
        };
        for sg in [4, 8, 16, 32, 64] {
            let mut info = wgpu::AdapterInfo::new(wgpu::DeviceType::Cpu, wgpu::Backend::Vulkan);
            (info.subgroup_min_size, info.subgroup_max_size) = (sg, sg);
            let t = cpu_subgroup_tiling(sg).unwrap();
            assert_eq!(
                t.validate(&limits, wgpu::Features::SUBGROUP, &info),
                Ok(()),
                "sg {sg}"
            );
        }
        assert_eq!(cpu_subgroup_tiling(128), None);
        assert_eq!(
            cpu_subgroup_tiling(8).unwrap().to_string(),
            "subgroup:4:8:64"
        );
        assert_eq!(
            cpu_subgroup_tiling(32).unwrap().to_string(),
            "subgroup:2:32:64"
        );
    }

    #[test]
    fn oversized_tilings_are_refused_when_parsed_or_validated() {
        // Products of these would overflow u32 and pass as 0.
        assert!("register:65536x65536:1x1".parse::<MatmulTiling>().is_err());
        assert!("shared:64x64x1073741824:4x4"
            .parse::<MatmulTiling>()
            .is_err());
        let limits = wgpu::Limits::default();
        let info = wgpu::AdapterInfo::new(wgpu::DeviceType::DiscreteGpu, wgpu::Backend::Vulkan);
        let tall: MatmulTiling = "register:4x4:1x512".parse().unwrap();
        let err = tall
            .validate(&limits, wgpu::Features::empty(), &info)
            .unwrap_err();
        assert!(err.contains("a 1x512 workgroup"), "{err}");
    }

    #[test]
    fn register_tiles_shrink_to_small_products_only() {
        let big: MatmulTiling = "register:16x16:8x4".parse().unwrap();
        let fit = |m, n| big.fitted(m, n, 16).to_string();
        // A classifier head's 32x10 output: 16 tiles of 4x8 in 2x4 workgroups.
        assert_eq!(fit(32, 10), "register:4x8:2x4");
        assert_eq!(fit(64, 10), "register:8x8:2x4");
        // Never below 4x4, and a single element keeps one lane.
        assert_eq!(fit(1, 1), "register:4x4:1x1");
        // Products with enough tiles keep the tile; the workgroup still
        // shrinks to the tiles there are.
        assert_eq!(fit(64, 64), "register:16x16:4x4");
        assert_eq!(fit(1024, 1024), "register:16x16:8x4");
        let subgroup: MatmulTiling = "subgroup:4:8:32".parse().unwrap();
        assert_eq!(subgroup.fitted(1, 1, 16), subgroup);
    }
}
