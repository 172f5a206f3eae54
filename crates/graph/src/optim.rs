//! Optimizers: one fused GPU kernel per parameter tensor updates the parameter
//! and its state in place. Frozen parameters (`requires_grad == false`) and ones
//! without a gradient are skipped.

use crate::tensor::Tensor;
use kiln_device::{DType, GpuBuffer, Result};

const SGD_SRC: &str = include_str!("../../../shaders/sgd.wgsl");
const ADAM_SRC: &str = include_str!("../../../shaders/adam.wgsl");

/// What every optimizer offers a training loop.
pub trait Optimizer {
    /// Applies one update from the parameters' current gradients.
    fn step(&mut self) -> Result<()>;
    /// The parameters it updates.
    fn params(&self) -> &[Tensor];
    fn learning_rate(&self) -> f32;
    fn set_learning_rate(&mut self, lr: f32);
    /// Clears every parameter's gradient.
    fn zero_grad(&self) {
        for p in self.params() {
            p.zero_grad();
        }
    }
}

/// The parameters to update this step with their gradients.
fn updatable(params: &[Tensor]) -> impl Iterator<Item = (usize, &Tensor, Tensor)> {
    params
        .iter()
        .enumerate()
        .filter(|(_, p)| p.is_requires_grad())
        .filter_map(|(i, p)| p.grad().map(|g| (i, p, g)))
}

/// A zeroed state buffer shaped like `param`, made on first use.
fn state<'a>(slot: &'a mut Option<GpuBuffer>, param: &Tensor) -> Result<&'a GpuBuffer> {
    if slot.is_none() {
        *slot = Some(param.device().zeros(param.numel(), DType::F32)?);
    }
    Ok(slot.as_ref().expect("just filled"))
}

/// Stochastic gradient descent with optional momentum, Nesterov momentum and
/// (L2) weight decay, as in PyTorch.
///
/// ```no_run
/// # fn main() -> Result<(), kiln_device::DeviceError> {
/// use kiln_graph::{optim::{Optimizer, Sgd}, Device, Tensor};
/// let device = Device::new()?;
/// let w = Tensor::ones(&device, &[3])?.requires_grad(true);
/// let mut opt = Sgd::new(vec![w.clone()], 0.1).momentum(0.9);
/// w.square()?.sum_all()?.backward()?;
/// opt.step()?;
/// opt.zero_grad();
/// # Ok(()) }
/// ```
pub struct Sgd {
    params: Vec<Tensor>,
    lr: f32,
    momentum: f32,
    nesterov: bool,
    weight_decay: f32,
    velocity: Vec<Option<GpuBuffer>>,
}

impl Sgd {
    pub fn new(params: Vec<Tensor>, lr: f32) -> Self {
        let velocity = params.iter().map(|_| None).collect();
        Self {
            params,
            lr,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            velocity,
        }
    }

    pub fn momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }

    pub fn nesterov(mut self, nesterov: bool) -> Self {
        self.nesterov = nesterov;
        self
    }

    pub fn weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SgdParams {
    n: u32,
    row_threads: u32,
    nesterov: u32,
    _pad: u32,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    _pad2: f32,
}

impl Optimizer for Sgd {
    fn step(&mut self) -> Result<()> {
        for (i, p, g) in updatable(&self.params) {
            let device = p.device();
            let kernel = device.kernel("sgd", || SGD_SRC.to_string())?;
            let (grid, row_threads) = device.linear_grid(p.numel())?;
            // Without momentum the kernel never reads the velocity: any buffer will do.
            let velocity = if self.momentum != 0.0 {
                state(&mut self.velocity[i], p)?
            } else {
                state(&mut self.velocity[i], &Tensor::zeros(device, &[1])?)?
            };
            let params = SgdParams {
                n: p.numel() as u32,
                row_threads,
                nesterov: u32::from(self.nesterov),
                _pad: 0,
                lr: self.lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                _pad2: 0.0,
            };
            device.dispatch(
                &kernel,
                bytemuck::bytes_of(&params),
                &[p.buffer(), g.buffer(), velocity],
                grid,
            )?;
        }
        Ok(())
    }

    fn params(&self) -> &[Tensor] {
        &self.params
    }

    fn learning_rate(&self) -> f32 {
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f32) {
        self.lr = lr;
    }
}

/// Adam, or AdamW with [`Adam::decoupled_weight_decay`], as in PyTorch.
pub struct Adam {
    params: Vec<Tensor>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    decoupled: bool,
    step: u32,
    m: Vec<Option<GpuBuffer>>,
    v: Vec<Option<GpuBuffer>>,
}

impl Adam {
    /// Adam with PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, no decay.
    pub fn new(params: Vec<Tensor>, lr: f32) -> Self {
        let empty = || params.iter().map(|_| None).collect();
        Self {
            m: empty(),
            v: empty(),
            params,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
            step: 0,
        }
    }

    /// AdamW: weight decay applied to the weights directly, not via the gradient.
    pub fn adamw(params: Vec<Tensor>, lr: f32, weight_decay: f32) -> Self {
        Self {
            weight_decay,
            decoupled: true,
            ..Self::new(params, lr)
        }
    }

    pub fn betas(mut self, beta1: f32, beta2: f32) -> Self {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self
    }

    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// L2 weight decay added to the gradient (Adam's original form).
    pub fn weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    pub fn decoupled_weight_decay(mut self, decoupled: bool) -> Self {
        self.decoupled = decoupled;
        self
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamParams {
    n: u32,
    row_threads: u32,
    decoupled: u32,
    _pad: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
    _pad2: f32,
}

impl Optimizer for Adam {
    fn step(&mut self) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        // Bias corrections in f64 so late steps do not lose them to rounding.
        let bc1 = (1.0 - f64::from(self.beta1).powi(t)) as f32;
        let bc2 = (1.0 - f64::from(self.beta2).powi(t)) as f32;
        for (i, p, g) in updatable(&self.params) {
            let device = p.device();
            let kernel = device.kernel("adam", || ADAM_SRC.to_string())?;
            let (grid, row_threads) = device.linear_grid(p.numel())?;
            let m = state(&mut self.m[i], p)?;
            let v = state(&mut self.v[i], p)?;
            let params = AdamParams {
                n: p.numel() as u32,
                row_threads,
                decoupled: u32::from(self.decoupled),
                _pad: 0,
                lr: self.lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
                bc1,
                bc2,
                _pad2: 0.0,
            };
            device.dispatch(
                &kernel,
                bytemuck::bytes_of(&params),
                &[p.buffer(), g.buffer(), m, v],
                grid,
            )?;
        }
        Ok(())
    }

    fn params(&self) -> &[Tensor] {
        &self.params
    }

    fn learning_rate(&self) -> f32 {
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f32) {
        self.lr = lr;
    }
}
