//! Per-kernel timing for finding where a step's time goes. While profiling is
//! on, every dispatch runs alone and is waited for. Where the adapter has
//! timestamp queries a dispatch's time is read from the device's clock
//! around its compute pass; elsewhere it is the wall-clock time of its submit
//! and wait, which on lavapipe adds up to a millisecond of hand-off to small
//! kernels (a 20K multiply-add product read 1.0 ms that way and 0.05 ms in a
//! batched loop).

use crate::device::map_for_reading;
use crate::error::{DeviceError, Result};
use std::collections::HashMap;

/// Time spent in one kernel at one launch size.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's cache key (its name and specialisation).
    pub kernel: String,
    /// Launch size in workgroups, `[x, y, z]`.
    pub workgroups: [u32; 3],
    /// Dispatches of this kernel at this size.
    pub calls: u64,
    /// Total seconds over all of those calls.
    pub seconds: f64,
    /// Timed by the device's own clock around each dispatch, rather than by
    /// the host's around its submit and wait.
    pub device_clock: bool,
}

/// A dispatch's time in seconds and which clock measured it.
pub(crate) enum Timed {
    Device(f64),
    Host(f64),
}

pub(crate) struct Profile {
    /// Calls, seconds and whether the device's clock timed them all.
    entries: HashMap<(String, [u32; 3]), (u64, f64, bool)>,
    /// `None` where the adapter has no timestamp queries.
    pub(crate) stamps: Option<Stamps>,
}

/// Two timestamps, before and after one compute pass, and where they are
/// resolved and read back.
pub(crate) struct Stamps {
    pub(crate) queries: wgpu::QuerySet,
    pub(crate) resolved: wgpu::Buffer,
    pub(crate) readback: wgpu::Buffer,
    /// Nanoseconds per tick.
    period: f32,
    /// The last submit wrote them.
    pub(crate) written: bool,
}

const STAMP_BYTES: u64 = 2 * std::mem::size_of::<u64>() as u64;

impl Stamps {
    fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Self {
        let buffer = |label, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: STAMP_BYTES,
                usage,
                mapped_at_creation: false,
            })
        };
        use wgpu::BufferUsages as U;
        Self {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kiln profile"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolved: buffer("kiln profile resolve", U::QUERY_RESOLVE | U::COPY_SRC),
            readback: buffer("kiln profile readback", U::MAP_READ | U::COPY_DST),
            period: queue.get_timestamp_period(),
            written: false,
        }
    }

    /// The timestamps around a compute pass.
    pub(crate) fn pass_writes(&self) -> wgpu::ComputePassTimestampWrites<'_> {
        wgpu::ComputePassTimestampWrites {
            query_set: &self.queries,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        }
    }

    /// Records the copy of the pass's timestamps to where they are read.
    pub(crate) fn resolve(&mut self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.queries, 0..2, &self.resolved, 0);
        encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.readback, 0, STAMP_BYTES);
        self.written = true;
    }

    /// Seconds between the two timestamps, once the submit that wrote them
    /// has finished; `None` if the last submit wrote none.
    pub(crate) fn read(&mut self, device: &wgpu::Device) -> Result<Option<f64>> {
        if !std::mem::take(&mut self.written) {
            return Ok(None);
        }
        map_for_reading(device, &self.readback, 0..STAMP_BYTES)?;
        let ticks = {
            let view = self
                .readback
                .get_mapped_range(..)
                .map_err(|e| DeviceError::Backend(e.to_string()))?;
            let [start, end]: [u64; 2] = bytemuck::pod_read_unaligned(&view);
            end.saturating_sub(start)
        };
        self.readback.unmap();
        Ok(Some(ticks as f64 * f64::from(self.period) * 1e-9))
    }
}

impl Profile {
    /// Timestamps are used where the device has them.
    pub(crate) fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Self {
        let stamps = device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            .then(|| Stamps::new(device, queue));
        Self {
            entries: HashMap::new(),
            stamps,
        }
    }

    /// One dispatch's time, by the device's clock or else the host's.
    pub(crate) fn add(&mut self, kernel: &str, workgroups: [u32; 3], seconds: Timed) {
        let entry = self
            .entries
            .entry((kernel.to_string(), workgroups))
            .or_insert((0, 0.0, true));
        entry.0 += 1;
        match seconds {
            Timed::Device(s) => entry.1 += s,
            Timed::Host(s) => {
                entry.1 += s;
                entry.2 = false;
            }
        }
    }

    /// Entries, most time first.
    pub(crate) fn report(&self) -> Vec<KernelTime> {
        let mut out: Vec<KernelTime> = self
            .entries
            .iter()
            .map(
                |((kernel, workgroups), &(calls, seconds, device_clock))| KernelTime {
                    kernel: kernel.clone(),
                    workgroups: *workgroups,
                    calls,
                    seconds,
                    device_clock,
                },
            )
            .collect();
        out.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        out
    }
}
