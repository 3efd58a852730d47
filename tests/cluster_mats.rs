//! Split-block MaTS across processes (architecture.md, "Split blocks"): a block larger than
//! `max_block_bytes` is solved as a gang of parts meeting in the coordinator's Reduce RPC, and
//! the checkpoint equals the single-process merge byte for byte.

use crate::common::*;

const UP: &str = "model.layers.0.mlp.up_proj.weight";

/// MaTS on [`split_mats_family`], its MLP blocks split in two parts.
const MATS_YAML: &str = "merge_method: mats\nbase_model: base\nmodels:\n  - model: ft1\n    \
    statistics: ft1.stats.safetensors\n  - model: ft2\n    statistics: ft2.stats.safetensors\n\
    parameters:\n  iterations: 6\n  max_block_bytes: 1000\n";

/// The family and config `scripts/gpu-check.sh build` carries to the GPU machine for its split
/// MaTS check (written to the folder `AMALGAM_GPU_CHECK_MATS` names, else a temporary one): the
/// dry run shows the MLP blocks split in two parts.
#[test]
fn split_mats_family_for_the_gpu_check() {
    let tmp = tempfile::tempdir().unwrap();
    let d = std::env::var_os("AMALGAM_GPU_CHECK_MATS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&d).unwrap();
    split_mats_family(&d);
    std::fs::write(d.join("mats.yaml"), MATS_YAML).unwrap();
    let out = run_ok(&d, &["merge", "mats.yaml", "--out", "dry", "--dry-run"]);
    let split = out
        .lines()
        .filter(|l| l.contains("mlp.") && l.contains("parts=2"))
        .count();
    assert_eq!(split, 3, "{out}");
}

#[test]
fn split_mats_block_over_worker_processes_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    split_mats_family(d);
    std::fs::write(d.join("mats.yaml"), MATS_YAML).unwrap();
    run_ok(d, &["merge", "mats.yaml", "--out", "single", "-q"]);
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();

    let mut coord = Proc::start(
        d,
        &[
            "coordinator",
            "--config",
            "mats.yaml",
            "--out",
            "multi",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            "token",
            "--shard-size",
            "40KB",
        ],
        &[],
    );
    let url = url_of(&coord.line_with("listening on"));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (d, url) = (d.to_path_buf(), url.clone());
            std::thread::spawn(move || {
                amalgam()
                    .current_dir(&d)
                    .env("RUST_LOG", "info")
                    .args(["worker", "--coordinator", &url, "--token-file", "token"])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    coord.wait_ok();
    let mut log = String::new();
    for w in workers {
        let out = w.join().unwrap();
        assert!(out.status.success());
        log.push_str(&String::from_utf8_lossy(&out.stderr));
    }

    // The embedded coordinator with worker tasks (`merge --workers 2`) too.
    run_ok(
        d,
        &[
            "merge",
            "mats.yaml",
            "--out",
            "embedded",
            "-q",
            "--workers",
            "2",
        ],
    );
    // Identical checkpoint (and solver log) bytes.
    for other in ["multi", "embedded"] {
        let (fa, fb) = (
            final_outputs(&d.join("single")),
            final_outputs(&d.join(other)),
        );
        assert_eq!(fa, fb);
        for f in &fa {
            let a = std::fs::read(d.join("single").join(f)).unwrap();
            let b = std::fs::read(d.join(other).join(f)).unwrap();
            assert!(a == b, "{other}: {f} differs");
        }
    }
    // The block was split, and each part made one Reduce per reduction: 2 per iteration, plus
    // b.b, nnz(x0) and the final residual.
    let solver = std::fs::read_to_string(d.join("single/solver_log.jsonl")).unwrap();
    let rec: serde_json::Value = solver
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["tensor"] == UP)
        .expect("a record for the MLP weight");
    assert_eq!(rec["parts"], 2, "{rec}");
    assert_eq!(rec["iterations"], 6, "{rec}");
    let reductions = rec["reductions"].as_u64().unwrap() as usize;
    assert_eq!(reductions, 2 * 6 + 3, "{rec}");
    // Count per Reduce key (one key per lease: the scheduler may lease an unfinished gang
    // again at the end of the job, and that attempt reduces under its own key).
    let mut calls: std::collections::BTreeMap<(String, usize), usize> = Default::default();
    for l in log.lines().filter(|l| l.contains(" Reduce ")) {
        let field = |k: &str| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(str::to_string)
        };
        let (Some(key), Some(part)) = (field("key="), field("part=")) else {
            continue;
        };
        if key.ends_with(&format!("/{UP}")) {
            *calls.entry((key, part.parse().unwrap())).or_default() += 1;
        }
    }
    let keys: std::collections::BTreeSet<&String> = calls.keys().map(|k| &k.0).collect();
    assert!(!keys.is_empty(), "no Reduce call for {UP}:\n{log}");
    assert!(
        calls.values().all(|n| *n <= reductions),
        "{calls:?} (at most {reductions} per part and lease):\n{log}"
    );
    assert!(
        keys.iter()
            .any(|k| (0..2).all(|p| calls.get(&(k.to_string(), p)) == Some(&reductions))),
        "{calls:?}: one lease ran both parts to the end, {reductions} calls each:\n{log}"
    );
}
