//! The Keras MNIST MLP tutorial through Kiln's library API: build a
//! `Sequential` model, train it with Adam and a validation split, evaluate it
//! on the test images, save it, load it into a fresh model and predict.
//!
//! ```text
//! scripts/install-vulkan-cpu.sh && scripts/fetch-mnist.sh
//! cargo run --release --example mnist_mlp            # 5 epochs
//! cargo run --release --example mnist_mlp -- 10      # 10 epochs
//! ```

use kiln::graph::optim::Adam;
use kiln::models::{Activation, Dense, Dropout, Sequential};
use kiln::train::{EarlyStopping, FitOptions, Trainer};
use std::collections::HashMap;

/// 784 -> 64 relu -> dropout 0.2 -> 64 relu -> 10 logits. The seeds make the
/// initial weights reproducible.
fn build(device: &kiln::Device) -> Result<Sequential, kiln::models::ModelError> {
    Ok(Sequential::new()
        .push(Dense::new(device, 784, 64, Activation::Relu, 1)?)
        .push(Dropout::new(0.2))
        .push(Dense::new(device, 64, 64, Activation::Relu, 2)?)
        .push(Dense::new(device, 64, 10, Activation::None, 3)?))
}

fn main() -> anyhow::Result<()> {
    let epochs: usize = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|_| anyhow::anyhow!("epochs must be a whole number, got {arg:?}"))?,
        None => 5,
    };
    let device = kiln::Device::new()?;
    // Pixels scaled to [0, 1]; fails with the command to run if MNIST is not
    // in the cache yet.
    let mnist = kiln::data::mnist::load()?;

    let model = build(&device)?;
    println!("{}", model.summary(&[784]));
    let optimizer = Adam::new(model.parameters(), 1e-3);
    let mut trainer = Trainer::new(model, optimizer, &device);
    let options = FitOptions {
        epochs,
        batch_size: 32,
        validation_split: 0.1,
        early_stopping: Some(EarlyStopping {
            patience: 2,
            min_delta: 1e-3,
        }),
        ..Default::default()
    };
    let history = trainer.fit(&mnist.train, &options)?;
    println!("trained {} epochs", history.epochs.len());

    let (loss, accuracy) = trainer.evaluate(&mnist.test, 1000)?;
    println!(
        "test loss {loss:.4}, test accuracy {:.2}%",
        accuracy * 100.0
    );

    // Weights only; `Trainer::save_checkpoint` also keeps the optimizer state
    // for `Trainer::resume`.
    let dir = std::env::temp_dir().join("kiln-example-mnist-mlp");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("weights.safetensors");
    trainer.model.save(&path, &HashMap::new())?;

    let restored = build(&device)?;
    restored.load_weights(&path)?;
    let reloaded = Trainer::new(restored, Adam::new(vec![], 1e-3), &device);
    let (_, reloaded_accuracy) = reloaded.evaluate(&mnist.test, 1000)?;
    anyhow::ensure!(
        reloaded_accuracy == accuracy,
        "the reloaded model scores {reloaded_accuracy}, the trained one {accuracy}"
    );
    let first = mnist.test.take(5);
    let probabilities = reloaded.predict(&first.x, first.features)?;
    for (row, label) in probabilities.chunks(10).zip(&first.y) {
        let (predicted, p) = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap_or((0, &0.0));
        println!("label {label}: predicted {predicted} ({:.1}%)", p * 100.0);
    }
    println!("weights saved to {}", path.display());
    Ok(())
}
