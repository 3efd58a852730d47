//! End-to-end merges checked against naive float64 computations done here.

use crate::common::*;
use std::path::Path;

fn write(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).expect("write config");
    name.to_string()
}

/// Layer index of a tensor name (`model.layers.N.`), if any.
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

#[test]
fn linear_matches_naive_f64() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 3, &[]);
    let cfg = write(d, "lin.yaml", "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 0.5}\n  - model: ft2\n    parameters: {weight: 0.3}\n  - model: ft3\n    parameters: {weight: 0.2}\ndtype: float32\n");
    run_ok(d, &["merge", &cfg, "--out", "out", "--quiet"]);
    let out = load_dir(&d.join("out"));
    let ins: Vec<_> = (1..=3)
        .map(|i| load_dir(&d.join(format!("ft{i}"))))
        .collect();
    let w = [0.5, 0.3, 0.2];
    assert_eq!(out.len(), ins[0].len());
    for (name, t) in &out {
        let want: Vec<f64> = (0..t.values.len())
            .map(|k| (0..3).map(|m| w[m] * ins[m][name].values[k]).sum::<f64>() / 1.0)
            .collect();
        assert_eq!(t.shape, ins[0][name].shape);
        assert_close(name, &t.values, &want, 1e-6, 1e-3);
    }
    // Auxiliary files and card.
    let names = file_names(&d.join("out"));
    assert!(names.contains(&"config.json".to_string()), "{names:?}");
    let card = std::fs::read_to_string(d.join("out/README.md")).unwrap();
    assert!(card.contains("merge_method: linear"), "{card}");
}

#[test]
fn task_arithmetic_gradient_and_filter_lists() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &[]);
    // ft1: weight gradient over 4 layers; ft2: filter list. lambda at top level.
    let cfg = write(
        d,
        "ta.yaml",
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ft1\n    parameters:\n      weight: [0.0, 1.0, 0.5]\n  - model: ft2\n    parameters:\n      weight:\n        - filter: self_attn\n          value: 0.7\n        - filter: mlp\n          value: [0.2, 0.4]\n        - value: 0.1\nparameters:\n  lambda: 0.8\ndtype: float32\n",
    );
    run_ok(d, &["merge", &cfg, "--out", "out", "--quiet"]);
    let out = load_dir(&d.join("out"));
    let base = load_dir(&d.join("base"));
    let f1 = load_dir(&d.join("ft1"));
    let f2 = load_dir(&d.join("ft2"));
    let layers = 4.0f64;
    // Piecewise-linear interpolation of a list at x in [0,1], written independently.
    let interp = |list: &[f64], x: f64| -> f64 {
        let pos = x * (list.len() - 1) as f64;
        let i = pos.floor() as usize;
        let j = (i + 1).min(list.len() - 1);
        let f = pos - i as f64;
        list[i] * (1.0 - f) + list[j] * f
    };
    for (name, t) in &out {
        let x = layer_of(name).map_or(0.0, |l| l as f64 / (layers - 1.0));
        let w1 = interp(&[0.0, 1.0, 0.5], x);
        let w2 = if name.contains("self_attn") {
            0.7
        } else if name.contains("mlp") {
            interp(&[0.2, 0.4], x)
        } else {
            0.1
        };
        let want: Vec<f64> = (0..t.values.len())
            .map(|k| {
                let b = base[name].values[k];
                b + 0.8 * (w1 * (f1[name].values[k] - b) + w2 * (f2[name].values[k] - b))
            })
            .collect();
        assert_close(name, &t.values, &want, 1e-5, 1e-2);
    }
}

#[test]
fn passthrough_slices_frankenmerge() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &[]);
    let cfg = write(
        d,
        "frank.yaml",
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: ft1\n        layer_range: [0, 3]\n  - sources:\n      - model: ft2\n        layer_range: [1, 4]\ndtype: float32\n",
    );
    run_ok(d, &["merge", &cfg, "--out", "out", "--quiet"]);
    let out = load_dir(&d.join("out"));
    let f1 = load_dir(&d.join("ft1"));
    let f2 = load_dir(&d.join("ft2"));
    // Output layer l < 3 comes from ft1 layer l; l >= 3 from ft2 layer l - 2.
    for l in 0..6 {
        let (src, li) = if l < 3 { (&f1, l) } else { (&f2, l - 2) };
        let name = format!("model.layers.{l}.mlp.up_proj.weight");
        let sname = format!("model.layers.{li}.mlp.up_proj.weight");
        assert_eq!(out[&name].values, src[&sname].values, "{name}");
    }
    assert!(!out.contains_key("model.layers.6.mlp.up_proj.weight"));
    // Embeddings from the first slice's model, final norm and head from the last slice's.
    assert_eq!(
        out["model.embed_tokens.weight"].values,
        f1["model.embed_tokens.weight"].values
    );
    assert_eq!(out["lm_head.weight"].values, f2["lm_head.weight"].values);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 6);
}

#[test]
fn out_dtypes_round_to_nearest() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &[]);
    for (dt, st) in [
        ("bfloat16", safetensors::Dtype::BF16),
        ("float16", safetensors::Dtype::F16),
        ("float32", safetensors::Dtype::F32),
    ] {
        let cfg = write(d, &format!("{dt}.yaml"), &format!("merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {{weight: 1.0}}\n  - model: ft2\n    parameters: {{weight: 3.0}}\nout_dtype: {dt}\n"));
        let out_dir = format!("out-{dt}");
        run_ok(d, &["merge", &cfg, "--out", &out_dir, "--quiet"]);
        let out = load_dir(&d.join(&out_dir));
        let f1 = load_dir(&d.join("ft1"));
        let f2 = load_dir(&d.join("ft2"));
        for (name, t) in &out {
            assert_eq!(t.dtype, st, "{name}");
            let want: Vec<f64> = (0..t.values.len())
                .map(|k| {
                    let v = ((f1[name].values[k] + 3.0 * f2[name].values[k]) / 4.0) as f32;
                    match st {
                        safetensors::Dtype::BF16 => half::bf16::from_f32(v).to_f64(),
                        safetensors::Dtype::F16 => half::f16::from_f32(v).to_f64(),
                        _ => v as f64,
                    }
                })
                .collect();
            // f32 arithmetic may differ from the f64 reference in the last f32 bit, which can move
            // a value across a rounding boundary of the narrow type: allow one ulp of it.
            let ulp = match st {
                safetensors::Dtype::BF16 => 1.0 / 128.0,
                safetensors::Dtype::F16 => 1.0 / 1024.0,
                _ => 1e-6,
            };
            assert_close(name, &t.values, &want, ulp, 1e-3);
        }
    }
    // bf16 inputs merge too.
    let e = tempfile::tempdir().unwrap();
    tiny_family(e.path(), 2, &["--dtype", "bfloat16"]);
    let cfg = write(e.path(), "b.yaml", "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0}\n  - model: ft2\n    parameters: {weight: 1.0}\n");
    run_ok(e.path(), &["merge", &cfg, "--out", "out", "--quiet"]);
    let out = load_dir(&e.path().join("out"));
    assert!(out.values().all(|t| t.dtype == safetensors::Dtype::BF16));
}

#[test]
fn sharded_output_with_index() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &[]);
    let cfg = write(d, "lin.yaml", "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0}\n  - model: ft2\n    parameters: {weight: 1.0}\n");
    run_ok(d, &["merge", &cfg, "--out", "one", "--quiet"]);
    run_ok(
        d,
        &[
            "merge",
            &cfg,
            "--out",
            "many",
            "--quiet",
            "--out-shard-size",
            "100KB",
        ],
    );
    let names = file_names(&d.join("many"));
    let shards: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() >= 3, "{names:?}");
    assert!(shards[0].starts_with("model-00001-of-"), "{names:?}");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("many/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let one = load_dir(&d.join("one"));
    let many = load_dir(&d.join("many"));
    assert_eq!(one.len(), many.len());
    let mut total = 0u64;
    for (name, t) in &one {
        assert_eq!(t.values, many[name].values, "{name}");
        let file = index["weight_map"][name].as_str().expect("in weight_map");
        assert!(d.join("many").join(file).exists());
        total += (t.values.len() * 4) as u64;
    }
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    // Each file's header carries format: pt.
    for s in shards {
        let bytes = std::fs::read(d.join("many").join(s)).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(header["__metadata__"]["format"], "pt", "{s}");
    }
}

#[test]
fn deterministic_across_budgets_and_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Wide enough that a 64 MiB budget cuts the embedding into several blocks.
    tiny_family(
        d,
        3,
        &[
            "--vocab",
            "4096",
            "--hidden",
            "256",
            "--intermediate",
            "688",
            "--layers",
            "2",
        ],
    );
    for method in [
        "ties",
        "dare_ties",
        "breadcrumbs_ties",
        "della",
        "model_stock",
    ] {
        let cfg = write(d, &format!("{method}.yaml"), &format!("merge_method: {method}\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {{weight: 1.0, density: 0.6}}\n  - model: ft2\n    parameters: {{weight: 0.5, density: 0.6}}\n  - model: ft3\n    parameters: {{weight: 0.7, density: 0.6}}\nrandom_seed: 42\n"));
        let cfg = if method == "model_stock" {
            write(d, "ms.yaml", "merge_method: model_stock\nbase_model: base\nmodels:\n  - model: ft1\n  - model: ft2\n  - model: ft3\n")
        } else {
            cfg
        };
        let a = format!("{method}-a");
        let b = format!("{method}-b");
        run_ok(
            d,
            &[
                "merge",
                &cfg,
                "--out",
                &a,
                "--quiet",
                "--threads",
                "1",
                "--memory-budget",
                "2GiB",
            ],
        );
        run_ok(
            d,
            &[
                "merge",
                &cfg,
                "--out",
                &b,
                "--quiet",
                "--threads",
                "2",
                "--memory-budget",
                "64MiB",
            ],
        );
        for f in file_names(&d.join(&a)) {
            if f.ends_with(".safetensors") {
                let x = std::fs::read(d.join(&a).join(&f)).unwrap();
                let y = std::fs::read(d.join(&b).join(&f)).unwrap();
                assert!(x == y, "{method}: {f} differs between budgets/threads");
            }
        }
    }
}

#[test]
fn dry_run_prints_plan_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &[]);
    let cfg = write(d, "t.yaml", "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0, density: 0.5}\n  - model: ft2\n    parameters: {weight: 1.0, density: [0.2, 0.8]}\n");
    let out = run_ok(d, &["merge", &cfg, "--out", "out", "--dry-run"]);
    assert!(out.contains("model.layers.3.mlp.up_proj.weight"), "{out}");
    assert!(out.contains("ties"), "{out}");
    assert!(out.contains("estimated peak private memory"), "{out}");
    assert!(out.contains("density=0.8"), "{out}");
    assert!(!d.join("out").exists());
}

#[test]
fn existing_output_refused_without_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &[]);
    let cfg = write(d, "l.yaml", "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0}\n  - model: ft2\n    parameters: {weight: 1.0}\n");
    run_ok(d, &["merge", &cfg, "--out", "out", "--quiet"]);
    let err = run_err(d, &["merge", &cfg, "--out", "out", "--quiet"]);
    assert!(err.contains("--overwrite"), "{err}");
    run_ok(
        d,
        &["merge", &cfg, "--out", "out", "--quiet", "--overwrite"],
    );
}

#[test]
fn tokenizer_source_permutes_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &["--vocab", "8"]);
    let toks: Vec<String> = (0..8).map(|i| format!("tok{i}")).collect();
    // base and ft1 share the order; ft2 has the tokens reversed, and lacks tok7 (it has "other").
    write_tokenizer(&d.join("base"), &toks);
    write_tokenizer(&d.join("ft1"), &toks);
    let mut rev: Vec<String> = toks.iter().rev().cloned().collect();
    rev[0] = "other".into();
    write_tokenizer(&d.join("ft2"), &rev);
    let cfg = write(d, "tok.yaml", "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0}\n  - model: ft2\n    parameters: {weight: 1.0}\ntokenizer_source: ft1\n");
    run_ok(d, &["merge", &cfg, "--out", "out", "--quiet"]);
    let out = load_dir(&d.join("out"));
    let f1 = load_dir(&d.join("ft1"));
    let f2 = load_dir(&d.join("ft2"));
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let cols = out[name].shape[1];
        for r in 0..8 {
            // ft2's row for tok r is row 7 - r; tok7 is missing in ft2 and only ft1 has it, so
            // ft1's row stands in for ft2 (mergekit's rule).
            let row2: Vec<f64> = if r == 7 {
                f1[name].values[r * cols..(r + 1) * cols].to_vec()
            } else {
                f2[name].values[(7 - r) * cols..(8 - r) * cols].to_vec()
            };
            let want: Vec<f64> = (0..cols)
                .map(|c| (f1[name].values[r * cols + c] + row2[c]) / 2.0)
                .collect();
            assert_close(
                &format!("{name} row {r}"),
                &out[name].values[r * cols..(r + 1) * cols],
                &want,
                1e-6,
                1e-3,
            );
        }
    }
    assert!(file_names(&d.join("out")).contains(&"tokenizer.json".to_string()));
    // `base` with no base_model names the first model, as in mergekit: the same merge.
    let cfg = write(
        d,
        "tok_base.yaml",
        &std::fs::read_to_string(d.join("tok.yaml"))
            .unwrap()
            .replace("tokenizer_source: ft1", "tokenizer_source: base"),
    );
    run_ok(d, &["merge", &cfg, "--out", "out_base", "--quiet"]);
    for f in ["model.safetensors", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(d.join("out").join(f)).unwrap(),
            std::fs::read(d.join("out_base").join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn config_from_base_tokenizer_from_tokenizer_source() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &["--vocab", "8"]);
    let toks: Vec<String> = (0..8).map(|i| format!("tok{i}")).collect();
    for m in ["base", "ft1", "ft2"] {
        write_tokenizer(&d.join(m), &toks);
        std::fs::write(
            d.join(m).join("tokenizer_config.json"),
            format!("{{\"marker\": \"{m}\"}}"),
        )
        .unwrap();
    }
    let cfg = write(d, "t.yaml", "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0}\n  - model: ft2\n    parameters: {weight: 1.0}\ntokenizer_source: ft2\nchat_template: chatml\n");
    run_ok(d, &["merge", &cfg, "--out", "out", "--quiet"]);
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tc["marker"], "ft2");
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    let base_cfg = std::fs::read_to_string(d.join("base/config.json")).unwrap();
    let out_cfg = std::fs::read_to_string(d.join("out/config.json")).unwrap();
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&base_cfg).unwrap(),
        serde_json::from_str(&out_cfg).unwrap(),
    );
    assert_eq!(a["num_hidden_layers"], b["num_hidden_layers"]);
    assert_eq!(b["torch_dtype"], "float32");
}
