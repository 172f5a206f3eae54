//! Real MNIST (fetched by `scripts/fetch-mnist.sh`, which CI runs first): a short
//! training run must learn, and checkpoints must survive a kill and resume.

mod common;

use kiln::data::{mnist, shuffled_indices, Dataset};
use kiln::graph::optim::Adam;
use kiln::train::{FitOptions, Loss, Trainer};
use kiln::zoo::Architecture;
use std::sync::OnceLock;

fn data() -> &'static mnist::Mnist {
    static DATA: OnceLock<mnist::Mnist> = OnceLock::new();
    DATA.get_or_init(|| mnist::load().unwrap_or_else(|e| panic!("{e}")))
}

/// `n` training samples drawn at random (seeded) from the 60,000.
fn subset(train: &Dataset, n: usize, seed: u64) -> Dataset {
    let picked = &shuffled_indices(train.len(), seed)[..n];
    let (mut x, mut y) = (Vec::new(), Vec::new());
    train.gather(picked, &mut x, &mut y).unwrap();
    Dataset::new(train.features, x, y, train.classes).unwrap()
}

#[test]
fn the_official_mnist_is_what_we_load() {
    let m = data();
    assert_eq!(
        (m.train.len(), m.test.len(), m.train.features),
        (60_000, 10_000, 784)
    );
    assert_eq!(m.train.y[..5], [5, 0, 4, 1, 9]);
    assert_eq!(m.test.y[..5], [7, 2, 1, 0, 4]);
    let mut per_class = [0usize; 10];
    m.train.y.iter().for_each(|&l| per_class[l as usize] += 1);
    assert_eq!(
        per_class,
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
}

fn trainer(seed: u64, lr: f32) -> Trainer<Adam> {
    let device = common::device();
    let model = Architecture::Mlp.build(device, seed).unwrap();
    let optimizer = Adam::new(model.parameters(), lr);
    let mut trainer = Trainer::new(model, optimizer, device);
    trainer.metadata.insert("model".into(), "mlp".into());
    trainer
}

fn quiet(epochs: usize, batch_size: usize, seed: u64) -> FitOptions {
    FitOptions {
        epochs,
        batch_size,
        seed,
        progress: false,
        log_epochs: false,
        ..Default::default()
    }
}

#[test]
fn fashion_mnist_loads_from_its_debian_package() {
    let f = kiln::data::fashion_mnist::load().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (f.train.len(), f.test.len(), f.train.features),
        (60_000, 10_000, 784)
    );
    let mut per_class = [0usize; 10];
    f.train.y.iter().for_each(|&l| per_class[l as usize] += 1);
    assert_eq!(per_class, [6000; 10]);
    let dir = std::env::temp_dir().join("kiln-no-fashion");
    let err = kiln::data::fashion_mnist::load_from(&dir)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("apt-get install dataset-fashion-mnist"),
        "{err}"
    );
}

#[test]
fn mlp_learns_from_2000_samples_in_2_epochs() {
    // Two seeds, each a different random 2,000-sample subset and initialisation.
    let m = data();
    for seed in [0, 1] {
        let mut trainer = trainer(seed, 3e-3);
        trainer
            .fit(&subset(&m.train, 2000, seed), &quiet(2, 16, seed))
            .unwrap();
        let (_, accuracy) = trainer.evaluate(&m.test.take(1000), 500).unwrap();
        assert!(
            accuracy > 0.85,
            "seed {seed}: accuracy {accuracy} on 1,000 test images"
        );
    }
}

#[test]
fn mixed_precision_learns_as_well_as_f32() {
    // Same subset, seed and initialisation; only the products' precision
    // differs. f16 operands perturb each step slightly, so the two runs end
    // near each other rather than equal.
    let m = data();
    let train = subset(&m.train, 2000, 4);
    let test = m.test.take(1000);
    let mut accuracies = Vec::new();
    for mixed_precision in [false, true] {
        let mut trainer = trainer(4, 3e-3);
        let options = FitOptions {
            mixed_precision,
            ..quiet(2, 16, 4)
        };
        trainer.fit(&train, &options).unwrap();
        accuracies.push(trainer.evaluate(&test, 500).unwrap().1);
    }
    let (f32_accuracy, mixed) = (accuracies[0], accuracies[1]);
    assert!(
        mixed > 0.85 && (mixed - f32_accuracy).abs() < 0.02,
        "mixed precision {mixed} vs f32 {f32_accuracy} on 1,000 test images"
    );
}

#[test]
fn the_loss_is_a_choice_like_keras_compile() {
    let m = data();
    let mut trainer = trainer(3, 3e-3);
    trainer.loss = Loss::MeanSquaredError;
    let history = trainer
        .fit(&subset(&m.train, 2000, 3), &quiet(2, 16, 3))
        .unwrap();
    let (loss, accuracy) = trainer.evaluate(&m.test.take(1000), 500).unwrap();
    // An untrained model scores about 0.09 (uniform probabilities against one-hot).
    assert!(loss < 0.03 && loss < history.epochs[0].loss, "loss {loss}");
    assert!(accuracy > 0.8, "accuracy {accuracy}");
}

#[test]
fn evaluate_agrees_with_the_predicted_probabilities() {
    // The loss and accuracy `evaluate` keeps on the device (in the loss's
    // kernel for batches up to 1024, with kernels of its own for larger ones
    // and for MSE) against the same figures computed here from `predict`.
    let m = data();
    let mut trainer = trainer(11, 3e-3);
    trainer
        .fit(&subset(&m.train, 1000, 11), &quiet(1, 32, 11))
        .unwrap();
    let test = m.test.take(1500);
    let probs = trainer.predict(&test.x, test.features).unwrap();
    let classes = test.classes;
    let rows = || probs.chunks(classes).zip(&test.y);
    let n = test.len() as f64;
    let cross_entropy = rows()
        .map(|(p, &y)| -f64::from(p[y as usize]).ln())
        .sum::<f64>()
        / n;
    let squared_error = rows()
        .map(|(p, &y)| {
            p.iter()
                .enumerate()
                .map(|(c, &v)| (f64::from(v) - if c == y as usize { 1.0 } else { 0.0 }).powi(2))
                .sum::<f64>()
        })
        .sum::<f64>()
        / (n * classes as f64);
    let correct = rows()
        .filter(|(p, &y)| p.iter().all(|&v| v <= p[y as usize]))
        .count() as f64
        / n;
    for (loss, want, batch) in [
        (Loss::SparseCategoricalCrossEntropy, cross_entropy, 500),
        (Loss::SparseCategoricalCrossEntropy, cross_entropy, 1500),
        (Loss::MeanSquaredError, squared_error, 500),
    ] {
        trainer.loss = loss;
        let (got_loss, got_accuracy) = trainer.evaluate(&test, batch).unwrap();
        let what = format!("{loss:?}, batches of {batch}");
        assert!(
            (f64::from(got_loss) - want).abs() <= 1e-4 * want,
            "{what}: loss {got_loss}, want {want}"
        );
        assert!(
            (f64::from(got_accuracy) - correct).abs() <= 0.5 / n,
            "{what}: accuracy {got_accuracy}, want {correct}"
        );
    }
}

#[test]
fn resuming_from_a_checkpoint_matches_an_unbroken_run() {
    let m = data();
    let train = subset(&m.train, 600, 5);
    let dir = std::env::temp_dir().join(format!("kiln-resume-{}", std::process::id()));
    let path = dir.join("checkpoint.safetensors");

    let mut unbroken = trainer(7, 1e-3);
    unbroken.fit(&train, &quiet(3, 32, 7)).unwrap();

    let mut first = trainer(7, 1e-3);
    let options = FitOptions {
        checkpoint: Some(path.clone()),
        ..quiet(1, 32, 7)
    };
    first.fit(&train, &options).unwrap();
    drop(first);

    // A fresh process would start here: new model (other init), then resume.
    let mut resumed = trainer(99, 1e-3);
    resumed.resume(&path).unwrap();
    assert_eq!(resumed.epochs_done, 1);
    let history = resumed.fit(&train, &quiet(3, 32, 7)).unwrap();
    assert_eq!(
        history.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
        vec![2, 3]
    );
    for ((name, a), (_, b)) in unbroken
        .model
        .named_parameters()
        .iter()
        .zip(resumed.model.named_parameters())
    {
        assert_eq!(
            a.to_vec().unwrap(),
            b.to_vec().unwrap(),
            "{name} differs after resuming"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn killing_training_never_leaves_a_corrupt_checkpoint() {
    use kiln::models::checkpoint::Checkpoint;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let dir = std::env::temp_dir().join(format!("kiln-kill-{}", std::process::id()));
    let path = dir.join("checkpoint.safetensors");
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args([
            "train",
            "mlp",
            "--limit-train",
            "1000",
            "--limit-test",
            "100",
            "--no-progress",
        ])
        .args(["--checkpoint", path.to_str().unwrap()])
        .args(extra)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    };
    let epoch_of = |path: &std::path::Path| -> usize {
        let file = Checkpoint::open(path).expect("the checkpoint must always load");
        file.metadata()["epoch"].parse().unwrap()
    };
    // Kill a long run at several moments, each after at least one checkpoint.
    let mut last = 0;
    for (round, wait_ms) in [0u64, 37, 151, 263].into_iter().enumerate() {
        let resume: &[&str] = if round == 0 { &[] } else { &["--resume"] };
        let mut child = run(resume).args(["--epochs", "1000"]).spawn().unwrap();
        let start = Instant::now();
        while !path.exists() || epoch_of(&path) <= last {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no checkpoint appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(wait_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        let epoch = epoch_of(&path);
        assert!(
            epoch > last,
            "round {round}: resumed run did not advance ({last} -> {epoch})"
        );
        last = epoch;
    }
    // Resuming finishes the remaining epoch and reports where it started.
    let out = run(&["--resume", "--epochs", &(last + 1).to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("resuming after epoch {last}")),
        "{stdout}"
    );
    assert_eq!(epoch_of(&path), last + 1);
    // The history covers the whole run, killed stretches included (the
    // checkpoint carries it).
    let csv = std::fs::read_to_string(path.with_extension("history.csv")).unwrap();
    let epochs: Vec<usize> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(epochs, (1..=last + 1).collect::<Vec<_>>(), "{csv}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_tiny_cnn_learns_from_a_subset() {
    let m = data();
    let device = common::device();
    let model = kiln::zoo::tiny_cnn(device, 10, 0).unwrap();
    let optimizer = Adam::new(model.parameters(), 3e-3);
    let mut trainer = Trainer::new(model, optimizer, device);
    trainer
        .fit(&subset(&m.train, 2000, 11), &quiet(2, 32, 11))
        .unwrap();
    let (_, accuracy) = trainer.evaluate(&m.test.take(1000), 250).unwrap();
    assert!(accuracy > 0.8, "accuracy {accuracy} on 1,000 test images");
}

#[test]
fn eval_of_a_checkpoint_that_names_no_dataset_says_which_it_chose() {
    use std::process::Command;
    let m = data();
    let dir = std::env::temp_dir().join(format!("kiln-eval-guess-{}", std::process::id()));
    let path = dir.join("checkpoint.safetensors");
    // Saved by the library with the model's name only, as `kiln train` did
    // before it recorded the dataset.
    let mut t = trainer(3, 1e-3);
    let options = FitOptions {
        checkpoint: Some(path.clone()),
        ..quiet(1, 32, 3)
    };
    t.fit(&subset(&m.train, 200, 3), &options).unwrap();
    let eval = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["eval", "--checkpoint", path.to_str().unwrap()])
            .args(["--limit-test", "100"])
            .args(extra)
            .env("XDG_RUNTIME_DIR", std::env::temp_dir())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(stdout.contains("test accuracy"), "{stdout}");
        stderr
    };
    let stderr = eval(&[]);
    assert!(
        stderr.contains("does not say which dataset") && stderr.contains("evaluating on mnist"),
        "{stderr}"
    );
    let stderr = eval(&["--dataset", "mnist"]);
    assert!(!stderr.contains("does not say which dataset"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
