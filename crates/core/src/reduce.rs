//! Deterministic reductions.
//!
//! architecture.md ("Numbers"): reductions are f64 and summed in a fixed order over fixed-size
//! chunks of the flat tensor, so the result never depends on threads, block size (memory budget)
//! or worker count. [`ChunkedSum`] keeps one partial per chunk of [`REDUCE_CHUNK`] elements,
//! each summed sequentially in element order (so a chunk split across two blocks gives the same
//! partial), and [`ChunkedSum::total`] adds the partials in chunk order.

use rayon::prelude::*;

/// Number of elements per reduction chunk. Fixed: changing it changes results in the last bits.
pub const REDUCE_CHUNK: usize = 1 << 14;

/// A sum over a tensor's flat elements, accumulated block by block, with a result independent
/// of how the tensor was cut into blocks.
#[derive(Debug, Clone, Default)]
pub struct ChunkedSum {
    partials: Vec<f64>,
}

impl ChunkedSum {
    /// A sum over a tensor of `numel` elements.
    pub fn new(numel: usize) -> Self {
        Self {
            partials: vec![0.0; numel.div_ceil(REDUCE_CHUNK).max(1)],
        }
    }

    /// Add `f(i)` for every element `start + i` of a block of `len` elements (`f` receives the
    /// index within the block). Runs chunks in parallel; each chunk sums sequentially.
    pub fn add_block<F>(&mut self, start: usize, len: usize, f: F)
    where
        F: Fn(usize) -> f64 + Sync,
    {
        let end = start + len;
        if len == 0 {
            return;
        }
        let first = start / REDUCE_CHUNK;
        let last = (end - 1) / REDUCE_CHUNK;
        let slots = &mut self.partials[first..=last];
        slots.par_iter_mut().enumerate().for_each(|(k, slot)| {
            let c = first + k;
            let lo = (c * REDUCE_CHUNK).max(start);
            let hi = ((c + 1) * REDUCE_CHUNK).min(end);
            let mut s = *slot;
            for e in lo..hi {
                s += f(e - start);
            }
            *slot = s;
        });
    }

    /// The sum: partials added in chunk order.
    pub fn total(&self) -> f64 {
        self.partials.iter().fold(0.0, |a, b| a + b)
    }
}

/// Sum `f(i)` over `0..len` with a fixed chunking (a convenience for whole in-memory arrays).
pub fn chunked_sum<F>(len: usize, f: F) -> f64
where
    F: Fn(usize) -> f64 + Sync,
{
    let mut s = ChunkedSum::new(len);
    s.add_block(0, len, f);
    s.total()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn independent_of_blocking() {
        let n = REDUCE_CHUNK * 3 + 77;
        let v: Vec<f64> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f64 * 1e-3 + 1e-9)
            .collect();
        let whole = chunked_sum(n, |i| v[i]);
        for block in [1usize, 5, 1000, REDUCE_CHUNK - 1, REDUCE_CHUNK + 3, n] {
            let mut s = ChunkedSum::new(n);
            let mut start = 0;
            while start < n {
                let len = block.min(n - start);
                s.add_block(start, len, |i| v[start + i]);
                start += len;
            }
            assert_eq!(s.total().to_bits(), whole.to_bits());
        }
        let naive: f64 = v.iter().sum();
        assert!((whole - naive).abs() < 1e-9 * naive.abs());
    }
}
