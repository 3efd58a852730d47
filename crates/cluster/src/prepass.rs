//! The model-global pre-pass of a merge (G-class methods, e.g. whole-model TIES), run on the
//! workers as the first phases of a phased job.
//!
//! - **Phases.** A method with `P` global passes makes `P + 1` phases: pass 0, ..., pass
//!   `P - 1`, then the merge. Each pass is cut into the same shards as the merge (whole
//!   tensors, copied tensors left out); a pass-`p` shard carries the reduced results of passes
//!   `0..p` in its job spec, and the merge shards carry all of them.
//! - **Results.** A worker returns, for its shard, the tensors' counts (histograms) added
//!   together, and each tensor's f64 sums separately ([`encode_pass_result`]): counts are
//!   integers, exact in any grouping, while f64 sums must be added tensor by tensor in plan
//!   order to give the bits a single process gives. Counts go sparse (index, count) unless
//!   dense is smaller, so a whole-model TIES histogram costs kilobytes, not megabytes.
//! - **Reduction.** The coordinator adds the shards' results in shard order
//!   ([`reduce_pass`]), exactly as `run::global_passes` adds tensors in one process.

use amalgam_core::methods::GlobalStats;

use crate::error::{ClusterError, Result};

const MAGIC: &[u8; 8] = b"AMPASS01";
const SPARSE: u8 = 0;
const DENSE: u8 = 1;
/// Most counts a result may hold (1024 models' 65536-bucket histograms); a longer claim is a
/// malformed result, refused before anything is allocated.
const MAX_COUNTS: u64 = 1 << 26;

/// One shard's part of a global pass: its tensors' counts added together, and each tensor's
/// sums in plan order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassResult {
    /// Counts of every tensor of the shard, added elementwise.
    pub counts: Vec<u64>,
    /// Each tensor's sums, in the shard's order.
    pub sums: Vec<Vec<f64>>,
}

impl PassResult {
    /// Adds tensor statistics `t` (the next tensor of the shard).
    pub fn push(&mut self, t: GlobalStats) {
        let mut c = GlobalStats {
            counts: std::mem::take(&mut self.counts),
            sums: Vec::new(),
        };
        c.add_counts(&t.counts);
        self.counts = c.counts;
        self.sums.push(t.sums);
    }
}

fn put(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Bytes of a [`PassResult`]: magic, counts (sparse `(u32 index, u64 count)` pairs or dense
/// u64s, whichever is smaller), then each tensor's sums (length, f64s), all little-endian.
pub fn encode_pass_result(r: &PassResult) -> Vec<u8> {
    let nnz = r.counts.iter().filter(|c| **c != 0).count();
    let sparse = r.counts.len() <= u32::MAX as usize && nnz * 12 < r.counts.len() * 8;
    let mut out = Vec::with_capacity(64 + nnz * 12);
    out.extend_from_slice(MAGIC);
    put(&mut out, r.counts.len() as u64);
    if sparse {
        out.push(SPARSE);
        put(&mut out, nnz as u64);
        for (i, c) in r.counts.iter().enumerate().filter(|(_, c)| **c != 0) {
            out.extend_from_slice(&(i as u32).to_le_bytes());
            put(&mut out, *c);
        }
    } else {
        out.push(DENSE);
        for c in &r.counts {
            put(&mut out, *c);
        }
    }
    put(&mut out, r.sums.len() as u64);
    for s in &r.sums {
        put(&mut out, s.len() as u64);
        for v in s {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| bad("it ends early"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A length whose items take at least `item` bytes each: checked against what is left
    /// before anything is allocated.
    fn len(&mut self, item: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.b.len() - self.at) as u64;
        if n.saturating_mul(item as u64) > left {
            return Err(bad("a length runs past the end"));
        }
        Ok(n as usize)
    }
}

fn bad(m: &str) -> ClusterError {
    ClusterError::Protocol(format!("malformed pre-pass result: {m}"))
}

/// Read bytes made by [`encode_pass_result`].
pub fn decode_pass_result(b: &[u8]) -> Result<PassResult> {
    let mut c = Cursor { b, at: 0 };
    if c.take(8)? != MAGIC {
        return Err(bad("wrong magic"));
    }
    let n = c.u64()?;
    if n > MAX_COUNTS {
        return Err(bad("too many counts"));
    }
    let counts = match c.take(1)?[0] {
        SPARSE => {
            let n = n as usize;
            let nnz = c.len(12)?;
            let mut counts = vec![0u64; n];
            let mut last: Option<usize> = None;
            for _ in 0..nnz {
                let i = u32::from_le_bytes(c.take(4)?.try_into().expect("4 bytes")) as usize;
                if i >= n || last.is_some_and(|l| i <= l) {
                    return Err(bad("count indices out of range or out of order"));
                }
                last = Some(i);
                counts[i] = c.u64()?;
            }
            counts
        }
        DENSE => {
            let left = (b.len() - c.at) as u64;
            if n.saturating_mul(8) > left {
                return Err(bad("a length runs past the end"));
            }
            (0..n).map(|_| c.u64()).collect::<Result<_>>()?
        }
        _ => return Err(bad("unknown count encoding")),
    };
    let tensors = c.len(8)?;
    let mut sums = Vec::with_capacity(tensors);
    for _ in 0..tensors {
        let k = c.len(8)?;
        let s = (0..k)
            .map(|_| c.u64().map(f64::from_bits))
            .collect::<Result<Vec<_>>>()?;
        sums.push(s);
    }
    if c.at != b.len() {
        return Err(bad("bytes after the end"));
    }
    Ok(PassResult { counts, sums })
}

/// The result of a pass: the shards' results added in shard order (counts exactly, sums
/// tensor by tensor), as one process adds tensors in plan order.
pub fn reduce_pass(shards: impl IntoIterator<Item = PassResult>) -> GlobalStats {
    let mut acc = GlobalStats::default();
    for r in shards {
        acc.add_counts(&r.counts);
        for s in &r.sums {
            acc.add_sums(s);
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip_sparse_and_dense() {
        let mut sparse = vec![0u64; 1 << 16];
        sparse[3] = 7;
        sparse[65535] = u64::MAX;
        let dense: Vec<u64> = (1..=100).collect();
        for counts in [sparse, dense, Vec::new()] {
            let r = PassResult {
                counts,
                sums: vec![vec![1.5, -0.0, f64::MIN_POSITIVE / 3.0], vec![], vec![0.1]],
            };
            let b = encode_pass_result(&r);
            let back = decode_pass_result(&b).unwrap();
            assert_eq!(back.counts, r.counts);
            let bits = |s: &Vec<Vec<f64>>| -> Vec<Vec<u64>> {
                s.iter()
                    .map(|v| v.iter().map(|x| x.to_bits()).collect())
                    .collect()
            };
            assert_eq!(bits(&back.sums), bits(&r.sums));
        }
        // A sparse histogram of 65536 buckets with two used costs a few dozen bytes.
        let mut h = vec![0u64; 1 << 16];
        h[1] = 1;
        h[2] = 2;
        assert!(
            encode_pass_result(&PassResult {
                counts: h,
                sums: vec![]
            })
            .len()
                < 64
        );
    }

    #[test]
    fn malformed_results_are_refused() {
        let r = PassResult {
            counts: vec![0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            sums: vec![vec![2.0]],
        };
        let b = encode_pass_result(&r);
        for cut in 0..b.len() {
            assert!(decode_pass_result(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode_pass_result(&long).is_err());
        let mut huge = b.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_pass_result(&huge).is_err());
    }

    /// Shard-wise reduction gives the bits of the tensor-by-tensor fold of one process,
    /// whatever the cut into shards.
    #[test]
    fn reduction_matches_the_plan_order_fold() {
        let tensors: Vec<GlobalStats> = (0..7u64)
            .map(|t| GlobalStats {
                counts: (0..5).map(|i| (t * 31 + i * 7) % 4).collect(),
                sums: vec![0.1 * (t as f64 + 1.0), 1e16 / (t as f64 + 3.0), -1.0 / 3.0],
            })
            .collect();
        // Naive reference: counts as exact integer totals, sums left to right in f64.
        let counts: Vec<u64> = (0..5)
            .map(|i| tensors.iter().map(|t| t.counts[i]).sum())
            .collect();
        let sums: Vec<f64> = (0..3)
            .map(|j| {
                let mut s = tensors[0].sums[j];
                for t in &tensors[1..] {
                    s += t.sums[j];
                }
                s
            })
            .collect();
        for cut in [vec![7], vec![1, 6], vec![3, 1, 3], vec![1; 7]] {
            let mut it = tensors.iter().cloned();
            let shards: Vec<PassResult> = cut
                .iter()
                .map(|n| {
                    let mut r = PassResult::default();
                    for t in it.by_ref().take(*n) {
                        r.push(t);
                    }
                    r
                })
                .collect();
            let got = reduce_pass(shards);
            assert_eq!(got.counts, counts, "{cut:?}");
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.sums), bits(&sums), "{cut:?}");
        }
    }
}
