//! Mixed precision: inside [`autocast`], matrix products read f16 copies of
//! their operands and keep f16 copies for the backward pass, halving the
//! memory traffic of the products and the memory held for them; products,
//! sums and every other op stay f32, and so do the parameters. Adapters with
//! SHADER_F16 load the halves natively, others unpack them from 32-bit words.
//!
//! Gradients pass through f16 on their way into the products too, where small
//! ones would flush to zero: [`LossScaler`] multiplies the loss before the
//! backward pass and divides the gradients again in the optimizer's update,
//! skipping steps whose gradients overflowed, as PyTorch's `GradScaler`.
//!
//! ```no_run
//! # fn main() -> Result<(), kiln_device::DeviceError> {
//! use kiln_graph::{amp, optim::{Optimizer, Sgd}, Device, Tensor};
//! let device = Device::new()?;
//! let w = Tensor::from_slice(&device, &[0.5, -0.25, 1.0, 2.0], &[2, 2])?.requires_grad(true);
//! let x = Tensor::from_slice(&device, &[1.0, 2.0, 3.0, 4.0], &[2, 2])?;
//! let mut opt = Sgd::new(vec![w.clone()], 0.1);
//! let mut scaler = amp::LossScaler::new();
//! let loss = amp::autocast(|| x.matmul(&w)?.square()?.mean_all())?;
//! opt.zero_grad();
//! scaler.backward(&loss)?;
//! let stepped = scaler.step(&mut opt)?; // false when the step was skipped
//! # Ok(()) }
//! ```

use crate::optim::Optimizer;
use crate::tensor::Tensor;
use kiln_device::{DType, Result};
use std::cell::Cell;

thread_local! {
    static MATMUL_OPERANDS: Cell<DType> = const { Cell::new(DType::F32) };
}

/// The storage type matrix products read their operands in on this thread.
pub(crate) fn matmul_operand_dtype() -> DType {
    MATMUL_OPERANDS.with(Cell::get)
}

/// Restores full-precision products when dropped; see [`autocast`].
pub struct AutocastGuard {
    previous: DType,
}

impl AutocastGuard {
    /// Starts f16 products on this thread until the guard is dropped.
    pub fn new() -> Self {
        Self::with(true)
    }

    /// Products in f16 when `enabled`, else in f32 (so callers can pass a
    /// setting through without branching).
    pub fn with(enabled: bool) -> Self {
        let dtype = if enabled { DType::F16 } else { DType::F32 };
        let previous = MATMUL_OPERANDS.with(|c| c.replace(dtype));
        Self { previous }
    }
}

impl Default for AutocastGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        MATMUL_OPERANDS.with(|c| c.set(self.previous));
    }
}

/// Runs `f` with matrix products on f16 operands (see the module docs). The
/// backward passes of products recorded inside stay f16 wherever they run.
pub fn autocast<T>(f: impl FnOnce() -> T) -> T {
    let _guard = AutocastGuard::new();
    f()
}

/// Dynamic loss scaling for training under [`autocast`], with PyTorch's
/// defaults: start at 2^16, halve on overflow (and skip that step), double
/// after 2000 steps in a row without one.
#[derive(Clone, Debug)]
pub struct LossScaler {
    scale: f32,
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval: u32,
    good_steps: u32,
    skipped: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new()
    }
}

impl LossScaler {
    /// A scaler with PyTorch's defaults (see the type's docs).
    pub fn new() -> Self {
        Self {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            good_steps: 0,
            skipped: 0,
        }
    }

    /// Starts from `scale` instead of 2^16.
    pub fn initial_scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// Grows the scale after `steps` finite steps in a row instead of 2000.
    pub fn growth_interval(mut self, steps: u32) -> Self {
        self.growth_interval = steps.max(1);
        self
    }

    /// The current scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Steps skipped so far because their gradients overflowed.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// Finite steps in a row since the scale last changed; it grows when
    /// they reach the growth interval.
    pub fn good_steps(&self) -> u32 {
        self.good_steps
    }

    /// Puts back the state [`LossScaler::scale`], [`LossScaler::good_steps`]
    /// and [`LossScaler::skipped_steps`] read from a scaler earlier (what a
    /// checkpoint keeps, like PyTorch's `GradScaler.state_dict`), so that a
    /// resumed run scales as the unbroken one would. The growth and backoff
    /// settings stay this scaler's.
    pub fn restore(&mut self, scale: f32, good_steps: u32, skipped_steps: u64) {
        self.scale = scale;
        self.good_steps = good_steps;
        self.skipped = skipped_steps;
    }

    /// Back-propagates `loss * scale`.
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        loss.mul_scalar(self.scale)?.backward()
    }

    /// Applies the optimizer's update with the gradients divided by the
    /// scale, unless one of them is infinite or NaN: then the update is
    /// skipped and the scale halved. Returns whether the update ran. Reads
    /// one number back from the device (a sync), as PyTorch does.
    pub fn step(&mut self, optimizer: &mut dyn Optimizer) -> Result<bool> {
        self.step_all(&mut [optimizer])
    }

    /// [`LossScaler::step`] for several optimizers sharing one loss (e.g. an
    /// encoder's and a head's): all step or none do. To clip gradients, clip
    /// the scaled ones to `max_norm * scale()` before this.
    pub fn step_all(&mut self, optimizers: &mut [&mut dyn Optimizer]) -> Result<bool> {
        // Every optimizer is checked before any steps, so that one refusing
        // its step cannot leave the others a step ahead.
        for optimizer in optimizers.iter() {
            optimizer.check()?;
        }
        let params: Vec<Tensor> = optimizers
            .iter()
            .flat_map(|o| o.params().iter().cloned())
            .collect();
        if !gradients_are_finite(&params)? {
            self.scale = (self.scale * self.backoff_factor).max(f32::MIN_POSITIVE);
            self.good_steps = 0;
            self.skipped += 1;
            return Ok(false);
        }
        for optimizer in optimizers.iter_mut() {
            optimizer.step_scaled(1.0 / self.scale)?;
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.good_steps = 0;
            let grown = self.scale * self.growth_factor;
            if grown.is_finite() {
                self.scale = grown;
            }
        }
        Ok(true)
    }
}

/// True when no gradient of a trainable parameter holds an infinity or NaN.
/// A sum propagates both (and only overflows to infinity for gradients that
/// large, which count as overflowed too), so one sum per gradient suffices.
fn gradients_are_finite(params: &[Tensor]) -> Result<bool> {
    let _guard = crate::NoGradGuard::new();
    let mut total: Option<Tensor> = None;
    for g in params
        .iter()
        .filter(|p| p.is_requires_grad())
        .filter_map(Tensor::grad)
    {
        let s = g.sum_all()?;
        total = Some(match total {
            Some(t) => t.add(&s)?,
            None => s,
        });
    }
    match total {
        Some(t) => Ok(t.item()?.is_finite()),
        None => Ok(true),
    }
}
