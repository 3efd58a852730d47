//! Philox4x32-10, the counter-based RNG of every random merge method (DARE, DELLA).
//!
//! architecture.md ("Numbers"): a random keep-decision is a pure function of (seed, model index,
//! tensor name, flat element index), so masks do not depend on blocks, threads, shards or the
//! device. The GPU kernels (`philox.cuh`) implement exactly this contract:
//!
//! - **Generator**: Philox4x32-10 of Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"
//!   (SC'11), as in Random123 `philox4x32_R(10, ctr, key)`: multipliers `M0 = 0xD2511F53`,
//!   `M1 = 0xCD9E8D57`, Weyl key increments `W0 = 0x9E3779B9`, `W1 = 0xBB67AE85`, 10 rounds,
//!   the first round with the unbumped key. Checked against Random123's known-answer vectors.
//! - **Key** `[k0, k1]`: `k0 = seed as u32` (low 32 bits of the merge's `random_seed`),
//!   `k1 = (seed >> 32) as u32 ^ model` where `model` is the index `i` of
//!   [`crate::tensor::Input::Model`] (config order, base excluded).
//! - **Counter** `[c0, c1, c2, c3]`: `c0 = h as u32`, `c1 = (h >> 32) as u32` with
//!   `h = `[`name_hash`]`(tensor name)` (FNV-1a 64 over the name's UTF-8 bytes), `c2 = idx as u32`,
//!   `c3 = (idx >> 32) as u32` where `idx` is the flat row-major element index in the tensor.
//! - **Decision**: only the first output word `x0` is used. An element with keep-probability `p`
//!   is kept when `x0 as u64 < `[`keep_threshold`]`(p)`, where the threshold is
//!   `floor(p * 2^32)` computed in f64 and clamped to `[0, 2^32]`; so `p >= 1` keeps every
//!   element and `p <= 0` (or NaN) keeps none.

/// Philox multiplier for words 0/1.
pub const M0: u32 = 0xD251_1F53;
/// Philox multiplier for words 2/3.
pub const M1: u32 = 0xCD9E_8D57;
/// Key increment (golden ratio) for key word 0.
pub const W0: u32 = 0x9E37_79B9;
/// Key increment (sqrt(3) - 1) for key word 1.
pub const W1: u32 = 0xBB67_AE85;
/// Number of rounds.
pub const ROUNDS: usize = 10;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

#[inline(always)]
fn round(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(M0, ctr[0]);
    let (hi1, lo1) = mulhilo(M1, ctr[2]);
    [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0]
}

/// One Philox4x32-10 block: four 32-bit outputs for `ctr` under `key`.
#[inline]
pub fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    ctr = round(ctr, key);
    for _ in 1..ROUNDS {
        key[0] = key[0].wrapping_add(W0);
        key[1] = key[1].wrapping_add(W1);
        ctr = round(ctr, key);
    }
    ctr
}

/// FNV-1a 64 of `name`'s UTF-8 bytes (offset basis 0xcbf29ce484222325, prime 0x100000001b3):
/// the tensor-name part of the counter. Fixed forever: changing it changes every mask.
pub fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The Philox key for (seed, model index).
#[inline]
pub fn key(seed: u64, model: usize) -> [u32; 2] {
    [seed as u32, ((seed >> 32) as u32) ^ (model as u32)]
}

/// The Philox counter for (tensor-name hash, flat element index).
#[inline]
pub fn counter(name_hash: u64, idx: u64) -> [u32; 4] {
    [
        name_hash as u32,
        (name_hash >> 32) as u32,
        idx as u32,
        (idx >> 32) as u32,
    ]
}

/// `floor(p * 2^32)` in f64, clamped to `[0, 2^32]` (NaN gives 0): an element is kept when its
/// first Philox word, as u64, is below this.
#[inline]
pub fn keep_threshold(p: f64) -> u64 {
    const TWO32: f64 = 4_294_967_296.0;
    if p.is_nan() || p <= 0.0 {
        0
    } else if p >= 1.0 {
        1u64 << 32
    } else {
        ((p * TWO32).floor() as u64).min(1u64 << 32)
    }
}

/// The random stream of one (seed, model, tensor): one uniform 32-bit word per element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskStream {
    key: [u32; 2],
    name_hash: u64,
}

impl MaskStream {
    /// The stream of model `model` (index in [`crate::tensor::Input::Model`]) for tensor `name`.
    pub fn new(seed: u64, model: usize, name: &str) -> Self {
        Self {
            key: key(seed, model),
            name_hash: name_hash(name),
        }
    }

    /// The first Philox output word for flat element `idx`.
    #[inline]
    pub fn word(&self, idx: usize) -> u32 {
        philox4x32_10(counter(self.name_hash, idx as u64), self.key)[0]
    }

    /// Whether element `idx` is kept under a threshold from [`keep_threshold`].
    #[inline]
    pub fn keep(&self, idx: usize, threshold: u64) -> bool {
        u64::from(self.word(idx)) < threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random123_known_answers() {
        // Random123 kat_vectors, philox4x32 10 (ctr[4], key[2] -> out[4]).
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn fnv1a_known_answers() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(name_hash(""), 0xcbf29ce484222325);
        assert_eq!(name_hash("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(name_hash("foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn layout() {
        let seed = 0x1234_5678_9abc_def0u64;
        assert_eq!(key(seed, 3), [0x9abc_def0, 0x1234_5678 ^ 3]);
        assert_eq!(
            counter(0xaaaa_bbbb_cccc_dddd, 0x1_0000_0002),
            [0xcccc_dddd, 0xaaaa_bbbb, 2, 1]
        );
        let s = MaskStream::new(seed, 3, "w");
        let expect = philox4x32_10(counter(name_hash("w"), 7), key(seed, 3))[0];
        assert_eq!(s.word(7), expect);
    }

    #[test]
    fn thresholds() {
        assert_eq!(keep_threshold(1.0), 1 << 32);
        assert_eq!(keep_threshold(2.0), 1 << 32);
        assert_eq!(keep_threshold(0.0), 0);
        assert_eq!(keep_threshold(-1.0), 0);
        assert_eq!(keep_threshold(f64::NAN), 0);
        assert_eq!(keep_threshold(0.5), 1 << 31);
        let s = MaskStream::new(1, 0, "x");
        assert!((0..1000).all(|i| s.keep(i, keep_threshold(1.0))));
        assert!((0..1000).all(|i| !s.keep(i, keep_threshold(0.0))));
    }

    #[test]
    fn fraction_kept() {
        let n = 200_000;
        for (m, p) in [(0usize, 0.1f64), (1, 0.5), (2, 0.9)] {
            let s = MaskStream::new(42, m, "model.layers.0.mlp.up_proj.weight");
            let t = keep_threshold(p);
            let kept = (0..n).filter(|&i| s.keep(i, t)).count() as f64 / n as f64;
            // 5 sigma of a binomial proportion.
            let sigma = (p * (1.0 - p) / n as f64).sqrt();
            assert!((kept - p).abs() < 5.0 * sigma, "p={p} kept={kept}");
        }
    }

    #[test]
    fn streams_differ() {
        let a = MaskStream::new(0, 0, "t");
        let b = MaskStream::new(0, 1, "t");
        let c = MaskStream::new(0, 0, "u");
        let d = MaskStream::new(1, 0, "t");
        for o in [b, c, d] {
            assert!((0..64).any(|i| a.word(i) != o.word(i)));
        }
    }
}
