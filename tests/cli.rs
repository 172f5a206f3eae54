//! The `kiln` binary: `info` works, and a missing adapter is a clear error.

use std::process::Command;

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    cmd
}

/// Runs `kiln args`, which must succeed (else the test fails with its
/// output); returns its stdout.
fn kiln_ok(args: &[&str]) -> String {
    let out = kiln().args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn info_prints_the_adapter_and_its_limits() {
    let out = kiln().arg("info").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for field in [
        "adapter:",
        "backend:",
        "f16 in shaders:",
        "subgroups:",
        "max storage binding:",
        "storage buffers / stage:",
        "timestamp profiling:",
    ] {
        assert!(stdout.contains(field), "missing {field:?} in:\n{stdout}");
    }
    // --all names the selector of each usable adapter, and that selector
    // opens that adapter.
    let out = kiln()
        .args(["info", "--all"])
        .env("KILN_DEVICE", "cpu")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{listing}");
    let field = |text: &str, name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    for index in 0.. {
        let selector = format!("cpu:{index}");
        let Some(line) = listing
            .lines()
            .find(|l| l.contains(&format!("[KILN_DEVICE={selector}]")))
        else {
            assert!(index > 0, "no cpu:0 in:\n{listing}");
            break;
        };
        let out = kiln()
            .arg("info")
            .env("KILN_DEVICE", &selector)
            .output()
            .unwrap();
        let opened = String::from_utf8_lossy(&out.stdout);
        let (name, backend) = (field(&opened, "adapter:"), field(&opened, "backend:"));
        assert!(
            line.contains(&format!("{name} ({backend},")),
            "{selector} opened {name} on {backend}; the listing says {line}"
        );
    }
    // The kernel class, when set against the adapter's own kind, is shown.
    let out = kiln()
        .arg("info")
        .env("KILN_KERNEL_CLASS", "gpu")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let cpu = stdout.contains("(CPU adapter)");
    assert_eq!(
        stdout.contains("kernels:                 as for a GPU"),
        cpu,
        "{stdout}"
    );
    if cpu {
        assert!(
            stdout.contains("matmul tiling:           shared:"),
            "{stdout}"
        );
    }
}

#[test]
fn no_adapter_is_a_clear_error_with_a_non_zero_exit() {
    // DX12 does not exist on Linux or macOS, so nothing can be found.
    if cfg!(windows) {
        return;
    }
    let out = kiln()
        .arg("info")
        .env("WGPU_BACKEND", "dx12")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: no usable graphics adapter"),
        "{stderr}"
    );
    assert!(
        stderr.contains("apt-get install -y mesa-vulkan-drivers libvulkan1"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_bad_device_selector_is_a_clear_error() {
    let out = kiln()
        .arg("info")
        .env("KILN_DEVICE", "tpu")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("invalid device selector \"tpu\""),
        "{stderr}"
    );
}

#[test]
fn a_model_and_a_dataset_that_do_not_fit_are_refused_up_front() {
    for (model, dataset, hint) in [
        ("cnn", "imdb", "--dataset mnist or fashion-mnist"),
        ("lstm", "mnist", "--dataset imdb"),
    ] {
        let out = kiln()
            .args(["train", model, "--dataset", dataset])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(hint), "{model} on {dataset}: {stderr}");
    }
}

#[test]
fn predict_needs_a_checkpoint_that_exists() {
    let out = kiln()
        .args([
            "predict",
            "--checkpoint",
            "/nonexistent/model.safetensors",
            "great film",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/nonexistent/model.safetensors"),
        "{stderr}"
    );
}

#[test]
fn embed_prints_one_unit_vector_per_text() {
    let out = kiln()
        .args([
            "embed",
            "A great movie.",
            "A wonderful film.",
            "Stocks fell.",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<f64>> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for r in &rows {
        assert_eq!(r.len(), 384);
        assert!((dot(r, r) - 1.0).abs() < 1e-5);
    }
    // Paraphrases are closer than unrelated sentences.
    assert!(dot(&rows[0], &rows[1]) > dot(&rows[0], &rows[2]) + 0.3);
}

#[test]
fn a_finetuned_bert_is_saved_then_predicts_and_evaluates() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-bert-{}", std::process::id()));
    // Head only, few short reviews: this checks the plumbing, not accuracy.
    let dir_arg = dir.to_str().unwrap();
    kiln_ok(&[
        "finetune",
        "bert",
        "--train-samples",
        "16",
        "--test-samples",
        "16",
        "--freeze-layers",
        "6",
        "--max-length",
        "24",
        "--no-progress",
        "--output",
        dir_arg,
    ]);
    let predicted = kiln_ok(&[
        "predict",
        "--checkpoint",
        dir_arg,
        "What a wonderful film.",
        "Dreadful.",
    ]);
    let lines: Vec<&str> = predicted.lines().collect();
    assert_eq!(lines.len(), 2, "{predicted}");
    for line in &lines {
        assert!(
            line.starts_with("positive (") || line.starts_with("negative ("),
            "{line}"
        );
    }
    // A second run into the same directory is refused before any work.
    let again = kiln()
        .args(["finetune", "bert", "--output", dir_arg])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(stderr.contains("pass --overwrite"), "{stderr}");
    let model_file = dir.join("model.safetensors");
    let evaluated = kiln_ok(&[
        "eval",
        "--checkpoint",
        model_file.to_str().unwrap(),
        "--dataset",
        "imdb",
        "--limit-test",
        "8",
    ]);
    assert!(
        evaluated.contains("test accuracy") && evaluated.contains("on 8 reviews"),
        "{evaluated}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nonsense_settings_are_refused_before_any_work() {
    for args in [
        &["train", "mlp", "--lr", "NaN"][..],
        &["train", "mlp", "--lr=-1"],
        &["train", "mlp", "--epochs", "0"],
        &["train", "mlp", "--limit-test", "0"],
        &["train", "mlp", "--validation-split", "1"],
        &["train", "mlp", "--validation-split", "NaN"],
        &["train", "mlp", "--validation-split=-0.2"],
        &["finetune", "bert", "--head-lr", "inf"],
        &["finetune", "bert", "--epochs", "0"],
        &["embed", "--max-length", "1", "hello"],
    ] {
        let out = kiln().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("give") || stderr.contains("learning rate"),
            "{args:?}: {stderr}"
        );
    }
    let out = kiln()
        .args([
            "predict",
            "--checkpoint",
            "unused.safetensors",
            "fine",
            "  ",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("text 2 is empty"), "{stderr}");
}

#[test]
fn an_existing_checkpoint_is_never_replaced_unasked() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-keep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("checkpoint.safetensors");
    std::fs::write(&path, b"an earlier run's weights").unwrap();
    let train = |checkpoint: &std::path::Path, extra: &[&str]| {
        let out = kiln()
            .args(["train", "mlp", "--checkpoint", checkpoint.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let stderr = train(&path, &[]);
    assert!(
        stderr.contains("exists") && stderr.contains("--resume") && stderr.contains("--overwrite"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"an earlier run's weights");
    // Resuming needs a checkpoint, and a directory is no file to write.
    let stderr = train(&dir.join("none.safetensors"), &["--resume"]);
    assert!(stderr.contains("nothing to resume"), "{stderr}");
    let stderr = train(&dir, &[]);
    assert!(stderr.contains("is a directory"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn finetuning_refuses_to_write_over_its_pretrained_model() {
    let model = kiln::data::cache_dir().join("minilm");
    let out = kiln()
        .args(["finetune", "bert", "--output", model.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("pretrained model's directory"), "{stderr}");
}

#[test]
fn finetuning_refuses_to_freeze_more_blocks_than_the_model_has() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-freeze-{}", std::process::id()));
    let out = kiln()
        .args(["finetune", "bert", "--freeze-layers", "7"])
        .args(["--output", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--freeze-layers 7 is more than the 6 blocks"),
        "{stderr}"
    );
    assert!(!dir.join("model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resuming_on_another_dataset_is_refused_and_keeps_the_checkpoint() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-resume-{}", std::process::id()));
    let path = dir.join("checkpoint.safetensors");
    let train = |dataset: &str, extra: &[&str]| {
        kiln()
            .args(["train", "mlp", "--dataset", dataset])
            .args(["--limit-train", "256", "--limit-test", "64"])
            .args(["--checkpoint", path.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let first = train("mnist", &["--epochs", "1"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let saved = std::fs::read(&path).unwrap();
    let other = train("fashion-mnist", &["--resume", "--epochs", "2"]);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success());
    assert!(
        stderr.contains("dataset = mnist") && stderr.contains("dataset = fashion-mnist"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), saved);
    // Nor with other training settings: each is named by its flag.
    for (flag, value, saved_value) in [
        ("--lr", "0.0001", "0.001"),
        ("--validation-split", "0.25", "0"),
        ("--batch-size", "16", "32"),
    ] {
        let other = train("mnist", &["--resume", "--epochs", "2", flag, value]);
        let stderr = String::from_utf8_lossy(&other.stderr);
        assert!(!other.status.success());
        assert!(
            stderr.contains(&format!("{flag} = {saved_value}"))
                && stderr.contains(&format!("{flag} = {value}")),
            "{stderr}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), saved);
    }
    // The same settings resume, with more epochs.
    let same = train("mnist", &["--resume", "--epochs", "2"]);
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_scores_a_checkpoint_with_the_loss_it_was_trained_on() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-eval-mse-{}", std::process::id()));
    let path = dir.join("checkpoint.safetensors");
    let run = |args: &[&str]| {
        let stdout = kiln_ok(args);
        // The figure after "test loss", as both commands print it.
        let line = stdout
            .lines()
            .find(|l| l.contains("test loss"))
            .unwrap_or_else(|| panic!("no test loss in:\n{stdout}"));
        let after = line.split("test loss ").nth(1).unwrap();
        after.split(',').next().unwrap().to_string()
    };
    let trained = run(&[
        "train",
        "mlp",
        "--loss",
        "mse",
        "--epochs",
        "1",
        "--limit-train",
        "256",
        "--limit-test",
        "64",
        "--checkpoint",
        path.to_str().unwrap(),
    ]);
    let scored = run(&[
        "eval",
        "--checkpoint",
        path.to_str().unwrap(),
        "--limit-test",
        "64",
    ]);
    // A cross-entropy score of the same weights would be several times
    // larger than the mean squared error of their probabilities.
    assert_eq!(trained, scored);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resuming_a_run_early_stopping_ended_says_there_is_nothing_to_train() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-stopped-{}", std::process::id()));
    let path = dir.join("checkpoint.safetensors");
    // A rate too small to move the weights: epoch 2 does not improve on
    // epoch 1, and a patience of 1 stops the run there.
    let checkpoint = path.to_str().unwrap();
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "mlp", "--limit-train", "256", "--limit-test", "64"];
        args.extend([
            "--patience",
            "1",
            "--lr",
            "1e-30",
            "--checkpoint",
            checkpoint,
        ]);
        args.extend(extra);
        kiln_ok(&args)
    };
    let first = train(&["--epochs", "4"]);
    assert!(first.contains("trained 2 epochs"), "{first}");
    let resumed = train(&["--resume", "--epochs", "6"]);
    assert!(
        resumed.contains("early stopping had already stopped this run after epoch 2")
            && resumed.contains("trained 0 epochs"),
        "{resumed}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
