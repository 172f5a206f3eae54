//! A fine-tuned pretrained text classifier as a user handles it: the BERT
//! classifier and its tokenizer, saved to one directory, opened again, asked
//! for class probabilities.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = kiln::Device::new()?;
//! // A directory written by `kiln finetune bert` (or `TextClassifier::save`).
//! let classifier = kiln::pretrained::TextClassifier::open(&device, "runs/bert-imdb".as_ref())?;
//! let p = classifier.predict(&["A wonderful, moving film."], 32)?;
//! println!("{}: {:.3}", classifier.labels[1], p[0][1]);
//! # Ok(()) }
//! ```

use crate::data::tokenize::{PretrainedTokenizer, Truncation};
use kiln_graph::Device;
use kiln_graph::NoGradGuard;
use kiln_models::bert::BertClassifier;
use kiln_models::{Mode, ModelError};
use std::collections::HashMap;
use std::path::Path;

/// File inside a saved classifier's directory holding the weights, the
/// encoder config, the tokenizer settings and the class names.
pub const MODEL_FILE: &str = "model.safetensors";
/// File inside a saved classifier's directory holding the Hugging Face
/// tokenizer (without Kiln's padding and truncation settings).
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Header key of the tokenizer's `max_length`.
const MAX_LENGTH_KEY: &str = "kiln.max_length";
/// Header key of the tokenizer's truncation (`head` or `head-tail:N`).
const TRUNCATION_KEY: &str = "kiln.truncation";
/// Header key of the class names, a JSON array of strings.
const LABELS_KEY: &str = "kiln.labels";
/// Header key of the SHA-256 of the `tokenizer.json` saved with the model.
const TOKENIZER_SHA256_KEY: &str = "kiln.tokenizer_sha256";

/// The file at `path`.
fn read_file(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A BERT classifier with the tokenizer (and its settings) it was trained
/// with, and the names of its classes.
pub struct TextClassifier {
    /// The encoder and its classification head.
    pub model: BertClassifier,
    /// The tokenizer, with the length and truncation the model was trained with.
    pub tokenizer: PretrainedTokenizer,
    /// Class names, by class index.
    pub labels: Vec<String>,
}

impl TextClassifier {
    /// Writes `dir/tokenizer.json` and then `dir/model.safetensors` (weights,
    /// encoder config, tokenizer settings and checksum, labels), each
    /// atomically: an interrupted save leaves each file whole, and `open`
    /// refuses a tokenizer other than the one its model was saved with.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        // Checked first: a save that `open` would refuse must not replace
        // good files.
        self.classes()?;
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        self.tokenizer.save(&tokenizer_path)?;
        let metadata = HashMap::from([
            (
                TOKENIZER_SHA256_KEY.into(),
                crate::data::mnist::sha256_hex(&read_file(&tokenizer_path)?),
            ),
            (MAX_LENGTH_KEY.into(), self.tokenizer.max_length.to_string()),
            (TRUNCATION_KEY.into(), self.tokenizer.truncation.to_string()),
            (
                LABELS_KEY.into(),
                serde_json::to_string(&self.labels).expect("strings serialise"),
            ),
        ]);
        self.model
            .save_safetensors(&dir.join(MODEL_FILE), &metadata)
    }

    /// Opens a directory written by [`TextClassifier::save`].
    pub fn open(device: &Device, dir: &Path) -> Result<Self, ModelError> {
        let model_path = dir.join(MODEL_FILE);
        if !model_path.is_file() {
            return Err(ModelError::Invalid(format!(
                "no {MODEL_FILE} in {}: fine-tune one with `kiln finetune bert --output {}`",
                dir.display(),
                dir.display()
            )));
        }
        let (model, metadata) = BertClassifier::open(device, &model_path)?;
        let setting = |key: &str| {
            metadata.get(key).ok_or_else(|| ModelError::Checkpoint {
                path: model_path.clone(),
                reason: format!("no `{key}` metadata: it was not saved by a TextClassifier"),
            })
        };
        let max_length: usize = setting(MAX_LENGTH_KEY)?
            .parse()
            .map_err(|e| ModelError::Invalid(format!("{MAX_LENGTH_KEY}: {e}")))?;
        let truncation: Truncation = setting(TRUNCATION_KEY)?.parse()?;
        let labels: Vec<String> = serde_json::from_str(setting(LABELS_KEY)?)
            .map_err(|e| ModelError::Invalid(format!("{LABELS_KEY}: {e}")))?;
        let classes = model.head.bias.shape()[0];
        if labels.len() != classes {
            return Err(ModelError::Checkpoint {
                path: model_path,
                reason: format!("{} labels for a {classes}-class head", labels.len()),
            });
        }
        let positions = model.bert.config.max_position_embeddings;
        if max_length > positions {
            return Err(ModelError::Checkpoint {
                path: model_path,
                reason: format!(
                    "{MAX_LENGTH_KEY} {max_length} is past the model's {positions} positions"
                ),
            });
        }
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        // Read once: the bytes checked are the bytes parsed.
        let tokenizer_json = read_file(&tokenizer_path)?;
        // Directories saved before the checksum was kept have none.
        if let Some(saved) = metadata.get(TOKENIZER_SHA256_KEY) {
            if crate::data::mnist::sha256_hex(&tokenizer_json) != *saved {
                return Err(ModelError::Checkpoint {
                    path: tokenizer_path,
                    reason: format!(
                        "it is not the tokenizer {MODEL_FILE} was saved with (a later save \
                         replaced one file but not the other): save the classifier again"
                    ),
                });
            }
        }
        let tokenizer =
            PretrainedTokenizer::from_bytes(&tokenizer_json, &tokenizer_path, max_length)?
                .with_truncation(truncation);
        Ok(Self {
            model,
            tokenizer,
            labels,
        })
    }

    /// Class probabilities of each text, computed `batch_size` texts at a
    /// time.
    pub fn predict<S: AsRef<str>>(
        &self,
        texts: &[S],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let classes = self.classes()?;
        let _guard = NoGradGuard::new();
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch_size.max(1)) {
            let tokens = self.tokenizer.batch(chunk)?;
            let probabilities = self
                .model
                .forward(&tokens.input(), &mut Mode::eval())?
                .softmax()?
                .to_vec()?;
            out.extend(probabilities.chunks(classes).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// The head's class count, which must be the number of labels.
    fn classes(&self) -> Result<usize, ModelError> {
        let classes = self.model.head.bias.shape()[0];
        if self.labels.len() != classes || classes == 0 {
            return Err(ModelError::Invalid(format!(
                "{} labels for a {classes}-class head: give one name per class",
                self.labels.len()
            )));
        }
        Ok(classes)
    }
}
