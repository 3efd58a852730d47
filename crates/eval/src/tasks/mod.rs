//! Tasks: files turned into [`ScoreRequest`]s and graded from their [`Scored`] results
//! (methods.md §17, "Rank classification", "FIB", "BIG-bench JSON task").
//!
//! Three formats, one shape. Every task becomes a [`RenderedTask`]: a flat list of requests and
//! a list of [`Example`]s, each with its [`Choice`]s pointing at requests by index. Grading is
//! rank classification and the same for every format:
//!
//! 1. each choice gets the score `s = norm(logprob, tokens)` ([`LengthNorm`]), minus the same
//!    score of the choice after the task's null input when PMI is on (FIB);
//! 2. the prediction is the **first** choice (in the task's choice order) with the highest
//!    score ([`metrics::first_argmax`]; NaN never wins);
//! 3. the example's value is the predicted choice's target (BIG-bench `target_scores`, or 1 / 0
//!    for the labelled choice);
//! 4. examples are averaged per group (a FIB prompt template; one group otherwise) and the task
//!    value is the median of the group means.
//!
//! - [`bigbench`]: BIG-bench `task.json`, rendered exactly as `bigbench/api/json_task.py`
//!   renders zero-shot multiple choice; metric `multiple_choice_grade`.
//! - [`fib`]: FIB-style summary pairs (`r-three/fib`), several prompt templates, optional PMI.
//! - [`jsonl`]: plain `{input, choices, label}` lines; metric `accuracy`.

pub mod bigbench;
pub mod fib;
pub mod jsonl;
pub mod metrics;
pub mod nprandom;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::score::{ScoreRequest, Scored};

/// The format of a task file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskFormat {
    /// A BIG-bench JSON task (`task.json`).
    Bigbench,
    /// FIB-style JSONL: `{id, input, list_choices, correct_choice?, lbl}` per line.
    Fib,
    /// Plain JSONL: `{input, choices, label}` per line.
    Jsonl,
}

impl TaskFormat {
    /// The name used in suite files and reports (`bigbench`, `fib`, `jsonl`).
    pub fn name(self) -> &'static str {
        match self {
            TaskFormat::Bigbench => "bigbench",
            TaskFormat::Fib => "fib",
            TaskFormat::Jsonl => "jsonl",
        }
    }

    /// Parses a format name as written in a suite file.
    pub fn from_name(name: &str) -> Option<TaskFormat> {
        match name {
            "bigbench" => Some(TaskFormat::Bigbench),
            "fib" => Some(TaskFormat::Fib),
            "jsonl" => Some(TaskFormat::Jsonl),
            _ => None,
        }
    }

    /// The length normalisation a format uses when the suite does not choose one: none for
    /// BIG-bench (its `cond_log_prob` sums token log-probs) and plain JSONL (MaTS/TIES default),
    /// per token for FIB (its average token log-probability).
    pub fn default_length_norm(self) -> LengthNorm {
        match self {
            TaskFormat::Bigbench | TaskFormat::Jsonl => LengthNorm::None,
            TaskFormat::Fib => LengthNorm::PerToken,
        }
    }

    /// Infers the format of a file: a `.json` file is BIG-bench; for anything else the first
    /// non-empty line decides: a JSON object with `list_choices` is FIB, with `choices` plain
    /// JSONL, with `examples` BIG-bench.
    pub fn detect(path: &Path) -> Result<TaskFormat> {
        if path.extension().is_some_and(|e| e == "json") {
            return Ok(TaskFormat::Bigbench);
        }
        let text = read_text(path)?;
        let first = text.lines().map(str::trim).find(|l| !l.is_empty());
        let value: Option<serde_json::Value> = first.and_then(|l| serde_json::from_str(l).ok());
        match value {
            Some(serde_json::Value::Object(m)) if m.contains_key("list_choices") => {
                Ok(TaskFormat::Fib)
            }
            Some(serde_json::Value::Object(m)) if m.contains_key("choices") => {
                Ok(TaskFormat::Jsonl)
            }
            Some(serde_json::Value::Object(m)) if m.contains_key("examples") => {
                Ok(TaskFormat::Bigbench)
            }
            _ => Err(EvalError::Task {
                path: path.to_path_buf(),
                field: "format".into(),
                msg: "cannot infer the task format (expected a BIG-bench .json file, or JSONL \
                      lines with `list_choices` (fib) or `choices` (jsonl)); set `format:` in \
                      the suite"
                    .into(),
            }),
        }
    }
}

/// How a choice's summed log-probability is normalised by its length before ranking.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthNorm {
    /// The raw sum Σ_t log p(y_t | …).
    None,
    /// The sum divided by the number of continuation tokens (average token log-probability).
    PerToken,
    /// The sum divided by |y|^alpha (alpha = 1 is `PerToken`).
    Power(f64),
}

impl LengthNorm {
    /// The normalised score of a continuation with summed log-probability `logprob` over
    /// `tokens` tokens. A continuation of zero tokens is divided by 1.
    pub fn apply(self, logprob: f64, tokens: u32) -> f64 {
        let n = f64::from(tokens.max(1));
        match self {
            LengthNorm::None => logprob,
            LengthNorm::PerToken => logprob / n,
            LengthNorm::Power(alpha) => logprob / n.powf(alpha),
        }
    }

    /// A short name for reports: `none`, `per_token`, `power(0.5)`.
    pub fn describe(self) -> String {
        match self {
            LengthNorm::None => "none".into(),
            LengthNorm::PerToken => "per_token".into(),
            LengthNorm::Power(a) => format!("power({a})"),
        }
    }
}

/// What a task file is rendered with (the suite's per-task settings).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskOptions {
    /// Keep only the first `limit` examples (after BIG-bench's de-duplication and after
    /// skipping examples that cannot be graded).
    pub limit: Option<usize>,
    /// Length normalisation of choice scores.
    pub length_norm: LengthNorm,
    /// FIB prompt templates (`[input]` marks the document); ignored by other formats.
    pub templates: Vec<String>,
    /// FIB: subtract the score after the null input (the template without the document).
    pub pmi: bool,
}

impl TaskOptions {
    /// The defaults of a format: no limit, its default length normalisation, FIB's three
    /// templates and PMI on (FIB's own default).
    pub fn defaults(format: TaskFormat) -> TaskOptions {
        TaskOptions {
            limit: None,
            length_norm: format.default_length_norm(),
            templates: fib::DEFAULT_TEMPLATES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            pmi: true,
        }
    }
}

/// One answer choice of an example.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The choice's text (the scored continuation).
    pub text: String,
    /// Index into [`RenderedTask::requests`] of the choice after the example's context.
    pub request: usize,
    /// Index of the choice after the null context (PMI), if any.
    pub null_request: Option<usize>,
    /// The value of predicting this choice (BIG-bench target score; 1 or 0 otherwise).
    pub target: f64,
}

/// One graded unit: an example of the file (under one template, for FIB).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The example's position in the task file (0-based; BIG-bench: in its `examples` array,
    /// FIB / JSONL: among its non-empty lines).
    pub index: usize,
    /// The group (FIB template) it belongs to: an index into [`RenderedTask::groups`].
    pub group: usize,
    /// Its choices, in the task's order.
    pub choices: Vec<Choice>,
}

/// A task file rendered into requests, ready to be graded from their scores.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedTask {
    /// The file's format.
    pub format: TaskFormat,
    /// The metric reported (`multiple_choice_grade`, `accuracy`).
    pub metric: String,
    /// Every request, in a fixed order.
    pub requests: Vec<ScoreRequest>,
    /// The graded examples, in a fixed order.
    pub examples: Vec<Example>,
    /// Group names (FIB templates); one group, named "", otherwise.
    pub groups: Vec<String>,
    /// The length normalisation used for ranking.
    pub length_norm: LengthNorm,
    /// Things skipped or ignored while reading the file, for the report.
    pub notes: Vec<String>,
}

/// The grade of one example.
#[derive(Clone, Debug, PartialEq)]
pub struct ExampleGrade {
    /// Each choice's ranking score (normalised, PMI applied).
    pub scores: Vec<f64>,
    /// The index of the predicted choice.
    pub prediction: usize,
    /// The predicted choice's target (the example's contribution to the metric).
    pub value: f64,
    /// Whether the prediction has the highest target of the example.
    pub correct: bool,
}

/// The grade of a whole task.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskGrade {
    /// The task value: the median over groups of the mean example value (`None` without
    /// examples).
    pub value: Option<f64>,
    /// Each group's mean value (`None` for an empty group), in [`RenderedTask::groups`] order.
    pub group_values: Vec<Option<f64>>,
    /// Per example, in [`RenderedTask::examples`] order.
    pub examples: Vec<ExampleGrade>,
}

impl RenderedTask {
    /// The number of distinct file examples graded (FIB examples count once, not once per
    /// template).
    pub fn distinct_examples(&self) -> usize {
        let mut seen: Vec<usize> = self.examples.iter().map(|e| e.index).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }

    /// Grades the task from `scores`, where `scores[i]` belongs to `requests[i]`.
    pub fn grade(&self, scores: &[Scored]) -> Result<TaskGrade> {
        if scores.len() != self.requests.len() {
            return Err(EvalError::Other(format!(
                "{} scores for {} requests",
                scores.len(),
                self.requests.len()
            )));
        }
        let norm = |i: usize| self.length_norm.apply(scores[i].logprob, scores[i].tokens);
        let mut sums = vec![(0.0f64, 0usize); self.groups.len()];
        let mut out = Vec::with_capacity(self.examples.len());
        for ex in &self.examples {
            let choice_scores: Vec<f64> = ex
                .choices
                .iter()
                .map(|c| norm(c.request) - c.null_request.map_or(0.0, norm))
                .collect();
            let prediction = metrics::first_argmax(&choice_scores);
            let value = ex.choices.get(prediction).map_or(0.0, |c| c.target);
            let best = ex
                .choices
                .iter()
                .map(|c| c.target)
                .fold(f64::NEG_INFINITY, f64::max);
            let slot = &mut sums[ex.group];
            slot.0 += value;
            slot.1 += 1;
            out.push(ExampleGrade {
                scores: choice_scores,
                prediction,
                value,
                correct: value >= best,
            });
        }
        let group_values: Vec<Option<f64>> = sums
            .iter()
            .map(|&(s, n)| (n > 0).then(|| s / n as f64))
            .collect();
        let present: Vec<f64> = group_values.iter().flatten().copied().collect();
        Ok(TaskGrade {
            value: metrics::median(&present),
            group_values,
            examples: out,
        })
    }
}

/// Reads and renders one task file.
pub fn load_task(path: &Path, format: TaskFormat, options: &TaskOptions) -> Result<RenderedTask> {
    match format {
        TaskFormat::Bigbench => bigbench::load(path, options),
        TaskFormat::Fib => fib::load(path, options),
        TaskFormat::Jsonl => jsonl::load(path, options),
    }
}

/// Reads a whole text file, naming it on failure.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| EvalError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// A task error at `field` of `path`.
pub(crate) fn task_err(path: &Path, field: impl Into<String>, msg: impl Into<String>) -> EvalError {
    EvalError::Task {
        path: path.to_path_buf(),
        field: field.into(),
        msg: msg.into(),
    }
}

/// The `input` string, the choices (a list of at least `min_choices` strings under
/// `choices_key`) and the label (an index into them under `label_key`; `what` names what it
/// points at) of one JSONL line, with errors naming `line N.FIELD`.
pub(crate) fn choice_line(
    path: &Path,
    lineno: usize,
    obj: &serde_json::Map<String, serde_json::Value>,
    choices_key: &str,
    min_choices: usize,
    label_key: &str,
    what: &str,
) -> Result<(String, Vec<String>, usize)> {
    use serde_json::Value;
    let field = |name: &str| format!("line {lineno}.{name}");
    let input = match obj.get("input") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(task_err(path, field("input"), "expected a string")),
        None => return Err(task_err(path, field("input"), "missing")),
    };
    let choices: Vec<String> = match obj.get(choices_key) {
        Some(Value::Array(a)) if a.len() >= min_choices => a
            .iter()
            .enumerate()
            .map(|(j, c)| {
                c.as_str().map(str::to_string).ok_or_else(|| {
                    task_err(
                        path,
                        field(&format!("{choices_key}[{j}]")),
                        "expected a string",
                    )
                })
            })
            .collect::<Result<_>>()?,
        Some(_) => {
            return Err(task_err(
                path,
                field(choices_key),
                format!("expected a list of at least {min_choices} strings"),
            ))
        }
        None => return Err(task_err(path, field(choices_key), "missing")),
    };
    let label = match obj.get(label_key).and_then(Value::as_u64) {
        Some(l) if (l as usize) < choices.len() => l as usize,
        Some(l) => {
            return Err(task_err(
                path,
                field(label_key),
                format!("{l} is out of range for {} choices", choices.len()),
            ))
        }
        None => {
            return Err(task_err(
                path,
                field(label_key),
                format!("missing or not a non-negative integer (index of the correct {what})"),
            ))
        }
    };
    Ok((input, choices, label))
}

/// Appends the notes every task format reports: an example limit that cut the file short, and
/// the example fields it ignored.
pub(crate) fn limit_and_field_notes(
    notes: &mut Vec<String>,
    kept: usize,
    total: usize,
    ignored: std::collections::BTreeSet<String>,
) {
    if kept < total {
        notes.push(format!("limited to the first {kept} of {total} examples"));
    }
    if !ignored.is_empty() {
        let names: Vec<String> = ignored.into_iter().collect();
        notes.push(format!("ignored fields: {}", names.join(", ")));
    }
}

/// One non-empty line of a JSONL file: (index among non-empty lines, 1-based line number, object).
pub(crate) type JsonlLine = (usize, usize, serde_json::Map<String, serde_json::Value>);

/// The non-empty lines of a JSONL file, each a JSON object.
pub(crate) fn jsonl_objects(path: &Path) -> Result<Vec<JsonlLine>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let field = format!("line {}", lineno + 1);
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| task_err(path, field.clone(), format!("not valid JSON: {e}")))?;
        match value {
            serde_json::Value::Object(m) => out.push((out.len(), lineno + 1, m)),
            _ => return Err(task_err(path, field, "expected a JSON object")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(group: usize, targets: &[f64], base: usize) -> Example {
        Example {
            index: base,
            group,
            choices: targets
                .iter()
                .enumerate()
                .map(|(i, &t)| Choice {
                    text: format!("c{i}"),
                    request: base * 10 + i,
                    null_request: None,
                    target: t,
                })
                .collect(),
        }
    }

    #[test]
    fn length_norms() {
        assert_eq!(LengthNorm::None.apply(-6.0, 3), -6.0);
        assert_eq!(LengthNorm::PerToken.apply(-6.0, 3), -2.0);
        assert!((LengthNorm::Power(0.5).apply(-6.0, 4) + 3.0).abs() < 1e-15);
        assert_eq!(LengthNorm::PerToken.apply(0.0, 0), 0.0);
    }

    #[test]
    fn grade_ties_pick_the_first_choice_and_median_of_groups() {
        // Two groups; requests addressed as base*10 + choice.
        let mut requests = Vec::new();
        for i in 0..40 {
            requests.push(ScoreRequest {
                context: format!("{i}"),
                continuation: String::new(),
            });
        }
        let task = RenderedTask {
            format: TaskFormat::Jsonl,
            metric: "accuracy".into(),
            requests,
            examples: vec![
                ex(0, &[0.0, 1.0], 0),
                ex(0, &[1.0, 0.0], 1),
                ex(1, &[0.0, 1.0], 2),
            ],
            groups: vec!["a".into(), "b".into()],
            length_norm: LengthNorm::None,
            notes: vec![],
        };
        let mut scores = vec![
            Scored {
                logprob: 0.0,
                tokens: 1
            };
            40
        ];
        // example 0: tie -> first choice (target 0); example 1: choice 0 wins (target 1);
        // example 2: choice 1 wins (target 1).
        scores[0].logprob = -1.0;
        scores[1].logprob = -1.0;
        scores[10].logprob = -0.5;
        scores[11].logprob = -2.0;
        scores[20].logprob = -3.0;
        scores[21].logprob = -2.0;
        let g = task.grade(&scores).expect("grade");
        assert_eq!(g.examples[0].prediction, 0);
        assert!(!g.examples[0].correct);
        assert_eq!(g.group_values, vec![Some(0.5), Some(1.0)]);
        // median of {0.5, 1.0} = 0.75
        assert_eq!(g.value, Some(0.75));
        assert!(task.grade(&scores[..3]).is_err());
    }
}
