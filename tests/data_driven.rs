//! Data-driven methods end to end: statistics files written here, merges checked against naive
//! float64 computations done here.

use crate::common::*;
use amalgam_io::{write_stats, Checkpoint, StatKey, StatKind, StatsMeta};
use std::path::Path;

fn read_stat(dir: &Path, model: &str, key: &str) -> Vec<f64> {
    let bytes = std::fs::read(dir.join(format!("{model}.stats.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(key)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect()
}

/// Solve A X = B (A n x n, B n x m, row-major) by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<f64>, mut b: Vec<f64>, n: usize, m: usize) -> Vec<f64> {
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i * n + c].abs().total_cmp(&a[j * n + c].abs()))
            .unwrap();
        for k in 0..n {
            a.swap(c * n + k, p * n + k);
        }
        for k in 0..m {
            b.swap(c * m + k, p * m + k);
        }
        for r in 0..n {
            if r != c {
                let f = a[r * n + c] / a[c * n + c];
                for k in 0..n {
                    a[r * n + k] -= f * a[c * n + k];
                }
                for k in 0..m {
                    b[r * m + k] -= f * b[c * m + k];
                }
            }
        }
    }
    for r in 0..n {
        for k in 0..m {
            b[r * m + k] /= a[r * n + r];
        }
    }
    b
}

fn setup(d: &Path) {
    tiny_family(
        d,
        2,
        &[
            "--hidden",
            "16",
            "--intermediate",
            "24",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--vocab",
            "32",
            "--layers",
            "2",
        ],
    );
    write_model_stats(d, "ft1", 1);
    write_model_stats(d, "ft2", 2);
}

const STATS_MODELS: &str = "models:\n  - model: ft1\n    statistics: ft1.stats.safetensors\n  - model: ft2\n    statistics: ft2.stats.safetensors\n";

#[test]
fn regmean_solves_linear_weights_and_averages_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    std::fs::write(
        d.join("rm.yaml"),
        format!("merge_method: regmean\n{STATS_MODELS}"),
    )
    .unwrap();
    let plan = run_ok(d, &["merge", "rm.yaml", "--out", "out", "--dry-run"]);
    assert!(plan.contains("linear (avg)"), "{plan}");
    run_ok(d, &["merge", "rm.yaml", "--out", "out", "--quiet"]);
    let out = load_dir(&d.join("out"));
    let f1 = load_dir(&d.join("ft1"));
    let f2 = load_dir(&d.join("ft2"));
    // A solved weight: W* ᵀ = (G1 + G2)⁻¹ (G1 W1ᵀ + G2 W2ᵀ).
    let name = "model.layers.1.mlp.up_proj.weight";
    let (dout, din) = (out[name].shape[0], out[name].shape[1]);
    let g1 = read_stat(d, "ft1", &format!("{name}::gram_in"));
    let g2 = read_stat(d, "ft2", &format!("{name}::gram_in"));
    let a: Vec<f64> = g1.iter().zip(&g2).map(|(x, y)| x + y).collect();
    let mut b = vec![0f64; din * dout];
    for i in 0..din {
        for o in 0..dout {
            for k in 0..din {
                b[i * dout + o] += g1[i * din + k] * f1[name].values[o * din + k]
                    + g2[i * din + k] * f2[name].values[o * din + k];
            }
        }
    }
    let xt = solve(a, b, din, dout);
    let want: Vec<f64> = (0..dout * din)
        .map(|e| xt[(e % din) * dout + e / din])
        .collect();
    assert_close(name, &out[name].values, &want, 1e-4, 1e-2);
    // A norm is averaged.
    let norm = "model.layers.0.input_layernorm.weight";
    let avg: Vec<f64> = f1[norm]
        .values
        .iter()
        .zip(&f2[norm].values)
        .map(|(x, y)| (x + y) / 2.0)
        .collect();
    assert_close(norm, &out[norm].values, &avg, 1e-6, 1e-3);
}

#[test]
fn fisher_is_the_fisher_weighted_mean() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    std::fs::write(
        d.join("f.yaml"),
        format!("merge_method: fisher\n{STATS_MODELS}"),
    )
    .unwrap();
    run_ok(d, &["merge", "f.yaml", "--out", "out", "--quiet"]);
    let out = load_dir(&d.join("out"));
    let f1 = load_dir(&d.join("ft1"));
    let f2 = load_dir(&d.join("ft2"));
    for (name, t) in &out {
        let a = read_stat(d, "ft1", &format!("{name}::fisher"));
        let b = read_stat(d, "ft2", &format!("{name}::fisher"));
        let want: Vec<f64> = (0..t.values.len())
            .map(|k| (a[k] * f1[name].values[k] + b[k] * f2[name].values[k]) / (a[k] + b[k]))
            .collect();
        assert_close(name, &t.values, &want, 1e-5, 1e-3);
    }
}

#[test]
fn missing_statistics_name_the_model_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    // ft2 has no statistics file at all.
    std::fs::write(d.join("m.yaml"), "merge_method: regmean\nmodels:\n  - model: ft1\n    statistics: ft1.stats.safetensors\n  - model: ft2\n").unwrap();
    let e = run_err(d, &["merge", "m.yaml", "--out", "out"]);
    assert!(e.contains("gram_in") && e.contains("_proj.weight"), "{e}");
    assert!(final_outputs(&d.join("out")).is_empty());
    // Statistics computed for another model: the recorded header hash does not match.
    let ck = Checkpoint::open(&d.join("ft1")).unwrap();
    let t = &ck.tensors()[0];
    let f = vec![1f32; t.shape.iter().product()];
    let mut meta = StatsMeta::new("synthetic", 1, 1);
    meta.model_header_sha256 = Some("0".repeat(64));
    write_stats(
        &d.join("other.stats.safetensors"),
        &meta,
        &[(
            StatKey::new(t.name.clone(), StatKind::Fisher, t.shape.clone()),
            f.as_slice(),
        )],
        true,
    )
    .unwrap();
    std::fs::write(d.join("w.yaml"), "merge_method: fisher\nmodels:\n  - model: ft1\n    statistics: other.stats.safetensors\n  - model: ft2\n    statistics: ft2.stats.safetensors\n").unwrap();
    let e = run_err(d, &["merge", "w.yaml", "--out", "out"]);
    assert!(
        e.contains("other.stats.safetensors") && e.contains("ft1"),
        "{e}"
    );
    assert!(final_outputs(&d.join("out")).is_empty());
}

#[test]
fn svd_methods_run_end_to_end_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 3, &[]);
    for m in ["tsv", "iso_c", "iso_cts"] {
        std::fs::write(d.join(format!("{m}.yaml")), format!("merge_method: {m}\nbase_model: base\nmodels:\n  - model: ft1\n  - model: ft2\n  - model: ft3\n")).unwrap();
        run_ok(
            d,
            &[
                "merge",
                &format!("{m}.yaml"),
                "--out",
                &format!("{m}-a"),
                "--quiet",
                "--threads",
                "1",
            ],
        );
        run_ok(
            d,
            &[
                "merge",
                &format!("{m}.yaml"),
                "--out",
                &format!("{m}-b"),
                "--quiet",
                "--threads",
                "2",
                "--memory-budget",
                "64MiB",
            ],
        );
        let a = std::fs::read(d.join(format!("{m}-a/model.safetensors"))).unwrap();
        let b = std::fs::read(d.join(format!("{m}-b/model.safetensors"))).unwrap();
        assert!(a == b, "{m}: output depends on threads or budget");
    }
}

#[test]
fn mats_gram_converges_to_regmean_and_logs_every_block() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    std::fs::write(
        d.join("rm.yaml"),
        format!("merge_method: regmean\n{STATS_MODELS}"),
    )
    .unwrap();
    std::fs::write(
        d.join("mats.yaml"),
        format!("merge_method: mats\nbase_model: base\n{STATS_MODELS}parameters:\n  iterations: 200\n  rtol: 1.0e-10\n"),
    )
    .unwrap();
    run_ok(d, &["merge", "rm.yaml", "--out", "rm", "--quiet"]);
    run_ok(d, &["merge", "mats.yaml", "--out", "mats", "--quiet"]);
    let rm = load_dir(&d.join("rm"));
    let mats = load_dir(&d.join("mats"));
    let name = "model.layers.0.self_attn.q_proj.weight";
    assert_close(name, &mats[name].values, &rm[name].values, 1e-4, 1e-2);
    let log = std::fs::read_to_string(d.join("mats/solver_log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // One record per solved linear weight: 7 per layer, 2 layers.
    assert_eq!(lines.len(), 14, "{log}");
    for l in &lines {
        assert_eq!(l["method"], "mats");
        assert!(
            l["tensor"].as_str().unwrap().ends_with("_proj.weight"),
            "{l}"
        );
        assert!(
            l.get("exit_code").is_some() || l.get("info").is_some(),
            "{l}"
        );
    }
}

/// Write a one-file f32 checkpoint holding `tensors` (name, shape, values).
fn write_f32_checkpoint(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

fn solver_log(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("solver_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const MATS_SOLUTION: &str =
    "merge_method: mats\nbase_model: base\nout_dtype: float32\nparameters:\n  iterations: 300\n  rtol: 1.0e-10\n";

#[test]
fn mats_init_checkpoint_at_the_solution_takes_no_step() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    std::fs::write(d.join("sol.yaml"), format!("{MATS_SOLUTION}{STATS_MODELS}")).unwrap();
    run_ok(d, &["merge", "sol.yaml", "--out", "sol", "--quiet"]);
    // Start from the converged solution (a checkpoint directory): no block takes a step.
    std::fs::write(
        d.join("again.yaml"),
        format!(
            "merge_method: mats\nbase_model: base\nout_dtype: float32\n{STATS_MODELS}parameters:\n  \
             init: sol\n  iterations: 50\n  rtol: 1.0e-4\n"
        ),
    )
    .unwrap();
    run_ok(d, &["merge", "again.yaml", "--out", "again", "--quiet"]);
    let (sol, again) = (load_dir(&d.join("sol")), load_dir(&d.join("again")));
    let log = solver_log(&d.join("again"));
    assert_eq!(log.len(), 14);
    for l in &log {
        assert_eq!(l["iterations"], 0, "{l}");
        assert_eq!(l["exit_code"], 0, "{l}");
        assert_eq!(l["init"], "sol", "{l}");
        let name = l["tensor"].as_str().unwrap();
        assert_eq!(again[name].values, sol[name].values, "{name}");
    }
    // The same through a single safetensors file.
    let all: Vec<(String, Vec<usize>, Vec<f32>)> = sol
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.shape.clone(),
                t.values.iter().map(|v| *v as f32).collect(),
            )
        })
        .collect();
    write_f32_checkpoint(&d.join("init.safetensors"), &all);
    let cfg = std::fs::read_to_string(d.join("again.yaml"))
        .unwrap()
        .replace("init: sol", "init: init.safetensors");
    std::fs::write(d.join("file.yaml"), cfg).unwrap();
    run_ok(d, &["merge", "file.yaml", "--out", "file", "--quiet"]);
    for l in solver_log(&d.join("file")) {
        assert_eq!(l["iterations"], 0, "{l}");
    }
}

#[test]
fn mats_init_checkpoint_errors_name_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let cfg = |init: &str| {
        format!(
            "merge_method: mats\nbase_model: base\n{STATS_MODELS}parameters:\n  init: {init}\n  \
             iterations: 5\n"
        )
    };
    let q = "model.layers.0.self_attn.q_proj.weight";
    // Every tensor of ft1, as f32; one variant reshaped, one holding a NaN.
    let ft1 = load_dir(&d.join("ft1"));
    type Edit<'a> = &'a dyn Fn(&str, &mut Vec<usize>, &mut Vec<f32>);
    let tensors = |edit: Edit<'_>| {
        let all: Vec<(String, Vec<usize>, Vec<f32>)> = ft1
            .iter()
            .map(|(n, t)| {
                let mut shape = t.shape.clone();
                let mut v: Vec<f32> = t.values.iter().map(|x| *x as f32).collect();
                edit(n, &mut shape, &mut v);
                (n.clone(), shape, v)
            })
            .collect();
        all
    };
    write_f32_checkpoint(
        &d.join("reshaped.safetensors"),
        &tensors(&|n, s, _| {
            if n == q {
                *s = vec![1, s.iter().product()];
            }
        }),
    );
    write_f32_checkpoint(
        &d.join("nan.safetensors"),
        &tensors(&|n, _, v| {
            if n == q {
                v[3] = f32::NAN;
            }
        }),
    );
    for (init, want) in [
        (
            "ft1.stats.safetensors",
            vec![
                "`init`",
                "ft1.stats.safetensors",
                "has no tensor",
                "_proj.weight",
            ],
        ),
        (
            "reshaped.safetensors",
            vec!["`init`", "reshaped.safetensors", q, "shape [1, "],
        ),
        (
            "nan.safetensors",
            vec![
                "`init`",
                "nan.safetensors",
                q,
                "non-finite value (NaN) at element 3",
            ],
        ),
        (
            "task_arithmatic",
            vec![
                "`init`",
                "task_arithmatic",
                "neither a named initialisation",
            ],
        ),
    ] {
        std::fs::write(d.join("bad.yaml"), cfg(init)).unwrap();
        // Refused before any work: the dry run fails too, and no output directory appears.
        for args in [
            &["merge", "bad.yaml", "--out", "bad", "--quiet"][..],
            &["merge", "bad.yaml", "--out", "bad", "--dry-run"][..],
        ] {
            let err = run_err(d, args);
            for w in &want {
                assert!(err.contains(w), "{init}: `{w}` not in {err}");
            }
        }
        assert!(!d.join("bad").exists());
    }
}

#[test]
fn mats_max_block_bytes_splits_blocks_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    split_mats_family(d);
    let cfg = |extra: &str| {
        format!(
            "merge_method: mats\nbase_model: base\n{STATS_MODELS}parameters:\n  iterations: 6\n{extra}"
        )
    };
    std::fs::write(d.join("whole.yaml"), cfg("")).unwrap();
    std::fs::write(d.join("split.yaml"), cfg("  max_block_bytes: 1000\n")).unwrap();
    run_ok(d, &["merge", "whole.yaml", "--out", "whole", "--quiet"]);
    run_ok(d, &["merge", "split.yaml", "--out", "split", "--quiet"]);
    let (w, s) = (load_dir(&d.join("whole")), load_dir(&d.join("split")));
    assert_eq!(w.len(), s.len());
    for (name, t) in &w {
        assert_eq!(t.values, s[name].values, "{name}");
    }
    let parts = |dir: &str| -> std::collections::BTreeMap<String, u64> {
        solver_log(&d.join(dir))
            .iter()
            .map(|l| {
                (
                    l["tensor"].as_str().unwrap().to_string(),
                    l["parts"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let (pw, ps) = (parts("whole"), parts("split"));
    let up = "model.layers.0.mlp.up_proj.weight";
    let down = "model.layers.0.mlp.down_proj.weight";
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert!(pw.values().all(|p| *p == 1), "{pw:?}");
    // [256, 128]: 128-row parts; [128, 256]: 64-row parts; [128, 128] is one chunk: one part.
    assert_eq!((ps[up], ps[down], ps[q]), (2, 2, 1), "{ps:?}");
    let dry = run_ok(d, &["merge", "split.yaml", "--out", "never", "--dry-run"]);
    let line = dry.lines().find(|l| l.starts_with(up)).unwrap();
    assert!(line.contains("parts=2"), "{dry}");
    // An explicit cg_parts wins.
    std::fs::write(
        d.join("forced.yaml"),
        cfg("  cg_parts: 3\n  max_block_bytes: 1000\n"),
    )
    .unwrap();
    run_ok(d, &["merge", "forced.yaml", "--out", "forced", "--quiet"]);
    assert!(parts("forced").values().all(|p| *p == 3));
}
