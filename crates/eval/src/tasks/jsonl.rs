//! Plain JSONL rank classification (methods.md §17 "Rank classification"): one
//! `{input, choices: [..], label: int}` object per line; the context is `input` and each
//! continuation a choice, both exactly as written (put any separating space in the data); the
//! metric is accuracy.

use std::collections::BTreeSet;
use std::path::Path;

use super::{
    choice_line, jsonl_objects, limit_and_field_notes, Choice, Example, RenderedTask, TaskFormat,
    TaskOptions,
};
use crate::error::Result;
use crate::score::ScoreRequest;

/// Reads a plain JSONL task and renders one request per choice.
pub fn load(path: &Path, options: &TaskOptions) -> Result<RenderedTask> {
    let lines = jsonl_objects(path)?;
    let total = lines.len();
    let mut requests = Vec::new();
    let mut examples = Vec::new();
    let mut ignored = BTreeSet::new();
    for (index, lineno, obj) in lines {
        for k in obj.keys() {
            if !matches!(k.as_str(), "input" | "choices" | "label") {
                ignored.insert(k.clone());
            }
        }
        let (input, choices, label) =
            choice_line(path, lineno, &obj, "choices", 1, "label", "choice")?;
        if options.limit.is_some_and(|l| examples.len() >= l) {
            continue;
        }
        let mut out = Vec::with_capacity(choices.len());
        for (j, text) in choices.iter().enumerate() {
            out.push(Choice {
                text: text.to_string(),
                request: requests.len(),
                null_request: None,
                target: if j == label { 1.0 } else { 0.0 },
            });
            requests.push(ScoreRequest {
                context: input.clone(),
                continuation: text.to_string(),
            });
        }
        examples.push(Example {
            index,
            group: 0,
            choices: out,
        });
    }
    let mut notes = Vec::new();
    limit_and_field_notes(&mut notes, examples.len(), total, ignored);
    Ok(RenderedTask {
        format: TaskFormat::Jsonl,
        metric: "accuracy".into(),
        requests,
        examples,
        groups: vec![String::new()],
        length_norm: options.length_norm,
        notes,
    })
}
