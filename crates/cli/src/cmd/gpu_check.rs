//! `amalgam gpu-check`: check every GPU kernel against the CPU path and print a figures table
//! (built with `--features cuda`; `scripts/gpu-check.sh` runs it on a lent GPU machine).

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `amalgam gpu-check`.
#[derive(Debug, Args)]
#[command(
    after_help = "Runs, on GPU 0: the device copy and host-to-device bandwidths; parity of every kernel against the CPU path (bit-identical expected) on f32, bf16, f16, tie-heavy and odd-length data; timed merges of 4 models x 128M elements in f32 and bf16; CG on a 4096^2 system; an end-to-end TIES merge of generated checkpoints on the GPU against the CPU. Exits non-zero when a parity check fails."
)]
pub struct GpuCheckArgs {
    /// Elements per tensor of the timed merges.
    #[arg(long, default_value_t = 128 << 20)]
    pub elems: usize,
    /// Models merged in the timed runs.
    #[arg(long, default_value_t = 4)]
    pub models: usize,
    /// Elements per tensor of the parity checks.
    #[arg(long, default_value_t = 8 << 20)]
    pub parity_elems: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Decoder layers of the generated checkpoints of the end-to-end merge (0: skip it).
    #[arg(long, default_value_t = 8)]
    pub e2e_layers: usize,
    /// Working directory of the end-to-end merge (generated models and outputs).
    #[arg(long, default_value = "amalgam-gpu-check")]
    pub dir: PathBuf,
    /// Skip the CG rows.
    #[arg(long)]
    pub skip_cg: bool,
}

/// Run the checks.
pub fn run(a: GpuCheckArgs) -> Result<()> {
    imp::run(a)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::GpuCheckArgs;
    use anyhow::{bail, Result};

    pub fn run(_: GpuCheckArgs) -> Result<()> {
        bail!(
            "this amalgam was built without GPU support; rebuild with \
             `cargo build --release --features cuda`"
        )
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::GpuCheckArgs;
    use crate::cmd::bench::{ensure_models, files_under, read_all, BENCH_MODELS};
    use amalgam_cuda::check::{self, CheckOptions, Row};
    use amalgam_cuda::tensor::DType;
    use amalgam_engine::device::Device;
    use amalgam_engine::run::{self, NoProgress};
    use amalgam_engine::synth::SynthSpec;
    use anyhow::{anyhow, bail, Context, Result};
    use std::io::Write;
    use std::sync::Arc;
    use std::time::Instant;

    fn show(rows: &mut Vec<Row>, new: Vec<Row>) {
        for r in &new {
            println!(
                "  {:<44} {}",
                r.name,
                if r.ms > 0.0 {
                    format!("{:.3} ms  {}", r.ms, r.note)
                } else {
                    r.note.clone()
                }
            );
        }
        let _ = std::io::stdout().flush();
        rows.extend(new);
    }

    fn step(rows: &mut Vec<Row>, name: &str, f: impl FnOnce() -> amalgam_cuda::Result<Vec<Row>>) {
        let t = Instant::now();
        match f() {
            Ok(v) => show(rows, v),
            Err(e) => show(rows, vec![check::failed(name, &e)]),
        }
        eprintln!("  ({name}: {:.1} s)", t.elapsed().as_secs_f64());
    }

    pub fn run(a: GpuCheckArgs) -> Result<()> {
        if let Some(why) = amalgam_cuda::device::unavailable_reason() {
            bail!("no GPU to check: {why}");
        }
        let acc = Arc::new(
            amalgam_cuda::accel::GpuAccelerator::open(0)
                .map_err(|e| anyhow!("opening GPU 0: {e}"))?,
        );
        let gpu = acc.gpu().clone();
        let (free, total) = gpu.ctx.mem_get_info().unwrap_or((0, 0));
        println!(
            "GPU 0: {} (compute {}.{}, {} SMs, {:.1} of {:.1} GiB free); kernels compiled by NVRTC",
            gpu.name,
            gpu.cc.0,
            gpu.cc.1,
            gpu.sms,
            free as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        );
        let opts = CheckOptions {
            elems: a.elems,
            models: a.models,
            parity_elems: a.parity_elems,
            reps: a.reps,
        };
        let mut rows = Vec::new();
        step(&mut rows, "device copy", || {
            Ok(vec![check::copy_bandwidth(&gpu, 1 << 30, opts.reps)?])
        });
        let copy_gbs = rows
            .first()
            .filter(|r| r.ms > 0.0)
            .map_or(1.0, |r| r.bytes / r.ms / 1e6);
        step(&mut rows, "H2D", || {
            check::h2d_rates(&gpu, 1 << 30, opts.reps)
        });
        let pinned_gbs = rows
            .iter()
            .find(|r| r.name.starts_with("H2D pinned") && r.ms > 0.0)
            .map_or(0.0, |r| r.bytes / r.ms / 1e6);
        step(&mut rows, "registers", || check::register_rows(&gpu));
        step(&mut rows, "parity", || {
            check::parity_suite(&gpu, opts.parity_elems, opts.models)
        });
        for dtype in [DType::F32, DType::Bf16] {
            step(&mut rows, &format!("timings {}", dtype.name()), || {
                check::timings(&gpu, &opts, dtype, copy_gbs)
            });
        }
        if !a.skip_cg {
            step(&mut rows, "cg", || amalgam_cuda::cg::check_rows(&gpu));
            step(&mut rows, "mats", || check::mats_parity(&gpu));
        }
        if a.e2e_layers > 0 {
            match end_to_end(&a, &acc, pinned_gbs) {
                Ok(v) => show(&mut rows, v),
                Err(e) => show(
                    &mut rows,
                    vec![check::failed("end-to-end", &format!("{e:#}"))],
                ),
            }
        }
        println!();
        print!("{}", check::table(&rows, copy_gbs));
        let parity: Vec<Row> = rows
            .iter()
            .filter(|r| r.name.starts_with("parity") || r.note.starts_with("FAILED"))
            .cloned()
            .collect();
        if !check::all_passed(&parity) {
            bail!("a GPU check failed (see the table)");
        }
        println!("all parity checks passed");
        Ok(())
    }

    /// Generated bf16 checkpoints merged with TIES on the CPU and on the GPU: identical bytes,
    /// times, and the transfer rates.
    fn end_to_end(
        a: &GpuCheckArgs,
        acc: &Arc<amalgam_cuda::accel::GpuAccelerator>,
        pinned_gbs: f64,
    ) -> Result<Vec<Row>> {
        let spec = SynthSpec {
            hidden: 1024,
            intermediate: 2816,
            layers: a.e2e_layers,
            heads: 16,
            kv_heads: 8,
            vocab: 32000,
            dtype: amalgam_io::DType::BF16,
        };
        let root = a.dir.join("bfloat16");
        let t = Instant::now();
        ensure_models(&root, &spec)?;
        eprintln!(
            "  (end-to-end inputs: {} parameters per model, ready in {:.1} s)",
            spec.params(),
            t.elapsed().as_secs_f64()
        );
        let inputs: Vec<_> = BENCH_MODELS
            .iter()
            .flat_map(|n| files_under(&root.join(n)))
            .collect();
        read_all(&inputs)?;
        let t = Instant::now();
        let in_bytes = read_all(&inputs)?;
        let read_gbs = in_bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
        let models: String = BENCH_MODELS[1..]
            .iter()
            .map(|n| format!("  - model: {n}\n    parameters: {{weight: 1.0, density: 0.2}}\n"))
            .collect();
        let cfg_path = root.join("ties.yaml");
        std::fs::write(
            &cfg_path,
            format!("merge_method: ties\nbase_model: base\nmodels:\n{models}"),
        )?;
        let config = crate::cmd::merge::load_config(&cfg_path, false, true)?;
        let (inputs_h, plan) = crate::cmd::merge::prepare(&config, &cfg_path, false, true)?;
        let mut rows = Vec::new();
        let mut outs = Vec::new();
        for (label, device) in [
            ("cpu", Device::Cpu),
            ("gpu", Device::Accelerator(acc.clone())),
        ] {
            let out = root.join(format!("out-{label}"));
            let opts = run::MergeOptions {
                out_dir: out.clone(),
                memory_budget: 8 << 30,
                out_shard_size: 5_000_000_000,
                overwrite: true,
                allow_nonfinite: false,
                device,
            };
            let before = acc.stats();
            let t = Instant::now();
            run::execute(&config, &plan, &inputs_h, Some(&root), &opts, &NoProgress)
                .with_context(|| format!("end-to-end merge on the {label}"))?;
            let secs = t.elapsed().as_secs_f64();
            let after = acc.stats();
            let mut note = format!("{:.2} GB/s of input", in_bytes as f64 / secs / 1e9);
            if label == "gpu" {
                let h2d = (after.h2d_bytes - before.h2d_bytes) as f64;
                let up = (after.upload_time - before.upload_time).as_secs_f64();
                let rd = (after.read_time - before.read_time).as_secs_f64();
                let comp = (after.compute_time - before.compute_time).as_secs_f64();
                let down = (after.download_time - before.download_time).as_secs_f64();
                let floor = read_gbs.min(pinned_gbs.max(1e-9));
                note = format!(
                    "{note}; {} tensors on GPU, {} declined; uploads {:.2} s ({:.2} GB/s, {:.2} s reading), kernels {:.2} s, copies back and writes {:.2} s; host read {:.2} GB/s, pinned H2D {:.1} GB/s: {:.0}% of the lower",
                    after.tensors - before.tensors,
                    after.declined - before.declined,
                    up,
                    h2d / up.max(1e-9) / 1e9,
                    rd,
                    comp,
                    down,
                    read_gbs,
                    pinned_gbs,
                    100.0 * (in_bytes as f64 / secs / 1e9) / floor
                );
            }
            rows.push(Row {
                name: format!("e2e ties bf16 {label} ({} layers)", a.e2e_layers),
                ms: secs * 1e3,
                note,
                ..Default::default()
            });
            outs.push(out);
        }
        let files = |d: &std::path::Path| -> Result<Vec<(String, Vec<u8>)>> {
            let mut v = Vec::new();
            for f in files_under(d) {
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                v.push((name, std::fs::read(&f)?));
            }
            Ok(v)
        };
        let same = files(&outs[0])? == files(&outs[1])?;
        rows.push(Row {
            name: "parity e2e ties bf16 checkpoint".into(),
            bitwise: Some(same),
            note: if same {
                "GPU and CPU checkpoints byte-identical".into()
            } else {
                "CHECKPOINTS DIFFER".into()
            },
            ..Default::default()
        });
        Ok(rows)
    }
}
