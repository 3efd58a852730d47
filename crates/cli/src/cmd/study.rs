//! `amalgam study`: a scaling study (methods × number of models merged), with cost and quality,
//! as `results.csv`, PNG plots and `report.md` (crate `amalgam-study`).
//!
//! Every merge and every evaluation runs as a child process of this same binary (`amalgam
//! merge`, `amalgam eval`), its output appended to the merge's log: each one's peak memory is
//! its own (`ru_maxrss` from `wait4`), and a crash is a recorded failure, not the study's end.

use amalgam_eval::report::Report;
use amalgam_study::config::StudyConfig;
use amalgam_study::runner::{self, EvalOutcome, Executor, RunOptions, TaskScore};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Arguments of `amalgam study`.
#[derive(Debug, Args)]
#[command(after_help = concat!(
    "Example:\n  amalgam study study.yaml --out study-out/\n\n",
    "A study (YAML) names the pool and the base model, the methods with hyperparameter grids\n",
    "(a list is a grid axis), the model counts, how subsets are drawn and the evaluation suite:\n\n",
    "  base_model: base/\n",
    "  pool: [{model: ft1/}, {model: ft2/, statistics: ft2.gram.safetensors}, {model: ft3/}]\n",
    "  methods:\n",
    "    - merge_method: linear\n",
    "    - merge_method: task_arithmetic\n",
    "      parameters: {lambda: [0.5, 1.0]}\n",
    "  counts: [2, 3]\n",
    "  subsets: {permutations: 10, seed: 0, max_per_count: 4}\n",
    "  evaluation: {suite: suite.yaml, batch_size: 8}\n",
    "  dtype: float32\n\n",
    "Subsets are the first m models of fixed seeded permutations of the pool (every prefix of\n",
    "length >= 2 unique where possible). Outputs in --out: results.csv (one row per merge, scores\n",
    "and costs), plots/*.png, report.md (best setting per method selected on held-in tasks,\n",
    "reported on held-out tasks), runs/<key>.{yaml,log,json}. Running again skips merges whose\n",
    "record exists; a failed merge is recorded, not fatal."
))]
pub struct StudyArgs {
    /// The study file (YAML).
    pub study: PathBuf,
    /// Output directory (created; an existing one is resumed).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Run again the merges whose record says they failed.
    #[arg(long)]
    pub retry_failed: bool,
    /// Keep every merged model under OUT/models/ (default: removed once evaluated).
    #[arg(long)]
    pub keep_models: bool,
    /// List the merges the study would run (and which are done); run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run each merge and each evaluation on this many local workers through the cluster code
    /// (`amalgam merge --workers N`, `amalgam eval --workers N`; same results). 0: directly.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Send each merge to this long-lived coordinator (`amalgam coordinator --serve`) with
    /// `amalgam submit` instead of merging here (same results; the study's paths must mean
    /// the same files there). The merge's peak memory is then the submitting process's.
    #[arg(long, value_name = "URL", conflicts_with = "workers")]
    pub coordinator: Option<String>,
    /// File holding the coordinator's bearer token (with `--coordinator`).
    #[arg(long, requires = "coordinator")]
    pub token_file: Option<PathBuf>,
}

/// Run `amalgam study`.
pub fn run(a: StudyArgs, quiet: bool) -> Result<()> {
    let study = StudyConfig::load(&a.study)?;
    if a.dry_run {
        let jobs = runner::plan(&study)?;
        let mut done = 0;
        for j in &jobs {
            let finished = runner::read_record(&a.out, &j.key).is_some();
            done += usize::from(finished);
            println!(
                "{} {:<18} {:<28} m={:<3} subset {:<3} models {:?}{}",
                j.key,
                j.setting.method,
                j.setting.label(),
                j.count,
                j.subset.permutation,
                j.subset.models,
                if finished { " (done)" } else { "" }
            );
        }
        println!("{} merges, {done} done", jobs.len());
        return Ok(());
    }
    // Every merge is evaluated on the suite: a task file that cannot be read would fail each
    // of them, so it is an error now, before any merge.
    let suite = amalgam_eval::suite::Suite::load(&study.evaluation.suite)
        .with_context(|| format!("the study's evaluation suite ({})", a.study.display()))?;
    amalgam_eval::suite::PreparedSuite::prepare(&suite)
        .with_context(|| format!("the study's evaluation suite ({})", a.study.display()))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut exec = ChildExecutor {
        exe: std::env::current_exe().context("locating the amalgam binary")?,
        workers: a.workers,
        coordinator: a.coordinator.clone(),
        token_file: a.token_file.clone(),
    };
    let opts = RunOptions {
        retry_failed: a.retry_failed,
        keep_models: a.keep_models,
        quiet,
    };
    let summary = runner::run(&study, &a.out, &mut exec, &opts)?;
    amalgam_study::write_outputs(&summary.records, &a.out)?;
    if !quiet {
        println!("skipped {} finished merges", summary.skipped);
        println!(
            "ran {} merges, {} failed in all; results in {}, report in {}",
            summary.ran,
            summary.failed,
            a.out.join("results.csv").display(),
            a.out.join("report.md").display()
        );
    }
    Ok(())
}

/// Runs merges and evaluations as child processes of this binary.
struct ChildExecutor {
    exe: PathBuf,
    /// `--workers` for each child (0: none).
    workers: usize,
    /// Merges go to this coordinator through `amalgam submit`.
    coordinator: Option<String>,
    /// Its token file.
    token_file: Option<PathBuf>,
}

/// The last `n` lines of a log (for error messages).
fn tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `args` on this binary with output appended to `log`; returns the child's peak
/// resident memory (bytes).
fn run_child(exe: &Path, args: &[&std::ffi::OsStr], log: &Path) -> Result<u64> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = file.try_clone().context("duplicating the log handle")?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let pid = child.id() as libc::pid_t;
    let tracked = crate::interrupt::TrackedChild::new(pid);
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; zeroed is a valid value for it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child, writing into the two locals above.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("waiting for a child process");
        }
    }
    // `child` was reaped by wait4 above; dropping it neither waits nor kills.
    drop(child);
    drop(tracked);
    // Interrupted with the whole run: not a failure to record (this process is exiting).
    if crate::interrupt::ended_by_interrupt(status) {
        crate::interrupt::wait_if_interrupted();
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let how = if libc::WIFEXITED(status) {
            format!("exit status {}", libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else {
            "abnormal end".to_string()
        };
        bail!("{how}; log {}:\n{}", log.display(), tail(log, 6));
    }
    // ru_maxrss is in KiB on Linux.
    Ok(usage.ru_maxrss.max(0) as u64 * 1024)
}

impl Executor for ChildExecutor {
    fn merge(&mut self, config: &Path, out: &Path, log: &Path) -> Result<u64> {
        let workers = self.workers.to_string();
        let command = if self.coordinator.is_some() {
            "submit"
        } else {
            "merge"
        };
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--quiet".as_ref(),
            command.as_ref(),
            config.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ];
        if let Some(url) = &self.coordinator {
            args.push("--coordinator".as_ref());
            args.push(url.as_ref());
        }
        if let Some(t) = &self.token_file {
            args.push("--token-file".as_ref());
            args.push(t.as_os_str());
        }
        if self.workers > 0 {
            args.push("--workers".as_ref());
            args.push(workers.as_ref());
        }
        run_child(&self.exe, &args, log)
    }

    fn evaluate(
        &mut self,
        model: &Path,
        suite: &Path,
        batch_size: Option<usize>,
        report: &Path,
        log: &Path,
    ) -> Result<(EvalOutcome, u64)> {
        let bs = batch_size.map(|b| b.to_string());
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--quiet".as_ref(),
            "eval".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--suite".as_ref(),
            suite.as_os_str(),
            "--out".as_ref(),
            report.as_os_str(),
        ];
        if let Some(b) = &bs {
            args.push("--batch-size".as_ref());
            args.push(b.as_ref());
        }
        let workers = self.workers.to_string();
        if self.workers > 0 {
            args.push("--workers".as_ref());
            args.push(workers.as_ref());
        }
        let peak = run_child(&self.exe, &args, log)?;
        let text = std::fs::read_to_string(report)
            .with_context(|| format!("reading {}", report.display()))?;
        let r: Report =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", report.display()))?;
        let outcome = EvalOutcome {
            held_in: r.held_in_mean,
            held_out: r.held_out_mean,
            tasks: r
                .tasks
                .iter()
                .map(|t| TaskScore {
                    name: t.name.clone(),
                    split: t.split.name().to_string(),
                    value: t.value,
                })
                .collect(),
        };
        Ok((outcome, peak))
    }
}
