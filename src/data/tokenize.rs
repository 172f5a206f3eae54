//! Subword tokenisation for pretrained models: a Hugging Face `tokenizer.json`
//! (WordPiece for BERT) read by the `tokenizers` crate, with truncation and
//! padding under Kiln's control rather than the file's (MiniLM's file pads
//! everything to 128).

use super::DataError;
use std::path::Path;
use tokenizers::{Tokenizer, TruncationParams};

/// A pretrained tokenizer that truncates to `max_length` tokens (special
/// tokens included) and pads batches to their longest member.
pub struct PretrainedTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    pub max_length: usize,
}

/// Token ids of a padded batch, its attention mask (1 real, 0 padding) and
/// its `[batch, tokens]` shape.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    pub mask: Vec<f32>,
    pub shape: [usize; 2],
}

impl PretrainedTokenizer {
    /// Reads `tokenizer.json`; inputs longer than `max_length` tokens are cut.
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, DataError> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| DataError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a tokenizer.json ({e})"),
            fetch: "scripts/fetch-minilm.sh",
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| DataError::Invalid(format!("truncation to {max_length}: {e}")))?;
        let pad_id = inner.token_to_id("[PAD]").unwrap_or(0);
        Ok(Self {
            inner,
            pad_id,
            max_length,
        })
    }

    /// Ids of one text, special tokens included (`[CLS] ... [SEP]` for BERT).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| DataError::Invalid(format!("tokenizing {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
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
