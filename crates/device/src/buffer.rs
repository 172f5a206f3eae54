//! GPU buffers handed out by the pool, and the element types they can hold.

use crate::device::DeviceShared;
use std::fmt;
use std::sync::Arc;

/// Element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision, 4 bytes.
    F32,
    /// IEEE half precision, stored two per 32-bit word.
    F16,
    /// Unsigned 32-bit integers (class labels, indices such as max pooling's argmax).
    U32,
}

impl DType {
    /// Bytes one element takes: 4, or 2 for [`DType::F16`].
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }
}

/// A Rust type that can be uploaded to and read from a [`GpuBuffer`].
pub trait Element: bytemuck::Pod {
    /// The buffer element type this Rust type maps to.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}

/// A storage buffer on the device holding `len` elements of `dtype`.
///
/// Dropping it returns the memory to the device's pool for reuse.
pub struct GpuBuffer {
    raw: Option<wgpu::Buffer>,
    bucket: u64,
    len: usize,
    dtype: DType,
    device: Arc<DeviceShared>,
}

impl GpuBuffer {
    pub(crate) fn new(
        raw: wgpu::Buffer,
        bucket: u64,
        len: usize,
        dtype: DType,
        device: Arc<DeviceShared>,
    ) -> Self {
        Self {
            raw: Some(raw),
            bucket,
            len,
            dtype,
            device,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Element type of the buffer.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes holding the elements (the underlying allocation may be larger).
    pub fn size_bytes(&self) -> u64 {
        (self.len * self.dtype.size_bytes()) as u64
    }

    /// The wgpu buffer, for binding in custom kernels.
    pub fn raw(&self) -> &wgpu::Buffer {
        self.raw.as_ref().expect("buffer is only taken in drop")
    }

    /// True when both handles refer to the same device.
    pub(crate) fn same_device(&self, shared: &Arc<DeviceShared>) -> bool {
        Arc::ptr_eq(&self.device, shared)
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            self.device.release(self.bucket, raw);
        }
    }
}

impl fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuBuffer({} x {:?})", self.len, self.dtype)
    }
}
