//! The exact magnitude selection of TIES and breadcrumbs (`select.cu`: sample, bracket pass,
//! resolve, tie pass, the exact fallback) on the emulator, launched in `select_cuts`' order and
//! shapes (`SelectLaunch`), against a sort of every element's (key, index).

use super::della_tests::Mix;
use super::{arg, dims, Buf, Emu};
use crate::merge::{
    cand_cap, counting_kernel, GtaArgs, GtaModel, Sample, SelModel, SelectLaunch, FINE_BINS, HBINS,
    ORDER_ASC, SAMPLE_CHUNK, ST_DONE, ST_MISSED, ST_TIES, TIE_CHUNK,
};
use cudarc::driver::LaunchConfig;
use std::ffi::c_void;

const SMS: u32 = 2;

/// How one selection is run.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Chunks of the sample (`SAMPLE_CHUNKS` on a device; fewer here to sample sparsely).
    chunks: u64,
    /// The high-bits sample histogram in shared memory (`sample_hist_smem`).
    smem: bool,
    /// Straight to the exact path (`force_exact_selection`).
    force: bool,
    /// Candidates per model (`cand_cap` of the length when `None`).
    cap: Option<u32>,
}

/// What happened on the way.
#[derive(Debug, Default)]
struct Paths {
    ties: bool,
    missed: bool,
    /// K was not the guess, and the candidates held its elements.
    listed: bool,
}

/// Device buffers of one selection.
struct Bufs {
    models: Buf,
    sel: Buf,
    hist: Buf,
    fine: Buf,
    tie: Buf,
    cand: Buf,
    cap: u32,
    plan: SelectLaunch,
}

fn launch(emu: &Emu, name: &str, cfg: &LaunchConfig, args: &mut [*mut c_void]) {
    let (grid, block, smem) = dims(cfg);
    // SAFETY: every caller passes the kernel's parameters in order, with buffers of the sizes
    // `select_cuts` allocates.
    unsafe { emu.launch(name, grid, block, smem, args) };
}

/// `count_and_resolve`: the counting pass, `resolve`, the tie pass and `resolve` again.
fn count_and_resolve(emu: &Emu, b: &mut Bufs, a: &mut GtaArgs, paths: &mut Paths) {
    let n_models = a.n_models as usize;
    let (mp, sp, fp, tp) = (b.models.ptr(), b.sel.ptr(), b.fine.ptr(), b.tie.ptr());
    let mut counts = Buf::zeros(4 * n_models);
    let (cp, np, cap) = (b.cand.ptr(), counts.ptr(), b.cap);
    let (nt, plan) = (b.plan.n_tchunks, b.plan);
    // `bracket_pass` and `resolve` take the same arguments.
    let with_all = |name: &str, cfg: &LaunchConfig, a: &mut GtaArgs| {
        let mut args = [
            arg(&mp),
            arg(&sp),
            arg(&*a),
            arg(&fp),
            arg(&tp),
            arg(&nt),
            arg(&cp),
            arg(&np),
            arg(&cap),
        ];
        launch(emu, name, cfg, &mut args);
    };
    with_all(&counting_kernel("bracket_pass", a), &plan.count, a);
    let resolve = |a: &mut GtaArgs| with_all("resolve", &plan.per_model, a);
    resolve(a);
    let sel: Vec<SelModel> = b.sel.read_structs(n_models);
    paths.ties |= sel.iter().any(|s| s.active == 1 && s.state == ST_TIES);
    paths.listed |= sel
        .iter()
        .any(|s| s.active == 1 && s.state == ST_DONE && s.key != s.guess && s.less != s.p);
    let ties = counting_kernel("tie_pass", a);
    launch(
        emu,
        &ties,
        &plan.count,
        &mut [arg(&mp), arg(&sp), arg(&*a), arg(&tp), arg(&nt)],
    );
    resolve(a);
}

/// The cuts of `select_cuts` for `models` (their inputs already in place) over `a`.
fn select(
    emu: &Emu,
    models: &[GtaModel],
    a: &mut GtaArgs,
    select: &[Option<u64>],
    run: Run,
    paths: &mut Paths,
) -> Vec<u64> {
    let n = a.n;
    let n_models = models.len();
    let sel: Vec<SelModel> = select
        .iter()
        .map(|k| SelModel {
            p: k.unwrap_or(0),
            active: i32::from(k.is_some()),
            state: if run.force { ST_MISSED } else { 0 },
            ..Default::default()
        })
        .collect();
    let sample = Sample::of(n, run.chunks);
    let plan = SelectLaunch::of(n, n_models, sample.n_chunks, SMS);
    let cap = run.cap.unwrap_or_else(|| cand_cap(n));
    let mut b = Bufs {
        models: Buf::of_structs(models),
        sel: Buf::of_structs(&sel),
        hist: Buf::zeros(4 * n_models * HBINS),
        fine: Buf::zeros(4 * n_models * FINE_BINS),
        tie: Buf::zeros(4 * n_models * plan.n_tchunks as usize),
        cand: Buf::zeros(8 * n_models * cap as usize),
        cap,
        plan,
    };
    let (mp, sp, mut hp) = (b.models.ptr(), b.sel.ptr(), b.hist.ptr());
    if !run.force {
        let Sample {
            stride,
            n_chunks,
            sampled,
        } = sample;
        for lo_pass in [0i32, 1] {
            if lo_pass == 1 {
                b.hist = Buf::zeros(4 * n_models * HBINS);
                hp = b.hist.ptr();
            }
            if lo_pass == 0 && run.smem {
                let mut args = [
                    arg(&mp),
                    arg(&sp),
                    arg(&*a),
                    arg(&stride),
                    arg(&n_chunks),
                    arg(&hp),
                ];
                launch(emu, "sample_hist_smem", &plan.sample_smem, &mut args);
            } else {
                let mut args = [
                    arg(&mp),
                    arg(&sp),
                    arg(&*a),
                    arg(&stride),
                    arg(&n_chunks),
                    arg(&lo_pass),
                    arg(&hp),
                ];
                launch(emu, "sample_hist", &plan.sample, &mut args);
            }
            if lo_pass == 0 {
                let mut args = [arg(&sp), arg(&hp), arg(&n), arg(&sampled)];
                launch(emu, "sample_pick", &plan.per_model, &mut args);
            } else {
                launch(
                    emu,
                    "sample_pick_lo",
                    &plan.per_model,
                    &mut [arg(&sp), arg(&hp)],
                );
            }
        }
        count_and_resolve(emu, &mut b, a, paths);
    }
    let now: Vec<SelModel> = b.sel.read_structs(n_models);
    if now.iter().any(|m| m.active == 1 && m.state == ST_MISSED) {
        paths.missed |= !run.force;
        b.hist = Buf::zeros(4 * n_models * HBINS);
        hp = b.hist.ptr();
        launch(
            emu,
            "full_hist",
            &plan.full,
            &mut [arg(&mp), arg(&sp), arg(&*a), arg(&hp)],
        );
        launch(emu, "full_pick", &plan.per_model, &mut [arg(&sp), arg(&hp)]);
        b.fine = Buf::zeros(4 * n_models * FINE_BINS);
        count_and_resolve(emu, &mut b, a, paths);
    }
    let now: Vec<SelModel> = b.sel.read_structs(n_models);
    for (i, s) in now.iter().enumerate() {
        assert!(
            s.active == 0 || s.state == ST_DONE,
            "model {i}: state {}",
            s.state
        );
    }
    let out: Vec<GtaModel> = b.models.read_structs(n_models);
    out.iter().map(|m| m.cut).collect()
}

/// f32 of an element stored as `dt` (0 f32, 2 bf16).
fn stored(v: f32, dt: i32) -> f32 {
    if dt == 2 {
        half::bf16::from_f32(v).to_f32()
    } else {
        v
    }
}

/// The encoded bytes of `v` as `dt`.
fn encode(v: &[f32], dt: i32) -> Buf {
    if dt == 2 {
        let h: Vec<u16> = v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect();
        Buf::of(&h)
    } else {
        Buf::of(v)
    }
}

/// One case: models' values, the base, each model's kept count, its order; checks that exactly
/// p composites (key << 32 | index) fall below each cut, the keys computed here in f32 from the
/// stored values.
#[allow(clippy::too_many_arguments)]
fn check(
    emu: &Emu,
    xs: &[Vec<f32>],
    base: &[f32],
    dt: i32,
    ps: &[Option<u64>],
    order: i32,
    run: Run,
    paths: &mut Paths,
    what: &str,
) {
    let n = base.len();
    let mut bb = encode(base, dt);
    let mut inputs: Vec<Buf> = xs.iter().map(|x| encode(x, dt)).collect();
    let models: Vec<GtaModel> = inputs
        .iter_mut()
        .map(|b| GtaModel {
            ptr: b.ptr(),
            dt,
            order,
            ..Default::default()
        })
        .collect();
    let mut a = GtaArgs {
        base: bb.ptr(),
        n: n as u64,
        base_dt: dt,
        n_models: xs.len() as i32,
        any_order: i32::from(order != 0),
        ..Default::default()
    };
    let cuts = select(emu, &models, &mut a, ps, run, paths);
    for (i, (x, p)) in xs.iter().zip(ps).enumerate() {
        let Some(p) = *p else { continue };
        let below = (0..n)
            .filter(|&j| {
                let m = (stored(x[j], dt) - stored(base[j], dt)).to_bits() & 0x7fff_ffff;
                let key = if order == ORDER_ASC {
                    m | 0x8000_0000
                } else {
                    !m
                };
                (u64::from(key) << 32 | j as u64) < cuts[i]
            })
            .count() as u64;
        assert_eq!(
            below, p,
            "{what}: model {i} keeps {below} elements, not {p} ({run:?})"
        );
    }
}

#[test]
fn exact_selection_keeps_exactly_p_in_every_path() {
    let Some(emu) = Emu::get() else { return };
    let mut mix = Mix(11);
    let mut paths = Paths::default();
    let dense = Run {
        chunks: 1 << 12,
        smem: false,
        force: false,
        cap: None,
    };
    let sparse = Run {
        chunks: 6,
        smem: false,
        force: false,
        cap: None,
    };
    let n = 3 * TIE_CHUNK as usize * 3 + 77;
    let base = mix.values(n, None);
    // f32, distinct magnitudes: every sampling, the shared-memory histogram, the exact path.
    let xs: Vec<Vec<f32>> = (0..3).map(|_| mix.values(n, None)).collect();
    let ps = [Some(n as u64 / 5), None, Some(n as u64 - 3)];
    for run in [
        dense,
        sparse,
        Run {
            smem: true,
            ..sparse
        },
        Run {
            force: true,
            ..dense
        },
    ] {
        check(emu, &xs, &base, 0, &ps, 0, run, &mut paths, "f32");
    }
    // bf16 with few magnitudes: K is shared by many elements, the index decides.
    let xs: Vec<Vec<f32>> = (0..2).map(|_| mix.values(n, Some(9))).collect();
    let zero = vec![0.0f32; n];
    let ps = [Some(n as u64 / 3), Some(n as u64 / 2 + 1)];
    for run in [
        dense,
        sparse,
        Run {
            force: true,
            ..dense
        },
    ] {
        check(emu, &xs, &zero, 2, &ps, 0, run, &mut paths, "bf16 ties");
    }
    // TIES with 6 and 9 models (the 8- and 16-model instances), one of them not selected.
    for count in [6usize, 9] {
        let xs: Vec<Vec<f32>> = (0..count).map(|_| mix.values(n, None)).collect();
        let ps: Vec<Option<u64>> = (0..count)
            .map(|i| (i != 2).then_some(n as u64 / 11 * (i as u64 + 1)))
            .collect();
        for run in [dense, sparse] {
            check(emu, &xs, &base, 0, &ps, 0, run, &mut paths, "many models");
        }
    }
    // Breadcrumbs' ascending order (the `_any` kernels), five models (the 8-model instances).
    let xs: Vec<Vec<f32>> = (0..5).map(|_| mix.values(n, None)).collect();
    let ps: Vec<Option<u64>> = (0..5).map(|i| Some(n as u64 / 7 * (i + 1))).collect();
    for run in [dense, sparse] {
        check(
            emu,
            &xs,
            &base,
            0,
            &ps,
            ORDER_ASC,
            run,
            &mut paths,
            "ascending, 5 models",
        );
    }
    // A sample that misleads: the sampled chunks (every stride-th) hold the smallest values.
    let stride = Sample::of(n as u64, sparse.chunks).stride as usize;
    let chunk = SAMPLE_CHUNK as usize;
    let x: Vec<f32> = mix
        .values(n, None)
        .iter()
        .enumerate()
        .map(|(j, v)| {
            if (j / chunk).is_multiple_of(stride) {
                v * 1e-3
            } else {
                *v + v.signum()
            }
        })
        .collect();
    check(
        emu,
        &[x],
        &zero,
        0,
        &[Some(n as u64 / 10)],
        0,
        sparse,
        &mut paths,
        "misleading sample",
    );
    // Keys on bin boundaries: |d| with the low 16 bits all ones has a key whose low 16 bits are
    // zero, so the bracket's lower bound (a whole high bin) is itself a key of many elements.
    let x: Vec<f32> = (0..n)
        .map(|_| {
            let r = mix.next();
            let high = 0x3c00_0000 + (((r >> 20) % 24) << 16) as u32;
            f32::from_bits(high | 0xffff | (r as u32 & 0x8000_0000))
        })
        .collect();
    for run in [dense, sparse] {
        let ps = [Some(n as u64 / 3)];
        check(
            emu,
            std::slice::from_ref(&x),
            &zero,
            0,
            &ps,
            0,
            run,
            &mut paths,
            "keys on bin boundaries",
        );
    }
    // f32 keys shared by a few elements each (4000 magnitudes 128 ulps apart): K is not
    // the sparse sample's guess and is near it, so the candidates hold its elements; with a
    // list of one entry they overflow, and the tie pass finds them.
    let x: Vec<f32> = (0..n)
        .map(|_| {
            let r = mix.next();
            let m = 0x3f80_0000 + 128 * ((r >> 24) % 4000) as u32;
            f32::from_bits(m | (r as u32 & 0x8000_0000))
        })
        .collect();
    for run in [
        sparse,
        Run {
            cap: Some(1),
            ..sparse
        },
        dense,
    ] {
        for p in [n as u64 / 5, n as u64 / 2 + 3] {
            check(
                emu,
                std::slice::from_ref(&x),
                &zero,
                0,
                &[Some(p)],
                0,
                run,
                &mut paths,
                "shared keys",
            );
        }
    }
    assert!(
        paths.listed,
        "no case found K's elements among the candidates"
    );
    assert!(
        paths.ties,
        "no case took the tie pass (K other than the sample's guess)"
    );
    assert!(paths.missed, "no case missed the sample's bracket");
}
