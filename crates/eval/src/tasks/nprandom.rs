//! numpy's legacy `np.random.RandomState` as far as BIG-bench needs it: MT19937 seeded with an
//! integer, `permutation(n)` and `choice(n, k, replace=False)`.
//!
//! BIG-bench (`bigbench/api/json_task.py`, `default_format_fn`) orders the choices it appends to
//! the input with `np.random.RandomState(seed=42).permutation(sorted(choices))`, a fresh
//! generator for every example. Reproducing that order exactly needs numpy's generator:
//!
//! - seeding: the reference `init_genrand` (numpy `mt19937_seed`, used by `_legacy_seeding` for
//!   an integer seed);
//! - 32-bit outputs: the reference `genrand_int32` tempering;
//! - `shuffle` of a 1-d array: for i = n−1 down to 1, swap a\[i\] with a\[j\], j drawn uniformly in
//!   0..=i by `random_interval` (mask to the next power of two minus one, redraw while > i).

/// The MT19937 generator of numpy's legacy `RandomState`.
#[derive(Clone)]
pub struct NumpyRandomState {
    state: [u32; 624],
    pos: usize,
}

impl NumpyRandomState {
    /// `np.random.RandomState(seed)` for an integer seed in 0..2³².
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        NumpyRandomState { state, pos: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 == 1 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.pos = 0;
    }

    /// The next raw 32-bit output (`genrand_int32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.pos >= 624 {
            self.twist();
        }
        let mut y = self.state[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// A uniform integer in `0..=max` by numpy's masked rejection (`random_interval`).
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for shift in [1, 2, 4, 8, 16, 32] {
            mask |= mask >> shift;
        }
        if max <= u64::from(u32::MAX) {
            loop {
                let v = u64::from(self.next_u32()) & mask;
                if v <= max {
                    return v;
                }
            }
        }
        loop {
            let hi = u64::from(self.next_u32());
            let lo = u64::from(self.next_u32());
            let v = ((hi << 32) | lo) & mask;
            if v <= max {
                return v;
            }
        }
    }

    /// `shuffle` of a 1-d sequence, in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.interval(i as u64) as usize;
            items.swap(i, j);
        }
    }

    /// `permutation(n)`: a shuffled `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        self.shuffle(&mut idx);
        idx
    }

    /// `choice(n, k, replace=False)` without probabilities: `permutation(n)[:k]`.
    pub fn choice_without_replacement(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut idx = self.permutation(n);
        idx.truncate(k);
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values printed by numpy 2.4.6:
    //   np.random.RandomState(42).permutation(n).tolist()
    #[test]
    fn matches_numpy_permutations() {
        let expected: [&[usize]; 8] = [
            &[0],
            &[1, 0],
            &[0, 1, 2],
            &[1, 3, 0, 2],
            &[1, 4, 2, 0, 3],
            &[0, 1, 5, 2, 4, 3],
            &[0, 1, 5, 2, 4, 3, 6],
            &[1, 5, 0, 7, 2, 4, 3, 6],
        ];
        for (k, want) in expected.iter().enumerate() {
            let got = NumpyRandomState::new(42).permutation(k + 1);
            assert_eq!(&got[..], *want, "n = {}", k + 1);
        }
        let want30 = [
            27, 15, 23, 17, 8, 9, 28, 24, 12, 0, 4, 16, 5, 13, 11, 22, 1, 2, 25, 3, 21, 26, 18, 29,
            20, 7, 10, 14, 19, 6,
        ];
        assert_eq!(NumpyRandomState::new(42).permutation(30), want30);
        // np.random.RandomState(7).permutation(1000)[:10]
        assert_eq!(
            NumpyRandomState::new(7).choice_without_replacement(1000, 10),
            [778, 334, 271, 802, 216, 408, 812, 94, 487, 170]
        );
    }

    #[test]
    fn raw_outputs_match_reference_mt19937() {
        // The first outputs of MT19937 init_genrand(42) (also numpy's first draws).
        let mut r = NumpyRandomState::new(42);
        assert_eq!(
            [r.next_u32(), r.next_u32(), r.next_u32()],
            [1_608_637_542, 3_421_126_067, 4_083_286_876]
        );
    }
}
