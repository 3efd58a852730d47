//! `/metrics`: the job counters in the Prometheus text exposition format (version 0.0.4),
//! served on a plain-HTTP listener of its own ([`serve_metrics`]), separate from the gRPC port
//! so that a scraper needs neither the token nor the TLS setup of the coordinator.
//!
//! The responder is a minimal HTTP/1.1 server: one request per connection, `GET /metrics`
//! answers 200 with the exposition, any other path 404, any other method 405; the connection
//! is closed after the answer.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{ClusterError, Result};
use crate::pb;

/// Content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Input bytes this process has served to workers through `ReadInput` (streamed inputs),
/// shown as `amalgam_input_bytes_streamed_total`.
pub static INPUT_BYTES_STREAMED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Produces the current job status (the coordinator's `JobStatus` answer).
pub type StatusFn = Arc<dyn Fn() -> pb::JobStatusResponse + Send + Sync>;

/// Escapes a label value: backslash, double quote and newline.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // HELP text escapes backslash and newline; ours are constants without either.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// The job status as Prometheus text: job-wide gauges and counters, then per-worker series
/// labelled `worker` (the worker's name) and `worker_id`.
pub fn render(st: &pb::JobStatusResponse) -> String {
    let mut out = String::with_capacity(2048 + 256 * st.workers.len());
    header(
        &mut out,
        "amalgam_job_info",
        "gauge",
        "The coordinator's job id (value 1).",
    );
    let _ = writeln!(
        out,
        "amalgam_job_info{{job=\"{}\"}} 1",
        escape_label_value(&st.job_id)
    );
    let g = "gauge";
    let c = "counter";
    single(
        &mut out,
        "amalgam_shards_total",
        g,
        "Shards in the job's plan.",
        st.shards_total,
    );
    single(
        &mut out,
        "amalgam_shards_committed",
        g,
        "Shards whose result is committed (including those committed before a restart).",
        st.shards_committed,
    );
    single(
        &mut out,
        "amalgam_shards_pending",
        g,
        "Shards waiting for a lease.",
        st.shards_pending,
    );
    single(
        &mut out,
        "amalgam_shards_leased",
        g,
        "Shards under a live lease.",
        st.shards_leased,
    );
    single(
        &mut out,
        "amalgam_lease_expiries_total",
        c,
        "Leases that expired (worker died or stalled) and went back to the queue.",
        st.lease_expiries,
    );
    single(
        &mut out,
        "amalgam_releases_total",
        c,
        "Shards leased again after an expiry, a rejection or a failed store.",
        st.re_leases,
    );
    single(
        &mut out,
        "amalgam_speculative_leases_total",
        c,
        "End-of-job duplicate leases given to idle workers.",
        st.speculative_leases,
    );
    single(
        &mut out,
        "amalgam_bytes_received_total",
        c,
        "Result bytes received from workers.",
        st.bytes_received,
    );
    single(
        &mut out,
        "amalgam_input_bytes_streamed_total",
        c,
        "Input bytes streamed to workers that do not see the inputs' storage.",
        INPUT_BYTES_STREAMED.load(std::sync::atomic::Ordering::Relaxed),
    );
    single(
        &mut out,
        "amalgam_results_rejected_total",
        c,
        "Results rejected (size or checksum mismatch, storing failed).",
        st.results_rejected,
    );
    single(
        &mut out,
        "amalgam_results_dropped_total",
        c,
        "Results dropped (lease expired, shard already committed).",
        st.results_dropped,
    );
    single(
        &mut out,
        "amalgam_workers",
        g,
        "Workers registered with this coordinator.",
        st.workers.len() as u64,
    );
    single(
        &mut out,
        "amalgam_job_done",
        g,
        "1 when every shard is committed.",
        u64::from(st.done),
    );
    for (name, help, value) in [
        (
            "amalgam_worker_shards_done",
            "Shards committed from this worker.",
            (|w: &pb::WorkerStatus| w.shards_done) as fn(&pb::WorkerStatus) -> u64,
        ),
        (
            "amalgam_worker_bytes",
            "Result bytes received from this worker.",
            |w: &pb::WorkerStatus| w.bytes_received,
        ),
    ] {
        header(&mut out, name, c, help);
        for w in &st.workers {
            let _ = writeln!(
                out,
                "{name}{{worker=\"{}\",worker_id=\"{}\"}} {}",
                escape_label_value(&w.name),
                w.worker_id,
                value(w)
            );
        }
    }
    out
}

/// A running `/metrics` listener; stops when shut down or dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The bound address (the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/metrics`.
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    /// Stops listening: returns once the listener is closed (a connection attempt after it is
    /// refused), not merely asked to close.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `GET /metrics` on `addr` (port 0 picks a free port) from `status`. Must be called
/// inside a tokio runtime.
pub async fn serve_metrics(addr: SocketAddr, status: StatusFn) -> Result<MetricsServer> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| ClusterError::Config(format!("metrics: cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| ClusterError::Config(format!("metrics: listen address of {addr}: {e}")))?;
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    let st = Arc::clone(&status);
                    tokio::spawn(async move {
                        let r = tokio::time::timeout(Duration::from_secs(10), answer(sock, st));
                        if let Ok(Err(e)) = r.await {
                            tracing::debug!(error = %e, "metrics connection failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    tracing::info!(addr = %bound, "metrics listening");
    Ok(MetricsServer { addr: bound, task })
}

/// Largest request head read; longer requests are answered 431.
const MAX_HEAD: usize = 16 * 1024;

async fn answer(mut sock: TcpStream, status: StatusFn) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(p);
        }
        if buf.len() > MAX_HEAD {
            break None;
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (code, reason, ctype, body) = match head_end {
        None => (
            431,
            "Request Header Fields Too Large",
            "text/plain",
            String::new(),
        ),
        Some(end) => {
            let head = String::from_utf8_lossy(&buf[..end]);
            let line = head.lines().next().unwrap_or("");
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or("");
            let target = parts.next().unwrap_or("");
            let path = target.split('?').next().unwrap_or("");
            match (method, path) {
                ("GET" | "HEAD", "/metrics") => (200, "OK", CONTENT_TYPE, render(&status())),
                (_, "/metrics") => (
                    405,
                    "Method Not Allowed",
                    "text/plain",
                    "use GET\n".to_string(),
                ),
                _ => (
                    404,
                    "Not Found",
                    "text/plain",
                    "not found: the metrics are at /metrics\n".to_string(),
                ),
            }
        }
    };
    let is_head = buf.starts_with(b"HEAD ");
    let mut resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !is_head {
        resp.extend_from_slice(body.as_bytes());
    }
    sock.write_all(&resp).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::JobStatusResponse {
        pb::JobStatusResponse {
            job_id: "j\"1".into(),
            shards_total: 10,
            shards_committed: 4,
            shards_leased: 2,
            shards_pending: 4,
            lease_expiries: 1,
            re_leases: 3,
            speculative_leases: 0,
            bytes_received: 12345,
            results_rejected: 2,
            results_dropped: 1,
            workers: vec![
                pb::WorkerStatus {
                    worker_id: 7,
                    name: "pod-a".into(),
                    shards_done: 3,
                    bytes_received: 1000,
                    ..Default::default()
                },
                pb::WorkerStatus {
                    worker_id: 8,
                    name: "we\\ird\n\"name\"".into(),
                    shards_done: 1,
                    bytes_received: 11345,
                    ..Default::default()
                },
            ],
            done: false,
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_label_value("plain"), "plain");
    }

    #[test]
    fn render_has_every_series_with_help_and_type() {
        let text = render(&sample());
        for line in [
            "amalgam_shards_total 10",
            "amalgam_shards_committed 4",
            "amalgam_shards_pending 4",
            "amalgam_shards_leased 2",
            "amalgam_lease_expiries_total 1",
            "amalgam_releases_total 3",
            "amalgam_bytes_received_total 12345",
            "amalgam_results_rejected_total 2",
            "amalgam_results_dropped_total 1",
            "# TYPE amalgam_input_bytes_streamed_total counter",
            "amalgam_workers 2",
            "amalgam_job_done 0",
            "amalgam_job_info{job=\"j\\\"1\"} 1",
            "amalgam_worker_shards_done{worker=\"pod-a\",worker_id=\"7\"} 3",
            "amalgam_worker_bytes{worker=\"pod-a\",worker_id=\"7\"} 1000",
            "amalgam_worker_shards_done{worker=\"we\\\\ird\\n\\\"name\\\"\",worker_id=\"8\"} 1",
            "# TYPE amalgam_lease_expiries_total counter",
            "# TYPE amalgam_shards_pending gauge",
            "# HELP amalgam_worker_bytes Result bytes received from this worker.",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line belongs to a family announced by a TYPE line before it, and each
        // family is announced once.
        let mut typed = std::collections::BTreeSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(typed.insert(name.to_string()), "{name} typed twice");
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{name} has no TYPE line before it");
            }
        }
        assert!(text.ends_with('\n'));
    }

    async fn http_get(addr: SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_404() {
        let st: StatusFn = Arc::new(sample);
        let m = serve_metrics("127.0.0.1:0".parse().unwrap(), st)
            .await
            .unwrap();
        let addr = m.local_addr();
        let r = http_get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), len);
        assert!(body.contains("amalgam_shards_total 10\n"));
        let r = http_get(addr, "GET /other HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
        let r = http_get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        let r = http_get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        m.shutdown().await;
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }
}
