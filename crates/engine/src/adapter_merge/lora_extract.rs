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

/// A planned extraction: the two checkpoints and the weights to decompose, one unit each.
#[derive(Debug)]
pub(super) struct LoraExtraction {
    base: Checkpoint,
    model: Checkpoint,
    base_display: String,
    /// (module, tensor name, shape).
    selected: Vec<(String, String, Vec<usize>)>,
    eopts: ExtractOptions,
}

impl LoraExtraction {
    /// Opens both checkpoints and selects the 2-D linear weights to decompose.
    pub(super) fn plan(opts: &ExtractLoraOptions) -> Result<LoraExtraction, EngineError> {
        if opts.rank == 0 {
            return Err(cfg_err("rank", "must be at least 1"));
        }
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
                let m = f.matches(module).map_err(|e| {
                    cfg_err("modules", format!("unsupported regular expression: {e}"))
                })?;
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
        Ok(LoraExtraction {
            base,
            model,
            base_display: opts.base.display().to_string(),
            selected,
            eopts: ExtractOptions {
                max_rank: opts.rank,
                distribute_scale: opts.distribute_scale,
                sv_epsilon: opts.sv_epsilon,
            },
        })
    }

    /// The modules, one unit each.
    pub(super) fn modules(&self) -> Vec<String> {
        self.selected.iter().map(|s| s.0.clone()).collect()
    }

    /// Input bytes and output keys of unit `u`.
    pub(super) fn unit(&self, u: usize) -> (u64, Vec<String>) {
        let (module, tname, _) = &self.selected[u];
        let bytes = self.model.get(tname).map_or(0, |t| t.byte_len() as u64)
            + self.base.get(tname).map_or(0, |t| t.byte_len() as u64);
        (bytes, vec![lora_a_key(module), lora_b_key(module)])
    }

    /// The rank-`r` factors of unit `u`'s difference: `lora_A`, `lora_B`, or nothing when no
    /// singular value is above `sv_epsilon`.
    pub(super) fn run_unit(&self, u: usize) -> Result<Vec<OutTensor>, EngineError> {
        let (module, tname, shape) = &self.selected[u];
        let (rows, cols) = (shape[0], shape[1]);
        let n = rows * cols;
        let mut wf = vec![0f32; n];
        self.model.read_f32(tname, 0..n, &mut wf)?;
        let mut wb = vec![0f32; n];
        self.base.read_f32(tname, 0..n, &mut wb)?;
        let e = extract::extract_lora(tname, &wf, &wb, rows, cols, &self.eopts)?;
        if e.rank == 0 {
            tracing::warn!("{tname}: no singular value above --sv-epsilon; not in the adapter");
            return Ok(Vec::new());
        }
        Ok(vec![
            (lora_a_key(module), vec![e.rank, cols], to_f32(&e.a)),
            (lora_b_key(module), vec![rows, e.rank], to_f32(&e.b)),
        ])
    }

    /// The adapter's config from the extracted factors (`tensors`: A, B per module, in order):
    /// `r` the largest rank, `rank_pattern = alpha_pattern` for the smaller ones.
    pub(super) fn out_config(
        &self,
        tensors: &[OutTensor],
    ) -> Result<(AdapterConfig, usize), EngineError> {
        // (module, rank) per extracted module, from its lora_A's first dimension.
        let ranks: Vec<(&str, usize)> = tensors
            .iter()
            .filter_map(|(k, s, _)| {
                k.strip_prefix(KEY_PREFIX)
                    .and_then(|m| m.strip_suffix(".lora_A.weight"))
                    .map(|m| (m, s[0]))
            })
            .collect();
        let Some(r) = ranks.iter().map(|x| x.1).max() else {
            return Err(cfg_err(
                "sv_epsilon",
                "every module's update is below --sv-epsilon; nothing to write",
            ));
        };
        let targets: BTreeSet<String> = ranks
            .iter()
            .map(|(m, _)| m.rsplit('.').next().unwrap_or(m).to_string())
            .collect();
        let mut cfg = LoraConfig::new(
            r,
            r as f64,
            TargetModules::List(targets.into_iter().collect()),
        );
        let pattern: BTreeMap<String, usize> = ranks
            .iter()
            .filter(|(_, k)| *k != r)
            .map(|(m, k)| (exact_key(m), *k))
            .collect();
        cfg.alpha_pattern = pattern
            .iter()
            .map(|(k, v)| (k.clone(), *v as f64))
            .collect();
        cfg.rank_pattern = pattern;
        cfg.base_model_name_or_path = Some(self.base_display.clone());
        Ok((AdapterConfig::Lora(cfg), r))
    }
}
