//! `--allow-root`: the directories a worker may read and write, and the check every path of a
//! plan goes through before a worker touches it.
//!
//! Roots are canonicalised once, when [`AllowedRoots::new`] builds the set (a root that does
//! not exist is an error). [`AllowedRoots::check`] canonicalises the path it is given (resolving
//! `.`, `..` and every symlink) and accepts it only when the result equals a root or lies below
//! one, compared component by component: `/data2/x` is not under `/data`, `/data/../etc` is
//! `/etc`, and a symlink inside a root that points outside it resolves to its target outside.
//!
//! A path that does not exist yet (an output file) is checked through its parent directory,
//! which must exist: the parent is canonicalised and the file name appended. A dangling
//! symlink in that last position is refused (writing through it would create its target,
//! wherever that is).
//!
//! An empty set of roots refuses every path: a worker without `--allow-root` can only work on
//! inputs streamed from the coordinator and results streamed back.

use std::path::{Component, Path, PathBuf};

use crate::error::{ClusterError, Result};

/// A set of canonical root directories; see the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedRoots {
    roots: Vec<PathBuf>,
}

impl AllowedRoots {
    /// Canonicalises every root. A root that does not exist or is not a directory is an
    /// error naming it. An empty list gives a set that refuses every path.
    pub fn new<I, P>(roots: I) -> Result<Self>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<Path>,
    {
        let mut out: Vec<PathBuf> = Vec::new();
        for r in roots {
            let r = r.as_ref();
            let canon = std::fs::canonicalize(r)
                .map_err(|e| ClusterError::Config(format!("allowed root {}: {e}", r.display())))?;
            if !canon.is_dir() {
                return Err(ClusterError::Config(format!(
                    "allowed root {} is not a directory",
                    r.display()
                )));
            }
            if !out.contains(&canon) {
                out.push(canon);
            }
        }
        Ok(AllowedRoots { roots: out })
    }

    /// The canonical roots, in the order given (duplicates removed).
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// True when no root is configured (every path is refused).
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The canonical form of `path` when it equals or lies below a root; an error naming the
    /// path and the roots otherwise. `path` must exist, or be a new file in an existing
    /// directory (see the module docs).
    pub fn check(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        let canon = canonical_or_new(path)?;
        if self.roots.iter().any(|r| canon.starts_with(r)) {
            return Ok(canon);
        }
        let resolved = if canon.as_path() == path {
            String::new()
        } else {
            format!(" (resolves to {})", canon.display())
        };
        Err(ClusterError::PathRefused(format!(
            "{}{resolved} is outside the allowed roots {}",
            path.display(),
            self.describe()
        )))
    }

    /// Checks every path of a plan (inputs and outputs); the canonical paths in order, or the
    /// first refusal. A worker refuses the whole plan when one path is outside its roots.
    pub fn check_all<I, P>(&self, paths: I) -> Result<Vec<PathBuf>>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<Path>,
    {
        paths.into_iter().map(|p| self.check(p)).collect()
    }

    /// The roots as a readable list, e.g. `[/data, /out]`, or a note when there is none.
    pub fn describe(&self) -> String {
        if self.roots.is_empty() {
            return "[] (no --allow-root given: every path is refused)".into();
        }
        let names: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        format!("[{}]", names.join(", "))
    }
}

/// Canonical form of an existing path, or of a new file's existing parent plus its name.
fn canonical_or_new(path: &Path) -> Result<PathBuf> {
    match std::fs::canonicalize(path) {
        Ok(c) => return Ok(c),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ClusterError::PathRefused(format!(
                "{}: cannot resolve: {e}",
                path.display()
            )))
        }
        Err(_) => {}
    }
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(ClusterError::PathRefused(format!(
            "{} is a dangling symlink",
            path.display()
        )));
    }
    let name = match path.components().next_back() {
        Some(Component::Normal(n)) => n,
        _ => {
            return Err(ClusterError::PathRefused(format!(
                "{} does not exist and does not end in a file name",
                path.display()
            )))
        }
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = std::fs::canonicalize(parent).map_err(|e| {
        ClusterError::PathRefused(format!(
            "{}: its directory {} cannot be resolved: {e}",
            path.display(),
            parent.display()
        ))
    })?;
    Ok(parent.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Tree {
        _dir: tempfile::TempDir,
        base: PathBuf,
    }

    /// base/data/{a.bin, sub/b.bin}, base/data2/c.bin, base/secret.bin.
    fn tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(base.join("data/sub")).unwrap();
        std::fs::create_dir_all(base.join("data2")).unwrap();
        std::fs::write(base.join("data/a.bin"), b"a").unwrap();
        std::fs::write(base.join("data/sub/b.bin"), b"b").unwrap();
        std::fs::write(base.join("data2/c.bin"), b"c").unwrap();
        std::fs::write(base.join("secret.bin"), b"s").unwrap();
        Tree { _dir: dir, base }
    }

    #[test]
    fn paths_inside_a_root_are_accepted_canonically() {
        let t = tree();
        let roots = AllowedRoots::new([t.base.join("data")]).unwrap();
        assert_eq!(
            roots.check(t.base.join("data/a.bin")).unwrap(),
            t.base.join("data/a.bin")
        );
        assert_eq!(
            roots.check(t.base.join("data/sub/../sub/./b.bin")).unwrap(),
            t.base.join("data/sub/b.bin")
        );
        // The root itself.
        assert_eq!(
            roots.check(t.base.join("data")).unwrap(),
            t.base.join("data")
        );
        // A root given with `..` and a trailing slash is canonicalised.
        let r2 = AllowedRoots::new([t.base.join("data2/../data/")]).unwrap();
        assert_eq!(r2.roots(), &[t.base.join("data")]);
        assert!(r2.check(t.base.join("data/a.bin")).is_ok());
    }

    #[test]
    fn dotdot_escape_is_refused() {
        let t = tree();
        let roots = AllowedRoots::new([t.base.join("data")]).unwrap();
        let p = t.base.join("data/sub/../../secret.bin");
        let e = roots.check(&p).unwrap_err().to_string();
        assert!(e.contains("outside the allowed roots"), "{e}");
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(
            e.contains(&t.base.join("data").display().to_string()),
            "{e}"
        );
        assert!(e.contains("resolves to"), "{e}");
        // A new output file via `..` out of the root.
        assert!(roots.check(t.base.join("data/../new.bin")).is_err());
    }

    #[test]
    fn symlink_escape_is_refused() {
        let t = tree();
        let roots = AllowedRoots::new([t.base.join("data")]).unwrap();
        symlink(t.base.join("secret.bin"), t.base.join("data/link.bin")).unwrap();
        symlink(&t.base, t.base.join("data/up")).unwrap();
        assert!(roots.check(t.base.join("data/link.bin")).is_err());
        assert!(roots.check(t.base.join("data/up/secret.bin")).is_err());
        // A new file through a symlinked directory that escapes.
        assert!(roots.check(t.base.join("data/up/new.bin")).is_err());
        // A dangling symlink (pointing outside) as an output name.
        symlink(t.base.join("nowhere.bin"), t.base.join("data/dangling.bin")).unwrap();
        let e = roots.check(t.base.join("data/dangling.bin")).unwrap_err();
        assert!(e.to_string().contains("dangling symlink"), "{e}");
        // A symlink that stays inside the root is fine.
        symlink(t.base.join("data/sub/b.bin"), t.base.join("data/inner.bin")).unwrap();
        assert_eq!(
            roots.check(t.base.join("data/inner.bin")).unwrap(),
            t.base.join("data/sub/b.bin")
        );
    }

    #[test]
    fn sibling_with_a_common_prefix_is_not_under_the_root() {
        let t = tree();
        let roots = AllowedRoots::new([t.base.join("data")]).unwrap();
        let e = roots.check(t.base.join("data2/c.bin")).unwrap_err();
        assert!(e.to_string().contains("outside the allowed roots"), "{e}");
        assert!(roots.check(t.base.join("data2")).is_err());
        // A plan with one path outside is refused as a whole.
        let e = roots
            .check_all([t.base.join("data/a.bin"), t.base.join("data2/c.bin")])
            .unwrap_err();
        assert!(e.to_string().contains("data2"), "{e}");
        assert_eq!(
            roots
                .check_all([t.base.join("data/a.bin"), t.base.join("data/sub/b.bin")])
                .unwrap()
                .len(),
            2
        );
        // With both roots, both are accepted.
        let both = AllowedRoots::new([t.base.join("data"), t.base.join("data2")]).unwrap();
        assert!(both.check(t.base.join("data2/c.bin")).is_ok());
        assert!(both.check(t.base.join("data/a.bin")).is_ok());
    }

    #[test]
    fn new_output_file_under_a_root_is_accepted() {
        let t = tree();
        let roots = AllowedRoots::new([t.base.join("data")]).unwrap();
        assert_eq!(
            roots
                .check(t.base.join("data/sub/out.safetensors"))
                .unwrap(),
            t.base.join("data/sub/out.safetensors")
        );
        // Its directory must exist.
        let e = roots
            .check(t.base.join("data/missing/out.bin"))
            .unwrap_err();
        assert!(e.to_string().contains("cannot be resolved"), "{e}");
        // A nonexistent path ending in `..` has no file name.
        assert!(roots.check(t.base.join("data/missing/..")).is_err());
    }

    #[test]
    fn empty_root_list_refuses_everything_and_missing_roots_are_errors() {
        let t = tree();
        let none = AllowedRoots::new(Vec::<PathBuf>::new()).unwrap();
        assert!(none.is_empty());
        let e = none
            .check(t.base.join("data/a.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("every path is refused"), "{e}");
        let e = AllowedRoots::new([t.base.join("nope")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let e = AllowedRoots::new([t.base.join("secret.bin")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a directory"), "{e}");
    }
}
