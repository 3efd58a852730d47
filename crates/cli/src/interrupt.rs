//! Ctrl-C (SIGINT) and SIGTERM: stop the child processes, remove this process's unfinished
//! output files, then exit.
//!
//! Outputs are written under temporary names and renamed into place when complete, so an
//! interrupted run never leaves a partial file under a final name; this also removes the
//! temporary files and staging directories instead of leaving them for the next run to clear.
//! Child processes (a study's merges and evaluations) are sent SIGTERM and waited for, so they
//! clean up theirs before this process exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The exit status of an interrupted run (128 + SIGINT, as shells report it).
pub const EXIT_STATUS: i32 = 130;

/// Set by the handler, before it stops the children.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Child processes running now.
static CHILDREN: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// How long the handler waits for the children to clean up and exit.
const CHILD_GRACE: Duration = Duration::from_secs(10);

/// Whether this process is being interrupted (it will exit shortly).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Blocks the calling thread for good when this process is being interrupted: the handler
/// exits the process. Callers use it where going on would record an interrupted child as a
/// failure.
pub fn wait_if_interrupted() {
    while interrupted() {
        std::thread::park_timeout(Duration::from_secs(60));
    }
}

/// Whether a child's end (a `wait` status) looks like an interrupt: it was killed by SIGINT or
/// SIGTERM, or exited with [`EXIT_STATUS`]. A terminal's Ctrl-C reaches the child and this
/// process together; this waits a moment for this process's handler before answering, so the
/// caller can tell an interrupt of the whole run from a child that failed alone.
pub fn ended_by_interrupt(status: libc::c_int) -> bool {
    let by_signal =
        libc::WIFSIGNALED(status) && matches!(libc::WTERMSIG(status), libc::SIGINT | libc::SIGTERM);
    let by_exit = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == EXIT_STATUS;
    if !(by_signal || by_exit) {
        return false;
    }
    let until = Instant::now() + Duration::from_millis(500);
    while !interrupted() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    interrupted()
}

fn children() -> std::sync::MutexGuard<'static, Vec<libc::pid_t>> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running child process, known to the handler until dropped.
#[derive(Debug)]
pub struct TrackedChild(libc::pid_t);

impl TrackedChild {
    /// Tracks `pid`, or, when this process is being interrupted, stops it at once.
    pub fn new(pid: libc::pid_t) -> TrackedChild {
        let mut list = children();
        if interrupted() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        list.push(pid);
        TrackedChild(pid)
    }
}

impl Drop for TrackedChild {
    fn drop(&mut self) {
        children().retain(|&p| p != self.0);
    }
}

/// Stops every tracked child (SIGTERM) and waits up to [`CHILD_GRACE`] for the threads waiting
/// on them to see them end (a child is tracked until its waiter has reaped it).
fn stop_children() {
    for &pid in children().iter() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let until = Instant::now() + CHILD_GRACE;
    while !children().is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Installs the handler (once, at start-up). A failure to install it only loses the clean-up.
pub fn install() {
    let installed = ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        stop_children();
        amalgam_io::remove_staged_and_exit(EXIT_STATUS, |removed| {
            if removed.is_empty() {
                eprintln!("interrupted");
            } else {
                let names: Vec<String> = removed.iter().map(|p| p.display().to_string()).collect();
                eprintln!(
                    "interrupted: removed the unfinished output {}; finished files are untouched",
                    names.join(", ")
                );
            }
        })
    });
    if let Err(e) = installed {
        tracing::debug!(error = %e, "no interrupt handler");
    }
}
