//! Shared by the workloads: reference measurements by Python (numpy, PyTorch)
//! in the same run as ours, so ratios compare like with like on this machine
//! at this moment; the one results table and its JSON; the per-kernel profile.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// One line of the results table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub workload: String,
    /// What the figures count; higher is better unless it is a time.
    pub unit: &'static str,
    pub kiln: f64,
    /// The same measurement by `reference_name`, in the same run.
    pub reference: Option<f64>,
    pub reference_name: &'static str,
    /// Why there is no reference figure, when there is none.
    pub missing_reference: Option<String>,
    pub dispatches_per_step: Option<f64>,
    pub submits_per_step: Option<f64>,
    /// Microseconds of CPU time the calling thread spent per step: building
    /// the step, recording and submitting its kernels (see [`StepCounts`]).
    pub host_us_per_step: Option<f64>,
}

impl Row {
    pub fn new(workload: impl Into<String>, unit: &'static str, kiln: f64) -> Self {
        Self {
            workload: workload.into(),
            unit,
            kiln,
            reference: None,
            reference_name: "",
            missing_reference: None,
            dispatches_per_step: None,
            submits_per_step: None,
            host_us_per_step: None,
        }
    }

    /// Attaches the reference figure (or why it is missing).
    pub fn against(mut self, name: &'static str, value: Result<f64, &String>) -> Self {
        self.reference_name = name;
        match value {
            Ok(v) => self.reference = Some(v),
            Err(why) => self.missing_reference = Some(why.clone()),
        }
        self
    }

    pub fn per_step(mut self, counts: StepCounts) -> Self {
        self.dispatches_per_step = Some(counts.dispatches);
        self.submits_per_step = Some(counts.submits);
        self.host_us_per_step = counts.host_seconds.map(|s| s * 1e6);
        self
    }

    /// Kiln's figure over the reference's, oriented so that above 1 means
    /// Kiln is faster.
    pub fn ratio(&self) -> Option<f64> {
        let r = self.reference?;
        Some(
            if self.unit.starts_with("us") || self.unit.starts_with("ms") {
                r / self.kiln
            } else {
                self.kiln / r
            },
        )
    }
}

/// Dispatches, submits and host time per training step.
#[derive(Clone, Copy, Debug)]
pub struct StepCounts {
    pub dispatches: f64,
    pub submits: f64,
    /// CPU seconds the stepping thread ran per step, waits excluded: the
    /// host's share (autodiff, recording, encoding, submitting). It bounds
    /// the step rate on a GPU fast enough to make the kernels' time
    /// vanish. On CPU adapters the kernels run on the driver's own threads,
    /// so this is the host's share there too.
    pub host_seconds: Option<f64>,
}

/// CPU time the calling thread has run, in seconds (the thread's CPU clock,
/// exact to the call; Linux's schedstat lags by up to a scheduler tick).
#[cfg(unix)]
fn thread_cpu_seconds() -> Option<f64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    (status == 0).then(|| now.tv_sec as f64 + now.tv_nsec as f64 / 1e9)
}

#[cfg(not(unix))]
fn thread_cpu_seconds() -> Option<f64> {
    None
}

/// Runs `steps` calls of `step` (after the device is idle) and returns the
/// seconds they took and what each cost in dispatches, submits and host
/// time.
pub fn measure_steps(
    device: &kiln::Device,
    steps: usize,
    mut step: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<(f64, StepCounts)> {
    device.synchronize()?;
    let before = device.dispatch_stats();
    let host_before = thread_cpu_seconds();
    let start = Instant::now();
    for i in 0..steps {
        step(i)?;
    }
    device.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    let host_after = thread_cpu_seconds();
    let after = device.dispatch_stats();
    let counts = StepCounts {
        dispatches: (after.dispatches - before.dispatches) as f64 / steps as f64,
        submits: (after.submits - before.submits) as f64 / steps as f64,
        host_seconds: host_before
            .zip(host_after)
            .map(|(b, a)| (a - b) / steps as f64),
    };
    Ok((seconds, counts))
}

/// Whether the PyTorch references run on CUDA (`KILN_BENCH_REFERENCE=cuda`,
/// on a GPU machine) rather than the CPU.
pub fn cuda_reference() -> bool {
    std::env::var("KILN_BENCH_REFERENCE").is_ok_and(|v| v == "cuda")
}

/// The PyTorch references' name in the table.
pub fn torch_name() -> &'static str {
    if cuda_reference() {
        "pytorch cuda"
    } else {
        "pytorch cpu"
    }
}

/// Prepended to every PyTorch reference: `DEV`, where it runs (CUDA with
/// `KILN_BENCH_REFERENCE=cuda`, TF32 off so that f32 products are f32
/// products), and `sync()`, which waits for that device before a timer is
/// read (a no-op on the CPU).
const TORCH_PRELUDE: &str = r#"
import os, torch
DEV = torch.device(os.environ.get("KILN_BENCH_REFERENCE", "cpu"))
if DEV.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()
"#;

/// Prints the one results table.
pub fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<48} {:<10} {:>10} {:>10} {:<14} {:>6} {:>9} {:>7} {:>10}",
        "workload",
        "unit",
        "kiln",
        "reference",
        "(by)",
        "ratio",
        "disp/step",
        "subm/st",
        "host us/st"
    );
    let opt = |v: Option<f64>, digits: usize| match v {
        Some(v) => format!("{v:.digits$}"),
        None => "-".into(),
    };
    for r in rows {
        println!(
            "{:<48} {:<10} {:>10} {:>10} {:<14} {:>6} {:>9} {:>7} {:>10}",
            r.workload,
            r.unit,
            format_figure(r.kiln),
            r.reference.map_or("-".into(), format_figure),
            r.reference_name,
            opt(r.ratio(), 2),
            opt(r.dispatches_per_step, 0),
            opt(r.submits_per_step, 2),
            opt(r.host_us_per_step, 0),
        );
    }
    let missing: Vec<&String> = rows
        .iter()
        .filter_map(|r| r.missing_reference.as_ref())
        .collect();
    if let Some(why) = missing.first() {
        println!("(some references missing: {why})");
    }
    println!("ratio > 1: Kiln faster. References ran on the same machine in the same run.");
}

fn format_figure(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The run's results as JSON under `target/kiln-bench/` or `KILN_BENCH_OUT`
/// (one file per run, named by its start time and commit, and
/// `latest.json`), so runs can be compared across commits: the rows, the
/// workloads that failed, the adapter and the commit.
pub struct Report {
    pub rows: Vec<Row>,
    /// Workloads that failed, with why.
    pub failed: Vec<(String, String)>,
    head: serde_json::Value,
    dir: PathBuf,
    path: PathBuf,
    /// The last run on this adapter (its `latest.json`), if any.
    previous: Option<serde_json::Value>,
}

impl Report {
    pub fn new(device: &kiln::Device) -> anyhow::Result<Self> {
        // KILN_BENCH_COMMIT names the commit where there is no git checkout.
        let commit = std::env::var("KILN_BENCH_COMMIT").ok().unwrap_or_else(|| {
            Command::new("git")
                .args(["describe", "--always", "--dirty", "--abbrev=7"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "unknown".into())
        });
        let when = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let info = device.adapter_info();
        let head = serde_json::json!({
            "commit": commit,
            "unix_time": when,
            "adapter": info.name,
            "backend": format!("{:?}", info.backend),
            "reference_device": if cuda_reference() { "cuda" } else { "cpu" },
        });
        // KILN_BENCH_OUT redirects them (a prebuilt binary run elsewhere).
        let dir = match std::env::var_os("KILN_BENCH_OUT") {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/kiln-bench"),
        };
        let path = dir.join(format!("{when}-{commit}.json"));
        let previous = std::fs::read_to_string(dir.join("latest.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .filter(|p| p["adapter"] == head["adapter"] && p["backend"] == head["backend"]);
        Ok(Self {
            rows: Vec::new(),
            failed: Vec::new(),
            head,
            dir,
            path,
            previous,
        })
    }

    /// Workloads whose dispatches or submits per step differ from the last
    /// run's on this adapter. Unlike the timings these counts do not drift,
    /// so any change is the code's (or a setting's, such as `KILN_FUSION`):
    /// one that splits a step into more dispatches costs little on a CPU
    /// adapter and a great deal on a GPU.
    pub fn count_changes(&self) -> Vec<String> {
        let Some(previous) = &self.previous else {
            return Vec::new();
        };
        let empty = Vec::new();
        let before = previous["rows"].as_array().unwrap_or(&empty);
        let mut changes = Vec::new();
        for row in &self.rows {
            let Some(old) = before
                .iter()
                .find(|r| r["workload"] == row.workload.as_str())
            else {
                continue;
            };
            for (what, now, key) in [
                ("dispatches", row.dispatches_per_step, "dispatches_per_step"),
                ("submits", row.submits_per_step, "submits_per_step"),
            ] {
                if let (Some(now), Some(then)) = (now, old[key].as_f64()) {
                    if (now - then).abs() > 1e-9 {
                        changes.push(format!(
                            "{}: {then:.2} -> {now:.2} {what} per step",
                            row.workload
                        ));
                    }
                }
            }
        }
        changes
    }

    /// The last run's commit, as its JSON names it.
    pub fn previous_commit(&self) -> Option<&str> {
        self.previous.as_ref()?["commit"].as_str()
    }

    pub fn fail(&mut self, workload: &str, why: String) {
        eprintln!("{workload} failed: {why}");
        self.failed.push((workload.to_string(), why));
    }

    /// The per-run file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Writes everything so far, replacing what the last call wrote.
    pub fn write(&self) -> anyhow::Result<()> {
        let mut report = self.head.clone();
        report["rows"] = serde_json::to_value(&self.rows)?;
        report["failed"] = self
            .failed
            .iter()
            .map(|(workload, why)| serde_json::json!({ "workload": workload, "error": why }))
            .collect();
        std::fs::create_dir_all(&self.dir)?;
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&self.path, &text)?;
        std::fs::write(self.dir.join("latest.json"), &text)?;
        Ok(())
    }
}

/// Interpreters tried in order: `KILN_PYTHON` alone when set, else `python3`
/// on the PATH and then the system one (where Debian's `python3-torch` lives
/// when the PATH's Python is a separate install).
fn interpreters() -> Vec<String> {
    match std::env::var("KILN_PYTHON") {
        Ok(python) => vec![python],
        Err(_) => vec!["python3".into(), "/usr/bin/python3".into()],
    }
}

/// The first interpreter that can import `module`; the error says how to
/// install the module when none can.
fn interpreter_with(module: &str) -> Result<String, String> {
    let mut last_error = String::from("no Python interpreter found");
    for python in interpreters() {
        match Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .output()
        {
            Ok(out) if out.status.success() => return Ok(python),
            Ok(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                last_error = format!("{python}: {}", err.lines().last().unwrap_or(""));
            }
            Err(e) => last_error = format!("{python} not runnable: {e}"),
        }
    }
    let hint = match module {
        "torch" => "`apt-get install python3-torch` or `pip install torch` to compare",
        _ => "`pip install numpy` to compare",
    };
    Err(format!("{module} not available ({last_error}); {hint}"))
}

/// The longest one reference measurement may take (its start, a CUDA
/// context and cuBLAS's first call included).
const REFERENCE_TIMEOUT: Duration = Duration::from_secs(180);

/// A reference implementation kept running in a Python process beside Kiln,
/// measuring on request. Workloads alternate windows (Kiln, reference, Kiln,
/// ...) so both sides see the same machine: on a shared VM the speed of
/// either drifts by 2x over a minute, which sequential runs turn into noise
/// in the ratio.
pub struct Reference {
    child: Child,
    requests: ChildStdin,
    /// Its stdout's lines, read by a thread of their own so that a reference
    /// that hangs (a wedged GPU) times out instead of stopping the suite.
    replies: Receiver<String>,
    /// Where the process's stderr goes: a file, not a pipe, so warnings
    /// cannot fill a pipe nobody reads while it runs and stall it.
    log: PathBuf,
}

impl Reference {
    /// Starts `script` under the first interpreter that can import `module`.
    /// The script sets its model up and defines `measure(request: str) ->
    /// float`; each [`Reference::measure`] call runs it once.
    pub fn start(module: &str, script: &str) -> Result<Self, String> {
        let python = interpreter_with(module)?;
        let prelude = if module == "torch" { TORCH_PRELUDE } else { "" };
        let program = format!(
            "{prelude}\n{script}\nimport sys\nfor _request in sys.stdin:\n    print(measure(_request.strip()), flush=True)\n"
        );
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log =
            std::env::temp_dir().join(format!("kiln-reference-{}-{n}.log", std::process::id()));
        let stderr = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new(&python)
            .arg("-c")
            .arg(program)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{python} not runnable: {e}"))?;
        let requests = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let (send, replies) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            requests,
            replies,
            log,
        })
    }

    /// Runs `measure(request)` in the reference process and returns its figure.
    pub fn measure(&mut self, request: &str) -> Result<f64, String> {
        if let Err(e) = writeln!(self.requests, "{request}").and_then(|_| self.requests.flush()) {
            return Err(format!("{}; {e}", self.failure()));
        }
        match self.replies.recv_timeout(REFERENCE_TIMEOUT) {
            Ok(line) => line
                .trim()
                .parse()
                .map_err(|e| format!("unreadable reply {line:?}: {e}")),
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                Err(format!(
                    "reference gave no figure for {request:?} in {REFERENCE_TIMEOUT:?}; stopped it"
                ))
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.failure()),
        }
    }

    /// The last line the reference process wrote to stderr, once it has died.
    fn failure(&mut self) -> String {
        let _ = self.child.wait();
        let err = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!(
            "reference process failed: {}",
            err.lines().last().unwrap_or("no message")
        )
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A pause after each timed window, so that the next one (the other side's)
/// starts on an idle machine: after a window PyTorch's and OpenBLAS's worker
/// threads keep spinning on a core for about 100 ms (measured from the
/// reference process's CPU time while it sleeps), a core for a third of
/// Kiln's short MLP windows that followed them.
const SETTLE: Duration = Duration::from_millis(300);

/// The best of `windows` alternating measurements: Kiln's (`kiln` returns a
/// figure where higher is better, with whatever it wants to keep alongside)
/// and, when there is one, the reference's for `request`.
pub fn alternate<T>(
    windows: usize,
    mut kiln: impl FnMut() -> anyhow::Result<(f64, T)>,
    reference: &mut Result<Reference, String>,
    request: &str,
) -> anyhow::Result<((f64, T), Result<f64, String>)> {
    let mut best_kiln: Option<(f64, T)> = None;
    let mut best_reference: Option<f64> = None;
    for _ in 0..windows {
        let (value, extra) = kiln()?;
        std::thread::sleep(SETTLE);
        if best_kiln.as_ref().is_none_or(|(b, _)| value > *b) {
            best_kiln = Some((value, extra));
        }
        if let Ok(r) = reference.as_mut() {
            let measured = r.measure(request);
            std::thread::sleep(SETTLE);
            match measured {
                Ok(v) => best_reference = Some(best_reference.map_or(v, |b| b.max(v))),
                // A reference that failed once reports its failure, not earlier figures.
                Err(why) => {
                    *reference = Err(why);
                    best_reference = None;
                }
            }
        }
    }
    let best_reference = match (best_reference, reference) {
        (Some(v), _) => Ok(v),
        (None, Err(why)) => Err(why.clone()),
        (None, Ok(_)) => Err("no window measured".into()),
    };
    Ok((best_kiln.expect("at least one window"), best_reference))
}

/// Prints where one step's time went, by kernel (from `Device::profile`).
pub fn print_profile(times: &[kiln::device::KernelTime], rows: usize) {
    let total: f64 = times.iter().map(|t| t.seconds).sum();
    let clock = if times.iter().all(|t| t.device_clock) {
        "the device's clock"
    } else {
        "the host's clock, submit and wait included"
    };
    println!();
    println!(
        "one training step by kernel ({:.1} ms in all, each dispatch alone, by {clock}):",
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
