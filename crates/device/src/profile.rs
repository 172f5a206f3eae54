//! Per-kernel timing for finding where a step's time goes. While profiling is
//! on, every dispatch runs alone and is waited for, so batching is lost and
//! totals exceed normal run times; the split between kernels is what counts.

use std::collections::HashMap;

/// Time spent in one kernel at one launch size.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's cache key (its name and specialisation).
    pub kernel: String,
    pub workgroups: [u32; 3],
    pub calls: u64,
    pub seconds: f64,
}

#[derive(Default)]
pub(crate) struct Profile {
    entries: HashMap<(String, [u32; 3]), (u64, f64)>,
}

impl Profile {
    pub(crate) fn add(&mut self, kernel: &str, workgroups: [u32; 3], seconds: f64) {
        let entry = self
            .entries
            .entry((kernel.to_string(), workgroups))
            .or_default();
        entry.0 += 1;
        entry.1 += seconds;
    }

    /// Entries, most time first.
    pub(crate) fn report(&self) -> Vec<KernelTime> {
        let mut out: Vec<KernelTime> = self
            .entries
            .iter()
            .map(|((kernel, workgroups), &(calls, seconds))| KernelTime {
                kernel: kernel.clone(),
                workgroups: *workgroups,
                calls,
                seconds,
            })
            .collect();
        out.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        out
    }
}
