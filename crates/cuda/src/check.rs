//! `amalgam gpu-check`: parity of every GPU kernel against the CPU path on random data, and a
//! figures table (time, GB/s, share of the device copy bandwidth measured in the same run).

/// One line of the figures table.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// What was run, e.g. `linear f32 4x128M`.
    pub name: String,
    /// Median time of one run, milliseconds.
    pub ms: f64,
    /// Bytes the run must move through device memory (inputs read once, output written once).
    pub bytes: f64,
    /// Floating-point operations (for matrix work), 0 when not meaningful.
    pub flops: f64,
    /// Largest relative error against the CPU reference (`None`: not checked in this row).
    pub rel_err: Option<f64>,
    /// Whether the result is bit-identical to the CPU path (`None`: not compared bitwise).
    pub bitwise: Option<bool>,
    /// Free text: the target, a ratio, a failure.
    pub note: String,
}

use crate::device::Gpu;
use crate::error::{Ctx, Result};
use crate::merge::{self, GtaSpec};
use crate::tensor::{DType, DeviceTensor};
use amalgam_core::methods::device::DevicePlan;
use amalgam_core::params::{Scalar, TensorParams};
use amalgam_core::tensor::{merge_in_memory, MemReader, TensorJob};
use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

/// Tensor name of the checks (keys DARE's masks).
const CHECK_TENSOR: &str = "check.weight";

/// Deterministic pseudo-random values in [-1, 1) (xorshift64; not the code under test's RNG).
pub fn random(n: usize, salt: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0.0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut s = (salt ^ ((c as u64) << 20)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for x in out.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *x = ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32;
        }
    });
    v
}

/// A test problem: a base and `n_models` fine-tunes (`base + scale·noise`), rounded to `dtype`
/// so that the CPU sees exactly the values the GPU decodes.
pub struct Problem {
    /// Encoding of every input.
    pub dtype: DType,
    /// Base values.
    pub base: Vec<f32>,
    /// Model values.
    pub models: Vec<Vec<f32>>,
    /// The tensor's shape (DELLA's rank groups): a vector or rows of [`GRAM_COLS`] unless set by
    /// [`Problem::with_shape`].
    pub shape: Vec<usize>,
}

impl Problem {
    /// `n` elements, `n_models` models, task vectors of size `scale`; `levels > 0` quantises the
    /// task vectors to that many steps of `scale / levels` (many equal magnitudes: TIES ties).
    pub fn new(n: usize, n_models: usize, dtype: DType, scale: f32, levels: u32) -> Self {
        let round = |v: Vec<f32>| dtype.decode(&dtype.encode(&v));
        let base = round(random(n, 7));
        let models = (0..n_models)
            .map(|i| {
                let noise = random(n, 100 + i as u64);
                let v: Vec<f32> = noise
                    .par_iter()
                    .zip(&base)
                    .map(|(&z, &b)| {
                        let d = if levels > 0 {
                            (z * levels as f32).round() * (scale / levels as f32)
                        } else {
                            z * scale
                        };
                        b + d
                    })
                    .collect();
                round(v)
            })
            .collect();
        Self {
            dtype,
            base,
            models,
            shape: shape(n),
        }
    }

    /// The problem as a tensor of `shape` (its element count must be the problem's length).
    pub fn with_shape(mut self, shape: Vec<usize>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            self.len(),
            "shape {shape:?} for {} elements",
            self.len()
        );
        self.shape = shape;
        self
    }

    /// Elements per tensor.
    pub fn len(&self) -> usize {
        self.base.len()
    }

    /// Whether the tensors are empty.
    pub fn is_empty(&self) -> bool {
        self.base.is_empty()
    }

    /// The inputs on the device: base, then the models.
    pub fn upload(&self, gpu: &Gpu) -> Result<(DeviceTensor, Vec<DeviceTensor>)> {
        let base = DeviceTensor::from_f32(gpu, self.dtype, &self.base)?;
        let models = self
            .models
            .iter()
            .map(|m| DeviceTensor::from_f32(gpu, self.dtype, m))
            .collect::<Result<Vec<_>>>()?;
        Ok((base, models))
    }

    /// The CPU path's result for `case` (one block, as the engine runs a tensor that fits its
    /// budget): the case's first `n_models` models, the base when it takes one (`linear` takes
    /// the base as its first model).
    pub fn cpu(&self, case: &Case) -> Result<Vec<f32>> {
        let (m, job, reader) = self.method_job_reader(case)?;
        Ok(merge_in_memory(m.as_ref(), &job, &reader)?)
    }

    /// TIES with the whole-model trim (`trim_scope: model`): its device plan from the global
    /// passes over this problem (one tensor: the whole model).
    pub fn model_scope_case(&self) -> Result<Case> {
        let n_models = self.models.len();
        let dens: Vec<f64> = (0..n_models).map(|i| 0.2 + 0.1 * i as f64).collect();
        let params = TensorParams::default()
            .with_model_values("weight", &weights(n_models))
            .with_model_values("density", &dens)
            .with_global("trim_scope", Scalar::Str("model".into()));
        let mut case = Case {
            method: "ties",
            params,
            plan: DevicePlan::Linear {
                weights: Vec::new(),
                divisor: None,
            },
            seed: 1234,
            n_models,
            has_base: true,
            variant: "model-scope",
        };
        let (m, job, reader) = self.method_job_reader(&case)?;
        let mut passes = Vec::new();
        for pass in 0..m.global_passes() {
            let stats = m.global_pass(pass, &passes, &job, &reader)?;
            passes.push(stats);
        }
        case.plan = m.device_plan_global(&passes).ok_or_else(|| {
            crate::CudaError::Invalid("ties (trim_scope: model) has no device plan".into())
        })?;
        Ok(case)
    }

    /// The method of `case`, its job and reader on this problem.
    fn method_job_reader(
        &self,
        case: &Case,
    ) -> Result<(
        Box<dyn amalgam_core::methods::MergeMethod>,
        TensorJob,
        MemReader,
    )> {
        let linear = case.method == "linear";
        let mut models: Vec<Vec<f32>> = self.models[..case.n_models].to_vec();
        if linear {
            models.insert(0, self.base.clone());
        }
        let job = TensorJob {
            name: CHECK_TENSOR.into(),
            shape: self.shape.clone(),
            n_models: models.len(),
            has_base: case.has_base,
            block_elems: self.len(),
            seed: case.seed,
        };
        let reader = MemReader {
            base: case.has_base.then(|| self.base.clone()),
            models,
            stats: Default::default(),
        };
        let m =
            amalgam_core::methods::build(case.method, &case.params, job.n_models, case.has_base)?;
        Ok((m, job, reader))
    }
}

/// Row length of the checks' tensors: [`GRAM_COLS`] when it divides the length, else one row.
fn cols(len: usize) -> usize {
    if len.is_multiple_of(GRAM_COLS) {
        GRAM_COLS
    } else {
        len.max(1)
    }
}

/// The checks' tensor shape for `len` elements.
fn shape(len: usize) -> Vec<usize> {
    let c = cols(len);
    if c == len {
        vec![len]
    } else {
        vec![len / c, c]
    }
}

/// Row length of the checks' 2-D tensors (per-row Gram grouping).
pub const GRAM_COLS: usize = 256;

/// Compare GPU output (as stored in `dtype`) with the CPU's f32 result stored the same way:
/// (bit-identical, largest error relative to the largest CPU magnitude).
pub fn compare(gpu_out: &[u8], cpu: &[f32], dtype: DType) -> (bool, f64) {
    let want = dtype.encode(cpu);
    let same = want == gpu_out;
    let got = dtype.decode(gpu_out);
    let scale = cpu
        .iter()
        .fold(0.0f64, |m, &x| m.max(f64::from(x).abs()))
        .max(1e-30);
    let err = got.iter().zip(cpu).fold(0.0f64, |m, (&g, &c)| {
        let d = (f64::from(g) - f64::from(c)).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    });
    (same, err / scale)
}

/// Median device time of `f` in milliseconds (CUDA events on the compute stream), after two
/// warm-up runs.
pub fn time_ms(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    use cudarc::driver::sys::CUevent_flags;
    for _ in 0..2 {
        f()?;
    }
    gpu.sync()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let a = gpu
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .ctx("creating an event")?;
        let b = gpu
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .ctx("creating an event")?;
        a.record(&gpu.stream).ctx("recording an event")?;
        f()?;
        b.record(&gpu.stream).ctx("recording an event")?;
        b.synchronize().ctx("waiting for an event")?;
        times.push(f64::from(a.elapsed_ms(&b).ctx("reading an event")?));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Median device time of a merge's kernels (see [`merge::collect_kernel_times`]) and median
/// time of the whole call, both in milliseconds.
pub fn kernel_ms(gpu: &Gpu, reps: usize, f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    merge::collect_kernel_times(true);
    let op = time_ms(gpu, reps, f);
    let mut k = merge::take_kernel_times();
    merge::collect_kernel_times(false);
    let op = op?;
    let mut k = k.split_off(k.len().min(2));
    k.sort_by(f64::total_cmp);
    let kernel = k.get(k.len() / 2).copied().unwrap_or(f64::NAN);
    Ok((kernel, op))
}

fn weights(n: usize) -> Vec<f64> {
    (0..n).map(|i| 0.5 + 0.25 * i as f64).collect()
}

/// One checked method: its CPU parameters and the plan the GPU runs.
pub struct Case {
    /// CPU method name.
    pub method: &'static str,
    /// CPU parameters.
    pub params: TensorParams,
    /// What the GPU runs (the method's own [`amalgam_core::methods::MergeMethod::device_plan`]).
    pub plan: DevicePlan,
    /// Seed.
    pub seed: u64,
    /// Models the method takes (the problem's first ones).
    pub n_models: usize,
    /// Whether the method takes the base.
    pub has_base: bool,
    /// Names a variant of the method in the rows (e.g. `model-scope`), or empty.
    pub variant: &'static str,
}

/// The checked cases for `n_models` models (besides the base): linear (normalised, the base as
/// one more model), task arithmetic, TIES, DARE linear (L1 rescale), DARE TIES (inverse
/// density).
pub fn cases(n_models: usize) -> Vec<Case> {
    let w = weights(n_models);
    let dens: Vec<f64> = (0..n_models).map(|i| 0.2 + 0.1 * i as f64).collect();
    let seed = 1234;
    let lin_w = {
        let mut v = vec![1.0];
        v.extend(&w);
        v
    };
    let with = |p: TensorParams| p.with_model_values("weight", &w);
    let della = with(TensorParams::default())
        .with_model_values("density", &dens)
        .with_model_values("epsilon", &vec![0.1; n_models]);
    let crumbs = with(TensorParams::default())
        .with_model_values("density", &dens)
        .with_model_values("gamma", &vec![0.05; n_models]);
    let list: Vec<(&'static str, TensorParams)> = vec![
        (
            "linear",
            TensorParams::default().with_model_values("weight", &lin_w),
        ),
        (
            "task_arithmetic",
            with(TensorParams::default()).with_global("lambda", Scalar::Num(0.8)),
        ),
        (
            "ties",
            with(TensorParams::default()).with_model_values("density", &dens),
        ),
        (
            "dare_linear",
            with(TensorParams::default()).with_model_values("density", &dens),
        ),
        (
            "dare_ties",
            with(TensorParams::default())
                .with_model_values("density", &dens)
                .with_global("rescale_mode", Scalar::Str("inverse_density".into())),
        ),
        ("sce", sce_params()),
        ("della", della.clone()),
        (
            "della_linear",
            della.with_global("rescale_mode", Scalar::Str("inverse_prob".into())),
        ),
        ("breadcrumbs", crumbs.clone()),
        ("breadcrumbs_ties", crumbs),
    ];
    list.into_iter()
        .map(|(method, params)| {
            let has_base = method != "linear";
            case(method, params, n_models, has_base, seed)
                .expect("the checked methods have device plans")
        })
        .collect()
}

/// SCE's parameters in the checked cases: the top 30% of variances kept.
fn sce_params() -> TensorParams {
    TensorParams::default().with_global("select_topk", Scalar::Num(0.3))
}

/// A case of `method` on `n_models` models (and the base when `has_base`), or `None` when the
/// method has no device plan for these parameters.
fn case(
    method: &'static str,
    params: TensorParams,
    n_models: usize,
    has_base: bool,
    seed: u64,
) -> Option<Case> {
    let n = n_models + usize::from(method == "linear");
    let m = amalgam_core::methods::build(method, &params, n, has_base).expect("valid parameters");
    let plan = m.device_plan()?;
    Some(Case {
        method,
        params,
        plan,
        seed,
        n_models,
        has_base,
        variant: "",
    })
}

/// The Gram-based cases with a device plan: SLERP (t = 0.35), NuSLERP whole-tensor and per row
/// (with a base), multi-SLERP with a base, Karcher mean without one.
pub fn gram_cases(n_models: usize) -> Vec<Case> {
    let w: Vec<f64> = (0..n_models).map(|i| 0.6 + 0.3 * i as f64).collect();
    let seed = 1234;
    let two = n_models.min(2);
    let list: Vec<(&'static str, TensorParams, usize, bool)> = vec![
        (
            "slerp",
            TensorParams::default().with_global("t", Scalar::Num(0.35)),
            1,
            true,
        ),
        (
            "nuslerp",
            TensorParams::default().with_model_values("weight", &w[..two]),
            two,
            true,
        ),
        (
            "nuslerp",
            TensorParams::default()
                .with_model_values("weight", &w[..two])
                .with_global("nuslerp_flatten", Scalar::Bool(false)),
            two,
            true,
        ),
        (
            "multislerp",
            TensorParams::default().with_model_values("weight", &w),
            n_models,
            true,
        ),
        (
            "karcher",
            TensorParams::default().with_model_values("weight", &w),
            n_models,
            false,
        ),
        ("model_stock", TensorParams::default(), n_models, true),
        (
            "model_stock",
            TensorParams::default().with_global("filter_wise", Scalar::Bool(true)),
            n_models,
            true,
        ),
    ];
    list.into_iter()
        .filter_map(|(m, p, n, b)| case(m, p, n, b, seed))
        .collect()
}

/// Run one case on the GPU (on a tensor of the checks' shape for its length).
pub fn run_case(
    gpu: &Gpu,
    case: &Case,
    base: &DeviceTensor,
    models: &[DeviceTensor],
    out: DType,
) -> Result<DeviceTensor> {
    run_case_shaped(gpu, case, base, models, &shape(base.len), out)
}

/// Run one case on the GPU on a tensor of `shape` (DELLA's rank groups, the Gram cases' rows).
fn run_case_shaped(
    gpu: &Gpu,
    case: &Case,
    base: &DeviceTensor,
    models: &[DeviceTensor],
    shape: &[usize],
    out: DType,
) -> Result<DeviceTensor> {
    match &case.plan {
        DevicePlan::Linear { weights, divisor } => {
            let mut inputs = vec![base];
            inputs.extend(models.iter());
            merge::linear(gpu, &inputs, weights, *divisor, out, false)
        }
        DevicePlan::Gta { opts, sparsify } => {
            let refs: Vec<&DeviceTensor> = models.iter().collect();
            let spec = GtaSpec::from_options(opts, CHECK_TENSOR, shape, case.seed, sparsify);
            merge::gta(gpu, base, &refs, &spec, out)
        }
        DevicePlan::Sce { select_topk } => {
            let refs: Vec<&DeviceTensor> = models.iter().collect();
            crate::sce::sce(gpu, base, &refs, *select_topk, out, false)
        }
        DevicePlan::Gram {
            inputs,
            base: with_base,
            grouping,
            coefficients,
            combine,
        } => {
            // Problem layout: input Model(i) is models[i], the base is `base`.
            let pick = |i: &amalgam_core::tensor::Input| match i {
                amalgam_core::tensor::Input::Base => base,
                amalgam_core::tensor::Input::Model(k) => &models[*k],
            };
            let refs: Vec<&DeviceTensor> = inputs.iter().map(pick).collect();
            let b = with_base.as_ref().map(pick);
            crate::gram::gram_merge(
                gpu,
                &refs,
                b,
                *grouping,
                amalgam_core::tensor::row_len(shape),
                coefficients,
                *combine,
                out,
                false,
            )
        }
    }
}

/// Parity of every case on `p` against the CPU path: one row per case.
pub fn parity(gpu: &Gpu, p: &Problem, label: &str) -> Result<Vec<Row>> {
    let all = cases(p.models.len())
        .into_iter()
        .chain(gram_cases(p.models.len()))
        .chain(std::iter::once(p.model_scope_case()?));
    parity_of(gpu, p, label, all)
}

/// Parity of `cases` on `p` (of shape `p.shape`) against the CPU path: one row per case; a
/// failed row for a case the GPU does not take on this shape.
fn parity_of(
    gpu: &Gpu,
    p: &Problem,
    label: &str,
    cases: impl IntoIterator<Item = Case>,
) -> Result<Vec<Row>> {
    let (base, models) = p.upload(gpu)?;
    let mut rows = Vec::new();
    for case in cases {
        let method = match &case.plan {
            DevicePlan::Gram { grouping, .. } => format!("{}/{grouping:?}", case.method),
            _ if !case.variant.is_empty() => format!("{}/{}", case.method, case.variant),
            _ => case.method.to_string(),
        };
        let name = format!("parity {method} {label}");
        if let DevicePlan::Gta { sparsify, .. } = &case.plan {
            if !merge::gta_supports(gpu, sparsify, &p.shape) {
                rows.push(failed(
                    &name,
                    &format!("the GPU does not take shape {:?}", p.shape),
                ));
                continue;
            }
        }
        let cpu = p.cpu(&case)?;
        let got = match run_case_shaped(gpu, &case, &base, &models, &p.shape, p.dtype)
            .and_then(|t| t.bytes(gpu))
        {
            Ok(g) => g,
            Err(e) => {
                rows.push(failed(&name, &e));
                continue;
            }
        };
        let (same, err) = compare(&got, &cpu, p.dtype);
        rows.push(Row {
            name,
            rel_err: Some(err),
            bitwise: Some(same),
            note: if same {
                "bit-identical".into()
            } else {
                format!("max rel err {err:.2e}")
            },
            ..Default::default()
        });
    }
    Ok(rows)
}

/// The shapes of [`della_shape_parity`]: a 3-D tensor (strided groups along axis 1), rows
/// longer than a shared-memory sort (sorted in segments), a long 1-D tensor, and a 3-D tensor
/// with long strided groups.
pub const DELLA_SHAPES: &[&[usize]] = &[&[6, 40, 7], &[3, 40_000], &[70_000], &[2, 20_000, 3]];

/// DELLA's rank groups of every kind on the GPU against the CPU path, bit for bit: `della` and
/// `della_linear` on each of [`DELLA_SHAPES`], in f32, bf16 and bf16 with many equal magnitudes.
pub fn della_shape_parity(gpu: &Gpu, models: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &shape in DELLA_SHAPES {
        let n = shape.iter().product();
        for (dtype, levels, kind) in [
            (DType::F32, 0, ""),
            (DType::Bf16, 0, ""),
            (DType::Bf16, 6, " quantised"),
        ] {
            let p = Problem::new(n, models, dtype, 0.01, levels).with_shape(shape.to_vec());
            let label = format!("{}{kind} {shape:?}", dtype.name());
            let della = cases(models)
                .into_iter()
                .filter(|c| c.method.starts_with("della"));
            match parity_of(gpu, &p, &label, della) {
                Ok(v) => rows.extend(v),
                Err(e) => rows.push(failed(&format!("parity della {label}"), &e)),
            }
        }
    }
    Ok(rows)
}

/// The shapes and model counts of [`sum_shape_parity`]: more than two reduction chunks with a
/// partial last chunk and tile (one warp per chunk), rows of 61 (partial tiles of per-row
/// sums), and eight models (Gram pairs beyond the warp's 32 lanes).
pub const SUM_SHAPES: &[(&[usize], usize)] = &[
    (&[2 * amalgam_core::reduce::REDUCE_CHUNK + 61], 3),
    (&[37, 61], 3),
    (&[9, 256], 8),
];

/// The f64 sums that run one warp per segment, in element order (`sce`'s weights, the Gram
/// methods' pair sums, whole and per row), on the GPU against the CPU path, bit for bit, on
/// each of [`SUM_SHAPES`] in f32 and bf16.
pub fn sum_shape_parity(gpu: &Gpu) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(shape, models) in SUM_SHAPES {
        let n = shape.iter().product();
        for dtype in [DType::F32, DType::Bf16] {
            let p = Problem::new(n, models, dtype, 0.01, 0).with_shape(shape.to_vec());
            let label = format!("{} {shape:?} x{models}", dtype.name());
            let sce = case("sce", sce_params(), models, true, 1234).expect("SCE has a device plan");
            let sums = std::iter::once(sce).chain(gram_cases(models));
            match parity_of(gpu, &p, &label, sums) {
                Ok(v) => rows.extend(v),
                Err(e) => rows.push(failed(&format!("parity sums {label}"), &e)),
            }
        }
    }
    Ok(rows)
}

/// What `gpu-check` runs.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Elements per tensor of the timed merges (128M in the figures).
    pub elems: usize,
    /// Models merged.
    pub models: usize,
    /// Elements per tensor of the parity checks.
    pub parity_elems: usize,
    /// Timed repetitions (median reported).
    pub reps: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            elems: 128 << 20,
            models: 4,
            parity_elems: 8 << 20,
            reps: 10,
        }
    }
}

/// A row that records a failure instead of a figure.
pub fn failed(name: &str, e: &dyn std::fmt::Display) -> Row {
    Row {
        name: name.into(),
        note: format!("FAILED: {e}"),
        ..Default::default()
    }
}

/// Device-to-device copy bandwidth (bytes read + written, GB/s) over `bytes`.
pub fn copy_bandwidth(gpu: &Gpu, bytes: usize, reps: usize) -> Result<Row> {
    let s = &gpu.stream;
    let src = s.alloc_zeros::<u8>(bytes).ctx("allocating")?;
    let mut dst = s.alloc_zeros::<u8>(bytes).ctx("allocating")?;
    let ms = time_ms(gpu, reps, || {
        s.memcpy_dtod(&src, &mut dst).ctx("copying on the device")
    })?;
    Ok(Row {
        name: format!("device copy {} MiB", bytes >> 20),
        ms,
        bytes: 2.0 * bytes as f64,
        note: "reference bandwidth".into(),
        ..Default::default()
    })
}

/// Host-to-device copy rate from pinned and from pageable memory.
pub fn h2d_rates(gpu: &Gpu, bytes: usize, reps: usize) -> Result<Vec<Row>> {
    let s = &gpu.stream;
    let mut dst = s.alloc_zeros::<u8>(bytes).ctx("allocating")?;
    // SAFETY: the pinned buffer is filled before use.
    let mut pinned =
        unsafe { gpu.ctx.alloc_pinned::<u8>(bytes) }.ctx("allocating pinned memory")?;
    pinned
        .as_mut_slice()
        .ctx("mapping pinned memory")?
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    let pinned_ms = time_ms(gpu, reps, || {
        s.memcpy_htod(&pinned, &mut dst)
            .ctx("copying pinned to device")
    })?;
    let pageable: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let pageable_ms = time_ms(gpu, reps.min(4), || {
        s.memcpy_htod(&pageable, &mut dst)
            .ctx("copying pageable to device")
    })?;
    let row = |name: &str, ms: f64, note: &str| Row {
        name: name.into(),
        ms,
        bytes: bytes as f64,
        note: note.into(),
        ..Default::default()
    };
    let gbs = bytes as f64 / pinned_ms / 1e6;
    Ok(vec![
        row(
            &format!("H2D pinned {} MiB", bytes >> 20),
            pinned_ms,
            &format!(
                "target >= 40 GB/s: {}",
                if gbs >= 40.0 { "met" } else { "MISSED" }
            ),
        ),
        row(
            &format!("H2D pageable {} MiB", bytes >> 20),
            pageable_ms,
            "",
        ),
    ])
}

/// Timed merges of `opts.models` models of `opts.elems` elements in `dtype`: each case's kernel
/// time (median of `reps`; the whole call's in the note), plus the dtype conversion; the TIES
/// rows note their ratio to linear, the linear and task-arithmetic rows their share of the copy
/// bandwidth `copy_gbs` (GB/s).
pub fn timings(gpu: &Gpu, opts: &CheckOptions, dtype: DType, copy_gbs: f64) -> Result<Vec<Row>> {
    let n = opts.elems;
    let p = Problem::new(n, opts.models, dtype, 0.01, 0);
    let (base, models) = p.upload(gpu)?;
    drop(p);
    let size = dtype.size() as f64;
    let label = format!("{} {}x{}M", dtype.name(), opts.models, n >> 20);
    let mut rows = Vec::new();
    // Linear over the models alone (the "4 models"), no base.
    let refs: Vec<&DeviceTensor> = models.iter().collect();
    let w: Vec<f32> = (0..opts.models).map(|i| 0.25 + 0.1 * i as f32).collect();
    let wsum: f32 = w.iter().sum();
    let (lin_ms, lin_op) = match kernel_ms(gpu, opts.reps, || {
        merge::linear(gpu, &refs, &w, Some(wsum), dtype, false).map(drop)
    }) {
        Ok(ms) => ms,
        Err(e) => {
            rows.push(failed(&format!("linear {label}"), &e));
            (f64::NAN, f64::NAN)
        }
    };
    let lin_bytes = (opts.models as f64 + 1.0) * n as f64 * size;
    rows.push(Row {
        name: format!("linear {label}"),
        ms: lin_ms,
        bytes: lin_bytes,
        note: format!(
            "target >= 80% of copy: {}; whole call {lin_op:.3} ms",
            met(lin_bytes / lin_ms / 1e6 >= 0.8 * copy_gbs)
        ),
        ..Default::default()
    });
    for case in cases(opts.models).into_iter().skip(1) {
        let ms = kernel_ms(gpu, opts.reps, || {
            run_case(gpu, &case, &base, &models, dtype).map(drop)
        });
        let name = format!("{} {label}", case.method);
        let bytes = (opts.models as f64 + 2.0) * n as f64 * size;
        match ms {
            Ok((ms, op)) => {
                let note = match case.method {
                    "ties" => {
                        let r = ms / lin_ms;
                        format!("{r:.2}x linear (target <= 4x: {})", met(r <= 4.0))
                    }
                    "task_arithmetic" => format!(
                        "target >= 80% of copy: {}",
                        met(bytes / ms / 1e6 >= 0.8 * copy_gbs)
                    ),
                    _ => format!("{:.2}x linear", ms / lin_ms),
                };
                rows.push(Row {
                    name,
                    ms,
                    bytes,
                    note: format!("{note}; whole call {op:.3} ms"),
                    ..Default::default()
                });
            }
            Err(e) => rows.push(failed(&name, &e)),
        }
    }
    if dtype.size() == 2 {
        // Task arithmetic and TIES on the general instances (4 elements per thread, 8-byte
        // loads, each input decoded as it is loaded), for comparison.
        merge::narrow_loads(true);
        let mut list = Vec::new();
        for case in cases(opts.models).into_iter().skip(1).take(2) {
            let ms = kernel_ms(gpu, opts.reps, || {
                run_case(gpu, &case, &base, &models, dtype).map(drop)
            });
            list.push((case.method, ms));
        }
        merge::narrow_loads(false);
        for (method, ms) in list {
            let name = format!("{method} {label} narrow loads");
            let wide = rows
                .iter()
                .find(|r| r.name == format!("{method} {label}"))
                .map_or(f64::NAN, |r| r.ms);
            match ms {
                Ok((ms, _)) => rows.push(Row {
                    name,
                    ms,
                    note: format!("wide loads take {:.2}x this time", wide / ms),
                    ..Default::default()
                }),
                Err(e) => rows.push(failed(&name, &e)),
            }
        }
    }
    let out = if dtype == DType::F32 {
        DType::Bf16
    } else {
        DType::F32
    };
    let ms = time_ms(gpu, opts.reps, || convert(gpu, &base, out).map(drop));
    let ms = match ms {
        Ok(ms) => ms,
        Err(e) => {
            rows.push(failed("convert", &e));
            return Ok(rows);
        }
    };
    rows.push(Row {
        name: format!("convert {}->{} {}M", dtype.name(), out.name(), n >> 20),
        ms,
        bytes: n as f64 * (size + out.size() as f64),
        ..Default::default()
    });
    Ok(rows)
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// Re-encode a tensor on the device.
pub fn convert(gpu: &Gpu, t: &DeviceTensor, out: DType) -> Result<DeviceTensor> {
    let mut o = DeviceTensor::alloc(&gpu.stream, out, t.len)?;
    let (n, in_dt, out_dt) = (t.len as u64, t.dtype.code(), out.code());
    let mut b = gpu.stream.launch_builder(gpu.function("convert"));
    b.arg(&t.data)
        .arg(&in_dt)
        .arg(&mut o.data)
        .arg(&out_dt)
        .arg(&n);
    // SAFETY: argument types match `convert`; both buffers cover `n` elements.
    unsafe { b.launch(gpu.grid(n)) }.ctx("launching convert")?;
    Ok(o)
}

/// Parity checks of `gpu-check` and of the tests: every case on f32, bf16 and f16 data, on
/// bf16 data with many equal magnitudes (TIES ties) through both selection paths, on an odd
/// length, and with six models (bf16 and f32); DELLA on strided and long rank groups
/// ([`della_shape_parity`]); the per-segment sums on their shapes ([`sum_shape_parity`]);
/// conversion to each dtype; a non-finite input refused.
pub fn parity_suite(gpu: &Gpu, elems: usize, models: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let add = |rows: &mut Vec<Row>, label: &str, r: Result<Vec<Row>>| match r {
        Ok(v) => rows.extend(v),
        Err(e) => rows.push(failed(&format!("parity {label}"), &e)),
    };
    for dtype in [DType::F32, DType::Bf16, DType::F16] {
        let p = Problem::new(elems, models, dtype, 0.01, 0);
        let label = format!("{} {}M", dtype.name(), elems >> 20);
        add(&mut rows, &label, parity(gpu, &p, &label));
    }
    let ties = Problem::new(elems / 4, models, DType::Bf16, 0.01, 6);
    add(
        &mut rows,
        "ties",
        parity(gpu, &ties, "bf16 quantised (ties)"),
    );
    merge::force_exact_selection(true);
    let exact = parity(gpu, &ties, "bf16 quantised, exact path");
    merge::force_exact_selection(false);
    add(&mut rows, "exact", exact);
    let odd = Problem::new((elems / 8).max(4096) | 3, models, DType::F32, 0.01, 0);
    add(&mut rows, "odd", parity(gpu, &odd, "f32 odd length"));
    // Six models: the 8-model instances, with unused slots (bf16: the f16/bf16 `_h` ones).
    for dtype in [DType::Bf16, DType::F32] {
        let many = Problem::new(elems / 8, 6, dtype, 0.01, 0);
        let label = format!("{} 6 models", dtype.name());
        add(&mut rows, &label, parity(gpu, &many, &label));
    }
    add(&mut rows, "della shapes", della_shape_parity(gpu, models));
    add(&mut rows, "sum shapes", sum_shape_parity(gpu));
    // Conversion, bit for bit against the `half` crate.
    let v: Vec<f32> = random(1 << 20, 99).iter().map(|x| x * 1000.0).collect();
    let t = DeviceTensor::from_f32(gpu, DType::F32, &v)?;
    for out in [DType::F32, DType::F16, DType::Bf16] {
        let got = convert(gpu, &t, out)?.bytes(gpu)?;
        let same = got == out.encode(&v);
        rows.push(Row {
            name: format!("parity convert f32->{}", out.name()),
            bitwise: Some(same),
            rel_err: Some(if same { 0.0 } else { f64::INFINITY }),
            note: if same {
                "bit-identical".into()
            } else {
                "DIFFERS".into()
            },
            ..Default::default()
        });
    }
    // A non-finite input is reported with its slot and first index.
    let mut p = Problem::new(4096, models, DType::F32, 0.01, 0);
    p.models[1][77] = f32::NAN;
    p.models[1][3000] = f32::INFINITY;
    let (base, ms) = p.upload(gpu)?;
    let case = &cases(models)[2];
    let r = run_case(gpu, case, &base, &ms, DType::F32);
    let ok = matches!(r, Err(crate::CudaError::NonFinite { slot: 2, index: 77 }));
    rows.push(Row {
        name: "parity non-finite input refused".into(),
        bitwise: Some(ok),
        note: match r {
            Err(e) => e.to_string(),
            Ok(_) => "NOT REFUSED".into(),
        },
        ..Default::default()
    });
    Ok(rows)
}

/// The registers of the hot kernels as the driver compiled them for this device, and the blocks
/// of 256 threads they allow per multiprocessor, against the budgets the occupancy test holds
/// NVRTC's sm_90 code to (informational rows: the device's compiler may allocate otherwise).
pub fn register_rows(gpu: &Gpu) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(k, min) in crate::occupancy::BUDGETS {
        let regs = gpu
            .function(k)
            .num_regs()
            .ctx(&format!("reading the registers of {k}"))?;
        let regs = u32::try_from(regs).unwrap_or(0);
        let blocks = crate::occupancy::blocks_per_sm(regs, 256);
        rows.push(Row {
            name: format!("registers {k}"),
            note: format!(
                "{regs} per thread: {blocks} blocks of 256 per SM (sm_90 budget: {min}{})",
                if blocks < min { ", BELOW" } else { "" }
            ),
            ..Default::default()
        });
    }
    Ok(rows)
}

/// The table `gpu-check` prints: GB/s and percent of the copy bandwidth where bytes are known,
/// TFLOP/s where flops are.
pub fn table(rows: &[Row], copy_gbs: f64) -> String {
    let mut s = format!(
        "{:<44} {:>10} {:>9} {:>7} {:>10}  {}\n",
        "check", "ms", "GB/s", "%copy", "rel err", "note"
    );
    for r in rows {
        let (gbs, pct) = if r.bytes > 0.0 && r.ms > 0.0 {
            let g = r.bytes / r.ms / 1e6;
            (format!("{g:.1}"), format!("{:.0}%", 100.0 * g / copy_gbs))
        } else {
            (String::new(), String::new())
        };
        let ms = if r.ms > 0.0 {
            format!("{:.3}", r.ms)
        } else {
            String::new()
        };
        let err = r.rel_err.map(|e| format!("{e:.1e}")).unwrap_or_default();
        let mut note = r.note.clone();
        if r.flops > 0.0 && r.ms > 0.0 {
            note = format!("{:.1} TFLOP/s; {note}", r.flops / r.ms / 1e9);
        }
        s.push_str(&format!(
            "{:<44} {:>10} {:>9} {:>7} {:>10}  {}\n",
            r.name, ms, gbs, pct, err, note
        ));
    }
    s
}

/// Whether every parity row passed (bit-identical, or within 1e-6 where not compared bitwise).
pub fn all_passed(rows: &[Row]) -> bool {
    rows.iter().all(|r| {
        !r.note.starts_with("FAILED")
            && match (r.bitwise, r.rel_err) {
                (Some(true), _) => true,
                (_, Some(e)) => e <= 1e-6,
                (Some(false), None) => false,
                (None, None) => true,
            }
    })
}

/// A reader serving `inner`'s inputs and statistics, with MaTS's systems solved by
/// `solver`.
struct SolverReader<'a> {
    inner: &'a MemReader,
    solver: &'a dyn amalgam_core::solve::cg::DeviceSolver,
}

impl amalgam_core::tensor::TensorReader for SolverReader<'_> {
    fn read(
        &self,
        input: amalgam_core::tensor::Input,
        range: std::ops::Range<usize>,
        out: &mut [f32],
    ) -> amalgam_core::error::Result<()> {
        self.inner.read(input, range, out)
    }

    fn stat_shape(
        &self,
        model: usize,
        kind: &str,
    ) -> amalgam_core::error::Result<Option<Vec<usize>>> {
        self.inner.stat_shape(model, kind)
    }

    fn read_stat(
        &self,
        model: usize,
        kind: &str,
        range: std::ops::Range<usize>,
        out: &mut [f32],
    ) -> amalgam_core::error::Result<()> {
        self.inner.read_stat(model, kind, range, out)
    }

    fn device_solver(&self) -> Option<&dyn amalgam_core::solve::cg::DeviceSolver> {
        Some(self.solver)
    }
}

/// A random SPD `d × d` matrix as f32: `XᵀX / k + 1e-2·I` from `k = d + 8` random rows.
fn spd_f32(d: usize, salt: u64) -> Vec<f32> {
    let k = d + 8;
    let x = random(k * d, salt);
    let mut g = vec![0.0f32; d * d];
    g.par_chunks_mut(d).enumerate().for_each(|(r, row)| {
        for (c, v) in row.iter_mut().enumerate() {
            let s: f64 = (0..k)
                .map(|t| f64::from(x[t * d + r]) * f64::from(x[t * d + c]))
                .sum();
            *v = (s / k as f64 + if r == c { 1e-2 } else { 0.0 }) as f32;
        }
    });
    g
}

/// The MaTS parity case: 3 models of a 512 × 256 weight with a base, and per model a random
/// SPD Gram, a K-FAC output factor and a positive Fisher.
fn mats_case() -> (MemReader, TensorJob) {
    let (rows, cols, n_models) = (512usize, 256usize, 3usize);
    let n = rows * cols;
    let mut reader = MemReader {
        base: Some(random(n, 7)),
        models: (0..n_models).map(|i| random(n, 11 + i as u64)).collect(),
        stats: Default::default(),
    };
    for i in 0..n_models {
        let st = &mut reader.stats;
        st.insert(
            (i, "gram_in".into()),
            (vec![cols, cols], spd_f32(cols, 100 + i as u64)),
        );
        st.insert(
            (i, "kfac_out".into()),
            (vec![rows, rows], spd_f32(rows, 200 + i as u64)),
        );
        let f = random(n, 300 + i as u64)
            .iter()
            .map(|v| v.abs() + 0.1)
            .collect();
        st.insert((i, "fisher".into()), (vec![rows, cols], f));
    }
    let job = TensorJob {
        name: "model.layers.0.mlp.up_proj.weight".into(),
        shape: vec![rows, cols],
        n_models,
        has_base: true,
        block_elems: n,
        seed: 0,
    };
    (reader, job)
}

/// MaTS's parameters for `objective` in the parity case (100 iterations).
fn mats_params(objective: &str) -> TensorParams {
    TensorParams::default()
        .with_global("iterations", Scalar::Num(100.0))
        .with_global("objective", Scalar::Str(objective.into()))
}

/// The objectives of [`mats_parity`].
const MATS_OBJECTIVES: [&str; 3] = ["gram", "kfac", "diagonal_fisher"];

/// MaTS merged with the device CG against the CPU's CG, per objective (`gram`, `kfac`,
/// `diagonal_fisher`): 3 models of a 512 × 256 weight with random SPD Grams, K-FAC output
/// factors and positive Fishers; the f32 outputs must agree to 1e-6 of their largest magnitude
/// (the inner products are summed in another order, so bits may differ).
pub fn mats_parity(gpu: &Gpu) -> Result<Vec<Row>> {
    use amalgam_core::tensor::TensorReader as _;
    let (reader, job) = mats_case();
    let (rows, cols, n_models) = (job.shape[0], job.shape[1], job.n_models);
    let solver = crate::accel::GpuSolver::new(gpu);
    let dev = SolverReader {
        inner: &reader,
        solver: &solver,
    };
    debug_assert!(dev.device_solver().is_some());
    let mut out = Vec::new();
    for objective in MATS_OBJECTIVES {
        let m = amalgam_core::methods::build("mats", &mats_params(objective), n_models, true)?;
        let t = std::time::Instant::now();
        let cpu = merge_in_memory(m.as_ref(), &job, &reader)?;
        let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = std::time::Instant::now();
        let mut w = amalgam_core::tensor::MemWriter::default();
        m.merge(&job, &[], &dev, &mut w)?;
        let got = w.data;
        let gpu_ms = t.elapsed().as_secs_f64() * 1e3;
        let same = got
            .iter()
            .zip(&cpu)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        // max |gpu − cpu| / max |cpu| (an element near zero has no meaningful relative error).
        let scale = cpu.iter().map(|v| f64::from(v.abs())).fold(0.0, f64::max);
        let err = got
            .iter()
            .zip(&cpu)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
            .fold(0.0, f64::max)
            / scale.max(1e-30);
        let name = if objective == "gram" {
            // The row's name of earlier runs, for comparisons.
            format!("parity mats gram, GPU CG {rows}x{cols} x{n_models}")
        } else {
            format!("parity mats {objective}, GPU CG {rows}x{cols} x{n_models}")
        };
        out.push(Row {
            name,
            ms: gpu_ms,
            rel_err: Some(err),
            bitwise: Some(same),
            note: format!(
                "{}; the whole merge, CPU {cpu_ms:.1} ms",
                if same {
                    "bit-identical".to_string()
                } else {
                    format!("max rel err {err:.2e} (target <= 1e-6)")
                }
            ),
            ..Default::default()
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::with_gpu;

    #[test]
    fn table_formats_rates() {
        let rows = vec![Row {
            name: "x".into(),
            ms: 2.0,
            bytes: 8e9,
            ..Default::default()
        }];
        let t = table(&rows, 4000.0);
        assert!(t.contains("4000.0"), "{t}");
        assert!(t.contains("100%"), "{t}");
    }

    #[test]
    fn quantised_problem_has_equal_magnitudes() {
        let p = Problem::new(4096, 2, DType::Bf16, 0.01, 4);
        let d: std::collections::BTreeSet<u32> = p.models[0]
            .iter()
            .zip(&p.base)
            .map(|(m, b)| (m - b).abs().to_bits())
            .collect();
        assert!(d.len() < 2000, "{} distinct magnitudes", d.len());
    }

    #[test]
    fn mats_case_merges_on_the_cpu_for_every_objective() {
        let (reader, job) = mats_case();
        for objective in MATS_OBJECTIVES {
            let m = amalgam_core::methods::build("mats", &mats_params(objective), 3, true).unwrap();
            let out = merge_in_memory(m.as_ref(), &job, &reader).unwrap();
            assert_eq!(out.len(), job.numel(), "{objective}");
            assert!(out.iter().all(|v| v.is_finite()), "{objective}");
        }
    }

    #[test]
    fn della_shapes_are_valid() {
        for &shape in DELLA_SHAPES {
            let n: usize = shape.iter().product();
            let groups = merge::della_group(shape, n, true).expect("a valid shape");
            let small = merge::della_group(shape, n, false).expect("a valid shape");
            assert!(groups.inner > 1 || small.segmented(), "{shape:?}");
        }
        // Strided, segmented (with and without the large shared memory) and both.
        let g = |s: &[usize]| merge::della_group(s, s.iter().product(), true).unwrap();
        assert!(g(DELLA_SHAPES[0]).inner > 1 && !g(DELLA_SHAPES[0]).segmented());
        assert!(g(DELLA_SHAPES[1]).segmented() && g(DELLA_SHAPES[2]).segmented());
        assert!(g(DELLA_SHAPES[3]).inner > 1 && g(DELLA_SHAPES[3]).segmented());
    }

    #[test]
    fn gpu_della_shapes_match_cpu() {
        with_gpu("gpu_della_shapes_match_cpu", |gpu| {
            let rows = della_shape_parity(gpu, 3).expect("DELLA shape parity");
            assert_eq!(
                rows.len(),
                DELLA_SHAPES.len() * 3 * 2,
                "{}",
                table(&rows, 1.0)
            );
            assert!(all_passed(&rows), "{}", table(&rows, 1.0));
        });
    }

    #[test]
    fn gpu_mats_merges_match_the_cpu() {
        with_gpu("gpu_mats_merges_match_the_cpu", |gpu| {
            let rows = mats_parity(gpu).expect("MaTS parity");
            assert_eq!(rows.len(), MATS_OBJECTIVES.len());
            assert!(all_passed(&rows), "{}", table(&rows, 1.0));
        });
    }

    #[test]
    fn gpu_register_rows_cover_the_budgets() {
        with_gpu("gpu_register_rows_cover_the_budgets", |gpu| {
            let rows = register_rows(gpu).expect("reading registers");
            let names: Vec<String> = crate::occupancy::BUDGETS
                .iter()
                .map(|(k, _)| format!("registers {k}"))
                .collect();
            assert_eq!(
                rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
                names
            );
            assert!(all_passed(&rows), "{}", table(&rows, 1.0));
        });
    }

    #[test]
    fn gpu_matches_cpu_bit_for_bit() {
        with_gpu("gpu_matches_cpu_bit_for_bit", |gpu| {
            // Smaller on the host emulator (`emu::device_tests`), which runs a kernel's threads
            // one after another.
            let emulated = std::env::var_os("AMALGAM_EMU_DEVICE_RUN").is_some();
            let elems = if emulated { 1 << 15 } else { 1 << 18 };
            let rows = parity_suite(gpu, elems, 3).expect("parity suite");
            let bad: Vec<&Row> = rows
                .iter()
                .filter(|r| !all_passed(std::slice::from_ref(*r)))
                .collect();
            assert!(bad.is_empty(), "{}", table(&rows, 1.0));
        });
    }
}
