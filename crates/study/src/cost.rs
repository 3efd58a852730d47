//! Cost accounting per merge: wall time per phase, bytes, FLOPs, statistics passes, storage,
//! peak memory.
//!
//! FLOPs are **estimates** from the tensor shapes of the first pool model (`n` = models merged,
//! base excluded; `P` = parameters; for a 2-D tensor `d_out × d_in`):
//!
//! | Method | FLOPs |
//! |---|---|
//! | `linear`, `nearswap`, `passthrough` and unknown | `2nP + P` (weighted sum, normalization) |
//! | `task_arithmetic` | `3nP + P` (difference, scale, add; add to the base) |
//! | `dare_linear`, `breadcrumbs`, `della_linear` | `5nP + P` (task arithmetic plus a mask per element) |
//! | `ties`, `dare_ties`, `breadcrumbs_ties`, `della`, `sce` | `7nP + P` (mask, sign election, disjoint mean) |
//! | methods that pick by magnitude (`ties`, `breadcrumbs*`, `della*`, `sce`) | plus `n·Σ numel·log₂ numel` (per-tensor selection) |
//! | `slerp`, `nuslerp`, `multislerp`, `karcher` | `8nP` (norms, dots, trigonometric weights, sums) |
//! | `model_stock` | `2n²P + 3nP` (pairwise cosines, interpolation) |
//! | `fisher` | `4nP + P` (Fisher-weighted sum and normalizer) |
//! | `regmean` | per 2-D tensor `n·2·d_in²·d_out + n·d_in² + d_in³/3 + 2·d_in²·d_out` (Gram products, Gram sum, Cholesky, solve); other tensors `2nP` |
//! | `mats` | RegMean's Gram products and sum, plus `iterations` (default 10) CG steps of `2·d_in²·d_out` per 2-D tensor (methods.md §11, "Cost per iteration"); other tensors `2nP` |
//! | `tsv`, `iso_c`, `iso_cts` | `3nP` plus SVDs: `4·d_out·d_in·min(d_out, d_in)` each, `n` of them for `tsv`, one (`iso_c`) or `n + 1` (`iso_cts`) |
//!
//! Statistics passes come from each statistics file's metadata (`examples`): Fisher-type files
//! (kind containing `fisher` or `ia3`) need one backward pass per example, Gram-type files one
//! forward pass per example (methods.md §16, "Cost model from the code"). They are counted for
//! every merge that uses them, as the cost of obtaining its inputs.

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

/// Every cost figure of one merge.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// Wall time of the merge (s).
    pub merge_secs: f64,
    /// Wall time of the evaluation (s).
    pub eval_secs: f64,
    /// Wall time spent computing statistics for this merge (s; 0 when they were given).
    pub stats_secs: f64,
    /// Bytes of input files read by the merge (model weights and statistics).
    pub bytes_read: u64,
    /// Bytes of the merged checkpoint written.
    pub bytes_written: u64,
    /// Estimated floating-point operations of the merge (see the module docs).
    pub flops: f64,
    /// Forward passes needed for the statistics the merge uses.
    pub stats_forward_passes: u64,
    /// Backward passes needed for the statistics the merge uses.
    pub stats_backward_passes: u64,
    /// Extra storage per model: mean size of the statistics files the merge uses (bytes).
    pub stats_bytes_per_model: u64,
    /// Peak resident memory of the merge (bytes; 0 when unknown).
    pub merge_peak_bytes: u64,
    /// Peak resident memory of the evaluation (bytes; 0 when unknown).
    pub eval_peak_bytes: u64,
}

impl Cost {
    /// The larger of the two peaks.
    pub fn peak_memory_bytes(&self) -> u64 {
        self.merge_peak_bytes.max(self.eval_peak_bytes)
    }
}

fn param_f64(params: &[(String, Value)], key: &str) -> Option<f64> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.as_f64())
}

/// Estimated FLOPs of merging `n` models with `method` over tensors of `shapes`.
pub fn flops(method: &str, params: &[(String, Value)], shapes: &[Vec<usize>], n: usize) -> f64 {
    let n = n as f64;
    let numel = |s: &Vec<usize>| s.iter().product::<usize>() as f64;
    let p: f64 = shapes.iter().map(numel).sum();
    let selection: f64 = shapes
        .iter()
        .map(|s| {
            let e = numel(s);
            if e > 1.0 {
                n * e * e.log2()
            } else {
                0.0
            }
        })
        .sum();
    let matrices = || shapes.iter().filter(|s| s.len() == 2);
    let other: f64 = shapes.iter().filter(|s| s.len() != 2).map(numel).sum();
    match method {
        "task_arithmetic" => 3.0 * n * p + p,
        "dare_linear" => 5.0 * n * p + p,
        "dare_ties" => 7.0 * n * p + p,
        "breadcrumbs" | "della_linear" => 5.0 * n * p + p + selection,
        "ties" | "breadcrumbs_ties" | "della" | "sce" => 7.0 * n * p + p + selection,
        "slerp" | "nuslerp" | "multislerp" | "karcher" => 8.0 * n * p,
        "model_stock" => 2.0 * n * n * p + 3.0 * n * p,
        "fisher" => 4.0 * n * p + p,
        "regmean" => {
            let m: f64 = matrices()
                .map(|s| {
                    let (o, i) = (s[0] as f64, s[1] as f64);
                    n * 2.0 * i * i * o + n * i * i + i * i * i / 3.0 + 2.0 * i * i * o
                })
                .sum();
            m + 2.0 * n * other
        }
        "mats" => {
            let iters = param_f64(params, "iterations").unwrap_or(10.0);
            let m: f64 = matrices()
                .map(|s| {
                    let (o, i) = (s[0] as f64, s[1] as f64);
                    n * 2.0 * i * i * o + n * i * i + iters * 2.0 * i * i * o
                })
                .sum();
            m + 2.0 * n * other
        }
        "tsv" | "iso_c" | "iso_cts" => {
            let svds = match method {
                "tsv" => n,
                "iso_c" => 1.0,
                _ => n + 1.0,
            };
            let s: f64 = matrices()
                .map(|s| {
                    let (o, i) = (s[0] as f64, s[1] as f64);
                    4.0 * o * i * o.min(i)
                })
                .sum();
            3.0 * n * p + svds * s
        }
        _ => 2.0 * n * p + p,
    }
}

/// Forward and backward passes that a statistics file of `kind` over `examples` needed.
pub fn stats_passes(kind: &str, examples: u64) -> (u64, u64) {
    let k = kind.to_ascii_lowercase();
    if k.contains("fisher") || k.contains("ia3") {
        (0, examples)
    } else {
        (examples, 0)
    }
}

/// Peak resident memory of this process so far (`VmHWM` of `/proc/self/status`, bytes), or 0.
pub fn self_peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Total size of the files under `path` (a file or a directory, recursively), or 0.
pub fn tree_bytes(path: &std::path::Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries.flatten().map(|e| tree_bytes(&e.path())).sum()
}

/// Bytes of a model's weight files: a `.safetensors`/`.gguf` file itself, or every
/// `*.safetensors` file in a directory.
pub fn weight_bytes(path: &std::path::Path) -> u64 {
    if path.is_file() {
        return tree_bytes(path);
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .map(|e| tree_bytes(&e.path()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_by_hand() {
        // Two tensors: 4×3 (12) and a vector of 5: P = 17, n = 2.
        let shapes = vec![vec![4, 3], vec![5]];
        assert_eq!(flops("linear", &[], &shapes, 2), 2.0 * 2.0 * 17.0 + 17.0);
        assert_eq!(
            flops("task_arithmetic", &[], &shapes, 2),
            3.0 * 2.0 * 17.0 + 17.0
        );
        // TIES: 7nP + P + n(12·log2 12 + 5·log2 5).
        let sel = 2.0 * (12.0 * 12f64.log2() + 5.0 * 5f64.log2());
        let got = flops("ties", &[], &shapes, 2);
        assert!((got - (7.0 * 2.0 * 17.0 + 17.0 + sel)).abs() < 1e-9);
        // RegMean on the 4×3 matrix (d_out 4, d_in 3): 2·2·9·4 + 2·9 + 27/3 + 2·9·4; the
        // vector: 2·2·5.
        let want = 144.0 + 18.0 + 9.0 + 72.0 + 20.0;
        assert!((flops("regmean", &[], &shapes, 2) - want).abs() < 1e-9);
        // MaTS with 3 iterations: 144 + 18 + 3·72 + 20.
        let p = vec![("iterations".to_string(), Value::from(3))];
        assert!((flops("mats", &p, &shapes, 2) - (144.0 + 18.0 + 216.0 + 20.0)).abs() < 1e-9);
    }

    #[test]
    fn passes_by_kind() {
        assert_eq!(stats_passes("empirical_fisher", 7), (0, 7));
        assert_eq!(stats_passes("gram", 7), (7, 0));
    }

    #[test]
    fn sizes_of_files_and_trees() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("model.safetensors"), [0u8; 10]).unwrap();
        std::fs::write(t.path().join("config.json"), [0u8; 3]).unwrap();
        std::fs::create_dir(t.path().join("sub")).unwrap();
        std::fs::write(t.path().join("sub/x"), [0u8; 4]).unwrap();
        assert_eq!(tree_bytes(t.path()), 17);
        assert_eq!(weight_bytes(t.path()), 10);
        assert!(self_peak_rss() > 0);
    }
}
