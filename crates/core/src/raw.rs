//! Input elements in their stored encoding, decoded tile by tile.
//!
//! Reading a block as f32 and then working on it costs two trips through memory for every
//! input (decode, then merge), and more for every further pass. A reader that can hand out the
//! stored bytes ([`crate::tensor::TensorReader::read_raw`]) lets the merge loops decode small
//! tiles that stay in the CPU cache, check them and combine them in one go
//! ([`BlockInputs`]). Decoding is exact (bf16 and f16 widen to f32 without rounding), so
//! results are bit-identical to reading f32.

use crate::error::{MergeError, Result};
use crate::tensor::{Input, TensorReader};
use half::f16;
use std::ops::Range;

/// Elements per tile: with a handful of inputs the tiles stay in the L1/L2 cache.
pub const TILE: usize = 4096;

/// Stored encoding of a raw block (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawDtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl RawDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            RawDtype::F32 => 4,
            RawDtype::F16 | RawDtype::Bf16 => 2,
        }
    }
}

/// A block of one input's elements in their stored encoding. Its storage only grows, so a
/// block reused across tensors is not zero-filled (page-faulted) again.
#[derive(Debug, Default)]
pub struct RawBlock {
    words: Vec<u32>,
    dtype: Option<RawDtype>,
    len: usize,
}

impl RawBlock {
    /// An empty block.
    pub fn new() -> Self {
        Self::default()
    }

    /// Prepare for `len` elements of `dtype` and return the bytes to fill (exactly
    /// `len * dtype.size()` bytes, 4-byte aligned).
    pub fn fill(&mut self, dtype: RawDtype, len: usize) -> &mut [u8] {
        let bytes = len * dtype.size();
        let words = bytes.div_ceil(4);
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
        self.dtype = Some(dtype);
        self.len = len;
        &mut bytemuck::cast_slice_mut::<u32, u8>(&mut self.words)[..bytes]
    }

    /// Number of elements held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the block holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Decode elements `range` (relative to the block) into `out` (same length). Runs the
    /// widest SIMD build of the loop the CPU has ([`crate::simd`]; exact either way).
    pub fn decode(&self, range: Range<usize>, out: &mut [f32]) {
        crate::simd::run(
            #[inline(always)]
            || self.decode_body(range, out),
        )
    }

    /// [`RawBlock::decode`]'s loops, inlined into both of its builds.
    #[inline(always)]
    fn decode_body(&self, range: Range<usize>, out: &mut [f32]) {
        debug_assert_eq!(range.len(), out.len());
        match self.dtype {
            Some(RawDtype::F32) => {
                let src = &self.words[range];
                for (o, &x) in out.iter_mut().zip(src) {
                    *o = f32::from_bits(u32::from_le(x));
                }
            }
            Some(RawDtype::Bf16) => {
                let src = &self.u16s()[range];
                for (o, &x) in out.iter_mut().zip(src) {
                    *o = f32::from_bits(u32::from(u16::from_le(x)) << 16);
                }
            }
            Some(RawDtype::F16) => {
                let src = &self.u16s()[range];
                for (o, &x) in out.iter_mut().zip(src) {
                    *o = f16::from_bits(u16::from_le(x)).to_f32();
                }
            }
            None => out.fill(0.0),
        }
    }

    #[inline(always)]
    fn u16s(&self) -> &[u16] {
        &bytemuck::cast_slice::<u32, u16>(&self.words)[..self.len]
    }
}

thread_local! {
    static RAW_POOL: std::cell::RefCell<Vec<RawBlock>> = const { std::cell::RefCell::new(Vec::new()) };
    static F32_POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// At most this many buffers of each kind are kept per thread.
const POOL_MAX: usize = 32;

/// A raw block from this thread's pool (tensors are merged one after another, so the buffers
/// of one tensor serve the next: large fresh allocations cost a zero-filled page fault per
/// page, which was a tenth of a merge's time).
pub fn take_raw() -> RawBlock {
    RAW_POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default()
}

/// Return a raw block to this thread's pool.
pub fn give_raw(b: RawBlock) {
    RAW_POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    });
}

/// An f32 buffer of exactly `len` elements from this thread's pool: the smallest one that
/// holds `len` without growing, else the largest (grown). Its contents are unspecified (left
/// from earlier use, zeros where it grew): the caller overwrites them.
pub fn take_f32(len: usize) -> Vec<f32> {
    let mut v = F32_POOL.with(|p| {
        let mut p = p.borrow_mut();
        let fit = (0..p.len())
            .filter(|&i| p[i].capacity() >= len)
            .min_by_key(|&i| p[i].capacity());
        let pick = fit.or_else(|| (0..p.len()).max_by_key(|&i| p[i].capacity()));
        pick.map(|i| p.swap_remove(i)).unwrap_or_default()
    });
    if v.len() >= len {
        v.truncate(len);
    } else {
        v.resize(len, 0.0);
    }
    v
}

/// Return an f32 buffer to this thread's pool. When the pool is full the smallest buffer is
/// dropped (large ones are the expensive ones to fault in again).
pub fn give_f32(v: Vec<f32>) {
    F32_POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.push(v);
        if p.len() > POOL_MAX {
            if let Some(i) = (0..p.len()).min_by_key(|&i| p[i].capacity()) {
                p.swap_remove(i);
            }
        }
    });
}

/// Elements per read when streaming a tensor: a few MiB per input, so what a read brings in is
/// still in the cache when the tiles use it (memory budgets only bound the blocks' size).
pub const STREAM_BLOCK: usize = 1 << 20;

/// Run `f(range, tile)` over `out` in tiles of [`TILE`] elements, in parallel; `out` holds the
/// elements `start..start + out.len()`. On failure the error of the first failing tile in
/// index order is returned, whichever thread met one first.
pub fn for_each_tile<F>(out: &mut [f32], start: usize, f: F) -> Result<()>
where
    F: Fn(Range<usize>, &mut [f32]) -> Result<()> + Sync,
{
    use rayon::prelude::*;
    let run = |t: usize, o: &mut [f32]| {
        let lo = start + t * TILE;
        f(lo..lo + o.len(), o)
    };
    let res = out
        .par_chunks_mut(TILE)
        .enumerate()
        .try_for_each(|(t, o)| run(t, o));
    if res.is_err() {
        for (t, o) in out.chunks_mut(TILE).enumerate() {
            run(t, o)?;
        }
    }
    res
}

/// Whether every value is finite (branch-free, vectorisable).
#[inline(always)]
pub fn all_finite(v: &[f32]) -> bool {
    v.iter().fold(true, |ok, x| {
        ok & (x.to_bits() & 0x7F80_0000 != 0x7F80_0000)
    })
}

/// One block of several inputs (and optionally the base), held in their stored encoding where
/// the reader allows and as f32 otherwise, decoded tile by tile.
pub struct BlockInputs<'a> {
    reader: &'a dyn TensorReader,
    tensor: &'a str,
    inputs: Vec<Input>,
    raw: Vec<RawBlock>,
    f32s: Vec<Vec<f32>>,
    is_raw: Vec<bool>,
    /// Each input's stored encoding ([`TensorReader::raw_dtype`]), looked up at the first read.
    dtypes: Vec<Option<RawDtype>>,
    start: usize,
    check: bool,
}

/// Elements per parallel positioned read in [`BlockInputs::read`].
pub const READ_PIECE: usize = 1 << 17;

impl<'a> BlockInputs<'a> {
    /// Inputs `inputs` of tensor `tensor`, read through `reader`.
    pub fn new(reader: &'a dyn TensorReader, tensor: &'a str, inputs: &[Input]) -> Self {
        let n = inputs.len();
        Self {
            reader,
            tensor,
            inputs: inputs.to_vec(),
            raw: (0..n).map(|_| take_raw()).collect(),
            f32s: vec![Vec::new(); n],
            is_raw: vec![false; n],
            dtypes: Vec::new(),
            start: 0,
            check: !reader.allows_nonfinite(),
        }
    }

    /// Number of inputs.
    pub fn n(&self) -> usize {
        self.inputs.len()
    }

    /// Read elements `range` of every input. Inputs whose reader can read stored bytes into a
    /// slice ([`TensorReader::read_raw_bytes`]) are read in parallel pieces of
    /// [`READ_PIECE`] elements, all inputs at once: one thread copying from the page cache is
    /// slower than memory, and the tiles wait for the whole block.
    pub fn read(&mut self, range: Range<usize>) -> Result<()> {
        use rayon::prelude::*;
        self.start = range.start;
        let len = range.len();
        if self.dtypes.len() != self.inputs.len() {
            self.dtypes = self
                .inputs
                .iter()
                .map(|&i| self.reader.raw_dtype(i))
                .collect::<Result<_>>()?;
        }
        // (input, its piece's elements, the piece's bytes) for every piece of a raw input.
        let mut pieces = Vec::new();
        for (k, (raw, dtype)) in self.raw.iter_mut().zip(&self.dtypes).enumerate() {
            let Some(dtype) = *dtype else { continue };
            let bytes = raw.fill(dtype, len);
            for (p, b) in bytes.chunks_mut(READ_PIECE * dtype.size()).enumerate() {
                let lo = range.start + p * READ_PIECE;
                pieces.push((k, lo..lo + b.len() / dtype.size(), b));
            }
        }
        let (reader, inputs) = (self.reader, &self.inputs);
        let done: Vec<(usize, bool)> = pieces
            .into_par_iter()
            .map(|(k, r, b)| Ok((k, reader.read_raw_bytes(inputs[k], r, b)?)))
            .collect::<Result<_>>()?;
        // An input is read when all its pieces were (a reader without `read_raw_bytes`
        // answers `false`: such inputs are read whole below).
        let mut whole: Vec<bool> = self.dtypes.iter().map(Option::is_some).collect();
        for (k, d) in done {
            whole[k] &= d;
        }
        for (k, &input) in self.inputs.iter().enumerate() {
            if whole[k] {
                self.is_raw[k] = true;
                continue;
            }
            if self
                .reader
                .read_raw(input, range.clone(), &mut self.raw[k])?
            {
                self.is_raw[k] = true;
            } else {
                self.is_raw[k] = false;
                let buf = &mut self.f32s[k];
                buf.resize(range.len(), 0.0);
                self.reader.read(input, range.clone(), buf)?;
            }
        }
        Ok(())
    }

    /// Decode elements `range` (absolute flat indices inside the block last read) of input `k`
    /// into `out`, checking them finite unless the reader allows non-finite values.
    pub fn decode(&self, k: usize, range: Range<usize>, out: &mut [f32]) -> Result<()> {
        let rel = range.start - self.start..range.end - self.start;
        if self.is_raw[k] {
            let raw = &self.raw[k];
            let check = self.check;
            // Decode and check in one build per instruction set, `crate::simd`.
            let ok = crate::simd::run(
                #[inline(always)]
                || {
                    raw.decode_body(rel, out);
                    !check || all_finite(out)
                },
            );
            if !ok {
                let off = out.iter().position(|x| !x.is_finite()).unwrap_or(0);
                return Err(self.reader.non_finite_error(
                    self.tensor,
                    self.inputs[k],
                    range.start + off,
                    out[off],
                ));
            }
        } else {
            // `read` already checked these.
            out.copy_from_slice(&self.f32s[k][rel]);
        }
        Ok(())
    }
}

impl Drop for BlockInputs<'_> {
    fn drop(&mut self) {
        for b in self.raw.drain(..) {
            give_raw(b);
        }
        for v in self.f32s.drain(..) {
            give_f32(v);
        }
    }
}

/// The generic error for a non-finite input value of tensor `tensor` (readers that know the
/// file name it too).
pub fn non_finite_message(tensor: &str, input: Input, index: usize, value: f32) -> MergeError {
    let who = match input {
        Input::Base => "the base model".to_string(),
        Input::Model(i) => format!("model #{i}"),
    };
    MergeError::Numeric {
        tensor: tensor.to_string(),
        message: format!(
            "non-finite value ({value}) in {who} at element {index}; fix the input or pass \
             --allow-nonfinite"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_encoding_exactly() {
        let vals = [0.0f32, -0.0, 1.5, -2.25, 65504.0, 1e-3, 3.0e38];
        let mut b = RawBlock::new();
        // f32
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        b.fill(RawDtype::F32, vals.len()).copy_from_slice(&bytes);
        let mut out = vec![0.0; 3];
        b.decode(2..5, &mut out);
        assert_eq!(out, vec![1.5, -2.25, 65504.0]);
        // bf16: the high halves
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        b.fill(RawDtype::Bf16, vals.len()).copy_from_slice(&bytes);
        let mut out = vec![0.0; vals.len()];
        b.decode(0..vals.len(), &mut out);
        for (o, v) in out.iter().zip(vals) {
            assert_eq!(o.to_bits(), v.to_bits() & 0xFFFF_0000);
        }
        // f16: values exactly representable
        let h = [0.5f32, -1.0, 2048.0, 65504.0];
        let bytes: Vec<u8> = h
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        b.fill(RawDtype::F16, h.len()).copy_from_slice(&bytes);
        let mut out = vec![0.0; 4];
        b.decode(0..4, &mut out);
        assert_eq!(out, h.to_vec());
    }

    /// Two bf16 inputs in memory, read through `read_raw_bytes` (or, with `bytes: false`, only
    /// through `read_raw`, as a reader without slice reads).
    struct Bf16Reader {
        inputs: Vec<Vec<u8>>,
        bytes: bool,
    }

    impl TensorReader for Bf16Reader {
        fn read(&self, _: Input, _: Range<usize>, _: &mut [f32]) -> Result<()> {
            unreachable!("every input is raw")
        }

        fn read_raw(&self, input: Input, range: Range<usize>, out: &mut RawBlock) -> Result<bool> {
            let Input::Model(i) = input else {
                return Ok(false);
            };
            let b = &self.inputs[i][range.start * 2..range.end * 2];
            out.fill(RawDtype::Bf16, range.len()).copy_from_slice(b);
            Ok(true)
        }

        fn raw_dtype(&self, _: Input) -> Result<Option<RawDtype>> {
            Ok(Some(RawDtype::Bf16))
        }

        fn read_raw_bytes(
            &self,
            input: Input,
            range: Range<usize>,
            out: &mut [u8],
        ) -> Result<bool> {
            let Input::Model(i) = input else {
                return Ok(false);
            };
            if !self.bytes {
                return Ok(false);
            }
            out.copy_from_slice(&self.inputs[i][range.start * 2..range.end * 2]);
            Ok(true)
        }
    }

    #[test]
    fn parallel_piece_reads_give_every_element_in_place() {
        let n = 3 * READ_PIECE + 5;
        // Element k of input i is the bf16 of (k mod 251) + 1000·i (exact in bf16 for i = 0;
        // for i = 1 the bits are compared, not the value).
        let val = |i: usize, k: usize| ((k % 251) as f32 + 1000.0 * i as f32).to_bits() >> 16;
        let inputs: Vec<Vec<u8>> = (0..2)
            .map(|i| {
                (0..n)
                    .flat_map(|k| (val(i, k) as u16).to_le_bytes())
                    .collect()
            })
            .collect();
        for bytes in [true, false] {
            let r = Bf16Reader {
                inputs: inputs.clone(),
                bytes,
            };
            let mut blocks = BlockInputs::new(&r, "t", &[Input::Model(0), Input::Model(1)]);
            for range in [0..n, 7..READ_PIECE + 9, READ_PIECE..2 * READ_PIECE, 5..5] {
                blocks.read(range.clone()).expect("read");
                for i in 0..2 {
                    let mut out = vec![0.0f32; range.len()];
                    blocks.decode(i, range.clone(), &mut out).expect("decode");
                    for (k, o) in range.clone().zip(&out) {
                        assert_eq!(o.to_bits(), val(i, k) << 16, "input {i} element {k}");
                    }
                }
            }
        }
    }

    #[test]
    fn finiteness() {
        assert!(all_finite(&[1.0, -3.0, 0.0]));
        assert!(!all_finite(&[1.0, f32::NAN]));
        assert!(!all_finite(&[f32::NEG_INFINITY]));
    }
}
