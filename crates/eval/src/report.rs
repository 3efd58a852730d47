//! The report of a suite run: per-task metrics, the held-in and held-out means, as JSON and as
//! a Markdown table (methods.md §17; issue 6 "held-in vs held-out").
//!
//! A split's mean is the unweighted mean of the values of its tasks that have one (a task with
//! no gradable example has no value and is left out, with a note).

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::tasks::metrics::mean;
use crate::tasks::TaskFormat;

/// Whether a task was among those the merged models were trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// A task one of the merged models was fine-tuned for.
    HeldIn,
    /// A task none of them saw (generalisation).
    HeldOut,
}

impl Split {
    /// `held_in` or `held_out`.
    pub fn name(self) -> &'static str {
        match self {
            Split::HeldIn => "held_in",
            Split::HeldOut => "held_out",
        }
    }

    /// Parses `held_in` / `held_out`.
    pub fn from_name(name: &str) -> Option<Split> {
        match name {
            "held_in" => Some(Split::HeldIn),
            "held_out" => Some(Split::HeldOut),
            _ => None,
        }
    }
}

/// The value of one group of a task (a FIB prompt template).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupValue {
    /// The group's name (the template).
    pub name: String,
    /// Its mean example value (`None` without examples).
    pub value: Option<f64>,
}

/// One task's line of the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    /// The task's name in the suite.
    pub name: String,
    /// Held-in or held-out.
    pub split: Split,
    /// The task file's format.
    pub format: TaskFormat,
    /// The metric (`multiple_choice_grade`, `accuracy`).
    pub metric: String,
    /// The metric's value (`None` when no example could be graded).
    pub value: Option<f64>,
    /// The number of examples graded (FIB: distinct examples, each under every template).
    pub examples: usize,
    /// Per-template values (FIB only; empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupValue>,
    /// What was skipped or ignored in the task file, and how it was graded.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// The report of a whole suite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// One entry per task, in suite order.
    pub tasks: Vec<TaskReport>,
    /// The mean value of the held-in tasks (`None` when there is none).
    pub held_in_mean: Option<f64>,
    /// The mean value of the held-out tasks (`None` when there is none).
    pub held_out_mean: Option<f64>,
    /// Notes about the whole run.
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Report {
    /// Builds a report from task lines, computing the split means.
    pub fn new(tasks: Vec<TaskReport>, mut notes: Vec<String>) -> Report {
        let split_mean = |split: Split| {
            let values: Vec<f64> = tasks
                .iter()
                .filter(|t| t.split == split)
                .filter_map(|t| t.value)
                .collect();
            mean(&values)
        };
        for t in tasks.iter().filter(|t| t.value.is_none()) {
            notes.push(format!(
                "task {} has no gradable example and is left out of the {} mean",
                t.name,
                t.split.name()
            ));
        }
        Report {
            held_in_mean: split_mean(Split::HeldIn),
            held_out_mean: split_mean(Split::HeldOut),
            tasks,
            notes,
        }
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| EvalError::Other(format!("cannot serialise the report: {e}")))
    }

    /// The report as a Markdown table (task | split | metric | value | n), then the split
    /// means and the notes.
    pub fn to_markdown(&self) -> String {
        let fmt = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"));
        let mut s =
            String::from("| task | split | metric | value | n |\n|---|---|---|---:|---:|\n");
        for t in &self.tasks {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                escape(&t.name),
                t.split.name(),
                t.metric,
                fmt(t.value),
                t.examples
            ));
        }
        s.push_str(&format!(
            "\nheld-in mean: {}\nheld-out mean: {}\n",
            fmt(self.held_in_mean),
            fmt(self.held_out_mean)
        ));
        let notes: Vec<String> = self
            .tasks
            .iter()
            .flat_map(|t| t.notes.iter().map(move |n| format!("{}: {n}", t.name)))
            .chain(self.notes.iter().cloned())
            .collect();
        if !notes.is_empty() {
            s.push_str("\nNotes:\n");
            for n in notes {
                s.push_str(&format!("- {}\n", n.replace('\n', " ")));
            }
        }
        s
    }
}

fn escape(cell: &str) -> String {
    cell.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str, split: Split, value: Option<f64>) -> TaskReport {
        TaskReport {
            name: name.into(),
            split,
            format: TaskFormat::Jsonl,
            metric: "accuracy".into(),
            value,
            examples: 4,
            groups: vec![],
            notes: vec![],
        }
    }

    #[test]
    fn split_means_and_round_trip() {
        let r = Report::new(
            vec![
                task("a", Split::HeldIn, Some(0.5)),
                task("b", Split::HeldIn, Some(1.0)),
                task("c", Split::HeldIn, None),
            ],
            vec![],
        );
        assert_eq!(r.held_in_mean, Some(0.75));
        assert_eq!(r.held_out_mean, None);
        assert_eq!(r.notes.len(), 1);
        let json = r.to_json().expect("json");
        assert!(json.contains("\"held_out_mean\": null"));
        assert!(json.contains("\"split\": \"held_in\""));
        let back: Report = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, r);
        let md = r.to_markdown();
        assert!(md.starts_with("| task | split | metric | value | n |\n"));
        assert!(md.contains("| a | held_in | accuracy | 0.5000 | 4 |\n"));
        assert!(md.contains("| c | held_in | accuracy | n/a | 4 |\n"));
        assert!(md.contains("held-in mean: 0.7500\nheld-out mean: n/a\n"));
    }
}
