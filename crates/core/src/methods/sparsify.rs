//! Deterministic magnitude sparsifiers of the task-arithmetic family (methods.md §3, §5;
//! mergekit `mergekit/sparsify.py`: `magnitude`, `magnitude_outliers`). Sharding class T (a
//! per-tensor selection), or G when the thresholds come from a model-global pass.
//!
//! **Mask representation.** A model's kept set is a range of positions `[lo, hi)` in a total
//! order of its elements: `(key, flat index)` ascending, where the key is the f32 bit pattern of
//! `|δ|` ([`KeyOrder::Ascending`]: smallest magnitude first) or its complement
//! ([`KeyOrder::Descending`]: largest first). Ties between equal magnitudes therefore go to the
//! lowest flat index, whatever the block size or thread count. The two ends are
//! [`Cut`]s found by exact streaming selection ([`crate::select`]); deciding whether an element
//! is kept needs only its value and index, so [`RankSparsifier::apply`] is a pure function of the
//! block.
//!
//! - `magnitude` (TIES): keep the `k = max(1, ⌊density·d⌋)` largest `|δ|`; `density ≥ 1` keeps
//!   everything. mergekit picks them with `argsort(descending)[:k]`, whose order among equal
//!   magnitudes is unspecified; here it is the lowest index.
//! - `magnitude_outliers` (breadcrumbs): `target = ⌊density·d⌋`, `n_top = ⌊γ·d⌋`,
//!   `n_bot = max(0, d − target − n_top)`; sort `|δ|` ascending and keep positions
//!   `[n_bot, n_bot + target)`; `density ≥ 1` keeps everything. This is mergekit 0.1.5, which
//!   keeps the small-tensor case right. Older mergekit sliced `[n_bot:-n_top]`, which is empty
//!   when `n_top = 0` (any tensor with `γ·d < 1`), dropping the whole task vector (methods.md
//!   §5); `legacy_empty_when_no_top` reproduces that.

use crate::error::{MergeError, Result};
use crate::methods::gta::{read_base, read_delta, Sparsifier, Views};
use crate::params::TensorParams;
use crate::select::{select_cuts, select_cuts_with, Cut, Window, WindowScan};
use crate::tensor::{TensorJob, TensorReader};
use rayon::prelude::*;
use std::ops::Range;

/// Elements per parallel work item when applying a mask.
const PAR_CHUNK: usize = 1 << 14;

/// Which way magnitudes are ordered for a [`RankMask`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrder {
    /// Smallest `|δ|` first (key = bits of `|δ|`).
    Ascending,
    /// Largest `|δ|` first (key = complement of the bits of `|δ|`).
    Descending,
}

impl KeyOrder {
    /// The selection key of a task-vector value.
    #[inline(always)]
    pub fn key(self, x: f32) -> u32 {
        let b = x.abs().to_bits();
        match self {
            KeyOrder::Ascending => b,
            KeyOrder::Descending => !b,
        }
    }
}

/// Keep the positions `[lo, hi)` of the `(key, index)` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankMask {
    /// The order.
    pub order: KeyOrder,
    /// First kept position.
    pub lo: Cut,
    /// First position after the kept ones.
    pub hi: Cut,
}

impl RankMask {
    /// Whether the element of value `x` at flat index `index` is kept.
    #[inline]
    pub fn keeps(&self, x: f32, index: u64) -> bool {
        let k = self.order.key(x);
        !self.lo.before(k, index) && self.hi.before(k, index)
    }

    /// Zero the dropped elements of `chunk` (flat indices `base..`, fewer than 2^32), as
    /// [`RankMask::keeps`] decides, branch-free so that it vectorises: each cut's index bound
    /// becomes a bound on the position inside the chunk. Runs the widest SIMD build of the loop
    /// the CPU has ([`crate::simd`]; the same bits).
    pub fn apply_chunk(&self, base: u64, chunk: &mut [f32]) {
        crate::simd::run(
            #[inline(always)]
            || self.apply_chunk_body(base, chunk),
        )
    }

    /// [`RankMask::apply_chunk`]'s loop, inlined into both of its builds.
    #[inline(always)]
    fn apply_chunk_body(&self, base: u64, chunk: &mut [f32]) {
        let len = chunk.len() as u64;
        debug_assert!(len <= u64::from(u32::MAX));
        let flip = match self.order {
            KeyOrder::Ascending => 0u32,
            KeyOrder::Descending => u32::MAX,
        };
        // Elements at positions below `rel` have an index below the cut's.
        let rel = |c: &Cut| c.index.saturating_sub(base).min(len) as u32;
        let (lo_k, lo_i) = (self.lo.key, rel(&self.lo));
        let (hi_k, hi_i) = (self.hi.key, rel(&self.hi));
        // Where neither cut's index bound falls strictly inside the chunk, "before the cut" is
        // `key < t` for a threshold `t` (`t = key` or `key + 1`): one compare per element.
        let threshold = |k: u32, i: u32| -> Option<u64> {
            if i == 0 {
                Some(u64::from(k))
            } else if u64::from(i) == len {
                Some(u64::from(k) + 1)
            } else {
                None
            }
        };
        if let (Some(t_lo), Some(t_hi)) = (threshold(lo_k, lo_i), threshold(hi_k, hi_i)) {
            // Kept: t_lo <= key < t_hi.
            if t_hi <= t_lo {
                chunk.fill(0.0);
                return;
            }
            let width = t_hi - t_lo;
            if width > u64::from(u32::MAX) {
                return;
            }
            let (t_lo, width) = (t_lo as u32, width as u32);
            for x in chunk.iter_mut() {
                let bits = x.to_bits();
                let key = (bits & 0x7FFF_FFFF) ^ flip;
                let keep = key.wrapping_sub(t_lo) < width;
                // A dropped entry's bits are cleared (`+0.0`).
                *x = f32::from_bits(bits & 0u32.wrapping_sub(keep as u32));
            }
            return;
        }
        for (k, x) in chunk.iter_mut().enumerate() {
            let bits = x.to_bits();
            let key = (bits & 0x7FFF_FFFF) ^ flip;
            let k = k as u32;
            let before_lo = (key < lo_k) | ((key == lo_k) & (k < lo_i));
            let before_hi = (key < hi_k) | ((key == hi_k) & (k < hi_i));
            let keep = !before_lo & before_hi;
            // A dropped entry's bits are cleared (`+0.0`).
            *x = f32::from_bits(bits & 0u32.wrapping_sub(keep as u32));
        }
    }
}

/// One model's mask for one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelMask {
    /// Keep everything (no sparsification).
    All,
    /// Drop everything.
    Nothing,
    /// Keep a range of magnitude ranks.
    Rank(RankMask),
}

/// A deterministic sparsifier: one [`ModelMask`] per model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSparsifier {
    /// Per-model masks, in model order.
    pub masks: Vec<ModelMask>,
}

impl Sparsifier for RankSparsifier {
    fn is_identity(&self, model: usize) -> bool {
        matches!(self.masks.get(model), Some(ModelMask::All) | None)
    }

    fn elementwise(&self) -> bool {
        true
    }

    fn apply(&self, model: usize, start: usize, delta: &mut [f32]) -> Result<()> {
        match self.masks.get(model) {
            None | Some(ModelMask::All) => {}
            Some(ModelMask::Nothing) => delta.fill(0.0),
            Some(ModelMask::Rank(m)) => {
                let mask = |base: u64, chunk: &mut [f32]| m.apply_chunk(base, chunk);
                if delta.len() <= PAR_CHUNK {
                    // A tile of a caller's parallel loop.
                    mask(start as u64, delta);
                } else {
                    delta
                        .par_chunks_mut(PAR_CHUNK)
                        .enumerate()
                        .for_each(|(c, chunk)| mask((start + c * PAR_CHUNK) as u64, chunk));
                }
            }
        }
        Ok(())
    }
}

/// Every model's `density` (default 1.0), checked to lie in (0, 1].
pub fn densities(params: &TensorParams, n_models: usize) -> Result<Vec<f64>> {
    (0..n_models)
        .map(|i| {
            let d = params.model_num(i, "density", 1.0)?;
            if d > 0.0 && d <= 1.0 {
                Ok(d)
            } else {
                Err(MergeError::BadParameter {
                    key: "density".into(),
                    message: format!(
                        "model #{i}: density is the fraction of the task vector kept and must \
                         be in (0, 1], got {d}"
                    ),
                })
            }
        })
        .collect()
}

/// `⌊x·n⌋` as Python's `int(x * n)` computes it (f64 product, truncated).
pub fn frac_count(x: f64, n: usize) -> usize {
    let v = (x * n as f64).floor();
    if v <= 0.0 {
        0
    } else {
        (v as usize).min(n)
    }
}

/// Find the cuts at `positions` of model `model`'s magnitudes in `order`, streaming.
pub fn magnitude_cuts(
    job: &TensorJob,
    reader: &dyn TensorReader,
    model: usize,
    order: KeyOrder,
    positions: &[u64],
) -> Result<Vec<Cut>> {
    let blocks: Vec<Range<usize>> = job.row_blocks().collect();
    let mut base = Vec::new();
    let mut delta = Vec::new();
    select_cuts(job.numel(), &blocks, positions, |r, keys| {
        base.resize(r.len(), 0.0);
        delta.resize(r.len(), 0.0);
        read_base(job, reader, r.clone(), &mut base)?;
        read_delta(job, reader, model, r, &base, &mut delta)?;
        for (k, d) in keys.iter_mut().zip(&delta) {
            *k = order.key(*d);
        }
        Ok(())
    })
}

/// mergekit `magnitude`: per model keep the `max(1, ⌊density·d⌋)` largest `|δ|` (lowest index
/// first among equal magnitudes); `density ≥ 1` keeps everything.
pub fn magnitude(
    job: &TensorJob,
    reader: &dyn TensorReader,
    densities: &[f64],
) -> Result<RankSparsifier> {
    let n = job.numel();
    let mut masks = Vec::with_capacity(densities.len());
    for (i, &density) in densities.iter().enumerate() {
        if density >= 1.0 || n == 0 {
            masks.push(ModelMask::All);
            continue;
        }
        let k = frac_count(density, n).max(1);
        if k >= n {
            masks.push(ModelMask::All);
            continue;
        }
        let order = KeyOrder::Descending;
        let cuts = magnitude_cuts(job, reader, i, order, &[k as u64])?;
        masks.push(ModelMask::Rank(RankMask {
            order,
            lo: Cut::START,
            hi: cuts[0],
        }));
    }
    Ok(RankSparsifier { masks })
}

/// [`magnitude`] on task vectors held in memory (`deltas[i]`: model `i`'s whole task vector);
/// the same masks, without re-reading the inputs.
pub fn magnitude_loaded(deltas: &[Vec<f32>], densities: &[f64]) -> RankSparsifier {
    let masks = densities
        .iter()
        .zip(deltas)
        .map(|(&density, d)| {
            let n = d.len();
            if density >= 1.0 || n == 0 {
                return ModelMask::All;
            }
            let k = frac_count(density, n).max(1);
            if k >= n {
                return ModelMask::All;
            }
            let order = KeyOrder::Descending;
            let cuts = select_cuts_with(n, &[k as u64], |j| order.key(d[j]));
            ModelMask::Rank(RankMask {
                order,
                lo: Cut::START,
                hi: cuts[0],
            })
        })
        .collect();
    RankSparsifier { masks }
}

/// Elements per call of a key source in [`magnitude_tiles`] (key buffers stay in the L1/L2
/// cache).
pub const KEY_TILE: usize = 2048;

/// Elements per group of [`magnitude_tiles`]' pass (tiles in parallel inside a group).
const SCAN_GROUP: usize = 1 << 18;

thread_local! {
    /// Key buffers of [`magnitude_tiles`]' pass, one per model.
    static KEY_BUFS: std::cell::RefCell<Vec<Vec<u32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tensors up to this size gather every element instead of sampling a window first.
const SMALL_SELECT: usize = 1 << 15;

/// Elements per sampled block when estimating a window.
const SAMPLE_BLOCK: usize = 128;

/// `r` in consecutive pieces of at most [`KEY_TILE`] elements.
fn tiles(r: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    (r.start..r.end)
        .step_by(KEY_TILE)
        .map(move |lo| lo..(lo + KEY_TILE).min(r.end))
}

/// [`magnitude`] with keys from a tile source, in one parallel pass over the tensor instead of
/// two or three per model, with exactly the same masks.
///
/// At most `max_cands` candidates are held per model (a memory bound: a model whose window
/// holds more is selected by the streaming passes instead).
///
/// `fill(range, models, keys, check_all)` (with `range.len() <= KEY_TILE`) writes the
/// [`KeyOrder::Descending`] keys of model `models[a]`'s task vector over `range` into
/// `keys[a][..range.len()]` and returns whether every value it read was finite; with
/// `check_all` it must also check the base and every other model over `range`. Every element
/// is passed once with `check_all` (so a `Some` result means every input was finite); `None`
/// when `fill` reported a non-finite value.
///
/// How: per model, a window of keys likely to hold the cut is estimated from a sample
/// ([`Window::from_sample`]); the pass counts the keys below each window and gathers the
/// elements inside ([`WindowScan`]), and the cut is selected among those. When the cut falls
/// outside a window (an unlucky sample), that model's cut is found by the exact streaming
/// selection ([`select_cuts`]) instead, so the result never depends on the sample.
pub fn magnitude_tiles<F>(
    n: usize,
    densities: &[f64],
    max_cands: usize,
    fill: F,
) -> Option<RankSparsifier>
where
    F: Fn(Range<usize>, &[usize], &mut [Vec<u32>], bool) -> bool + Sync,
{
    let scan = |r: Range<usize>, active: &[usize], w: &[Window], s: &mut [WindowScan], cap| {
        fill_then_scan(&fill, r, active, w, s, cap)
    };
    magnitude_tiles_with(n, densities, max_cands, &fill, &scan)
}

/// [`magnitude_tiles`] whose pass scans each tile with `scan(range, models, windows, scans,
/// cap)`: what `fill` and [`WindowScan::add`] would do for `range` (every input checked
/// finite, `false` when one is not), model `models[a]`'s keys into `scans[a]` for window
/// `windows[a]`, in fewer steps where the caller can ([`magnitude_views`]).
pub fn magnitude_tiles_with<F, S>(
    n: usize,
    densities: &[f64],
    max_cands: usize,
    fill: &F,
    scan: &S,
) -> Option<RankSparsifier>
where
    F: Fn(Range<usize>, &[usize], &mut [Vec<u32>], bool) -> bool + Sync,
    S: Fn(Range<usize>, &[usize], &[Window], &mut [WindowScan], usize) -> bool + Sync,
{
    let mut masks = vec![ModelMask::All; densities.len()];
    let mut active = Vec::new();
    let mut positions = Vec::new();
    for (i, &density) in densities.iter().enumerate() {
        if density >= 1.0 || n == 0 {
            continue;
        }
        let k = frac_count(density, n).max(1);
        if k < n {
            active.push(i);
            positions.push(k as u64);
        }
    }
    let na = active.len();
    let key_bufs = || vec![vec![0u32; KEY_TILE]; na];
    // Windows, from keys of evenly spread sample blocks.
    let windows: Vec<Window> = if n <= SMALL_SELECT || na == 0 {
        vec![Window::ALL; na]
    } else {
        let m = ((2.0 * (2.0 * n as f64).powf(2.0 / 3.0)) as usize).clamp(SAMPLE_BLOCK, n);
        let blocks = (m / SAMPLE_BLOCK).max(1);
        let stride = n / blocks;
        let mut samples: Vec<Vec<u32>> = (0..blocks)
            .into_par_iter()
            .fold(
                || (vec![Vec::new(); na], key_bufs()),
                |(mut acc, mut keys), b| {
                    let lo = b * stride;
                    let r = lo..(lo + SAMPLE_BLOCK).min(n);
                    // Non-finite values are reported by the pass below.
                    let _ = fill(r.clone(), &active, &mut keys, false);
                    for (a, k) in acc.iter_mut().zip(&keys) {
                        a.extend_from_slice(&k[..r.len()]);
                    }
                    (acc, keys)
                },
            )
            .map(|(acc, _)| acc)
            .reduce(
                || vec![Vec::new(); na],
                |mut x, y| {
                    for (a, b) in x.iter_mut().zip(y) {
                        a.extend_from_slice(&b);
                    }
                    x
                },
            );
        samples
            .par_iter_mut()
            .zip(&positions)
            .map(|(s, &p)| Window::from_sample(s, n as u64, p))
            .collect()
    };
    let cuts = scan_cuts(n, &active, &positions, &windows, max_cands, fill, scan)?;
    for (a, &i) in active.iter().enumerate() {
        masks[i] = ModelMask::Rank(RankMask {
            order: KeyOrder::Descending,
            lo: Cut::START,
            hi: cuts[a],
        });
    }
    Some(RankSparsifier { masks })
}

/// The scan of one tile through a key source `fill` (see [`magnitude_tiles`]): the keys of
/// every active model into this thread's key buffers (every input checked), then each into
/// its [`WindowScan`].
fn fill_then_scan<F>(
    fill: &F,
    r: Range<usize>,
    active: &[usize],
    windows: &[Window],
    scans: &mut [WindowScan],
    cap: usize,
) -> bool
where
    F: Fn(Range<usize>, &[usize], &mut [Vec<u32>], bool) -> bool + Sync,
{
    KEY_BUFS.with(|cell| {
        let mut keys = cell.borrow_mut();
        if keys.len() < active.len() {
            keys.resize(active.len(), vec![0u32; KEY_TILE]);
        }
        let keys = &mut keys[..active.len()];
        let ok = fill(r.clone(), active, keys, true);
        for ((s, w), k) in scans.iter_mut().zip(windows).zip(keys.iter()) {
            s.add(*w, r.start, &k[..r.len()], cap);
        }
        ok
    })
}

/// The pass of [`magnitude_tiles`]: the cut at `positions[a]` of model `active[a]`'s keys,
/// gathered in `windows[a]` (exact whatever the windows: a cut outside its window is found by
/// [`select_cuts`]); `None` when `fill` reported a non-finite value.
fn scan_cuts<F, S>(
    n: usize,
    active: &[usize],
    positions: &[u64],
    windows: &[Window],
    max_cands: usize,
    fill: &F,
    scan: &S,
) -> Option<Vec<Cut>>
where
    F: Fn(Range<usize>, &[usize], &mut [Vec<u32>], bool) -> bool + Sync,
    S: Fn(Range<usize>, &[usize], &[Window], &mut [WindowScan], usize) -> bool + Sync,
{
    let na = active.len();
    // The pass: counts and candidates per window, every input checked finite. Groups go
    // from the end of the tensor to its start (tiles in parallel inside a group), so that
    // the start, which the merge pass reads first, is what the cache holds at the end.
    let cap = (n / 4 + SMALL_SELECT).min(max_cands);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let fresh = || (0..na).map(|_| WindowScan::default()).collect::<Vec<_>>();
    let mut scans = fresh();
    for g in (0..n.div_ceil(SCAN_GROUP)).rev() {
        let group = g * SCAN_GROUP..((g + 1) * SCAN_GROUP).min(n);
        let part = (0..group.len().div_ceil(KEY_TILE))
            .into_par_iter()
            .fold(fresh, |mut part, t| {
                let lo = group.start + t * KEY_TILE;
                let r = lo..(lo + KEY_TILE).min(group.end);
                if !scan(r, active, windows, &mut part, cap) {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                part
            })
            .reduce(fresh, |mut x, y| {
                for (a, b) in x.iter_mut().zip(y) {
                    a.append(b, cap);
                }
                x
            });
        for (a, b) in scans.iter_mut().zip(part) {
            a.append(b, cap);
        }
    }
    if failed.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let cuts = scans
        .into_par_iter()
        .enumerate()
        .map(|(a, mut s)| {
            s.cut(positions[a]).unwrap_or_else(|| {
                // Outside the window: the exact streaming selection for this model alone.
                const B: usize = 1 << 20;
                let blocks: Vec<Range<usize>> = (0..n.div_ceil(B))
                    .map(|i| i * B..((i + 1) * B).min(n))
                    .collect();
                let mut kb = vec![vec![0u32; KEY_TILE]];
                select_cuts(n, &blocks, &[positions[a]], |r, keys| {
                    let lo = r.start;
                    for t in tiles(r) {
                        let _ = fill(t.clone(), &active[a..=a], &mut kb, false);
                        keys[t.start - lo..t.end - lo].copy_from_slice(&kb[0][..t.len()]);
                    }
                    Ok(())
                })
                .expect("keys from tiles cannot fail")[0]
            })
        })
        .collect();
    Some(cuts)
}

thread_local! {
    /// A base tile and a task-vector tile for [`magnitude_views`].
    static TILE_BUFS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// [`magnitude`] on inputs lent whole ([`crate::methods::gta::views`]), through
/// [`magnitude_tiles`]; `None` when an input holds a non-finite value (every input is
/// checked, also those of models left untrimmed).
pub fn magnitude_views(
    views: &Views<'_>,
    densities: &[f64],
    max_cands: usize,
) -> Option<RankSparsifier> {
    let n_models = views.models.len();
    // `f(base, task-vector buffer)` with this thread's tile buffers, `len` elements each.
    let with_bufs = |len: usize, f: &mut dyn FnMut(&mut [f32], &mut [f32]) -> bool| {
        TILE_BUFS.with(|cell| {
            let mut bufs = cell.borrow_mut();
            let (b, d) = &mut *bufs;
            b.resize(KEY_TILE, 0.0);
            d.resize(KEY_TILE, 0.0);
            f(&mut b[..len], &mut d[..len])
        })
    };
    // Every model not selected is checked finite too.
    let check_rest = |r: &Range<usize>, models: &[usize], b: &[f32], d: &mut [f32]| {
        let mut ok = true;
        for i in (0..n_models).filter(|i| !models.contains(i)) {
            ok &= views.delta(i, r.clone(), b, d);
        }
        ok
    };
    let fill = |r: Range<usize>, models: &[usize], keys: &mut [Vec<u32>], check_all: bool| {
        with_bufs(r.len(), &mut |b, d| {
            // One build per instruction set (`crate::simd`): the same bits.
            crate::simd::run(
                #[inline(always)]
                || {
                    let mut ok = views.base(r.clone(), b);
                    for (a, &i) in models.iter().enumerate() {
                        ok &= views.delta(i, r.clone(), b, d);
                        for (k, x) in keys[a][..r.len()].iter_mut().zip(d.iter()) {
                            *k = KeyOrder::Descending.key(*x);
                        }
                    }
                    if check_all {
                        ok &= check_rest(&r, models, b, d);
                    }
                    ok
                },
            )
        })
    };
    // The pass: each model's keys made and counted in one loop ([`View::scan_delta`]).
    let scan = |r: Range<usize>, models: &[usize], w: &[Window], s: &mut [WindowScan], cap| {
        with_bufs(r.len(), &mut |b, d| {
            crate::simd::run(
                #[inline(always)]
                || {
                    let mut ok = views.base(r.clone(), b);
                    for (a, &i) in models.iter().enumerate() {
                        ok &= views.models[i].scan_delta(r.clone(), b, w[a], &mut s[a], cap);
                    }
                    ok && check_rest(&r, models, b, d)
                },
            )
        })
    };
    magnitude_tiles_with(views.numel, densities, max_cands, &fill, &scan)
}

/// mergekit `magnitude_outliers` (breadcrumbs): per model drop the `⌊γ·d⌋` largest `|δ|` and as
/// many of the smallest as needed to keep `⌊density·d⌋`; `density ≥ 1` keeps everything.
/// `legacy_empty_when_no_top` reproduces older mergekit, which dropped the whole task vector
/// when `⌊γ·d⌋ = 0`.
pub fn magnitude_outliers(
    job: &TensorJob,
    reader: &dyn TensorReader,
    densities: &[f64],
    gammas: &[f64],
    legacy_empty_when_no_top: bool,
) -> Result<RankSparsifier> {
    let n = job.numel();
    let mut masks = Vec::with_capacity(densities.len());
    for (i, (&density, &gamma)) in densities.iter().zip(gammas).enumerate() {
        if density >= 1.0 || n == 0 {
            masks.push(ModelMask::All);
            continue;
        }
        let target = frac_count(density, n);
        let n_top = frac_count(gamma, n);
        if target == 0 || (legacy_empty_when_no_top && n_top == 0) {
            masks.push(ModelMask::Nothing);
            continue;
        }
        let n_bot = n.saturating_sub(target + n_top);
        let order = KeyOrder::Ascending;
        let cuts = magnitude_cuts(
            job,
            reader,
            i,
            order,
            &[n_bot as u64, (n_bot + target) as u64],
        )?;
        masks.push(ModelMask::Rank(RankMask {
            order,
            lo: cuts[0],
            hi: cuts[1],
        }));
    }
    Ok(RankSparsifier { masks })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::MemReader;

    fn job(n: usize, models: usize, block: usize) -> TensorJob {
        TensorJob {
            name: "t".into(),
            shape: vec![n],
            n_models: models,
            has_base: true,
            block_elems: block,
            seed: 0,
        }
    }

    /// Reference mask: stable sort of (|δ| as f64) with the given direction, index tie-break.
    fn ref_keep(delta: &[f32], desc: bool, lo: usize, hi: usize) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..delta.len()).collect();
        idx.sort_by(|&a, &b| {
            let (x, y) = (delta[a].abs() as f64, delta[b].abs() as f64);
            let o = if desc {
                y.partial_cmp(&x).unwrap()
            } else {
                x.partial_cmp(&y).unwrap()
            };
            o.then(a.cmp(&b))
        });
        let mut keep = vec![false; delta.len()];
        for &i in &idx[lo..hi] {
            keep[i] = true;
        }
        keep
    }

    fn apply_all(sp: &RankSparsifier, m: usize, delta: &[f32], block: usize) -> Vec<f32> {
        let mut out = delta.to_vec();
        for (c, chunk) in out.chunks_mut(block).enumerate() {
            sp.apply(m, c * block, chunk).unwrap();
        }
        out
    }

    #[test]
    fn magnitude_exact_k_with_ties() {
        // Row-major 1-D tensor with many equal magnitudes (and signs).
        let n = 103;
        let base: Vec<f32> = (0..n).map(|i| (i % 3) as f32 * 0.5).collect();
        let deltas: Vec<f32> = (0..n)
            .map(|i| [0.25f32, -0.25, 1.0, -1.0, 0.0][(i * 7 + i / 5) % 5])
            .collect();
        let model: Vec<f32> = base.iter().zip(&deltas).map(|(b, d)| b + d).collect();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base.clone()),
            models: vec![model.clone()],
        };
        for density in [0.01, 0.1, 0.3, 0.5, 0.77, 0.999, 1.0] {
            for block in [n, 10, 1] {
                let j = job(n, 1, block);
                let sp = magnitude(&j, &reader, &[density]).unwrap();
                let d: Vec<f32> = model.iter().zip(&base).map(|(m, b)| m - b).collect();
                assert_eq!(magnitude_loaded(std::slice::from_ref(&d), &[density]), sp);
                let got = apply_all(&sp, 0, &d, block);
                let k = if density >= 1.0 {
                    n
                } else {
                    ((density * n as f64).floor() as usize).max(1)
                };
                let keep = ref_keep(&d, true, 0, k);
                for i in 0..n {
                    let want = if keep[i] { d[i] } else { 0.0 };
                    assert_eq!(got[i].to_bits(), want.to_bits(), "density {density} i {i}");
                }
            }
        }
    }

    #[test]
    fn outliers_match_sorted_range() {
        let n = 250;
        let mut s = 11u64;
        let base = vec![0.0f32; n];
        let d: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((s >> 40) % 50) as f32 * 0.01 - 0.25
            })
            .collect();
        let reader = MemReader {
            stats: Default::default(),
            base: Some(base),
            models: vec![d.clone()],
        };
        for (density, gamma) in [
            (0.5, 0.01),
            (0.9, 0.2),
            (0.3, 0.0),
            (0.99, 0.05),
            (0.1, 1.0),
        ] {
            let target = (density * n as f64).floor() as usize;
            let n_top = (gamma * n as f64).floor() as usize;
            let n_bot = (n as i64 - target as i64 - n_top as i64).max(0) as usize;
            let keep = ref_keep(&d, false, n_bot, n_bot + target);
            for block in [n, 7] {
                let sp =
                    magnitude_outliers(&job(n, 1, block), &reader, &[density], &[gamma], false)
                        .unwrap();
                let got = apply_all(&sp, 0, &d, block);
                for i in 0..n {
                    assert_eq!(
                        got[i],
                        if keep[i] { d[i] } else { 0.0 },
                        "{density} {gamma} {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn outliers_small_tensor_and_legacy() {
        // γ·d < 1: mergekit 0.1.5 keeps the ⌊density·d⌋ = 3 largest; the legacy flag drops all.
        let d = vec![0.1f32, -0.4, 0.3, 0.2, -0.05];
        let reader = MemReader {
            stats: Default::default(),
            base: Some(vec![0.0; 5]),
            models: vec![d.clone()],
        };
        let sp = magnitude_outliers(&job(5, 1, 5), &reader, &[0.6], &[0.01], false).unwrap();
        let got = apply_all(&sp, 0, &d, 5);
        assert_eq!(got, vec![0.0, -0.4, 0.3, 0.2, 0.0]);
        let sp = magnitude_outliers(&job(5, 1, 5), &reader, &[0.6], &[0.01], true).unwrap();
        assert_eq!(apply_all(&sp, 0, &d, 5), vec![0.0; 5]);
    }

    #[test]
    fn density_validation() {
        let p = TensorParams::default().with_model_values("density", &[0.5, 0.0]);
        match densities(&p, 2) {
            Err(MergeError::BadParameter { key, .. }) => assert_eq!(key, "density"),
            other => panic!("{other:?}"),
        }
        let p = TensorParams::default().with_model_values("density", &[1.5]);
        assert!(densities(&p, 1).is_err());
        let p = TensorParams::default();
        assert_eq!(densities(&p, 2).unwrap(), vec![1.0, 1.0]);
    }

    #[test]
    fn rejects_non_finite() {
        let reader = MemReader {
            stats: Default::default(),
            base: Some(vec![0.0, 1.0, 2.0]),
            models: vec![vec![0.0, f32::NAN, 1.0]],
        };
        assert!(matches!(
            magnitude(&job(3, 1, 3), &reader, &[0.5]),
            Err(MergeError::Numeric { .. })
        ));
    }

    /// Keys of quantised values (many equal keys) for `models` sets of `n` elements.
    fn quantised_keys(seed: u64, n: usize, models: usize) -> Vec<Vec<u32>> {
        let mut s = seed | 1;
        (0..models)
            .map(|_| {
                (0..n)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        let x = ((s >> 40) % 200) as f32 * 0.25 - 25.0;
                        KeyOrder::Descending.key(x)
                    })
                    .collect()
            })
            .collect()
    }

    /// The pass resolves every position exactly whatever the window: holding the cut,
    /// too narrow, entirely below or above it (falling back to the exact selection).
    #[test]
    fn window_pass_is_exact_for_any_window() {
        let n = 70_001;
        let keys = quantised_keys(9, n, 3);
        let fill = |r: Range<usize>, models: &[usize], out: &mut [Vec<u32>], _: bool| {
            for (a, &i) in models.iter().enumerate() {
                out[a][..r.len()].copy_from_slice(&keys[i][r.clone()]);
            }
            true
        };
        let active = [0usize, 1, 2];
        for positions in [[1u64, 35_000, 69_999], [7_000, 14_000, 63_000]] {
            let want: Vec<Cut> = (0..3)
                .map(|a| select_cuts_with(n, &[positions[a]], |j| keys[a][j])[0])
                .collect();
            let mut sorted = keys.clone();
            sorted.iter_mut().for_each(|k| k.sort_unstable());
            let at = |a: usize, p: u64| sorted[a][p as usize];
            let shapes: [fn(u32) -> Window; 5] = [
                |_: u32| Window::ALL,
                |k: u32| Window { lo: k, hi: k },
                |k: u32| Window {
                    lo: k.saturating_sub(3),
                    hi: k.saturating_add(1 << 20),
                },
                |_: u32| Window { lo: 0, hi: 5 },
                |_: u32| Window {
                    lo: u32::MAX - 1,
                    hi: u32::MAX,
                },
            ];
            for w in shapes {
                let windows: Vec<Window> = (0..3).map(|a| w(at(a, positions[a]))).collect();
                for max in [usize::MAX, 100] {
                    let scan = |r: Range<usize>, a: &[usize], w: &[Window], s: &mut [_], c| {
                        fill_then_scan(&fill, r, a, w, s, c)
                    };
                    let got = scan_cuts(n, &active, &positions, &windows, max, &fill, &scan);
                    let got = got.unwrap();
                    assert_eq!(got, want, "{windows:?} {max}");
                }
            }
        }
        // A reported non-finite value gives `None`, also with nothing to select.
        let bad = |_: Range<usize>, _: &[usize], _: &mut [Vec<u32>], _: bool| false;
        let scan = |r: Range<usize>, a: &[usize], w: &[Window], s: &mut [_], c| {
            fill_then_scan(&bad, r, a, w, s, c)
        };
        assert!(scan_cuts(n, &[], &[], &[], usize::MAX, &bad, &scan).is_none());
        assert!(magnitude_tiles(n, &[0.5, 1.0], usize::MAX, bad).is_none());
    }

    /// [`magnitude_tiles`] (sampled windows) gives [`magnitude_loaded`]'s masks.
    #[test]
    fn tiles_match_loaded_masks() {
        for n in [5usize, 1000, 40_000, 200_003] {
            let deltas: Vec<Vec<f32>> = quantised_keys(n as u64, n, 3)
                .into_iter()
                .map(|k| k.into_iter().map(|b| f32::from_bits(!b) * 1.5).collect())
                .collect();
            let fill = |r: Range<usize>, models: &[usize], out: &mut [Vec<u32>], _: bool| {
                for (a, &i) in models.iter().enumerate() {
                    for (o, x) in out[a][..r.len()].iter_mut().zip(&deltas[i][r.clone()]) {
                        *o = KeyOrder::Descending.key(*x);
                    }
                }
                true
            };
            for dens in [[0.2, 0.9, 1.0], [1e-6, 0.5, 0.999], [1.0, 1.0, 0.01]] {
                assert_eq!(
                    magnitude_tiles(n, &dens, usize::MAX, fill),
                    Some(magnitude_loaded(&deltas, &dens)),
                    "n {n} {dens:?}"
                );
            }
        }
    }
}
