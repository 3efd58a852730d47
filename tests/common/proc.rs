//! A child process of the binary whose stdout lines are collected (coordinators, workers).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process whose stdout lines are collected; killed on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its stdout lines, as they come.
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Proc {
    /// Start the binary with `args` and extra environment `env` in `cwd`.
    pub fn start(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_amalgam"));
        cmd.current_dir(cwd)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
                let _ = tx.send(l);
            }
        });
        Proc { child, lines: rx }
    }

    /// The first stdout line containing `pat` (waits up to 60 s).
    pub fn line_with(&self, pat: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(pat) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line with {pat:?}: {e}"),
            }
        }
    }

    /// Fetch `url` (a `/metrics` page) until the process exits, then require a successful
    /// exit; the last page fetched.
    pub fn scrape_until_exit(&mut self, url: &str) -> String {
        let mut last = String::new();
        while self.child.try_wait().unwrap().is_none() {
            if let Some(page) = http_get(url) {
                last = page;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_ok();
        last
    }

    /// Wait (up to 240 s) for a successful exit.
    pub fn wait_ok(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "process failed: {st}");
                return;
            }
            assert!(Instant::now() < deadline, "process did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` worker processes of the coordinator at `url`, run in `cwd` with the token file `token`.
pub fn start_workers(cwd: &Path, url: &str, n: usize) -> Vec<Proc> {
    (0..n)
        .map(|_| {
            Proc::start(
                cwd,
                &["worker", "--coordinator", url, "--token-file", "token"],
                &[],
            )
        })
        .collect()
}

/// A long-lived coordinator (`coordinator --serve`) on a loopback port, run in `cwd` with the
/// token file `token` and `extra` arguments; and its URL.
pub fn start_service(cwd: &Path, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "coordinator",
        "--serve",
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        "token",
    ];
    args.extend_from_slice(extra);
    let p = Proc::start(cwd, &args, &[]);
    let url = url_of(&p.line_with("serving submitted jobs"));
    (p, url)
}

/// The first `http://` or `https://` URL on `line`.
pub fn url_of(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.starts_with("http://") || w.starts_with("https://"))
        .expect("a url on the line")
        .to_string()
}

/// `GET` a plain-HTTP URL (`http://host:port/path`); `None` when nothing answers.
pub fn http_get(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/1.1 200").then_some(body)
}
