//! `amalgam eval` as a user runs it: one process, worker processes over real gRPC, and the
//! `evaluation:` section of a merge config, on the committed tiny Llama fixture.

use crate::common::{run_err, run_ok};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(rel: &str) -> String {
    repo().join(rel).display().to_string()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn eval(dir: &Path, name: &str, extra: &[&str]) -> (serde_json::Value, String) {
    let out = dir.join(format!("{name}.json"));
    let dump = dir.join(format!("{name}.jsonl"));
    let model = fixture("tests/fixtures/tiny_lm/llama");
    let suite = fixture("tests/fixtures/eval_suite/suite.yaml");
    let mut args = vec![
        "eval",
        "--model",
        &model,
        "--suite",
        &suite,
        "--out",
        out.to_str().unwrap(),
        "--dump-scores",
        dump.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_ok(dir, &args);
    let report: serde_json::Value = serde_json::from_str(&read(&out)).unwrap();
    assert!(out.with_extension("md").exists(), "the Markdown report");
    (report, read(&dump))
}

#[test]
fn workers_score_exactly_what_one_process_scores() {
    let t = tempfile::tempdir().unwrap();
    let (local, local_dump) = eval(t.path(), "local", &[]);
    // Two worker processes leasing one batch at a time over gRPC.
    let (dist, dist_dump) = eval(
        t.path(),
        "dist",
        &["--workers", "2", "--batches-per-shard", "1"],
    );
    assert_eq!(local, dist, "reports differ");
    assert_eq!(local_dump, dist_dump, "per-example scores differ");
    // Every request of the suite was scored: 12 + 6 BIG-bench examples and 5 JSONL ones.
    assert_eq!(local_dump.lines().count(), 12 + 6 + 5);
    let tasks = local["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3);
    for t in tasks {
        let v = t["value"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{t}");
    }
    let held_in = local["held_in_mean"].as_f64().unwrap();
    assert_eq!(held_in, tasks[0]["value"].as_f64().unwrap());
    let held_out = local["held_out_mean"].as_f64().unwrap();
    let want = (tasks[1]["value"].as_f64().unwrap() + tasks[2]["value"].as_f64().unwrap()) / 2.0;
    assert!((held_out - want).abs() < 1e-12, "{held_out} vs {want}");
}

#[test]
fn a_merge_config_evaluates_its_output() {
    let t = tempfile::tempdir().unwrap();
    let model = fixture("tests/fixtures/tiny_lm/llama");
    let suite = fixture("tests/fixtures/eval_suite/suite.yaml");
    // The average of a model with a copy of itself is the model, bit for bit, so the merged
    // model's evaluation equals the fixture's.
    let copy = t.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    let cfg = format!(
        "merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 0.5}}\n  - model: copy\n    parameters: {{weight: 0.5}}\nevaluation:\n  suite: {suite}\n  dump_scores: scores.jsonl\n"
    );
    std::fs::write(t.path().join("merge.yaml"), cfg).unwrap();
    let stdout = run_ok(t.path(), &["merge", "merge.yaml", "--out", "merged"]);
    assert!(stdout.contains("evaluation written to"), "{stdout}");
    let merged: serde_json::Value =
        serde_json::from_str(&read(&t.path().join("merged/evaluation.json"))).unwrap();
    let (direct, direct_dump) = eval(t.path(), "direct", &[]);
    assert_eq!(merged["tasks"], direct["tasks"]);
    assert_eq!(read(&t.path().join("merged/scores.jsonl")), direct_dump);
}

#[test]
fn bad_inputs_are_named() {
    let t = tempfile::tempdir().unwrap();
    let suite = fixture("tests/fixtures/eval_suite/suite.yaml");
    let missing = t.path().join("nowhere");
    let err = run_err(
        t.path(),
        &[
            "eval",
            "--model",
            missing.to_str().unwrap(),
            "--suite",
            &suite,
            "--out",
            "r.json",
        ],
    );
    assert!(err.contains("nowhere"), "{err}");
    // A suite naming a task file that does not parse.
    std::fs::write(
        t.path().join("bad.json"),
        "{\"examples\": [{\"input\": 3}]}",
    )
    .unwrap();
    std::fs::write(
        t.path().join("suite.yaml"),
        "tasks:\n  - name: bad\n    path: bad.json\n    format: bigbench\n    split: held_in\n",
    )
    .unwrap();
    let model = fixture("tests/fixtures/tiny_lm/llama");
    let err = run_err(
        t.path(),
        &[
            "eval",
            "--model",
            &model,
            "--suite",
            "suite.yaml",
            "--out",
            "r.json",
        ],
    );
    assert!(
        err.contains("bad.json") && err.contains("examples[0]"),
        "{err}"
    );
    assert!(!t.path().join("r.json").exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn statistics_from_data_feed_a_regmean_merge() {
    let t = tempfile::tempdir().unwrap();
    let model = repo().join("tests/fixtures/tiny_lm/llama");
    let data = fixture("tests/fixtures/tiny_lm/stats_data.jsonl");
    copy_dir(&model, &t.path().join("a"));
    copy_dir(&model, &t.path().join("b"));
    for m in ["a", "b"] {
        let out = run_ok(
            t.path(),
            &[
                "stats",
                "--model",
                m,
                "--data",
                &data,
                "--kind",
                "gram",
                "--out",
                &format!("{m}.gram.safetensors"),
            ],
        );
        assert!(out.contains("from 7 examples"), "{out}");
    }
    // Refuses to replace a statistics file without --overwrite.
    let err = run_err(
        t.path(),
        &[
            "stats",
            "--model",
            "a",
            "--data",
            &data,
            "--kind",
            "gram",
            "--out",
            "a.gram.safetensors",
        ],
    );
    assert!(err.contains("--overwrite"), "{err}");
    // The Grams are the reference's (an independent float64 torch computation).
    let got = crate::common::load_dir_file(&t.path().join("a.gram.safetensors"));
    let want = crate::common::load_dir_file(
        &repo().join("tests/fixtures/tiny_lm/stats_ref/kfac.safetensors"),
    );
    let mut grams = 0;
    for (k, w) in want.iter().filter(|(k, _)| k.ends_with("::gram_in")) {
        let g = &got[k];
        let scale = w.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        crate::common::assert_close(k, &g.values, &w.values, 1e-4, scale * 0.1);
        grams += 1;
    }
    assert_eq!(
        grams,
        2 * 7 + 1,
        "every linear layer of 2 layers, and the head"
    );
    // RegMean of a model with an identical copy under identical statistics is the model (alpha
    // 0.9 keeps the rank-deficient Grams of 111 positions positive definite).
    std::fs::write(
        t.path().join("m.yaml"),
        "merge_method: regmean\nparameters:\n  alpha: 0.9\nmodels:\n  - model: a\n    statistics: a.gram.safetensors\n  - model: b\n    statistics: b.gram.safetensors\n",
    )
    .unwrap();
    run_ok(t.path(), &["merge", "m.yaml", "--out", "merged"]);
    let merged = crate::common::load_dir(&t.path().join("merged"));
    let orig = crate::common::load_dir(&model);
    assert_eq!(merged.len(), orig.len());
    for (k, w) in &orig {
        crate::common::assert_close(k, &merged[k].values, &w.values, 1e-4, 1e-2);
    }
}

#[test]
fn statistics_on_workers_equal_one_process() {
    let t = tempfile::tempdir().unwrap();
    let model = fixture("tests/fixtures/tiny_lm/llama");
    let data = fixture("tests/fixtures/tiny_lm/stats_data.jsonl");
    let args = |out: &'static str| {
        vec![
            "stats", "--model", &model, "--data", &data, "--kind", "fisher", "--chunk", "2",
            "--out", out,
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let local = args("local.safetensors");
    run_ok(
        t.path(),
        &local.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut dist = args("dist.safetensors");
    dist.extend(["--workers".to_string(), "2".to_string()]);
    let out = run_ok(
        t.path(),
        &dist.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(out.contains("from 7 examples"), "{out}");
    // Four chunks of 2, 2, 2, 1 examples over two worker processes: the same bytes.
    let a = std::fs::read(t.path().join("local.safetensors")).unwrap();
    let b = std::fs::read(t.path().join("dist.safetensors")).unwrap();
    assert!(a == b, "the statistics files differ");
}

#[test]
fn a_worker_killed_mid_evaluation_costs_only_its_batches() {
    use crate::common::{url_of, Proc};
    let t = tempfile::tempdir().unwrap();
    let (local, local_dump) = eval(t.path(), "local", &[]);
    let model = fixture("tests/fixtures/tiny_lm/llama");
    let suite = fixture("tests/fixtures/eval_suite/suite.yaml");
    let mut coord = Proc::start(
        t.path(),
        &[
            "eval",
            "--model",
            &model,
            "--suite",
            &suite,
            "--out",
            "dist.json",
            "--dump-scores",
            "dist.jsonl",
            "--listen",
            "127.0.0.1:0",
            "--lease-ttl",
            "1",
            "--batches-per-shard",
            "1",
        ],
        &[],
    );
    let url = url_of(&coord.line_with("listening on"));
    // This worker hangs while sending its first result (a test hook), holding its lease, and
    // is killed: the lease expires and another worker redoes that batch.
    let pid_file = t.path().join("paused.pid");
    let _paused = Proc::start(
        t.path(),
        &["worker", "--coordinator", &url],
        &[
            ("AMALGAM_TEST_PAUSE_AFTER_BYTES", "1"),
            ("AMALGAM_TEST_PAUSE_PID_FILE", pid_file.to_str().unwrap()),
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let pid = loop {
        if let Ok(s) = std::fs::read_to_string(&pid_file) {
            if !s.trim().is_empty() {
                break s.trim().to_string();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never paused"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let st = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    let mut worker = Proc::start(t.path(), &["worker", "--coordinator", &url], &[]);
    worker.wait_ok();
    coord.wait_ok();
    let dist: serde_json::Value = serde_json::from_str(&read(&t.path().join("dist.json"))).unwrap();
    assert_eq!(dist, local);
    assert_eq!(read(&t.path().join("dist.jsonl")), local_dump);
}

#[test]
fn generate_from_perturbs_the_matrices_of_a_real_model() {
    let t = tempfile::tempdir().unwrap();
    let model = fixture("tests/fixtures/tiny_lm/llama");
    run_ok(
        t.path(),
        &[
            "generate",
            "ft",
            "--from",
            &model,
            "--delta-scale",
            "0.02",
            "--delta-seed",
            "3",
        ],
    );
    let orig = crate::common::load_dir(&repo().join("tests/fixtures/tiny_lm/llama"));
    let ft = crate::common::load_dir(&t.path().join("ft"));
    assert_eq!(
        orig.keys().collect::<Vec<_>>(),
        ft.keys().collect::<Vec<_>>()
    );
    for (k, o) in &orig {
        let f = &ft[k];
        assert_eq!(o.shape, f.shape, "{k}");
        let max = o
            .values
            .iter()
            .zip(&f.values)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max);
        if o.shape.len() < 2 {
            assert_eq!(max, 0.0, "{k}: vectors are copied");
        } else {
            assert!(max > 0.0 && max <= 0.02 + 1e-6, "{k}: {max}");
        }
    }
    for f in ["config.json", "tokenizer.json"] {
        assert_eq!(
            read(&t.path().join("ft").join(f)),
            read(&repo().join("tests/fixtures/tiny_lm/llama").join(f))
        );
    }
    // The copy is a model amalgam can evaluate.
    let suite = fixture("tests/fixtures/eval_suite/suite.yaml");
    run_ok(
        t.path(),
        &[
            "eval", "--model", "ft", "--suite", &suite, "--out", "ft.json",
        ],
    );
}
