//! Exact streaming selection: order statistics of a tensor (or of a whole model) without sorting
//! and without holding the data.
//!
//! methods.md §0 ("Numerics") and §3: top-k thresholds must be exact and deterministic (torch's
//! `kthvalue` on GPU is not). Every element gets a 32-bit *key* whose unsigned order is the order
//! we select in (for a magnitude `|x|` the f32 bit pattern itself; [`key_asc`] for signed values;
//! `!key` to select from the top). Elements are then ordered by `(key, flat index)`, so ties are
//! broken by the lowest index first, and the element at position `p` of that order is found by:
//!
//! 1. a histogram of the high 16 bits of every key ([`add_hist_hi`]), which locates the bucket
//!    holding position `p` ([`locate`]);
//! 2. a histogram of the low 16 bits of the keys inside that bucket ([`add_hist_lo`]), which gives
//!    the exact key `K` at position `p` and the number `less` of keys below it;
//! 3. only when some but not all elements equal to `K` fall before `p`: one scan in index order
//!    for the index of the `(p - less)`-th element equal to `K` ([`select_cuts`] does it, counting
//!    per block first so blocks may be processed in parallel).
//!
//! The result is a [`Cut`]: `cut.before(key, index)` is true exactly for the `p` elements
//! that precede position `p`. Counts are integers, so histograms summed over blocks, threads,
//! tensors (model-global selection through `GlobalStats`) or workers are exact in any order.

use crate::error::Result;
use rayon::prelude::*;
use std::ops::Range;

/// Number of buckets of one 16-bit histogram.
pub const BUCKETS: usize = 1 << 16;

/// Elements per parallel histogram chunk (below this a block is histogrammed sequentially).
const PAR_CHUNK: usize = 1 << 18;

/// A total-order key for an f32: unsigned key order equals numeric order (`-0.0` just below
/// `+0.0`; NaNs outside the finite range). For non-negative values (magnitudes) the plain bit
/// pattern `x.to_bits()` is already order-preserving and may be used instead.
#[inline]
pub fn key_asc(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// A position in the ascending `(key, flat index)` order of a set of elements.
///
/// `before(key, index)` holds exactly for the elements that come before the position. `index`
/// is an index *bound*, not necessarily the index of an element: elements with `key == self.key`
/// and an index below `self.index` come before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Key of the element at the position.
    pub key: u32,
    /// Elements with this key and a smaller flat index come before the position.
    pub index: u64,
}

impl Cut {
    /// The position after every element (everything comes before it).
    pub const END: Cut = Cut {
        key: u32::MAX,
        index: u64::MAX,
    };
    /// The first position (nothing comes before it).
    pub const START: Cut = Cut { key: 0, index: 0 };

    /// Whether the element `(key, index)` comes before this position.
    #[inline]
    pub fn before(&self, key: u32, index: u64) -> bool {
        key < self.key || (key == self.key && index < self.index)
    }
}

/// Add the high 16 bits of `keys` to `hist` (length [`BUCKETS`]).
pub fn add_hist_hi(keys: &[u32], hist: &mut [u64]) {
    add_hist(keys, hist, |k| Some((k >> 16) as usize));
}

/// Add the low 16 bits of the `keys` whose high 16 bits equal `hi` to `hist` (length
/// [`BUCKETS`]).
pub fn add_hist_lo(keys: &[u32], hi: u32, hist: &mut [u64]) {
    add_hist(keys, hist, |k| {
        if k >> 16 == hi {
            Some((k & 0xFFFF) as usize)
        } else {
            None
        }
    });
}

fn add_hist<F>(keys: &[u32], hist: &mut [u64], bucket: F)
where
    F: Fn(u32) -> Option<usize> + Sync,
{
    debug_assert_eq!(hist.len(), BUCKETS);
    if keys.len() < 2 * PAR_CHUNK {
        for &k in keys {
            if let Some(b) = bucket(k) {
                hist[b] += 1;
            }
        }
        return;
    }
    let partial = keys
        .par_chunks(PAR_CHUNK)
        .map(|chunk| {
            let mut h = vec![0u64; BUCKETS];
            for &k in chunk {
                if let Some(b) = bucket(k) {
                    h[b] += 1;
                }
            }
            h
        })
        .reduce(
            || vec![0u64; BUCKETS],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        );
    for (x, y) in hist.iter_mut().zip(&partial) {
        *x += y;
    }
}

/// The bucket holding position `p` (0-based) of a histogram, and the number of items in the
/// buckets below it. `p` must be below the histogram's total.
pub fn locate(hist: &[u64], p: u64) -> (usize, u64) {
    let mut less = 0u64;
    for (b, &c) in hist.iter().enumerate() {
        if p < less + c {
            return (b, less);
        }
        less += c;
    }
    // Unreachable for p < total; return the last bucket so callers stay panic-free.
    (hist.len().saturating_sub(1), less)
}

/// Where a selection stands after the two histogram passes for one position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRank {
    /// The key at the position.
    pub key: u32,
    /// Number of elements with a smaller key.
    pub less: u64,
    /// Number of elements with exactly this key.
    pub equal: u64,
}

impl KeyRank {
    /// The cut when `take` of the equal elements (in index order) come before the position and
    /// `take` is 0 or all of them (no index scan needed); `None` otherwise.
    pub fn cut_without_scan(&self, take: u64) -> Option<Cut> {
        if take == 0 {
            Some(Cut {
                key: self.key,
                index: 0,
            })
        } else if take >= self.equal {
            Some(Cut {
                key: self.key,
                index: u64::MAX,
            })
        } else {
            None
        }
    }
}

/// Combine the two histogram passes for position `p`: `hist_hi` over all keys, `hist_lo` the low
/// histogram of the bucket `locate(hist_hi, p).0`.
pub fn key_rank(hist_hi: &[u64], hist_lo: &[u64], p: u64) -> KeyRank {
    let (b_hi, less_hi) = locate(hist_hi, p);
    let (b_lo, less_lo) = locate(hist_lo, p - less_hi);
    KeyRank {
        key: ((b_hi as u32) << 16) | b_lo as u32,
        less: less_hi + less_lo,
        equal: hist_lo[b_lo],
    }
}

/// Find the cuts at `positions` (0-based; a position `>= n` gives [`Cut::END`]) of the ascending
/// `(key, flat index)` order of `n` elements, streaming.
///
/// `blocks` are consecutive ranges covering `0..n` in order; `fill(range, keys)` writes the keys
/// of the elements `range` into `keys` (of length `range.len()`) and may fail (read errors,
/// non-finite values). It is called two or three times per block.
pub fn select_cuts<F>(
    n: usize,
    blocks: &[Range<usize>],
    positions: &[u64],
    mut fill: F,
) -> Result<Vec<Cut>>
where
    F: FnMut(Range<usize>, &mut [u32]) -> Result<()>,
{
    let n64 = n as u64;
    let mut cuts = vec![Cut::END; positions.len()];
    let active: Vec<usize> = (0..positions.len())
        .filter(|&j| positions[j] < n64)
        .collect();
    if active.is_empty() {
        return Ok(cuts);
    }
    let max_block = blocks.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut keys = vec![0u32; max_block];

    // Pass 1: high histogram.
    let mut hist_hi = vec![0u64; BUCKETS];
    for r in blocks {
        let k = &mut keys[..r.len()];
        fill(r.clone(), k)?;
        add_hist_hi(k, &mut hist_hi);
    }
    // Pass 2: low histograms of the buckets holding a position.
    let mut his: Vec<u32> = active
        .iter()
        .map(|&j| locate(&hist_hi, positions[j]).0 as u32)
        .collect();
    his.sort_unstable();
    his.dedup();
    let mut hist_lo = vec![vec![0u64; BUCKETS]; his.len()];
    for r in blocks {
        let k = &mut keys[..r.len()];
        fill(r.clone(), k)?;
        for (h, hist) in his.iter().zip(hist_lo.iter_mut()) {
            add_hist_lo(k, *h, hist);
        }
    }
    // Resolve keys; collect positions that need an index scan: (slot, key, take).
    let mut scans: Vec<(usize, u32, u64)> = Vec::new();
    for &j in &active {
        let p = positions[j];
        let hi = locate(&hist_hi, p).0 as u32;
        let h = his.binary_search(&hi).expect("bucket recorded in pass 1");
        let kr = key_rank(&hist_hi, &hist_lo[h], p);
        let take = p - kr.less;
        match kr.cut_without_scan(take) {
            Some(c) => cuts[j] = c,
            None => scans.push((j, kr.key, take)),
        }
    }
    if scans.is_empty() {
        return Ok(cuts);
    }
    // Pass 3: find the index of the `take`-th (0-based) element equal to the key, in index order.
    let mut seen = vec![0u64; scans.len()];
    let mut done = vec![false; scans.len()];
    for r in blocks {
        if done.iter().all(|&d| d) {
            break;
        }
        let k = &mut keys[..r.len()];
        fill(r.clone(), k)?;
        for (s, &(j, key, take)) in scans.iter().enumerate() {
            if done[s] {
                continue;
            }
            let in_block = count_equal(k, key);
            if seen[s] + in_block <= take {
                seen[s] += in_block;
                continue;
            }
            let mut c = seen[s];
            for (off, &x) in k.iter().enumerate() {
                if x == key {
                    if c == take {
                        cuts[j] = Cut {
                            key,
                            index: (r.start + off) as u64,
                        };
                        break;
                    }
                    c += 1;
                }
            }
            done[s] = true;
        }
    }
    Ok(cuts)
}

/// Elements per parallel work item of the in-memory selection.
const MEM_CHUNK: usize = 1 << 16;

/// Bits dropped from a key for the coarse histogram (8192 buckets: measured fastest for TIES
/// among 2048..32768, as fewer candidates outweigh a histogram that no longer fits L1).
const COARSE_SHIFT: u32 = 19;

/// Histogram of `key(j) >> COARSE_SHIFT` over `0..n` (`n` at most `u32::MAX`): four
/// interleaved tables per chunk so that runs of equal keys do not serialise on one counter.
fn coarse_hist<K>(n: usize, key: &K) -> Vec<u64>
where
    K: Fn(usize) -> u32 + Sync,
{
    const NB: usize = 1 << (32 - COARSE_SHIFT);
    let h = (0..n.div_ceil(MEM_CHUNK))
        .into_par_iter()
        .fold(
            || vec![0u32; 4 * NB],
            |mut h, c| {
                let (lo, hi) = (c * MEM_CHUNK, ((c + 1) * MEM_CHUNK).min(n));
                let mut i = lo;
                while i + 4 <= hi {
                    let k0 = (key(i) >> COARSE_SHIFT) as usize;
                    let k1 = (key(i + 1) >> COARSE_SHIFT) as usize;
                    let k2 = (key(i + 2) >> COARSE_SHIFT) as usize;
                    let k3 = (key(i + 3) >> COARSE_SHIFT) as usize;
                    h[k0] += 1;
                    h[NB + k1] += 1;
                    h[2 * NB + k2] += 1;
                    h[3 * NB + k3] += 1;
                    i += 4;
                }
                for j in i..hi {
                    h[(key(j) >> COARSE_SHIFT) as usize] += 1;
                }
                h
            },
        )
        .reduce(
            || vec![0u32; 4 * NB],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        );
    (0..NB)
        .map(|b| (0..4).map(|t| u64::from(h[t * NB + b])).sum())
        .collect()
}

/// A histogram of `bucket(j)` over `j` in `0..n` (`n` at most `u32::MAX`), built in parallel
/// over fixed chunks; counts are exact integers, so the result does not depend on the split.
fn par_hist<F>(n: usize, bucket: F) -> Vec<u64>
where
    F: Fn(usize) -> Option<usize> + Sync,
{
    let chunks = n.div_ceil(MEM_CHUNK);
    let h = (0..chunks)
        .into_par_iter()
        .fold(
            || vec![0u32; BUCKETS],
            |mut h, c| {
                for j in c * MEM_CHUNK..((c + 1) * MEM_CHUNK).min(n) {
                    if let Some(b) = bucket(j) {
                        h[b] += 1;
                    }
                }
                h
            },
        )
        .reduce(
            || vec![0u32; BUCKETS],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        );
    h.into_iter().map(u64::from).collect()
}

/// [`select_cuts`] for elements held in memory: `key(j)` is the key of element `j` of `0..n`.
/// Gives the same cuts; the histograms and the index scan run in parallel over fixed chunks.
pub fn select_cuts_with<K>(n: usize, positions: &[u64], key: K) -> Vec<Cut>
where
    K: Fn(usize) -> u32 + Sync,
{
    if n > u32::MAX as usize {
        // Per-thread u32 counts could overflow: stream in blocks instead.
        const B: usize = 1 << 24;
        let blocks: Vec<Range<usize>> = (0..n.div_ceil(B))
            .map(|i| i * B..((i + 1) * B).min(n))
            .collect();
        return select_cuts(n, &blocks, positions, |r, keys| {
            for (k, j) in keys.iter_mut().zip(r) {
                *k = key(j);
            }
            Ok(())
        })
        .expect("filling keys from memory cannot fail");
    }
    let n64 = n as u64;
    let mut cuts = vec![Cut::END; positions.len()];
    let active: Vec<usize> = (0..positions.len())
        .filter(|&j| positions[j] < n64)
        .collect();
    if active.is_empty() {
        return cuts;
    }
    // Coarse pass: a small (cache-resident) histogram of the top bits; then the elements of
    // the bucket holding a position are gathered, in index order, and the exact
    // `(key, index)` element at the position is selected among them.
    let coarse = coarse_hist(n, &key);
    let mut remaining = Vec::new();
    for &j in &active {
        let p = positions[j];
        let (b, less) = locate(&coarse, p);
        if coarse[b] > (n as u64 / 2).max(1 << 16) {
            // Too many candidates to hold: the two 16-bit histogram passes instead.
            remaining.push(j);
            continue;
        }
        let b = b as u32;
        let mut cands: Vec<(u32, u32)> = (0..n.div_ceil(MEM_CHUNK))
            .into_par_iter()
            .map_init(
                || vec![(0u32, 0u32); MEM_CHUNK],
                |buf, c| {
                    // Branch-free compaction: always store, advance only on a match.
                    let mut m = 0;
                    for i in c * MEM_CHUNK..((c + 1) * MEM_CHUNK).min(n) {
                        let k = key(i);
                        buf[m] = (k, i as u32);
                        m += (k >> COARSE_SHIFT == b) as usize;
                    }
                    buf[..m].to_vec()
                },
            )
            .flatten()
            .collect();
        let r = (p - less) as usize;
        let (before, &mut (k0, i0), _) = cands.select_nth_unstable(r);
        // As `select_cuts`: index 0 when no element with this key precedes the position.
        let index = if before.iter().any(|&(k, _)| k == k0) {
            i0 as u64
        } else {
            0
        };
        cuts[j] = Cut { key: k0, index };
    }
    if remaining.is_empty() {
        return cuts;
    }
    let active = remaining;
    let hist_hi = par_hist(n, |j| Some((key(j) >> 16) as usize));
    let mut his: Vec<u32> = active
        .iter()
        .map(|&j| locate(&hist_hi, positions[j]).0 as u32)
        .collect();
    his.sort_unstable();
    his.dedup();
    let hist_lo: Vec<Vec<u64>> = his
        .iter()
        .map(|&h| {
            par_hist(n, |j| {
                let k = key(j);
                if k >> 16 == h {
                    Some((k & 0xFFFF) as usize)
                } else {
                    None
                }
            })
        })
        .collect();
    for &j in &active {
        let p = positions[j];
        let hi = locate(&hist_hi, p).0 as u32;
        let h = his.binary_search(&hi).expect("bucket recorded in pass 1");
        let kr = key_rank(&hist_hi, &hist_lo[h], p);
        let take = p - kr.less;
        cuts[j] = match kr.cut_without_scan(take) {
            Some(c) => c,
            None => {
                // The index of the `take`-th (0-based) element equal to the key: count per
                // chunk in parallel, then scan the chunk holding it.
                let k0 = kr.key;
                let counts: Vec<u64> = (0..n.div_ceil(MEM_CHUNK))
                    .into_par_iter()
                    .map(|c| {
                        (c * MEM_CHUNK..((c + 1) * MEM_CHUNK).min(n))
                            .filter(|&i| key(i) == k0)
                            .count() as u64
                    })
                    .collect();
                let mut seen = 0u64;
                let mut index = u64::MAX;
                for (c, &cnt) in counts.iter().enumerate() {
                    if seen + cnt > take {
                        let mut t = seen;
                        for i in c * MEM_CHUNK..((c + 1) * MEM_CHUNK).min(n) {
                            if key(i) == k0 {
                                if t == take {
                                    index = i as u64;
                                    break;
                                }
                                t += 1;
                            }
                        }
                        break;
                    }
                    seen += cnt;
                }
                Cut { key: k0, index }
            }
        };
    }
    cuts
}

/// A key range `[lo, hi]` (inclusive) expected to hold one position of a selection: a pass
/// counts the keys below it and gathers the elements inside it ([`WindowScan`]), which
/// resolves the position exactly whenever it falls inside, in one pass instead of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Smallest key inside.
    pub lo: u32,
    /// Largest key inside.
    pub hi: u32,
}

impl Window {
    /// Every key (the position is always inside).
    pub const ALL: Window = Window {
        lo: 0,
        hi: u32::MAX,
    };

    /// A window around position `p` of `n` keys estimated from `sample`, the keys of a
    /// subset of the elements spread over the tensor (reordered in place): the sample's
    /// quantile at `p / n`, widened by 3.5 standard deviations of a sample quantile.
    /// Only speed depends on it: a position outside the window is found exactly otherwise.
    pub fn from_sample(sample: &mut [u32], n: u64, p: u64) -> Window {
        let m = sample.len();
        if m == 0 || n == 0 {
            return Window::ALL;
        }
        let q = (p as f64 / n as f64).clamp(0.0, 1.0);
        let r = q * m as f64;
        let margin = 3.5 * (m as f64 * q * (1.0 - q)).sqrt() + 8.0;
        let lo_rank = r - margin;
        let hi_rank = r + margin;
        let lo = if lo_rank < 0.0 {
            0
        } else {
            *sample.select_nth_unstable(lo_rank as usize).1
        };
        let hi = if hi_rank >= (m - 1) as f64 {
            u32::MAX
        } else {
            *sample.select_nth_unstable(hi_rank as usize).1
        };
        Window { lo, hi }
    }
}

/// Candidate buffers kept between tensors (a fresh allocation of a few MiB costs a page
/// fault per page each time).
static CAND_POOL: std::sync::Mutex<Vec<Vec<(u32, u32)>>> = std::sync::Mutex::new(Vec::new());

/// At most this many candidate buffers are kept.
const CAND_POOL_MAX: usize = 64;

/// What a pass over the keys gathers for one [`Window`]: the number of keys below it and the
/// `(key, flat index)` of every element inside it (up to a cap). Its buffer comes from and goes
/// back to a pool shared by all threads.
#[derive(Debug)]
pub struct WindowScan {
    /// Keys below the window.
    pub below: u64,
    /// Elements inside the window, in no particular order.
    pub cands: Vec<(u32, u32)>,
    /// More elements fell inside than the cap: `cands` is incomplete.
    pub overflow: bool,
}

impl Default for WindowScan {
    fn default() -> Self {
        let cands = CAND_POOL
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        Self {
            below: 0,
            cands,
            overflow: false,
        }
    }
}

impl Drop for WindowScan {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.cands);
        if v.capacity() == 0 {
            return;
        }
        v.clear();
        if let Ok(mut p) = CAND_POOL.lock() {
            if p.len() < CAND_POOL_MAX {
                p.push(v);
            }
        }
    }
}

/// Elements per flag buffer of [`WindowScan::add`].
const FLAG_TILE: usize = 1024;

impl WindowScan {
    /// Add the keys of the elements `start..start + keys.len()` (`start + keys.len()` at most
    /// 2^32); gathering stops (with `overflow`) once more than `cap` elements are inside.
    /// Runs the widest SIMD build of its loops the CPU has ([`crate::simd`]).
    pub fn add(&mut self, w: Window, start: usize, keys: &[u32], cap: usize) {
        crate::simd::run(
            #[inline(always)]
            || self.add_body(w, start, keys, cap),
        )
    }

    /// [`WindowScan::add`]'s loops, inlined into both of its builds.
    #[inline(always)]
    fn add_body(&mut self, w: Window, start: usize, keys: &[u32], cap: usize) {
        self.add_mapped(w, start, keys, keys, cap, |k, _| k);
    }

    /// [`WindowScan::add`] of the keys `key(src[j], aux[j])` (`aux` at least as long as
    /// `src`), each computed where it is counted: no key buffer is written and read again.
    /// For loops built by [`crate::simd::run`]: inline, so that `key` vectorises with them.
    #[inline(always)]
    pub fn add_mapped<S: Copy, A: Copy>(
        &mut self,
        w: Window,
        start: usize,
        src: &[S],
        aux: &[A],
        cap: usize,
        key: impl Fn(S, A) -> u32,
    ) {
        let (lo, width) = (w.lo, w.hi.wrapping_sub(w.lo));
        let aux = &aux[..src.len()];
        let mut below = 0u64;
        // A flag byte per element (vectorised, with the count below), then 8 flags at a
        // time: only words with a candidate are visited.
        let mut flags = [0u8; FLAG_TILE];
        for (c, (src, aux)) in src.chunks(FLAG_TILE).zip(aux.chunks(FLAG_TILE)).enumerate() {
            let flags = &mut flags[..src.len()];
            let mut n_below = 0u32;
            for ((f, &x), &y) in flags.iter_mut().zip(src).zip(aux) {
                let k = key(x, y);
                n_below += u32::from(k < lo);
                *f = u8::from(k.wrapping_sub(lo) <= width);
            }
            below += u64::from(n_below);
            if self.overflow {
                continue;
            }
            let (words, rest) = flags.as_chunks::<8>();
            let base = start + c * FLAG_TILE;
            let mut push = |j: usize| self.cands.push((key(src[j], aux[j]), (base + j) as u32));
            for (w, word) in words.iter().enumerate() {
                let mut bits = u64::from_le_bytes(*word);
                while bits != 0 {
                    push(w * 8 + (bits.trailing_zeros() / 8) as usize);
                    bits &= bits - 1;
                }
            }
            for (j, &f) in rest.iter().enumerate() {
                if f != 0 {
                    push(words.len() * 8 + j);
                }
            }
        }
        self.below += below;
        if self.cands.len() > cap {
            self.overflow = true;
            self.cands.clear();
        }
    }

    /// Merge another scan of the same window (over other elements).
    pub fn append(&mut self, mut other: WindowScan, cap: usize) {
        self.below += other.below;
        self.overflow |= other.overflow || self.cands.len() + other.cands.len() > cap;
        if self.overflow {
            self.cands.clear();
        } else if self.cands.capacity() < other.cands.capacity() {
            // Keep the larger buffer (fewer copies and reallocations).
            std::mem::swap(&mut self.cands, &mut other.cands);
            self.cands.extend_from_slice(&other.cands);
        } else {
            self.cands.extend_from_slice(&other.cands);
        }
    }

    /// The cut at position `p` of the ascending `(key, flat index)` order of all the scanned
    /// elements, when the window held it (as [`select_cuts`] gives it); `None` otherwise.
    pub fn cut(&mut self, p: u64) -> Option<Cut> {
        if self.overflow || p < self.below || p - self.below >= self.cands.len() as u64 {
            return None;
        }
        let r = (p - self.below) as usize;
        let (before, &mut (k0, i0), _) = self.cands.select_nth_unstable(r);
        // As `select_cuts`: index 0 when no element with this key precedes the position
        // (every element with this key is inside the window).
        let index = if before.iter().any(|&(k, _)| k == k0) {
            u64::from(i0)
        } else {
            0
        };
        Some(Cut { key: k0, index })
    }
}

fn count_equal(keys: &[u32], key: u32) -> u64 {
    if keys.len() < 2 * PAR_CHUNK {
        keys.iter().filter(|&&x| x == key).count() as u64
    } else {
        keys.par_chunks(PAR_CHUNK)
            .map(|c| c.iter().filter(|&&x| x == key).count() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// Reference: sort (key, index) pairs and read position p.
    fn sorted_before(keys: &[u32], p: usize) -> Vec<bool> {
        let mut order: Vec<(u32, usize)> = keys.iter().copied().zip(0..).collect();
        order.sort();
        let mut before = vec![false; keys.len()];
        for &(_, i) in &order[..p.min(keys.len())] {
            before[i] = true;
        }
        before
    }

    fn blocks_of(n: usize, b: usize) -> Vec<Range<usize>> {
        (0..n.div_ceil(b))
            .map(|i| i * b..((i + 1) * b).min(n))
            .collect()
    }

    fn check(keys: &[u32], block: usize) {
        let n = keys.len();
        let positions: Vec<u64> = (0..=n as u64 + 1).collect();
        let cuts = select_cuts(n, &blocks_of(n, block), &positions, |r, out| {
            out.copy_from_slice(&keys[r]);
            Ok(())
        })
        .unwrap();
        let mem = select_cuts_with(n, &positions, |j| keys[j]);
        assert_eq!(cuts, mem, "in-memory selection gives the streaming cuts");
        for (p, cut) in cuts.iter().enumerate() {
            let expect = sorted_before(keys, p);
            for (i, &k) in keys.iter().enumerate() {
                assert_eq!(cut.before(k, i as u64), expect[i], "p={p} i={i}");
            }
        }
    }

    #[test]
    fn matches_sort_random_and_ties() {
        let mut s = 7u64;
        // Random f32 magnitudes.
        let keys: Vec<u32> = (0..300)
            .map(|_| ((lcg(&mut s) % 1000) as f32 * 0.37).to_bits())
            .collect();
        for b in [1, 7, 64, 300] {
            check(&keys, b);
        }
        // Many equal keys, spread over both 16-bit halves.
        let keys: Vec<u32> = (0..257)
            .map(|_| [0u32, 5, 0x1_0005, 0xFFFF_0000, 5][(lcg(&mut s) % 5) as usize])
            .collect();
        for b in [3, 50, 257] {
            check(&keys, b);
        }
        // All equal.
        check(&vec![42u32; 100], 9);
        check(&[], 4);
    }

    #[test]
    fn key_asc_orders_floats() {
        let xs = [-f32::MAX, -2.5, -1.0, -0.0, 0.0, 1e-40, 1.0, 3.0, f32::MAX];
        for w in xs.windows(2) {
            assert!(key_asc(w[0]) < key_asc(w[1]), "{} {}", w[0], w[1]);
        }
    }

    #[test]
    fn large_block_parallel_histogram() {
        let mut s = 3u64;
        let n = 3 * PAR_CHUNK + 11;
        let keys: Vec<u32> = (0..n).map(|_| (lcg(&mut s) % 5000) as u32 * 977).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        let p = n as u64 / 3;
        let cut = select_cuts(n, &blocks_of(n, n), &[p], |r, out| {
            out.copy_from_slice(&keys[r]);
            Ok(())
        })
        .unwrap()[0];
        assert_eq!(cut.key, sorted[p as usize]);
        let cnt = keys
            .iter()
            .enumerate()
            .filter(|(i, &k)| cut.before(k, *i as u64))
            .count();
        assert_eq!(cnt as u64, p);
        // In memory, over several parallel chunks, with a scan for the index among equal keys.
        let positions = [0, 1, p, n as u64 / 2 + 7, n as u64 - 1, n as u64];
        let mem = select_cuts_with(n, &positions, |j| keys[j]);
        let streamed = select_cuts(n, &blocks_of(n, 4099), &positions, |r, out| {
            out.copy_from_slice(&keys[r]);
            Ok(())
        })
        .unwrap();
        assert_eq!(mem, streamed);
        assert!(mem.iter().any(|c| c.index != 0 && c.index != u64::MAX));
    }

    /// A window scan resolves exactly the positions its window holds and gives the cuts of
    /// `select_cuts_with`; split scans merged with `append` give the same.
    #[test]
    fn window_scan_matches_selection() {
        let mut s = 11u64;
        let n = 5000;
        let keys: Vec<u32> = (0..n).map(|_| (lcg(&mut s) % 40) as u32 * 3).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        for p in [0u64, 1, 777, 2500, 4999] {
            let want = select_cuts_with(n, &[p], |j| keys[j])[0];
            let k = sorted[p as usize];
            for w in [
                Window::ALL,
                Window { lo: k, hi: k },
                Window {
                    lo: k.saturating_sub(6),
                    hi: k + 9,
                },
            ] {
                let mut a = WindowScan::default();
                let mut b = WindowScan::default();
                a.add(w, 0, &keys[..1234], usize::MAX);
                b.add(w, 1234, &keys[1234..], usize::MAX);
                a.append(b, usize::MAX);
                assert_eq!(a.cut(p), Some(want), "p {p} {w:?}");
            }
            // A window below or above the position, or over the cap, resolves nothing.
            for w in [Window { lo: 0, hi: 0 }, Window { lo: 1000, hi: 2000 }] {
                let mut a = WindowScan::default();
                a.add(w, 0, &keys, usize::MAX);
                if w.lo > k || w.hi < k {
                    assert_eq!(a.cut(p), None);
                }
            }
            let mut a = WindowScan::default();
            a.add(Window::ALL, 0, &keys, 10);
            assert!(a.overflow);
            assert_eq!(a.cut(p), None);
        }
        // A sample of the keys gives a window holding the position.
        let mut sample: Vec<u32> = keys.iter().step_by(7).copied().collect();
        let w = Window::from_sample(&mut sample, n as u64, 2500);
        assert!(w.lo <= sorted[2500] && sorted[2500] <= w.hi, "{w:?}");
    }
}
