//! Crash-safe file creation: write under a temporary name in the same directory, fsync,
//! rename. A killed process leaves only `.NAME.partial` files, never a half-written file
//! under its final name.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::IoError;

/// This process's unfinished outputs (temporary files and staging directories), for
/// [`remove_staged_and_exit`].
static STAGED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn staged_set() -> MutexGuard<'static, BTreeSet<PathBuf>> {
    STAGED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Creates a temporary file or staging directory with `create`, recording `path` as unfinished
/// output. Recording and creating happen under one lock, so an interrupt that removes the staged
/// paths never misses one being created.
pub fn stage<T>(path: &Path, create: impl FnOnce() -> T) -> T {
    let mut set = staged_set();
    set.insert(path.to_path_buf());
    create()
}

/// Forgets `path`: it was renamed into place or removed.
pub fn unstage(path: &Path) {
    staged_set().remove(path);
}

/// For an interrupt (Ctrl-C) handler: removes every unfinished output this process has staged,
/// calls `report` with the paths removed, and exits with `code`, holding the lock so that no
/// other thread creates another one meanwhile. Finished files are never touched.
pub fn remove_staged_and_exit(code: i32, report: impl FnOnce(&[PathBuf])) -> ! {
    let set = staged_set();
    let mut removed = Vec::new();
    for p in set.iter() {
        let gone = if p.is_dir() {
            std::fs::remove_dir_all(p).is_ok()
        } else {
            std::fs::remove_file(p).is_ok()
        };
        if gone {
            removed.push(p.clone());
        }
    }
    report(&removed);
    std::process::exit(code)
}

/// The temporary name used while writing `path`: `.NAME.partial` in the same directory.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// Writes `text` to `path` atomically (temporary file, fsync, rename).
pub fn write_text_atomic(path: &Path, text: &str) -> Result<(), IoError> {
    write_bytes_atomic(path, text.as_bytes())
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub(crate) fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f =
            stage(&tmp, || File::create(&tmp)).map_err(|e| IoError::io(&tmp, "create", e))?;
        f.write_all(bytes)
            .map_err(|e| IoError::io(&tmp, "write", e))?;
        f.sync_all().map_err(|e| IoError::io(&tmp, "fsync", e))?;
        drop(f);
        rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    unstage(&tmp);
    result
}

/// Renames `from` to `to` and fsyncs the parent directory so the rename survives a crash.
pub(crate) fn rename(from: &Path, to: &Path) -> Result<(), IoError> {
    std::fs::rename(from, to).map_err(|e| IoError::io(to, "rename", e))?;
    if let Some(dir) = to.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Best-effort fsync of a directory (not supported on every platform and filesystem).
pub(crate) fn sync_dir(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_text_atomic(&p, "hello").unwrap();
        write_text_atomic(&p, "world").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "world");
        assert!(!temp_path(&p).exists());
        assert_eq!(temp_path(&p).file_name().unwrap(), ".a.txt.partial");
    }
}
