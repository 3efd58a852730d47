//! The cluster path as real processes: an embedded coordinator with worker tasks
//! (`merge --workers N`), and a coordinator process with worker processes over loopback gRPC,
//! with a worker and the coordinator killed (-9) mid-job. Every output must equal the
//! single-process merge byte for byte.

use crate::common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn write(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).unwrap();
    name.to_string()
}

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

fn family(d: &Path) {
    tiny_family(d, 3, &["--layers", "3"]);
}

const TIES: &str = "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 1.0, density: 0.5}\n  - model: ft2\n    parameters: {weight: 0.7, density: [0.3, 0.8]}\n  - model: ft3\n    parameters: {weight: 0.5, density: 0.6}\nparameters: {normalize: true}\n";

#[test]
fn embedded_workers_give_the_single_process_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    family(d);
    let ties = write(d, "ties.yaml", TIES);
    // Whole-model trim: a model-global pre-pass before any shard is merged.
    let model_ties = write(
        d,
        "ties_model.yaml",
        &format!("{TIES}dtype: bfloat16\n").replace(
            "parameters: {normalize: true}",
            "parameters: {normalize: true, trim_scope: model}",
        ),
    );
    let dare = write(
        d,
        "dare.yaml",
        &TIES
            .replace("ties", "dare_ties")
            .replace("parameters: {normalize: true}\n", "random_seed: 7\n"),
    );
    for cfg in [&ties, &model_ties, &dare] {
        let single = format!("{cfg}-single");
        run_ok(d, &["merge", cfg, "--out", &single, "-q"]);
        for workers in ["1", "3"] {
            let out = format!("{cfg}-w{workers}");
            run_ok(
                d,
                &[
                    "merge",
                    cfg,
                    "--out",
                    &out,
                    "-q",
                    "--workers",
                    workers,
                    "--shard-size",
                    "40KB",
                ],
            );
            assert_same_dirs(&d.join(&single), &d.join(&out));
            assert!(
                !d.join(&out).join(".amalgam-shards").exists(),
                "the spill folder is removed"
            );
        }
    }
}

/// Whole-model TIES over a coordinator and three worker processes: the three model-global
/// passes run on the workers (the coordinator only adds their small results), and the
/// output is the single-process checkpoint, byte for byte.
#[test]
fn whole_model_ties_pre_pass_runs_on_worker_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let shape = [
        "--hidden",
        "256",
        "--intermediate",
        "704",
        "--layers",
        "2",
        "--vocab",
        "1024",
    ];
    tiny_family(d, 3, &shape);
    let cfg = write(
        d,
        "ties_model.yaml",
        &TIES.replace(
            "parameters: {normalize: true}",
            "parameters: {normalize: true, trim_scope: model}",
        ),
    );
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();
    run_ok(d, &["merge", &cfg, "--out", "single", "-q"]);
    let mut args = coordinator_args(&cfg, "multi", &[]);
    let s = args.iter().position(|a| *a == "40KB").unwrap();
    args[s] = "1MB";
    let mut coord = Proc::start(d, &args, &[]);
    let url = url_of(&coord.line_with("listening on"));
    let mut workers = start_workers(d, &url, 3);
    let line = coord.line_with("model-global pre-pass");
    coord.wait_ok();
    for w in workers.iter_mut() {
        w.wait_ok();
    }
    assert_same_dirs(&d.join("single"), &d.join("multi"));
    assert!(line.contains(": 3 passes of "), "{line}");
    let largest: u64 = line
        .split("largest shard result ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no size in {line}"));
    // Three models' 65536-bucket histograms would be 1.5 MiB dense; sparse they are small.
    assert!(largest > 0 && largest < 256 << 10, "{line}");
}

/// A long-lived coordinator takes jobs one after another from `amalgam submit`: two jobs
/// submitted at once (one with a model-global pre-pass) run in turn on the same workers and
/// give the single-process bytes; a job that cannot run fails alone, with the reason, and the
/// service takes the next one.
#[test]
fn a_serving_coordinator_runs_submitted_jobs_one_after_another() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    family(d);
    let ties = write(d, "ties.yaml", TIES);
    let model = write(
        d,
        "ties_model.yaml",
        &TIES.replace(
            "parameters: {normalize: true}",
            "parameters: {normalize: true, trim_scope: model}",
        ),
    );
    let missing = write(d, "missing.yaml", &TIES.replace("model: ft3", "model: ft9"));
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();
    run_ok(d, &["merge", &ties, "--out", "single-ties", "-q"]);
    run_ok(d, &["merge", &model, "--out", "single-model", "-q"]);

    let (_coord, url) = start_service(d, &["--shard-size", "40KB", "--lease-ttl", "2"]);
    let _workers = start_workers(d, &url, 2);
    let submit = |cfg: &str, out: &str| -> Proc {
        Proc::start(
            d,
            &[
                "submit",
                cfg,
                "--out",
                out,
                "--coordinator",
                &url,
                "--token-file",
                "token",
            ],
            &[],
        )
    };
    let mut a = submit(&ties, "out-ties");
    let mut b = submit(&model, "out-model");
    let (la, lb) = (a.line_with("merged"), b.line_with("merged"));
    a.wait_ok();
    b.wait_ok();
    assert!(la.contains("job-") && lb.contains("job-"), "{la}\n{lb}");
    assert_same_dirs(&d.join("single-ties"), &d.join("out-ties"));
    assert_same_dirs(&d.join("single-model"), &d.join("out-model"));

    // A job whose model is missing fails alone, naming the path.
    let err = run_err(
        d,
        &[
            "submit",
            &missing,
            "--out",
            "out-missing",
            "--coordinator",
            &url,
            "--token-file",
            "token",
        ],
    );
    assert!(err.contains("ft9"), "{err}");
    // With --strict, a parameter the method does not use (misspelt) is refused by the service.
    let typo = write(
        d,
        "typo.yaml",
        &TIES.replace(
            "parameters: {normalize: true}",
            "parameters: {normalise: true}",
        ),
    );
    assert!(std::fs::read_to_string(d.join("typo.yaml"))
        .unwrap()
        .contains("normalise"));
    let err = run_err(
        d,
        &[
            "submit",
            &typo,
            "--out",
            "out-typo",
            "--coordinator",
            &url,
            "--token-file",
            "token",
            "--strict",
        ],
    );
    assert!(err.contains("`normalise`"), "{err}");
    // The service goes on: the same config again, into a new directory.
    let mut c = submit(&ties, "out-again");
    c.line_with("merged");
    c.wait_ok();
    assert_same_dirs(&d.join("single-ties"), &d.join("out-again"));

    // A one-job coordinator refuses submissions with a clear message.
    let one = Proc::start(d, &coordinator_args(&ties, "out-one", &[]), &[]);
    let one_url = url_of(&one.line_with("listening on"));
    let err = run_err(
        d,
        &[
            "submit",
            &ties,
            "--out",
            "out-x",
            "--coordinator",
            &one_url,
            "--token-file",
            "token",
        ],
    );
    assert!(err.contains("--serve"), "{err}");
}

fn wait_for_file(p: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = std::fs::read_to_string(p) {
            if !s.trim().is_empty() {
                return s.trim().to_string();
            }
        }
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill9(pid: &str) {
    let st = Command::new("kill").args(["-9", pid]).status().unwrap();
    assert!(st.success());
}

fn coordinator_args<'a>(cfg: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
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
        "40KB",
        "--lease-ttl",
        "1",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn worker_processes_survive_a_killed_worker_and_refuse_a_wrong_token() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    family(d);
    let cfg = write(d, "ties.yaml", TIES);
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();
    std::fs::write(d.join("wrong"), "not-the-right-token-at-all\n").unwrap();
    run_ok(d, &["merge", &cfg, "--out", "single", "-q"]);

    let mut coord = Proc::start(
        d,
        &coordinator_args(&cfg, "multi", &["--metrics-listen", "127.0.0.1:0"]),
        &[],
    );
    let url = url_of(&coord.line_with("listening on"));
    let metrics = url_of(&coord.line_with("metrics on"));

    // A wrong token is refused with a clear message.
    let err = run_err(
        d,
        &[
            "worker",
            "--coordinator",
            &url,
            "--token-file",
            "wrong",
            "--reconnect-timeout",
            "2",
        ],
    );
    assert!(
        err.to_lowercase().contains("token"),
        "the refusal names the token: {err}"
    );

    // One worker pauses mid-result (test hook) and is killed -9; three others finish.
    let pid_file = d.join("paused.pid");
    let pid_path = pid_file.to_str().unwrap().to_string();
    let _paused = Proc::start(
        d,
        &["worker", "--coordinator", &url, "--token-file", "token"],
        &[
            ("AMALGAM_TEST_PAUSE_AFTER_BYTES", "100000"),
            ("AMALGAM_TEST_PAUSE_PID_FILE", &pid_path),
        ],
    );
    let pid = wait_for_file(&pid_file);
    kill9(&pid);
    // Its lease expires after the TTL (1 s here); /metrics shows it before anyone else works.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = http_get(&metrics).unwrap_or_default();
        if page.contains("amalgam_lease_expiries_total 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lease never expired:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut workers = start_workers(d, &url, 3);
    // Scrape /metrics until the coordinator exits; the last page shows the whole job.
    let last = coord.scrape_until_exit(&metrics);
    for w in workers.iter_mut() {
        w.wait_ok();
    }
    assert_same_dirs(&d.join("single"), &d.join("multi"));
    assert!(
        last.contains("amalgam_lease_expiries_total 1"),
        "the killed worker's lease expired:\n{last}"
    );
    let releases: u64 = last
        .lines()
        .find(|l| l.starts_with("amalgam_releases_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(releases >= 1, "its shard was leased again:\n{last}");
    assert!(last.contains("amalgam_job_done 1"), "{last}");
}

#[test]
fn restarted_coordinator_redoes_only_uncommitted_shards() {
    restart_case(None, TIES, "300000");
}

/// The same with whole-model TIES, killed once during the model-global pre-pass and once
/// during the merge: the restarted coordinator rebuilds the passes' results from the stored
/// shard results, then redoes only the uncommitted shards.
#[test]
fn restarted_coordinator_resumes_a_job_with_a_model_global_pre_pass() {
    let cfg = TIES.replace(
        "parameters: {normalize: true}",
        "parameters: {normalize: true, trim_scope: model}",
    );
    // About 0.8 MB of pre-pass results come before the merge's 0.7 MB.
    let (in_pre_pass, in_merge) = (
        restart_case(None, &cfg, "300000"),
        restart_case(None, &cfg, "1100000"),
    );
    assert_eq!(in_pre_pass, 0, "the first kill came during the pre-pass");
    assert!(in_merge > 0, "the second kill came during the merge");
}

#[test]
fn restarted_coordinator_resumes_from_etcd_in_a_fresh_directory() {
    let Some(etcd) = Etcd::start() else {
        eprintln!("skipped: no `etcd` binary (.ci/run installs Debian's etcd-server)");
        return;
    };
    restart_case(Some(&etcd), TIES, "300000");
}

/// A throwaway etcd on loopback ports with a temp data dir.
struct Etcd {
    _dir: tempfile::TempDir,
    child: Child,
    port: u16,
}

impl Etcd {
    fn start() -> Option<Etcd> {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (port, peer) = (free(), free());
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("etcd")
            .args([
                "--name",
                "t",
                "--data-dir",
                dir.path().join("d").to_str().unwrap(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{port}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{port}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("t=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let e = Etcd {
            _dir: dir,
            child,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_post(&e.url(), "/v3/kv/range", "{\"key\":\"AA==\"}").is_none() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(e)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Keys under `prefix`, counted by etcd's own JSON gateway (independently of amalgam).
    fn count_prefix(&self, prefix: &str) -> usize {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let body = format!(
            "{{\"key\":\"{}\",\"range_end\":\"{}\",\"count_only\":true}}",
            b64(prefix.as_bytes()),
            b64(&end)
        );
        let resp = http_post(&self.url(), "/v3/kv/range", &body).expect("etcd answers");
        let json = &resp[resp.find('{').expect("a JSON body")..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["count"].as_str().map(|c| c.parse().unwrap()).unwrap_or(0)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                out.push(T[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn http_post(base: &str, path: &str, body: &str) -> Option<String> {
    use std::io::{Read, Write};
    let host = base.strip_prefix("http://")?;
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.starts_with("HTTP/1.1 200").then_some(resp)
}

/// Kill a coordinator after some commits and restart it (see the callers); returns how many
/// merge shards were committed before the kill.
fn restart_case(etcd: Option<&Etcd>, config: &str, pause_after_bytes: &str) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    family(d);
    let cfg = write(d, "ties.yaml", config);
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();
    run_ok(d, &["merge", &cfg, "--out", "single", "-q"]);
    let journal = d.join("job.jsonl");
    let jpath = journal.to_str().unwrap().to_string();
    let etcd_url = etcd.map(|e| e.url()).unwrap_or_default();
    let extra: Vec<&str> = match etcd {
        None => vec!["--job-id", "restart-test", "--journal", &jpath],
        Some(_) => vec!["--job-id", "restart-test", "--etcd", &etcd_url],
    };

    // First run: one worker commits some shards, then pauses; the coordinator is killed -9.
    let coord = Proc::start(d, &coordinator_args(&cfg, "out", &extra), &[]);
    let url = url_of(&coord.line_with("listening on"));
    let pid_file = d.join("paused.pid");
    let pid_path = pid_file.to_str().unwrap().to_string();
    let _paused = Proc::start(
        d,
        &["worker", "--coordinator", &url, "--token-file", "token"],
        &[
            ("AMALGAM_TEST_PAUSE_AFTER_BYTES", pause_after_bytes),
            ("AMALGAM_TEST_PAUSE_PID_FILE", &pid_path),
        ],
    );
    let wpid = wait_for_file(&pid_file);
    kill9(&coord.child.id().to_string());
    kill9(&wpid);
    drop(coord);
    // Shard ids of the commits, read from the journal's lines. etcd's commits are only
    // counted: its case runs a config without a pre-pass, where every commit is a merge shard.
    assert!(etcd.is_none() || !config.contains("trim_scope: model"));
    let committed_ids: Vec<u64> = match etcd {
        None => std::fs::read_to_string(&journal)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"kind\":\"commit\""))
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["shard_id"].as_u64().unwrap()
            })
            .collect(),
        Some(e) => (0..e.count_prefix("/amalgam/jobs/restart-test/commits/") as u64).collect(),
    };
    let committed = committed_ids.len();
    assert!(committed > 0, "some shards were committed before the kill");
    assert!(
        !d.join("out").join("model.safetensors").exists(),
        "no final output after the kill"
    );

    // Restart with the same job id, from a fresh working directory (absolute paths): only
    // the uncommitted shards are merged.
    let fresh = tempfile::tempdir().unwrap();
    let abs = |p: &str| d.join(p).to_str().unwrap().to_string();
    let (cfg_abs, out_abs, tok_abs) = (abs(&cfg), abs("out"), abs("token"));
    let mut args = coordinator_args(&cfg_abs, &out_abs, &extra);
    let t = args.iter().position(|a| *a == "token").unwrap();
    args[t] = &tok_abs;
    let mut coord = Proc::start(fresh.path(), &args, &[]);
    let line = coord.line_with("listening on");
    assert!(
        line.contains(&format!("({committed} already committed)")),
        "{line}"
    );
    let url = url_of(&line);
    let mut w = Proc::start(
        d,
        &["worker", "--coordinator", &url, "--token-file", "token"],
        &[],
    );
    // With a pre-pass, ids below passes x pass shards are pre-pass shards, not merge shards.
    let pre_pass = match config.contains("trim_scope: model") {
        false => 0,
        true => {
            let l = coord.line_with("model-global pre-pass");
            let n = |w: &str| -> u64 {
                let before = l.split(w).next().unwrap();
                before.split_whitespace().last().unwrap().parse().unwrap()
            };
            n(" passes of") * n(" shards on the workers")
        }
    };
    let done = coord.line_with("merged by this run");
    let committed_merge = committed_ids.iter().filter(|id| **id >= pre_pass).count();
    let total: usize = done
        .split(" shards")
        .next()
        .and_then(|s| s.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        done.contains(&format!("{} merged by this run", total - committed_merge)),
        "{done} (committed before: {committed}, {committed_merge} of them merge shards)"
    );
    coord.wait_ok();
    w.wait_ok();
    assert_same_dirs(&d.join("single"), &d.join("out"));
    committed_merge
}

#[test]
fn worker_refuses_a_plan_outside_its_allowed_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // The models live in `data2`; the worker may only read `data` (a sibling with the same
    // prefix) and must not stream inputs, so it must refuse.
    let data2 = d.join("data2");
    std::fs::create_dir_all(&data2).unwrap();
    std::fs::create_dir_all(d.join("data")).unwrap();
    family(&data2);
    let cfg = write(&data2, "ties.yaml", TIES);
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();
    let cfg_path = data2.join(&cfg);
    let cfg_s = cfg_path.to_str().unwrap();
    let mut coord = Proc::start(d, &coordinator_args(cfg_s, "out", &[]), &[]);
    let url = url_of(&coord.line_with("listening on"));
    let err = run_err(
        d,
        &[
            "worker",
            "--coordinator",
            &url,
            "--token-file",
            "token",
            "--allow-root",
            "data",
            "--stream-inputs",
            "never",
        ],
    );
    assert!(
        err.contains("outside the allowed roots") && err.contains("data2"),
        "the refusal names the path and the roots: {err}"
    );
    // Allowed through a path with `..` in it: the same directory, canonicalised.
    let mut w = Proc::start(
        d,
        &[
            "worker",
            "--coordinator",
            &url,
            "--token-file",
            "token",
            "--allow-root",
            "data/../data2",
        ],
        &[],
    );
    coord.wait_ok();
    w.wait_ok();
    run_ok(d, &["merge", cfg_s, "--out", "single", "-q"]);
    assert_same_dirs(&d.join("single"), &d.join("out"));
}

/// A worker's log carries one span per shard (shard, lease and attempt on every event of its
/// merge), and an event when each shard is merged, under `RUST_LOG=info`.
#[test]
fn worker_logs_carry_a_span_per_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    family(d);
    let cfg = write(d, "ties.yaml", TIES);
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();
    let mut coord = Proc::start(d, &coordinator_args(&cfg, "out", &[]), &[]);
    let url = url_of(&coord.line_with("listening on"));
    let out = amalgam()
        .current_dir(d)
        .env("RUST_LOG", "info")
        .args(["worker", "--coordinator", &url, "--token-file", "token"])
        .output()
        .unwrap();
    coord.wait_ok();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    let merged = log.lines().filter(|l| l.contains("shard merged")).count();
    assert!(merged >= 2, "one event per shard: {log}");
    assert!(
        log.lines()
            .filter(|l| l.contains("shard merged"))
            .all(|l| l.contains("shard{shard_id=") && l.contains("lease_id=")),
        "each event inside its shard's span: {log}"
    );
}

/// Writes a test PKI into `d`: `ca.pem`; `server.pem`/`server.key` (localhost, 127.0.0.1);
/// `worker.pem`/`worker.key` signed by the CA; `stranger.pem`/`stranger.key` signed by another
/// CA.
fn write_pki(d: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }
    let leaf = |d: &Path,
                ca: &CertifiedIssuer<'static, KeyPair>,
                name: &str,
                sans: &[&str],
                eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, ca).unwrap();
        std::fs::write(d.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(d.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    let main = ca("amalgam test CA");
    let other = ca("unrelated CA");
    std::fs::write(d.join("ca.pem"), main.pem()).unwrap();
    leaf(
        d,
        &main,
        "server",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    leaf(
        d,
        &main,
        "worker",
        &["worker"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    leaf(
        d,
        &other,
        "stranger",
        &["stranger"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
}

/// The coordinator serves over TLS and requires client certificates from its CA: a worker
/// process with one merges the job (the same bytes as one process), a worker whose certificate
/// another CA signed is refused, and so is one that does not trust the coordinator's CA.
#[test]
fn tls_coordinator_and_worker_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    family(d);
    let cfg = write(d, "ties.yaml", TIES);
    std::fs::write(d.join("token"), "a-long-enough-test-token\n").unwrap();
    write_pki(d);
    let mut coord = Proc::start(
        d,
        &coordinator_args(
            &cfg,
            "out",
            &[
                "--tls-cert",
                "server.pem",
                "--tls-key",
                "server.key",
                "--tls-client-ca",
                "ca.pem",
            ],
        ),
        &[],
    );
    let url = url_of(&coord.line_with("listening on"));
    assert!(url.starts_with("https://"), "{url}");
    let worker = |cert: &str, ca: &str| -> Vec<String> {
        [
            "worker",
            "--coordinator",
            &url,
            "--token-file",
            "token",
            "--tls-ca",
            ca,
            "--tls-cert",
            &format!("{cert}.pem"),
            "--tls-key",
            &format!("{cert}.key"),
            "--reconnect-timeout",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let stranger = worker("stranger", "ca.pem");
    let err = run_err(d, &args(&stranger));
    assert!(
        err.contains("UnknownCA") || err.to_lowercase().contains("certificate"),
        "a certificate from another CA is refused: {err}"
    );
    // Not trusting the coordinator's CA (the worker's own CA file is the stranger's chain).
    let untrusting = worker("worker", "stranger.pem");
    run_err(d, &args(&untrusting));
    let good = worker("worker", "ca.pem");
    run_ok(d, &args(&good));
    coord.wait_ok();
    run_ok(d, &["merge", &cfg, "--out", "single", "-q"]);
    assert_same_dirs(&d.join("single"), &d.join("out"));
}
