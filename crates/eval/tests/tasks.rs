//! Tasks, suites and reports against hand-worked grades and BIG-bench's own rendering.
//!
//! Scores come from a table scorer: a fixed (context, continuation) → (logprob, tokens) map
//! written in the test; a request missing from the table fails the test, so the table also checks
//! the rendered prompts. The expected grades are worked by hand in the comments.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use amalgam_eval::report::Split;
use amalgam_eval::score::score_all;
use amalgam_eval::suite::{PreparedSuite, Suite};
use amalgam_eval::tasks::{load_task, LengthNorm, RenderedTask, TaskFormat, TaskOptions};
use amalgam_eval::{EvalError, ScoreRequest, Scored, Scorer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Scores requests from a fixed table.
#[derive(Default)]
struct Table(HashMap<(String, String), Scored>);

impl Table {
    fn put(&mut self, context: &str, continuation: &str, logprob: f64, tokens: u32) {
        self.0.insert(
            (context.to_string(), continuation.to_string()),
            Scored { logprob, tokens },
        );
    }
}

impl Scorer for Table {
    fn score_batch(&mut self, batch: &[ScoreRequest]) -> amalgam_eval::error::Result<Vec<Scored>> {
        Ok(batch
            .iter()
            .map(|r| {
                *self
                    .0
                    .get(&(r.context.clone(), r.continuation.clone()))
                    .unwrap_or_else(|| panic!("unexpected request {r:?}"))
            })
            .collect())
    }
}

fn score(table: &mut Table, requests: &[ScoreRequest]) -> Vec<Scored> {
    score_all(table, requests, 3, |_| {}).expect("scores")
}

fn golden(name: &str) -> serde_json::Value {
    let p = fixtures()
        .join("bigbench_golden")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).expect("golden")).expect("golden json")
}

/// (context, continuations) of each rendered example, in order.
fn rendered(task: &RenderedTask) -> Vec<(String, Vec<String>)> {
    task.examples
        .iter()
        .map(|e| {
            let ctx = task.requests[e.choices[0].request].context.clone();
            for c in &e.choices {
                assert_eq!(task.requests[c.request].context, ctx);
                assert_eq!(task.requests[c.request].continuation, c.text);
            }
            (ctx, e.choices.iter().map(|c| c.text.clone()).collect())
        })
        .collect()
}

fn golden_examples(g: &serde_json::Value) -> Vec<(String, Vec<String>)> {
    g["examples"]
        .as_array()
        .expect("examples")
        .iter()
        .map(|e| {
            (
                e["context"].as_str().expect("context").to_string(),
                e["continuations"]
                    .as_array()
                    .expect("continuations")
                    .iter()
                    .map(|c| c.as_str().expect("str").to_string())
                    .collect(),
            )
        })
        .collect()
}

fn bb_options() -> TaskOptions {
    TaskOptions::defaults(TaskFormat::Bigbench)
}

const SHIPPED: [&str; 8] = [
    "anachronisms",
    "analogical_similarity",
    "date_understanding",
    "disambiguation_qa",
    "epistemic_reasoning",
    "navigate",
    "snarks",
    "sports_understanding",
];

#[test]
fn shipped_tasks_render_like_bigbench() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/bigbench");
    for name in SHIPPED {
        let g = golden(name);
        let task = load_task(
            &data.join(name).join("task.json"),
            TaskFormat::Bigbench,
            &bb_options(),
        )
        .expect(name);
        // Every shipped example is multiple choice, so all of BIG-bench's de-duplicated
        // examples are graded.
        assert_eq!(
            task.examples.len() as u64,
            g["distinct_examples"].as_u64().expect("count"),
            "{name}"
        );
        let want = golden_examples(&g);
        assert_eq!(&rendered(&task)[..want.len()], &want[..], "{name}");
        // And with a limit, the same first examples.
        let mut o = bb_options();
        o.limit = Some(2);
        let t2 =
            load_task(&data.join(name).join("task.json"), TaskFormat::Bigbench, &o).expect(name);
        assert_eq!(rendered(&t2), want[..2].to_vec(), "{name}");
    }
}

#[test]
fn handmade_task_renders_like_bigbench() {
    let task = load_task(
        &fixtures().join("eval_tasks/bb_handmade/task.json"),
        TaskFormat::Bigbench,
        &bb_options(),
    )
    .expect("load");
    let g = golden("handmade");
    assert_eq!(rendered(&task), golden_examples(&g));
    // The duplicate (file example 2) is dropped; indices are file positions.
    let idx: Vec<usize> = task.examples.iter().map(|e| e.index).collect();
    assert_eq!(idx, vec![0, 1, 3, 4, 5, 6]);
    assert!(task.notes.iter().any(|n| n.contains("1 duplicate")));
    assert!(task
        .notes
        .iter()
        .any(|n| n.contains("ignored fields: comment")));
    assert!(task
        .notes
        .iter()
        .any(|n| n.contains("ignored example fields: comment")));
}

/// The hand-made task's scores, keyed by the contexts BIG-bench rendered (the golden).
fn handmade_table(table: &mut Table) {
    let g = golden_examples(&golden("handmade"));
    // (continuation, logprob, tokens) per example, in golden order.
    let rows: [&[(&str, f64, u32)]; 6] = [
        // 2 + 2: none → "4" (−1 > −1.5): 1; per token → "22" (−0.75): 0; power 0.5 →
        // −1.5/√2 = −1.06 < −1 → "4": 1.
        &[("4", -1.0, 1), ("5", -2.0, 1), ("22", -1.5, 2)],
        // sky: "grey" wins → 0.5 (all one token).
        &[
            ("blue", -3.0, 1),
            ("green", -4.0, 1),
            ("red", -5.0, 1),
            ("grey", -2.0, 1),
            ("black", -6.0, 1),
        ],
        // letters: "b" wins → 1.
        &[
            ("a", -2.0, 1),
            ("b", -1.0, 1),
            ("c", -2.0, 1),
            ("d", -2.0, 1),
            ("e", -2.0, 1),
            ("f", -2.0, 1),
            ("g", -2.0, 1),
        ],
        // tie: the first choice in target_scores order ("yes", score 0) → 0.
        &[("yes", -1.0, 1), ("no", -1.0, 1)],
        // one choice → 1.
        &[("sure", -7.0, 3)],
        // "e" (−0.5) beats "é" → 0.
        &[
            ("é", -1.0, 1),
            ("e", -0.5, 1),
            ("Z", -3.0, 1),
            ("ß", -3.0, 1),
        ],
    ];
    for ((ctx, conts), row) in g.iter().zip(rows) {
        assert_eq!(conts.len(), row.len());
        for (c, lp, n) in row {
            table.put(ctx, c, *lp, *n);
        }
    }
}

#[test]
fn handmade_bigbench_grade() {
    let path = fixtures().join("eval_tasks/bb_handmade/task.json");
    let mut table = Table::default();
    handmade_table(&mut table);
    let mut grade = |norm: LengthNorm| {
        let mut o = bb_options();
        o.length_norm = norm;
        let task = load_task(&path, TaskFormat::Bigbench, &o).expect("load");
        let scores = score(&mut table, &task.requests);
        task.grade(&scores).expect("grade")
    };
    // none: (1 + 0.5 + 1 + 0 + 1 + 0) / 6
    let g = grade(LengthNorm::None);
    assert!((g.value.expect("value") - 3.5 / 6.0).abs() < 1e-12);
    let preds: Vec<usize> = g.examples.iter().map(|e| e.prediction).collect();
    assert_eq!(preds, vec![0, 3, 1, 0, 0, 1]);
    assert!(!g.examples[1].correct && g.examples[1].value == 0.5);
    // per token: example 0 flips to "22" (0): 2.5 / 6
    let g = grade(LengthNorm::PerToken);
    assert!((g.value.expect("value") - 2.5 / 6.0).abs() < 1e-12);
    assert_eq!(g.examples[0].prediction, 2);
    // power 0.5: "4" again
    let g = grade(LengthNorm::Power(0.5));
    assert!((g.value.expect("value") - 3.5 / 6.0).abs() < 1e-12);
}

#[test]
fn mixed_bigbench_task_skips_with_notes() {
    let path = fixtures().join("eval_tasks/bb_mixed/task.json");
    let task = load_task(&path, TaskFormat::Bigbench, &bb_options()).expect("load");
    assert_eq!(task.examples.len(), 2);
    assert_eq!(task.requests.len(), 4);
    // Default prefixes, choices appended (2 choices: permutation(2) = [1, 0] → sorted reversed).
    assert_eq!(
        task.requests[0].context,
        "\nQ: A or B?\n  choice: B\n  choice: A\nA: "
    );
    let notes = task.notes.join("\n");
    for want in [
        "1 generative examples",
        "metrics not computed (only multiple_choice_grade is): bleu, exact_str_match",
        "ignored fields: contributors",
        "ignored example fields: comment",
    ] {
        assert!(notes.contains(want), "missing note {want:?} in\n{notes}");
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(&p, text).expect("write");
    p
}

fn task_error(r: Result<RenderedTask, EvalError>) -> (PathBuf, String, String) {
    match r {
        Err(EvalError::Task { path, field, msg }) => (path, field, msg),
        Err(e) => panic!("expected a task error, got {e}"),
        Ok(_) => panic!("expected a task error"),
    }
}

#[test]
fn malformed_bigbench_files_name_file_and_field() {
    let dir = tempfile::tempdir().expect("tmp");
    let ex = |extra: &str| {
        format!(
            r#"{{"name": "t", "metrics": ["multiple_choice_grade"], "examples": [
            {{"input": "a", "target_scores": {{"x": 1, "y": 0}}}},
            {{"input": "b", "target_scores": {{"x": 1, "y": 0}}}},
            {{"input": "c", "target_scores": {{"x": 1, "y": 0}}}},
            {extra}]}}"#
        )
    };
    let cases = [
        (
            ex(r#"{"input": "d", "target_scores": {"x": "one"}}"#),
            "examples[3].target_scores[\"x\"]",
        ),
        (
            ex(r#"{"input": "d", "target_scores": []}"#),
            "examples[3].target_scores",
        ),
        (
            ex(r#"{"input": "d", "target_scores": {"x": 1, "y": 1}}"#),
            "examples[3].target_scores",
        ),
        (ex(r#"{"target_scores": {"x": 1}}"#), "examples[3].input"),
        (ex(r#"{"input": "d"}"#), "examples[3]"),
        (ex(r#""just text""#), "examples[3]"),
        (
            r#"{"name": "t", "examples": [], "example_input_prefix": 3}"#.to_string(),
            "example_input_prefix",
        ),
        (
            r#"{"name": "t", "examples": [], "append_choices_to_input": "yes"}"#.to_string(),
            "append_choices_to_input",
        ),
        (r#"{"name": "t"}"#.to_string(), "examples"),
        (r#"{"name": "t", "examples": [}"#.to_string(), "(file)"),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let p = write(dir.path(), &format!("bad{i}/task.json"), text);
        let (path, f, msg) = task_error(load_task(&p, TaskFormat::Bigbench, &bb_options()));
        assert_eq!(path, p);
        assert_eq!(&f, field, "case {i}: {msg}");
        let shown = EvalError::Task {
            path,
            field: f,
            msg,
        }
        .to_string();
        assert!(
            shown.contains(&format!("bad{i}/task.json: {field}: ")),
            "{shown}"
        );
    }
}

/// FIB contexts for the three default templates and the fixture's documents.
fn fib_table(table: &mut Table) {
    let docs = ["Doc one.", "Doc two.", "Doc three."];
    let t = |k: usize, doc: &str| match k {
        0 => doc.to_string(),
        1 => format!("The summary of \"{doc}\" is "),
        _ => format!("Summarize: {doc}"),
    };
    // Conditional sums; A_k has 2 tokens, B_k 4.
    //            T0 (A, B)      T1 (A, B)      T2 (A, B)
    let cond = [
        [(-2.0, -6.0), (-1.0, -8.0), (-1.0, -8.0)], // d1, lbl 0
        [(-2.0, -6.0), (-1.0, -8.0), (-4.0, -2.0)], // d2, lbl 1
        [(-4.0, -4.0), (-1.0, -8.0), (-1.0, -8.0)], // d3, lbl 0
    ];
    // Null-input sums (same for every template): per token A1 −1, B1 −3, A2 −3, B2 −1,
    // A3 −1, B3 −1.
    let null = [(-2.0, -12.0), (-6.0, -4.0), (-2.0, -4.0)];
    for (e, doc) in docs.iter().enumerate() {
        let a = format!("Sum A{}", e + 1);
        let b = format!("Sum B{}", e + 1);
        for (k, &(ca, cb)) in cond[e].iter().enumerate() {
            table.put(&t(k, doc), &a, ca, 2);
            table.put(&t(k, doc), &b, cb, 4);
            table.put(&t(k, ""), &a, null[e].0, 2);
            table.put(&t(k, ""), &b, null[e].1, 4);
        }
    }
}

#[test]
fn fib_median_over_templates_with_and_without_pmi() {
    let path = fixtures().join("eval_tasks/fib_pairs.jsonl");
    assert_eq!(TaskFormat::detect(&path).expect("detect"), TaskFormat::Fib);
    let mut table = Table::default();
    fib_table(&mut table);
    let run = |pmi: bool, norm: LengthNorm, table: &mut Table| {
        let mut o = TaskOptions::defaults(TaskFormat::Fib);
        assert_eq!(o.length_norm, LengthNorm::PerToken);
        assert!(o.pmi);
        o.pmi = pmi;
        o.length_norm = norm;
        let task = load_task(&path, TaskFormat::Fib, &o).expect("load");
        assert_eq!(task.distinct_examples(), 3);
        assert_eq!(task.requests.len(), 3 * 3 * if pmi { 4 } else { 2 });
        let scores = score(table, &task.requests);
        task.grade(&scores).expect("grade")
    };
    let close = |a: Option<f64>, b: f64| (a.expect("value") - b).abs() < 1e-12;
    // Per token, no PMI:
    //  T0: d1 A −1 vs B −1.5 → A ✓; d2 A −1 vs −1.5 → A ✗; d3 −2 vs −1 → B ✗  = 1/3
    //  T1: d1 −0.5 vs −2 → A ✓; d2 → A ✗; d3 → A ✓                             = 2/3
    //  T2: d1 ✓; d2 −2 vs −0.5 → B ✓; d3 ✓                                       = 1
    //  median 2/3
    let g = run(false, LengthNorm::PerToken, &mut table);
    assert!(close(g.group_values[0], 1.0 / 3.0));
    assert!(close(g.group_values[1], 2.0 / 3.0));
    assert!(close(g.group_values[2], 1.0));
    assert!(close(g.value, 2.0 / 3.0));
    // Per token with PMI (score − null score):
    //  T0: d1 A 0, B 1.5 → B ✗; d2 A 2, B −0.5 → A ✗; d3 A −1, B 0 → B ✗     = 0
    //  T1: d1 A 0.5, B 1 → B ✗; d2 A 2.5, B −1 → A ✗; d3 A 0.5, B −1 → A ✓   = 1/3
    //  T2: d1 A 0.5, B 1 → B ✗; d2 A 1, B 0.5 → A ✗; d3 A 0.5, B −1 → A ✓    = 1/3
    //  median 1/3
    let g = run(true, LengthNorm::PerToken, &mut table);
    assert!(close(g.group_values[0], 0.0));
    assert!(close(g.value, 1.0 / 3.0));
    // Sums, no PMI: T0: d1 ✓, d2 A ✗, d3 tie → first (A) ✓ = 2/3; T1 = 2/3; T2 = 1 → 2/3
    let g = run(false, LengthNorm::None, &mut table);
    assert!(close(g.group_values[0], 2.0 / 3.0));
    assert_eq!(g.examples[2].prediction, 0);
    assert!(close(g.value, 2.0 / 3.0));
}

#[test]
fn fib_templates_and_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = fixtures().join("eval_tasks/fib_pairs.jsonl");
    let mut o = TaskOptions::defaults(TaskFormat::Fib);
    o.templates = vec!["Text: [input]\nSummary:".into()];
    o.limit = Some(1);
    let task = load_task(&path, TaskFormat::Fib, &o).expect("load");
    assert_eq!(task.requests.len(), 4);
    assert_eq!(task.requests[0].context, "Text: Doc one.\nSummary:");
    assert_eq!(task.requests[0].continuation, "Sum A1");
    assert_eq!(task.requests[1].context, "Text: \nSummary:");
    o.templates = vec!["no placeholder".into()];
    assert_eq!(
        task_error(load_task(&path, TaskFormat::Fib, &o)).1,
        "templates[0]"
    );

    let o = TaskOptions::defaults(TaskFormat::Fib);
    let cases = [
        (
            r#"{"input": "d", "list_choices": ["a", "b"], "lbl": 2}"#,
            "line 2.lbl",
        ),
        (
            r#"{"input": "d", "list_choices": ["a"], "lbl": 0}"#,
            "line 2.list_choices",
        ),
        (
            r#"{"input": "d", "list_choices": ["a", 3], "lbl": 0}"#,
            "line 2.list_choices[1]",
        ),
        (r#"{"list_choices": ["a", "b"], "lbl": 0}"#, "line 2.input"),
        (
            r#"{"input": "d", "list_choices": ["a", "b"], "lbl": 1, "correct_choice": "a"}"#,
            "line 2.correct_choice",
        ),
        (r#"{"input": "d", "#, "line 2"),
    ];
    for (i, (line, field)) in cases.iter().enumerate() {
        let text = format!(
            "{{\"input\": \"ok\", \"list_choices\": [\"a\", \"b\"], \"lbl\": 0}}\n{line}\n"
        );
        let p = write(dir.path(), &format!("f{i}.jsonl"), &text);
        assert_eq!(
            &task_error(load_task(&p, TaskFormat::Fib, &o)).1,
            field,
            "case {i}"
        );
    }
}

fn plain_table(table: &mut Table) {
    table.put("The capital of France is", " Paris", -1.0, 1);
    table.put("The capital of France is", " Rome", -2.0, 1);
    table.put("2 + 3 =", " 5", -3.0, 1);
    table.put("2 + 3 =", " 6", -2.0, 1);
    table.put("2 + 3 =", " 7", -4.0, 1);
    table.put("Opposite of hot:", " cold", -4.0, 2);
    table.put("Opposite of hot:", " warm", -3.0, 1);
}

#[test]
fn plain_jsonl_accuracy() {
    let path = fixtures().join("eval_tasks/plain.jsonl");
    assert_eq!(
        TaskFormat::detect(&path).expect("detect"),
        TaskFormat::Jsonl
    );
    let mut table = Table::default();
    plain_table(&mut table);
    let mut o = TaskOptions::defaults(TaskFormat::Jsonl);
    assert_eq!(o.length_norm, LengthNorm::None);
    let task = load_task(&path, TaskFormat::Jsonl, &o).expect("load");
    assert!(task.notes.iter().any(|n| n == "ignored fields: source"));
    let s = score(&mut table, &task.requests);
    // Paris ✓; "6" ✗; none: warm (−3 > −4) ✗ → 1/3
    assert_eq!(task.grade(&s).expect("grade").value, Some(1.0 / 3.0));
    // per token: cold −2 > warm −3 ✓ → 2/3
    o.length_norm = LengthNorm::PerToken;
    let task = load_task(&path, TaskFormat::Jsonl, &o).expect("load");
    assert_eq!(task.grade(&s).expect("grade").value, Some(2.0 / 3.0));

    let dir = tempfile::tempdir().expect("tmp");
    for (i, (line, field)) in [
        (
            r#"{"input": "x", "choices": ["a"], "label": 1}"#,
            "line 1.label",
        ),
        (
            r#"{"input": "x", "choices": [], "label": 0}"#,
            "line 1.choices",
        ),
        (
            r#"{"input": "x", "choices": ["a"], "label": -1}"#,
            "line 1.label",
        ),
        (r#"[1, 2]"#, "line 1"),
    ]
    .iter()
    .enumerate()
    {
        let p = write(dir.path(), &format!("j{i}.jsonl"), line);
        assert_eq!(&task_error(load_task(&p, TaskFormat::Jsonl, &o)).1, field);
    }
}

fn suite_table() -> Table {
    let mut t = Table::default();
    handmade_table(&mut t);
    fib_table(&mut t);
    plain_table(&mut t);
    t
}

#[test]
fn suite_runs_grades_and_dumps() {
    let suite = Suite::load(&fixtures().join("eval_tasks/suite.yaml")).expect("suite");
    assert_eq!(suite.batch_size(), 4);
    let names: Vec<&str> = suite.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["bb_handmade", "pairs", "plain"]);
    let prepared = PreparedSuite::prepare(&suite).expect("prepare");
    // 3+5+7+2+1+4 BIG-bench, 3 templates × 3 × 2 FIB, 7 plain.
    assert_eq!(prepared.requests().len(), 22 + 18 + 7);
    let mut table = suite_table();
    let scores =
        score_all(&mut table, prepared.requests(), suite.batch_size(), |_| {}).expect("scores");
    let report = prepared.grade(&scores).expect("grade");
    let vals: Vec<f64> = report
        .tasks
        .iter()
        .map(|t| t.value.expect("value"))
        .collect();
    // handmade 3.5/6 (none); pairs 2/3 (per token, no PMI); plain 2/3 (per token).
    assert!((vals[0] - 3.5 / 6.0).abs() < 1e-12);
    assert!((vals[1] - 2.0 / 3.0).abs() < 1e-12);
    assert!((vals[2] - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(report.tasks[1].split, Split::HeldOut);
    assert_eq!(report.tasks[1].examples, 3);
    assert_eq!(report.tasks[1].groups.len(), 3);
    assert_eq!(report.tasks[0].examples, 6);
    let held_in = (3.5 / 6.0 + 2.0 / 3.0) / 2.0;
    assert!((report.held_in_mean.expect("in") - held_in).abs() < 1e-12);
    assert!((report.held_out_mean.expect("out") - 2.0 / 3.0).abs() < 1e-12);
    let md = report.to_markdown();
    assert!(
        md.contains("| pairs | held_out | accuracy | 0.6667 | 3 |"),
        "{md}"
    );

    // Same numbers whatever the batch size (the table scorer is batch-independent).
    let one = score_all(&mut table, prepared.requests(), 1, |_| {}).expect("scores");
    assert_eq!(prepared.grade(&one).expect("grade"), report);
    assert!(prepared.grade(&scores[1..]).is_err());

    let mut out = Vec::new();
    prepared.dump_scores(&scores, &mut out).expect("dump");
    let text = String::from_utf8(out).expect("utf8");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 6 + 9 + 3);
    let first = &lines[0];
    assert_eq!(first["task"], "bb_handmade");
    assert_eq!(first["split"], "held_in");
    assert_eq!(first["example"], 0);
    assert_eq!(first["prediction"], 0);
    assert_eq!(first["target"], 1.0);
    assert_eq!(first["correct"], true);
    assert_eq!(first["choices"][2]["text"], "22");
    assert_eq!(first["choices"][2]["logprob"], -1.5);
    assert_eq!(first["choices"][2]["tokens"], 2);
    let sky = &lines[1];
    assert_eq!(sky["prediction"], 3);
    assert_eq!(sky["target"], 0.5);
    assert_eq!(sky["correct"], false);
    let fib = &lines[6];
    assert_eq!(fib["task"], "pairs");
    assert_eq!(fib["template"], "[input]");
    assert_eq!(fib["choices"][1]["score"], -1.5);
    assert!(fib["choices"][0].get("null_logprob").is_none());
    assert_eq!(lines[17]["task"], "plain");
    assert_eq!(lines[17]["example"], 2);
}

fn suite_err(yaml: &str) -> (String, String) {
    match Suite::from_yaml_str(yaml, &fixtures().join("eval_tasks"), Path::new("s.yaml")) {
        Err(EvalError::Task { path, field, msg }) => {
            assert_eq!(path, Path::new("s.yaml"));
            (field, msg)
        }
        Err(e) => panic!("expected a task error, got {e}"),
        Ok(_) => panic!("expected an error for {yaml}"),
    }
}

#[test]
fn suite_errors_name_the_key() {
    let (f, m) = suite_err("tasks: [{path: plain.jsonl, split: held_in}]\nbatch: 3\n");
    assert_eq!(f, "batch");
    assert!(m.contains("unknown key"), "{m}");
    let (f, _) = suite_err("tasks: [{path: plain.jsonl, split: held_in, limt: 3}]");
    assert_eq!(f, "tasks[0].limt");
    assert_eq!(
        suite_err("tasks: [{path: plain.jsonl}]").0,
        "tasks[0].split"
    );
    assert_eq!(
        suite_err("tasks: [{path: plain.jsonl, split: train}]").0,
        "tasks[0].split"
    );
    assert_eq!(suite_err("tasks: [{split: held_in}]").0, "tasks[0].path");
    assert_eq!(
        suite_err("tasks: [{path: plain.jsonl, split: held_in, format: csv}]").0,
        "tasks[0].format"
    );
    assert_eq!(
        suite_err("tasks: [{path: p.json, split: held_in, format: bigbench, pmi: true}]").0,
        "tasks[0].pmi"
    );
    assert_eq!(
        suite_err("tasks: [{path: p.jsonl, split: held_in, length_normalization: power}]").0,
        "tasks[0].length_alpha"
    );
    assert_eq!(
        suite_err("tasks: [{path: p.jsonl, split: held_in, length_normalization: sqrt}]").0,
        "tasks[0].length_normalization"
    );
    assert_eq!(
        suite_err("tasks: [{path: p.jsonl, split: held_in, limit: -1}]").0,
        "tasks[0].limit"
    );
    assert_eq!(
        suite_err("tasks: [{path: a.jsonl, split: held_in}, {path: b/a.jsonl, split: held_out}]").0,
        "tasks[1].name"
    );
    assert_eq!(suite_err("tasks: []").0, "tasks");
    assert_eq!(
        suite_err("batch_size: 0\ntasks: [{path: a.jsonl, split: held_in}]").0,
        "batch_size"
    );
    assert_eq!(
        suite_err("tasks: [{path: a.jsonl, split: held_in}").0,
        "(file)"
    );

    // Accepted: power with alpha, fib options, limit.
    let s = Suite::from_yaml_str(
        "tasks:\n  - path: fib_pairs.jsonl\n    split: held_out\n    limit: 2\n    \
         length_normalization: power\n    length_alpha: 0.5\n    templates: ['[input] TL;DR:']\n",
        &fixtures().join("eval_tasks"),
        Path::new("s.yaml"),
    )
    .expect("suite");
    assert_eq!(s.batch_size(), 8);
    assert_eq!(s.tasks[0].length_norm, Some(LengthNorm::Power(0.5)));
    let p = PreparedSuite::prepare(&s).expect("prepare");
    // 2 examples × 2 choices × (cond + null).
    assert_eq!(p.requests().len(), 8);
    assert_eq!(p.requests()[0].context, "Doc one. TL;DR:");
    assert_eq!(p.requests()[1].context, " TL;DR:");

    // templates on a task whose format is inferred as non-fib fail at prepare.
    let s = Suite::from_yaml_str(
        "tasks: [{path: plain.jsonl, split: held_in, templates: ['[input]']}]",
        &fixtures().join("eval_tasks"),
        Path::new("s.yaml"),
    )
    .expect("suite");
    match PreparedSuite::prepare(&s) {
        Err(EvalError::Task { field, .. }) => assert_eq!(field, "tasks[0].templates"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("expected an error"),
    }
}

/// Every choice scores the same: the tie-break picks each example's first choice.
struct Constant;

impl Scorer for Constant {
    fn score_batch(&mut self, batch: &[ScoreRequest]) -> amalgam_eval::error::Result<Vec<Scored>> {
        Ok(vec![
            Scored {
                logprob: -1.0,
                tokens: 1
            };
            batch.len()
        ])
    }
}

#[test]
fn shipped_suite_first_choice_grade() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/bigbench");
    let suite = Suite::load(&data.join("suite-all.yaml")).expect("suite");
    let prepared = PreparedSuite::prepare(&suite).expect("prepare");
    let scores = score_all(&mut Constant, prepared.requests(), 8, |_| {}).expect("scores");
    let report = prepared.grade(&scores).expect("grade");
    assert_eq!(report.tasks.len(), 8);
    for (t, name) in report.tasks.iter().zip(SHIPPED) {
        assert_eq!(t.name, name);
        assert_eq!(t.examples, 50);
        // Expected: the mean over the first 50 distinct examples of the first target score.
        let text = std::fs::read_to_string(data.join(name).join("task.json")).expect("read");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<f64> = v["examples"]
            .as_array()
            .expect("examples")
            .iter()
            .filter(|e| seen.insert(e.to_string()))
            .take(50)
            .map(|e| {
                let ts = e["target_scores"].as_object().expect("target_scores");
                ts.values().next().and_then(|x| x.as_f64()).expect("score")
            })
            .collect();
        let want = firsts.iter().sum::<f64>() / 50.0;
        assert!((t.value.expect("value") - want).abs() < 1e-12, "{name}");
        assert!(t.notes.iter().any(|n| n.contains("first 50 of")), "{name}");
    }
}
