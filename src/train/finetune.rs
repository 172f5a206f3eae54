//! Fine-tuning a pretrained BERT classifier on labelled texts: frozen lower
//! layers, AdamW with linear warm-up for the encoder, Adam for the new head,
//! gradient clipping, and accuracy on held-out texts.

use super::{progress_bar, Result};
use crate::data::shuffled_indices;
use crate::data::tokenize::PretrainedTokenizer;
use kiln_graph::amp::{AutocastGuard, LossScaler};
use kiln_graph::optim::{
    check_clip_bound, clip_grad_norm, Adam, CosineLr, LinearWarmup, LrSchedule, Optimizer,
};
use kiln_graph::{loss, NoGradGuard};
use kiln_models::bert::BertClassifier;
use kiln_models::{Mode, ModelError};
use std::time::Instant;

/// Settings of [`finetune`].
#[derive(Clone, Debug)]
pub struct FinetuneOptions {
    /// Passes over the texts; at least 1 (default 1).
    pub epochs: usize,
    /// Texts per step (default 16).
    pub batch_size: usize,
    /// Peak learning rate of the encoder's trainable layers (AdamW; default
    /// 5e-5, the `kiln finetune` command's default is 1e-4).
    pub lr: f32,
    /// Learning rate of the freshly initialised head (Adam).
    pub head_lr: f32,
    /// AdamW's decoupled weight decay of the encoder's weight matrices and
    /// embedding tables (default 0.01); biases and layer norms are not
    /// decayed, as in Hugging Face's fine-tuning scripts.
    pub weight_decay: f32,
    /// Steps of linear warm-up of the encoder's rate (then cosine decay to
    /// 0). Steps count updates made: with mixed precision, a step skipped
    /// for overflowed gradients does not advance the schedule.
    pub warmup_steps: usize,
    /// Global gradient-norm limit.
    pub clip_norm: f32,
    /// Seeds the per-epoch shuffles and dropout (default 0).
    pub seed: u64,
    /// Show a progress bar (default on).
    pub progress: bool,
    /// Matrix products on f16 operands with loss scaling (see
    /// [`kiln_graph::amp`]).
    pub mixed_precision: bool,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 16,
            lr: 5e-5,
            head_lr: 1e-3,
            weight_decay: 0.01,
            warmup_steps: 20,
            clip_norm: 1.0,
            seed: 0,
            progress: true,
            mixed_precision: false,
        }
    }
}

/// What one epoch of [`finetune`] measured.
#[derive(Clone, Debug)]
pub struct FinetuneEpoch {
    /// 1-based.
    pub epoch: usize,
    /// Mean training cross-entropy over the epoch's texts.
    pub loss: f32,
    /// Fraction of the epoch's training texts classified right (in training mode,
    /// dropout on).
    pub accuracy: f32,
    /// Wall-clock time of the epoch.
    pub seconds: f64,
    /// Training texts per second.
    pub samples_per_second: f64,
}

/// Trains `model` on `texts` with `labels`; freeze layers beforehand with
/// [`BertClassifier::freeze`].
pub fn finetune(
    model: &BertClassifier,
    tokenizer: &PretrainedTokenizer,
    texts: &[&str],
    labels: &[u32],
    options: &FinetuneOptions,
) -> Result<Vec<FinetuneEpoch>> {
    if texts.len() != labels.len() || texts.is_empty() || options.batch_size == 0 {
        return Err(ModelError::Invalid(format!(
            "finetune: {} texts, {} labels, batch {}",
            texts.len(),
            labels.len(),
            options.batch_size
        )));
    }
    if options.epochs == 0 {
        return Err(ModelError::Invalid(
            "finetune: 0 epochs would leave the new head untrained".into(),
        ));
    }
    super::check_learning_rate("encoder learning rate", options.lr)?;
    super::check_learning_rate("head learning rate", options.head_lr)?;
    // Checked before any step, as the clipping inside it would.
    check_clip_bound("clip_norm", options.clip_norm)?;
    check_labels(model, labels)?;
    let (decayed, not_decayed) = model.trainable_encoder_parameters_by_decay();
    let mut encoder = Adam::adamw(decayed, options.lr, options.weight_decay);
    let mut encoder_no_decay = Adam::adamw(not_decayed, options.lr, 0.0);
    let mut head = Adam::new(model.head_parameters(), options.head_lr);
    // Warm-up, then cosine decay to zero over the remaining steps.
    let total_steps = options
        .epochs
        .saturating_mul(texts.len().div_ceil(options.batch_size));
    let schedule = LinearWarmup {
        warmup_steps: options.warmup_steps,
        after: CosineLr {
            base: options.lr,
            min: 0.0,
            total_steps: total_steps.saturating_sub(options.warmup_steps),
        },
    };
    let mut all_params = model.trainable_encoder_parameters();
    all_params.extend(model.head_parameters());
    let device = all_params
        .first()
        .map(|p| p.device().clone())
        .ok_or_else(|| ModelError::Invalid("finetune: no trainable parameters".into()))?;
    // Batches run (dropout seeds), and updates made (the schedule's steps:
    // as in Hugging Face's Trainer, a step the loss scaler skips does not
    // advance it).
    let (mut step, mut updates) = (0, 0);
    let mut epochs = Vec::new();
    // Only with mixed precision: scaled backward, overflow-checked steps.
    let mut scaler = options.mixed_precision.then(LossScaler::new);
    for epoch in 1..=options.epochs {
        let order = shuffled_indices(texts.len(), options.seed.wrapping_add(epoch as u64));
        let batches: Vec<&[usize]> = order.chunks(options.batch_size).collect();
        let bar = progress_bar(options.progress, batches.len(), epoch, options.epochs);
        let start = Instant::now();
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        for (i, indices) in batches.iter().enumerate() {
            let batch_texts: Vec<&str> = indices.iter().map(|&j| texts[j]).collect();
            let batch_labels: Vec<u32> = indices.iter().map(|&j| labels[j]).collect();
            let tokens = tokenizer.batch(&batch_texts)?;
            let input = tokens.input();
            let seed = (options.seed as u32).wrapping_add((step as u32).wrapping_mul(7919));
            let autocast = AutocastGuard::with(options.mixed_precision);
            // Launched together, as `Trainer::fit` does (see `Device::together`).
            let (logits, l, updated) = device.together(|| -> Result<_> {
                let logits = model.forward(&input, &mut Mode::training(seed))?;
                let l = loss::cross_entropy(&logits, &batch_labels)?;
                encoder.zero_grad();
                encoder_no_decay.zero_grad();
                head.zero_grad();
                encoder.set_learning_rate(schedule.lr(updates));
                encoder_no_decay.set_learning_rate(schedule.lr(updates));
                let updated = match &mut scaler {
                    Some(scaler) => {
                        scaler.backward(&l)?;
                        clip_grad_norm(&all_params, options.clip_norm * scaler.scale())?;
                        scaler.step_all(&mut [&mut encoder, &mut encoder_no_decay, &mut head])?
                    }
                    None => {
                        l.backward()?;
                        clip_grad_norm(&all_params, options.clip_norm)?;
                        encoder.step()?;
                        encoder_no_decay.step()?;
                        head.step()?;
                        true
                    }
                };
                Ok((logits, l, updated))
            })?;
            drop(autocast);
            step += 1;
            updates += usize::from(updated);
            // Reading the loss syncs once per batch; at seconds per batch on a
            // CPU adapter that costs nothing measurable.
            loss_sum += f64::from(l.item()?) * indices.len() as f64;
            correct += count_correct(&logits.to_vec()?, &batch_labels);
            bar.set_position(i as u64 + 1);
            let seen = order.len().min((i + 1) * options.batch_size);
            bar.set_message(format!(
                "loss {:.4} accuracy {:.4}",
                loss_sum / seen as f64,
                correct as f64 / seen as f64
            ));
        }
        bar.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        // Each batch's loss is taken before its update, so the weights the
        // caller would save are checked too (see `exploded_weights`).
        let diverged = match loss_sum.is_finite() {
            false => Some(format!("epoch {epoch}'s loss is {loss_sum}")),
            true => {
                let weights = model.named_parameters().into_iter().map(|(_, t)| t);
                super::exploded_weights(epoch, weights)?
            }
        };
        if let Some(what) = diverged {
            return Err(ModelError::Invalid(format!(
                "fine-tuning diverged: {what}; try lower learning rates (now {} for the \
                 encoder, {} for the head)",
                options.lr, options.head_lr
            )));
        }
        let stats = FinetuneEpoch {
            epoch,
            loss: (loss_sum / texts.len() as f64) as f32,
            accuracy: correct as f32 / texts.len() as f32,
            seconds,
            samples_per_second: texts.len() as f64 / seconds,
        };
        println!(
            "epoch {epoch}/{}: loss {:.4} accuracy {:.4} ({seconds:.1} s, {:.1} samples/s)",
            options.epochs, stats.loss, stats.accuracy, stats.samples_per_second
        );
        epochs.push(stats);
    }
    Ok(epochs)
}

/// Accuracy of `model` on `texts`, in batches of `batch_size`.
pub fn evaluate_classifier(
    model: &BertClassifier,
    tokenizer: &PretrainedTokenizer,
    texts: &[&str],
    labels: &[u32],
    batch_size: usize,
) -> Result<f32> {
    if texts.is_empty() || texts.len() != labels.len() {
        return Err(ModelError::Invalid(format!(
            "evaluate: {} texts with {} labels; give at least one of each, as many labels as texts",
            texts.len(),
            labels.len()
        )));
    }
    check_labels(model, labels)?;
    let _guard = NoGradGuard::new();
    let mut correct = 0;
    for (chunk, chunk_labels) in texts
        .chunks(batch_size.max(1))
        .zip(labels.chunks(batch_size.max(1)))
    {
        let tokens = tokenizer.batch(chunk)?;
        let input = tokens.input();
        let logits = model.forward(&input, &mut Mode::eval())?;
        correct += count_correct(&logits.to_vec()?, chunk_labels);
    }
    Ok(correct as f32 / texts.len() as f32)
}

/// Refuses a label the head has no class for, before any work: found at
/// its batch, it would come after optimizer steps, and in evaluation it would
/// quietly count as wrong.
fn check_labels(model: &BertClassifier, labels: &[u32]) -> Result<()> {
    let classes = model.head.bias.shape()[0];
    match labels.iter().position(|&l| l as usize >= classes) {
        Some(i) => Err(ModelError::Invalid(format!(
            "label {} (text {i}) out of range for the head's {classes} classes",
            labels[i]
        ))),
        None => Ok(()),
    }
}

fn count_correct(logits: &[f32], labels: &[u32]) -> usize {
    let classes = logits.len() / labels.len().max(1);
    logits
        .chunks(classes)
        .zip(labels)
        .filter(|(row, &label)| super::argmax(row) == Some(label as usize))
        .count()
}
