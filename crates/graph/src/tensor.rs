//! The [`Tensor`] type: a shape, a GPU buffer, and where it came from.

use crate::autograd::{self, GradFn};
use kiln_device::{DType, Device, DeviceError, GpuBuffer, Result};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// splitmix64: a tiny, well-mixed seeded generator, so a seed gives the same
/// numbers on every machine (initialisation, shuffles).
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

/// splitmix64's step: the state advances by it before every draw.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The stream [`Tensor::uniform`] draws from for `seed`. Its tag is the
    /// step itself, so for a seed sharing no bits with it this is the stream
    /// of the bare seed one draw on: other streams must not start from bare
    /// seeds (kept as it is, since every initial weight depends on it).
    pub fn uniform_stream(seed: u64) -> Self {
        Self::new(seed ^ GAMMA)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 random bits.
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The values a tensor and its views (reshapes, detached copies, recorded
/// results) share.
pub(crate) struct Storage {
    buffer: GpuBuffer,
    /// Bumped by every in-place write (an optimizer step, [`Tensor::assign`]),
    /// so a backward pass can tell that an input changed since its forward.
    /// Shared by views, as PyTorch's version counter is: a write through one
    /// is a write to all.
    version: AtomicU64,
    /// The values as uploaded, for storage made by
    /// [`Tensor::from_slice_with_host_copy`]; they stand for the buffer until
    /// the first in-place write.
    host: Option<Box<[f32]>>,
}

impl Storage {
    fn new(buffer: GpuBuffer, host: Option<Box<[f32]>>) -> Arc<Self> {
        Arc::new(Self {
            buffer,
            version: AtomicU64::new(0),
            host,
        })
    }
}

struct Inner {
    id: u64,
    storage: Arc<Storage>,
    shape: Vec<usize>,
    device: Device,
    /// For leaves: whether gradients are wanted (false freezes a parameter).
    /// For op results: whether any input wanted them.
    requires_grad: AtomicBool,
    grad: Mutex<Option<Tensor>>,
    grad_fn: Option<GradFn>,
}

/// An f32 tensor on a device, row-major and contiguous.
///
/// Cloning is cheap and shares the data. Ops record a graph when an input
/// requires gradients and recording is enabled (see [`crate::no_grad`]).
///
/// ```
/// # fn main() -> kiln_device::Result<()> {
/// use kiln_graph::{Device, Tensor};
/// let device = Device::new()?;
/// let zeros = Tensor::zeros(&device, &[2, 3])?;
/// assert_eq!((zeros.shape(), zeros.numel()), (&[2, 3][..], 6));
/// let x = Tensor::from_slice(&device, &[1.0, 2.0, 3.0], &[3])?.requires_grad(true);
/// let loss = x.square()?.sum_all()?; // 1 + 4 + 9, shape []
/// assert_eq!(loss.item()?, 14.0);
/// loss.backward()?;
/// assert_eq!(x.grad().unwrap().to_vec()?, vec![2.0, 4.0, 6.0]); // d/dx x^2 = 2x
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Tensor {
    inner: Arc<Inner>,
}

/// Elements of `shape`; usize::MAX where the product overflows (no buffer
/// or slice holds that many, so length checks then fail cleanly).
pub(crate) fn numel_of(shape: &[usize]) -> usize {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .unwrap_or(usize::MAX)
}

/// Checks that `data` holds exactly the elements of `shape`.
fn check_slice_len(op: &'static str, data: &[f32], shape: &[usize]) -> Result<()> {
    let numel = numel_of(shape);
    if data.len() != numel {
        return Err(DeviceError::Shape {
            op,
            message: format!("shape {shape:?} needs {numel} values, got {}", data.len()),
        });
    }
    Ok(())
}

/// The element count of `shape`, checked against the device's buffer limit
/// before the contents are built on the host: an absurd shape (say, from a
/// corrupt config) is an error, not an aborted allocation.
fn host_numel(device: &Device, shape: &[usize]) -> Result<usize> {
    let numel = numel_of(shape);
    device.check_buffer_len(numel, DType::F32)?;
    Ok(numel)
}

impl Tensor {
    pub(crate) fn from_parts(
        device: &Device,
        storage: Arc<Storage>,
        shape: Vec<usize>,
        grad_fn: Option<GradFn>,
    ) -> Self {
        let requires_grad = grad_fn.is_some();
        Self {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                storage,
                shape,
                device: device.clone(),
                requires_grad: AtomicBool::new(requires_grad),
                grad: Mutex::new(None),
                grad_fn,
            }),
        }
    }

    /// Wraps a buffer (f32, or f16 storage) holding `shape` (no graph).
    pub fn from_buffer(device: &Device, buffer: GpuBuffer, shape: &[usize]) -> Result<Self> {
        Self::from_buffer_and_host(device, buffer, None, shape)
    }

    fn from_buffer_and_host(
        device: &Device,
        buffer: GpuBuffer,
        host: Option<Box<[f32]>>,
        shape: &[usize],
    ) -> Result<Self> {
        let numel = numel_of(shape);
        if buffer.len() != numel || !matches!(buffer.dtype(), DType::F32 | DType::F16) {
            return Err(DeviceError::Shape {
                op: "from_buffer",
                message: format!(
                    "shape {shape:?} needs {numel} f32 or f16, the buffer holds {} {:?}",
                    buffer.len(),
                    buffer.dtype()
                ),
            });
        }
        Ok(Self::from_parts(
            device,
            Storage::new(buffer, host),
            shape.to_vec(),
            None,
        ))
    }

    /// Uploads `data` as a tensor of `shape`.
    pub fn from_slice(device: &Device, data: &[f32], shape: &[usize]) -> Result<Self> {
        check_slice_len("from_slice", data, shape)?;
        Self::from_buffer(device, device.upload(data)?, shape)
    }

    /// Uploads `data` as a tensor of `shape` and keeps a copy on the host, so
    /// that [`Tensor::to_vec`] answers without waiting for the device until
    /// the tensor (or a view of it) is written in place. Meant for input
    /// batches whose values a layer needs on the host, as an embedding needs
    /// its ids: reading them back would stall the step until the device
    /// finishes the work before it. `fit`, `evaluate` and `predict` build
    /// their batches this way for models whose first layer reads its input
    /// on the host. Writes made with device calls on
    /// [`Tensor::buffer`] go unseen by the copy: write with
    /// [`Tensor::assign`].
    ///
    /// ```
    /// # fn main() -> kiln_device::Result<()> {
    /// use kiln_graph::{Device, Tensor};
    /// let device = Device::new()?;
    /// let ids = Tensor::from_slice_with_host_copy(&device, &[3.0, 1.0, 4.0], &[1, 3])?;
    /// let before = device.dispatch_stats().submits;
    /// assert_eq!(ids.to_vec()?, [3.0, 1.0, 4.0]);
    /// assert_eq!(device.dispatch_stats().submits, before); // no trip to the device
    /// # Ok(()) }
    /// ```
    pub fn from_slice_with_host_copy(
        device: &Device,
        data: &[f32],
        shape: &[usize],
    ) -> Result<Self> {
        check_slice_len("from_slice_with_host_copy", data, shape)?;
        let buffer = device.upload(data)?;
        Self::from_buffer_and_host(device, buffer, Some(data.into()), shape)
    }

    /// A tensor of `shape` filled with 0 (no graph).
    pub fn zeros(device: &Device, shape: &[usize]) -> Result<Self> {
        let numel = host_numel(device, shape)?;
        Self::from_buffer(device, device.zeros(numel, DType::F32)?, shape)
    }

    /// A tensor of `shape` filled with `value` (no graph).
    pub fn full(device: &Device, shape: &[usize], value: f32) -> Result<Self> {
        let numel = host_numel(device, shape)?;
        Self::from_slice(device, &vec![value; numel], shape)
    }

    /// A tensor of `shape` filled with 1 (no graph).
    pub fn ones(device: &Device, shape: &[usize]) -> Result<Self> {
        Self::full(device, shape, 1.0)
    }

    /// Values uniform in `[lo, hi)` from a seeded generator (host-side, so the
    /// same seed gives the same tensor on every adapter).
    pub fn uniform(device: &Device, shape: &[usize], lo: f32, hi: f32, seed: u64) -> Result<Self> {
        let numel = host_numel(device, shape)?;
        let mut rng = SplitMix64::uniform_stream(seed);
        let data: Vec<f32> = (0..numel)
            .map(|_| lo + (hi - lo) * rng.unit_f32())
            .collect();
        Self::from_slice(device, &data, shape)
    }

    /// Marks a leaf tensor as wanting gradients (a trainable parameter).
    pub fn requires_grad(self, requires: bool) -> Self {
        self.set_requires_grad(requires);
        self
    }

    /// Freezes (`false`) or unfreezes a parameter. Frozen tensors get no gradient
    /// and optimizers skip them.
    pub fn set_requires_grad(&self, requires: bool) {
        self.inner.requires_grad.store(requires, Ordering::Relaxed);
    }

    /// Whether gradients flow to (a leaf) or through (an op result) this tensor.
    pub fn is_requires_grad(&self) -> bool {
        self.inner.requires_grad.load(Ordering::Relaxed)
    }

    /// The accumulated gradient of a leaf, after [`Tensor::backward`].
    pub fn grad(&self) -> Option<Tensor> {
        lock(&self.inner.grad).clone()
    }

    /// Replaces the gradient (e.g. after clipping).
    pub fn set_grad(&self, grad: Option<Tensor>) {
        *lock(&self.inner.grad) = grad;
    }

    /// Forgets the accumulated gradient.
    pub fn zero_grad(&self) {
        *lock(&self.inner.grad) = None;
    }

    /// Back-propagates from this scalar to every leaf that requires gradients,
    /// adding to their [`Tensor::grad`].
    pub fn backward(&self) -> Result<()> {
        autograd::backward(self)
    }

    /// The same data without the graph: gradients stop here.
    pub fn detach(&self) -> Tensor {
        Self::from_parts(
            &self.inner.device,
            self.inner.storage.clone(),
            self.inner.shape.clone(),
            None,
        )
    }

    /// Size of each dimension, outermost first; `[]` for a scalar.
    pub fn shape(&self) -> &[usize] {
        &self.inner.shape
    }

    /// Number of dimensions (0 for a scalar).
    pub fn rank(&self) -> usize {
        self.inner.shape.len()
    }

    /// Number of elements: the product of the shape (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.inner.shape.iter().product()
    }

    /// The device holding the data.
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// The GPU buffer holding the elements (f32, or f16 storage).
    pub fn buffer(&self) -> &GpuBuffer {
        &self.inner.storage.buffer
    }

    /// The storage, for views of the same values.
    pub(crate) fn shared_storage(&self) -> Arc<Storage> {
        self.inner.storage.clone()
    }

    /// An address that views of the same values share and no other live
    /// tensor has: which storage this is, for telling aliases apart.
    pub(crate) fn storage_id(&self) -> usize {
        Arc::as_ptr(&self.inner.storage) as usize
    }

    /// Element type of the storage. Ops compute in f32; f16 tensors are for
    /// storage and are converted with [`Tensor::to_dtype`].
    pub fn dtype(&self) -> DType {
        self.buffer().dtype()
    }

    /// Converts the storage between f32 and f16; gradients flow back through
    /// the conversion (in the input's type).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let buffer = self.device().cast(self.buffer(), dtype)?;
        let out = Tensor::from_buffer(self.device(), buffer, self.shape())?;
        let from = self.dtype();
        Ok(crate::ops::record(&[self], out, "to_dtype", move |g| {
            Ok(vec![Some(g.to_dtype(from)?)])
        }))
    }

    /// Reads the values back as f32 (waits for the GPU, unless the tensor
    /// keeps a host copy: see [`Tensor::from_slice_with_host_copy`]).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        if let Some(values) = self.host_copy() {
            return Ok(values.to_vec());
        }
        match self.dtype() {
            DType::F16 => self.inner.device.read_f16_as_f32(self.buffer()),
            _ => self.inner.device.read::<f32>(self.buffer()),
        }
    }

    /// The host copy of the values, while it still matches the buffer.
    fn host_copy(&self) -> Option<&[f32]> {
        let storage = &self.inner.storage;
        let unwritten = storage.version.load(Ordering::Acquire) == 0;
        storage.host.as_deref().filter(|_| unwritten)
    }

    /// The value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(DeviceError::Shape {
                op: "item",
                message: format!("needs one element, shape is {:?}", self.shape()),
            });
        }
        Ok(self.to_vec()?[0])
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    /// In-place writes so far (see `Storage::version`).
    pub(crate) fn version(&self) -> u64 {
        self.inner.storage.version.load(Ordering::Acquire)
    }

    /// Records an in-place write of the values.
    pub(crate) fn bump_version(&self) {
        self.inner.storage.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Overwrites the values in place with `values` (same shape and type),
    /// so every holder of this tensor (an optimizer, a layer) sees them.
    /// A graph recorded from the old values refuses its backward pass
    /// afterwards rather than mixing old and new values, as PyTorch does.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), kiln_device::DeviceError> {
    /// use kiln_graph::{Device, Tensor};
    /// let device = Device::new()?;
    /// let w = Tensor::zeros(&device, &[2])?;
    /// w.assign(&Tensor::from_slice(&device, &[1.0, 2.0], &[2])?)?;
    /// assert_eq!(w.to_vec()?, [1.0, 2.0]);
    /// # Ok(()) }
    /// ```
    pub fn assign(&self, values: &Tensor) -> Result<()> {
        if values.shape() != self.shape() || values.dtype() != self.dtype() {
            return Err(DeviceError::Shape {
                op: "assign",
                message: format!(
                    "cannot write {:?} {:?} values into a {:?} {:?} tensor",
                    values.shape(),
                    values.dtype(),
                    self.shape(),
                    self.dtype()
                ),
            });
        }
        self.device().copy_into(values.buffer(), self.buffer())?;
        self.bump_version();
        Ok(())
    }

    /// Whether `self` and `other` are handles to one tensor (clones share
    /// values and gradient), not merely equal values.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), kiln_device::DeviceError> {
    /// use kiln_graph::{Device, Tensor};
    /// let device = Device::new()?;
    /// let w = Tensor::ones(&device, &[3])?;
    /// assert!(w.same_as(&w.clone()));
    /// assert!(!w.same_as(&Tensor::ones(&device, &[3])?));
    /// # Ok(()) }
    /// ```
    pub fn same_as(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub(crate) fn grad_fn(&self) -> Option<&GradFn> {
        self.inner.grad_fn.as_ref()
    }

    pub(crate) fn accumulate_grad(&self, grad: Tensor) -> Result<()> {
        let mut slot = lock(&self.inner.grad);
        // The gradient so far stays in place if the sum fails.
        let total = match slot.as_ref() {
            Some(previous) => autograd::add_grads(previous, &grad)?,
            None => grad,
        };
        *slot = Some(total);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = self.grad_fn().map(|g| g.op).unwrap_or("leaf");
        write!(
            f,
            "Tensor({:?}, {op}, requires_grad={})",
            self.shape(),
            self.is_requires_grad()
        )
    }
}
