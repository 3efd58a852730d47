//! Streamed inputs (issue 3, data plane) as real processes: workers that cannot read the
//! models (they lie outside the workers' `--allow-root`) stream every tensor from the
//! coordinator, including tensors larger than the gRPC message limit, and the checkpoint is
//! byte-identical to a single-process `amalgam merge`. The embedded runner streams too when
//! told to (`AMALGAM_STREAM_INPUTS=always`). The rule itself (local copy with another header
//! streamed, identical copy read locally) is tested in `crates/cluster/src/remote_input.rs`.

use crate::common::*;
use std::path::Path;

/// gRPC message limit of the cluster crate (`amalgam_cluster::MAX_MESSAGE_BYTES`).
const MAX_MESSAGE_BYTES: u64 = 4 * 1024 * 1024;

const TIES: &str = "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0, density: 0.5}\n  - model: ft2\n    parameters: {weight: 0.7, density: 0.8}\nparameters: {normalize: true}\n";

/// Every file of two output directories is byte-identical (hidden files excluded).
fn assert_same_dirs(a: &Path, b: &Path) {
    let (fa, fb) = (final_outputs(a), final_outputs(b));
    assert_eq!(fa, fb, "file lists differ");
    for f in fa {
        let x = std::fs::read(a.join(&f)).unwrap();
        let y = std::fs::read(b.join(&f)).unwrap();
        assert!(
            x == y,
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// Models with an embedding and head of 20000 x 64 f32 (5.1 MB, over the message limit),
/// stored as sharded checkpoints (index + files of at most 2 MB, the big tensors alone).
/// Returns the size of the largest tensor.
fn models(data: &Path) -> u64 {
    std::fs::create_dir_all(data).unwrap();
    tiny_family(
        data,
        2,
        &["--layers", "2", "--vocab", "20000", "--shard-size", "2MB"],
    );
    std::fs::write(data.join("ties.yaml"), TIES).unwrap();
    assert!(
        data.join("base/model.safetensors.index.json").is_file(),
        "sharded inputs"
    );
    let biggest = 20000u64 * 64 * 4;
    assert!(biggest > MAX_MESSAGE_BYTES);
    biggest
}

/// Bytes of every safetensors file of the models.
fn input_bytes(data: &Path) -> u64 {
    ["base", "ft1", "ft2"]
        .iter()
        .map(|m| input_bytes_of(&data.join(m)))
        .sum()
}

/// A coordinator process for `cfg` writing `out` (token file `token`, shards of `shard_size`),
/// with `extra` arguments.
fn coordinator(d: &Path, cfg: &str, out: &str, shard_size: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "coordinator",
        "--config",
        cfg,
        "--out",
        out,
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        "token",
        "--shard-size",
        shard_size,
    ];
    args.extend_from_slice(extra);
    Proc::start(d, &args, &[])
}

/// A worker process of `url` whose `--allow-root` (`elsewhere`) holds none of the inputs.
fn outside_worker(d: &Path, url: &str, env: &[(&str, &str)]) -> Proc {
    Proc::start(
        d,
        &[
            "worker",
            "--coordinator",
            url,
            "--token-file",
            "token",
            "--allow-root",
            "elsewhere",
        ],
        env,
    )
}

fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Coordinator and 1 or 3 worker processes whose `--allow-root` holds none of the models:
/// every input byte is streamed (the coordinator's `/metrics` counts at least every input
/// file's bytes; each worker reports what it fetched), and the output equals `amalgam merge`.
#[test]
fn workers_outside_the_inputs_storage_stream_every_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = d.join("data");
    models(&data);
    let total = input_bytes(&data);
    std::fs::create_dir_all(d.join("elsewhere")).unwrap();
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();
    run_ok(d, &["merge", "data/ties.yaml", "--out", "single", "-q"]);
    for workers in [1usize, 3] {
        let out = format!("w{workers}");
        let mut coord = coordinator(
            d,
            "data/ties.yaml",
            &out,
            "1MB",
            &["--metrics-listen", "127.0.0.1:0"],
        );
        let url = url_of(&coord.line_with("listening on"));
        let metrics = url_of(&coord.line_with("metrics on"));
        let mut ws: Vec<Proc> = (0..workers).map(|_| outside_worker(d, &url, &[])).collect();
        let last = coord.scrape_until_exit(&metrics);
        let mut by_workers = 0u64;
        for w in ws.iter_mut() {
            let line = w.line_with("input bytes streamed");
            w.wait_ok();
            by_workers += line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap();
        }
        assert_same_dirs(&d.join("single"), &d.join(&out));
        let served = metric(&last, "amalgam_input_bytes_streamed_total");
        assert!(
            served >= total,
            "{workers} workers: every input byte streamed ({served} of {total}):\n{last}"
        );
        assert!(
            by_workers >= total,
            "{workers} workers fetched {by_workers} of {total} bytes"
        );
    }
}

/// The embedded runner's worker tasks stream too (`AMALGAM_STREAM_INPUTS=always`), several
/// at once from the same files, and give the single-process bytes; its log says so.
#[test]
fn embedded_workers_streaming_give_the_single_process_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = d.join("data");
    models(&data);
    run_ok(d, &["merge", "data/ties.yaml", "--out", "single", "-q"]);
    let out = amalgam()
        .current_dir(d)
        .env("AMALGAM_STREAM_INPUTS", "always")
        .env("RUST_LOG", "info")
        .args([
            "merge",
            "data/ties.yaml",
            "--out",
            "embedded",
            "-q",
            "--workers",
            "3",
            "--shard-size",
            "1MB",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_same_dirs(&d.join("single"), &d.join("embedded"));
    assert!(
        log.contains("streaming input from the coordinator")
            && log.contains("input bytes streamed from the coordinator"),
        "the log shows streamed inputs: {log}"
    );
    // A wrong mode is a clear error.
    let out = amalgam()
        .current_dir(d)
        .env("AMALGAM_STREAM_INPUTS", "sometimes")
        .args([
            "merge",
            "data/ties.yaml",
            "--out",
            "bad",
            "-q",
            "--workers",
            "2",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("AMALGAM_STREAM_INPUTS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `amalgam-streamed-*` folders in `tmp`.
fn streamed_folders(tmp: &Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("amalgam-streamed-"))
        .collect()
}

/// A streaming worker killed with -9 leaves its sparse copies behind; the next worker on the
/// same temporary directory removes them (their lock died with the process) and the job still
/// gives the single-process bytes.
#[test]
fn a_killed_streaming_workers_copies_are_swept_by_the_next_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = d.join("data");
    models(&data);
    std::fs::create_dir_all(d.join("elsewhere")).unwrap();
    let wtmp = d.join("worker-tmp");
    std::fs::create_dir_all(&wtmp).unwrap();
    let wtmp_s = wtmp.to_str().unwrap().to_string();
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();
    run_ok(d, &["merge", "data/ties.yaml", "--out", "single", "-q"]);
    let mut coord = coordinator(d, "data/ties.yaml", "out", "1MB", &["--lease-ttl", "1"]);
    let url = url_of(&coord.line_with("listening on"));
    let worker = |env: &[(&str, &str)]| outside_worker(d, &url, env);
    let pid_file = d.join("paused.pid");
    let pid_path = pid_file.to_str().unwrap().to_string();
    let _paused = worker(&[
        ("TMPDIR", &wtmp_s),
        ("AMALGAM_TEST_PAUSE_AFTER_BYTES", "100000"),
        ("AMALGAM_TEST_PAUSE_PID_FILE", &pid_path),
    ]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !pid_file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never paused"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(status.success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        streamed_folders(&wtmp).len(),
        1,
        "the killed worker's copies are left behind"
    );
    let mut next = worker(&[("TMPDIR", &wtmp_s)]);
    coord.wait_ok();
    next.wait_ok();
    assert_same_dirs(&d.join("single"), &d.join("out"));
    assert_eq!(
        streamed_folders(&wtmp),
        Vec::<String>::new(),
        "the next worker swept the dead one's copies and removed its own"
    );
}

/// Workers that see none of the storage stream everything else a config names, too: a LoRA
/// (`ft1+lora`), statistics files, the models' tokenizer files (`tokenizer_source`) and a MaTS
/// `init:` checkpoint, each checked by its sha256; every output equals `amalgam merge`.
#[test]
fn workers_without_the_storage_stream_adapters_statistics_tokenizers_and_init() {
    use amalgam_io::peft::{lora_a_key, lora_b_key};
    use amalgam_io::{write_adapter, AdapterConfig, LoraConfig, TargetModules};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    tiny_family(&data, 2, &["--vocab", "8", "--layers", "2"]);
    write_model_stats(&data, "ft1", 1);
    write_model_stats(&data, "ft2", 2);
    let toks: Vec<String> = (0..8).map(|i| format!("tok{i}")).collect();
    write_tokenizer(&data.join("base"), &toks);
    write_tokenizer(&data.join("ft1"), &toks);
    let rev: Vec<String> = toks.iter().rev().cloned().collect();
    write_tokenizer(&data.join("ft2"), &rev);
    let ft1 = load_dir(&data.join("ft1"));
    let module = "model.layers.1.self_attn.q_proj";
    let shape = &ft1[&format!("{module}.weight")].shape;
    let (o, i, r) = (shape[0], shape[1], 2);
    let a: Vec<f32> = (0..r * i).map(|k| ((k % 7) as f32 - 3.0) * 0.01).collect();
    let b: Vec<f32> = (0..o * r).map(|k| ((k % 5) as f32 - 2.0) * 0.02).collect();
    write_adapter(
        &data.join("lora"),
        &AdapterConfig::Lora(LoraConfig::new(
            r,
            4.0,
            TargetModules::List(vec!["q_proj".into()]),
        )),
        &[
            (lora_a_key(module), vec![r, i], a.as_slice()),
            (lora_b_key(module), vec![o, r], b.as_slice()),
        ],
        false,
    )
    .unwrap();
    let stats = "  - model: ft1+lora\n    statistics: ft1.stats.safetensors\n  - model: ft2\n    statistics: ft2.stats.safetensors\n";
    let configs = [
        (
            "fisher",
            // Normalised: a model-global pass (f64 sums) runs on the streaming worker.
            format!("merge_method: fisher\nmodels:\n{stats}parameters: {{normalize_fishers: true}}\n"),
        ),
        (
            "tok",
            "merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0}\n  - model: ft2\n    parameters: {weight: 1.0}\ntokenizer_source: ft1\n".to_string(),
        ),
        (
            "mats",
            format!("merge_method: mats\nbase_model: base\nmodels:\n{stats}parameters:\n  init: ft1\n  iterations: 3\n"),
        ),
    ];
    std::fs::create_dir_all(d.join("elsewhere")).unwrap();
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();
    for (name, yaml) in configs {
        let cfg = format!("data/{name}.yaml");
        std::fs::write(d.join(&cfg), yaml).unwrap();
        let single = format!("{name}-single");
        run_ok(d, &["merge", &cfg, "--out", &single, "-q"]);
        let out = format!("{name}-streamed");
        let mut coord = coordinator(d, &cfg, &out, "20KB", &[]);
        let url = url_of(&coord.line_with("listening on"));
        let mut w = outside_worker(d, &url, &[("RUST_LOG", "info")]);
        let line = w.line_with("input bytes streamed");
        coord.wait_ok();
        w.wait_ok();
        assert_same_dirs(&d.join(&single), &d.join(&out));
        // What it streamed covers the extra files whole (besides the models' tensors).
        let size = |p: &str| std::fs::metadata(data.join(p)).unwrap().len();
        let lora = size("lora/adapter_model.safetensors") + size("lora/adapter_config.json");
        let st = size("ft1.stats.safetensors") + size("ft2.stats.safetensors");
        let extra = match name {
            "fisher" => lora + st,
            "tok" => size("ft1/tokenizer.json") + size("ft2/tokenizer.json"),
            _ => lora + st + input_bytes_of(&data.join("ft1")),
        };
        let got: u64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(
            got > extra,
            "{name}: streamed {got} bytes, the extra files alone are {extra}"
        );
    }
}

/// Bytes of a checkpoint folder's safetensors files.
fn input_bytes_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}
