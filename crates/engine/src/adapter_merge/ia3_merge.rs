//! (IA)³ adapters: PEFT's weighted sum and the merge operations on `l − 1` (see the parent
//! module).

use super::*;

/// The data-driven combinations: the core method, the statistic it reads, its parameters.
fn data_driven(name: &str) -> Option<(&'static str, StatKind, TensorParams)> {
    match name {
        // Fisher merging (methods.md §9): Σ w_i F_i l_i / Σ w_i F_i per entry.
        "fisher" => Some(("fisher", StatKind::Fisher, TensorParams::default())),
        // MaTS with the blockwise (IA)³ Fisher (§11, §15): (Σ F_i) l = Σ F_i l_i by CG.
        "mats" => Some((
            "mats",
            StatKind::FisherBlock,
            TensorParams::default().with_global("objective", Scalar::Str("ia3_block".into())),
        )),
        _ => None,
    }
}

/// Each adapter's statistics file for the `fisher` and `mats` combinations (none for the
/// others), opened and checked against its adapter before any tensor is merged.
fn open_statistics(
    cfg: &AdapterMergeConfig,
    adapters: &[Adapter],
    config_dir: Option<&Path>,
) -> Result<Vec<StatsFile>, EngineError> {
    let name = cfg.combination_type.as_deref().unwrap_or("linear");
    if data_driven(name).is_none() {
        return Ok(Vec::new());
    }
    cfg.adapters
        .iter()
        .zip(adapters)
        .map(|(e, a)| {
            let path = e.statistics.as_deref().ok_or_else(|| {
                mismatch(
                    a,
                    format!(
                        "has no `statistics:` file; combination_type `{name}` needs one per \
                         adapter"
                    ),
                )
            })?;
            let p = resolve_model_path(path, config_dir)
                .map_err(|_| mismatch(a, format!("statistics file `{path}` not found")))?;
            let st = StatsFile::open(&p)?;
            st.check_model(a.checkpoint())?;
            Ok(st)
        })
        .collect()
}

/// A planned (IA)³ merge.
#[derive(Debug)]
pub(super) struct Ia3Merge {
    /// Per module, per adapter, the index in that adapter's `ia3_modules()`.
    table: Vec<Vec<Option<usize>>>,
    /// `None`: PEFT's raw weighted sum of the vectors, or a data-driven method.
    op: Option<MergeOp>,
    /// The data-driven method (`fisher`, `mats`), its statistic and parameters.
    data: Option<(&'static str, StatKind, TensorParams)>,
    /// Each adapter's statistics file (data-driven methods only).
    stats: Vec<StatsFile>,
    method: String,
    seed: u64,
}

impl Ia3Merge {
    /// Plans the merge: the operation, the module table (checking that the adapters agree on
    /// every vector's length and kind) and the statistics files.
    pub(super) fn plan(
        cfg: &AdapterMergeConfig,
        adapters: &[Adapter],
        order: &[String],
        config_dir: Option<&Path>,
    ) -> Result<Ia3Merge, EngineError> {
        let name = cfg.combination_type.as_deref().unwrap_or("linear");
        let data = data_driven(name);
        let sign = cfg.majority_sign_method;
        let density = || -> Result<f64, EngineError> {
            let d = cfg.density.ok_or_else(|| {
                cfg_err(
                    "density",
                    format!("combination_type `{name}` needs `density` (fraction kept)"),
                )
            })?;
            check_density(d)?;
            Ok(d)
        };
        let op: Option<MergeOp> = match name {
            "linear" | "fisher" | "mats" => None,
            "task_arithmetic" => Some(MergeOp::TaskArithmetic),
            "ties" => Some(MergeOp::Ties {
                density: density()?,
                sign,
            }),
            "dare_linear" => Some(MergeOp::DareLinear {
                density: density()?,
            }),
            "dare_ties" => Some(MergeOp::DareTies {
                density: density()?,
                sign,
            }),
            "magnitude_prune" => Some(MergeOp::MagnitudePrune {
                density: density()?,
            }),
            other => {
                return Err(cfg_err(
                    "combination_type",
                    format!(
                        "`{other}` does not apply to (IA)^3 adapters; use one of {}",
                        IA3_COMBINATIONS.join(", ")
                    ),
                ))
            }
        };
        let mut table = Vec::with_capacity(order.len());
        let rows = module_rows(adapters, order, Adapter::ia3_modules, |m| m.name.as_str());
        for ((row, (i0, j0)), mname) in rows.into_iter().zip(order) {
            let m0 = &adapters[i0].ia3_modules()[j0];
            for (i, j) in row.iter().enumerate() {
                let Some(j) = j else { continue };
                let m = &adapters[i].ia3_modules()[*j];
                if (m.len, m.is_feedforward) != (m0.len, m0.is_feedforward) {
                    let kind = |ff: bool| if ff { "feedforward" } else { "output" };
                    return Err(mismatch(
                        &adapters[i],
                        format!(
                            "module `{mname}`: an (IA)^3 vector of {} values ({}) but {} has {} \
                             ({}); all adapters must target the same base model",
                            m.len,
                            kind(m.is_feedforward),
                            adapters[i0].dir().display(),
                            m0.len,
                            kind(m0.is_feedforward),
                        ),
                    ));
                }
            }
            table.push(row);
        }
        let stats = open_statistics(cfg, adapters, config_dir)?;
        Ok(Ia3Merge {
            table,
            op,
            data,
            stats,
            method: name.to_string(),
            seed: cfg.seed,
        })
    }

    /// The combination that runs.
    pub(super) fn method(&self) -> &str {
        &self.method
    }

    /// The adapters that have module `u`, with the module.
    fn present<'a>(
        &self,
        adapters: &'a [Adapter],
        u: usize,
    ) -> Vec<(usize, &'a amalgam_io::peft::Ia3Module)> {
        self.table[u]
            .iter()
            .enumerate()
            .filter_map(|(i, j)| j.map(|j| (i, &adapters[i].ia3_modules()[j])))
            .collect()
    }

    /// Input bytes, output key and stored shape of unit (module) `u`.
    pub(super) fn unit(
        &self,
        adapters: &[Adapter],
        u: usize,
        name: &str,
    ) -> (u64, String, Vec<usize>) {
        let present = self.present(adapters, u);
        let bytes = present
            .iter()
            .map(|&(i, m)| bytes_of(&adapters[i], &[&m.key]))
            .sum();
        (bytes, ia3_key(name), present[0].1.shape.clone())
    }

    /// The merged vector of module `u`, in its stored shape.
    pub(super) fn merge_unit(
        &self,
        adapters: &[Adapter],
        weights: &[f64],
        u: usize,
        mname: &str,
    ) -> Result<Vec<OutTensor>, EngineError> {
        let present = self.present(adapters, u);
        let mut vecs = Vec::with_capacity(present.len());
        for &(i, m) in &present {
            vecs.push(adapters[i].read(&m.key)?);
        }
        let w: Vec<f64> = present.iter().map(|&(i, _)| weights[i]).collect();
        let l = match (self.op, &self.data) {
            (None, Some((method, kind, params))) => {
                let idx: Vec<usize> = present.iter().map(|&(i, _)| i).collect();
                let keys: Vec<&str> = present.iter().map(|(_, m)| m.key.as_str()).collect();
                let params = params.clone().with_model_values("weight", &w);
                ia3_data_driven(
                    method,
                    *kind,
                    &params,
                    &keys,
                    &vecs,
                    &idx,
                    &self.stats,
                    self.seed,
                )?
            }
            (None, None) => {
                let refs: Vec<&[f32]> = vecs.iter().map(Vec::as_slice).collect();
                ia3::weighted_sum(mname, &refs, &w)?
            }
            (Some(op), _) => {
                let taus: Vec<Vec<f64>> = vecs
                    .iter()
                    .map(|v| v.iter().map(|&x| f64::from(x) - 1.0).collect())
                    .collect();
                let mask_name = format!("{mname}.ia3_l");
                let streams: Vec<MaskStream> = present
                    .iter()
                    .map(|&(i, _)| MaskStream::new(self.seed, i, &mask_name))
                    .collect();
                merge_ops::apply(op, taus, &w, &streams)
                    .iter()
                    .map(|&t| (1.0 + t) as f32)
                    .collect()
            }
        };
        Ok(vec![(ia3_key(mname), present[0].1.shape.clone(), l)])
    }

    /// The output adapter's config: the first adapter's, with the union of the targets (and of
    /// the feedforward modules, the vectors stored as `[1, d]`).
    pub(super) fn out_config(&self, adapters: &[Adapter], order: &[String]) -> AdapterConfig {
        let ics: Vec<&amalgam_io::Ia3Config> = adapters
            .iter()
            .filter_map(|a| match a.config() {
                AdapterConfig::Ia3(c) => Some(c),
                AdapterConfig::Lora(_) => None,
            })
            .collect();
        let mut c = ics[0].clone();
        c.target_modules = union_targets(ics.iter().map(|c| &c.target_modules), order);
        if ics.iter().all(|c| c.feedforward_modules.is_some()) {
            let ff: Vec<String> = order
                .iter()
                .enumerate()
                .filter(|(u, _)| {
                    let s = &self.present(adapters, *u)[0].1.shape;
                    s.len() == 2 && s[0] == 1 && s[1] > 1
                })
                .map(|(_, n)| n.clone())
                .collect();
            c.feedforward_modules = Some(union_targets(
                ics.iter().filter_map(|c| c.feedforward_modules.as_ref()),
                &ff,
            ));
        }
        if c.extra.contains_key("modules_to_save") {
            c.extra
                .insert("modules_to_save".to_string(), serde_json::Value::Null);
        }
        AdapterConfig::Ia3(c)
    }
}

/// One (IA)³ vector merged by the core's `method` (`fisher` or `mats`): the adapters' vectors
/// `vecs` (of adapters `idx`, stored under `keys`) as the models of a 1-D tensor, their
/// statistic `kind` from `stats`.
#[allow(clippy::too_many_arguments)]
fn ia3_data_driven(
    method: &str,
    kind: StatKind,
    params: &TensorParams,
    keys: &[&str],
    vecs: &[Vec<f32>],
    idx: &[usize],
    stats: &[StatsFile],
    seed: u64,
) -> Result<Vec<f32>, EngineError> {
    let n = vecs[0].len();
    let mut reader = MemReader {
        base: None,
        models: vecs.to_vec(),
        stats: Default::default(),
    };
    for (k, &i) in idx.iter().enumerate() {
        let stored = stats[i].require(keys[k], kind)?.to_vec();
        let mut v = vec![0.0f32; stored.iter().product()];
        stats[i].read(keys[k], kind, 0..v.len(), &mut v)?;
        // The vector is merged as a 1-D tensor of n values: its diagonal Fisher too.
        let shape = if kind == StatKind::Fisher {
            vec![n]
        } else {
            stored
        };
        reader
            .stats
            .insert((k, kind.suffix().to_string()), (shape, v));
    }
    let job = TensorJob {
        name: keys[0].to_string(),
        shape: vec![n],
        n_models: vecs.len(),
        has_base: false,
        block_elems: n.max(1),
        seed,
    };
    let m = amalgam_core::methods::build(method, params, vecs.len(), false)?;
    Ok(amalgam_core::tensor::merge_in_memory(
        m.as_ref(),
        &job,
        &reader,
    )?)
}
