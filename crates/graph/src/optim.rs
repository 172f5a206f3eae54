//! Optimizers: one generated GPU kernel updates a group of parameter tensors
//! and their state in place, so a model's whole update is a few dispatches
//! rather than one per tensor. Each optimizer's WGSL is only its per-element
//! rule (`fn update`); the grouping is generated. Frozen parameters
//! (`requires_grad == false`) and ones without a gradient are skipped.

use crate::tensor::Tensor;
use kiln_device::kernels::expect_f32;
use kiln_device::{DType, GpuBuffer, Result};

const SGD_SRC: &str = include_str!("../../../shaders/sgd.wgsl");
const ADAM_SRC: &str = include_str!("../../../shaders/adam.wgsl");
const RMSPROP_SRC: &str = include_str!("../../../shaders/rmsprop.wgsl");

/// An optimizer's internal state, for checkpoints: the step count and named
/// per-parameter buffers (e.g. `m.0`, `v.0` for Adam's moments of parameter 0).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState {
    /// Updates applied so far (Adam's bias correction reads it; 0 for the others).
    pub step: u64,
    /// Named state buffers, one flat f32 vector per parameter that has one.
    pub tensors: Vec<(String, Vec<f32>)>,
}

/// What every optimizer offers a training loop.
pub trait Optimizer {
    /// Applies one update from the parameters' current gradients.
    fn step(&mut self) -> Result<()> {
        self.step_scaled(1.0)
    }
    /// Applies one update from the gradients multiplied by `grad_scale`,
    /// inside the update kernel (loss scaling divides them back this way).
    /// Runs [`Optimizer::check`] first: on an error nothing has changed.
    fn step_scaled(&mut self, grad_scale: f32) -> Result<()>;
    /// Checks, without changing anything, that a step can run: settings in
    /// range and f32 parameters and gradients. (What a caller stepping
    /// several optimizers together asks each before stepping any.)
    fn check(&self) -> Result<()> {
        Ok(())
    }
    /// Reads the state back for a checkpoint.
    fn state(&self) -> Result<OptimizerState>;
    /// Restores a state saved by [`Optimizer::state`] for the same parameters.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
    /// The parameters it updates.
    fn params(&self) -> &[Tensor];
    /// The learning rate the next step uses.
    fn learning_rate(&self) -> f32;
    /// Sets the learning rate for later steps (what an [`LrSchedule`] drives).
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

/// The state buffers of each kind in `kinds` (`kind.i` for parameter `i`;
/// `None` where the state has none), each checked against its parameter.
fn read_slots<const KINDS: usize>(
    state: &OptimizerState,
    kinds: [&str; KINDS],
    params: &[Tensor],
) -> Result<[Vec<Option<GpuBuffer>>; KINDS]> {
    let mismatch = |message: String| kiln_device::DeviceError::Shape {
        op: "load_state",
        message,
    };
    // Every buffer is checked before any is uploaded, and the optimizer
    // takes the new slots only when all are read: a state that does not fit
    // leaves it as it was.
    let mut checked = Vec::with_capacity(state.tensors.len());
    for (name, values) in &state.tensors {
        let slot = name.rsplit_once('.').and_then(|(kind, i)| {
            let k = kinds.iter().position(|&x| x == kind)?;
            let i: usize = i.parse().ok()?;
            (i < params.len()).then_some((k, i))
        });
        let Some((k, i)) = slot else {
            return Err(mismatch(format!(
                "state {name} is not this optimizer's (it keeps {kinds:?} for {} parameters); \
                 the state belongs to another optimizer or model",
                params.len()
            )));
        };
        if values.len() != params[i].numel() {
            return Err(mismatch(format!(
                "{name} holds {} values but parameter {i} has shape {:?}; the state belongs to another model",
                values.len(),
                params[i].shape()
            )));
        }
        checked.push((k, i, values));
    }
    let mut slots = kinds.map(|_| params.iter().map(|_| None).collect::<Vec<_>>());
    for (k, i, values) in checked {
        slots[k][i] = Some(params[i].device().upload(values)?);
    }
    Ok(slots)
}

/// What every optimizer checks of its parameters before a step: the update
/// kernel reads parameters and gradients as f32, and updates each parameter
/// it steps once. One listed twice (or two views of one storage) would be
/// updated twice in one dispatch, by invocations racing for its elements;
/// frozen ones are never written, so they may repeat.
fn check_params(params: &[Tensor]) -> Result<()> {
    let mut seen = std::collections::HashMap::with_capacity(params.len());
    for (i, p, _) in updatable(params) {
        if let Some(first) = seen.insert(p.storage_id(), i) {
            return Err(kiln_device::DeviceError::Shape {
                op: "optimizer step",
                message: format!(
                    "parameters {first} and {i} are the same tensor (or views of one), which \
                     one step would update twice; list each parameter once (as \
                     Sequential::parameters does)"
                ),
            });
        }
    }
    for (_, param, grad) in updatable(params) {
        expect_f32("optimizer step", "a parameter", param.buffer())?;
        expect_f32("optimizer step", "a gradient", grad.buffer())?;
    }
    Ok(())
}

/// One tensor of a grouped update: the parameter (updated in place), its
/// gradient and its state buffers.
struct UpdateItem<'a> {
    param: &'a Tensor,
    grad: Tensor,
    states: Vec<&'a GpuBuffer>,
}

/// Most tensors one grouped kernel updates (its ranges and lengths live in two
/// vec4s each of the parameter block).
const MAX_GROUP: usize = 8;

/// Updates every parameter that has a gradient with the optimizer rule
/// `rule` (WGSL declaring `struct Hyper` and
/// `fn update(x, g, s: vec2<f32>) -> Step`), `hyper` being the bytes of its
/// `Hyper`. Each kind of state in `slots` gives every parameter one buffer,
/// made on first use and read and written by the rule. Gradients are
/// multiplied by `grad_scale` first. Tensors go in groups as large as the
/// adapter's storage-binding limit allows, one dispatch per group. Callers
/// run [`Optimizer::check`] first: the kernel reads every tensor as f32.
fn update_grouped(
    name: &str,
    rule: &'static str,
    hyper: &[u8],
    grad_scale: f32,
    params: &[Tensor],
    slots: &mut [&mut Vec<Option<GpuBuffer>>],
) -> Result<()> {
    let states = slots.len();
    // The dtypes were checked by the caller's `Optimizer::check`, before
    // anything changed.
    ensure_states(params, slots)?;
    let items = update_items(params, slots);
    let Some(first) = items.first() else {
        return Ok(());
    };
    let device = first.param.device();
    let per_tensor = 2 + states;
    let bindings = device.limits().max_storage_buffers_per_shader_stage as usize;
    let group = (bindings / per_tensor).clamp(1, MAX_GROUP);
    for chunk in items.chunks(group) {
        let kernel = device.kernel(&format!("{name}:{states}:{}", chunk.len()), || {
            grouped_source(rule, states, chunk.len())
        })?;
        // Ranges in vec4s (see `grouped_source`), lengths in elements.
        let mut ends = [0u32; MAX_GROUP];
        let mut lens = [0u32; MAX_GROUP];
        let mut total = 0usize;
        for (k, item) in chunk.iter().enumerate() {
            let too_large = || kiln_device::DeviceError::Shape {
                op: "optimizer step",
                message: format!(
                    "a parameter of {} elements is too large for one update group",
                    item.param.numel()
                ),
            };
            total += item.param.numel().div_ceil(4);
            ends[k] = u32::try_from(total).map_err(|_| too_large())?;
            lens[k] = u32::try_from(item.param.numel()).map_err(|_| too_large())?;
        }
        let (grid, row_threads) = device.linear_grid(total)?;
        let mut block = hyper.to_vec();
        block.extend_from_slice(bytemuck::cast_slice(&ends));
        block.extend_from_slice(bytemuck::cast_slice(&lens));
        block.extend_from_slice(bytemuck::cast_slice(&[
            row_threads,
            grad_scale.to_bits(),
            0,
            0,
        ]));
        let mut buffers = Vec::with_capacity(chunk.len() * per_tensor);
        for item in chunk {
            buffers.push(item.param.buffer());
            buffers.push(item.grad.buffer());
            buffers.extend(item.states.iter().copied());
        }
        device.dispatch(&kernel, &block, &buffers, grid)?;
        for item in chunk {
            item.param.bump_version();
        }
    }
    Ok(())
}

/// The WGSL of a kernel updating `count` tensors with `states` state buffers
/// each. Invocation `i` updates four consecutive elements, read and written
/// as one vec4 of each buffer (CPU adapters turn every storage access into a
/// per-lane loop, so four elements per access is about four times faster
/// there, and GPUs coalesce the wider accesses). It finds its tensor from the
/// cumulative vec4 counts and applies the optimizer's scalar `update` to each
/// element. Pool buffers are whole multiples of 16 bytes, so a tensor's last
/// vec4 is always in its buffer; the lanes past its elements are written as
/// zero rather than left to whatever the rule makes of leftover bytes.
fn grouped_source(rule: &str, states: usize, count: usize) -> String {
    let mut src = String::from("struct Step {\n    x: f32,\n    s: vec2<f32>,\n}\n\n");
    src.push_str(rule);
    src.push_str(
        "\nstruct Params {\n    hyper: Hyper,\n    ends: array<vec4<u32>, 2>,\n    lens: array<vec4<u32>, 2>,\n    row_threads: u32,\n    grad_scale: f32,\n    _pad: vec2<u32>,\n}\n\n@group(0) @binding(0) var<uniform> p: Params;\n",
    );
    let mut binding = 1;
    for k in 0..count {
        src.push_str(&format!(
            "@group(0) @binding({binding}) var<storage, read_write> param{k}: array<vec4<f32>>;\n@group(0) @binding({}) var<storage, read> grad{k}: array<vec4<f32>>;\n",
            binding + 1
        ));
        binding += 2;
        for j in 0..states {
            src.push_str(&format!(
                "@group(0) @binding({binding}) var<storage, read_write> state{k}_{j}: array<vec4<f32>>;\n"
            ));
            binding += 1;
        }
    }
    src.push_str(
        "\n@compute @workgroup_size(256)\nfn main(@builtin(global_invocation_id) gid: vec3<u32>) {\n    let i = gid.y * p.row_threads + gid.x;\n",
    );
    let entry =
        |array: &str, k: usize| format!("p.{array}[{}].{}", k / 4, ["x", "y", "z", "w"][k % 4]);
    for k in 0..count {
        let start = if k == 0 {
            "0u".to_string()
        } else {
            entry("ends", k - 1)
        };
        src.push_str(&format!(
            "    if (i < {}) {{\n        let e = i - {start};\n        let x = param{k}[e];\n        let g = grad{k}[e] * p.grad_scale;\n",
            entry("ends", k)
        ));
        for j in 0..2 {
            let value = if j < states {
                format!("state{k}_{j}[e]")
            } else {
                "vec4<f32>(0.0)".into()
            };
            src.push_str(&format!("        let s{j} = {value};\n"));
        }
        for c in ["x", "y", "z", "w"] {
            src.push_str(&format!(
                "        let r{c} = update(x.{c}, g.{c}, vec2<f32>(s0.{c}, s1.{c}));\n"
            ));
        }
        src.push_str(&format!(
            "        let valid = vec4<u32>(e * 4u) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>({});\n        param{k}[e] = select(vec4<f32>(0.0), vec4<f32>(rx.x, ry.x, rz.x, rw.x), valid);\n",
            entry("lens", k)
        ));
        for (j, lane) in ["x", "y"].iter().enumerate().take(states) {
            src.push_str(&format!(
                "        state{k}_{j}[e] = select(vec4<f32>(0.0), vec4<f32>(rx.s.{lane}, ry.s.{lane}, rz.s.{lane}, rw.s.{lane}), valid);\n"
            ));
        }
        src.push_str("        return;\n    }\n");
    }
    src.push_str("}\n");
    src
}

/// Makes the state buffers in `slots` (one list per kind of state) of every
/// parameter about to be updated.
fn ensure_states(params: &[Tensor], slots: &mut [&mut Vec<Option<GpuBuffer>>]) -> Result<()> {
    for (i, p, _) in updatable(params) {
        for kind in slots.iter_mut() {
            state(&mut kind[i], p)?;
        }
    }
    Ok(())
}

/// The parameters to update with their gradients and state buffers (made by
/// [`ensure_states`]).
fn update_items<'a>(
    params: &'a [Tensor],
    slots: &'a [&mut Vec<Option<GpuBuffer>>],
) -> Vec<UpdateItem<'a>> {
    updatable(params)
        .map(|(i, param, grad)| UpdateItem {
            param,
            grad,
            states: slots
                .iter()
                .map(|kind| kind[i].as_ref().expect("made by ensure_states"))
                .collect(),
        })
        .collect()
}

/// Where an optimizer setting may lie. Outside, the update kernel would
/// quietly wreck the weights: NaN from a bias correction of 0 (a beta of 1),
/// ascent from a negative rate, a running average that goes negative.
#[derive(Clone, Copy)]
enum Allowed {
    /// A finite number, at least 0.
    NonNegative,
    /// In [0, 1).
    BelowOne,
    /// In [0, 1].
    UpToOne,
}

impl Allowed {
    fn admits(self, v: f32) -> bool {
        match self {
            Allowed::NonNegative => v.is_finite() && v >= 0.0,
            Allowed::BelowOne => (0.0..1.0).contains(&v),
            Allowed::UpToOne => (0.0..=1.0).contains(&v),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Allowed::NonNegative => "a finite number, at least 0",
            Allowed::BelowOne => "in [0, 1)",
            Allowed::UpToOne => "in [0, 1]",
        }
    }
}

/// Refuses, before an update, any of `optimizer`'s `settings` outside where
/// it may lie.
fn check_settings(optimizer: &str, settings: &[(&str, f32, Allowed)]) -> Result<()> {
    match settings.iter().find(|(_, v, allowed)| !allowed.admits(*v)) {
        Some((name, v, allowed)) => Err(kiln_device::DeviceError::Shape {
            op: "optimizer step",
            message: format!("{optimizer}: {name} {v} must be {}", allowed.describe()),
        }),
        None => Ok(()),
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
    /// Plain SGD with PyTorch's defaults: no momentum, no Nesterov, no weight decay.
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

    /// Momentum factor (default 0, off): `v = momentum * v + g`, then `x -= lr * v`.
    pub fn momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }

    /// Nesterov momentum, stepping by `g + momentum * v` (default off; needs
    /// momentum to matter).
    pub fn nesterov(mut self, nesterov: bool) -> Self {
        self.nesterov = nesterov;
        self
    }

    /// L2 penalty added to the gradient as `weight_decay * x` (default 0).
    pub fn weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }
}

/// `Hyper` of shaders/sgd.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SgdHyper {
    nesterov: u32,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
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
        [self.velocity] = read_slots(state, ["velocity"], &self.params)?;
        Ok(())
    }

    fn check(&self) -> Result<()> {
        check_settings(
            "SGD",
            &[
                ("learning rate", self.lr, Allowed::NonNegative),
                ("momentum", self.momentum, Allowed::NonNegative),
                ("weight decay", self.weight_decay, Allowed::NonNegative),
            ],
        )?;
        check_params(&self.params)
    }

    fn step_scaled(&mut self, grad_scale: f32) -> Result<()> {
        self.check()?;
        let hyper = SgdHyper {
            nesterov: u32::from(self.nesterov),
            lr: self.lr,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
        };
        // The velocity exists only with momentum.
        let mut slots = if self.momentum != 0.0 {
            vec![&mut self.velocity]
        } else {
            Vec::new()
        };
        let hyper = bytemuck::bytes_of(&hyper);
        update_grouped("sgd", SGD_SRC, hyper, grad_scale, &self.params, &mut slots)
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

/// Adam, or AdamW with [`Adam::decoupled_weight_decay`], as in PyTorch,
/// except for one thing: the bias corrections count the optimizer's steps,
/// as Keras's `iterations` does, where PyTorch counts each parameter's own
/// updates. The two differ only for a parameter that sat out steps (frozen,
/// then unfrozen): its first updates here are corrected as late steps, so
/// they are larger than PyTorch's, up to a few times `lr`, until its moment
/// averages fill.
///
/// ```
/// # fn main() -> kiln_device::Result<()> {
/// use kiln_graph::{optim::{Adam, Optimizer}, Device, Tensor};
/// let device = Device::new()?;
/// let w = Tensor::from_slice(&device, &[1.0, -2.0], &[2])?.requires_grad(true);
/// let mut opt = Adam::new(vec![w.clone()], 0.1);
/// w.square()?.sum_all()?.backward()?;
/// opt.step()?;
/// opt.zero_grad();
/// // Adam's first step moves each weight by about `lr` against its gradient's sign.
/// let w = w.to_vec()?;
/// assert!((w[0] - 0.9).abs() < 1e-5 && (w[1] + 1.9).abs() < 1e-5);
/// assert!(opt.params()[0].grad().is_none());
/// # Ok(()) }
/// ```
pub struct Adam {
    params: Vec<Tensor>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    decoupled: bool,
    step: u64,
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

    /// Decay rates of the first and second moment averages (default 0.9, 0.999).
    pub fn betas(mut self, beta1: f32, beta2: f32) -> Self {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self
    }

    /// Added to the denominator `sqrt(v_hat)` for stability (default 1e-8).
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// L2 weight decay added to the gradient (Adam's original form).
    pub fn weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    /// With `true`, weight decay shrinks the weights directly by
    /// `lr * weight_decay` each step (AdamW) instead of joining the gradient
    /// (default `false`, or `true` through [`Adam::adamw`]).
    pub fn decoupled_weight_decay(mut self, decoupled: bool) -> Self {
        self.decoupled = decoupled;
        self
    }
}

/// `Hyper` of shaders/adam.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamHyper {
    decoupled: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
}

impl Optimizer for Adam {
    fn state(&self) -> Result<OptimizerState> {
        let mut state = OptimizerState {
            step: self.step,
            tensors: Vec::new(),
        };
        save_slots(&mut state.tensors, "m", &self.m, &self.params)?;
        save_slots(&mut state.tensors, "v", &self.v, &self.params)?;
        Ok(state)
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        [self.m, self.v] = read_slots(state, ["m", "v"], &self.params)?;
        self.step = state.step;
        Ok(())
    }

    fn check(&self) -> Result<()> {
        check_settings(
            "Adam",
            &[
                ("learning rate", self.lr, Allowed::NonNegative),
                ("beta1", self.beta1, Allowed::BelowOne),
                ("beta2", self.beta2, Allowed::BelowOne),
                ("eps", self.eps, Allowed::NonNegative),
                ("weight decay", self.weight_decay, Allowed::NonNegative),
            ],
        )?;
        check_params(&self.params)
    }

    fn step_scaled(&mut self, grad_scale: f32) -> Result<()> {
        self.check()?;
        // Saturating: a checkpoint can carry any count. Counted once the
        // update is recorded, so a step that fails does not count.
        let step = self.step.saturating_add(1);
        // Past 2^31 steps the corrections are 1 to f64 precision anyway.
        let t = i32::try_from(step).unwrap_or(i32::MAX);
        // Bias corrections in f64 so late steps do not lose them to rounding.
        let bc1 = (1.0 - f64::from(self.beta1).powi(t)) as f32;
        let bc2 = (1.0 - f64::from(self.beta2).powi(t)) as f32;
        let hyper = AdamHyper {
            decoupled: u32::from(self.decoupled),
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            bc1,
            bc2,
        };
        update_grouped(
            "adam",
            ADAM_SRC,
            bytemuck::bytes_of(&hyper),
            grad_scale,
            &self.params,
            &mut [&mut self.m, &mut self.v],
        )?;
        self.step = step;
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

/// RMSProp with optional momentum and L2 weight decay, as PyTorch computes
/// it: `g / (sqrt(s) + eps)`, with its defaults alpha 0.99 and eps 1e-8.
/// Keras differs in both: rho = alpha = 0.9, and eps 1e-7 inside the root,
/// `g / sqrt(s + eps)`, which bounds the step where gradients are tiny far
/// more (for Keras-like steps there, raise eps to about its square root).
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
    /// RMSProp with PyTorch's defaults: alpha 0.99, eps 1e-8, no momentum, no
    /// weight decay.
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

    /// Smoothing constant of the running average of squared gradients (default 0.99).
    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    /// Added to the denominator `sqrt(square_avg)` for stability (default 1e-8).
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Momentum factor over the normalised steps (default 0, off).
    pub fn momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }

    /// L2 penalty added to the gradient as `weight_decay * x` (default 0).
    pub fn weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }
}

/// `Hyper` of shaders/rmsprop.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RmsPropHyper {
    lr: f32,
    alpha: f32,
    eps: f32,
    weight_decay: f32,
    momentum: f32,
    _pad: [f32; 3],
}

impl Optimizer for RmsProp {
    fn check(&self) -> Result<()> {
        check_settings(
            "RMSProp",
            &[
                ("learning rate", self.lr, Allowed::NonNegative),
                ("alpha", self.alpha, Allowed::UpToOne),
                ("eps", self.eps, Allowed::NonNegative),
                ("weight decay", self.weight_decay, Allowed::NonNegative),
                ("momentum", self.momentum, Allowed::NonNegative),
            ],
        )?;
        check_params(&self.params)
    }

    fn step_scaled(&mut self, grad_scale: f32) -> Result<()> {
        self.check()?;
        let hyper = RmsPropHyper {
            lr: self.lr,
            alpha: self.alpha,
            eps: self.eps,
            weight_decay: self.weight_decay,
            momentum: self.momentum,
            _pad: [0.0; 3],
        };
        // The momentum buffer exists only with momentum.
        let mut slots = vec![&mut self.square_avg];
        if self.momentum != 0.0 {
            slots.push(&mut self.momentum_buf);
        }
        let hyper = bytemuck::bytes_of(&hyper);
        update_grouped(
            "rmsprop",
            RMSPROP_SRC,
            hyper,
            grad_scale,
            &self.params,
            &mut slots,
        )
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
        [self.square_avg, self.momentum_buf] =
            read_slots(state, ["square_avg", "momentum"], &self.params)?;
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

/// Refuses a bound for [`clip_grad_norm`] (named `name` in the error) that
/// is not above 0: 0 would stop training and a negative bound turn descent
/// into ascent, both without a sign. Infinity (measure only) is fine.
pub fn check_clip_bound(name: &str, max_norm: f32) -> Result<()> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(kiln_device::DeviceError::Shape {
            op: "clip_grad_norm",
            message: format!(
                "{name} {max_norm} must be above 0 (f32::INFINITY turns clipping off)"
            ),
        });
    }
    Ok(())
}

/// Scales all gradients so their global L2 norm is at most `max_norm` (as
/// PyTorch's `clip_grad_norm_`), entirely on the device. Returns the norm
/// before clipping as a scalar tensor (read it only if you need it).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f32) -> Result<Option<Tensor>> {
    check_clip_bound("max_norm", max_norm)?;
    let _guard = crate::NoGradGuard::new();
    let grads: Vec<(&Tensor, Tensor)> = params
        .iter()
        .filter(|p| p.is_requires_grad())
        .filter_map(|p| p.grad().map(|g| (p, g)))
        .collect();
    if grads.is_empty() {
        return Ok(None);
    }
    // Launched stage by stage (every square, then every sum, then the sums
    // added pairwise) so that inside `Device::together` each stage's
    // independent kernels share dispatches: a model's hundred gradients take
    // tens of dispatches rather than hundreds.
    let squares = grads
        .iter()
        .map(|(_, g)| g.square())
        .collect::<Result<Vec<_>>>()?;
    let mut sums = squares
        .iter()
        .map(|sq| sq.sum_all())
        .collect::<Result<Vec<_>>>()?;
    drop(squares);
    while sums.len() > 1 {
        sums = sums
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => a.add(b),
                [a] => Ok(a.clone()),
                _ => unreachable!("chunks of two"),
            })
            .collect::<Result<Vec<_>>>()?;
    }
    let norm = sums[0].sqrt()?;
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
    /// The learning rate for optimizer step `step` (counting from 0).
    fn lr(&self, step: usize) -> f32;
}

/// Multiplies the rate by `gamma` every `step_size` steps.
#[derive(Clone, Copy, Debug)]
pub struct StepLr {
    /// The rate for the first `step_size` steps.
    pub base: f32,
    /// Steps between decays (0 is taken as 1).
    pub step_size: usize,
    /// Factor applied at each decay (e.g. 0.1).
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
    /// The rate at step 0.
    pub base: f32,
    /// The rate reached at `total_steps` and kept after.
    pub min: f32,
    /// Length of the decay, in steps.
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
    /// Steps of warm-up; step `i` below it gets `(i + 1) / warmup_steps` of
    /// `after`'s first rate.
    pub warmup_steps: usize,
    /// The schedule that follows, started at its own step 0.
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
