//! Subsets of the pool: fixed seeded permutations, first `m` models (methods.md §16, "Scaling
//! the number of models").
//!
//! The reference draws fixed permutations of the tasks with seed 0 (20 permutations when there
//! are more than 20 tasks, else 10), keeps every prefix of length ≥ 2 unique, and merges the
//! first `m` models of each. Its NumPy generator cannot be reproduced bit for bit, so amalgam
//! fixes its own rule:
//!
//! 1. A SplitMix64 generator seeded with `seed` draws candidates by Fisher–Yates (for `i` from
//!    `n-1` down to 1, swap `i` with `j = ⌊u·(i+1) / 2⁶⁴⌋`, `u` the next 64-bit output).
//! 2. A candidate is accepted when, for every prefix length `k` with `2 ≤ k < n` for which
//!    `C(n, k) ≥ P` (enough distinct subsets exist for all `P` permutations), its first `k`
//!    models, as a set, differ from those of every accepted permutation. After 10,000
//!    rejected candidates in a row the next one is accepted as is (uniqueness is then best
//!    effort; this happens only for pathological pool sizes).
//! 3. The subsets of size `m` are the first `m` models of each permutation in order, as sets,
//!    with duplicates dropped (so `m = n` gives one subset), at most `max_per_count` of them.

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-known generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator with the given seed.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (multiply-shift; `n ≥ 1`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// A uniformly shuffled permutation of `0..n` (Fisher–Yates from the end).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i + 1);
            p.swap(i, j);
        }
        p
    }
}

/// `C(n, k)`, saturating at `u128::MAX`.
fn binomial(n: usize, k: usize) -> u128 {
    let k = k.min(n - k);
    let mut c: u128 = 1;
    for i in 0..k {
        c = c.saturating_mul((n - i) as u128) / (i as u128 + 1);
    }
    c
}

/// The first `k` entries of `p`, sorted.
fn prefix_set(p: &[usize], k: usize) -> Vec<usize> {
    let mut s = p[..k].to_vec();
    s.sort_unstable();
    s
}

/// `count` permutations of `0..n` by the rule in the module docs.
pub fn permutations(n: usize, count: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64::new(seed);
    let checked: Vec<usize> = (2..n)
        .filter(|&k| binomial(n, k) >= count as u128)
        .collect();
    let mut out: Vec<Vec<usize>> = Vec::with_capacity(count);
    while out.len() < count {
        let mut tries = 0;
        let p = loop {
            let p = rng.permutation(n);
            tries += 1;
            let clash = checked.iter().any(|&k| {
                let s = prefix_set(&p, k);
                out.iter().any(|q| prefix_set(q, k) == s)
            });
            if !clash || tries > 10_000 {
                break p;
            }
        };
        out.push(p);
    }
    out
}

/// One subset of the pool to merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subset {
    /// The permutation it is the prefix of (the first one, when several give it).
    pub permutation: usize,
    /// Pool indices, sorted.
    pub models: Vec<usize>,
}

/// The distinct subsets of size `m`: first `m` of each permutation, in permutation order.
pub fn subsets(perms: &[Vec<usize>], m: usize, max: Option<usize>) -> Vec<Subset> {
    let mut out: Vec<Subset> = Vec::new();
    for (i, p) in perms.iter().enumerate() {
        if max.is_some_and(|x| out.len() >= x) {
            break;
        }
        let models = prefix_set(p, m.min(p.len()));
        if !out.iter().any(|s| s.models == models) {
            out.push(Subset {
                permutation: i,
                models,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn splitmix_matches_the_published_sequence() {
        // SplitMix64 from seed 0: the first outputs as published with the reference C code.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(r.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn fisher_yates_by_hand() {
        // n = 3, seed 0: u1 = 0xE220A8397B1DCDAF → j = ⌊u1·3/2⁶⁴⌋ = 2 (u1/2⁶⁴ ≈ 0.883):
        // swap(2, 2); u2 = 0x6E789E6AA1B965F4 → j = ⌊u2·2/2⁶⁴⌋ = 0 (≈ 0.431): swap(1, 0).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.permutation(3), vec![1, 0, 2]);
    }

    /// An independent, naive statement of the rule: every permutation valid, and prefix sets
    /// unique at every checked length.
    fn check_rule(n: usize, count: usize, perms: &[Vec<usize>]) {
        assert_eq!(perms.len(), count);
        for p in perms {
            let s: BTreeSet<usize> = p.iter().copied().collect();
            assert_eq!(s, (0..n).collect::<BTreeSet<_>>());
        }
        for k in 2..n {
            // C(n, k) by the multiplicative formula in f64.
            let c: f64 = (0..k).map(|i| (n - i) as f64 / (i + 1) as f64).product();
            if c.round() < count as f64 {
                continue;
            }
            let sets: BTreeSet<BTreeSet<usize>> = perms
                .iter()
                .map(|p| p[..k].iter().copied().collect())
                .collect();
            assert_eq!(sets.len(), count, "n={n} k={k}: duplicate prefixes");
        }
    }

    #[test]
    fn prefixes_are_unique_where_possible() {
        // n = 5 with 10 permutations would need all ten 2-sets and all ten 3-sets at once, which
        // the greedy draw does not reach (best effort there: checked separately below).
        for (n, count) in [(8, 10), (25, 20), (3, 10), (6, 10), (4, 3)] {
            let p = permutations(n, count, 0);
            check_rule(n, count, &p);
            assert_eq!(p, permutations(n, count, 0), "deterministic");
        }
        assert_ne!(permutations(8, 10, 0), permutations(8, 10, 1));
        let p = permutations(5, 10, 0);
        assert_eq!(p.len(), 10);
        for q in &p {
            let mut s = q.clone();
            s.sort_unstable();
            assert_eq!(s, vec![0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn subsets_are_deduplicated_prefixes() {
        let perms = vec![vec![2, 0, 1], vec![0, 2, 1], vec![1, 0, 2]];
        assert_eq!(
            subsets(&perms, 2, None),
            vec![
                Subset {
                    permutation: 0,
                    models: vec![0, 2]
                },
                Subset {
                    permutation: 2,
                    models: vec![0, 1]
                },
            ]
        );
        assert_eq!(subsets(&perms, 3, None).len(), 1);
        assert_eq!(subsets(&perms, 2, Some(1)).len(), 1);
    }
}
