//! Size-bucketed reuse of storage buffers.
//!
//! Every tensor buffer comes from here and goes back here when dropped, so a
//! training loop that repeats the same shapes allocates nothing after its first
//! step. Sizes are rounded up to buckets a quarter of a power of two apart (at most
//! 25% slack), which lets differently sized tensors share buffers.
//!
//! Ordering rule: a buffer released while commands are still being recorded may be
//! referenced by them. It is *retired*: it can be reused as the output of a later
//! dispatch (the GPU executes dispatches in order), but not as the target of
//! `queue.write_buffer`, which wgpu performs before the recorded commands run. A
//! submit turns retired buffers into free ones.
//!
//! Which idle buffer a request gets is fixed: the oldest of its bucket (free
//! ones first). A repeating step then gets the very same buffers every time,
//! so its bind groups, cached by buffer, are built once. Handing out the most
//! recently released buffer instead shuffled them from step to step: a
//! MiniLM training step built about 200 of its bind groups afresh each time.

// wgpu's buffers order and hash by their id, which never changes, so sets of
// them are sound despite the buffers' interior mutability.
#![allow(clippy::mutable_key_type)]

use std::collections::{BTreeSet, HashMap};

/// Counters describing pool behaviour; see [`crate::Device::pool_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// wgpu buffers created so far.
    pub allocations: u64,
    /// Requests served from a free or retired buffer.
    pub reuses: u64,
    /// Bytes held by buffers currently handed out.
    pub live_bytes: u64,
    /// Bytes held idle in the pool.
    pub cached_bytes: u64,
}

/// Smallest bucket, in bytes.
const MIN_BUCKET: u64 = 256;

/// Rounds a request up to its bucket: 256 B minimum, then steps of 2^k * {4,5,6,7}/4.
pub fn bucket_size(bytes: u64) -> u64 {
    if bytes <= MIN_BUCKET {
        return MIN_BUCKET;
    }
    let high = 63 - (bytes - 1).leading_zeros(); // floor(log2(bytes - 1))
    let quarter = 1u64 << (high - 2);
    bytes.div_ceil(quarter) * quarter
}

#[derive(Default)]
pub(crate) struct BufferPool {
    /// Idle buffers by bucket, ordered by creation (wgpu's ids).
    free: HashMap<u64, BTreeSet<wgpu::Buffer>>,
    retired: HashMap<u64, BTreeSet<wgpu::Buffer>>,
    stats: PoolStats,
    /// Idle bytes kept at most; beyond this, released buffers are destroyed.
    pub capacity: u64,
}

/// What a buffer will be used for first; decides whether retired buffers qualify.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum FirstUse {
    /// Written by a dispatch or copy recorded in order.
    Gpu,
    /// Written by `queue.write_buffer`, which runs before recorded commands.
    Upload,
}

impl BufferPool {
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// An idle buffer of `bucket`, if there is one: the oldest free one,
    /// else (for a dispatch's output) the oldest retired one that `held`
    /// says no launch held back for fusion reads or writes, else the oldest
    /// retired one. Reusing a held launch's buffer would make the new
    /// dispatch depend on it and cut the fused group short.
    pub fn take(
        &mut self,
        bucket: u64,
        first_use: FirstUse,
        held: impl Fn(&wgpu::Buffer) -> bool,
    ) -> Option<wgpu::Buffer> {
        let from_free = self.free.get_mut(&bucket).and_then(BTreeSet::pop_first);
        let found = from_free.or_else(|| match first_use {
            FirstUse::Gpu => {
                let retired = self.retired.get_mut(&bucket)?;
                let unheld = retired.iter().find(|b| !held(b)).cloned();
                match unheld {
                    Some(b) => retired.take(&b),
                    None => retired.pop_first(),
                }
            }
            FirstUse::Upload => None,
        })?;
        self.stats.reuses += 1;
        self.stats.cached_bytes -= bucket;
        self.stats.live_bytes += bucket;
        Some(found)
    }

    pub fn note_allocation(&mut self, bucket: u64) {
        self.stats.allocations += 1;
        self.stats.live_bytes += bucket;
    }

    /// Returns a buffer. `pending` says whether recorded-but-unsubmitted work exists.
    /// A buffer the pool has no room for comes back, for the caller to drop.
    #[must_use]
    pub fn release(
        &mut self,
        bucket: u64,
        buffer: wgpu::Buffer,
        pending: bool,
    ) -> Option<wgpu::Buffer> {
        self.stats.live_bytes -= bucket;
        if self.stats.cached_bytes + bucket > self.capacity {
            // Dropped, not destroyed: recorded commands may still use it, and wgpu
            // frees the memory once they are done.
            return Some(buffer);
        }
        self.stats.cached_bytes += bucket;
        let idle = if pending {
            &mut self.retired
        } else {
            &mut self.free
        };
        idle.entry(bucket).or_default().insert(buffer);
        None
    }

    /// After a submit, retired buffers may be written by uploads again,
    /// except those `still_read` says commands not yet submitted will use
    /// (launches being recorded across a submit): they stay retired until
    /// the next one.
    pub fn on_submit(&mut self, still_read: impl Fn(&wgpu::Buffer) -> bool) {
        for (&bucket, retired) in self.retired.iter_mut() {
            let free = self.free.entry(bucket).or_default();
            // Usually nothing is still read: the whole bucket moves at once.
            if !retired.iter().any(&still_read) {
                free.append(retired);
                continue;
            }
            let done: Vec<wgpu::Buffer> =
                retired.iter().filter(|b| !still_read(b)).cloned().collect();
            for buffer in done {
                retired.remove(&buffer);
                free.insert(buffer);
            }
        }
    }

    /// Lets go of every idle buffer: free ones are destroyed at once;
    /// retired ones, which recorded but unsubmitted commands may still read,
    /// are only dropped (wgpu frees them once that work is done; destroying
    /// them would fail its submit).
    pub fn trim(&mut self) {
        for buffer in self.free.drain().flat_map(|(_, buffers)| buffers) {
            buffer.destroy();
        }
        self.retired.clear();
        self.stats.cached_bytes = 0;
    }

    pub fn stats(&self) -> PoolStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_size;

    #[test]
    fn buckets_round_up_with_bounded_slack() {
        assert_eq!(bucket_size(0), 256);
        assert_eq!(bucket_size(256), 256);
        assert_eq!(bucket_size(257), 320);
        assert_eq!(bucket_size(1024), 1024);
        assert_eq!(bucket_size(1025), 1280);
        for bytes in (1..200_000u64).step_by(37) {
            let b = bucket_size(bytes);
            assert!(b >= bytes);
            assert!(b <= (bytes * 5 / 4).max(256) + 4, "{bytes} -> {b}");
            assert_eq!(b % 4, 0);
        }
    }
}
