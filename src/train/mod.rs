//! The Keras-like training loop: [`Trainer::fit`], [`Trainer::evaluate`],
//! [`Trainer::predict`], with validation split, progress bars, early stopping and
//! per-epoch checkpoints that a run can resume from.

pub mod finetune;
mod history;

pub use history::{EpochStats, History};

use crate::data::{shuffled_indices, Dataset};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_graph::amp::{AutocastGuard, LossScaler};
use kiln_graph::device::DType;
use kiln_graph::optim::Optimizer;
use kiln_graph::{loss, no_grad, Device, Elementwise, Tensor};
use kiln_models::checkpoint::{self, Checkpoint};
use kiln_models::{Mode, ModelError, Sequential};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Errors of the training loop.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Settings of [`Trainer::fit`], with Keras's names.
#[derive(Clone, Debug)]
pub struct FitOptions {
    /// Total epochs; a resumed run trains only the ones still missing.
    pub epochs: usize,
    /// Samples per step; the last batch of an epoch may be smaller.
    pub batch_size: usize,
    /// Fraction of the data, taken from its end before shuffling, held out for
    /// validation after every epoch.
    pub validation_split: f32,
    /// Seeds the per-epoch shuffles and dropout, so runs are reproducible.
    pub seed: u64,
    /// Show a progress bar (it also hides itself when stderr is not a terminal).
    pub progress: bool,
    /// Print one summary line per epoch (Keras's `verbose=2`).
    pub log_epochs: bool,
    /// Save weights and optimizer state here after every epoch.
    pub checkpoint: Option<PathBuf>,
    /// Stop when the monitored loss (validation if any, else training) has not
    /// improved by `min_delta` for `patience` epochs. A resumed run counts
    /// its earlier epochs too (from the history), so it stops where an
    /// unbroken run would.
    pub early_stopping: Option<EarlyStopping>,
    /// Matrix products on f16 operands with dynamic loss scaling (see
    /// [`kiln_graph::amp`]): half the memory traffic of the products on
    /// GPUs; the parameters and everything else stay f32.
    pub mixed_precision: bool,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 32,
            validation_split: 0.0,
            seed: 0,
            progress: true,
            log_epochs: true,
            checkpoint: None,
            early_stopping: None,
            mixed_precision: false,
        }
    }
}

/// When [`Trainer::fit`] stops before its last epoch (Keras's `EarlyStopping`
/// on `val_loss`, or on `loss` without a validation split).
#[derive(Clone, Copy, Debug)]
pub struct EarlyStopping {
    /// Epochs without improvement after which training stops.
    pub patience: usize,
    /// How much lower than the best loss so far an epoch's loss must be to count as
    /// an improvement. Its sign is ignored, as Keras ignores it.
    pub min_delta: f32,
}

/// The index of the largest value, the first of tied maxima (as PyTorch's
/// and NumPy's argmax, and as the accuracy counts); `None` for no values.
/// Values compare by `f32::total_cmp` (a NaN of positive sign is largest).
///
/// ```
/// assert_eq!(kiln::train::argmax(&[0.2, 0.7, 0.7]), Some(1));
/// assert_eq!(kiln::train::argmax(&[]), None);
/// ```
pub fn argmax(values: &[f32]) -> Option<usize> {
    values
        .iter()
        .enumerate()
        .reduce(|best, next| match next.1.total_cmp(best.1) {
            std::cmp::Ordering::Greater => next,
            _ => best,
        })
        .map(|(i, _)| i)
}

/// Early stopping's count: the best monitored loss so far and the epochs
/// since it.
#[derive(Default)]
struct Patience {
    best: Option<f32>,
    since_best: usize,
}

impl Patience {
    /// Counts an epoch's monitored loss; true once `rule.patience` epochs
    /// in a row have not improved on the best by more than `min_delta`.
    fn exhausted_by(&mut self, monitored: f32, rule: EarlyStopping) -> bool {
        let improved = match self.best {
            None => true,
            Some(best) => monitored < best - rule.min_delta.abs(),
        };
        if improved {
            self.best = Some(monitored);
            self.since_best = 0;
            return false;
        }
        self.since_best += 1;
        self.since_best >= rule.patience
    }
}

/// What early stopping watches: the validation loss if there is one, else
/// the training loss.
fn monitored(stats: &EpochStats) -> f32 {
    stats.val_loss.unwrap_or(stats.loss)
}

/// The loss `fit` minimises, Keras's `compile(loss=...)`. Models output logits;
/// labels are class ids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Loss {
    /// Softmax cross-entropy (Keras `sparse_categorical_crossentropy` on a
    /// softmax output), computed stably from the logits.
    #[default]
    SparseCategoricalCrossEntropy,
    /// Mean squared error between the softmax probabilities and one-hot labels
    /// (Keras `mse` on a softmax output).
    MeanSquaredError,
}

impl Loss {
    /// Every loss, for [`Loss::from_name`].
    const ALL: [Loss; 2] = [Loss::SparseCategoricalCrossEntropy, Loss::MeanSquaredError];

    /// The name checkpoints record the loss by (their `--loss` metadata).
    ///
    /// ```
    /// use kiln::train::Loss;
    /// assert_eq!(Loss::from_name(Loss::MeanSquaredError.name()), Some(Loss::MeanSquaredError));
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Loss::SparseCategoricalCrossEntropy => "SparseCategoricalCrossEntropy",
            Loss::MeanSquaredError => "MeanSquaredError",
        }
    }

    /// The loss [`Loss::name`] gives `name`, if any.
    pub fn from_name(name: &str) -> Option<Loss> {
        Self::ALL.into_iter().find(|loss| loss.name() == name)
    }

    /// The batch's mean loss for class ids `labels` (of `classes`), adding
    /// the batch to `tally`.
    fn compute(
        self,
        logits: &Tensor,
        labels: &[u32],
        classes: usize,
        tally: &mut Tally,
    ) -> kiln_graph::Result<Tensor> {
        if logits.shape() != [labels.len(), classes] {
            return Err(kiln_graph::DeviceError::Shape {
                op: "loss",
                message: format!(
                    "the model gives outputs of shape {:?} for {} samples of {classes} classes; \
                     its last layer must give {classes} outputs per sample",
                    logits.shape(),
                    labels.len()
                ),
            });
        }
        match self {
            // One fused kernel for the loss, its gradient and the batch's
            // share of the running loss and accuracy, rather than
            // log-softmax against one-hot rows and kernels to count.
            Loss::SparseCategoricalCrossEntropy => {
                let options = loss::CrossEntropy::default();
                let (mean, tallied) =
                    loss::cross_entropy_tallied(logits, labels, options, &tally.running)?;
                match tallied {
                    true => tally.samples += labels.len(),
                    false => {
                        let target = one_hot(logits.device(), labels, classes)?;
                        tally.add(&mean, logits, &target, labels)?;
                    }
                }
                Ok(mean)
            }
            Loss::MeanSquaredError => {
                let target = one_hot(logits.device(), labels, classes)?;
                let mean = loss::mse_loss(&logits.softmax()?, &target)?;
                tally.add(&mean, logits, &target, labels)?;
                Ok(mean)
            }
        }
    }
}

/// Samples [`Trainer::predict`] runs through the model at once: all of them
/// could need buffers past an adapter's binding limit (a CNN's im2col
/// columns for the 10,000 MNIST test images take 243 MB, lavapipe binds 128
/// MiB).
pub const PREDICT_BATCH: usize = 256;

/// A classifier (logits out) with its optimizer and loss, measured by accuracy.
pub struct Trainer<O: Optimizer> {
    /// The model being trained; its output layer gives logits.
    pub model: Sequential,
    /// Updates the model's parameters.
    pub optimizer: O,
    /// What `fit` minimises (default: sparse categorical cross-entropy).
    pub loss: Loss,
    device: Device,
    /// Epochs completed, including those of a run this one resumed.
    pub epochs_done: usize,
    /// Every epoch completed, including those of a run this one resumed
    /// (checkpoints carry it); `fit` returns only its own.
    pub history: History,
    /// Written into every checkpoint (e.g. which architecture to rebuild).
    pub metadata: HashMap<String, String>,
    /// Scales the loss in `fit` with [`FitOptions::mixed_precision`]
    /// (PyTorch's `GradScaler` defaults; set another to change them). Its
    /// scale and counts go into checkpoints, and `resume` puts them back.
    pub loss_scaler: LossScaler,
    /// Calls of `train_on_batch` so far, which seed its dropout masks.
    batches_trained: u64,
}

/// One batch for a training step: `labels.len()` samples of `features`
/// inputs each, labelled among `classes` (by default, the model's outputs).
#[derive(Clone, Copy)]
struct Batch<'a> {
    x: &'a [f32],
    labels: &'a [u32],
    features: usize,
    classes: Option<usize>,
}

/// Loss sum and correct count of a pass, kept on the device until read.
struct Tally {
    /// [summed sample losses, correct predictions] of the batches whose loss
    /// kernel added them itself.
    running: Tensor,
    /// The same for other batches, added up by kernels here.
    loss_sum: Option<Tensor>,
    correct: Option<Tensor>,
    samples: usize,
}

impl Tally {
    fn new(device: &Device) -> kiln_graph::Result<Self> {
        Ok(Self {
            running: Tensor::zeros(device, &[2])?,
            loss_sum: None,
            correct: None,
            samples: 0,
        })
    }

    /// Adds the mean loss of a batch and its correct predictions, counted
    /// here from the logits, the one-hot `target` and the labels, without a
    /// sync.
    fn add(
        &mut self,
        mean_loss: &Tensor,
        logits: &Tensor,
        target: &Tensor,
        labels: &[u32],
    ) -> kiln_graph::Result<()> {
        let n = labels.len();
        no_grad(|| -> kiln_graph::Result<()> {
            let batch_loss = mean_loss.detach().mul_scalar(n as f32)?;
            // A sample is right when its label is the argmax: its logit is
            // the row's maximum and no earlier column reaches it (the first
            // of tied maxima is the prediction, so a row of equal logits is
            // not right for every label).
            let logits = logits.detach();
            let picked = logits.mul(target)?.sum(1, true)?;
            let best = logits.max(1, true)?;
            let before = columns_before_labels(logits.device(), labels, logits.shape()[1])?;
            let at_max_before = Elementwise::new("at_max_before", "select(0.0, x2, x0 >= x1)");
            let ties_before =
                kiln_graph::map(&at_max_before, &[&logits, &best, &before])?.sum(1, true)?;
            let hit = Elementwise::new("hit", "select(0.0, 1.0, x0 >= x1 && x2 == 0.0)");
            let correct = kiln_graph::map(&hit, &[&picked, &best, &ties_before])?.sum_all()?;
            self.loss_sum = Some(match self.loss_sum.take() {
                Some(t) => t.add(&batch_loss)?,
                None => batch_loss,
            });
            self.correct = Some(match self.correct.take() {
                Some(t) => t.add(&correct)?,
                None => correct,
            });
            self.samples += n;
            Ok(())
        })
    }

    /// (mean loss, accuracy) so far; one readback, two more for batches the
    /// loss kernel did not count.
    fn read(&self) -> kiln_graph::Result<(f32, f32)> {
        let n = self.samples.max(1) as f32;
        let running = self.running.to_vec()?;
        let (mut loss, mut correct) = (running[0], running[1]);
        if let Some(t) = &self.loss_sum {
            loss += t.item()?;
        }
        if let Some(t) = &self.correct {
            correct += t.item()?;
        }
        Ok((loss / n, correct / n))
    }
}

/// `[labels, classes]`: 1 at the columns before each row's label, else 0.
fn columns_before_labels(
    device: &Device,
    labels: &[u32],
    classes: usize,
) -> kiln_graph::Result<Tensor> {
    let mut v = vec![0.0f32; labels.len() * classes];
    for (row, &l) in v.chunks_mut(classes).zip(labels) {
        row[..(l as usize).min(classes)].fill(1.0);
    }
    Tensor::from_slice(device, &v, &[labels.len(), classes])
}

fn one_hot(device: &Device, labels: &[u32], classes: usize) -> kiln_graph::Result<Tensor> {
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(kiln_graph::DeviceError::Shape {
            op: "loss",
            message: format!("label {bad} out of range for {classes} classes"),
        });
    }
    let mut v = vec![0.0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        v[i * classes + l as usize] = 1.0;
    }
    Tensor::from_slice(device, &v, &[labels.len(), classes])
}

impl<O: Optimizer> Trainer<O> {
    /// A trainer for `model` with the default loss, no epochs done and empty
    /// metadata. `optimizer` should hold `model`'s parameters.
    pub fn new(model: Sequential, optimizer: O, device: &Device) -> Self {
        Self {
            model,
            optimizer,
            loss: Loss::default(),
            device: device.clone(),
            epochs_done: 0,
            history: History::default(),
            metadata: HashMap::new(),
            loss_scaler: LossScaler::new(),
            batches_trained: 0,
        }
    }

    /// Refuses what `op` (`fit` or `evaluate`) cannot run on.
    fn check_data(&self, op: &'static str, data: &Dataset, batch_size: usize) -> Result<()> {
        self.check_outputs_logits()?;
        data.validate()?;
        let problem = match (batch_size, data.is_empty()) {
            (0, _) => "the batch size is 0; it must be at least 1",
            (_, true) => "the dataset has no samples",
            _ => return Ok(()),
        };
        Err(ModelError::Device(kiln_graph::DeviceError::Shape {
            op,
            message: problem.into(),
        }))
    }

    /// The losses (and `predict`) apply softmax to the model's output
    /// themselves: a model ending in one would be trained through two
    /// (Keras's `from_logits=False` habit), with flat gradients and no
    /// error, so it is refused.
    fn check_outputs_logits(&self) -> Result<()> {
        if self
            .model
            .layers()
            .last()
            .is_some_and(|l| l.outputs_probabilities())
        {
            return Err(ModelError::Invalid(
                "the model's last layer applies softmax, but the trainer's losses take logits \
                 and apply it themselves: end the model on logits (Activation::None on the \
                 output layer, and no softmax layer after it)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Trains until [`Trainer::epochs_done`] reaches `options.epochs`, and
    /// returns the history of the epochs it trained. The count is the
    /// trainer's total, as Keras's `epochs` counts from `initial_epoch`: a
    /// resumed run trains only the epochs still missing, and a second `fit`
    /// with the same `epochs` trains none (ask for more to train on). Early
    /// stopping that already stopped the run also trains none.
    pub fn fit(&mut self, data: &Dataset, options: &FitOptions) -> Result<History> {
        self.check_data("fit", data, options.batch_size)?;
        if let Some(es) = options
            .early_stopping
            .filter(|es| !es.min_delta.is_finite())
        {
            return Err(ModelError::Invalid(format!(
                "early stopping's min_delta {} must be a finite number",
                es.min_delta
            )));
        }
        check_learning_rate("learning rate", self.optimizer.learning_rate())?;
        let (train, validation) = data
            .split_validation(options.validation_split)
            .map_err(|e| {
                ModelError::Device(kiln_graph::DeviceError::Shape {
                    op: "fit",
                    message: e.to_string(),
                })
            })?;
        if train.is_empty() {
            return Err(ModelError::Invalid(format!(
                "validation_split {} of {} samples leaves none to train on",
                options.validation_split,
                data.len()
            )));
        }
        let mut history = History::default();
        // A resumed run picks up the patience count where the unbroken run
        // would be: replayed from the epochs its checkpoint carries.
        let mut patience = Patience::default();
        if let Some(es) = options.early_stopping {
            let done = self.history.epochs.iter();
            if done.map(monitored).any(|m| patience.exhausted_by(m, es)) {
                return Ok(history);
            }
        }
        let (mut xb, mut yb) = (Vec::new(), Vec::new());
        while self.epochs_done < options.epochs {
            let epoch = self.epochs_done + 1;
            let start = Instant::now();
            // Per-epoch seeds: a resumed run sees the same order as an unbroken one.
            let order = shuffled_indices(train.len(), options.seed.wrapping_add(epoch as u64));
            let steps = train.len().div_ceil(options.batch_size);
            let bar = progress_bar(options.progress, steps, epoch, options.epochs);
            let mut tally = Tally::new(&self.device)?;
            for (step, indices) in order.chunks(options.batch_size).enumerate() {
                train.gather(indices, &mut xb, &mut yb)?;
                let seed = (options.seed as u32) ^ ((epoch * 1_000_003 + step) as u32);
                let batch = Batch {
                    x: &xb,
                    labels: &yb,
                    features: train.features,
                    classes: Some(train.classes),
                };
                self.train_step(batch, seed, options.mixed_precision, &mut tally)?;
                // Reading metrics syncs with the device: only now and then.
                if step % 50 == 49 || step + 1 == steps {
                    let (l, a) = tally.read()?;
                    let rate = tally.samples as f64 / start.elapsed().as_secs_f64();
                    bar.set_position(step as u64 + 1);
                    bar.set_message(format!("loss {l:.4} acc {a:.4} {rate:.0} samples/s"));
                }
            }
            let (loss, accuracy) = tally.read()?;
            let seconds = start.elapsed().as_secs_f64();
            // Saving a diverged epoch would replace the last good checkpoint
            // with weights that are no use. Each step's loss is taken before
            // its update, so a finite epoch loss does not clear the last
            // update: the weights themselves are checked too.
            let mut diverged =
                (!loss.is_finite()).then(|| format!("epoch {epoch}'s loss is {loss}"));
            if diverged.is_none() {
                let state = self.model.named_state().into_iter().map(|(_, t)| t);
                diverged = exploded_weights(epoch, state)?;
            }
            let (val_loss, val_accuracy) = if validation.is_empty() || diverged.is_some() {
                (None, None)
            } else {
                let (l, a) = self.evaluate(&validation, options.batch_size.max(256))?;
                (Some(l), Some(a))
            };
            if let Some(l) = val_loss.filter(|l| !l.is_finite()) {
                diverged = Some(format!("epoch {epoch}'s validation loss is {l}"));
            }
            bar.finish_and_clear();
            if let Some(what) = diverged {
                return Err(ModelError::Invalid(format!(
                    "training diverged: {what}; the checkpoint still holds epoch {}; try a lower \
                     learning rate (now {})",
                    self.epochs_done,
                    self.optimizer.learning_rate()
                )));
            }
            let stats = EpochStats {
                epoch,
                loss,
                accuracy,
                val_loss,
                val_accuracy,
                seconds,
                samples_per_second: train.len() as f64 / seconds,
            };
            if options.log_epochs {
                eprintln!("{}", describe(&stats, options.epochs));
            }
            self.epochs_done = epoch;
            self.history.epochs.push(stats.clone());
            if let Some(path) = &options.checkpoint {
                self.save_checkpoint(path)?;
            }
            let stop = options
                .early_stopping
                .is_some_and(|es| patience.exhausted_by(monitored(&stats), es));
            history.epochs.push(stats);
            if stop {
                break;
            }
        }
        Ok(history)
    }

    /// Records one optimisation step on `batch`: forward, loss (added to
    /// `tally`), backward and the update. Nothing waits for the device.
    fn train_step(
        &mut self,
        batch: Batch<'_>,
        seed: u32,
        mixed_precision: bool,
        tally: &mut Tally,
    ) -> Result<Tensor> {
        let Batch {
            x,
            labels,
            features,
            classes,
        } = batch;
        let x = self.batch_tensor(x, &[labels.len(), features])?;
        let _autocast = AutocastGuard::with(mixed_precision);
        // The step's kernels launch together: independent neighbours
        // share a dispatch, and the small ones at the head (output
        // layer, loss, its gradient) chain into one.
        self.device.together(|| -> Result<Tensor> {
            let logits = self.model.forward(&x, &mut Mode::training(seed))?;
            let classes = classes.unwrap_or_else(|| logits.shape().last().copied().unwrap_or(1));
            let loss = self.loss.compute(&logits, labels, classes, tally)?;
            self.optimizer.zero_grad();
            if mixed_precision {
                self.loss_scaler.backward(&loss)?;
                self.loss_scaler.step(&mut self.optimizer)?;
            } else {
                loss.backward()?;
                self.optimizer.step()?;
            }
            Ok(loss.detach())
        })
    }

    /// One optimisation step on one batch, as `fit` takes them (Keras's
    /// `train_on_batch`), for loops of your own: `x` holds `labels.len()`
    /// samples of `features` values each, one after another (as
    /// [`Trainer::predict`] takes them). Returns the batch's mean loss as a
    /// scalar on the device: the step is recorded, not waited for, and
    /// reading the loss (`item`) waits for it. Dropout draws new masks at
    /// every call; products run in f32. A batch whose size disagrees with
    /// its labels, or holds a value that is not finite, is refused.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use kiln::graph::optim::Adam;
    /// use kiln::{train::Trainer, zoo::Architecture, Device};
    /// let device = Device::new()?;
    /// let model = Architecture::Mlp.build(&device, 0)?;
    /// let optimizer = Adam::new(model.parameters(), 1e-3);
    /// let mut trainer = Trainer::new(model, optimizer, &device);
    /// // Two MNIST-sized samples, labelled 3 and 7.
    /// let x: Vec<f32> = (0..2 * 784).map(|i| (i % 7) as f32 / 7.0).collect();
    /// let labels = [3, 7];
    /// let first = trainer.train_on_batch(&x, 784, &labels)?.item()?;
    /// for _ in 0..10 {
    ///     trainer.train_on_batch(&x, 784, &labels)?; // no wait for the device
    /// }
    /// let later = trainer.train_on_batch(&x, 784, &labels)?.item()?;
    /// assert!(later < first, "steps on one batch lower its loss: {first} -> {later}");
    /// # Ok(()) }
    /// ```
    pub fn train_on_batch(&mut self, x: &[f32], features: usize, labels: &[u32]) -> Result<Tensor> {
        self.check_outputs_logits()?;
        check_learning_rate("learning rate", self.optimizer.learning_rate())?;
        if labels.is_empty() || features == 0 {
            return Err(ModelError::Invalid(format!(
                "train_on_batch: the batch is empty ({} labels, {features} features per sample)",
                labels.len()
            )));
        }
        if labels.len().checked_mul(features) != Some(x.len()) {
            return Err(ModelError::Invalid(format!(
                "train_on_batch: {} inputs are not {} samples of {features} features",
                x.len(),
                labels.len()
            )));
        }
        // As `fit` refuses such data (`Dataset::validate`): one NaN input
        // would make every weight NaN at this step.
        if let Some(i) = crate::data::first_non_finite(x) {
            return Err(ModelError::Invalid(format!(
                "train_on_batch: input {i} is {} (sample {}, feature {})",
                x[i],
                i / features,
                i % features
            )));
        }
        let seed = self.batches_trained as u32 ^ 0x5EED_BA7C;
        self.batches_trained = self.batches_trained.wrapping_add(1);
        let mut tally = Tally::new(&self.device)?;
        let batch = Batch {
            x,
            labels,
            features,
            classes: None,
        };
        self.train_step(batch, seed, false, &mut tally)
    }

    /// Mean loss and accuracy over `data`, without training.
    pub fn evaluate(&self, data: &Dataset, batch_size: usize) -> Result<(f32, f32)> {
        self.check_data("evaluate", data, batch_size)?;
        let _guard = kiln_graph::NoGradGuard::new();
        let mut tally = Tally::new(&self.device)?;
        let (mut xb, mut yb) = (Vec::new(), Vec::new());
        let all: Vec<usize> = (0..data.len()).collect();
        for indices in all.chunks(batch_size) {
            data.gather(indices, &mut xb, &mut yb)?;
            let x = self.batch_tensor(&xb, &[yb.len(), data.features])?;
            // A block per batch, as a training step is: fused kernels, and
            // where blocks submit as they end (GPUs) the device starts on
            // this batch while the next is recorded.
            self.device.together(|| -> Result<()> {
                let logits = self.model.forward(&x, &mut Mode::eval())?;
                self.loss.compute(&logits, &yb, data.classes, &mut tally)?;
                Ok(())
            })?;
        }
        Ok(tally.read()?)
    }

    /// Class probabilities (softmax of the logits) for the samples of `x`,
    /// `features` inputs each, run through the model [`PREDICT_BATCH`] at a
    /// time (as Keras's `predict` batches).
    pub fn predict(&self, x: &[f32], features: usize) -> Result<Vec<f32>> {
        self.check_outputs_logits()?;
        if features == 0 || x.len() % features != 0 {
            return Err(ModelError::Invalid(format!(
                "predict: {} inputs do not make samples of {features} features",
                x.len()
            )));
        }
        let _guard = kiln_graph::NoGradGuard::new();
        let mut probabilities = Vec::new();
        for batch in x.chunks(PREDICT_BATCH * features) {
            let input = self.batch_tensor(batch, &[batch.len() / features, features])?;
            let probs = self.device.together(|| -> Result<Tensor> {
                Ok(self.model.forward(&input, &mut Mode::eval())?.softmax()?)
            })?;
            probabilities.extend(probs.to_vec()?);
        }
        Ok(probabilities)
    }

    /// A batch of inputs on the device. Where the model's first layer reads
    /// its input on the host (an embedding's ids), the tensor keeps a host
    /// copy, so that read does not wait for the device mid-step; elsewhere
    /// the copy (an allocation and a copy of the batch at every step) is
    /// left out.
    fn batch_tensor(&self, x: &[f32], shape: &[usize]) -> Result<Tensor> {
        let on_host = self
            .model
            .layers()
            .first()
            .is_some_and(|l| l.reads_input_on_host());
        Ok(match on_host {
            true => Tensor::from_slice_with_host_copy(&self.device, x, shape)?,
            false => Tensor::from_slice(&self.device, x, shape)?,
        })
    }

    /// Saves weights, optimizer state and progress to one safetensors file,
    /// atomically (a kill mid-save leaves the previous checkpoint intact).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (name, t) in self.model.named_state() {
            tensors.push((name, t.shape().to_vec(), t.to_vec()?));
        }
        let state = self.optimizer.state()?;
        for (name, values) in state.tensors {
            let len = values.len();
            tensors.push((format!("optimizer.{name}"), vec![len], values));
        }
        let mut metadata = self.metadata.clone();
        metadata.extend([
            ("epoch".to_string(), self.epochs_done.to_string()),
            ("history".to_string(), self.history.to_json()),
            ("optimizer_step".to_string(), state.step.to_string()),
            ("optimizer_params".to_string(), self.optimizer_params()),
            ("format".to_string(), CHECKPOINT_FORMAT.to_string()),
        ]);
        let scaler = &self.loss_scaler;
        metadata.extend([
            ("loss_scale".to_string(), scaler.scale().to_string()),
            (
                "loss_scale_good_steps".to_string(),
                scaler.good_steps().to_string(),
            ),
            (
                "loss_scale_skipped_steps".to_string(),
                scaler.skipped_steps().to_string(),
            ),
        ]);
        checkpoint::save(path, &tensors, &metadata)
    }

    /// The model's names of the optimizer's parameters, in the optimizer's
    /// order, as a JSON list (`null` for one that is not the model's).
    fn optimizer_params(&self) -> String {
        let named = self.model.named_parameters();
        let names: Vec<Option<&str>> = self
            .optimizer
            .params()
            .iter()
            .map(|p| {
                named
                    .iter()
                    .find(|(_, t)| t.same_as(p))
                    .map(|(name, _)| name.as_str())
            })
            .collect();
        serde_json::to_string(&names).expect("a list of strings serialises")
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`]; `fit` then
    /// continues after its last completed epoch. A checkpoint whose metadata
    /// names another model, dataset or vocabulary than this trainer's
    /// [`Trainer::metadata`] is refused. Everything is checked before
    /// anything is restored: on an error the trainer is as it was.
    pub fn resume(&mut self, path: &Path) -> Result<()> {
        let file = Checkpoint::open(path)?;
        let metadata = file.metadata();
        let bad = |reason: String| ModelError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        // First the format: a checkpoint of another format may name its
        // settings otherwise. Checkpoints from before the tag have none.
        if let Some(format) = metadata.get("format").filter(|f| *f != CHECKPOINT_FORMAT) {
            return Err(bad(format!(
                "it is in format {}, this Kiln reads {CHECKPOINT_FORMAT}",
                abbreviate(format)
            )));
        }
        // Keys this run sets and the checkpoint lacks (it predates them) pass.
        let mut keys: Vec<&String> = self.metadata.keys().collect();
        keys.sort();
        for key in keys {
            let ours = &self.metadata[key];
            if let Some(theirs) = metadata.get(key).filter(|theirs| *theirs != ours) {
                return Err(bad(format!(
                    "it was saved by a run with {key} = {}, this one has {key} = {}; resume with \
                     the same settings, or start a new run with another checkpoint path",
                    abbreviate(theirs),
                    abbreviate(ours)
                )));
            }
        }
        let field = |key: &str| -> Result<u64> {
            metadata
                .get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| {
                    bad(format!(
                        "no {key} in its metadata: not a training checkpoint"
                    ))
                })
        };
        let (step, epochs_done) = (field("optimizer_step")?, field("epoch")?);
        let epochs_done = usize::try_from(epochs_done)
            .map_err(|_| bad(format!("epoch {epochs_done} is out of range")))?;
        // Checkpoints from before the loss scale was kept in them have none.
        let loss_scale = match metadata.get("loss_scale") {
            None => None,
            Some(scale) => {
                let scale: f32 = scale
                    .parse()
                    .ok()
                    .filter(|s: &f32| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| bad(format!("loss_scale {scale} is not a positive number")))?;
                let good_steps = u32::try_from(field("loss_scale_good_steps")?)
                    .map_err(|_| bad("loss_scale_good_steps is out of range".into()))?;
                Some((scale, good_steps, field("loss_scale_skipped_steps")?))
            }
        };
        // Optimizer state is saved per position in the optimizer's parameter
        // list; the names say which parameter each position held, so a run
        // whose optimizer lists them otherwise cannot take moments that were
        // another parameter's. Checkpoints from before the names have none.
        if let Some(saved) = metadata.get("optimizer_params") {
            let ours = self.optimizer_params();
            if *saved != ours {
                return Err(bad(format!(
                    "its optimizer state is for the parameters {} in that order, this run's \
                     optimizer holds {}; resume with the optimizer built over the same \
                     parameters, or start a new run with another checkpoint path",
                    abbreviate(saved),
                    abbreviate(&ours)
                )));
            }
        }
        // Checkpoints from before the history was kept in them have none; one
        // that does not parse is refused rather than dropped, since early
        // stopping's patience is replayed from it.
        let mut history: History = match metadata.get("history") {
            None => History::default(),
            Some(json) => serde_json::from_str(json)
                .map_err(|e| bad(format!("its training history does not parse ({e})")))?,
        };
        history.epochs.retain(|e| e.epoch <= epochs_done);
        let weights = self.model.read_state(&file)?;
        let state = kiln_graph::optim::OptimizerState {
            step,
            tensors: file.tensors_with_prefix("optimizer.")?,
        };
        // The optimizer takes its state whole or not at all, and the weights
        // are copied in only after it did.
        self.optimizer.load_state(&state)?;
        weights.apply()?;
        self.epochs_done = epochs_done;
        if let Some((scale, good_steps, skipped)) = loss_scale {
            self.loss_scaler.restore(scale, good_steps, skipped);
        }
        self.history = history;
        Ok(())
    }
}

/// What is wrong with the weights epoch `epoch` left in `tensors` (a model's
/// weights and buffers), if they are not all finite with an overall norm
/// training can still use: one sum of squares per tensor on the device and
/// a single read of their total, which a NaN, an infinity or a norm past
/// about 1e19 (its square overflows f32) makes infinite or NaN. An exploded
/// update leaves weights like that before any loss shows it, so training
/// loops ask this before saving an epoch's weights.
pub(crate) fn exploded_weights(
    epoch: usize,
    tensors: impl IntoIterator<Item = Tensor>,
) -> Result<Option<String>> {
    let _guard = kiln_graph::NoGradGuard::new();
    let mut total: Option<Tensor> = None;
    for t in tensors {
        let t = match t.dtype() {
            _ if t.numel() == 0 => continue,
            DType::F32 => t,
            DType::F16 => t.to_dtype(DType::F32)?,
            // Integer state (counters, indices) has no NaN to check.
            DType::U32 => continue,
        };
        let sum = t.square()?.sum_all()?;
        total = Some(match total {
            Some(acc) => acc.add(&sum)?,
            None => sum,
        });
    }
    let usable = total.map_or(Ok(true), |t| t.item().map(f32::is_finite))?;
    Ok((!usable).then(|| {
        format!("epoch {epoch} left weights whose overall norm is not finite or past about 1e19")
    }))
}

/// The `format` metadata of the checkpoints [`Trainer::save_checkpoint`]
/// writes.
const CHECKPOINT_FORMAT: &str = "kiln-checkpoint-1";

/// A metadata value short enough for an error message (a vocabulary is
/// thousands of words).
fn abbreviate(value: &str) -> String {
    const MAX_CHARS: usize = 60;
    match value.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => format!("{}... ({} bytes)", &value[..end], value.len()),
        None => value.to_string(),
    }
}

/// Refuses a learning rate that can only wreck the weights (NaN, infinite
/// or negative); `what` names it in the error.
pub fn check_learning_rate(what: &str, lr: f32) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(ModelError::Invalid(format!(
            "{what} {lr}: it must be a finite number, at least 0"
        )))
    }
}

fn progress_bar(enabled: bool, steps: usize, epoch: usize, epochs: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "epoch {epoch}/{epochs} [{{bar:30}}] {{pos}}/{{len}} {{msg}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

fn describe(s: &EpochStats, epochs: usize) -> String {
    let mut line = format!(
        "epoch {}/{epochs}: loss {:.4} accuracy {:.4}",
        s.epoch, s.loss, s.accuracy
    );
    if let (Some(l), Some(a)) = (s.val_loss, s.val_accuracy) {
        line += &format!(" val_loss {l:.4} val_accuracy {a:.4}");
    }
    line += &format!(
        " ({:.1} s, {:.0} samples/s)",
        s.seconds, s.samples_per_second
    );
    line
}
