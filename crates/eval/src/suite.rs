//! Suites: a YAML list of tasks, each marked held-in or held-out, rendered into one flat list of
//! requests and graded into a [`Report`] (methods.md §17).
//!
//! ```yaml
//! batch_size: 8               # optional (default 8)
//! tasks:
//!   - name: navigate          # optional: the task directory (task.json) or the file stem
//!     path: ../data/navigate/task.json   # relative to the suite file
//!     format: bigbench        # bigbench | fib | jsonl; inferred when omitted
//!     split: held_in          # held_in | held_out (required)
//!     limit: 50               # first N examples (optional)
//!     length_normalization: none   # none | per_token | power (default: none; fib: per_token)
//!     length_alpha: 0.7       # the exponent, with `power` only
//!     # fib only:
//!     templates: ["[input]", "Summarize: [input]"]
//!     pmi: true               # default true
//! ```
//!
//! Flow: [`Suite::load`] reads only the YAML; [`PreparedSuite::prepare`] reads every task file and
//! renders all requests in suite order (task by task, each in its own fixed order), so the
//! request list, and the batches `plan_batches` cuts from it, are the same in every process;
//! [`PreparedSuite::grade`] turns the scores into the [`Report`].

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use serde_yaml_ng::Value;

use crate::error::{EvalError, Result};
use crate::report::{GroupValue, Report, Split, TaskReport};
use crate::score::{ScoreRequest, Scored};
use crate::tasks::{load_task, LengthNorm, RenderedTask, TaskFormat, TaskOptions};

/// The batch size when the suite does not set one.
pub const DEFAULT_BATCH_SIZE: usize = 8;

const SUITE_KEYS: &[&str] = &["batch_size", "tasks"];
const TASK_KEYS: &[&str] = &[
    "name",
    "path",
    "format",
    "split",
    "limit",
    "length_normalization",
    "length_alpha",
    "templates",
    "pmi",
];

/// One task of a suite, as written (the format may still have to be inferred).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSpec {
    /// The task's name in reports.
    pub name: String,
    /// The task file, resolved against the suite's directory.
    pub path: PathBuf,
    /// The format, when the suite names it.
    pub format: Option<TaskFormat>,
    /// Held-in or held-out.
    pub split: Split,
    /// Keep the first N examples.
    pub limit: Option<usize>,
    /// The length normalisation, when the suite sets one.
    pub length_norm: Option<LengthNorm>,
    /// FIB templates, when the suite sets them.
    pub templates: Option<Vec<String>>,
    /// FIB PMI, when the suite sets it.
    pub pmi: Option<bool>,
}

impl TaskSpec {
    /// The task's format (inferred from the file when the suite does not name it) and the
    /// options it is rendered with; `index` is the task's position in the suite (for errors).
    pub fn resolve(&self, origin: &Path, index: usize) -> Result<(TaskFormat, TaskOptions)> {
        let format = match self.format {
            Some(f) => f,
            None => TaskFormat::detect(&self.path)?,
        };
        if format != TaskFormat::Fib && (self.templates.is_some() || self.pmi.is_some()) {
            let key = if self.templates.is_some() {
                "templates"
            } else {
                "pmi"
            };
            return Err(EvalError::Task {
                path: origin.to_path_buf(),
                field: format!("tasks[{index}].{key}"),
                msg: format!(
                    "only fib tasks take `{key}`; this task is {}",
                    format.name()
                ),
            });
        }
        let mut options = TaskOptions::defaults(format);
        options.limit = self.limit;
        if let Some(n) = self.length_norm {
            options.length_norm = n;
        }
        if let Some(t) = &self.templates {
            options.templates = t.clone();
        }
        if let Some(p) = self.pmi {
            options.pmi = p;
        }
        Ok((format, options))
    }
}

/// A parsed suite file.
#[derive(Clone, Debug, PartialEq)]
pub struct Suite {
    /// The suite file (for error messages).
    pub origin: PathBuf,
    batch_size: usize,
    /// The tasks, in file order.
    pub tasks: Vec<TaskSpec>,
}

struct Ctx<'a> {
    origin: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, msg: impl Into<String>) -> EvalError {
        EvalError::Task {
            path: self.origin.to_path_buf(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    fn check_keys(&self, map: &serde_yaml_ng::Mapping, allowed: &[&str], at: &str) -> Result<()> {
        for k in map.keys() {
            let name = k.as_str().unwrap_or("?");
            if !allowed.contains(&name) {
                let field = if at.is_empty() {
                    name.to_string()
                } else {
                    format!("{at}.{name}")
                };
                return Err(self.err(
                    field,
                    format!("unknown key (expected one of: {})", allowed.join(", ")),
                ));
            }
        }
        Ok(())
    }

    fn string(&self, v: &Value, field: &str) -> Result<String> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| self.err(field, "expected a string"))
    }

    fn count(&self, v: &Value, field: &str) -> Result<usize> {
        v.as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| self.err(field, "expected a non-negative integer"))
    }
}

impl Suite {
    /// Reads a suite file; task paths are relative to its directory.
    pub fn load(path: &Path) -> Result<Suite> {
        let text = std::fs::read_to_string(path).map_err(|source| EvalError::File {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Suite::from_yaml_str(&text, base, path)
    }

    /// Parses a suite from YAML text; relative task paths are resolved against `base_dir`, and
    /// errors name `origin`.
    pub fn from_yaml_str(s: &str, base_dir: &Path, origin: &Path) -> Result<Suite> {
        let cx = Ctx { origin };
        let root: Value = serde_yaml_ng::from_str(s)
            .map_err(|e| cx.err("(file)", format!("not valid YAML: {e}")))?;
        let Value::Mapping(root) = root else {
            return Err(cx.err("(file)", "expected a mapping with `tasks`"));
        };
        cx.check_keys(&root, SUITE_KEYS, "")?;
        let batch_size = match root.get("batch_size") {
            None => DEFAULT_BATCH_SIZE,
            Some(v) => match cx.count(v, "batch_size")? {
                0 => return Err(cx.err("batch_size", "must be at least 1")),
                n => n,
            },
        };
        let list = match root.get("tasks") {
            Some(Value::Sequence(l)) if !l.is_empty() => l,
            Some(_) => return Err(cx.err("tasks", "expected a non-empty list of tasks")),
            None => return Err(cx.err("tasks", "missing")),
        };
        let mut tasks: Vec<TaskSpec> = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            let at = format!("tasks[{i}]");
            let f = |k: &str| format!("{at}.{k}");
            let Value::Mapping(m) = t else {
                return Err(cx.err(at, "expected a mapping"));
            };
            cx.check_keys(m, TASK_KEYS, &at)?;
            let rel = match m.get("path") {
                Some(v) => cx.string(v, &f("path"))?,
                None => return Err(cx.err(f("path"), "missing")),
            };
            let path = base_dir.join(&rel);
            let name = match m.get("name") {
                Some(v) => cx.string(v, &f("name"))?,
                None => default_name(&path),
            };
            if tasks.iter().any(|t| t.name == name) {
                return Err(cx.err(f("name"), format!("duplicate task name {name:?}")));
            }
            let format = match m.get("format") {
                None => None,
                Some(v) => {
                    let s = cx.string(v, &f("format"))?;
                    Some(TaskFormat::from_name(&s).ok_or_else(|| {
                        cx.err(
                            f("format"),
                            format!("unknown format {s:?} (bigbench | fib | jsonl)"),
                        )
                    })?)
                }
            };
            let split = match m.get("split") {
                Some(v) => {
                    let s = cx.string(v, &f("split"))?;
                    Split::from_name(&s).ok_or_else(|| {
                        cx.err(
                            f("split"),
                            format!("unknown split {s:?} (held_in | held_out)"),
                        )
                    })?
                }
                None => return Err(cx.err(f("split"), "missing (held_in | held_out)")),
            };
            let limit = m
                .get("limit")
                .map(|v| cx.count(v, &f("limit")))
                .transpose()?;
            let alpha = match m.get("length_alpha") {
                None => None,
                Some(v) => Some(
                    v.as_f64()
                        .filter(|a| a.is_finite())
                        .ok_or_else(|| cx.err(f("length_alpha"), "expected a number"))?,
                ),
            };
            let length_norm = match m.get("length_normalization") {
                None => None,
                Some(v) => {
                    let s = cx.string(v, &f("length_normalization"))?;
                    Some(match s.as_str() {
                        "none" => LengthNorm::None,
                        "per_token" => LengthNorm::PerToken,
                        "power" => LengthNorm::Power(alpha.ok_or_else(|| {
                            cx.err(
                                f("length_alpha"),
                                "required with length_normalization: power",
                            )
                        })?),
                        _ => {
                            return Err(cx.err(
                                f("length_normalization"),
                                format!("unknown value {s:?} (none | per_token | power)"),
                            ))
                        }
                    })
                }
            };
            if alpha.is_some() && !matches!(length_norm, Some(LengthNorm::Power(_))) {
                return Err(cx.err(
                    f("length_alpha"),
                    "only meaningful with length_normalization: power",
                ));
            }
            let templates = match m.get("templates") {
                None => None,
                Some(Value::Sequence(l)) if !l.is_empty() => Some(
                    l.iter()
                        .enumerate()
                        .map(|(j, v)| cx.string(v, &f(&format!("templates[{j}]"))))
                        .collect::<Result<Vec<_>>>()?,
                ),
                Some(_) => {
                    return Err(cx.err(f("templates"), "expected a non-empty list of strings"))
                }
            };
            let pmi = match m.get("pmi") {
                None => None,
                Some(v) => Some(
                    v.as_bool()
                        .ok_or_else(|| cx.err(f("pmi"), "expected true or false"))?,
                ),
            };
            if let Some(fmt) = format {
                if fmt != TaskFormat::Fib {
                    if templates.is_some() {
                        return Err(cx.err(f("templates"), "only fib tasks take templates"));
                    }
                    if pmi.is_some() {
                        return Err(cx.err(f("pmi"), "only fib tasks take pmi"));
                    }
                }
            }
            tasks.push(TaskSpec {
                name,
                path,
                format,
                split,
                limit,
                length_norm,
                templates,
                pmi,
            });
        }
        Ok(Suite {
            origin: origin.to_path_buf(),
            batch_size,
            tasks,
        })
    }

    /// The number of requests per batch (`batch_size`, default 8).
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }
}

/// `navigate/task.json` → `navigate`; `pairs.jsonl` → `pairs`.
fn default_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if stem == "task" {
        if let Some(dir) = path.parent().and_then(Path::file_name) {
            return dir.to_string_lossy().into_owned();
        }
    }
    stem
}

struct PreparedTask {
    name: String,
    split: Split,
    task: RenderedTask,
    offset: usize,
}

/// A suite whose task files are read and rendered: the flat request list and how to grade it.
pub struct PreparedSuite {
    tasks: Vec<PreparedTask>,
    requests: Vec<ScoreRequest>,
    batch_size: usize,
}

impl PreparedSuite {
    /// Reads every task file and renders all requests, in suite order.
    pub fn prepare(suite: &Suite) -> Result<PreparedSuite> {
        let mut tasks = Vec::with_capacity(suite.tasks.len());
        let mut requests = Vec::new();
        for (index, spec) in suite.tasks.iter().enumerate() {
            let (format, options) = spec.resolve(&suite.origin, index)?;
            let task = load_task(&spec.path, format, &options)?;
            let offset = requests.len();
            requests.extend(task.requests.iter().cloned());
            tasks.push(PreparedTask {
                name: spec.name.clone(),
                split: spec.split,
                task,
                offset,
            });
        }
        Ok(PreparedSuite {
            tasks,
            requests,
            batch_size: suite.batch_size,
        })
    }

    /// Every request of every task; `grade` expects one score per request, in this order.
    pub fn requests(&self) -> &[ScoreRequest] {
        &self.requests
    }

    /// The suite's batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The rendered tasks with their names, in suite order.
    pub fn tasks(&self) -> impl Iterator<Item = (&str, &RenderedTask)> {
        self.tasks.iter().map(|t| (t.name.as_str(), &t.task))
    }

    fn check(&self, scores: &[Scored]) -> Result<()> {
        if scores.len() != self.requests.len() {
            return Err(EvalError::Other(format!(
                "{} scores for the suite's {} requests",
                scores.len(),
                self.requests.len()
            )));
        }
        Ok(())
    }

    fn slice<'a>(&self, t: &PreparedTask, scores: &'a [Scored]) -> &'a [Scored] {
        &scores[t.offset..t.offset + t.task.requests.len()]
    }

    /// Grades every task; `scores[i]` belongs to `requests()[i]`.
    pub fn grade(&self, scores: &[Scored]) -> Result<Report> {
        self.check(scores)?;
        let mut lines = Vec::with_capacity(self.tasks.len());
        for t in &self.tasks {
            let g = t.task.grade(self.slice(t, scores))?;
            let groups = if t.task.format == TaskFormat::Fib {
                t.task
                    .groups
                    .iter()
                    .zip(&g.group_values)
                    .map(|(name, &value)| GroupValue {
                        name: name.clone(),
                        value,
                    })
                    .collect()
            } else {
                Vec::new()
            };
            lines.push(TaskReport {
                name: t.name.clone(),
                split: t.split,
                format: t.task.format,
                metric: t.task.metric.clone(),
                value: g.value,
                examples: t.task.distinct_examples(),
                groups,
                notes: t.task.notes.clone(),
            });
        }
        Ok(Report::new(lines, Vec::new()))
    }

    /// Writes one JSON line per graded example: `task`, `split`, `example` (its index in the
    /// file), `template` (FIB), `choices` (each with `text`, `logprob`, `tokens`, `score` and,
    /// with PMI, `null_logprob`, `null_tokens`), `prediction` (choice index), `target` (the
    /// predicted choice's target score) and `correct`.
    pub fn dump_scores(&self, scores: &[Scored], out: &mut dyn Write) -> Result<()> {
        self.check(scores)?;
        for t in &self.tasks {
            let local = self.slice(t, scores);
            let g = t.task.grade(local)?;
            for (ex, eg) in t.task.examples.iter().zip(&g.examples) {
                let choices: Vec<serde_json::Value> = ex
                    .choices
                    .iter()
                    .zip(&eg.scores)
                    .map(|(c, &score)| {
                        let s = local[c.request];
                        let mut v = json!({
                            "text": c.text,
                            "logprob": s.logprob,
                            "tokens": s.tokens,
                            "score": score,
                        });
                        if let Some(n) = c.null_request {
                            v["null_logprob"] = json!(local[n].logprob);
                            v["null_tokens"] = json!(local[n].tokens);
                        }
                        v
                    })
                    .collect();
                let mut line = json!({
                    "task": t.name,
                    "split": t.split.name(),
                    "example": ex.index,
                });
                if t.task.format == TaskFormat::Fib {
                    line["template"] = json!(t.task.groups[ex.group]);
                }
                line["choices"] = json!(choices);
                line["prediction"] = json!(eg.prediction);
                line["target"] = json!(eg.value);
                line["correct"] = json!(eg.correct);
                let text = serde_json::to_string(&line)
                    .map_err(|e| EvalError::Other(format!("cannot serialise scores: {e}")))?;
                writeln!(out, "{text}")
                    .map_err(|e| EvalError::Other(format!("cannot write scores: {e}")))?;
            }
        }
        Ok(())
    }
}
