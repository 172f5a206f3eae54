//! Gathering: inside [`Device::together`] a thread's launches are held back
//! and recorded as few fused dispatches as the `fusion` module can build
//! (independent neighbours side by side, one-workgroup launches chained),
//! else one by one in the order they came.

use super::{lock, switched_off, Device, Recorder, MAX_PARAM_BYTES};
use crate::binding::Bound;
use crate::error::{DeviceError, Result};
use crate::fusion::{self, FusedSource};
use crate::kernel::Kernel;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Whether [`Device::together`] fuses (`KILN_FUSION=0` turns it off, to
/// compare).
fn fusion_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !switched_off("KILN_FUSION"))
}

/// Fusion plans kept (see `Device::fused_plan`): a training step needs tens.
const MAX_FUSION_PLANS: usize = 512;
/// Most workgroups a launch with subgroup operations may have and still run
/// as virtual workgroups in a fused dispatch (see `PartPlan`). On lavapipe a
/// subgroup matmul of 36 workgroups beside a 256-wide elementwise kernel
/// (8 virtual workgroups per fused one) ran twice as slowly, costing far
/// more than the dispatch saved; the CNN's fused products of 2-18
/// workgroups (2-4 per fused one) made its step about 15% faster.
const MAX_VIRTUAL_SUBGROUP_WORKGROUPS: u32 = 32;

/// The launches one thread holds back inside [`Device::together`]. Other
/// threads' launches are not held (they would fuse with this thread's in
/// arbitrary combinations, each a new kernel to compile); each records the
/// held ones first.
pub(super) struct Gathering {
    owner: std::thread::ThreadId,
    held: Vec<Launch>,
}

impl Recorder {
    /// The launches the calling thread is holding back, if it is gathering.
    fn held_here(&self) -> Option<&Vec<Launch>> {
        self.gathering
            .as_ref()
            .filter(|g| g.owner == std::thread::current().id())
            .map(|g| &g.held)
    }

    /// Whether a launch the calling thread holds back binds `buffer`.
    pub(super) fn holds(&self, buffer: &wgpu::Buffer) -> bool {
        self.held_here()
            .is_some_and(|h| h.iter().any(|l| l.buffers.contains(buffer)))
    }
}

/// Ends the outermost [`Device::together`] block: explicitly with `finish`,
/// or when dropped during a panic in the block's work.
struct EndGathering<'a>(&'a Device);

impl EndGathering<'_> {
    fn finish(self) -> Result<()> {
        let ended = self.0.end_gathering();
        std::mem::forget(self);
        ended
    }
}

impl Drop for EndGathering<'_> {
    fn drop(&mut self) {
        // Unwinding: the held launches are recorded as they came (what the
        // block launched before its panic still runs, in order); an error
        // here has nowhere to go.
        let _ = self.0.end_gathering();
    }
}

/// A dispatch held back by [`Device::together`].
struct Launch {
    kernel: Kernel,
    params: Vec<u8>,
    buffers: Vec<wgpu::Buffer>,
    workgroups: [u32; 3],
    /// Its stage when the held launches form a chain (see `fusion`).
    stage: usize,
}

impl Launch {
    /// Whether it runs as one workgroup, as a chain's parts must.
    fn single_workgroup(&self) -> bool {
        self.workgroups == [1, 1, 1]
    }

    /// Its storage bindings (numbered from 1) that it only reads but one of
    /// `launches` writes.
    ///
    /// A fused kernel cannot bind one buffer read-only and read-write, so
    /// these are declared writable: a chain may then bind one buffer
    /// writable at several bindings. wgpu (and Vulkan, Metal, DX12) accept
    /// that, and the chain's storage barriers order the accesses; WebGPU
    /// proper forbids aliased writable bindings, so a browser backend
    /// would need these parts to share one binding instead.
    fn written_elsewhere(&self, launches: &[Launch]) -> Vec<u32> {
        (1..=self.buffers.len() as u32)
            .filter(|b| {
                let buffer = &self.buffers[*b as usize - 1];
                !self.kernel.writable.contains(b) && launches.iter().any(|l| l.writes(buffer))
            })
            .collect()
    }

    /// Whether it binds `buffer` writable.
    fn writes(&self, buffer: &wgpu::Buffer) -> bool {
        self.kernel
            .writable
            .iter()
            .any(|&b| self.buffers.get(b as usize - 1) == Some(buffer))
    }

    /// Whether either launch writes a buffer the other binds.
    fn conflicts(&self, other: &Launch) -> bool {
        other.buffers.iter().any(|b| self.writes(b)) || self.buffers.iter().any(|b| other.writes(b))
    }
}

/// A fused kernel and how to fill its parameter block.
pub(super) struct FusedPlan {
    kernel: Arc<Kernel>,
    source: FusedSource,
}

impl Device {
    /// Holds a launch back when this thread is gathering and the launch
    /// binds only storage buffers, first recording what it cannot join
    /// (another thread's held launches, or a group it cannot fuse with).
    /// `false`: not held, to be recorded now.
    pub(super) fn hold(
        &self,
        rec: &mut Recorder,
        kernel: &Kernel,
        params: &[u8],
        resources: &[Bound],
        workgroups: [u32; 3],
    ) -> Result<bool> {
        // Only storage-buffer launches are held for fusion.
        let gathering_here = rec.held_here().is_some();
        if !gathering_here && rec.gathering.is_some() {
            // Another thread is holding launches back. They go first: the
            // pool hands a buffer dropped after a recorded read to the next
            // dispatch as its output, which is only safe while dispatches are
            // recorded in the order they were made.
            self.emit_gathered(rec)?;
        }
        let buffers: Option<Vec<wgpu::Buffer>> = match gathering_here {
            true => resources
                .iter()
                .map(|r| match r {
                    Bound::Buffer(b) => Some((*b).clone()),
                    Bound::Texture(_) => None,
                })
                .collect(),
            false => None,
        };
        if gathering_here && buffers.is_none() {
            self.emit_gathered(rec)?;
        }
        if let (Some(held), Some(buffers)) = (rec.held_here(), buffers) {
            let mut launch = Launch {
                kernel: kernel.clone(),
                params: params.to_vec(),
                buffers,
                workgroups,
                stage: 0,
            };
            match self.place(held, &launch) {
                Some(stage) => launch.stage = stage,
                None => self.emit_gathered(rec)?,
            }
            if let Some(gathering) = rec.gathering.as_mut() {
                gathering.held.push(launch);
            }
            // Held launches count as recorded work: a buffer dropped now may
            // still be read by one of them, so it must not take an upload
            // (which runs before the next submit's commands) until then.
            self.shared.pending.store(true, Ordering::Release);
            return Ok(true);
        }
        Ok(false)
    }

    /// Where `launch` joins the `held` ones: beside the last stage when it
    /// does not depend on it, as the next stage of a chain of one-workgroup
    /// launches when it does, or (`None`) in a new group, also when the
    /// fused kernel would have too many parts, bindings or parameters.
    fn place(&self, held: &[Launch], launch: &Launch) -> Option<usize> {
        let Some(last) = held.last() else {
            return Some(0);
        };
        let stage = last.stage;
        let depends = held
            .iter()
            .filter(|l| l.stage == stage)
            .any(|l| l.conflicts(launch));
        let chained = stage > 0;
        let placed = if !depends && (!chained || launch.single_workgroup()) {
            stage
        } else if depends && launch.single_workgroup() && held.iter().all(Launch::single_workgroup)
        {
            stage + 1
        } else {
            return None;
        };
        let all = || held.iter().chain(std::iter::once(launch));
        let parts = held.len() + 1;
        let bindings: usize = all().map(|l| l.buffers.len()).sum();
        let block = fusion::block_bytes(all().map(|l| l.params.len()), placed > 0);
        let fits = parts <= fusion::MAX_PARTS
            && bindings <= self.shared.limits.max_storage_buffers_per_shader_stage as usize
            && block <= MAX_PARAM_BYTES;
        fits.then_some(placed)
    }

    /// Runs `work`, dispatching the kernels it launches that do not depend on
    /// each other as one kernel where they can be fused (see the `fusion`
    /// module): a layer's weight and input gradients, or projections of one
    /// input. A launch that reads what an earlier one writes starts a new
    /// group, so any `work` is correct; only independent neighbours merge,
    /// except that launches of one workgroup each (a small classifier head,
    /// its loss, the loss's gradient) chain into one dispatch whose stages
    /// run in order. Wrapping a whole training step lets such chains span
    /// layers. Commands other than dispatches (copies, clears, reads) first
    /// record what is held. Nested calls join the outer one; other threads'
    /// launches meanwhile are not held. Off while profiling, which times
    /// every dispatch alone.
    ///
    /// ```
    /// # fn main() -> Result<(), kiln_device::DeviceError> {
    /// use kiln_device::{Device, Matmul};
    /// let device = Device::new()?;
    /// let a = device.upload(&[1.0f32, 2.0, 3.0, 4.0])?;
    /// let b = device.upload(&[0.5f32, -1.0, 2.0, 0.0])?;
    /// let spec = Matmul::new(2, 2, 2);
    /// // Two independent products, one dispatch.
    /// let (ab, ba) = device.together(|| {
    ///     Ok((device.matmul(&a, &b, &spec)?, device.matmul(&b, &a, &spec)?))
    /// })?;
    /// assert_eq!(device.read::<f32>(&ab)?, vec![4.5, -1.0, 9.5, -3.0]);
    /// assert_eq!(device.read::<f32>(&ba)?, vec![-2.5, -3.0, 2.0, 4.0]);
    /// # Ok(()) }
    /// ```
    pub fn together<R, E: From<DeviceError>>(
        &self,
        work: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let outer = {
            let mut rec = lock(&self.shared.recorder);
            let profiling = lock(&self.shared.profile).is_some();
            let start = rec.gathering.is_none() && !profiling && fusion_enabled();
            if start {
                rec.gathering = Some(Gathering {
                    owner: std::thread::current().id(),
                    held: Vec::new(),
                });
            }
            start
        };
        // Ends the block even if `work` panics: otherwise gathering would
        // stay on and no later block, on any thread, would gather again.
        // Built only for the outermost block: a guard dropped at once (as
        // `then_some` would drop one it builds for an inner block) would end
        // the enclosing block, or another thread's, there and then.
        let guard = if outer {
            Some(EndGathering(self))
        } else {
            None
        };
        let result = work();
        if let Some(guard) = guard {
            guard.finish()?;
            if self.submit_blocks() {
                self.flush()?;
            }
            // Shapes met inside the block are timed now that nothing is
            // gathered; the block's products keep the tiling they ran with.
            self.tune_pending_shapes();
        }
        result
    }

    /// Records the held launches and stops gathering.
    fn end_gathering(&self) -> Result<()> {
        let mut rec = lock(&self.shared.recorder);
        let emitted = self.emit_gathered(&mut rec);
        rec.gathering = None;
        emitted
    }

    /// Records the held launches: fused into one dispatch where they can be,
    /// else one by one in the order they came.
    pub(super) fn emit_gathered(&self, rec: &mut Recorder) -> Result<()> {
        let launches = match rec.gathering.as_mut() {
            Some(g) if !g.held.is_empty() => std::mem::take(&mut g.held),
            _ => return Ok(()),
        };
        rec.emitting = launches.iter().flat_map(|l| l.buffers.clone()).collect();
        // Cleared even when recording panics: a stale list would keep its
        // buffers from reuse, and mark every later submit as one made
        // midway, until the next emission.
        let emitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.emit_fused(rec, launches)
        }));
        rec.emitting.clear();
        emitted.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Records `launches` as one fused dispatch where they fuse; else a chain
    /// that does not goes stage by stage, and a side-by-side group one by
    /// one.
    fn emit_fused(&self, rec: &mut Recorder, launches: Vec<Launch>) -> Result<()> {
        if launches.len() >= 2 {
            let plan = self.fused_plan(&launches).filter(|plan| {
                let parts = plan.source.parts.iter().zip(&launches);
                parts.into_iter().all(|(part, l)| {
                    let workgroups: u64 = l.workgroups.iter().map(|&w| u64::from(w)).product();
                    part.storage_bindings as usize == l.buffers.len()
                        && !(part.virtual_subgroups
                            && workgroups > u64::from(MAX_VIRTUAL_SUBGROUP_WORKGROUPS))
                })
            });
            // Parts with too many workgroups in all to number (fused_block's
            // error) run apart like parts that do not fuse.
            let fused = plan.and_then(|plan| {
                let (block, workgroups) = self.fused_block(&plan.source, &launches).ok()?;
                Some((plan, block, workgroups))
            });
            if let Some((plan, block, workgroups)) = fused {
                let buffers: Vec<Bound> = launches
                    .iter()
                    .flat_map(|l| l.buffers.iter().map(Bound::Buffer))
                    .collect();
                return self.record_dispatch(rec, &plan.kernel, &block, &buffers, workgroups);
            }
        }
        let last_stage = launches.last().map_or(0, |l| l.stage);
        if last_stage == 0 && launches.len() > 2 {
            // Side by side, the launches are independent, so any order will
            // do: kernels of one kind may fuse where the mix could not (a
            // workgroup reduction beside a per-thread one, say).
            let mut kinds: Vec<Vec<Launch>> = Vec::new();
            for l in launches {
                match kinds.iter_mut().find(|k| k[0].kernel.key == l.kernel.key) {
                    Some(kind) => kind.push(l),
                    None => kinds.push(vec![l]),
                }
            }
            if kinds.len() == 1 {
                return self.emit_one_by_one(rec, &kinds[0]);
            }
            for kind in kinds {
                self.emit_fused(rec, kind)?;
            }
            return Ok(());
        }
        if last_stage > 0 {
            let mut stages: Vec<Vec<Launch>> = (0..=last_stage).map(|_| Vec::new()).collect();
            for mut l in launches {
                let stage = std::mem::take(&mut l.stage);
                stages[stage].push(l);
            }
            for stage in stages {
                self.emit_fused(rec, stage)?;
            }
            return Ok(());
        }
        self.emit_one_by_one(rec, &launches)
    }

    fn emit_one_by_one(&self, rec: &mut Recorder, launches: &[Launch]) -> Result<()> {
        for l in launches {
            let buffers: Vec<Bound> = l.buffers.iter().map(Bound::Buffer).collect();
            self.record_dispatch(rec, &l.kernel, &l.params, &buffers, l.workgroups)?;
        }
        Ok(())
    }

    /// The fused kernel for `launches`, built the first time; `None` where
    /// they cannot be fused on this adapter. Infallible: the launches may be
    /// another thread's, held for fusion, and must be recorded either way.
    fn fused_plan(&self, launches: &[Launch]) -> Option<Arc<FusedPlan>> {
        let parts: Vec<fusion::PartSource> = launches
            .iter()
            .map(|l| fusion::PartSource {
                wgsl: &l.kernel.source,
                stage: l.stage,
                written_elsewhere: l.written_elsewhere(launches),
            })
            .collect();
        // Kernels, stages (" | " between) and upgraded bindings name a plan.
        let mut key = String::new();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                key.push_str(if part.stage == parts[i - 1].stage {
                    " + "
                } else {
                    " | "
                });
            }
            key.push_str(&launches[i].kernel.key);
            if !part.written_elsewhere.is_empty() {
                key.push_str(&format!(" rw{:?}", part.written_elsewhere));
            }
        }
        if let Some(plan) = lock(&self.shared.fusions).get(&key) {
            return plan.clone();
        }
        let limits = &self.shared.limits;
        let fusion_limits = fusion::FusionLimits {
            subgroup_size: self.fixed_subgroup_size(),
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_workgroup_bytes: limits.max_compute_workgroup_storage_size,
        };
        let bindings: u32 = launches.iter().map(|l| l.buffers.len() as u32).sum();
        let plan = match fusion::fuse_sources(&parts, fusion_limits) {
            Ok(source)
                if source.block_bytes <= MAX_PARAM_BYTES
                    && bindings <= self.shared.limits.max_storage_buffers_per_shader_stage =>
            {
                match self.kernel(&format!("fused[{key}]"), || source.wgsl.clone()) {
                    Ok(kernel) => Some(Arc::new(FusedPlan { kernel, source })),
                    // A bug in fusion, or a driver that rejects the fused
                    // kernel: said once, and the parts run one by one.
                    Err(e) => {
                        eprintln!("kiln: running these kernels unfused: {e}");
                        None
                    }
                }
            }
            // Too many bindings or parameters, or parts it cannot fuse: they
            // run one by one.
            _ => None,
        };
        let mut fusions = lock(&self.shared.fusions);
        // Plans hold their kernels, which the kernel cache then keeps: bound
        // both where launch keys carry shapes that keep changing.
        if fusions.len() >= MAX_FUSION_PLANS {
            fusions.clear();
        }
        fusions.insert(key, plan.clone());
        plan
    }

    /// The fused parameter block and grid for `launches`.
    fn fused_block(
        &self,
        source: &FusedSource,
        launches: &[Launch],
    ) -> Result<(Vec<u8>, [u32; 3])> {
        let mut block = vec![0u8; source.block_bytes];
        let mut put = |at: usize, words: &[u32]| {
            block[at..at + 4 * words.len()].copy_from_slice(bytemuck::cast_slice(words));
        };
        let mut end = 0u64;
        for (i, (part, l)) in source.parts.iter().zip(launches).enumerate() {
            let [x, y, z] = l.workgroups;
            end += (u64::from(x) * u64::from(y) * u64::from(z)).div_ceil(u64::from(part.ratio));
            let end32 = u32::try_from(end).map_err(|_| DeviceError::Shape {
                op: "dispatch",
                message: format!("{end} fused workgroups exceed 32-bit indexing"),
            })?;
            if let Some(grids) = source.grids_offset {
                put(grids + 16 * i, &[x, y, z, end32]);
            }
        }
        let grid = if source.chain {
            [1, 1, 1]
        } else {
            crate::kernels::grid_2d(end, self.shared.limits.max_compute_workgroups_per_dimension)?
        };
        put(source.row_offset, &[grid[0]]);
        for (part, l) in source.parts.iter().zip(launches) {
            if let Some(at) = part.param_offset {
                block[at..at + l.params.len()].copy_from_slice(&l.params);
            }
        }
        Ok((block, grid))
    }
}
