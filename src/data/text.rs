//! Word-level text vectorisation, as Keras's `TextVectorization` does it by
//! default: lowercase ASCII letters, delete ASCII punctuation (so "don't" is
//! one word, "dont"), split on ASCII whitespace, map words to ids by
//! frequency rank in the training texts (ties in Keras's order), pad or
//! truncate to a fixed length. Id 0 is padding and id 1 stands for any word outside the vocabulary.
//!
//! ```
//! use kiln::data::text::TextVectorizer;
//! let texts = ["A good film.", "A bad film!", "good, GOOD acting"];
//! let v = TextVectorizer::fit(texts.iter().copied(), 10, 6);
//! // "good" is the most frequent word: id 2 (0 is padding, 1 unknown).
//! assert_eq!(v.encode("Good plot"), vec![2, 1, 0, 0, 0, 0]);
//! let restored = TextVectorizer::from_json(&v.to_json()).unwrap();
//! assert_eq!(restored.encode("good film"), v.encode("good film"));
//! ```

use super::DataError;
use std::collections::HashMap;

/// Id of the padding token.
pub const PAD: u32 = 0;
/// Id of words outside the vocabulary.
pub const UNKNOWN: u32 = 1;

/// Longest sequence a saved vectorizer may ask for (a sanity bound on
/// checkpoint metadata).
pub const MAX_SEQUENCE_LENGTH: usize = 1 << 20;

/// A vocabulary and a sequence length; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct TextVectorizer {
    /// Words by id; `vocab[0]` and `vocab[1]` are the padding and unknown
    /// placeholders `""` and `"[UNK]"`.
    vocab: Vec<String>,
    index: HashMap<String, u32>,
    /// Ids per encoded text: longer texts are cut, shorter ones padded with [`PAD`].
    pub sequence_length: usize,
}

/// Keras's `lower_and_strip_punctuation` then whitespace split: lowercases
/// ASCII letters (`tf.strings.lower` leaves others), deletes the 32 ASCII
/// punctuation marks (its default strip pattern) and splits on ASCII
/// whitespace, as `tf.strings.split` does (so a no-break space or U+0085, both
/// in IMDB's reviews, stays inside a word).
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split([' ', '\t', '\n', '\x0b', '\x0c', '\r'])
        .map(|w| {
            w.chars()
                .filter(|c| !c.is_ascii_punctuation())
                .map(|c| c.to_ascii_lowercase())
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
}

impl TextVectorizer {
    /// Learns the `max_tokens - 2` most frequent words of `texts`. Words of
    /// equal count rank in reverse byte order, as Keras ranks them (a sort
    /// by count, then word, reversed), so the same texts give Keras's ids.
    pub fn fit<'a>(
        texts: impl IntoIterator<Item = &'a str>,
        max_tokens: usize,
        sequence_length: usize,
    ) -> Self {
        let mut counts: HashMap<String, u64> = HashMap::new();
        for text in texts {
            for word in words(text) {
                *counts.entry(word).or_default() += 1;
            }
        }
        let mut ranked: Vec<(String, u64)> = counts.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        let mut vocab = vec![String::new(), "[UNK]".to_string()];
        vocab.extend(
            ranked
                .into_iter()
                .take(max_tokens.saturating_sub(2))
                .map(|(w, _)| w),
        );
        Self::from_vocab(vocab, sequence_length)
    }

    fn from_vocab(vocab: Vec<String>, sequence_length: usize) -> Self {
        let index = vocab
            .iter()
            .enumerate()
            .skip(2)
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        Self {
            vocab,
            index,
            sequence_length,
        }
    }

    /// Ids in use, padding and unknown included: the embedding's input size.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The word of an id (`""` for padding, `"[UNK]"` for unknown).
    pub fn word(&self, id: u32) -> Option<&str> {
        self.vocab.get(id as usize).map(String::as_str)
    }

    /// The first `sequence_length` word ids of `text`, padded with [`PAD`].
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = words(text)
            .take(self.sequence_length)
            .map(|w| self.index.get(&w).copied().unwrap_or(UNKNOWN))
            .collect();
        ids.resize(self.sequence_length, PAD);
        ids
    }

    /// Encodes many texts into one row-major `[texts, sequence_length]` array.
    pub fn encode_all<'a>(&self, texts: impl IntoIterator<Item = &'a str>) -> Vec<u32> {
        texts.into_iter().flat_map(|t| self.encode(t)).collect()
    }

    /// The vocabulary and length as JSON, to store with a model's weights.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "format": "kiln-text-vectorizer-1",
            "sequence_length": self.sequence_length,
            "vocab": &self.vocab[2..],
        })
        .to_string()
    }

    /// Reads what [`TextVectorizer::to_json`] wrote.
    pub fn from_json(json: &str) -> Result<Self, DataError> {
        #[derive(serde::Deserialize)]
        struct Saved {
            format: String,
            sequence_length: usize,
            vocab: Vec<String>,
        }
        let saved: Saved = serde_json::from_str(json)
            .map_err(|e| DataError::Invalid(format!("not a saved text vectorizer: {e}")))?;
        if saved.format != "kiln-text-vectorizer-1" {
            return Err(DataError::Invalid(format!(
                "unknown text vectorizer format {:?}",
                saved.format
            )));
        }
        if !(1..=MAX_SEQUENCE_LENGTH).contains(&saved.sequence_length) {
            return Err(DataError::Invalid(format!(
                "text vectorizer: sequence_length {} is outside 1..={MAX_SEQUENCE_LENGTH}",
                saved.sequence_length
            )));
        }
        let mut vocab = vec![String::new(), "[UNK]".to_string()];
        vocab.extend(saved.vocab);
        Ok(Self::from_vocab(vocab, saved.sequence_length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standardises_like_keras() {
        // What Keras's TextVectorization gives: punctuation deleted, not a
        // separator, so words it joined stay joined; a word of punctuation
        // alone disappears; only ASCII letters are lowercased.
        let got: Vec<String> =
            words("It's GREAT,fun\tand<br />\"moving\"! --\x0b ÉCOLE\u{a0}dull\u{85}x").collect();
        assert_eq!(
            got,
            [
                "its",
                "greatfun",
                "andbr",
                "moving",
                "École\u{a0}dull\u{85}x"
            ]
        );
    }

    #[test]
    fn ranks_by_frequency_then_as_keras_breaks_ties_and_caps_the_vocabulary() {
        let v = TextVectorizer::fit(["b a c b", "c b d"], 5, 4);
        // counts: b 3, c 2, a 1, d 1 -> b, c, then of the tied a and d the
        // later one, d, as Keras's reversed (count, word) sort has it (cap 5
        // = pad + unknown + 3).
        assert_eq!(v.vocab_size(), 5);
        assert_eq!(
            (2..5).map(|i| v.word(i).unwrap()).collect::<Vec<_>>(),
            ["b", "c", "d"]
        );
        assert_eq!(v.encode("a b"), vec![UNKNOWN, 2, PAD, PAD]);
        // Truncation keeps the first words.
        assert_eq!(v.encode("d d b c c"), vec![4, 4, 2, 3]);
        assert_eq!(v.encode_all(["d", "zz"]), vec![4, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn json_round_trip_and_bad_input() {
        let v = TextVectorizer::fit(["x y y z"], 100, 3);
        assert_eq!(TextVectorizer::from_json(&v.to_json()).unwrap(), v);
        assert!(TextVectorizer::from_json("{}").is_err());
        assert!(
            TextVectorizer::from_json(r#"{"format":"other","sequence_length":1,"vocab":[]}"#)
                .unwrap_err()
                .to_string()
                .contains("unknown text vectorizer format")
        );
    }
}
