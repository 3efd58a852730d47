//! DELLA's per-group ranks (`della_ranks`, every mode) on the emulator against a sort.

use super::{arg, dims, Buf, Emu};
use crate::merge::{della_group, DellaLaunch, GtaArgs, GtaModel, DELLA_COUNT};

/// A deterministic pseudo-random sequence (splitmix64).
pub(super) struct Mix(pub u64);

impl Mix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Values in [-1, 1); with `levels`, one of that many magnitudes (ties).
    pub fn values(&mut self, n: usize, levels: Option<u64>) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let r = self.next();
                let u = match levels {
                    Some(l) => ((r >> 11) % l) as f32 / l as f32,
                    None => (r >> 40) as f32 / (1u64 << 24) as f32,
                };
                if r & 1 == 1 {
                    -u
                } else {
                    u
                }
            })
            .collect()
    }
}

/// The reference: 1 + the position of each element's (|d| bits, position in group) in its
/// group's ascending order, for rank groups along axis 1 (mergekit's `della_magprune`).
fn reference(x: &[f32], base: &[f32], shape: &[usize]) -> Vec<u32> {
    let (c, inner) = match shape.len() {
        0 => (1, 1),
        1 => (shape[0], 1),
        _ => (shape[1], shape[2..].iter().product::<usize>()),
    };
    let n = x.len();
    let mut ranks = vec![0u32; n];
    for g in 0..n / c {
        let (o, t) = (g / inner, g % inner);
        let idx = |p: usize| o * c * inner + p * inner + t;
        let mut keys: Vec<(u32, usize)> = (0..c)
            .map(|p| ((x[idx(p)] - base[idx(p)]).to_bits() & 0x7fff_ffff, p))
            .collect();
        keys.sort();
        for (r, &(_, p)) in keys.iter().enumerate() {
            ranks[idx(p)] = r as u32 + 1;
        }
    }
    ranks
}

/// The ranks `della_ranks` gives model 1 of a two-model launch (the launches of
/// [`DellaLaunch`] on a device of `sms` multiprocessors).
fn emulated(emu: &Emu, x: &[f32], base: &[f32], shape: &[usize], big: bool, sms: u32) -> Vec<u32> {
    let n = x.len();
    let g = della_group(shape, n, big).unwrap();
    let plan = DellaLaunch::of(n as u64, &g, sms);
    let (mut xb, mut bb) = (Buf::of(x), Buf::of(base));
    let models = [
        GtaModel::default(),
        GtaModel {
            ptr: xb.ptr(),
            ..Default::default()
        },
    ];
    let mut mb = Buf::of_structs(&models);
    let a = GtaArgs {
        base: bb.ptr(),
        n: n as u64,
        n_models: 2,
        ..Default::default()
    };
    let mut ranks = Buf::zeros(4 * n);
    let mut keys = Buf::zeros(8 * n);
    let (mp, rp, mut kp) = (mb.ptr(), ranks.ptr(), keys.ptr());
    if !g.segmented() {
        kp = 0;
    }
    let (model, c, inner, seg, pow2) = (1i32, plan.c, plan.inner, plan.seg, plan.pow2);
    let launch = |mode: i32, cfg: &cudarc::driver::LaunchConfig| {
        let (grid, block, smem) = dims(cfg);
        let mut args = [
            arg(&mp),
            arg(&a),
            arg(&model),
            arg(&c),
            arg(&inner),
            arg(&seg),
            arg(&pow2),
            arg(&mode),
            arg(&rp),
            arg(&kp),
        ];
        // SAFETY: the arguments match `della_ranks`; ranks and keys hold n values, the models
        // and inputs are the buffers above.
        unsafe { emu.launch("della_ranks", grid, block, smem, &mut args) };
    };
    launch(plan.mode, &plan.sort);
    if let Some(count) = plan.count {
        launch(DELLA_COUNT, &count);
    }
    ranks.read(n)
}

#[test]
fn della_ranks_match_a_sort_in_every_mode() {
    let Some(emu) = Emu::get() else { return };
    let mut mix = Mix(7);
    // (shape, large shared memory, distinct magnitudes or tie-heavy)
    let cases: &[(&[usize], bool, Option<u64>)] = &[
        (&[5, 50], true, None),            // rows, several groups to a block
        (&[5, 50], true, Some(6)),         // ties: ordered by position
        (&[3, 7, 5], true, Some(4)),       // axis 1 of a 3-D tensor (strided groups)
        (&[2, 3, 4, 2], true, None),       // axis 1 of a 4-D tensor
        (&[7], true, None),                // 1-D: one group
        (&[], true, None),                 // a scalar
        (&[2, 1500], false, Some(40)),     // rows sorted whole in 2048 keys
        (&[20000], true, None),            // segmented 1-D (2 segments of 16384 keys at most)
        (&[2, 9000, 2], false, Some(300)), // segmented and strided (3 segments of 4096)
    ];
    for &(shape, big, levels) in cases {
        let n: usize = shape.iter().product();
        let x = mix.values(n, levels);
        let base = mix.values(n, levels.map(|l| l / 2 + 1));
        let want = reference(&x, &base, shape);
        for sms in [1, 3] {
            let got = emulated(emu, &x, &base, shape, big, sms);
            assert_eq!(
                got, want,
                "shape {shape:?}, big shared memory {big}, {sms} SMs"
            );
        }
    }
}
