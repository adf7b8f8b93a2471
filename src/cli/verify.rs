//! `ocr-patch verify`: the Rust model against the goldens, stage by stage (wiring and output
//! only; the work is [`crate::verify`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{print_json, Exit, OutputArgs};
use crate::verify::{self, GoldenReport, Options, Perturbation, Report};

pub const VERIFY_EXIT_CODES: &str = "\
Exit codes:
  0  every stage of every golden within its tolerance
  1  a mismatch: some stage of some golden is out of tolerance (the table names it)
  2  error: unreadable golden, weights that cannot be built, bad arguments

Tolerances and their reasons: README.md, section \"Verify\".";

/// Run the Rust DeepSeek-OCR on the goldens' inputs and compare it with the original remote
/// code's outputs (transformers 4.46.3, CPU, float32) stage by stage: SAM, CLIP, projector,
/// embeddings after the image merge, each decoder layer and its MoE routing, the final norm,
/// logits, and 32 greedy steps (teacher-forced with the golden's tokens).
///
/// With no --golden: the committed goldens of --golden-dir whose case is in the default set
/// (tiny and base: about a minute on 2 cores); --all adds gundam (several minutes).
#[derive(Debug, Clone, Args)]
#[command(after_help = VERIFY_EXIT_CODES)]
pub struct VerifyArgs {
    /// A golden file to check (language or vision); repeatable. A language golden brings its
    /// vision golden (same folder) along
    #[arg(long = "golden", value_name = "PATH")]
    pub goldens: Vec<PathBuf>,

    /// Folder of committed goldens used without --golden [default: ./golden, else the
    /// source tree's golden/]
    #[arg(long, value_name = "DIR")]
    pub golden_dir: Option<PathBuf>,

    /// Without --golden: every case, gundam (3x2 tiles + 1024 global view) included
    #[arg(long)]
    pub all: bool,

    /// Only these cases (tiny, base, gundam), comma-separated, without --golden
    #[arg(long, value_delimiter = ',', value_name = "CASES")]
    pub cases: Vec<String>,

    /// Only these configs (cpu, mla, group), comma-separated, without --golden
    #[arg(long, value_delimiter = ',', value_name = "CONFIGS")]
    pub configs: Vec<String>,

    /// Load this checkpoint folder (`*.safetensors`) instead of regenerating the goldens'
    /// synthetic weights
    #[arg(long, value_name = "DIR")]
    pub weights: Option<PathBuf>,

    /// Where the Rust model runs: cpu, or cuda[:N] (needs a build with --features cuda)
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,

    /// Run transformers itself through the current Python (not yet available)
    #[arg(long)]
    pub against_python: bool,

    /// Change the model on purpose to see verify fail: scale:TENSOR:FACTOR,
    /// swap:PREFIX_A:PREFIX_B (e.g. two SAM blocks), drop-image-newline; repeatable
    #[arg(long, value_name = "SPEC")]
    pub perturb: Vec<Perturbation>,

    /// Print every stage, not only the failing ones and the summary of each golden
    #[arg(long, short)]
    pub verbose: bool,

    #[command(flatten)]
    pub out: OutputArgs,
}

/// The cases run without --golden and without --all: what fits in about a minute on 2 cores.
pub const DEFAULT_CASES: &[&str] = &["tiny", "base"];

fn device(spec: &str) -> anyhow::Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().with_context(|| format!("--device {s}: expected cuda or cuda:N"))?,
                None => 0,
            };
            if !cfg!(feature = "cuda") {
                anyhow::bail!("--device {s}: built without cuda; rebuild with `cargo build --release --features cuda`");
            }
            candle_core::Device::new_cuda(ordinal).with_context(|| format!("--device {s}: cannot open the GPU"))
        }
        s => anyhow::bail!("--device {s}: expected cpu, cuda or cuda:N"),
    }
}

fn golden_dir(args: &VerifyArgs) -> PathBuf {
    if let Some(d) = &args.golden_dir {
        return d.clone();
    }
    let here = PathBuf::from("golden");
    if here.join("README.md").exists() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden")
}

/// The default set: language goldens `<config>-<case>` and vision goldens `vision-<case>`.
fn select(args: &VerifyArgs) -> anyhow::Result<Vec<PathBuf>> {
    let dir = golden_dir(args);
    let all = verify::goldens_in(&dir)?;
    let cases: Vec<String> = if !args.cases.is_empty() {
        args.cases.clone()
    } else if args.all {
        vec![]
    } else {
        DEFAULT_CASES.iter().map(|s| s.to_string()).collect()
    };
    let picked: Vec<PathBuf> = all
        .into_iter()
        .filter(|p| {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let Some((config, case)) = stem.split_once('-') else { return false };
            (cases.is_empty() || cases.iter().any(|c| c == case))
                && (args.configs.is_empty() || config == "vision" || args.configs.iter().any(|c| c == config))
        })
        .collect();
    if picked.is_empty() {
        anyhow::bail!("{}: no goldens match; check --golden-dir, --cases and --configs", dir.display());
    }
    Ok(picked)
}

pub fn run(args: VerifyArgs) -> anyhow::Result<Exit> {
    if args.against_python {
        anyhow::bail!(
            "--against-python: not yet available; compare with the committed goldens (no flag), \
             or regenerate them with golden/generate.py (golden/README.md)"
        );
    }
    let dev = device(&args.device)?;
    let goldens = if args.goldens.is_empty() { select(&args)? } else { args.goldens.clone() };
    let opts = Options { goldens, weights: args.weights.clone(), device: dev, perturb: args.perturb.clone() };
    let report = verify::verify(&opts)?;
    if args.out.json {
        print_json(&report)?;
    } else {
        print!("{}", render(&report, args.verbose));
    }
    Ok(if report.passed { Exit::Done } else { Exit::Pending })
}

fn num(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.1e}")
    }
}

fn header(g: &GoldenReport) -> String {
    let p = &g.provenance;
    format!(
        "{}  ({} golden, config {}, case {}; transformers {}, torch {}, {} {}; {})\n",
        g.golden,
        serde_json::to_value(g.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        g.config,
        g.case,
        p.transformers,
        p.torch,
        p.device,
        p.dtype,
        p.synth
    )
}

fn summary(g: &GoldenReport) -> String {
    let worst = g
        .stages
        .iter()
        .filter(|st| st.passed() && st.stage != "greedy.tokens")
        .map(|st| st.max_rel)
        .fold(0f64, |a, b| if b.is_nan() { a } else { a.max(b) });
    match &g.first_failure {
        None => format!(
            "  => pass: {} stages within tolerance (largest max rel {}), {:.1}s\n\n",
            g.stages.len(),
            num(worst),
            g.seconds
        ),
        Some(f) => format!("  => FAIL at stage `{f}`, {:.1}s\n\n", g.seconds),
    }
}

/// The text report: one table per golden (every stage with --verbose or when it fails), then
/// one summary line.
pub fn render(r: &Report, verbose: bool) -> String {
    let mut s = String::new();
    if !r.perturbations.is_empty() {
        s.push_str(&format!("perturbed on purpose: {}\n\n", r.perturbations.join(", ")));
    }
    for g in &r.goldens {
        s.push_str(&header(g));
        let show_all = verbose || !g.passed;
        let shown = |st: &crate::verify::Stage| {
            show_all || !st.passed() || st.stage.starts_with("greedy") || st.stage == "logits"
        };
        if !g.stages.iter().any(shown) {
            s.push_str(&summary(g));
            continue;
        }
        s.push_str(&format!(
            "  {:<22} {:>18} {:>9} {:>9} {:>9} {:>9} {:>11}  {}\n",
            "stage", "shape", "max abs", "max rel", "scale", "tol", "top-1", "verdict"
        ));
        for st in &g.stages {
            if !shown(st) {
                continue;
            }
            let shape = st.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
            let top1 = st.top1.map_or("-".to_string(), |(a, n)| format!("{a}/{n}"));
            let tol = if st.stage == "greedy.tokens" { "-".to_string() } else { num(st.tolerance.bound(st.ref_max)) };
            let (abs, rel) = if st.stage == "greedy.tokens" {
                ("-".to_string(), "-".to_string())
            } else {
                (num(st.max_abs), num(st.max_rel))
            };
            s.push_str(&format!(
                "  {:<22} {:>18} {:>9} {:>9} {:>9} {:>9} {:>11}  {}",
                st.stage,
                shape,
                abs,
                rel,
                num(st.ref_max),
                tol,
                top1,
                st.verdict.label()
            ));
            if let Some(n) = st.note.as_deref().filter(|_| show_all || !st.passed() || st.stage == "greedy.tokens") {
                s.push_str(&format!("  {n}"));
            }
            s.push('\n');
        }
        s.push_str(&summary(g));
    }
    let failed: Vec<&str> = r.goldens.iter().filter(|g| !g.passed).map(|g| g.golden.as_str()).collect();
    if failed.is_empty() {
        s.push_str(&format!("verify: {} goldens pass on {} ({})\n", r.goldens.len(), r.device, r.weights));
    } else {
        s.push_str(&format!("verify: {} of {} goldens FAIL: {}\n", failed.len(), r.goldens.len(), failed.join(", ")));
    }
    s
}
