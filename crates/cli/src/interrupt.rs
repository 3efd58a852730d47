//! Ctrl-C (SIGINT) and SIGTERM: remove this process's unfinished output files, then exit.
//!
//! Outputs are written under temporary names and renamed into place when complete, so an
//! interrupted run never leaves a partial file under a final name; this also removes the
//! temporary files and staging directories instead of leaving them for the next run to clear.

/// The exit status of an interrupted run (128 + SIGINT, as shells report it).
const INTERRUPTED: i32 = 130;

/// Installs the handler (once, at start-up). A failure to install it only loses the clean-up.
pub fn install() {
    let installed = ctrlc::set_handler(|| {
        amalgam_io::remove_staged_and_exit(INTERRUPTED, |removed| {
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
