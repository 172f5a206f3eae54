//! Shared by the benches: reference measurements by Python (numpy, PyTorch) in
//! the same run as ours, so ratios compare like with like on this machine at
//! this moment, and the per-kernel profile table.
#![allow(dead_code)] // each bench uses a different subset

use std::process::Command;

/// Interpreters tried in order: `KILN_PYTHON` alone when set, else `python3`
/// on the PATH and then the system one (where Debian's `python3-torch` lives
/// when the PATH's Python is a separate install).
fn interpreters() -> Vec<String> {
    match std::env::var("KILN_PYTHON") {
        Ok(python) => vec![python],
        Err(_) => vec!["python3".into(), "/usr/bin/python3".into()],
    }
}

/// Runs `script` with `args` under the first interpreter that can import
/// `module`, and returns its stdout lines. The error says how to install the
/// module when none can.
pub fn run_python(module: &str, script: &str, args: &[String]) -> Result<Vec<String>, String> {
    let mut last_error = String::from("no Python interpreter found");
    for python in interpreters() {
        let probe = Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .output();
        match probe {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                last_error = format!("{python}: {}", err.lines().last().unwrap_or(""));
                continue;
            }
            Err(e) => {
                last_error = format!("{python} not runnable: {e}");
                continue;
            }
        }
        let out = Command::new(&python)
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .map_err(|e| format!("{python} not runnable: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "{python} failed: {}",
                err.lines().last().unwrap_or("")
            ));
        }
        return Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect());
    }
    let hint = match module {
        "torch" => "`apt-get install python3-torch` or `pip install torch` to compare",
        _ => "`pip install numpy` to compare",
    };
    Err(format!("{module} not available ({last_error}); {hint}"))
}

/// Parses one number per line.
pub fn numbers(lines: Vec<String>) -> Result<Vec<f64>, String> {
    lines
        .iter()
        .map(|l| {
            l.parse::<f64>()
                .map_err(|e| format!("unreadable output {l:?}: {e}"))
        })
        .collect()
}

/// Prints where one step's time went, by kernel (from `Device::profile`).
pub fn print_profile(times: &[kiln::device::KernelTime], rows: usize) {
    let total: f64 = times.iter().map(|t| t.seconds).sum();
    println!();
    println!(
        "one training step by kernel ({:.1} ms in all, each dispatch alone):",
        total * 1e3
    );
    println!("{:>8} {:>6} {:>5}  kernel [workgroups]", "ms", "%", "calls");
    for t in times.iter().take(rows) {
        let mut name = t.kernel.clone();
        name.truncate(90);
        println!(
            "{:>8.2} {:>6.1} {:>5}  {name} {:?}",
            t.seconds * 1e3,
            100.0 * t.seconds / total,
            t.calls,
            t.workgroups
        );
    }
}
