//! Streamed Gram matrices and linear combinations, shared by the spherical and stock methods.
//!
//! `slerp`, `nuslerp`, `multislerp`, `karcher` and `model_stock` (methods.md §7, §8, §19) all
//! reduce to the same two steps over a set of vectors x_i (each a model, or a model minus the
//! base, computed in f32 as mergekit does):
//!
//! 1. one pass over the blocks gathering the Gram matrix G_ij = x_i·x_j in f64 (every norm, dot
//!    and cosine those methods need is a function of G, and every mean they iterate on stays in
//!    the span of the x_i, so it is represented by coefficients on them);
//! 2. one pass writing Σ_i c_i x_i (plus the base) with per-vector coefficients c_i in f32.
//!
//! A "vector" is the whole tensor ([`Grouping::Whole`]), each row along the last dimension
//! ([`Grouping::Rows`]) or each fibre along dimension 0 ([`Grouping::Axis0`]); one Gram matrix
//! is kept per vector. Whole-tensor sums use [`ChunkedSum`]; per-row and per-fibre sums add
//! their elements sequentially in flat element order. Both give results that do not depend on
//! the block size or the thread count.

use crate::error::{MergeError, Result};
use crate::methods::device::{DeviceGrouping, GramMatrices};
use crate::raw::{give_f32, take_f32, BlockInputs, STREAM_BLOCK, TILE};
use crate::reduce::ChunkedSum;
use crate::tensor::{Input, TensorJob, TensorReader, TensorWriter};
use rayon::prelude::*;
use std::ops::Range;

/// How a tensor's flat elements are grouped into vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grouping {
    /// The whole (flattened) tensor is one vector.
    Whole,
    /// Each row along the last dimension is a vector (1-D tensors and scalars: one vector).
    Rows,
    /// Each fibre along dimension 0 is a vector (torch `transpose(0, -1)` then per row).
    Axis0,
}

impl From<Grouping> for DeviceGrouping {
    fn from(g: Grouping) -> Self {
        match g {
            Grouping::Whole => DeviceGrouping::Whole,
            Grouping::Rows => DeviceGrouping::Rows,
            Grouping::Axis0 => DeviceGrouping::Axis0,
        }
    }
}

/// Maps a flat element index to its vector (group) index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupMap {
    kind: Grouping,
    /// Row length (Rows) or number of fibres (Axis0).
    stride: usize,
    groups: usize,
}

impl GroupMap {
    /// The grouping of `job`'s tensor.
    pub(crate) fn new(job: &TensorJob, kind: Grouping) -> Self {
        let numel = job.numel();
        match kind {
            Grouping::Whole => Self {
                kind,
                stride: 1,
                groups: 1,
            },
            Grouping::Rows => Self {
                kind,
                stride: job.cols(),
                groups: job.rows().max(1),
            },
            Grouping::Axis0 => {
                let inner = match job.shape.first() {
                    Some(&d0) if d0 > 0 => numel / d0,
                    _ => 1,
                }
                .max(1);
                Self {
                    kind,
                    stride: inner,
                    groups: inner,
                }
            }
        }
    }

    /// Number of vectors.
    pub(crate) fn groups(&self) -> usize {
        self.groups
    }

    /// The vector holding flat element `e`.
    #[inline]
    pub(crate) fn group_of(&self, e: usize) -> usize {
        match self.kind {
            Grouping::Whole => 0,
            Grouping::Rows => e / self.stride,
            Grouping::Axis0 => e % self.stride,
        }
    }
}

/// Reusable block buffers for a set of inputs and an optional base.
pub(crate) struct Blocks<'a> {
    reader: &'a dyn TensorReader,
    inputs: &'a [Input],
    base: Option<Input>,
    /// One buffer per input: after [`Blocks::read`], the input minus the base when a base is set.
    pub(crate) x: Vec<Vec<f32>>,
    /// The base values of the block (empty without a base).
    pub(crate) base_vals: Vec<f32>,
}

impl<'a> Blocks<'a> {
    /// Buffers for `inputs` (each minus `base` when given) of at most `job.block_elems` elements.
    pub(crate) fn new(
        job: &TensorJob,
        reader: &'a dyn TensorReader,
        inputs: &'a [Input],
        base: Option<Input>,
    ) -> Self {
        let cap = job.block_elems.max(1).min(job.numel());
        Self {
            reader,
            inputs,
            base,
            x: inputs.iter().map(|_| Vec::with_capacity(cap)).collect(),
            base_vals: Vec::with_capacity(if base.is_some() { cap } else { 0 }),
        }
    }

    /// Read elements `range` of every input (and the base), subtracting the base in f32.
    pub(crate) fn read(&mut self, range: Range<usize>) -> Result<()> {
        let len = range.len();
        if let Some(b) = self.base {
            self.base_vals.resize(len, 0.0);
            self.reader.read(b, range.clone(), &mut self.base_vals)?;
        }
        for (buf, &input) in self.x.iter_mut().zip(self.inputs) {
            buf.resize(len, 0.0);
            self.reader.read(input, range.clone(), buf)?;
            if self.base.is_some() {
                buf.par_iter_mut()
                    .zip(self.base_vals.par_iter())
                    .for_each(|(v, b)| *v -= *b);
            }
        }
        Ok(())
    }
}

/// Check that `g` holds `n × n` matrices for some number of groups, so that a device's Gram
/// matrices cannot make a coefficient function index out of bounds.
pub(crate) fn check_gram(g: &GramMatrices, n: usize, method: &str) -> Result<()> {
    if g.n != n || g.groups.checked_mul(n * n) != Some(g.data.len()) {
        return Err(MergeError::BadInputs {
            method: method.into(),
            message: format!(
                "internal error: Gram matrices for {} input(s) in {} group(s) with {} values, \
                 expected {n} input(s) and {} values per group",
                g.n,
                g.groups,
                g.data.len(),
                n * n
            ),
        });
    }
    Ok(())
}

fn pairs(n: usize) -> Vec<(usize, usize)> {
    (0..n).flat_map(|i| (i..n).map(move |j| (i, j))).collect()
}

/// One pass over the blocks: the Gram matrix of `inputs` (each minus `base` when given) per
/// vector of `map`, as the [`GramMatrices`] a device computes for a
/// [`crate::methods::device::DevicePlan::Gram`].
// Element loops index several input buffers at once; iterator chains would obscure that.
#[allow(clippy::needless_range_loop)]
pub(crate) fn gram(
    job: &TensorJob,
    reader: &dyn TensorReader,
    inputs: &[Input],
    base: Option<Input>,
    map: GroupMap,
) -> Result<GramMatrices> {
    let n = inputs.len();
    let pairs = pairs(n);
    let np = pairs.len();
    let numel = job.numel();
    let groups = map.groups();
    let mut blocks = Blocks::new(job, reader, inputs, base);
    // Per-pair sums: chunked for the whole tensor, per-group sequential otherwise.
    let mut whole: Vec<ChunkedSum> = match map.kind {
        Grouping::Whole => (0..np).map(|_| ChunkedSum::new(numel)).collect(),
        _ => Vec::new(),
    };
    let mut acc = match map.kind {
        Grouping::Whole => Vec::new(),
        _ => vec![0.0f64; groups * np],
    };
    for range in job.blocks() {
        blocks.read(range.clone())?;
        let x = &blocks.x;
        let (start, len) = (range.start, range.len());
        match map.kind {
            Grouping::Whole => {
                for (s, &(i, j)) in whole.iter_mut().zip(&pairs) {
                    let (a, b) = (&x[i], &x[j]);
                    s.add_block(start, len, |k| f64::from(a[k]) * f64::from(b[k]));
                }
            }
            Grouping::Rows => {
                let cols = map.stride;
                let first = start / cols;
                let last = (range.end - 1) / cols;
                acc[first * np..(last + 1) * np]
                    .par_chunks_mut(np)
                    .enumerate()
                    .for_each(|(k, slot)| {
                        let r = first + k;
                        let lo = (r * cols).max(start);
                        let hi = ((r + 1) * cols).min(range.end);
                        for e in lo - start..hi - start {
                            for (s, &(i, j)) in slot.iter_mut().zip(&pairs) {
                                *s += f64::from(x[i][e]) * f64::from(x[j][e]);
                            }
                        }
                    });
            }
            Grouping::Axis0 => {
                let inner = map.stride;
                if len <= inner {
                    // Every element of the block lies in a different fibre.
                    for k in 0..len {
                        let g = (start + k) % inner;
                        let slot = &mut acc[g * np..(g + 1) * np];
                        for (s, &(i, j)) in slot.iter_mut().zip(&pairs) {
                            *s += f64::from(x[i][k]) * f64::from(x[j][k]);
                        }
                    }
                } else {
                    acc.par_chunks_mut(np).enumerate().for_each(|(g, slot)| {
                        let first = start + (g + inner - start % inner) % inner;
                        let mut e = first;
                        while e < range.end {
                            let k = e - start;
                            for (s, &(i, j)) in slot.iter_mut().zip(&pairs) {
                                *s += f64::from(x[i][k]) * f64::from(x[j][k]);
                            }
                            e += inner;
                        }
                    });
                }
            }
        }
    }
    let mut data = vec![0.0f64; groups * n * n];
    for g in 0..groups {
        for (p, &(i, j)) in pairs.iter().enumerate() {
            let v = match map.kind {
                Grouping::Whole => whole[p].total(),
                _ => acc[g * np + p],
            };
            data[(g * n + i) * n + j] = v;
            data[(g * n + j) * n + i] = v;
        }
    }
    Ok(GramMatrices { n, groups, data })
}

/// One tile of every input of [`map_blocks`]: `x[i][..len]` is input `i` (minus the base
/// when a base is set) and `base_vals[..len]` the base (empty without a base).
pub(crate) struct Tile {
    /// One buffer per input (at least the tile's length).
    pub(crate) x: Vec<Vec<f32>>,
    /// The base values of the tile (empty without a base).
    pub(crate) base_vals: Vec<f32>,
}

impl Tile {
    fn new(n: usize, with_base: bool) -> Self {
        Self {
            x: vec![vec![0.0; TILE]; n],
            base_vals: if with_base {
                vec![0.0; TILE]
            } else {
                Vec::new()
            },
        }
    }

    /// Decode `range` of the block's inputs (the base last when `with_base`).
    fn load(&mut self, blocks: &BlockInputs<'_>, range: Range<usize>) -> Result<()> {
        let len = range.len();
        let n = self.x.len();
        if !self.base_vals.is_empty() {
            blocks.decode(n, range.clone(), &mut self.base_vals[..len])?;
        }
        for (i, x) in self.x.iter_mut().enumerate() {
            let x = &mut x[..len];
            blocks.decode(i, range.clone(), x)?;
            if !self.base_vals.is_empty() {
                for (v, b) in x.iter_mut().zip(&self.base_vals[..len]) {
                    *v -= *b;
                }
            }
        }
        Ok(())
    }
}

/// Stream the blocks of `inputs` (each minus `base` when given) and write what
/// `f(range, tile, out)` puts in `out` for each tile (`out.len() == range.len()`, at most
/// [`TILE`] elements; tiles run in parallel). Inputs are read in their stored encoding where
/// possible and decoded tile by tile, so each input goes through memory once.
pub(crate) fn map_blocks<F>(
    job: &TensorJob,
    reader: &dyn TensorReader,
    writer: &mut dyn TensorWriter,
    inputs: &[Input],
    base: Option<Input>,
    f: F,
) -> Result<()>
where
    F: Fn(Range<usize>, &Tile, &mut [f32]) + Sync,
{
    let mut all = inputs.to_vec();
    all.extend(base);
    let mut blocks = BlockInputs::new(reader, &job.name, &all);
    let (n, with_base) = (inputs.len(), base.is_some());
    // Sub-blocks small enough that what the reads bring in is still cached when the tiles use
    // it (the budget's blocks only bound memory).
    let step = job.block_elems.clamp(1, STREAM_BLOCK);
    let numel = job.numel();
    let mut buf = take_f32(step.min(numel));
    let sub_blocks = (0..numel.div_ceil(step)).map(|i| i * step..((i + 1) * step).min(numel));
    for range in sub_blocks {
        blocks.read(range.clone())?;
        let out = &mut buf[..range.len()];
        let start = range.start;
        let blocks = &blocks;
        let run = |tile: &mut Tile, t: usize, o: &mut [f32]| -> Result<()> {
            let lo = start + t * TILE;
            let r = lo..lo + o.len();
            tile.load(blocks, r.clone())?;
            f(r, tile, o);
            Ok(())
        };
        let res = out
            .par_chunks_mut(TILE)
            .enumerate()
            .try_for_each_init(|| Tile::new(n, with_base), |tile, (t, o)| run(tile, t, o));
        if res.is_err() {
            // Report the first bad element in index order, whichever thread saw one first.
            let mut tile = Tile::new(n, with_base);
            for (t, o) in out.chunks_mut(TILE).enumerate() {
                run(&mut tile, t, o)?;
            }
            res?;
        }
        writer.write(range, out)?;
    }
    give_f32(buf);
    Ok(())
}

/// Write out\[e\] = Σ_i c\[g(e)\]\[i\] · x_i\[e\] (+ base\[e\] when `base` is set, the x_i then being
/// the inputs minus the base), all in f32, with `coefs` laid out `groups × inputs.len()`.
pub(crate) fn write_combination(
    job: &TensorJob,
    reader: &dyn TensorReader,
    writer: &mut dyn TensorWriter,
    inputs: &[Input],
    base: Option<Input>,
    map: GroupMap,
    coefs: &[f32],
) -> Result<()> {
    let n = inputs.len();
    map_blocks(job, reader, writer, inputs, base, |range, b, out| {
        let start = range.start;
        out.iter_mut().enumerate().for_each(|(k, o)| {
            let g = map.group_of(start + k);
            let c = &coefs[g * n..(g + 1) * n];
            let mut acc = 0.0f32;
            for (ci, xi) in c.iter().zip(&b.x) {
                acc += ci * xi[k];
            }
            if !b.base_vals.is_empty() {
                acc += b.base_vals[k];
            }
            *o = acc;
        });
    })
}

/// Copy one input unchanged.
pub(crate) fn copy_input(
    job: &TensorJob,
    reader: &dyn TensorReader,
    writer: &mut dyn TensorWriter,
    input: Input,
) -> Result<()> {
    map_blocks(job, reader, writer, &[input], None, |_, b, out| {
        out.copy_from_slice(&b.x[0][..out.len()]);
    })
}

/// Quadratic form aᵀ M b for an n×n row-major matrix.
pub(crate) fn qform(m: &[f64], a: &[f64], b: &[f64]) -> f64 {
    let n = a.len();
    let mut s = 0.0;
    for i in 0..n {
        let mut row = 0.0;
        for j in 0..n {
            row += m[i * n + j] * b[j];
        }
        s += a[i] * row;
    }
    s
}

/// Matrix-vector product M b for an n×n row-major matrix.
pub(crate) fn matvec(m: &[f64], b: &[f64]) -> Vec<f64> {
    let n = b.len();
    (0..n)
        .map(|i| (0..n).map(|j| m[i * n + j] * b[j]).sum())
        .collect()
}

/// Helpers shared by the tests of the methods built on this module.
#[cfg(test)]
pub(crate) mod testutil {
    use crate::error::Result;
    use crate::methods::device::{DeviceGrouping, DevicePlan, GramMatrices};
    use crate::methods::MergeMethod;
    use crate::tensor::{merge_in_memory, Input, MemReader, TensorJob};

    /// Deterministic pseudo-random values in [-1, 1) (xorshift64*).
    pub(crate) fn rand_vec(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
                (r as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A job for `shape` with `n_models` models.
    pub(crate) fn job(shape: &[usize], n_models: usize, has_base: bool, block: usize) -> TensorJob {
        TensorJob {
            name: "model.layers.0.mlp.up_proj.weight".into(),
            shape: shape.to_vec(),
            n_models,
            has_base,
            block_elems: block,
            seed: 0,
        }
    }

    /// Run `method` in memory.
    pub(crate) fn run(method: &dyn MergeMethod, job: &TensorJob, r: &MemReader) -> Vec<f32> {
        merge_in_memory(method, job, r).expect("merge")
    }

    /// Run with the whole tensor as one block, with small odd blocks, and on 1 and 3 threads;
    /// assert the results are bit-identical and return one.
    pub(crate) fn run_invariant(
        method: &dyn MergeMethod,
        job: &TensorJob,
        r: &MemReader,
    ) -> Vec<f32> {
        let numel = job.numel();
        let mut results = Vec::new();
        for block in [numel.max(1), 7, 1013] {
            let mut j = job.clone();
            j.block_elems = block;
            results.push(run(method, &j, r));
        }
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let mut j = job.clone();
            j.block_elems = 4099;
            results.push(pool.install(|| run(method, &j, r)));
        }
        let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for other in &results[1..] {
            assert_eq!(
                bits(&results[0]),
                bits(other),
                "result depends on blocking/threads"
            );
        }
        results.swap_remove(0)
    }

    /// Assert `got` is within `rel` relative (to the largest reference magnitude, floored at
    /// 1e-30) of the f64 reference `want`, elementwise.
    pub(crate) fn assert_close(got: &[f32], want: &[f64], rel: f64) {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            let err = (f64::from(*g) - w).abs();
            assert!(
                err <= rel * scale.max(w.abs()),
                "element {k}: got {g}, want {w} (err {err}, scale {scale})"
            );
        }
    }

    /// f64 copy of a vector.
    pub(crate) fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|x| f64::from(*x)).collect()
    }

    /// f64 dot product.
    pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Run a [`DevicePlan::Gram`] on `r` the way its documentation says a device does, written
    /// independently of the CPU path: x_i = input_i − base in f32, the Gram matrix of each group
    /// summed naively in f64 in flat element order, the plan's coefficients, then
    /// out = Σ_i c_i·x_i (+ base) in f32 in input order, from 0 (or model stock's
    /// t·(Σ_i input_i / n) + (1 − t)·base).
    // Element loops index several input buffers at once, as a device kernel does.
    #[allow(clippy::needless_range_loop)]
    pub(crate) fn emulate_gram_plan(
        plan: &DevicePlan,
        shape: &[usize],
        r: &MemReader,
    ) -> Result<Vec<f32>> {
        let DevicePlan::Gram {
            inputs,
            base,
            grouping,
            coefficients,
            combine,
        } = plan
        else {
            panic!("not a Gram plan: {plan:?}");
        };
        let get = |i: Input| -> &Vec<f32> {
            match i {
                Input::Base => r.base.as_ref().expect("base"),
                Input::Model(k) => &r.models[k],
            }
        };
        let numel: usize = shape.iter().product();
        let b = base.map(get);
        let xs: Vec<Vec<f32>> = inputs
            .iter()
            .map(|&i| {
                let v = get(i);
                assert_eq!(v.len(), numel);
                match b {
                    Some(b) => v.iter().zip(b).map(|(x, y)| x - y).collect(),
                    None => v.clone(),
                }
            })
            .collect();
        // Group of each flat element.
        let (groups, group_of): (usize, Box<dyn Fn(usize) -> usize>) = match grouping {
            DeviceGrouping::Whole => (1, Box::new(|_| 0)),
            DeviceGrouping::Rows => {
                let cols = if shape.len() >= 2 {
                    shape[shape.len() - 1]
                } else {
                    numel
                };
                (numel / cols, Box::new(move |e| e / cols))
            }
            DeviceGrouping::Axis0 => {
                let inner = numel / shape.first().copied().unwrap_or(1);
                (inner, Box::new(move |e| e % inner))
            }
        };
        let n = inputs.len();
        let mut data = vec![0.0f64; groups * n * n];
        for e in 0..numel {
            let g = group_of(e);
            for i in 0..n {
                for j in 0..n {
                    data[(g * n + i) * n + j] += f64::from(xs[i][e]) * f64::from(xs[j][e]);
                }
            }
        }
        let c = coefficients(&GramMatrices { n, groups, data })?;
        assert_eq!(c.len(), groups * n);
        if *combine == crate::methods::device::GramCombine::Stock {
            let b = b.expect("model stock has a base");
            return Ok((0..numel)
                .map(|e| {
                    let t = c[group_of(e) * n];
                    let mut s = 0.0f32;
                    for &i in inputs {
                        s += get(i)[e];
                    }
                    t * (s / n as f32) + (1.0 - t) * b[e]
                })
                .collect());
        }
        Ok((0..numel)
            .map(|e| {
                let g = group_of(e);
                let mut acc = 0.0f32;
                for i in 0..n {
                    acc += c[g * n + i] * xs[i][e];
                }
                if let Some(b) = b {
                    acc += b[e];
                }
                acc
            })
            .collect())
    }

    /// The inputs, base and grouping of `method`'s Gram device plan (panics without one).
    pub(crate) fn gram_plan_parts(
        method: &dyn MergeMethod,
    ) -> (
        Vec<Input>,
        Option<Input>,
        crate::methods::device::DeviceGrouping,
    ) {
        match method.device_plan() {
            Some(crate::methods::device::DevicePlan::Gram {
                inputs,
                base,
                grouping,
                ..
            }) => (inputs, base, grouping),
            _ => panic!("no Gram plan"),
        }
    }

    /// Assert that `method`'s device plan, run by [`emulate_gram_plan`], gives the CPU merge's
    /// result: bit-identical, except for a whole-tensor grouping of more than one reduction
    /// chunk (the CPU then sums the Gram matrix chunk by chunk, the emulation sequentially, so
    /// the coefficients may differ in the last bit), where the relative error must be ≤ 1e-6.
    /// Returns whether the bits agreed.
    pub(crate) fn assert_device_matches(
        method: &dyn MergeMethod,
        job: &TensorJob,
        r: &MemReader,
    ) -> bool {
        let cpu = run_invariant(method, job, r);
        let plan = method.device_plan().expect("a device plan");
        let dev = emulate_gram_plan(&plan, &job.shape, r).expect("device emulation");
        let DevicePlan::Gram { grouping, .. } = plan else {
            unreachable!("checked by emulate_gram_plan")
        };
        let same = bits(&cpu) == bits(&dev);
        if grouping != DeviceGrouping::Whole || job.numel() <= crate::reduce::REDUCE_CHUNK {
            assert!(
                same,
                "device plan differs from the CPU merge ({grouping:?})"
            );
        } else {
            let err = max_rel_err(&dev, &cpu);
            assert!(err <= 1e-6, "device plan off by {err} relative");
        }
        same
    }

    /// Bits of a vector.
    pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Largest |a − b| / max(|b|, 1e-30) over the elements.
    pub(crate) fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let (x, y) = (f64::from(*x), f64::from(*y));
                (x - y).abs() / y.abs().max(1e-30)
            })
            .fold(0.0, f64::max)
    }
}
