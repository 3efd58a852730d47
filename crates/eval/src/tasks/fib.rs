//! FIB-style summary pairs (methods.md §17 "FIB"; `r-three/fib`).
//!
//! Each JSONL line is `{id?, input, list_choices: [s1, s2, …], correct_choice?, lbl}`; `lbl` is
//! the index of the factually consistent summary. For every prompt template and example:
//!
//! - context: the template with `[input]` replaced by the document (`src/data/preprocess_data.py`,
//!   `tokenize_prompted_input_text`: the text around the data key, then the value);
//! - continuation: the summary exactly as in the file (`src/data/multiple_choice.py` tokenizes
//!   each choice alone, without an added space);
//! - PMI (`src/models/DecoderWrappers_forMulChoice.py`, `predict_mulChoice`): the same score of
//!   the summary after the null input, i.e. the template with `[input]` removed
//!   (`"".join(template_nonDataKeys)`), is subtracted;
//! - prediction: argmax (first index on ties, as torch); accuracy per template; the task value
//!   is the median of the template accuracies.
//!
//! Defaults follow FIB: the three templates of `src/data/templates.py`, length normalisation per
//! token (average token log-probability), PMI on. Known differences: FIB scores a choice's tokens
//! from its second token on (its logits come from the choice positions only) and prepends a
//! space to the bare `[input]` template for tokenizers that add no BOS; amalgam scores every
//! continuation token and leaves an empty null context to the scorer (BOS only).

use std::collections::BTreeSet;
use std::path::Path;

use super::{
    choice_line, jsonl_objects, limit_and_field_notes, task_err, Choice, Example, RenderedTask,
    TaskFormat, TaskOptions,
};
use crate::error::Result;
use crate::score::ScoreRequest;

/// FIB's prompt templates (`src/data/templates.py`, `SUMMARIZATION_PROMPT_TEMPLATES`).
pub const DEFAULT_TEMPLATES: [&str; 3] = [
    "[input]",
    "The summary of \"[input]\" is ",
    "Summarize: [input]",
];

/// The placeholder a template replaces with the document.
pub const PLACEHOLDER: &str = "[input]";

struct FibExample {
    index: usize,
    input: String,
    choices: Vec<String>,
    label: usize,
}

/// Reads a FIB-style JSONL file and renders it under every template of `options`.
pub fn load(path: &Path, options: &TaskOptions) -> Result<RenderedTask> {
    if options.templates.is_empty() {
        return Err(task_err(
            path,
            "templates",
            "at least one template is needed",
        ));
    }
    for (i, t) in options.templates.iter().enumerate() {
        if !t.contains(PLACEHOLDER) {
            return Err(task_err(
                path,
                format!("templates[{i}]"),
                format!("template {t:?} has no {PLACEHOLDER} placeholder"),
            ));
        }
    }
    let mut examples = Vec::new();
    let mut ignored = BTreeSet::new();
    let lines = jsonl_objects(path)?;
    let total = lines.len();
    for (index, lineno, obj) in lines {
        let field = |name: &str| format!("line {lineno}.{name}");
        for k in obj.keys() {
            if !matches!(
                k.as_str(),
                "id" | "input" | "list_choices" | "correct_choice" | "lbl"
            ) {
                ignored.insert(k.clone());
            }
        }
        let (input, choices, label) =
            choice_line(path, lineno, &obj, "list_choices", 2, "lbl", "summary")?;
        if let Some(c) = obj.get("correct_choice") {
            if c.as_str() != Some(choices[label].as_str()) {
                return Err(task_err(
                    path,
                    field("correct_choice"),
                    "differs from list_choices[lbl]",
                ));
            }
        }
        if options.limit.is_some_and(|l| examples.len() >= l) {
            continue;
        }
        examples.push(FibExample {
            index,
            input,
            choices,
            label,
        });
    }

    let mut requests = Vec::new();
    let mut out = Vec::new();
    for (group, template) in options.templates.iter().enumerate() {
        let null_context = template.replace(PLACEHOLDER, "");
        for ex in &examples {
            let context = template.replace(PLACEHOLDER, &ex.input);
            let mut choices = Vec::with_capacity(ex.choices.len());
            for (j, text) in ex.choices.iter().enumerate() {
                let request = requests.len();
                requests.push(ScoreRequest {
                    context: context.clone(),
                    continuation: text.clone(),
                });
                let null_request = options.pmi.then(|| {
                    requests.push(ScoreRequest {
                        context: null_context.clone(),
                        continuation: text.clone(),
                    });
                    requests.len() - 1
                });
                choices.push(Choice {
                    text: text.clone(),
                    request,
                    null_request,
                    target: if j == ex.label { 1.0 } else { 0.0 },
                });
            }
            out.push(Example {
                index: ex.index,
                group,
                choices,
            });
        }
    }
    let mut notes = vec![format!(
        "median accuracy over {} templates; pmi {}; length normalisation {}",
        options.templates.len(),
        if options.pmi { "on" } else { "off" },
        options.length_norm.describe()
    )];
    limit_and_field_notes(&mut notes, examples.len(), total, ignored);
    Ok(RenderedTask {
        format: TaskFormat::Fib,
        metric: "accuracy".into(),
        requests,
        examples: out,
        groups: options.templates.clone(),
        length_norm: options.length_norm,
        notes,
    })
}
