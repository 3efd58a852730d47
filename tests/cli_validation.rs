//! Every validation error: a crafted bad file or config, a message naming the file and the
//! tensor or key, and no final output left behind.

use crate::common::*;
use std::path::Path;

fn write(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).expect("write");
    name.to_string()
}

const LIN2: &str = "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0}\n  - model: ft2\n    parameters: {weight: 1.0}\n";

fn assert_no_output(d: &Path) {
    let outs = final_outputs(&d.join("out"));
    assert!(outs.is_empty(), "final outputs left behind: {outs:?}");
}

/// Write a one-tensor safetensors file by hand: header JSON then data.
fn raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn corrupt_headers_name_the_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Header length beyond the file.
    let p = d.join("short.safetensors");
    let mut b = 1_000_000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, b).unwrap();
    let e = run_err(d, &["inspect", "short.safetensors"]);
    assert!(e.contains("short.safetensors"), "{e}");
    // Offsets outside the file.
    raw_safetensors(
        &d.join("oob.safetensors"),
        r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        &[0u8; 8],
    );
    let e = run_err(d, &["inspect", "oob.safetensors"]);
    assert!(
        e.contains("oob.safetensors") && e.contains("\"w\"")
            || e.contains("`w`")
            || e.contains(" w "),
        "{e}"
    );
    // Size that does not match dtype x shape.
    raw_safetensors(
        &d.join("size.safetensors"),
        r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#,
        &[0u8; 16],
    );
    let e = run_err(d, &["inspect", "size.safetensors"]);
    assert!(e.contains("size.safetensors") && e.contains('w'), "{e}");
    // Overlapping tensors.
    raw_safetensors(
        &d.join("overlap.safetensors"),
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        &[0u8; 24],
    );
    let e = run_err(d, &["inspect", "overlap.safetensors"]);
    assert!(e.contains("overlap.safetensors"), "{e}");
    // Not JSON.
    raw_safetensors(&d.join("junk.safetensors"), "this is not json", &[]);
    let e = run_err(d, &["inspect", "junk.safetensors"]);
    assert!(e.contains("junk.safetensors"), "{e}");
}

#[test]
fn shape_mismatch_and_missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    generate(d, "ft1", &[]);
    generate(d, "ft2", &["--hidden", "32", "--intermediate", "88"]);
    let cfg = write(d, "c.yaml", LIN2);
    let e = run_err(d, &["merge", &cfg, "--out", "out"]);
    assert!(
        e.contains("ft2") && e.contains("model.embed_tokens.weight") && e.contains("[256, 32]"),
        "{e}"
    );
    assert_no_output(d);
    // Missing tensor: fewer layers in ft2.
    generate(d, "ft2", &["--layers", "3"]);
    let e = run_err(d, &["merge", &cfg, "--out", "out"]);
    assert!(e.contains("model.layers.3."), "{e}");
    assert_no_output(d);
}

#[test]
fn nonfinite_inputs_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("ft1")).unwrap();
    std::fs::create_dir_all(d.join("ft2")).unwrap();
    let mut vals = vec![0u8; 16];
    vals[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    let hdr = r#"{"w.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    raw_safetensors(&d.join("ft1/model.safetensors"), hdr, &vals);
    raw_safetensors(&d.join("ft2/model.safetensors"), hdr, &[0u8; 16]);
    let cfg = write(d, "c.yaml", LIN2);
    let e = run_err(d, &["merge", &cfg, "--out", "out"]);
    assert!(
        e.contains("w.weight") && e.contains("ft1") && e.contains("--allow-nonfinite"),
        "{e}"
    );
    assert_no_output(d);
    run_ok(
        d,
        &[
            "merge",
            &cfg,
            "--out",
            "out",
            "--allow-nonfinite",
            "--quiet",
        ],
    );
}

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 3, &[]);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "density",
            "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0, density: 1.5}\n  - model: ft2\n    parameters: {weight: 1.0, density: 0.5}\n".into(),
            "density",
        ),
        (
            "slerp3",
            "merge_method: slerp\nbase_model: base\nmodels:\n  - model: base\n  - model: ft1\n  - model: ft2\nparameters: {t: 0.5}\n".into(),
            "slerp",
        ),
        (
            "stock1",
            "merge_method: model_stock\nbase_model: base\nmodels:\n  - model: ft1\n".into(),
            "model_stock",
        ),
        (
            "zero_weights",
            "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0}\n  - model: ft2\n    parameters: {weight: -1.0}\n".into(),
            "weight",
        ),
        ("hub", "merge_method: linear\nmodels:\n  - model: meta-llama/Llama-3.1-8B\n    parameters: {weight: 1.0}\n".into(), "hub"),
        ("union", format!("{LIN2}tokenizer_source: union\n"), "union"),
        ("nomethod", "models:\n  - model: ft1\n".into(), "merge_method"),
        ("unknown_method", "merge_method: frobnicate\nmodels:\n  - model: ft1\n".into(), "frobnicate"),
    ];
    for (name, text, needle) in cases {
        let f = format!("{name}.yaml");
        write(d, &f, &text);
        let e = run_err(d, &["merge", &f, "--out", "out"]);
        assert!(
            e.contains(needle),
            "{name}: message does not name `{needle}`: {e}"
        );
        assert_no_output(d);
    }
    // Task arithmetic without normalisation accepts weights summing to zero.
    let f = write(d, "ta0.yaml", "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0}\n  - model: ft2\n    parameters: {weight: -1.0}\n");
    run_ok(d, &["merge", &f, "--out", "ta-out", "--quiet"]);
}

#[test]
fn unknown_keys_warn_and_strict_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &[]);
    let cfg = write(d, "u.yaml", &format!("{LIN2}frobnicate: 3\n"));
    let out = run(d, &["merge", &cfg, "--out", "out"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("frobnicate") && err.contains("warning"),
        "{err}"
    );
    let e = run_err(d, &["merge", &cfg, "--out", "out2", "--strict"]);
    assert!(e.contains("frobnicate"), "{e}");
    assert!(final_outputs(&d.join("out2")).is_empty());
}

/// A parameter the method does not use (here a misspelt `weight`) is a warning, and with
/// `--strict` an error naming it, for a direct merge, an embedded cluster and a coordinator.
#[test]
fn unused_parameters_warn_and_strict_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &[]);
    let cfg = write(
        d,
        "w.yaml",
        &LIN2.replace(
            "{weight: 1.0}\n  - model: ft2",
            "{weight: 1.0, wieght: 2}\n  - model: ft2",
        ),
    );
    assert!(std::fs::read_to_string(d.join("w.yaml"))
        .unwrap()
        .contains("wieght"));
    let out = run(d, &["merge", &cfg, "--out", "out"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`wieght`") && err.contains("warning"), "{err}");
    for extra in [&[][..], &["--workers", "2"][..]] {
        let mut args = vec!["merge", &cfg, "--out", "out2", "--strict"];
        args.extend_from_slice(extra);
        let e = run_err(d, &args);
        assert!(
            e.contains("`wieght`") && e.contains("linear") && e.contains("w.yaml"),
            "{extra:?}: {e}"
        );
        assert!(final_outputs(&d.join("out2")).is_empty());
    }
    let e = run_err(
        d,
        &[
            "coordinator",
            "--config",
            &cfg,
            "--out",
            "out3",
            "--strict",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert!(e.contains("`wieght`"), "{e}");
    assert!(final_outputs(&d.join("out3")).is_empty());
}

/// A missing per-model `weight` names the model's path; where it is the base model that a
/// method merges with the others (mergekit's `linear` with `base_model`), it says so.
#[test]
fn a_missing_weight_names_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &[]);
    let cfg = write(d, "l.yaml", &format!("{LIN2}base_model: base\n"));
    let e = run_err(d, &["merge", &cfg, "--out", "out"]);
    assert!(
        e.contains("`weight`") && e.contains("model base (the base model"),
        "{e}"
    );
    assert_no_output(d);
    let cfg = write(
        d,
        "t.yaml",
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0}\n  - model: ft2\n    parameters: {density: 0.5}\n",
    );
    let e = run_err(d, &["merge", &cfg, "--out", "out"]);
    assert!(e.contains("`weight`") && e.contains("for model ft2"), "{e}");
    assert!(!e.contains("base model"), "{e}");
    assert_no_output(d);
}

/// An output directory that holds an input (a model directory, or the directory of a
/// single-file model) is refused even with `--overwrite`, in a direct and an embedded-cluster
/// merge, and the input is left as it was; an output path that is a file is refused once,
/// without the operating system's message twice.
#[test]
fn an_output_directory_holding_an_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 2, &[]);
    let cfg = write(d, "l.yaml", LIN2);
    let before = std::fs::read(d.join("ft1/model.safetensors")).unwrap();
    for extra in [&[][..], &["--workers", "2"][..]] {
        let mut args = vec!["merge", &cfg, "--out", "ft1", "--overwrite"];
        args.extend_from_slice(extra);
        let e = run_err(d, &args);
        assert!(e.contains("holds ft1") && e.contains("an input"), "{e}");
        assert_eq!(
            std::fs::read(d.join("ft1/model.safetensors")).unwrap(),
            before
        );
    }
    // Single-file models in the working directory, merged into it.
    std::fs::copy(d.join("ft1/model.safetensors"), d.join("a.safetensors")).unwrap();
    std::fs::copy(d.join("ft2/model.safetensors"), d.join("b.safetensors")).unwrap();
    let cfg = write(
        d,
        "s.yaml",
        &LIN2
            .replace("model: ft1", "model: a.safetensors")
            .replace("model: ft2", "model: b.safetensors"),
    );
    let e = run_err(d, &["merge", &cfg, "--out", ".", "--overwrite"]);
    assert!(e.contains("a.safetensors"), "{e}");
    assert_eq!(std::fs::read(d.join("a.safetensors")).unwrap(), before);

    std::fs::write(d.join("afile"), "x").unwrap();
    let cfg = write(d, "l.yaml", LIN2);
    let e = run_err(d, &["merge", &cfg, "--out", "afile"]);
    assert!(e.contains("afile: exists and is not a directory"), "{e}");
    assert_eq!(e.matches("os error").count(), 0, "{e}");
    // A directory that cannot be created names the OS error once.
    let e = run_err(d, &["merge", &cfg, "--out", "afile/sub"]);
    assert_eq!(e.matches("os error").count(), 1, "{e}");
}

/// Files whose name marks them unfinished (`.NAME.partial`, staging and spill directories).
fn unfinished(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// Ctrl-C (SIGINT) or SIGTERM in the middle of a merge, in one process or with embedded
/// workers: the process exits with status 130, says so, and leaves neither a final nor an
/// unfinished file in the output directory.
#[test]
fn an_interrupted_merge_removes_its_unfinished_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // About 70 MB per model: the merge takes long enough to be caught writing.
    tiny_family(
        d,
        2,
        &[
            "--hidden",
            "512",
            "--intermediate",
            "1408",
            "--layers",
            "6",
            "--vocab",
            "8000",
        ],
    );
    let cfg = write(
        d,
        "t.yaml",
        "merge_method: della\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}\n  - model: ft2\n    parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}\n",
    );
    let cases: [(&str, &[&str]); 3] =
        [("-INT", &[]), ("-TERM", &[]), ("-INT", &["--workers", "2"])];
    for (i, (signal, extra)) in cases.into_iter().enumerate() {
        let out = d.join(format!("out{i}"));
        let mut child = amalgam()
            .current_dir(d)
            .args([
                "merge",
                &cfg,
                "--out",
                out.to_str().unwrap(),
                "--threads",
                "1",
            ])
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while unfinished(&out).is_empty() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "{signal} {extra:?}: the merge ended before it was seen writing"
            );
            assert!(std::time::Instant::now() < deadline, "no output started");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let pid = child.id().to_string();
        let st = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(st.success());
        let res = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(130), "{signal} {extra:?}: {err}");
        assert!(err.contains("interrupted"), "{err}");
        assert_eq!(unfinished(&out), Vec::<String>::new(), "{signal} {extra:?}");
        assert!(final_outputs(&out).is_empty(), "{signal} {extra:?}");
    }
}

/// Vocabulary tensors of different sizes point at `tokenizer_source`; any other shape
/// mismatch says the architectures differ. Both name the models and the tensor.
#[test]
fn a_vocabulary_size_mismatch_points_at_tokenizer_source() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    generate(d, "ft1", &["--vocab", "300"]);
    generate(d, "ft2", &["--vocab", "256", "--delta-scale", "0.1"]);
    let cfg = write(d, "l.yaml", LIN2);
    let e = run_err(d, &["merge", &cfg, "--out", "out"]);
    assert!(
        e.contains("embed_tokens") && e.contains("ft2") && e.contains("tokenizer_source"),
        "{e}"
    );
    generate(d, "ft2", &["--hidden", "32", "--heads", "2"]);
    let e = run_err(d, &["merge", &cfg, "--out", "out"]);
    assert!(
        e.contains("one architecture") && !e.contains("tokenizer_source"),
        "{e}"
    );
    assert_no_output(d);
}

/// A merged value that float16 cannot hold (it would be written as infinity) is refused,
/// naming the tensor and the dtype, in a direct and an embedded-cluster merge; bfloat16 holds
/// it; `--allow-nonfinite` writes it.
#[test]
fn a_merged_value_overflowing_the_output_dtype_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_family(d, 1, &[]);
    // Task vectors of about 0.01 times 1e7: far above float16's 65504.
    let ta = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0e7}\n";
    let cfg = write(d, "h.yaml", &format!("{ta}dtype: float16\n"));
    for extra in [&[][..], &["--workers", "2"][..]] {
        let mut args = vec!["merge", &cfg, "--out", "out"];
        args.extend_from_slice(extra);
        let e = run_err(d, &args);
        assert!(
            e.contains("tensor \"") && e.contains("does not fit float16"),
            "{extra:?}: {e}"
        );
        assert_no_output(d);
    }
    let cfg_b = write(d, "b.yaml", &format!("{ta}dtype: bfloat16\n"));
    run_ok(d, &["merge", &cfg_b, "--out", "out_b", "--quiet"]);
    let out_b = load_dir(&d.join("out_b"));
    assert!(out_b
        .values()
        .all(|t| t.values.iter().all(|v| v.is_finite())));
    assert!(out_b
        .values()
        .any(|t| t.values.iter().any(|v| v.abs() > 65504.0)));
    run_ok(
        d,
        &[
            "merge",
            &cfg,
            "--out",
            "out_h",
            "--quiet",
            "--allow-nonfinite",
        ],
    );
    let out_h = load_dir(&d.join("out_h"));
    assert!(out_h
        .values()
        .any(|t| t.values.iter().any(|v| v.is_infinite())));
}

#[test]
fn non_float_tensors_copied_by_passthrough_refused_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for m in ["ft1", "ft2"] {
        std::fs::create_dir_all(d.join(m)).unwrap();
        let hdr = r#"{"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"w.weight":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#;
        let mut data = 7i64.to_le_bytes().to_vec();
        data.extend_from_slice(&9i64.to_le_bytes());
        data.extend_from_slice(&1f32.to_le_bytes());
        data.extend_from_slice(&2f32.to_le_bytes());
        raw_safetensors(&d.join(m).join("model.safetensors"), hdr, &data);
    }
    let cfg = write(d, "c.yaml", LIN2);
    let e = run_err(d, &["merge", &cfg, "--out", "out"]);
    assert!(e.contains("ids") && e.contains("I64"), "{e}");
    assert_no_output(d);
    let cfg = write(
        d,
        "p.yaml",
        "merge_method: passthrough\nmodels:\n  - model: ft1\n",
    );
    run_ok(d, &["merge", &cfg, "--out", "p", "--quiet"]);
    let bytes = std::fs::read(
        d.join("p").join(
            file_names(&d.join("p"))
                .into_iter()
                .find(|f| f.ends_with(".safetensors"))
                .unwrap(),
        ),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("ids").unwrap();
    assert_eq!(ids.dtype(), safetensors::Dtype::I64);
    assert_eq!(&ids.data()[..8], &7i64.to_le_bytes());
}

#[test]
fn bad_index_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    generate(d, "m", &[]);
    // Rewrite the checkpoint as an index pointing outside the directory.
    let dir = d.join("m");
    let st = file_names(&dir)
        .into_iter()
        .find(|f| f.ends_with(".safetensors"))
        .unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        format!(
            r#"{{"metadata":{{"total_size":1}},"weight_map":{{"model.norm.weight":"../{st}"}}}}"#
        ),
    )
    .unwrap();
    let e = run_err(d, &["inspect", "m"]);
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("model.norm.weight"),
        "{e}"
    );
}

/// `worker --collectives nccl` needs GPUs: with `--device cpu` (the default) the worker stops
/// before reaching the coordinator, naming both flags; an unknown kind lists the valid ones.
#[test]
fn worker_collectives_nccl_needs_a_gpu_device() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let url = "http://127.0.0.1:9";
    let e = run_err(
        d,
        &["worker", "--coordinator", url, "--collectives", "nccl"],
    );
    assert!(
        e.contains("--collectives nccl") && e.contains("--device cuda"),
        "{e}"
    );
    let e = run_err(d, &["worker", "--coordinator", url, "--collectives", "mpi"]);
    assert!(e.contains("grpc") && e.contains("nccl"), "{e}");
}
