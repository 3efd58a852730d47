//! `amalgam study` end to end: a pool of seeded perturbations of the tiny Llama fixture, a tiny
//! generated two-task suite, linear and task arithmetic (a λ grid, one bad value) at 2 and 3
//! models; the CSV checked against merges run directly, the plots decoded, resuming checked.

use crate::common::{run_err, run_ok, start_service, start_workers, write_model_stats};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A "fine-tune" of the tiny Llama: every weight plus `scale`·u, u uniform in [-1, 1) from a
/// seeded LCG (independent of the code under test).
fn perturbed(src: &Path, dst: &Path, seed: u64, scale: f32) {
    std::fs::create_dir_all(dst).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut data: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), Dtype::F32);
        let out: Vec<u8> = view
            .data()
            .chunks_exact(4)
            .flat_map(|b| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                (x + scale * u).to_le_bytes()
            })
            .collect();
        data.insert(name.to_string(), (view.shape().to_vec(), out));
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, (s, d))| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
}

const COLOURS: &[(&str, &[&str], usize)] = &[
    (
        "The sky on a clear day is",
        &[" blue", " green", " loud"],
        0,
    ),
    ("Grass is usually", &[" purple", " green"], 1),
    ("Snow is", &[" white", " black", " square"], 0),
    ("A ripe banana is", &[" blue", " yellow"], 1),
];
const FACTS: &[(&str, &[&str], usize)] = &[
    ("Two plus two is", &[" four", " seven"], 0),
    ("The opposite of hot is", &[" cold", " tall", " green"], 0),
    ("A week has seven", &[" apples", " days"], 1),
    ("Fish live in", &[" water", " trees"], 0),
];

fn jsonl(path: &Path, rows: &[(&str, &[&str], usize)]) {
    let text: String = rows
        .iter()
        .map(|(i, c, l)| {
            format!(
                "{}\n",
                serde_json::json!({"input": i, "choices": c, "label": l})
            )
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

/// A minimal CSV reader (quoted fields allowed) into header-keyed rows.
fn read_csv(path: &Path) -> Vec<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let (mut row, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    let mut it = text.chars().peekable();
    while let Some(c) = it.next() {
        match (quoted, c) {
            (true, '"') if it.peek() == Some(&'"') => {
                it.next();
                cur.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cur.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut cur)),
            (false, '\n') => {
                row.push(std::mem::take(&mut cur));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => cur.push(c),
        }
    }
    let header = rows.remove(0);
    rows.into_iter()
        .map(|r| {
            assert_eq!(r.len(), header.len());
            header.iter().cloned().zip(r).collect()
        })
        .collect()
}

/// Width and height from a PNG's signature and IHDR chunk (read by hand).
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

fn f(row: &BTreeMap<String, String>, col: &str) -> f64 {
    row[col]
        .parse()
        .unwrap_or_else(|_| panic!("{col} = {:?}", row[col]))
}

#[test]
fn a_study_runs_resumes_and_matches_direct_merges() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base = repo().join("tests/fixtures/tiny_lm/llama");
    let names = ["ft_a", "ft_b", "ft_c"];
    for (i, n) in names.iter().enumerate() {
        perturbed(&base, &d.join(n), i as u64 + 1, 0.02);
        // Synthetic statistics (kind "synthetic", 10 examples): Gram matrices for RegMean.
        write_model_stats(d, n, i as u64 + 1);
    }
    jsonl(&d.join("colours.jsonl"), COLOURS);
    jsonl(&d.join("facts.jsonl"), FACTS);
    std::fs::write(
        d.join("suite.yaml"),
        "batch_size: 4\ntasks:\n  - {name: colours, path: colours.jsonl, format: jsonl, split: held_in}\n  - {name: facts, path: facts.jsonl, format: jsonl, split: held_out}\n",
    )
    .unwrap();
    let study = format!(
        "base_model: {}\npool:\n  - {{model: ft_a, statistics: ft_a.stats.safetensors}}\n  - {{model: ft_b, statistics: ft_b.stats.safetensors}}\n  - {{model: ft_c, statistics: ft_c.stats.safetensors}}\nmethods:\n  - merge_method: linear\n  - merge_method: task_arithmetic\n    parameters: {{lambda: [0.5, 1.0, \"bad\"]}}\n  - merge_method: regmean\ncounts: [2, 3]\nsubsets: {{max_per_count: 2}}\nevaluation: {{suite: suite.yaml}}\ndtype: float32\n",
        base.display()
    );
    std::fs::write(d.join("study.yaml"), study).unwrap();
    let started = std::time::Instant::now();
    let out = run_ok(d, &["study", "study.yaml", "--out", "out"]);
    eprintln!("study took {:.1} s", started.elapsed().as_secs_f64());
    // 5 settings × (2 subsets of 2 + 1 of 3) = 15 merges; the 3 with lambda "bad" fail.
    assert!(out.contains("skipped 0 finished merges"), "{out}");
    assert!(out.contains("ran 15 merges, 3 failed"), "{out}");

    let rows = read_csv(&d.join("out/results.csv"));
    assert_eq!(rows.len(), 15);
    for r in &rows {
        let bad = r["hyperparameters"] == "lambda=bad";
        assert_eq!(r["status"], if bad { "failed" } else { "ok" }, "{r:?}");
        if bad {
            assert!(r["error"].contains("merge"), "{r:?}");
            continue;
        }
        for col in ["held_in", "held_out", "task:colours", "task:facts"] {
            let v = f(r, col);
            assert!((0.0..=1.0).contains(&v), "{col} {v}");
        }
        assert!(f(r, "merge_secs") > 0.0 && f(r, "eval_secs") > 0.0);
        assert!(f(r, "merge_peak_bytes") > 1e6 && f(r, "eval_peak_bytes") > 1e6);
        assert!(f(r, "flops") > 0.0);
        // Inputs: each merged model's weights (the base's too for task arithmetic).
        let size = |p: &Path| {
            std::fs::metadata(p.join("model.safetensors"))
                .unwrap()
                .len() as f64
        };
        let mut read: f64 = r["models"].split(';').map(|m| size(&d.join(m))).sum();
        if r["method"] == "task_arithmetic" {
            read += size(&base);
        }
        if r["method"] == "regmean" {
            // The statistics files are read too; 10 forward passes per model; their mean size.
            let stats: Vec<f64> = r["models"]
                .split(';')
                .map(|m| {
                    let p = d.join(format!("{m}.stats.safetensors"));
                    std::fs::metadata(p).unwrap().len() as f64
                })
                .collect();
            read += stats.iter().sum::<f64>();
            assert_eq!(f(r, "stats_forward_passes"), 10.0 * f(r, "count"));
            assert_eq!(f(r, "stats_backward_passes"), 0.0);
            let mean = stats.iter().sum::<f64>() / stats.len() as f64;
            assert!((f(r, "stats_bytes_per_model") - mean).abs() <= 1.0, "{r:?}");
        } else {
            assert_eq!(f(r, "stats_forward_passes"), 0.0);
            assert_eq!(f(r, "stats_bytes_per_model"), 0.0);
        }
        assert_eq!(f(r, "bytes_read"), read, "{r:?}");
        // f32 output of the same shapes: the base's size up to the header.
        let written = f(r, "bytes_written");
        assert!((written - size(&base)).abs() < 4096.0, "{written}");
    }
    let counts: Vec<&str> = rows.iter().map(|r| r["count"].as_str()).collect();
    assert_eq!(counts.iter().filter(|c| **c == "2").count(), 10);

    // Two rows against merges run directly from hand-written configs.
    let row_of = |method: &str, hp: &str, count: &str| {
        rows.iter()
            .find(|r| r["method"] == method && r["hyperparameters"] == hp && r["count"] == count)
            .unwrap()
            .clone()
    };
    for (row, header) in [
        (row_of("linear", "", "3"), "merge_method: linear\nparameters: {weight: 1.0}\n".to_string()),
        (
            row_of("task_arithmetic", "lambda=0.5", "2"),
            format!(
                "merge_method: task_arithmetic\nbase_model: {}\nparameters: {{weight: 1.0, lambda: 0.5}}\n",
                base.display()
            ),
        ),
    ] {
        let models: String = row["models"]
            .split(';')
            .map(|m| format!("  - model: {}\n", d.join(m).display()))
            .collect();
        let cfg = d.join(format!("direct_{}.yaml", row["key"]));
        std::fs::write(&cfg, format!("{header}dtype: float32\nmodels:\n{models}")).unwrap();
        let merged = d.join(format!("direct_{}", row["key"]));
        let report = d.join(format!("direct_{}.json", row["key"]));
        run_ok(
            d,
            &["merge", cfg.to_str().unwrap(), "--out", merged.to_str().unwrap()],
        );
        run_ok(
            d,
            &[
                "eval",
                "--model",
                merged.to_str().unwrap(),
                "--suite",
                "suite.yaml",
                "--out",
                report.to_str().unwrap(),
            ],
        );
        let rep: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(rep["held_in_mean"].as_f64().unwrap(), f(&row, "held_in"));
        assert_eq!(rep["held_out_mean"].as_f64().unwrap(), f(&row, "held_out"));
        for task in rep["tasks"].as_array().unwrap() {
            let name = task["name"].as_str().unwrap();
            assert_eq!(
                task["value"].as_f64().unwrap(),
                f(&row, &format!("task:{name}"))
            );
        }
    }

    // Plots: valid PNGs of the expected size, not one colour.
    let plots = [
        "quality_held_in.png",
        "quality_held_out.png",
        "cost_time.png",
        "cost_flops.png",
        "held_in_vs_held_out.png",
    ];
    let report = std::fs::read_to_string(d.join("out/report.md")).unwrap();
    for p in plots {
        let path = d.join("out/plots").join(p);
        assert_eq!(png_size(&std::fs::read(&path).unwrap()), (900, 600), "{p}");
        let (_, _, colours) = amalgam_study::plots::png_summary(&path).unwrap();
        assert!(colours > 10, "{p}: {colours} colours");
        assert!(
            report.contains(&format!("](plots/{p})")),
            "{p} not in the report"
        );
    }
    assert!(report.contains("## Best setting per method"), "{report}");
    assert!(report.contains("| linear | (defaults) |"), "{report}");

    // Resuming: nothing runs again; a removed record runs again alone.
    let again = run_ok(d, &["study", "study.yaml", "--out", "out"]);
    assert!(again.contains("skipped 15 finished merges"), "{again}");
    assert!(again.contains("ran 0 merges"), "{again}");
    let key = &rows[0]["key"];
    std::fs::remove_file(d.join("out/runs").join(format!("{key}.json"))).unwrap();
    let third = run_ok(d, &["study", "study.yaml", "--out", "out"]);
    assert!(third.contains("skipped 14 finished merges"), "{third}");
    assert!(third.contains("ran 1 merges"), "{third}");
    let rows3 = read_csv(&d.join("out/results.csv"));
    assert_eq!(rows3.len(), 15);
    assert_eq!(
        rows3[0]["held_out"], rows[0]["held_out"],
        "deterministic rerun"
    );

    // The same merge again, sent to a long-lived coordinator (`amalgam submit`): same scores.
    let (i, ok_row) = rows
        .iter()
        .enumerate()
        .find(|(_, r)| r["status"] == "ok")
        .unwrap();
    let ok_key = &ok_row["key"];
    std::fs::remove_file(d.join("out/runs").join(format!("{ok_key}.json"))).unwrap();
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();
    let (_coord, url) = start_service(d, &[]);
    let _worker = start_workers(d, &url, 1);
    let fourth = run_ok(
        d,
        &[
            "study",
            "study.yaml",
            "--out",
            "out",
            "--coordinator",
            &url,
            "--token-file",
            "token",
        ],
    );
    assert!(fourth.contains("ran 1 merges, 3 failed"), "{fourth}");
    // The merge really ran there.
    let st = run_ok(
        d,
        &["status", "--coordinator", &url, "--token-file", "token"],
    );
    assert!(!st.contains(" 0/0 shards"), "{st}");
    let rows4 = read_csv(&d.join("out/results.csv"));
    for col in ["held_in", "held_out", "task:colours", "task:facts"] {
        assert_eq!(rows4[i][col], rows[i][col], "{col} through the coordinator");
    }

    // SIGTERM to the study mid-way: it stops its child, exits 130 and records no failure for
    // the interrupted merge; run again, it finishes with the first run's scores.
    let mut child = crate::common::amalgam()
        .current_dir(d)
        .args(["study", "study.yaml", "--out", "out_int", "--quiet"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let runs = d.join("out_int/runs");
    let records = || {
        std::fs::read_dir(&runs)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.ends_with(".json") && !n.ends_with(".eval.json")
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while records() < 2 {
        assert!(child.try_wait().unwrap().is_none(), "the study ended first");
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let res = child.wait_with_output().unwrap();
    assert_eq!(
        res.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for e in std::fs::read_dir(&runs).unwrap().filter_map(|e| e.ok()) {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".json") && !n.ends_with(".eval.json") {
            let rec: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap();
            let bad = rec["hyperparameters"] == "lambda=bad";
            assert_eq!(rec["status"] == "ok", !bad, "{n}: {rec}");
        }
    }
    let again = run_ok(d, &["study", "study.yaml", "--out", "out_int"]);
    assert!(again.contains(", 3 failed in all"), "{again}");
    let rows_int = read_csv(&d.join("out_int/results.csv"));
    assert_eq!(rows_int.len(), rows.len());
    for (a, b) in rows_int.iter().zip(&rows) {
        for col in ["key", "status", "held_in", "held_out"] {
            assert_eq!(a[col], b[col], "{col} after an interrupted run");
        }
    }

    // A suite task that cannot be read fails the study before any merge, naming the file.
    std::fs::write(
        d.join("suite_missing.yaml"),
        "tasks:\n  - {name: colours, path: colours.jsonl, format: jsonl, split: held_in}\n  - {name: gone, path: gone.jsonl, format: jsonl, split: held_out}\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(d.join("study.yaml")).unwrap();
    std::fs::write(
        d.join("study_missing.yaml"),
        text.replace("suite: suite.yaml", "suite: suite_missing.yaml"),
    )
    .unwrap();
    let e = run_err(d, &["study", "study_missing.yaml", "--out", "out_missing"]);
    assert!(e.contains("gone.jsonl"), "{e}");
    assert!(!d.join("out_missing").exists());
}
