//! The real IMDB reviews (fetched by `scripts/fetch-imdb.sh`): the split, the
//! cleaning, the vocabulary, clear errors for a missing or corrupt file, and
//! the reference LSTM classifier learning from a small subset.

mod common;

use kiln::data::imdb::{self, TRAIN_SIZE};
use kiln::data::text::{TextVectorizer, PAD, UNKNOWN};
use kiln::data::DataError;
use kiln::graph::optim::Adam;
use kiln::train::{FitOptions, Trainer};
use kiln::zoo::{Architecture, TEXT_LENGTH, TEXT_VOCAB};

#[test]
fn splits_the_50000_reviews_into_balanced_halves() {
    let data = imdb::load().expect("run scripts/fetch-imdb.sh first");
    assert_eq!(data.train.len(), TRAIN_SIZE);
    assert_eq!(data.test.len(), TRAIN_SIZE);
    for half in [&data.train, &data.test] {
        let positive = half.iter().filter(|r| r.label == 1).count();
        // A fair shuffle of 25,000/25,000 puts 12,500 +- ~80 (one sigma) in each.
        assert!((12_200..=12_800).contains(&positive), "{positive} positive");
        assert!(half.iter().all(|r| !r.text.contains("<br />")));
    }
    // The same split every time.
    let again = imdb::load().unwrap();
    assert_eq!(again.train[..100], data.train[..100]);
    assert_eq!(
        again.test[TRAIN_SIZE - 100..],
        data.test[TRAIN_SIZE - 100..]
    );
}

#[test]
fn a_10000_word_vocabulary_covers_most_of_the_test_text() {
    let data = imdb::load().expect("run scripts/fetch-imdb.sh first");
    let v = TextVectorizer::fit(data.train.iter().map(|r| r.text.as_str()), 10_000, 200);
    assert_eq!(v.vocab_size(), 10_000);
    assert_eq!(v.word(2), Some("the"));
    let ids = v.encode_all(data.test[..2000].iter().map(|r| r.text.as_str()));
    assert_eq!(ids.len(), 2000 * 200);
    let words = ids.iter().filter(|&&i| i != PAD).count();
    let unknown = ids.iter().filter(|&&i| i == UNKNOWN).count();
    // Keras's 10k-word IMDB vocabulary leaves about 5% of tokens unknown.
    assert!(
        (unknown as f64) < 0.08 * words as f64,
        "{unknown} of {words} unknown"
    );
}

#[test]
fn missing_and_corrupt_files_say_what_to_do() {
    let dir = std::env::temp_dir().join(format!("kiln-imdb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("reviews.json");
    let err = imdb::load_from(&path).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("fetch-imdb.sh"), "{err}");
    std::fs::write(&path, br#"[{"t": "fine", "s": 1}]"#).unwrap();
    let err = imdb::load_from(&path).unwrap_err().to_string();
    assert!(
        err.contains("SHA-256") && err.contains("fetch-imdb.sh"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_lstm_classifier_learns_sentiment_from_3000_reviews() {
    let data = imdb::load().expect("run scripts/fetch-imdb.sh first");
    let v = TextVectorizer::fit(
        data.train.iter().map(|r| r.text.as_str()),
        TEXT_VOCAB,
        TEXT_LENGTH,
    );
    let train = imdb::to_dataset(&data.train[..3000], &v).unwrap();
    let test = imdb::to_dataset(&data.test[..1000], &v).unwrap();
    let device = common::device();
    let model = Architecture::Lstm.build(device, 0).unwrap();
    let optimizer = Adam::new(model.parameters(), 3e-3);
    let mut trainer = Trainer::new(model, optimizer, device);
    let options = FitOptions {
        epochs: 2,
        batch_size: 32,
        progress: false,
        log_epochs: false,
        ..Default::default()
    };
    trainer.fit(&train, &options).unwrap();
    let (_, accuracy) = trainer.evaluate(&test, 250).unwrap();
    // Chance is 50%; the full run reaches the high 80s.
    assert!(
        accuracy > 0.65,
        "accuracy {accuracy} on 1,000 held-out reviews"
    );
}

#[test]
fn the_encoded_cache_matches_a_fresh_encoding_and_survives_corruption() {
    let dir = std::env::temp_dir().join(format!("kiln-imdb-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("encoded.safetensors");
    let source = imdb::default_path();
    let fresh = imdb::load_encoded_at(&source, &cache, 500, 20).unwrap();
    assert!(cache.exists());
    let cached = imdb::load_encoded_at(&source, &cache, 500, 20).unwrap();
    assert_eq!(cached.vectorizer, fresh.vectorizer);
    assert_eq!(
        (cached.train.x.len(), cached.test.y.len()),
        (TRAIN_SIZE * 20, TRAIN_SIZE)
    );
    assert!(cached.train == fresh.train && cached.test == fresh.test);
    let data = imdb::load().unwrap();
    assert_eq!(
        fresh.test.x[..20],
        fresh
            .vectorizer
            .encode(&data.test[0].text)
            .iter()
            .map(|&i| i as f32)
            .collect::<Vec<_>>()[..]
    );
    // A damaged cache is rebuilt, not trusted: a label that is neither 0 nor 1
    // in an otherwise sound file...
    use kiln::models::checkpoint::{self, Checkpoint};
    let file = Checkpoint::open(&cache).unwrap();
    // A positive review's: read as a class, 0.5 would become 0.
    let positive = fresh.test.y.iter().position(|&l| l == 1).unwrap();
    let mut tensors = Vec::new();
    for name in file.names() {
        let shape = file.shape(&name).unwrap();
        let mut values = file.tensor_f32(&name, &shape).unwrap();
        if name == "test_labels" {
            values[positive] = 0.5;
        }
        tensors.push((name, shape, values));
    }
    let metadata = file.metadata();
    drop(file);
    checkpoint::save(&cache, &tensors, &metadata).unwrap();
    let rebuilt = imdb::load_encoded_at(&source, &cache, 500, 20).unwrap();
    assert!(rebuilt.test == fresh.test);
    // ...or no cache at all.
    std::fs::write(&cache, b"not a cache").unwrap();
    let rebuilt = imdb::load_encoded_at(&source, &cache, 500, 20).unwrap();
    assert!(rebuilt.train == fresh.train);
    std::fs::remove_dir_all(&dir).unwrap();
}
