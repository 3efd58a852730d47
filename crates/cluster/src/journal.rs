//! Job state store: the plan hash and the committed shards of a job, so that a restarted
//! coordinator re-issues only uncommitted shards.
//!
//! [`JobStore`] is small on purpose so an etcd implementation fits (a key for the plan hash,
//! one key per committed shard, written in a transaction). [`JournalStore`] is the local
//! implementation used in embedded mode: an append-only JSON-lines file, fsynced per record,
//! that tolerates a torn last line (a crash in the middle of an append).

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{ClusterError, Result};
use crate::scheduler::ShardId;

/// One committed shard as recorded in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The shard.
    pub shard_id: ShardId,
    /// Lower-case hex sha256 of the shard's result bytes.
    pub sha256: String,
    /// Result size in bytes.
    pub bytes: u64,
}

/// The state of a job as loaded from a store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobState {
    /// Hash of the plan the commits belong to.
    pub plan_hash: String,
    /// Committed shards, in the order they were recorded (a shard appears once).
    pub committed: Vec<CommitRecord>,
}

impl JobState {
    /// The committed shard ids (for [`crate::scheduler::Scheduler::with_committed`]).
    pub fn committed_ids(&self) -> BTreeSet<ShardId> {
        self.committed.iter().map(|c| c.shard_id).collect()
    }
}

/// Durable job state. Implementations must make `record_commit` durable before returning.
pub trait JobStore: Send + Sync + 'static {
    /// The job's state, or `None` when the store has never seen the job.
    fn load(&self, job_id: &str) -> Result<Option<JobState>>;
    /// Starts (or restarts) the job with `plan_hash`: later `load`s return this plan hash and
    /// only commits recorded after this call.
    fn record_plan(&self, job_id: &str, plan_hash: &str) -> Result<()>;
    /// Records a committed shard.
    fn record_commit(&self, job_id: &str, commit: &CommitRecord) -> Result<()>;
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Line {
    Plan {
        job: String,
        plan_hash: String,
    },
    Commit {
        job: String,
        #[serde(flatten)]
        commit: CommitRecord,
    },
}

/// Append-only JSON-lines journal file implementing [`JobStore`].
#[derive(Debug)]
pub struct JournalStore {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl JournalStore {
    /// Opens (creating it if needed) the journal at `path`. A torn last line is cut off so the
    /// next append starts on a clean line; a bad line before the last one is an error.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| ClusterError::io(&path, e))?;
        let text = std::fs::read(&path).map_err(|e| ClusterError::io(&path, e))?;
        let (_, good_len) = parse(&path, &text)?;
        if good_len < text.len() {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = text.len() - good_len,
                "journal: cutting off a torn last line"
            );
            file.set_len(good_len as u64)
                .map_err(|e| ClusterError::io(&path, e))?;
            file.seek(SeekFrom::End(0))
                .map_err(|e| ClusterError::io(&path, e))?;
            file.sync_all().map_err(|e| ClusterError::io(&path, e))?;
        }
        Ok(JournalStore {
            path,
            file: Mutex::new(file),
        })
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, line: &Line) -> Result<()> {
        let mut text = serde_json::to_string(line)
            .map_err(|e| ClusterError::Store(format!("journal encode: {e}")))?;
        text.push('\n');
        let mut f = self
            .file
            .lock()
            .map_err(|_| ClusterError::Store("journal lock poisoned".into()))?;
        f.write_all(text.as_bytes())
            .map_err(|e| ClusterError::io(&self.path, e))?;
        f.sync_data().map_err(|e| ClusterError::io(&self.path, e))
    }
}

/// Parses journal text; returns the lines and the byte length of the good prefix.
fn parse(path: &Path, text: &[u8]) -> Result<(Vec<Line>, usize)> {
    let mut lines = Vec::new();
    let mut pos = 0usize;
    let mut good_len = 0usize;
    while pos < text.len() {
        let end = text[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i + 1);
        let (raw, next, terminated) = match end {
            Some(e) => (&text[pos..e - 1], e, true),
            None => (&text[pos..], text.len(), false),
        };
        let is_last = next == text.len();
        if raw.iter().all(|b| b.is_ascii_whitespace()) && terminated {
            pos = next;
            good_len = next;
            continue;
        }
        match serde_json::from_slice::<Line>(raw) {
            Ok(line) if terminated => {
                lines.push(line);
                good_len = next;
            }
            Err(e) if !is_last => {
                return Err(ClusterError::Store(format!(
                    "{}: corrupt journal line at byte {pos}: {e}",
                    path.display()
                )))
            }
            // An unterminated or unparsable last line is a torn append.
            _ => break,
        }
        pos = next;
    }
    Ok((lines, good_len))
}

impl JobStore for JournalStore {
    fn load(&self, job_id: &str) -> Result<Option<JobState>> {
        let _guard = self
            .file
            .lock()
            .map_err(|_| ClusterError::Store("journal lock poisoned".into()))?;
        let text = std::fs::read(&self.path).map_err(|e| ClusterError::io(&self.path, e))?;
        let (lines, _) = parse(&self.path, &text)?;
        let mut state: Option<JobState> = None;
        let mut seen = BTreeSet::new();
        for line in lines {
            match line {
                Line::Plan { job, plan_hash } if job == job_id => {
                    seen.clear();
                    state = Some(JobState {
                        plan_hash,
                        committed: Vec::new(),
                    });
                }
                Line::Commit { job, commit } if job == job_id => {
                    let Some(st) = state.as_mut() else {
                        return Err(ClusterError::Store(format!(
                            "{}: job {job_id}: commit of shard {} before any plan record",
                            self.path.display(),
                            commit.shard_id
                        )));
                    };
                    if seen.insert(commit.shard_id) {
                        st.committed.push(commit);
                    }
                }
                _ => {}
            }
        }
        Ok(state)
    }

    fn record_plan(&self, job_id: &str, plan_hash: &str) -> Result<()> {
        self.append(&Line::Plan {
            job: job_id.to_string(),
            plan_hash: plan_hash.to_string(),
        })
    }

    fn record_commit(&self, job_id: &str, commit: &CommitRecord) -> Result<()> {
        self.append(&Line::Commit {
            job: job_id.to_string(),
            commit: commit.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{LeaseDecision, Scheduler, ShardSpec};

    fn rec(id: u64) -> CommitRecord {
        CommitRecord {
            shard_id: id,
            sha256: format!("{id:064x}"),
            bytes: 100 + id,
        }
    }

    #[test]
    fn commit_two_of_five_reload_issues_the_other_three() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.journal");
        {
            let j = JournalStore::open(&path).unwrap();
            assert_eq!(j.load("job1").unwrap(), None);
            j.record_plan("job1", "plan-a").unwrap();
            j.record_commit("job1", &rec(1)).unwrap();
            j.record_commit("job1", &rec(3)).unwrap();
            j.record_commit("other", &rec(2)).unwrap();
        }
        let j = JournalStore::open(&path).unwrap();
        let st = j.load("job1").unwrap().unwrap();
        assert_eq!(st.plan_hash, "plan-a");
        assert_eq!(st.committed, vec![rec(1), rec(3)]);
        let shards: Vec<ShardSpec> = (0..5)
            .map(|id| ShardSpec {
                id,
                est_bytes: 1,
                gang: None,
                spec: Vec::new(),
            })
            .collect();
        let mut s = Scheduler::with_committed(&shards, &st.committed_ids(), 100).unwrap();
        let mut issued = Vec::new();
        while let LeaseDecision::Granted(g) = s.lease(1, 0) {
            issued.extend(g.shards);
        }
        assert_eq!(issued, vec![0, 2, 4]);
    }

    #[test]
    fn torn_last_line_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let j = JournalStore::open(&path).unwrap();
            j.record_plan("a", "h").unwrap();
            j.record_commit("a", &rec(0)).unwrap();
        }
        // Simulate a crash in the middle of an append.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(br#"{"kind":"commit","job":"a","shard_id":1,"sha2"#)
            .unwrap();
        drop(f);
        let j = JournalStore::open(&path).unwrap();
        assert_eq!(j.load("a").unwrap().unwrap().committed, vec![rec(0)]);
        j.record_commit("a", &rec(2)).unwrap();
        drop(j);
        let j = JournalStore::open(&path).unwrap();
        assert_eq!(
            j.load("a").unwrap().unwrap().committed,
            vec![rec(0), rec(2)]
        );
    }

    #[test]
    fn corrupt_middle_line_is_an_error_and_new_plan_resets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(&path, "{\"kind\":\"plan\",\"job\":\"a\",\"plan_hash\":\"h\"}\ngarbage\n{\"kind\":\"plan\",\"job\":\"a\",\"plan_hash\":\"h\"}\n").unwrap();
        assert!(JournalStore::open(&path).is_err());

        let path2 = dir.path().join("j2");
        let j = JournalStore::open(&path2).unwrap();
        j.record_plan("a", "h1").unwrap();
        j.record_commit("a", &rec(0)).unwrap();
        j.record_commit("a", &rec(0)).unwrap(); // duplicate: kept once
        assert_eq!(j.load("a").unwrap().unwrap().committed, vec![rec(0)]);
        j.record_plan("a", "h2").unwrap();
        let st = j.load("a").unwrap().unwrap();
        assert_eq!(st.plan_hash, "h2");
        assert!(st.committed.is_empty());
    }
}
