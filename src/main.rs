//! The `kiln` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kiln::data::text::TextVectorizer;
use kiln::data::{fashion_mnist, imdb, mnist, Dataset};
use kiln::device::{list_adapters, Device, DeviceReport, DeviceSelector};
use kiln::graph::optim::Adam;
use kiln::pretrained::TextClassifier;
use kiln::train::{EarlyStopping, FitOptions, History, Loss, Trainer};
use kiln::zoo::Architecture;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Deep-learning training on any GPU through wgpu"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A learning rate: a finite number above 0.
fn learning_rate(arg: &str) -> Result<f32, String> {
    match arg.parse::<f32>() {
        Ok(lr) if lr.is_finite() && lr > 0.0 => Ok(lr),
        _ => Err(format!(
            "{arg:?} is not a learning rate: give a number above 0, e.g. 1e-3"
        )),
    }
}

/// A validation fraction: at least 0 and below 1.
fn held_out_fraction(arg: &str) -> Result<f32, String> {
    match arg.parse::<f32>() {
        Ok(f) if (0.0..1.0).contains(&f) => Ok(f),
        _ => Err(format!(
            "{arg:?}: give a fraction of at least 0 and below 1, e.g. 0.1"
        )),
    }
}

/// A count that must be at least 1 (epochs, samples, batch sizes).
fn at_least_one(arg: &str) -> Result<usize, String> {
    match arg.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{arg:?}: give a whole number of at least 1")),
    }
}

/// Tokens per text for a BERT model: its [CLS] and [SEP] and at least one
/// token of the text.
fn token_budget(arg: &str) -> Result<usize, String> {
    match arg.parse::<usize>() {
        Ok(n) if n >= 3 => Ok(n),
        _ => Err(format!(
            "{arg:?}: give at least 3 ([CLS], [SEP] and one token of the text)"
        )),
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DatasetName {
    Mnist,
    FashionMnist,
    /// IMDB movie reviews (sentiment, 2 classes): text, for the lstm models and BERT.
    Imdb,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PretrainedName {
    /// A BERT encoder in Hugging Face's layout (MiniLM by default).
    Bert,
}

/// What a fine-tuned BERT's classification head reads.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum PoolingName {
    /// The mean of the token states (how MiniLM was trained).
    Mean,
    /// The pooler on [CLS] (Hugging Face's BertForSequenceClassification).
    Cls,
}

/// Which tokens of a long text a pretrained model sees.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum TruncationName {
    /// The first tokens.
    Head,
    /// The first quarter of the budget from the start, the rest from the end.
    HeadTail,
}

impl TruncationName {
    fn for_length(self, max_length: usize) -> kiln::data::tokenize::Truncation {
        use kiln::data::tokenize::Truncation;
        match self {
            Self::Head => Truncation::Head,
            Self::HeadTail => Truncation::HeadTail {
                head: max_length / 4,
            },
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LossName {
    CrossEntropy,
    Mse,
}

#[derive(Subcommand)]
enum Command {
    /// Print the adapter Kiln would use, its backend, type and the limits that matter.
    Info {
        /// Also list every adapter found, usable or not.
        #[arg(long)]
        all: bool,
    },
    /// Train a reference model (Adam; sparse categorical cross-entropy unless
    /// --loss says otherwise), then evaluate it on the test set.
    Train {
        /// The model to train.
        #[arg(value_enum)]
        model: Architecture,
        /// The data set, fetched by its script under scripts/.
        #[arg(long, value_enum, default_value = "mnist")]
        dataset: DatasetName,
        /// Epochs in all; with --resume, training continues up to this many.
        #[arg(long, default_value_t = 10, value_parser = at_least_one)]
        epochs: usize,
        /// Samples per training step.
        #[arg(long, default_value_t = 32, value_parser = at_least_one)]
        batch_size: usize,
        /// Adam's learning rate.
        #[arg(long, default_value_t = 1e-3, value_parser = learning_rate)]
        lr: f32,
        /// The loss to minimise.
        #[arg(long, value_enum, default_value = "cross-entropy")]
        loss: LossName,
        /// Fraction of the training data held out for validation (Keras semantics).
        #[arg(long, default_value_t = 0.0, value_parser = held_out_fraction)]
        validation_split: f32,
        /// Seed of the initial weights, the shuffling and dropout.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop after this many epochs without validation (or training) loss improvement.
        #[arg(long)]
        patience: Option<usize>,
        /// Checkpoint written after every epoch [default:
        /// runs/<model>-<dataset>/checkpoint.safetensors].
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Continue from the checkpoint instead of starting afresh, with the
        /// same settings as the run that wrote it (only --epochs, --patience
        /// and --limit-test may differ).
        #[arg(long, conflicts_with = "overwrite")]
        resume: bool,
        /// Start afresh even if the checkpoint exists, replacing it after the
        /// first epoch (without this or --resume, an existing checkpoint is
        /// an error).
        #[arg(long)]
        overwrite: bool,
        /// Use only the first N training samples.
        #[arg(long, value_parser = at_least_one)]
        limit_train: Option<usize>,
        /// Evaluate on only the first N test samples.
        #[arg(long, value_parser = at_least_one)]
        limit_test: Option<usize>,
        /// Matrix products on f16 operands with loss scaling.
        #[arg(long)]
        mixed_precision: bool,
        /// Hide the progress bars (they also hide when stderr is not a terminal).
        #[arg(long)]
        no_progress: bool,
    },
    /// Classify texts with a trained text model (e.g. `kiln train lstm --dataset imdb`).
    Predict {
        /// A checkpoint of `kiln train`, or the directory `kiln finetune`
        /// wrote.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The texts to classify.
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Sentence embeddings (mean-pooled, L2-normalised, as sentence-transformers
    /// computes them) from a BERT model directory; one JSON array per text.
    Embed {
        /// Hugging Face model directory (config.json, model.safetensors,
        /// tokenizer.json) [default: the MiniLM fetched by scripts/fetch-minilm.sh].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Tokens per text at most; longer texts are truncated.
        #[arg(long, default_value_t = 256, value_parser = token_budget)]
        max_length: usize,
        /// The texts to embed.
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Fine-tune a pretrained BERT with a classification head on a text dataset,
    /// then report held-out accuracy.
    Finetune {
        /// The architecture of the pretrained model.
        #[arg(value_enum)]
        model: PretrainedName,
        /// Hugging Face model directory [default: the MiniLM fetched by
        /// scripts/fetch-minilm.sh].
        #[arg(long = "model")]
        model_dir: Option<PathBuf>,
        /// The text data set (imdb, the only one), fetched by its script under scripts/.
        #[arg(long, value_enum, default_value = "imdb")]
        dataset: DatasetName,
        /// Training reviews, drawn at random (seeded) from the 25,000.
        #[arg(long, default_value_t = 4000, value_parser = at_least_one)]
        train_samples: usize,
        /// Held-out reviews to evaluate on.
        #[arg(long, default_value_t = 1000, value_parser = at_least_one)]
        test_samples: usize,
        /// Passes over the training reviews.
        #[arg(long, default_value_t = 1, value_parser = at_least_one)]
        epochs: usize,
        /// Reviews per training step.
        #[arg(long, default_value_t = 16, value_parser = at_least_one)]
        batch_size: usize,
        /// Peak learning rate of the encoder (AdamW, warm-up then cosine decay).
        #[arg(long, default_value_t = 1e-4, value_parser = learning_rate)]
        lr: f32,
        /// Learning rate of the new classification head (Adam).
        #[arg(long, default_value_t = 1e-3, value_parser = learning_rate)]
        head_lr: f32,
        /// Encoder blocks to freeze, from the bottom (the embeddings always are).
        #[arg(long, default_value_t = 4)]
        freeze_layers: usize,
        /// Tokens per review; longer reviews are truncated.
        #[arg(long, default_value_t = 128, value_parser = token_budget)]
        max_length: usize,
        /// Which tokens of a longer review are kept.
        #[arg(long, value_enum, default_value = "head-tail")]
        truncation: TruncationName,
        /// What the classification head reads.
        #[arg(long, value_enum, default_value = "mean")]
        pooling: PoolingName,
        /// Directory to save the fine-tuned classifier and its tokenizer in
        /// (for `kiln predict` and `kiln eval`).
        #[arg(long, default_value = "runs/bert-imdb")]
        output: PathBuf,
        /// Replace a classifier already saved in --output (without this, one
        /// there is an error).
        #[arg(long)]
        overwrite: bool,
        /// Seed of the sample draw, the head's weights, shuffling and dropout.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Matrix products on f16 operands with loss scaling.
        #[arg(long)]
        mixed_precision: bool,
        /// Hide the progress bars (they also hide when stderr is not a terminal).
        #[arg(long)]
        no_progress: bool,
    },
    /// Evaluate a checkpoint on a test set.
    Eval {
        /// A checkpoint of `kiln train`, or the directory `kiln finetune`
        /// wrote.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The test set [default: the dataset the checkpoint was trained on].
        #[arg(long, value_enum)]
        dataset: Option<DatasetName>,
        /// Evaluate on only the first N test samples.
        #[arg(long, value_parser = at_least_one)]
        limit_test: Option<usize>,
    },
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Info { all } => info(all),
        Command::Train {
            model,
            dataset,
            epochs,
            batch_size,
            lr,
            loss,
            validation_split,
            seed,
            patience,
            checkpoint,
            resume,
            overwrite,
            limit_train,
            limit_test,
            mixed_precision,
            no_progress,
        } => {
            let start = match (resume, overwrite) {
                (true, _) => Start::Resume,
                (false, true) => Start::Overwrite,
                (false, false) => Start::Fresh,
            };
            let options = FitOptions {
                epochs,
                batch_size,
                validation_split,
                seed,
                progress: !no_progress,
                log_epochs: true,
                checkpoint: Some(checkpoint.unwrap_or_else(|| {
                    let dataset = dataset.to_possible_value().expect("no skipped variants");
                    PathBuf::from(format!("runs/{}-{}", model.name(), dataset.get_name()))
                        .join("checkpoint.safetensors")
                })),
                early_stopping: patience.map(|patience| EarlyStopping {
                    patience,
                    min_delta: 0.0,
                }),
                mixed_precision,
            };
            let loss = match loss {
                LossName::CrossEntropy => Loss::SparseCategoricalCrossEntropy,
                LossName::Mse => Loss::MeanSquaredError,
            };
            train(
                model,
                dataset,
                lr,
                loss,
                options,
                start,
                limit_train,
                limit_test,
            )
        }
        Command::Eval {
            checkpoint,
            dataset,
            limit_test,
        } => eval(&checkpoint, dataset, limit_test),
        Command::Predict { checkpoint, texts } => predict(&checkpoint, &texts),
        Command::Finetune {
            model: PretrainedName::Bert,
            model_dir,
            dataset,
            train_samples,
            test_samples,
            epochs,
            batch_size,
            lr,
            head_lr,
            freeze_layers,
            max_length,
            truncation,
            pooling,
            output,
            overwrite,
            seed,
            mixed_precision,
            no_progress,
        } => {
            let options = kiln::train::finetune::FinetuneOptions {
                epochs,
                batch_size,
                lr,
                head_lr,
                seed,
                progress: !no_progress,
                mixed_precision,
                ..Default::default()
            };
            let setup = FinetuneSetup {
                model_dir,
                dataset,
                train_samples,
                test_samples,
                freeze_layers,
                max_length,
                truncation,
                pooling,
                output,
                overwrite,
            };
            finetune_bert(&setup, &options)
        }
        Command::Embed {
            model,
            max_length,
            texts,
        } => embed(model, max_length, &texts),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn info(all: bool) -> Result<()> {
    let selector = DeviceSelector::from_env()?;
    if all {
        println!("adapters found (best first):");
        for adapter in list_adapters() {
            let note = match (&adapter.unusable, &adapter.selector) {
                (Some(reason), _) => format!(" [unusable: {reason}]"),
                (None, Some(selector)) => format!(" [KILN_DEVICE={selector}]"),
                (None, None) => String::new(),
            };
            println!(
                "  {} ({:?}, {:?}){note}",
                adapter.info.name, adapter.info.backend, adapter.info.device_type
            );
        }
        println!();
    }
    let device = Device::with_selector(&selector)?;
    println!("{}", DeviceReport(&device));
    Ok(())
}

/// Train and test sets. Text datasets are encoded with `vectorizer`, or with
/// one fitted on the training texts (returned, to be saved with the model).
fn load(
    dataset: DatasetName,
    vectorizer: Option<TextVectorizer>,
) -> Result<(Dataset, Dataset, Option<TextVectorizer>)> {
    match dataset {
        DatasetName::Mnist => {
            let m = mnist::load()?;
            Ok((m.train, m.test, None))
        }
        DatasetName::FashionMnist => {
            let m = fashion_mnist::load()?;
            Ok((m.train, m.test, None))
        }
        DatasetName::Imdb => {
            let cached = imdb::load_encoded(kiln::zoo::TEXT_VOCAB, kiln::zoo::TEXT_LENGTH)?;
            match vectorizer {
                // A checkpoint's own vocabulary, if it differs from the cached one.
                Some(v) if v != cached.vectorizer => {
                    let reviews = imdb::load()?;
                    let train = imdb::to_dataset(&reviews.train, &v)?;
                    let test = imdb::to_dataset(&reviews.test, &v)?;
                    Ok((train, test, Some(v)))
                }
                _ => Ok((cached.train, cached.test, Some(cached.vectorizer))),
            }
        }
    }
}

/// Refuses model/dataset pairs that cannot work (pixels into a text model).
fn check_pair(model: Architecture, dataset: DatasetName) -> Result<()> {
    let text = matches!(dataset, DatasetName::Imdb);
    if model.reads_text() != text {
        bail!(
            "the {} model reads {}; use {}",
            model.name(),
            if model.reads_text() { "text" } else { "images" },
            if model.reads_text() {
                "--dataset imdb"
            } else {
                "--dataset mnist or fashion-mnist"
            }
        );
    }
    Ok(())
}

/// How `kiln train` treats the checkpoint file it names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// A new run; an existing checkpoint is an error (it is never replaced
    /// unasked).
    Fresh,
    /// Continue from the checkpoint.
    Resume,
    /// A new run that replaces the checkpoint.
    Overwrite,
}

/// Fails now, before any training, if `path` cannot take a file: a
/// directory, or a directory that cannot be created or written.
fn check_writable_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("{} is a directory; name a file to write", path.display());
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    check_writable_dir(dir)
}

/// Creates `dir` if need be and checks that a file can be written in it.
fn check_writable_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let probe = dir.join(format!(".kiln-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("cannot write in {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The name `kiln train` records for a dataset, as its CLI value.
fn dataset_name(dataset: DatasetName) -> String {
    let value = dataset.to_possible_value().expect("no skipped variants");
    value.get_name().to_string()
}

#[allow(clippy::too_many_arguments)]
fn train(
    model: Architecture,
    dataset: DatasetName,
    lr: f32,
    loss: Loss,
    options: FitOptions,
    start: Start,
    limit_train: Option<usize>,
    limit_test: Option<usize>,
) -> Result<()> {
    check_pair(model, dataset)?;
    let checkpoint = options.checkpoint.clone().expect("set by the CLI");
    check_writable_file(&checkpoint)?;
    if start == Start::Fresh && checkpoint.exists() {
        bail!(
            "{} exists: pass --resume to continue that run, --overwrite to start afresh and \
             replace it, or --checkpoint to write elsewhere",
            checkpoint.display()
        );
    }
    if start == Start::Resume && !checkpoint.exists() {
        bail!(
            "nothing to resume: {} does not exist (drop --resume to start a new run)",
            checkpoint.display()
        );
    }
    let (mut train, mut test, vectorizer) = load(dataset, None)?;
    if let Some(n) = limit_train {
        train = train.take(n);
    }
    if let Some(n) = limit_test {
        test = test.take(n);
    }
    let device = Device::new()?;
    let network = model.build(&device, options.seed)?;
    println!("{}", network.summary(&[train.features]));
    let optimizer = Adam::new(network.parameters(), lr);
    let mut trainer = Trainer::new(network, optimizer, &device);
    trainer.loss = loss;
    trainer.metadata.insert("model".into(), model.name().into());
    trainer
        .metadata
        .insert("dataset".into(), dataset_name(dataset));
    if let Some(v) = &vectorizer {
        trainer.metadata.insert("vectorizer".into(), v.to_json());
    }
    // The settings that shape the training, named as their flags: a resumed
    // run with others would not continue the run it resumes (a validation
    // split dropped on resume trains on the held-out samples), so `resume`
    // refuses a mismatch and names the flag. --epochs, --patience and
    // --limit-test may change.
    let limit = limit_train.map_or("all".to_string(), |n| n.to_string());
    for (flag, value) in [
        ("--lr", lr.to_string()),
        ("--loss", loss.name().to_string()),
        ("--batch-size", options.batch_size.to_string()),
        ("--validation-split", options.validation_split.to_string()),
        ("--seed", options.seed.to_string()),
        ("--limit-train", limit),
        ("--mixed-precision", options.mixed_precision.to_string()),
    ] {
        trainer.metadata.insert(flag.into(), value);
    }
    if start == Start::Resume {
        trainer
            .resume(&checkpoint)
            .with_context(|| format!("resuming from {}", checkpoint.display()))?;
        println!("resuming after epoch {}", trainer.epochs_done);
        if trainer.epochs_done >= options.epochs {
            println!(
                "the checkpoint already holds {} epochs: nothing to train (raise --epochs for more)",
                trainer.epochs_done
            );
        }
    }
    println!(
        "training on {} samples ({} of them for validation), batch {}, {} epochs, on {}",
        train.len(),
        train.validation_size(options.validation_split),
        options.batch_size,
        options.epochs,
        device.adapter_info().name
    );
    let clock = std::time::Instant::now();
    let history = trainer.fit(&train, &options)?;
    let wall = clock.elapsed().as_secs_f64();
    if let Some(es) = options.early_stopping {
        if history.epochs.is_empty() && trainer.epochs_done < options.epochs {
            println!(
                "early stopping had already stopped this run after epoch {} (--patience {}): \
                 nothing to train",
                trainer.epochs_done, es.patience
            );
        }
    }
    // The whole run's, resumed epochs included.
    let (history_json, _) = History::paths_beside(&checkpoint);
    trainer
        .history
        .save_beside(&checkpoint)
        .with_context(|| format!("writing the history to {}", history_json.display()))?;
    let (test_loss, test_accuracy) = trainer.evaluate(&test, 250)?;
    // Samples trained on, the validation split's left out.
    let trained: usize =
        history.epochs.len() * (train.len() - train.validation_size(options.validation_split));
    println!(
        "test loss {test_loss:.4}, test accuracy {:.2}% on {} samples",
        100.0 * test_accuracy,
        test.len()
    );
    println!(
        "trained {} epochs in {wall:.1} s ({:.0} samples/s); checkpoint {}, history {} (and .csv)",
        history.epochs.len(),
        trained as f64 / wall,
        checkpoint.display(),
        history_json.display()
    );
    Ok(())
}

/// A trained model rebuilt from a checkpoint, with its text vectorizer if it
/// reads text.
struct Trained {
    model: Architecture,
    /// The dataset it was trained on, where the checkpoint says.
    dataset: Option<DatasetName>,
    vectorizer: Option<TextVectorizer>,
    /// The `--loss` it was trained with, as the checkpoint names it.
    loss: Option<String>,
    trainer: Trainer<Adam>,
}

fn open_trained(path: &Path) -> Result<Trained> {
    let file = kiln::models::checkpoint::Checkpoint::open(path)?;
    let metadata = file.metadata();
    let Some(model) = metadata
        .get("model")
        .and_then(|m| Architecture::from_name(m))
    else {
        bail!(
            "{} does not say which model it holds (no known `model` metadata)",
            path.display()
        );
    };
    let vectorizer = match metadata.get("vectorizer") {
        Some(json) => Some(TextVectorizer::from_json(json)?),
        None if model.reads_text() => bail!(
            "{} holds a text model but no vectorizer: retrain it with `kiln train`",
            path.display()
        ),
        None => None,
    };
    let device = Device::new()?;
    let network = model.build(&device, 0)?;
    network.load_weights(path)?;
    let trainer = Trainer::new(network, Adam::new(Vec::new(), 0.0), &device);
    let dataset = metadata
        .get("dataset")
        .and_then(|name| DatasetName::from_str(name, false).ok());
    Ok(Trained {
        model,
        dataset,
        vectorizer,
        loss: metadata.get("--loss").cloned(),
        trainer,
    })
}

fn eval(path: &Path, dataset: Option<DatasetName>, limit_test: Option<usize>) -> Result<()> {
    if let Some(dir) = finetuned_dir(path) {
        return eval_finetuned(&dir, dataset.unwrap_or(DatasetName::Imdb), limit_test);
    }
    let mut trained = open_trained(path)?;
    // Scored with the loss it was trained on, so `eval` repeats `train`'s
    // test loss (checkpoints from before `--loss` was recorded: the default).
    if let Some(name) = &trained.loss {
        trained.trainer.loss = Loss::from_name(name)
            .with_context(|| format!("{} names an unknown loss {name:?}", path.display()))?;
    }
    let dataset = match dataset.or(trained.dataset) {
        Some(dataset) => dataset,
        // Checkpoints older than the `dataset` metadata: the model's kind
        // decides, and the user is told, since a Fashion-MNIST model would
        // score near chance on MNIST.
        None => {
            let guess = match trained.model.reads_text() {
                true => DatasetName::Imdb,
                false => DatasetName::Mnist,
            };
            eprintln!(
                "kiln: {} does not say which dataset it was trained on; evaluating on {} \
                 (choose with --dataset)",
                path.display(),
                dataset_name(guess)
            );
            guess
        }
    };
    check_pair(trained.model, dataset)?;
    let (_, mut test, _) = load(dataset, trained.vectorizer)?;
    if let Some(n) = limit_test {
        test = test.take(n);
    }
    let (loss, accuracy) = trained.trainer.evaluate(&test, 250)?;
    println!(
        "{}: test loss {loss:.4}, test accuracy {:.2}% on {} samples",
        path.display(),
        100.0 * accuracy,
        test.len()
    );
    Ok(())
}

fn predict(path: &Path, texts: &[String]) -> Result<()> {
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        bail!(
            "text {} is empty: give each text to classify as one argument",
            i + 1
        );
    }
    if let Some(dir) = finetuned_dir(path) {
        return predict_finetuned(&dir, texts);
    }
    let trained = open_trained(path)?;
    let Some(vectorizer) = trained.vectorizer else {
        bail!(
            "{} holds the {} model, which reads images, not text",
            path.display(),
            trained.model.name()
        );
    };
    if let Some(i) = texts
        .iter()
        .position(|t| kiln::data::text::words(t).next().is_none())
    {
        bail!("text {} ({:?}) has no words to classify", i + 1, texts[i]);
    }
    // In batches, so that any number of texts fits the adapter's buffers.
    for chunk in texts.chunks(PREDICT_BATCH) {
        let ids: Vec<f32> = vectorizer
            .encode_all(chunk.iter().map(String::as_str))
            .into_iter()
            .map(|id| id as f32)
            .collect();
        let probabilities = trained.trainer.predict(&ids, vectorizer.sequence_length)?;
        let classes = probabilities.len() / chunk.len();
        for (text, p) in chunk.iter().zip(probabilities.chunks(classes)) {
            // IMDB's labels: 0 negative, 1 positive (a tie is class 0's,
            // as argmax has it).
            let label = if p[1] > p[0] { "positive" } else { "negative" };
            println!("{label} ({:.3})  {text}", p[1]);
        }
    }
    Ok(())
}

/// Texts per forward pass in `predict` and `embed`.
const PREDICT_BATCH: usize = 32;

/// Refuses a token budget the model has no positions for, naming the flag.
fn check_max_length(max_length: usize, config: &kiln::models::bert::BertConfig) -> Result<()> {
    if max_length > config.max_position_embeddings {
        bail!(
            "--max-length {max_length} exceeds the model's {} positions",
            config.max_position_embeddings
        );
    }
    Ok(())
}

/// The Hugging Face model directory to use: `dir`, else the MiniLM that
/// scripts/fetch-minilm.sh fetches; an error says how to get one.
fn pretrained_dir(dir: Option<PathBuf>) -> Result<PathBuf> {
    let dir = dir.unwrap_or_else(|| kiln::data::cache_dir().join("minilm"));
    if !dir.join("model.safetensors").exists() {
        bail!(
            "no model.safetensors in {}: run scripts/fetch-minilm.sh, or pass --model DIR",
            dir.display()
        );
    }
    Ok(dir)
}

fn embed(model: Option<PathBuf>, max_length: usize, texts: &[String]) -> Result<()> {
    use kiln::models::bert::{l2_normalize, mean_pool, Bert};
    let dir = pretrained_dir(model)?;
    let tokenizer = kiln::data::tokenize::PretrainedTokenizer::from_file(
        &dir.join("tokenizer.json"),
        max_length,
    )?;
    let device = Device::new()?;
    let bert = Bert::from_pretrained(&device, &dir)?;
    check_max_length(max_length, &bert.config)?;
    let _no_grad = kiln::graph::NoGradGuard::new();
    for chunk in texts.chunks(PREDICT_BATCH) {
        let batch = tokenizer.batch(chunk)?;
        let hidden = bert.forward(&batch.input(), &mut kiln::models::Mode::eval())?;
        let embeddings = l2_normalize(&mean_pool(&hidden, &batch.mask)?)?.to_vec()?;
        for row in embeddings.chunks(bert.config.hidden_size) {
            println!("{}", serde_json::to_string(row)?);
        }
    }
    Ok(())
}

/// What `kiln finetune bert` trains on, besides the optimiser settings.
struct FinetuneSetup {
    model_dir: Option<PathBuf>,
    dataset: DatasetName,
    train_samples: usize,
    test_samples: usize,
    freeze_layers: usize,
    max_length: usize,
    truncation: TruncationName,
    pooling: PoolingName,
    output: PathBuf,
    overwrite: bool,
}

fn finetune_bert(
    setup: &FinetuneSetup,
    options: &kiln::train::finetune::FinetuneOptions,
) -> Result<()> {
    use kiln::models::bert::{Bert, BertClassifier, Pooling};
    use kiln::train::finetune::{evaluate_classifier, finetune};
    if !matches!(setup.dataset, DatasetName::Imdb) {
        bail!("BERT fine-tuning reads text: use --dataset imdb");
    }
    let dir = pretrained_dir(setup.model_dir.clone())?;
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(&setup.output, &dir) {
        bail!(
            "--output {} is the pretrained model's directory; saving there would replace its \
             weights: pick another directory",
            setup.output.display()
        );
    }
    if setup.output.is_file() {
        bail!(
            "--output {} is a file; name a directory",
            setup.output.display()
        );
    }
    let saved = setup.output.join(kiln::pretrained::MODEL_FILE);
    if saved.exists() && !setup.overwrite {
        bail!(
            "{} exists: pass --overwrite to replace it, or --output to save elsewhere",
            saved.display()
        );
    }
    check_writable_dir(&setup.output)?;
    let reviews = imdb::load()?;
    let picked = &kiln::data::shuffled_indices(reviews.train.len(), options.seed)
        [..setup.train_samples.min(reviews.train.len())];
    let train_texts: Vec<&str> = picked
        .iter()
        .map(|&i| reviews.train[i].text.as_str())
        .collect();
    let train_labels: Vec<u32> = picked.iter().map(|&i| reviews.train[i].label).collect();
    let test = &reviews.test[..setup.test_samples.min(reviews.test.len())];
    let test_texts: Vec<&str> = test.iter().map(|r| r.text.as_str()).collect();
    let test_labels: Vec<u32> = test.iter().map(|r| r.label).collect();

    let tokenizer = kiln::data::tokenize::PretrainedTokenizer::from_file(
        &dir.join("tokenizer.json"),
        setup.max_length,
    )?
    .with_truncation(setup.truncation.for_length(setup.max_length));
    let device = Device::new()?;
    let pooling = match setup.pooling {
        PoolingName::Mean => Pooling::Mean,
        PoolingName::Cls => Pooling::Cls,
    };
    let classifier = BertClassifier::new(Bert::from_pretrained(&device, &dir)?, 2, options.seed)?
        .with_pooling(pooling);
    check_max_length(setup.max_length, &classifier.bert.config)?;
    let layers = classifier.bert.config.num_hidden_layers;
    if setup.freeze_layers > layers {
        bail!(
            "--freeze-layers {} is more than the {layers} blocks of {}; at most {layers} (all \
             of them, training the head alone)",
            setup.freeze_layers,
            dir.display()
        );
    }
    classifier.freeze(setup.freeze_layers);
    println!(
        "fine-tuning {} ({} of {layers} blocks trainable) on {} reviews, {} tokens ({:?}), batch {}, on {}",
        dir.display(),
        layers.saturating_sub(setup.freeze_layers),
        train_texts.len(),
        setup.max_length,
        tokenizer.truncation,
        options.batch_size,
        device.adapter_info().name
    );
    let start = std::time::Instant::now();
    finetune(
        &classifier,
        &tokenizer,
        &train_texts,
        &train_labels,
        options,
    )?;
    let trained = start.elapsed().as_secs_f64();
    let finetuned = TextClassifier {
        model: classifier,
        tokenizer,
        labels: IMDB_LABELS.iter().map(|l| l.to_string()).collect(),
    };
    finetuned.save(&setup.output)?;
    println!("saved {}", setup.output.display());
    let accuracy = evaluate_classifier(
        &finetuned.model,
        &finetuned.tokenizer,
        &test_texts,
        &test_labels,
        32,
    )?;
    println!(
        "test accuracy {:.2}% on {} held-out reviews; training {trained:.0} s, total {:.0} s",
        100.0 * accuracy,
        test_texts.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// IMDB's classes by label index.
const IMDB_LABELS: [&str; 2] = ["negative", "positive"];

/// The directory of a fine-tuned classifier that `path` names (the directory
/// itself or its model file), if it is one.
fn finetuned_dir(path: &Path) -> Option<PathBuf> {
    use kiln::pretrained::{MODEL_FILE, TOKENIZER_FILE};
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else if path.file_name()? == MODEL_FILE {
        path.parent()?.to_path_buf()
    } else {
        return None;
    };
    dir.join(TOKENIZER_FILE).is_file().then_some(dir)
}

fn predict_finetuned(dir: &Path, texts: &[String]) -> Result<()> {
    let device = Device::new()?;
    let classifier = TextClassifier::open(&device, dir)?;
    for (text, p) in texts.iter().zip(classifier.predict(texts, 32)?) {
        let best = kiln::train::argmax(&p).unwrap_or(0);
        println!("{} ({:.3})  {text}", classifier.labels[best], p[best]);
    }
    Ok(())
}

fn eval_finetuned(dir: &Path, dataset: DatasetName, limit_test: Option<usize>) -> Result<()> {
    if !matches!(dataset, DatasetName::Imdb) {
        bail!(
            "{} holds a text classifier: use --dataset imdb",
            dir.display()
        );
    }
    let device = Device::new()?;
    let classifier = TextClassifier::open(&device, dir)?;
    let reviews = imdb::load()?;
    let test = &reviews.test[..limit_test.unwrap_or(usize::MAX).min(reviews.test.len())];
    let texts: Vec<&str> = test.iter().map(|r| r.text.as_str()).collect();
    let labels: Vec<u32> = test.iter().map(|r| r.label).collect();
    let accuracy = kiln::train::finetune::evaluate_classifier(
        &classifier.model,
        &classifier.tokenizer,
        &texts,
        &labels,
        32,
    )?;
    println!(
        "{}: test accuracy {:.2}% on {} reviews",
        dir.display(),
        100.0 * accuracy,
        test.len()
    );
    Ok(())
}
