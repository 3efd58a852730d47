//! The Kubernetes manifests cannot drift from the CLI: the exact argv the manifests give the
//! etcd, coordinator and worker containers (rendered by `tests/deploy/commands.py` from the
//! CPU overlay) run here as local processes, with only host names, ports and mount paths
//! substituted, against a real etcd on loopback. The merge they produce must equal
//! `amalgam merge` of the same config.

use crate::common::*;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(argv: &[String], cwd: &Path) -> Killed {
    let exe = if argv[0] == "amalgam" {
        env!("CARGO_BIN_EXE_amalgam").to_string()
    } else {
        argv[0].clone()
    };
    Killed(
        Command::new(exe)
            .args(&argv[1..])
            .current_dir(cwd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {argv:?}: {e}")),
    )
}

fn wait_success(c: &mut Killed, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(st) = c.0.try_wait().unwrap() {
            assert!(st.success(), "{what} failed: {st}");
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn manifest_commands_run_as_local_processes() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if !have("etcd", "--version") {
        eprintln!("skipped: no `etcd` binary (.ci/run installs Debian's etcd-server)");
        return;
    }
    let py_ok = Command::new("python3")
        .args(["-c", "import yaml"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !py_ok {
        eprintln!("skipped: python3 with PyYAML is needed to render the manifests");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for sub in ["shared/models", "config", "secrets", "etcd"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let models = d.join("shared/models");
    generate(&models, "base", &["--seed", "5"]);
    for (name, seed) in [("finetune-a", "101"), ("finetune-b", "102")] {
        generate(
            &models,
            name,
            &["--seed", "5", "--delta-seed", seed, "--delta-scale", "0.02"],
        );
    }
    let shared = d.join("shared");
    let shared_s = shared.to_str().unwrap().to_string();
    let cfg = std::fs::read_to_string(repo.join("deploy/k8s/base/merge.yaml"))
        .unwrap()
        .replace("/shared", &shared_s);
    std::fs::write(d.join("config/merge.yaml"), cfg).unwrap();
    std::fs::write(d.join("secrets/token"), "manifest-test-token-0123456789\n").unwrap();

    let (etcd_c, etcd_p, grpc, metrics) = (free_port(), free_port(), free_port(), free_port());
    let subs = [
        (
            "http://etcd:2379".to_string(),
            format!("http://127.0.0.1:{etcd_c}"),
        ),
        ("0.0.0.0:2379".to_string(), format!("127.0.0.1:{etcd_c}")),
        ("127.0.0.1:2380".to_string(), format!("127.0.0.1:{etcd_p}")),
        (
            "http://amalgam-coordinator:7070".to_string(),
            format!("http://127.0.0.1:{grpc}"),
        ),
        ("0.0.0.0:7070".to_string(), format!("127.0.0.1:{grpc}")),
        ("0.0.0.0:9090".to_string(), format!("127.0.0.1:{metrics}")),
        (
            "/var/lib/etcd".to_string(),
            d.join("etcd").display().to_string(),
        ),
        ("/shared".to_string(), shared_s.clone()),
        (
            "/config".to_string(),
            d.join("config").display().to_string(),
        ),
        (
            "/secrets".to_string(),
            d.join("secrets").display().to_string(),
        ),
    ];
    let mut cmd = Command::new("python3");
    cmd.arg(repo.join("tests/deploy/commands.py"));
    for (a, b) in &subs {
        cmd.arg("--replace").arg(format!("{a}={b}"));
    }
    cmd.arg(repo.join("deploy/k8s/overlays/cpu"));
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "commands.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut argvs = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let argv: Vec<String> = v["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        argvs.insert(v["container"].as_str().unwrap().to_string(), argv);
    }
    let etcd = spawn(&argvs["etcd"], d);
    // etcd answers within a second or two.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", etcd_c)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut coord = spawn(&argvs["coordinator"], d);
    let mut workers: Vec<Killed> = (0..2).map(|_| spawn(&argvs["worker"], d)).collect();
    wait_success(&mut coord, "the coordinator");
    for w in workers.iter_mut() {
        wait_success(w, "a worker");
    }
    drop(etcd);
    run_ok(d, &["merge", "config/merge.yaml", "--out", "single", "-q"]);
    let (a, b) = (d.join("single"), shared.join("output"));
    let files = final_outputs(&a);
    assert_eq!(files, final_outputs(&b));
    for f in files {
        assert!(
            std::fs::read(a.join(&f)).unwrap() == std::fs::read(b.join(&f)).unwrap(),
            "{f} differs"
        );
    }
}
