//! Subword tokenisation for pretrained models: a Hugging Face `tokenizer.json`
//! (WordPiece for BERT) read by the `tokenizers` crate, with truncation and
//! padding under Kiln's control rather than the file's (MiniLM's file pads
//! everything to 128).

use super::DataError;
use std::path::Path;
use tokenizers::Tokenizer;

/// Which tokens a text longer than the limit keeps. Special tokens
/// (`[CLS]`, `[SEP]`) are always kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Truncation {
    /// The first tokens (what `tokenizers` and Hugging Face do by default).
    #[default]
    Head,
    /// The first `head` tokens and as many of the last as fit. Reviews tend to
    /// state their verdict at the end; Sun et al. (2019, "How to Fine-Tune BERT
    /// for Text Classification") found head+tail best on IMDB.
    HeadTail {
        /// Content tokens kept from the start (capped at what fits).
        head: usize,
    },
}

impl std::fmt::Display for Truncation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Head => write!(f, "head"),
            Self::HeadTail { head } => write!(f, "head-tail:{head}"),
        }
    }
}

impl std::str::FromStr for Truncation {
    type Err = DataError;

    /// Reads what `Display` writes: `head` or `head-tail:N`.
    fn from_str(s: &str) -> Result<Self, DataError> {
        let head = s.strip_prefix("head-tail:").map(str::parse::<usize>);
        match (s, head) {
            ("head", _) => Ok(Self::Head),
            (_, Some(Ok(head))) => Ok(Self::HeadTail { head }),
            _ => Err(DataError::Invalid(format!(
                "truncation {s:?}: expected `head` or `head-tail:N`"
            ))),
        }
    }
}

/// A pretrained tokenizer that truncates to `max_length` tokens (special
/// tokens included) and pads batches to their longest member.
pub struct PretrainedTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    /// Most tokens per text, special tokens included; at least 3.
    pub max_length: usize,
    /// Which tokens a text longer than `max_length` keeps.
    pub truncation: Truncation,
}

/// Token ids of a padded batch, its attention mask (1 real, 0 padding) and
/// its `[batch, tokens]` shape.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBatch {
    /// Token ids, `[batch, tokens]` row-major, padded with the tokenizer's `[PAD]` id.
    pub ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding, laid out as `ids`.
    pub mask: Vec<f32>,
    /// `[batch, tokens]`: texts, and the longest text's token count.
    pub shape: [usize; 2],
}

impl TokenBatch {
    /// The batch as a BERT model's input (single segment).
    pub fn input(&self) -> kiln_models::bert::BertInput<'_> {
        kiln_models::bert::BertInput {
            ids: &self.ids,
            mask: &self.mask,
            shape: self.shape,
            token_types: None,
        }
    }
}

impl PretrainedTokenizer {
    /// Reads `tokenizer.json`; inputs longer than `max_length` tokens keep
    /// their first tokens (see [`PretrainedTokenizer::with_truncation`]).
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => DataError::Missing {
                dataset: "tokenizer.json",
                dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                fetch: "scripts/fetch-minilm.sh",
            },
            _ => DataError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
        Self::from_bytes(&bytes, path, max_length)
    }

    /// Parses the contents of a `tokenizer.json` read from `path` (named in
    /// errors), for a caller that has read the file already, e.g. to check
    /// its checksum: parsing those bytes rather than reading the file again
    /// parses what was checked.
    pub fn from_bytes(bytes: &[u8], path: &Path, max_length: usize) -> Result<Self, DataError> {
        if max_length < 3 {
            return Err(DataError::Invalid(format!(
                "max_length {max_length}: a BERT input needs at least 3 tokens ([CLS], [SEP] \
                 and one of the text)"
            )));
        }
        let mut inner = Tokenizer::from_bytes(bytes).map_err(|e| DataError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a tokenizer.json ({e})"),
            fetch: "scripts/fetch-minilm.sh",
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| DataError::Invalid(format!("turning truncation off: {e}")))?;
        let pad_id = inner.token_to_id("[PAD]").unwrap_or(0);
        Ok(Self {
            inner,
            pad_id,
            max_length,
            truncation: Truncation::Head,
        })
    }

    /// Writes the tokenizer as `tokenizer.json` (without padding or
    /// truncation: those are Kiln's settings, kept by the caller), atomically.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| DataError::Invalid(format!("serialising the tokenizer: {e}")))?;
        kiln_models::checkpoint::write_atomic(path, json.as_bytes()).map_err(|source| {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// Chooses which tokens long texts keep.
    pub fn with_truncation(mut self, truncation: Truncation) -> Self {
        self.truncation = truncation;
        self
    }

    /// Ids of one text, special tokens included (`[CLS] ... [SEP]` for BERT),
    /// cut to `max_length` as [`Truncation`] says.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| DataError::Invalid(format!("tokenizing {text:?}: {e}")))?;
        let ids = encoding.get_ids();
        if ids.len() <= self.max_length {
            return Ok(ids.to_vec());
        }
        // Special tokens sit at both ends; truncation only touches the text
        // between them.
        let special = encoding.get_special_tokens_mask();
        let prefix = special.iter().take_while(|&&s| s == 1).count();
        // (An all-special encoding counts its tokens once, as the prefix.)
        let suffix = special.iter().rev().take_while(|&&s| s == 1).count();
        let suffix = suffix.min(ids.len() - prefix);
        let budget = self.max_length.saturating_sub(prefix + suffix);
        let content = &ids[prefix..ids.len() - suffix];
        let head = match self.truncation {
            Truncation::Head => budget,
            Truncation::HeadTail { head } => head.min(budget),
        };
        let tail = budget - head;
        let mut kept = Vec::with_capacity(self.max_length);
        kept.extend_from_slice(&ids[..prefix]);
        kept.extend_from_slice(&content[..head]);
        kept.extend_from_slice(&content[content.len() - tail..]);
        kept.extend_from_slice(&ids[ids.len() - suffix..]);
        Ok(kept)
    }

    /// Encodes `texts` and pads them to the longest.
    pub fn batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch, DataError> {
        let encoded: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.encode(t.as_ref()))
            .collect::<Result<_, _>>()?;
        let tokens = encoded.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(texts.len() * tokens);
        let mut mask = Vec::with_capacity(texts.len() * tokens);
        for e in &encoded {
            ids.extend_from_slice(e);
            ids.resize(ids.len() + tokens - e.len(), self.pad_id);
            mask.extend((0..tokens).map(|i| f32::from(u8::from(i < e.len()))));
        }
        Ok(TokenBatch {
            ids,
            mask,
            shape: [texts.len(), tokens],
        })
    }
}
