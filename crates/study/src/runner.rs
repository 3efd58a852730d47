//! The sweep: one merge per (setting, model count, subset), evaluated, recorded, resumable.
//!
//! Every merge gets a mergekit YAML config generated from the study (absolute paths, the
//! setting's hyperparameters as top-level `parameters`, `weight: 1.0` when the method takes
//! per-model weights and the grid sets none, the pool's `statistics:` files for `fisher`,
//! `regmean` and `mats`, the study's `dtype`). Its key is the first 16 hex digits of
//! sha256(config text, NUL, suite identity), the suite identity being sha256 of the suite
//! path, its file contents and the batch size. Under the output directory:
//!
//! - `runs/<key>.yaml`: the merge config; `runs/<key>.log`: the merge's and evaluation's output;
//! - `runs/<key>.json`: the [`RunRecord`], written last: its presence marks the merge done;
//! - `models/<key>/`: the merged model while it is evaluated (removed afterwards unless kept).
//!
//! A study started again skips every merge whose record exists (failed ones too, unless
//! `retry_failed`). A failed merge or evaluation is recorded with its error, never fatal.

use crate::config::{Setting, StudyConfig};
use crate::cost::{self, Cost};
use crate::subsets::{self, Subset};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_yaml_ng::{Mapping, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Methods whose configs get the pool's `statistics:` files.
const DATA_DRIVEN: &[&str] = &["fisher", "regmean", "mats"];

/// One task's score in a merge's evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    /// Task name.
    pub name: String,
    /// `held_in` or `held_out`.
    pub split: String,
    /// The task's metric (`None` when it could not be computed).
    pub value: Option<f64>,
}

/// What an evaluation returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalOutcome {
    /// Mean over held-in tasks.
    pub held_in: Option<f64>,
    /// Mean over held-out tasks.
    pub held_out: Option<f64>,
    /// Every task's score, in suite order.
    pub tasks: Vec<TaskScore>,
}

/// Runs merges and evaluations (the CLI runs them as child processes of `amalgam`).
pub trait Executor {
    /// Merges the config file `config` into `out`; returns the peak resident memory (bytes,
    /// 0 if unknown). Output goes to `log`.
    fn merge(&mut self, config: &Path, out: &Path, log: &Path) -> Result<u64>;
    /// Evaluates the model in `model` on `suite`, writing the report JSON to `report`; returns
    /// the scores and the peak resident memory (bytes, 0 if unknown).
    fn evaluate(
        &mut self,
        model: &Path,
        suite: &Path,
        batch_size: Option<usize>,
        report: &Path,
        log: &Path,
    ) -> Result<(EvalOutcome, u64)>;
}

/// One merge of the sweep.
#[derive(Debug, Clone)]
pub struct Job {
    /// The resume key.
    pub key: String,
    /// Method and hyperparameters.
    pub setting: Setting,
    /// Number of models merged.
    pub count: usize,
    /// The subset of the pool.
    pub subset: Subset,
    /// The generated merge config (YAML).
    pub config_text: String,
}

/// The record of one merge (`runs/<key>.json`, one row of `results.csv`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The resume key.
    pub key: String,
    /// The merge method.
    pub method: String,
    /// Hyperparameters as `name=value` pairs joined by spaces.
    pub hyperparameters: String,
    /// Number of models merged.
    pub count: usize,
    /// The permutation the subset is the prefix of.
    pub subset: usize,
    /// Names of the merged pool models.
    pub models: Vec<String>,
    /// `ok` or `failed`.
    pub status: String,
    /// The error of a failed merge or evaluation.
    pub error: Option<String>,
    /// Mean held-in score.
    pub held_in: Option<f64>,
    /// Mean held-out score.
    pub held_out: Option<f64>,
    /// Per-task scores.
    pub tasks: Vec<TaskScore>,
    /// Cost figures.
    pub cost: Cost,
}

impl RunRecord {
    /// Whether the merge and its evaluation succeeded.
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

/// Options of a study run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run merges again whose record says they failed.
    pub retry_failed: bool,
    /// Keep merged models under `models/` (default: removed after evaluation).
    pub keep_models: bool,
    /// Print nothing but errors.
    pub quiet: bool,
}

/// What a study run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Merges run now.
    pub ran: usize,
    /// Merges skipped because their record existed.
    pub skipped: usize,
    /// Merges (run now or before) that failed.
    pub failed: usize,
    /// Every record of the study, in sweep order.
    pub records: Vec<RunRecord>,
}

/// sha256 of the suite path, its contents and the batch size (hex).
pub fn suite_identity(study: &StudyConfig) -> Result<String> {
    let suite = &study.evaluation.suite;
    let bytes =
        std::fs::read(suite).with_context(|| format!("cannot read suite {}", suite.display()))?;
    let mut h = Sha256::new();
    h.update(suite.display().to_string().as_bytes());
    h.update([0]);
    h.update(&bytes);
    h.update([0]);
    h.update(format!("{:?}", study.evaluation.batch_size).as_bytes());
    Ok(hex::encode(h.finalize()))
}

/// The resume key of a merge config under a suite identity.
pub fn run_key(config_text: &str, suite_identity: &str) -> String {
    let mut h = Sha256::new();
    h.update(config_text.as_bytes());
    h.update([0]);
    h.update(suite_identity.as_bytes());
    hex::encode(h.finalize())[..16].to_string()
}

fn path_value(p: &Path) -> Value {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    Value::String(abs.display().to_string())
}

/// The merge config (YAML) of `setting` over the pool models `models`.
pub fn merge_config(study: &StudyConfig, setting: &Setting, models: &[usize]) -> Result<String> {
    let info = amalgam_core::methods::info(&setting.method)?;
    let mut root = Mapping::new();
    root.insert("merge_method".into(), setting.method.clone().into());
    if info.needs_base {
        if let Some(b) = &study.base_model {
            root.insert("base_model".into(), path_value(b));
        }
    }
    let data_driven = DATA_DRIVEN.contains(&setting.method.as_str());
    let mut list = Vec::new();
    for &i in models {
        let m = &study.pool[i];
        let mut e = Mapping::new();
        e.insert("model".into(), path_value(&m.model));
        if let (true, Some(s)) = (data_driven, &m.statistics) {
            e.insert("statistics".into(), path_value(s));
        }
        list.push(Value::Mapping(e));
    }
    root.insert("models".into(), Value::Sequence(list));
    let mut params = Mapping::new();
    for (k, v) in &setting.params {
        params.insert(k.clone().into(), v.clone());
    }
    if info.model_params.contains(&"weight") && !params.contains_key("weight") {
        params.insert("weight".into(), Value::from(1.0));
    }
    if !params.is_empty() {
        root.insert("parameters".into(), Value::Mapping(params));
    }
    if let Some(d) = &study.dtype {
        root.insert("dtype".into(), d.clone().into());
    }
    serde_yaml_ng::to_string(&Value::Mapping(root)).context("writing a merge config")
}

/// Every merge of the study, in sweep order (settings, then counts, then subsets). Counts a
/// method cannot merge (fewer than its minimum, or not its exact number) are left out.
pub fn plan(study: &StudyConfig) -> Result<Vec<Job>> {
    let suite = suite_identity(study)?;
    let perms = subsets::permutations(study.pool.len(), study.permutations(), study.subsets.seed);
    let mut jobs = Vec::new();
    for setting in study.settings() {
        let info = amalgam_core::methods::info(&setting.method)?;
        for &count in &study.counts {
            let with_base = usize::from(info.needs_base);
            if count < info.min_models || info.exact_models.is_some_and(|e| e != count + with_base)
            {
                continue;
            }
            for subset in subsets::subsets(&perms, count, study.subsets.max_per_count) {
                let config_text = merge_config(study, &setting, &subset.models)?;
                let key = run_key(&config_text, &suite);
                // The same merge twice (e.g. a grid listing a value twice) runs once.
                if jobs.iter().any(|j: &Job| j.key == key) {
                    continue;
                }
                jobs.push(Job {
                    key,
                    setting: setting.clone(),
                    count,
                    subset,
                    config_text,
                });
            }
        }
    }
    Ok(jobs)
}

fn record_path(out: &Path, key: &str) -> PathBuf {
    out.join("runs").join(format!("{key}.json"))
}

/// Reads the record of `key`, if there is a readable one.
pub fn read_record(out: &Path, key: &str) -> Option<RunRecord> {
    let text = std::fs::read_to_string(record_path(out, key)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Tensor shapes of the first pool model (for FLOPs), or none if it cannot be read.
fn shapes(study: &StudyConfig) -> Vec<Vec<usize>> {
    match amalgam_io::Checkpoint::open(&study.pool[0].model) {
        Ok(c) => c.tensors().iter().map(|t| t.shape.clone()).collect(),
        Err(e) => {
            eprintln!("warning: FLOPs not estimated: {e}");
            Vec::new()
        }
    }
}

/// Runs every merge of the study that has no record yet; returns all records.
pub fn run(
    study: &StudyConfig,
    out: &Path,
    exec: &mut dyn Executor,
    opts: &RunOptions,
) -> Result<Summary> {
    let jobs = plan(study)?;
    std::fs::create_dir_all(out.join("runs"))
        .with_context(|| format!("creating {}", out.join("runs").display()))?;
    let shapes = shapes(study);
    let mut summary = Summary::default();
    for (i, job) in jobs.iter().enumerate() {
        if let Some(r) = read_record(out, &job.key) {
            if r.ok() || !opts.retry_failed {
                summary.skipped += 1;
                summary.failed += usize::from(!r.ok());
                summary.records.push(r);
                continue;
            }
        }
        if !opts.quiet {
            eprintln!(
                "[{}/{}] {} {} m={} subset {} ({})",
                i + 1,
                jobs.len(),
                job.setting.method,
                job.setting.label(),
                job.count,
                job.subset.permutation,
                job.key
            );
        }
        let record = run_one(study, out, exec, job, &shapes, opts)?;
        if !record.ok() {
            summary.failed += 1;
            if !opts.quiet {
                eprintln!(
                    "  failed: {}",
                    record.error.as_deref().unwrap_or("unknown error")
                );
            }
        }
        let json = serde_json::to_string_pretty(&record).context("serializing a record")?;
        amalgam_io::write_text_atomic(&record_path(out, &job.key), &json)
            .with_context(|| format!("writing the record of {}", job.key))?;
        summary.ran += 1;
        summary.records.push(record);
    }
    Ok(summary)
}

/// Runs one merge and its evaluation; errors of either are recorded, not returned (only
/// failures to write the study's own files are).
fn run_one(
    study: &StudyConfig,
    out: &Path,
    exec: &mut dyn Executor,
    job: &Job,
    shapes: &[Vec<usize>],
    opts: &RunOptions,
) -> Result<RunRecord> {
    let runs = out.join("runs");
    let config = runs.join(format!("{}.yaml", job.key));
    let log = runs.join(format!("{}.log", job.key));
    let report = runs.join(format!("{}.eval.json", job.key));
    amalgam_io::write_text_atomic(&config, &job.config_text)
        .with_context(|| format!("writing {}", config.display()))?;
    let model_dir = out.join("models").join(&job.key);
    if model_dir.exists() {
        std::fs::remove_dir_all(&model_dir)
            .with_context(|| format!("removing the partial merge {}", model_dir.display()))?;
    }
    let info = amalgam_core::methods::info(&job.setting.method)?;
    let mut cost = Cost {
        flops: cost::flops(&job.setting.method, &job.setting.params, shapes, job.count),
        ..Cost::default()
    };
    // Inputs: the subset's weights, the base's when used, the statistics files when used.
    let mut read = 0;
    let mut stats_bytes = Vec::new();
    for &m in &job.subset.models {
        let pm = &study.pool[m];
        read += cost::weight_bytes(&pm.model);
        if let (true, Some(s)) = (
            DATA_DRIVEN.contains(&job.setting.method.as_str()),
            &pm.statistics,
        ) {
            let size = cost::tree_bytes(s);
            read += size;
            stats_bytes.push(size);
            if let Ok(f) = amalgam_io::StatsFile::open(s) {
                let (fwd, bwd) = cost::stats_passes(f.kind(), f.examples());
                cost.stats_forward_passes += fwd;
                cost.stats_backward_passes += bwd;
            }
        }
    }
    if info.needs_base {
        if let Some(b) = &study.base_model {
            read += cost::weight_bytes(b);
        }
    }
    cost.bytes_read = read;
    if !stats_bytes.is_empty() {
        cost.stats_bytes_per_model = stats_bytes.iter().sum::<u64>() / stats_bytes.len() as u64;
    }
    let mut record = RunRecord {
        key: job.key.clone(),
        method: job.setting.method.clone(),
        hyperparameters: job.setting.label(),
        count: job.count,
        subset: job.subset.permutation,
        models: job
            .subset
            .models
            .iter()
            .map(|&m| study.pool[m].display_name())
            .collect(),
        status: "failed".to_string(),
        error: None,
        held_in: None,
        held_out: None,
        tasks: Vec::new(),
        cost,
    };
    let t = Instant::now();
    let merged = exec.merge(&config, &model_dir, &log);
    record.cost.merge_secs = t.elapsed().as_secs_f64();
    match merged {
        Ok(peak) => record.cost.merge_peak_bytes = peak,
        Err(e) => {
            record.error = Some(format!("merge: {e:#}"));
            return Ok(record);
        }
    }
    record.cost.bytes_written = cost::weight_bytes(&model_dir);
    let t = Instant::now();
    let evaluated = exec.evaluate(
        &model_dir,
        &study.evaluation.suite,
        study.evaluation.batch_size,
        &report,
        &log,
    );
    record.cost.eval_secs = t.elapsed().as_secs_f64();
    match evaluated {
        Ok((scores, peak)) => {
            record.cost.eval_peak_bytes = peak;
            record.held_in = scores.held_in;
            record.held_out = scores.held_out;
            record.tasks = scores.tasks;
            record.status = "ok".to_string();
        }
        Err(e) => record.error = Some(format!("evaluation: {e:#}")),
    }
    if !opts.keep_models {
        std::fs::remove_dir_all(&model_dir)
            .with_context(|| format!("removing {}", model_dir.display()))?;
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Fake {
        merges: usize,
        fail_on: Option<String>,
    }

    impl Executor for Fake {
        fn merge(&mut self, config: &Path, out: &Path, _log: &Path) -> Result<u64> {
            self.merges += 1;
            let text = std::fs::read_to_string(config)?;
            if self
                .fail_on
                .as_ref()
                .is_some_and(|f| text.contains(f.as_str()))
            {
                anyhow::bail!("boom");
            }
            std::fs::create_dir_all(out)?;
            std::fs::write(out.join("model.safetensors"), [0u8; 8])?;
            Ok(1000)
        }
        fn evaluate(
            &mut self,
            _model: &Path,
            _suite: &Path,
            _batch: Option<usize>,
            _report: &Path,
            _log: &Path,
        ) -> Result<(EvalOutcome, u64)> {
            Ok((
                EvalOutcome {
                    held_in: Some(0.5),
                    held_out: Some(0.25),
                    tasks: vec![],
                },
                2000,
            ))
        }
    }

    fn study(dir: &Path) -> StudyConfig {
        for m in ["base", "a", "b", "c"] {
            std::fs::create_dir_all(dir.join(m)).unwrap();
            std::fs::write(dir.join(m).join("model.safetensors"), [0u8; 5]).unwrap();
        }
        std::fs::write(dir.join("suite.yaml"), "tasks: []\n").unwrap();
        let text = "base_model: base\npool: [{model: a}, {model: b}, {model: c}]\nmethods:\n  - merge_method: task_arithmetic\n    parameters: {lambda: [0.5, 1.0]}\n  - merge_method: linear\ncounts: [2, 3]\nevaluation: {suite: suite.yaml}\n";
        StudyConfig::parse(text, dir).unwrap()
    }

    #[test]
    fn configs_are_mergekit_yaml_with_the_grid_point() {
        let t = tempfile::tempdir().unwrap();
        let s = study(t.path());
        let settings = s.settings();
        let text = merge_config(&s, &settings[0], &[0, 2]).unwrap();
        let v: BTreeMap<String, Value> = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(v["merge_method"], Value::from("task_arithmetic"));
        let base = t.path().join("base").display().to_string();
        assert_eq!(v["base_model"], Value::from(base.as_str()));
        let models = v["models"].as_sequence().unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(
            models[1]["model"],
            Value::from(t.path().join("c").display().to_string().as_str())
        );
        assert_eq!(v["parameters"]["lambda"], Value::from(0.5));
        assert_eq!(v["parameters"]["weight"], Value::from(1.0));
        // linear uses no base.
        let text = merge_config(&s, &settings[2], &[0, 1]).unwrap();
        assert!(!text.contains("base_model"), "{text}");
        // The config parses as a merge config.
        amalgam_core::config::parse_config(&text, true).unwrap();
    }

    #[test]
    fn keys_depend_on_config_and_suite() {
        let a = run_key("merge_method: linear\n", "s1");
        assert_eq!(a.len(), 16);
        assert_eq!(a, run_key("merge_method: linear\n", "s1"));
        assert_ne!(a, run_key("merge_method: linear\n", "s2"));
        assert_ne!(a, run_key("merge_method: ties\n", "s1"));
        // An independent computation: sha256("merge_method: linear\n" NUL "s1")[..16].
        let mut h = Sha256::new();
        h.update(b"merge_method: linear\n\0s1");
        assert_eq!(a, hex::encode(h.finalize())[..16]);
    }

    #[test]
    fn a_rerun_skips_finished_merges_and_records_failures() {
        let t = tempfile::tempdir().unwrap();
        let s = study(t.path());
        let out = t.path().join("out");
        // 3 settings × (3 subsets of 2 + 1 subset of 3) = 12 merges; those with lambda 1.0 fail.
        let mut fake = Fake {
            merges: 0,
            fail_on: Some("lambda: 1.0".into()),
        };
        let first = run(&s, &out, &mut fake, &RunOptions::default()).unwrap();
        assert_eq!((first.ran, first.skipped, first.failed), (12, 0, 4));
        assert_eq!(fake.merges, 12);
        let ok = first.records.iter().find(|r| r.ok()).unwrap();
        assert_eq!(ok.cost.merge_peak_bytes, 1000);
        assert_eq!(ok.cost.eval_peak_bytes, 2000);
        assert_eq!(ok.cost.bytes_written, 8);
        assert_eq!(
            ok.cost.bytes_read,
            5 * ok.count as u64 + if ok.method == "linear" { 0 } else { 5 }
        );
        assert!(
            !out.join("models").join(&ok.key).exists(),
            "merged model removed"
        );
        let bad = first.records.iter().find(|r| !r.ok()).unwrap();
        assert!(bad.error.as_deref().unwrap().contains("boom"));
        let mut again = Fake {
            merges: 0,
            fail_on: None,
        };
        let second = run(&s, &out, &mut again, &RunOptions::default()).unwrap();
        assert_eq!((second.ran, second.skipped, again.merges), (0, 12, 0));
        assert_eq!(second.records, first.records);
        let opts = RunOptions {
            retry_failed: true,
            ..RunOptions::default()
        };
        let third = run(&s, &out, &mut again, &opts).unwrap();
        assert_eq!((third.ran, third.skipped, third.failed), (4, 8, 0));
    }
}
