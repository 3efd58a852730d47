//! LoRA extraction from a full fine-tune (see the parent module).

use super::*;

/// Options of [`extract_lora`] (mergekit-extract-lora's flags).
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractLoraOptions {
    /// The base checkpoint.
    pub base: PathBuf,
    /// The fine-tuned checkpoint.
    pub model: PathBuf,
    /// Maximum rank (`--rank`, mergekit's `--max-rank`).
    pub rank: usize,
    /// The adapter directory to write.
    pub out: PathBuf,
    /// Only modules whose path matches this regular expression somewhere (`re.search`, as
    /// mergekit's `--include-regex`).
    pub modules: Option<String>,
    /// `√S` on both factors (mergekit's default `--distribute-scale`); false puts `S` on A.
    pub distribute_scale: bool,
    /// Singular values at or below this are dropped when `> 0` (`--sv-epsilon`, default 0).
    pub sv_epsilon: f64,
    /// Replace an adapter already in `out`.
    pub overwrite: bool,
}

/// Whether a module is an embedding or the LM head, which extraction leaves out (mergekit's
/// default `--no-embed-lora` saves them at full rank instead).
pub(super) fn is_embedding(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    last.contains("embed") || matches!(last, "lm_head" | "wte" | "wpe" | "shared")
}

/// A regular-expression key matching exactly `module` (dots escaped) for `rank_pattern`.
pub(super) fn exact_key(module: &str) -> String {
    module.replace('.', "\\.")
}

/// Extract a LoRA of rank `opts.rank` from `opts.model − opts.base` (see the module docs).
pub fn extract_lora(
    opts: &ExtractLoraOptions,
    progress: &dyn Progress,
) -> Result<AdapterSummary, EngineError> {
    if opts.rank == 0 {
        return Err(cfg_err("rank", "must be at least 1"));
    }
    check_out(&opts.out, opts.overwrite)?;
    let base = Checkpoint::open(&opts.base)?;
    let model = Checkpoint::open(&opts.model)?;
    let filter = opts
        .modules
        .as_ref()
        .map(|r| TargetModules::Regex(format!(".*(?:{r}).*")));
    let mut selected = Vec::new();
    let mut skipped_diff = 0usize;
    for t in model.tensors() {
        let Some(module) = t.name.strip_suffix(".weight") else {
            continue;
        };
        let Some(b) = base.get(&t.name) else {
            tracing::warn!("{}: not in the base; not extracted", t.name);
            continue;
        };
        if b.shape != t.shape {
            return Err(EngineError::Model {
                model: opts.model.display().to_string(),
                message: format!(
                    "tensor `{}` has shape {:?} but the base's has {:?}; the fine-tune must \
                     come from this base",
                    t.name, t.shape, b.shape
                ),
            });
        }
        if t.shape.len() != 2 || is_embedding(module) || !t.dtype.is_float_convertible() {
            skipped_diff += 1;
            continue;
        }
        if let Some(f) = &filter {
            let m = f
                .matches(module)
                .map_err(|e| cfg_err("modules", format!("unsupported regular expression: {e}")))?;
            if !m {
                continue;
            }
        }
        selected.push((module.to_string(), t.name.clone(), t.shape.clone()));
    }
    if selected.is_empty() {
        return Err(cfg_err(
            "modules",
            "no 2-D linear weight (`*.weight`, not an embedding or the LM head) to extract",
        ));
    }
    if skipped_diff > 0 {
        tracing::info!(
            "{skipped_diff} tensor(s) (embeddings, LM head, norms, biases) are not decomposed \
             and not in the adapter"
        );
    }
    let total: u64 = selected
        .iter()
        .map(|(_, n, _)| 2 * model.get(n).map_or(0, |t| t.byte_len() as u64))
        .sum();
    progress.begin("extracting", total, selected.len());
    let eopts = ExtractOptions {
        max_rank: opts.rank,
        distribute_scale: opts.distribute_scale,
        sv_epsilon: opts.sv_epsilon,
    };
    // (module, rank, rows, cols, A, B).
    type Factors = (String, usize, usize, usize, Vec<f32>, Vec<f32>);
    let mut factors: Vec<Factors> = Vec::new();
    for (module, tname, shape) in &selected {
        let (rows, cols) = (shape[0], shape[1]);
        let n = rows * cols;
        let mut wf = vec![0f32; n];
        model.read_f32(tname, 0..n, &mut wf)?;
        let mut wb = vec![0f32; n];
        base.read_f32(tname, 0..n, &mut wb)?;
        let e = extract::extract_lora(tname, &wf, &wb, rows, cols, &eopts)?;
        drop((wf, wb));
        if e.rank == 0 {
            tracing::warn!("{tname}: no singular value above --sv-epsilon; not in the adapter");
        } else {
            factors.push((
                module.clone(),
                e.rank,
                rows,
                cols,
                to_f32(&e.a),
                to_f32(&e.b),
            ));
        }
        progress.advance(tname, 2 * (n as u64) * 4);
    }
    progress.end();
    if factors.is_empty() {
        return Err(cfg_err(
            "sv_epsilon",
            "every module's update is below --sv-epsilon; nothing to write",
        ));
    }
    let r = factors
        .iter()
        .map(|f| f.1)
        .max()
        .expect("factors is non-empty");
    let targets: BTreeSet<String> = factors
        .iter()
        .map(|f| f.0.rsplit('.').next().unwrap_or(&f.0).to_string())
        .collect();
    let mut cfg = LoraConfig::new(
        r,
        r as f64,
        TargetModules::List(targets.into_iter().collect()),
    );
    let pattern: BTreeMap<String, usize> = factors
        .iter()
        .filter(|f| f.1 != r)
        .map(|f| (exact_key(&f.0), f.1))
        .collect();
    cfg.alpha_pattern = pattern
        .iter()
        .map(|(k, v)| (k.clone(), *v as f64))
        .collect();
    cfg.rank_pattern = pattern;
    cfg.base_model_name_or_path = Some(opts.base.display().to_string());
    let tensors: Vec<(String, Vec<usize>, &[f32])> = factors
        .iter()
        .flat_map(|(m, rank, rows, cols, a, b)| {
            [
                (lora_a_key(m), vec![*rank, *cols], a.as_slice()),
                (lora_b_key(m), vec![*rows, *rank], b.as_slice()),
            ]
        })
        .collect();
    write_adapter(
        &opts.out,
        &AdapterConfig::Lora(cfg),
        &tensors,
        opts.overwrite,
    )?;
    Ok(AdapterSummary {
        out_dir: opts.out.clone(),
        kind: AdapterKind::Lora,
        method: "extract".to_string(),
        modules: factors.len(),
        rank: r,
    })
}
