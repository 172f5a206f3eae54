//! The backward pass: reverse topological traversal with gradient accumulation,
//! and the `no_grad` switch.

use crate::tensor::Tensor;
use kiln_device::{DType, DeviceError, Result};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};

/// Computes the gradients of one op's inputs from the gradient of its output.
/// Returns one entry per input (`None` where the input needs no gradient).
pub(crate) type BackwardFn = Box<dyn Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// How a tensor was computed: the op's name, its inputs and its backward rule.
pub(crate) struct GradFn {
    pub op: &'static str,
    pub inputs: Vec<Tensor>,
    /// Each input's version when the op ran: a backward pass refuses inputs
    /// written in place since (their saved values are gone).
    pub versions: Vec<u64>,
    pub backward: BackwardFn,
    /// Set when the backward rule starts by multiplying the output's gradient
    /// by a factor computed from the output alone (see [`OutputFactor`]).
    pub output_factor: Option<OutputFactor>,
}

/// An elementwise factor, `expr` of the incoming gradient `x0` and the op's
/// output `x1` (with scalars `s0..s3`), that an op's backward rule applies
/// first: the derivative of an activation fused into the op (ReLU's mask).
/// When the op's output feeds exactly one consumer, that consumer may apply
/// the factor to the gradient it computes (a product's epilogue, say) and
/// mark it with [`mark_factored`]; the op then skips its own kernel.
#[derive(Clone, Debug)]
pub(crate) struct OutputFactor {
    pub expr: String,
    pub scalars: [f32; 4],
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
    /// The id of the seed gradient (all ones) of the backward pass running on
    /// this thread.
    static UNIT_SEED: Cell<Option<u64>> = const { Cell::new(None) };
    /// Tensors of the running backward pass whose producer has an output
    /// factor and whose gradient comes from one consumer alone.
    static FOLDABLE: RefCell<HashSet<u64>> = RefCell::new(HashSet::new());
    /// Gradients that already include their tensor's output factor.
    static FACTORED: RefCell<HashSet<u64>> = RefCell::new(HashSet::new());
}

/// The output factor a consumer of `input` may apply to the gradient it
/// computes for it, in the running backward pass: `input`'s producer has
/// one and the consumer asking is `input`'s only one.
pub(crate) fn foldable_factor(input: &Tensor) -> Option<OutputFactor> {
    if !FOLDABLE.with(|f| f.borrow().contains(&input.id())) {
        return None;
    }
    input.grad_fn()?.output_factor.clone()
}

/// Records that `grad`, computed for a tensor from [`foldable_factor`], has
/// that tensor's output factor applied.
pub(crate) fn mark_factored(grad: &Tensor) {
    FACTORED.with(|f| f.borrow_mut().insert(grad.id()));
}

/// Whether `grad` arrives with the receiving op's output factor applied.
pub(crate) fn is_factored(grad: &Tensor) -> bool {
    FACTORED.with(|f| f.borrow().contains(&grad.id()))
}

/// The fold sets of a running backward pass: set up from its graph, and
/// given back to whatever pass was running before when it ends, however it
/// ends (as [`SeedMark`] does for the seed).
struct FoldSets {
    previous: (HashSet<u64>, HashSet<u64>),
}

impl FoldSets {
    fn enter(order: &[Tensor]) -> Self {
        let foldable = FOLDABLE.with(|f| f.replace(foldable(order)));
        let factored = FACTORED.with(|f| f.take());
        Self {
            previous: (foldable, factored),
        }
    }
}

impl Drop for FoldSets {
    fn drop(&mut self) {
        let (foldable, factored) = std::mem::take(&mut self.previous);
        FOLDABLE.with(|f| *f.borrow_mut() = foldable);
        FACTORED.with(|f| *f.borrow_mut() = factored);
    }
}

/// The tensors of `order` whose gradient may carry their producer's output
/// factor: those with an output factor consumed along exactly one edge (a
/// gradient summed from several consumers must arrive without it).
fn foldable(order: &[Tensor]) -> HashSet<u64> {
    let mut edges: HashMap<u64, usize> = HashMap::new();
    for t in order {
        for input in t.grad_fn().map_or(&[][..], |f| &f.inputs) {
            if input.is_requires_grad() {
                *edges.entry(input.id()).or_default() += 1;
            }
        }
    }
    order
        .iter()
        .filter(|t| t.grad_fn().is_some_and(|f| f.output_factor.is_some()))
        .filter(|t| edges.get(&t.id()) == Some(&1))
        .map(Tensor::id)
        .collect()
}

/// Whether `g` is the seed of the running backward pass, whose every element
/// is 1: a backward rule that would multiply by it can skip the kernel (a
/// loss's gradient, computed with its forward pass, is then final as it is).
pub(crate) fn is_unit_seed(g: &Tensor) -> bool {
    UNIT_SEED.with(Cell::get) == Some(g.id())
}

/// Clears the seed mark when the backward pass ends, however it ends.
struct SeedMark(Option<u64>);

impl Drop for SeedMark {
    fn drop(&mut self) {
        UNIT_SEED.with(|s| s.set(self.0));
    }
}

/// True unless inside [`no_grad`].
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(Cell::get)
}

/// Restores gradient recording when dropped; see [`no_grad`].
pub struct NoGradGuard {
    previous: bool,
}

impl NoGradGuard {
    /// Turns gradient recording off until the guard is dropped.
    pub fn new() -> Self {
        let previous = GRAD_ENABLED.with(|g| g.replace(false));
        Self { previous }
    }
}

impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

/// Runs `f` without recording a graph (for evaluation and optimizer updates).
///
/// ```no_run
/// # fn main() -> Result<(), kiln_device::DeviceError> {
/// # let device = kiln_graph::Device::new()?;
/// let w = kiln_graph::Tensor::ones(&device, &[3])?.requires_grad(true);
/// let y = kiln_graph::no_grad(|| w.mul_scalar(2.0))?;
/// assert!(!y.is_requires_grad());
/// # Ok(()) }
/// ```
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _guard = NoGradGuard::new();
    f()
}

/// Tensors reachable from `root` through ops that need gradients, inputs before
/// the ops that consume them.
fn topological_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Iterative post-order DFS: deep graphs (long sequences) must not overflow
    // the stack.
    let mut stack = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(grad_fn) = t.grad_fn() {
            for input in &grad_fn.inputs {
                if input.is_requires_grad() && !seen.contains(&input.id()) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order
}

/// The sum of two gradients of one tensor. Gradients of an f16 tensor come
/// back f16 from some ops (a cast) and f32 from others (an autocast
/// product), and the add kernel takes f32: such sums are taken in f32, and
/// two f16 gradients sum to an f16 one (as PyTorch keeps an f16 tensor's).
pub(crate) fn add_grads(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        return a.add(b);
    }
    let sum = a.to_dtype(DType::F32)?.add(&b.to_dtype(DType::F32)?)?;
    if a.dtype() == b.dtype() {
        sum.to_dtype(a.dtype())
    } else {
        Ok(sum)
    }
}

/// Refuses an op whose inputs were written in place after it ran: its
/// backward rule would read the new values where it needs the old.
fn check_versions(grad_fn: &GradFn) -> Result<()> {
    for (k, (input, &saved)) in grad_fn.inputs.iter().zip(&grad_fn.versions).enumerate() {
        if input.version() != saved {
            return Err(DeviceError::Shape {
                op: "backward",
                message: format!(
                    "input {k} {:?} of {} was written in place (an optimizer step, an assign or \
                     a loaded checkpoint) after the forward pass used it; call backward before \
                     stepping, or run the forward pass again",
                    input.shape(),
                    grad_fn.op
                ),
            });
        }
    }
    Ok(())
}

pub(crate) fn backward(root: &Tensor) -> Result<()> {
    if root.numel() != 1 {
        return Err(DeviceError::Shape {
            op: "backward",
            message: format!(
                "needs a scalar (one-element) loss, got shape {:?}; reduce it with sum or mean first",
                root.shape()
            ),
        });
    }
    if !root.is_requires_grad() {
        return Err(DeviceError::Shape {
            op: "backward",
            message: "the loss does not depend on any tensor that requires grad".into(),
        });
    }
    let _guard = NoGradGuard::new();
    let order = topological_order(root);
    let _fold_sets = FoldSets::enter(&order);
    let mut grads: HashMap<u64, Tensor> = HashMap::new();
    let seed = Tensor::ones(root.device(), root.shape())?;
    let _seed_mark = SeedMark(UNIT_SEED.with(|s| s.replace(Some(seed.id()))));
    grads.insert(root.id(), seed);
    for t in order.iter().rev() {
        let Some(grad) = grads.remove(&t.id()) else {
            continue;
        };
        match t.grad_fn() {
            Some(grad_fn) => {
                check_versions(grad_fn)?;
                let input_grads = (grad_fn.backward)(&grad)?;
                debug_assert_eq!(input_grads.len(), grad_fn.inputs.len(), "{}", grad_fn.op);
                for (input, g) in grad_fn.inputs.iter().zip(input_grads) {
                    let Some(g) = g else { continue };
                    if !input.is_requires_grad() {
                        continue;
                    }
                    let total = match grads.remove(&input.id()) {
                        Some(previous) => add_grads(&previous, &g)?,
                        None => g,
                    };
                    grads.insert(input.id(), total);
                }
            }
            None => t.accumulate_grad(grad)?,
        }
    }
    Ok(())
}
