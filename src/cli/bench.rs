//! `ocr-patch bench`: the GPU fast path against transformers running the patched remote code,
//! same GPU, same weights, same run; prints a table (or `--json`) and writes the JSON report.
//! Wiring only: [`crate::bench`] measures and reports.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::bench::{self, BenchConfig};
use crate::model::OcrConfig;

use super::{print_json, Exit, OutputArgs};

/// Measure the GPU fast path (vision, prefill, decode at batch 1 and 8/32/64, memory) against
/// transformers running the patched remote code on the same GPU, with ratios and the HBM
/// roofline (needs a build with --features cuda)
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Folder with config.json and *.safetensors (e.g. `ocr-patch-synth` output of the real
    /// config)
    #[arg(long, value_name = "DIR")]
    pub model_dir: PathBuf,

    /// The remote code (`.py` files + config.json) patched by `ocr-patch apply --path`, for the
    /// transformers peer; without it only the Rust side runs
    #[arg(long, value_name = "DIR")]
    pub remote_code: Option<PathBuf>,

    /// Attention implementations to run transformers with, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "eager,sdpa",
        value_name = "IMPLS"
    )]
    pub peer_attn: Vec<String>,

    /// The Python that has torch and transformers
    #[arg(long, default_value = "python3")]
    pub python: String,

    /// The peer's script
    #[arg(long, default_value = "bench/gpu/tf_peer.py", value_name = "FILE")]
    pub peer_script: PathBuf,

    /// Stop a peer run after this many seconds
    #[arg(long, default_value_t = 400)]
    pub peer_timeout_s: u64,

    /// Decode steps per timed run
    #[arg(long, default_value_t = 64)]
    pub steps: usize,

    /// Timed decode runs (each from a fresh prefill)
    #[arg(long, default_value_t = 3)]
    pub decode_runs: usize,

    /// Timed runs of the vision and prefill measurements (after 2 untimed)
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,

    /// Concurrent sequences for the batched decode, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "8,32,64",
        value_name = "N"
    )]
    pub batches: Vec<usize>,

    /// Cache positions of the batch-1 decoder (its peak memory is reported at this size)
    #[arg(long, default_value_t = 8192)]
    pub max_t: usize,

    /// HBM bandwidth for the roofline in GB/s [default: the datasheet's for the GPU --gpu
    /// names (H100 SXM 3350, H200 4800, ...), else the H100 SXM's]
    #[arg(long, value_name = "GBS")]
    pub bandwidth_gbs: Option<f64>,

    /// The GPU's name for the report (e.g. from nvidia-smi)
    #[arg(long, default_value = "unnamed GPU")]
    pub gpu: String,

    /// Only run, between cuProfilerStart and cuProfilerStop (for `ncu --profile-from-start
    /// off`), --steps eager batch-1 decode steps of the fast path (`decode`, the default), one
    /// Base vision encode (`vision`) or one Gundam 3x2 encode (`vision-gundam`); or (`trace`, no
    /// profiler needed) --steps batch-1 steps in the CUDA graph with the kernels' timeline
    /// probes, reported per launch; no peer, no report
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "decode", value_name = "WHAT")]
    pub profile: Option<ProfileTarget>,

    /// Write the JSON report here too
    #[arg(long, value_name = "FILE")]
    pub out_file: Option<PathBuf>,

    #[command(flatten)]
    pub out: OutputArgs,
}

/// What `--profile` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileTarget {
    Decode,
    Vision,
    /// one Gundam 3x2 vision encode (the tiles and the global view)
    VisionGundam,
    /// the batch-1 decode step's timeline in the CUDA graph (kernels with probes; no profiler)
    Trace,
}

pub fn run(a: BenchArgs) -> anyhow::Result<Exit> {
    let (bandwidth_gbs, bandwidth_source) = match (a.bandwidth_gbs, bench::hbm_bandwidth_gbs(&a.gpu)) {
        (Some(gbs), _) => (gbs, "--bandwidth-gbs".to_string()),
        (None, Some(gbs)) => (gbs, format!("the datasheet of {}", a.gpu)),
        (None, None) => {
            if a.profile.is_none() {
                eprintln!(
                    "bench: no bandwidth known for the GPU '{}': the roofline assumes the H100 SXM's 3350 GB/s (--gpu NAME or --bandwidth-gbs to say otherwise)",
                    a.gpu
                );
            }
            (3350.0, format!("the H100 SXM's (no bandwidth known for '{}')", a.gpu))
        }
    };
    if !(bandwidth_gbs.is_finite() && bandwidth_gbs > 0.0) {
        anyhow::bail!("--bandwidth-gbs must be a positive number of GB/s, not {bandwidth_gbs}");
    }
    let c = BenchConfig {
        model_dir: a.model_dir.clone(),
        remote_code: a.remote_code.clone(),
        peer_attn: a.peer_attn.clone(),
        python: a.python.clone(),
        peer_script: a.peer_script.clone(),
        peer_timeout: Duration::from_secs(a.peer_timeout_s),
        steps: a.steps,
        warmup_steps: 4,
        decode_runs: a.decode_runs.max(1),
        warmup: 2,
        repeat: a.repeat.max(1),
        batches: a.batches.clone(),
        max_t_b1: a.max_t,
        bandwidth_gbs,
        bandwidth_source,
    };
    if let Some(what) = a.profile {
        let v = profile_side(&c, what)?;
        print_json(&v)?;
        return Ok(Exit::Done);
    }
    let cfg = OcrConfig::from_file(&c.model_dir.join("config.json"))
        .and_then(|c| c.text())
        .with_context(|| {
            format!(
                "cannot read the model's config in {}; is --model-dir the checkpoint folder?",
                c.model_dir.display()
            )
        })?;
    // the peer first: its process is gone when the Rust side measures device memory
    let peers: Vec<_> = match &c.remote_code {
        Some(r) => c
            .peer_attn
            .iter()
            .map(|attn| bench::run_peer(&c, r, attn))
            .collect(),
        None => vec![],
    };
    if let Some(p) = &a.out_file {
        // kept if the Rust side fails
        let partial = serde_json::json!({"gpu": a.gpu, "peers": peers, "rust": null});
        std::fs::write(p, serde_json::to_string_pretty(&partial)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    let rust = rust_side(&c)?;
    let report = bench::report(&c, &cfg, &a.gpu, &rust, &peers);
    if let Some(p) = &a.out_file {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if a.out.json {
        print_json(&report)?;
    } else {
        print!("{}", bench::table(&report));
    }
    Ok(Exit::Done)
}

#[cfg(feature = "cuda")]
fn rust_side(c: &BenchConfig) -> anyhow::Result<serde_json::Value> {
    bench::rust::run(c)
}

#[cfg(feature = "cuda")]
fn profile_side(c: &BenchConfig, what: ProfileTarget) -> anyhow::Result<serde_json::Value> {
    match what {
        ProfileTarget::Decode => bench::rust::profile(c),
        ProfileTarget::Vision => bench::rust::profile_vision(c, false),
        ProfileTarget::VisionGundam => bench::rust::profile_vision(c, true),
        ProfileTarget::Trace => bench::rust::profile_trace(c),
    }
}

#[cfg(not(feature = "cuda"))]
fn profile_side(c: &BenchConfig, _: ProfileTarget) -> anyhow::Result<serde_json::Value> {
    rust_side(c)
}

#[cfg(not(feature = "cuda"))]
fn rust_side(_: &BenchConfig) -> anyhow::Result<serde_json::Value> {
    anyhow::bail!("this ocr-patch was built without the GPU path; rebuild with `cargo build --release --features cuda` on a machine with the CUDA toolkit")
}
