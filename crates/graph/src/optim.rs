//! Optimizers: one fused GPU kernel per parameter tensor updates the parameter
//! and its state in place. Frozen parameters (`requires_grad == false`) and ones
//! without a gradient are skipped.

use crate::tensor::Tensor;
use kiln_device::{DType, GpuBuffer, Result};

const SGD_SRC: &str = include_str!("../../../shaders/sgd.wgsl");
const ADAM_SRC: &str = include_str!("../../../shaders/adam.wgsl");
const RMSPROP_SRC: &str = include_str!("../../../shaders/rmsprop.wgsl");

/// An optimizer's internal state, for checkpoints: the step count and named
/// per-parameter buffers (e.g. `m.0`, `v.0` for Adam's moments of parameter 0).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState {
    pub step: u64,
    pub tensors: Vec<(String, Vec<f32>)>,
}

/// What every optimizer offers a training loop.
pub trait Optimizer {
    /// Applies one update from the parameters' current gradients.
    fn step(&mut self) -> Result<()>;
    /// Reads the state back for a checkpoint.
    fn state(&self) -> Result<OptimizerState>;
    /// Restores a state saved by [`Optimizer::state`] for the same parameters.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
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

/// Reads named state buffers back: `prefix.i` for each parameter `i` that has one.
fn save_slots(
    out: &mut Vec<(String, Vec<f32>)>,
    prefix: &str,
    slots: &[Option<GpuBuffer>],
    params: &[Tensor],
) -> Result<()> {
    for (i, slot) in slots.iter().enumerate() {
        if let Some(buffer) = slot {
            out.push((
                format!("{prefix}.{i}"),
                params[i].device().read::<f32>(buffer)?,
            ));
        }
    }
    Ok(())
}

/// Restores `prefix.i` entries into `slots`, checking each against its parameter.
fn load_slots(
    state: &OptimizerState,
    prefix: &str,
    slots: &mut [Option<GpuBuffer>],
    params: &[Tensor],
) -> Result<()> {
    for (i, slot) in slots.iter_mut().enumerate() {
        let name = format!("{prefix}.{i}");
        *slot = match state.tensors.iter().find(|(n, _)| *n == name) {
            Some((_, values)) if values.len() == params[i].numel() => Some(params[i].device().upload(values)?),
            Some((_, values)) => {
                return Err(kiln_device::DeviceError::Shape {
                    op: "load_state",
                    message: format!(
                        "{name} holds {} values but parameter {i} has shape {:?}; the state belongs to another model",
                        values.len(),
                        params[i].shape()
                    ),
                })
            }
            None => None,
        };
    }
    Ok(())
}

/// Runs an optimizer's update kernel on one parameter. Bindings: the parameter
/// (updated in place), its gradient, then `states`. `block` builds the kernel's
/// parameter block from the element count and the grid's `row_threads`.
fn launch(
    name: &str,
    source: &'static str,
    param: &Tensor,
    grad: &Tensor,
    states: &[&GpuBuffer],
    block: impl FnOnce(u32, u32) -> Vec<u8>,
) -> Result<()> {
    let device = param.device();
    let kernel = device.kernel(name, || source.to_string())?;
    let (grid, row_threads) = device.linear_grid(param.numel())?;
    let mut buffers = vec![param.buffer(), grad.buffer()];
    buffers.extend_from_slice(states);
    device.dispatch(
        &kernel,
        &block(param.numel() as u32, row_threads),
        &buffers,
        grid,
    )
}

/// A state buffer the kernel reads only when `used`; otherwise a one-element
/// stand-in, since every binding needs some buffer.
fn optional_state<'a>(
    slot: &'a mut Option<GpuBuffer>,
    param: &Tensor,
    used: bool,
) -> Result<&'a GpuBuffer> {
    if used {
        state(slot, param)
    } else {
        state(slot, &Tensor::zeros(param.device(), &[1])?)
    }
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
    fn state(&self) -> Result<OptimizerState> {
        let mut state = OptimizerState::default();
        if self.momentum != 0.0 {
            save_slots(&mut state.tensors, "velocity", &self.velocity, &self.params)?;
        }
        Ok(state)
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        load_slots(state, "velocity", &mut self.velocity, &self.params)
    }

    fn step(&mut self) -> Result<()> {
        for (i, p, g) in updatable(&self.params) {
            let velocity = optional_state(&mut self.velocity[i], p, self.momentum != 0.0)?;
            launch("sgd", SGD_SRC, p, &g, &[velocity], |n, row_threads| {
                bytemuck::bytes_of(&SgdParams {
                    n,
                    row_threads,
                    nesterov: u32::from(self.nesterov),
                    _pad: 0,
                    lr: self.lr,
                    momentum: self.momentum,
                    weight_decay: self.weight_decay,
                    _pad2: 0.0,
                })
                .to_vec()
            })?;
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
    fn state(&self) -> Result<OptimizerState> {
        let mut state = OptimizerState {
            step: u64::from(self.step),
            tensors: Vec::new(),
        };
        save_slots(&mut state.tensors, "m", &self.m, &self.params)?;
        save_slots(&mut state.tensors, "v", &self.v, &self.params)?;
        Ok(state)
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        load_slots(state, "m", &mut self.m, &self.params)?;
        load_slots(state, "v", &mut self.v, &self.params)?;
        self.step = state.step as u32;
        Ok(())
    }

    fn step(&mut self) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        // Bias corrections in f64 so late steps do not lose them to rounding.
        let bc1 = (1.0 - f64::from(self.beta1).powi(t)) as f32;
        let bc2 = (1.0 - f64::from(self.beta2).powi(t)) as f32;
        for (i, p, g) in updatable(&self.params) {
            let m = state(&mut self.m[i], p)?;
            let v = state(&mut self.v[i], p)?;
            launch("adam", ADAM_SRC, p, &g, &[m, v], |n, row_threads| {
                bytemuck::bytes_of(&AdamParams {
                    n,
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
                })
                .to_vec()
            })?;
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

/// RMSProp with optional momentum and L2 weight decay (PyTorch's defaults:
/// alpha 0.99, eps 1e-8; Keras uses rho = alpha = 0.9, eps 1e-7).
pub struct RmsProp {
    params: Vec<Tensor>,
    lr: f32,
    alpha: f32,
    eps: f32,
    weight_decay: f32,
    momentum: f32,
    square_avg: Vec<Option<GpuBuffer>>,
    momentum_buf: Vec<Option<GpuBuffer>>,
}

impl RmsProp {
    pub fn new(params: Vec<Tensor>, lr: f32) -> Self {
        let empty = || params.iter().map(|_| None).collect();
        Self {
            square_avg: empty(),
            momentum_buf: empty(),
            params,
            lr,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
        }
    }

    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    pub fn momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }

    pub fn weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RmsPropParams {
    n: u32,
    row_threads: u32,
    _pad: [u32; 2],
    lr: f32,
    alpha: f32,
    eps: f32,
    weight_decay: f32,
    momentum: f32,
    _pad2: [f32; 3],
}

impl Optimizer for RmsProp {
    fn step(&mut self) -> Result<()> {
        for (i, p, g) in updatable(&self.params) {
            let square_avg = state(&mut self.square_avg[i], p)?;
            let momentum_buf = optional_state(&mut self.momentum_buf[i], p, self.momentum != 0.0)?;
            launch(
                "rmsprop",
                RMSPROP_SRC,
                p,
                &g,
                &[square_avg, momentum_buf],
                |n, row_threads| {
                    bytemuck::bytes_of(&RmsPropParams {
                        n,
                        row_threads,
                        _pad: [0; 2],
                        lr: self.lr,
                        alpha: self.alpha,
                        eps: self.eps,
                        weight_decay: self.weight_decay,
                        momentum: self.momentum,
                        _pad2: [0.0; 3],
                    })
                    .to_vec()
                },
            )?;
        }
        Ok(())
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut state = OptimizerState::default();
        save_slots(
            &mut state.tensors,
            "square_avg",
            &self.square_avg,
            &self.params,
        )?;
        if self.momentum != 0.0 {
            save_slots(
                &mut state.tensors,
                "momentum",
                &self.momentum_buf,
                &self.params,
            )?;
        }
        Ok(state)
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        load_slots(state, "square_avg", &mut self.square_avg, &self.params)?;
        load_slots(state, "momentum", &mut self.momentum_buf, &self.params)
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

/// Scales all gradients so their global L2 norm is at most `max_norm` (as
/// PyTorch's `clip_grad_norm_`), entirely on the device. Returns the norm
/// before clipping as a scalar tensor (read it only if you need it).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f32) -> Result<Option<Tensor>> {
    let _guard = crate::NoGradGuard::new();
    let grads: Vec<(&Tensor, Tensor)> = params
        .iter()
        .filter(|p| p.is_requires_grad())
        .filter_map(|p| p.grad().map(|g| (p, g)))
        .collect();
    let Some(first) = grads.first() else {
        return Ok(None);
    };
    let mut total = first.1.square()?.sum_all()?;
    for (_, g) in &grads[1..] {
        total = total.add(&g.square()?.sum_all()?)?;
    }
    let norm = total.sqrt()?;
    let scale = crate::ops::arith::map(
        &kiln_device::Elementwise::new("clip_scale", "min(1.0, s0 / (x0 + 1e-6))")
            .scalars(&[max_norm]),
        &[&norm],
    )?;
    for (p, g) in grads {
        p.set_grad(Some(g.mul(&scale)?));
    }
    Ok(Some(norm))
}

/// A learning rate as a function of the optimizer step (0-based).
pub trait LrSchedule {
    fn lr(&self, step: usize) -> f32;
}

/// Multiplies the rate by `gamma` every `step_size` steps.
#[derive(Clone, Copy, Debug)]
pub struct StepLr {
    pub base: f32,
    pub step_size: usize,
    pub gamma: f32,
}

impl LrSchedule for StepLr {
    fn lr(&self, step: usize) -> f32 {
        self.base * self.gamma.powi((step / self.step_size.max(1)) as i32)
    }
}

/// Cosine decay from `base` to `min` over `total_steps`, then `min`.
#[derive(Clone, Copy, Debug)]
pub struct CosineLr {
    pub base: f32,
    pub min: f32,
    pub total_steps: usize,
}

impl LrSchedule for CosineLr {
    fn lr(&self, step: usize) -> f32 {
        let t = (step as f32 / self.total_steps.max(1) as f32).min(1.0);
        self.min + 0.5 * (self.base - self.min) * (1.0 + (std::f32::consts::PI * t).cos())
    }
}

/// Linear warm-up from 0 over `warmup_steps`, then `after` (whose steps count
/// from the end of the warm-up).
#[derive(Clone, Copy, Debug)]
pub struct LinearWarmup<S> {
    pub warmup_steps: usize,
    pub after: S,
}

impl<S: LrSchedule> LrSchedule for LinearWarmup<S> {
    fn lr(&self, step: usize) -> f32 {
        if step < self.warmup_steps {
            self.after.lr(0) * (step + 1) as f32 / self.warmup_steps as f32
        } else {
            self.after.lr(step - self.warmup_steps)
        }
    }
}
