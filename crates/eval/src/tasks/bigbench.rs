//! BIG-bench JSON tasks (`task.json`), zero-shot multiple choice, graded by
//! `multiple_choice_grade` (methods.md §17, "BIG-bench JSON task").
//!
//! Rendering follows `bigbench/api/json_task.py` of the `bigbench` 1.0.0 sdist (line numbers of
//! that file):
//!
//! - Prefixes (l. 438-441, 550): `task_prefix` (default ""), `example_input_prefix` ("\nQ: "),
//!   `example_output_prefix` ("\nA: "), `choice_prefix` ("\n  choice: "),
//!   `append_choices_to_input` (true).
//! - De-duplication (l. 455-490): an example identical to an earlier one (same JSON text) is
//!   dropped, keeping the order.
//! - `default_format_fn` (l. 88-142), with a fresh `np.random.RandomState(42)` per example: when
//!   `append_choices_to_input`, the input becomes
//!   `input + choice_prefix + choice_prefix.join(permutation(sorted(choices)))`; then
//!   `input_prefix + input + output_prefix`. The choice list is `target_scores`' keys in file
//!   order (not permuted).
//! - `evaluate_fixed_shot` (l. 596-620): zero-shot keeps every example in order (no sampling
//!   without `max_examples`); the model is asked `cond_log_prob(task_prefix + input, choices)`,
//!   and the HF model (`models/huggingface_models.py`, `_gpt_batch_tokenize`) tokenizes the
//!   context and each choice separately and scores the choice's tokens: so the request context
//!   is `task_prefix + input_prefix + input [+ choices] + output_prefix` and the continuation is
//!   the choice text exactly, no stripping, no added space.
//! - `multiple_choice_grade` (`api/task_metrics.py` l. 28-43): the target score of the argmax
//!   choice, averaged. Ties: see [`super::metrics`] (first index here, not BIG-bench's sha256).
//! - An example whose scores do not single out a best choice is an error, as in BIG-bench
//!   (l. 125-131), unless it also has a `target`.
//!
//! Differences, each carried as a note into the report: examples without `target_scores`
//! (generative `target` only) are skipped, metrics other than `multiple_choice_grade` are not
//! computed, unknown fields are ignored, `limit` keeps the *first* N examples (BIG-bench's
//! `max_examples` samples randomly), composite tasks (subtasks) are not read.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use serde_json::Value;

use super::nprandom::NumpyRandomState;
use super::{read_text, task_err, Choice, Example, RenderedTask, TaskFormat, TaskOptions};
use crate::error::Result;
use crate::score::ScoreRequest;

/// BIG-bench's default `random_seed` (`JsonTask.__init__`).
pub const SEED: u32 = 42;

/// Top-level fields amalgam reads or knowingly ignores without a note.
const KNOWN_FIELDS: &[&str] = &[
    "canary",
    "name",
    "description",
    "keywords",
    "metrics",
    "preferred_score",
    "examples",
    "task_prefix",
    "example_input_prefix",
    "example_output_prefix",
    "choice_prefix",
    "append_choices_to_input",
    "few_shot_example_separator",
    "absolute_normalization",
    "output_regex",
    "stop_string",
];

/// The prompt settings of a BIG-bench task, with BIG-bench's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompting {
    /// Prepended once to every context.
    pub task_prefix: String,
    /// Before each input.
    pub input_prefix: String,
    /// After each input (and the appended choices).
    pub output_prefix: String,
    /// Before each appended choice.
    pub choice_prefix: String,
    /// Whether the choices are listed in the input.
    pub append_choices: bool,
}

impl Default for Prompting {
    fn default() -> Self {
        Prompting {
            task_prefix: String::new(),
            input_prefix: "\nQ: ".into(),
            output_prefix: "\nA: ".into(),
            choice_prefix: "\n  choice: ".into(),
            append_choices: true,
        }
    }
}

impl Prompting {
    /// The context BIG-bench scores the choices after, for one example.
    pub fn render_context(&self, input: &str, choices: &[&str]) -> String {
        let mut body = input.to_string();
        if self.append_choices {
            let mut sorted: Vec<&str> = choices.to_vec();
            sorted.sort_unstable();
            let order = NumpyRandomState::new(SEED).permutation(sorted.len());
            for i in order {
                body.push_str(&self.choice_prefix);
                body.push_str(sorted[i]);
            }
        }
        format!(
            "{}{}{}{}",
            self.task_prefix, self.input_prefix, body, self.output_prefix
        )
    }
}

fn string_field(
    path: &Path,
    obj: &serde_json::Map<String, Value>,
    key: &str,
    default: &str,
) -> Result<String> {
    match obj.get(key) {
        None => Ok(default.to_string()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(task_err(
            path,
            key,
            format!("expected a string, found {other}"),
        )),
    }
}

/// Reads a BIG-bench `task.json` and renders its multiple-choice examples.
pub fn load(path: &Path, options: &TaskOptions) -> Result<RenderedTask> {
    let text = read_text(path)?;
    let root: Value = serde_json::from_str(&text)
        .map_err(|e| task_err(path, "(file)", format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = root else {
        return Err(task_err(path, "(file)", "expected a JSON object"));
    };
    let defaults = Prompting::default();
    let prompting = Prompting {
        task_prefix: string_field(path, &obj, "task_prefix", &defaults.task_prefix)?,
        input_prefix: string_field(path, &obj, "example_input_prefix", &defaults.input_prefix)?,
        output_prefix: string_field(path, &obj, "example_output_prefix", &defaults.output_prefix)?,
        choice_prefix: string_field(path, &obj, "choice_prefix", &defaults.choice_prefix)?,
        append_choices: match obj.get("append_choices_to_input") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(task_err(
                    path,
                    "append_choices_to_input",
                    format!("expected true or false, found {other}"),
                ))
            }
        },
    };

    let mut notes = Vec::new();
    match obj.get("metrics") {
        None => notes.push("no `metrics` field: graded by multiple_choice_grade".to_string()),
        Some(Value::Array(list)) => {
            let mut other = Vec::new();
            let mut has_mc = false;
            for (i, m) in list.iter().enumerate() {
                match m.as_str() {
                    Some("multiple_choice_grade") => has_mc = true,
                    Some(name) => other.push(name.to_string()),
                    None => {
                        return Err(task_err(path, format!("metrics[{i}]"), "expected a string"))
                    }
                }
            }
            if !other.is_empty() {
                notes.push(format!(
                    "metrics not computed (only multiple_choice_grade is): {}",
                    other.join(", ")
                ));
            }
            if !has_mc {
                notes.push(
                    "`metrics` does not list multiple_choice_grade: graded by it anyway".into(),
                );
            }
        }
        Some(_) => return Err(task_err(path, "metrics", "expected a list of metric names")),
    }
    if let Some(p) = obj.get("preferred_score") {
        if p.as_str() != Some("multiple_choice_grade") {
            notes.push(format!(
                "preferred_score {p} is not computed: reporting multiple_choice_grade"
            ));
        }
    }
    let unknown: Vec<&str> = obj
        .keys()
        .map(String::as_str)
        .filter(|k| !KNOWN_FIELDS.contains(k))
        .collect();
    if !unknown.is_empty() {
        notes.push(format!("ignored fields: {}", unknown.join(", ")));
    }

    let examples = match obj.get("examples") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(task_err(path, "examples", "expected a list of examples")),
        None => {
            return Err(task_err(
                path,
                "examples",
                "missing (a composite BIG-bench task with subtasks is not read: list each \
                 subtask's task.json in the suite)",
            ))
        }
    };

    let mut seen = HashSet::new();
    let mut duplicates = 0usize;
    let mut generative = 0usize;
    let mut ignored_example_fields = BTreeSet::new();
    let mut requests = Vec::new();
    let mut rendered = Vec::new();
    let mut gradable = 0usize;
    for (i, ex) in examples.iter().enumerate() {
        let field = format!("examples[{i}]");
        let key =
            serde_json::to_string(ex).map_err(|e| task_err(path, field.clone(), e.to_string()))?;
        if !seen.insert(key) {
            duplicates += 1;
            continue;
        }
        let Value::Object(ex) = ex else {
            return Err(task_err(path, field, "expected an object"));
        };
        for k in ex.keys() {
            if !matches!(k.as_str(), "input" | "target_scores" | "target") {
                ignored_example_fields.insert(k.clone());
            }
        }
        let input = match ex.get("input") {
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(task_err(
                    path,
                    format!("{field}.input"),
                    "expected a string",
                ))
            }
            None => return Err(task_err(path, format!("{field}.input"), "missing")),
        };
        let scores = match ex.get("target_scores") {
            None if ex.contains_key("target") => {
                generative += 1;
                continue;
            }
            None => {
                return Err(task_err(
                    path,
                    field,
                    "needs `target_scores` (multiple choice) or `target` (generative)",
                ))
            }
            Some(Value::Object(m)) if !m.is_empty() => m,
            Some(_) => {
                return Err(task_err(
                    path,
                    format!("{field}.target_scores"),
                    "expected a non-empty object {choice: score}",
                ))
            }
        };
        let mut choices: Vec<(&str, f64)> = Vec::with_capacity(scores.len());
        for (choice, score) in scores {
            let Some(s) = score.as_f64() else {
                return Err(task_err(
                    path,
                    format!("{field}.target_scores[{choice:?}]"),
                    format!("expected a number, found {score}"),
                ));
            };
            choices.push((choice.as_str(), s));
        }
        if !ex.contains_key("target") {
            let max = choices
                .iter()
                .map(|c| c.1)
                .fold(f64::NEG_INFINITY, f64::max);
            let min = choices.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
            if (choices.len() == 1 && max == 0.0) || (choices.len() > 1 && max <= min) {
                return Err(task_err(
                    path,
                    format!("{field}.target_scores"),
                    "no correct choice: every choice has the same score",
                ));
            }
        }
        gradable += 1;
        if options.limit.is_some_and(|l| rendered.len() >= l) {
            continue;
        }
        let texts: Vec<&str> = choices.iter().map(|c| c.0).collect();
        let context = prompting.render_context(input, &texts);
        let mut out = Vec::with_capacity(choices.len());
        for (text, target) in choices {
            out.push(Choice {
                text: text.to_string(),
                request: requests.len(),
                null_request: None,
                target,
            });
            requests.push(ScoreRequest {
                context: context.clone(),
                continuation: text.to_string(),
            });
        }
        rendered.push(Example {
            index: i,
            group: 0,
            choices: out,
        });
    }
    if duplicates > 0 {
        notes.push(format!(
            "{duplicates} duplicate examples dropped (as BIG-bench does)"
        ));
    }
    if generative > 0 {
        notes.push(format!(
            "{generative} generative examples (`target` without `target_scores`) skipped"
        ));
    }
    if !ignored_example_fields.is_empty() {
        let names: Vec<String> = ignored_example_fields.into_iter().collect();
        notes.push(format!("ignored example fields: {}", names.join(", ")));
    }
    if rendered.len() < gradable {
        notes.push(format!(
            "limited to the first {} of {gradable} examples",
            rendered.len()
        ));
    }
    if rendered.is_empty() {
        notes.push("no multiple-choice example to grade".into());
    }
    Ok(RenderedTask {
        format: TaskFormat::Bigbench,
        metric: "multiple_choice_grade".into(),
        requests,
        examples: rendered,
        groups: vec![String::new()],
        length_norm: options.length_norm,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_appended_choices_in_numpy_order() {
        // sorted = [a, b, c, d]; np.random.RandomState(42).permutation(4) = [1, 3, 0, 2].
        let p = Prompting::default();
        let ctx = p.render_context("Q?", &["d", "a", "c", "b"]);
        assert_eq!(
            ctx,
            "\nQ: Q?\n  choice: b\n  choice: d\n  choice: a\n  choice: c\nA: "
        );
        let p = Prompting {
            append_choices: false,
            task_prefix: "T".into(),
            ..Prompting::default()
        };
        assert_eq!(p.render_context("x", &["y"]), "T\nQ: x\nA: ");
    }
}
