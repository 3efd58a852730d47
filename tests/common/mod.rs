//! Helpers for the process tests: running the binary, generating models, reading outputs.
#![allow(dead_code)]

mod proc;
mod stats;
pub use proc::{http_get, start_service, start_workers, url_of, Proc};
pub use stats::{split_mats_family, write_model_stats};

use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The freshly built binary.
pub fn amalgam() -> Command {
    Command::new(env!("CARGO_BIN_EXE_amalgam"))
}

/// Run the binary with `args` in `cwd`; returns the output.
pub fn run(cwd: &Path, args: &[&str]) -> Output {
    amalgam()
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("amalgam runs")
}

/// Run and require success, returning stdout.
pub fn run_ok(cwd: &Path, args: &[&str]) -> String {
    let out = run(cwd, args);
    assert!(
        out.status.success(),
        "amalgam {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run and require failure, returning stderr.
pub fn run_err(cwd: &Path, args: &[&str]) -> String {
    let out = run(cwd, args);
    assert!(
        !out.status.success(),
        "amalgam {args:?} should have failed:\nstdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Generate a synthetic model with `amalgam generate`.
pub fn generate(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["generate", p.to_str().expect("utf8 path"), "--overwrite"];
    args.extend_from_slice(extra);
    run_ok(dir, &args);
    p
}

/// A base and `n` fine-tunes (`ft1`..) of the default tiny shape under `dir`.
pub fn tiny_family(dir: &Path, n: usize, extra: &[&str]) {
    let mut base_args = vec!["--seed", "5"];
    base_args.extend_from_slice(extra);
    generate(dir, "base", &base_args);
    for i in 1..=n {
        let ds = format!("{}", 100 + i);
        let scale = format!("{}", 0.01 * i as f32);
        let mut a = vec![
            "--seed",
            "5",
            "--delta-seed",
            &ds,
            "--delta-scale",
            &scale,
            "--delta-density",
            "0.7",
        ];
        a.extend_from_slice(extra);
        generate(dir, &format!("ft{i}"), &a);
    }
}

fn to_f64(dtype: Dtype, data: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// One tensor read back independently (with the `safetensors` crate).
#[derive(Debug, Clone)]
pub struct Loaded {
    /// dtype.
    pub dtype: Dtype,
    /// shape.
    pub shape: Vec<usize>,
    /// values as f64.
    pub values: Vec<f64>,
}

/// Every tensor of one safetensors file.
pub fn load_dir_file(file: &Path) -> BTreeMap<String, Loaded> {
    let bytes = std::fs::read(file).expect("read file");
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let l = Loaded {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                values: to_f64(view.dtype(), view.data()),
            };
            (name, l)
        })
        .collect()
}

/// Every tensor of a checkpoint directory (all `*.safetensors` files).
pub fn load_dir(dir: &Path) -> BTreeMap<String, Loaded> {
    let mut out = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    for f in files {
        let bytes = std::fs::read(&f).expect("read file");
        let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
        for (name, view) in st.tensors() {
            let prev = out.insert(
                name.clone(),
                Loaded {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    values: to_f64(view.dtype(), view.data()),
                },
            );
            assert!(
                prev.is_none(),
                "tensor {name} appears twice in {}",
                dir.display()
            );
        }
    }
    out
}

/// Assert `got` matches `want` within `rel` relative (to max(|want|, floor)).
pub fn assert_close(name: &str, got: &[f64], want: &[f64], rel: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(floor);
        assert!(
            (g - w).abs() <= tol,
            "{name}[{i}]: got {g}, want {w} (|diff| {} > {tol})",
            (g - w).abs()
        );
    }
}

/// Names of files in `dir` (sorted).
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Files in `dir` that look like final checkpoint outputs.
pub fn final_outputs(dir: &Path) -> Vec<String> {
    file_names(dir)
        .into_iter()
        .filter(|n| {
            !n.starts_with('.')
                && (n.ends_with(".safetensors") || n.ends_with(".json") || n == "README.md")
        })
        .collect()
}

/// Write a word-level tokenizer.json with the given tokens in id order.
pub fn write_tokenizer(dir: &Path, tokens: &[String]) {
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::Value::from(i)))
        .collect();
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": tokens[0]}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tj).unwrap(),
    )
    .unwrap();
}
