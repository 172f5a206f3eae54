//! Every reference workload, each against its reference (numpy's sgemm,
//! PyTorch CPU; cuBLAS and PyTorch CUDA with `KILN_BENCH_REFERENCE=cuda` on a
//! GPU machine, see scripts/gpu-bench.sh) measured in the same run, in one
//! table; the rows are also written as JSON under `target/kiln-bench/` to
//! compare across commits.
//!
//! ```text
//! cargo bench --bench suite                   # everything (minutes on a CPU adapter)
//! cargo bench --bench suite -- mlp bert       # only the workloads named
//! KILN_PROFILE=1 cargo bench --bench suite -- conv   # also: time per kernel of one step
//! KILN_BENCH_SWEEP=1 cargo bench --bench suite -- matmul   # also: other tilings (or a list of them)
//! ```

mod support;
mod workloads;

fn main() -> anyhow::Result<()> {
    // Cargo passes `--bench`; everything else names workloads.
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let unknown: Vec<&String> = wanted
        .iter()
        .filter(|w| !workloads::ALL.iter().any(|(name, _)| name == w))
        .collect();
    if !unknown.is_empty() {
        let names: Vec<&str> = workloads::ALL.iter().map(|(name, _)| *name).collect();
        anyhow::bail!("unknown workloads {unknown:?}; choose from {names:?}");
    }
    let device = kiln::Device::new()?;
    let info = device.adapter_info();
    println!("adapter: {} ({:?})", info.name, info.backend);
    let mut report = support::Report::new(&device)?;
    for (name, run) in workloads::ALL {
        if wanted.is_empty() || wanted.iter().any(|w| w == name) {
            eprintln!("running {name} ...");
            // One workload failing (an error or a panic) costs only its own
            // rows: the others still run, and the JSON is rewritten after
            // each, so a run stopped at a time limit keeps what it measured.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&device)));
            match outcome {
                Ok(Ok(rows)) => report.rows.extend(rows),
                Ok(Err(e)) => report.fail(name, format!("{e:#}")),
                Err(panic) => report.fail(name, panic_message(&*panic)),
            }
            report.write()?;
        }
    }
    support::print_table(&report.rows);
    let changes = report.count_changes();
    if !changes.is_empty() {
        let commit = report.previous_commit().unwrap_or("unknown");
        println!("changed since the last run on this adapter (commit {commit}):");
        for change in changes {
            println!("  {change}");
        }
    }
    for (name, why) in &report.failed {
        println!("{name} failed: {why}");
    }
    println!("results: {}", report.path().display());
    if !report.failed.is_empty() {
        anyhow::bail!("{} workload(s) failed", report.failed.len());
    }
    Ok(())
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    format!("panicked: {text}")
}
