//! `ocr-patch verify`: the Rust model against the goldens, stage by stage (wiring and output
//! only; the work is [`crate::verify`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{print_json, Exit, OutputArgs};
use crate::cache::layout::{self, RootOptions, Roots, TargetKind};
use crate::verify::{self, python, GoldenReport, Options, Perturbation, Report};

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
/// (tiny and base: about a minute on 2 cores); --all adds gundam (several minutes). GPU
/// summaries (golden/gpu/: the full-size model on an H100, bf16 and f32, kept as tokens, top-8
/// logits and norms) are checked with --golden and --device cuda.
///
/// Each golden's weights sha256 is checked first: the synthetic weights are hashed in memory,
/// --weights DIR is hashed as it is; a mismatch is refused (exit 2).
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

    /// Make the goldens now with transformers itself (a `--python` subprocess running our
    /// golden/generate.py on the patched remote code and the given or synthetic weights, CPU
    /// float32), then compare the Rust model with them. The config is the weights folder's
    /// config.json, else the one --configs names (cpu, mla, group, real or a path; default
    /// cpu); cases from --cases (default tiny)
    #[arg(long)]
    pub against_python: bool,

    /// With --against-python: the interpreter (it needs transformers and torch)
    #[arg(long, value_name = "PATH", default_value = "python3", requires = "against_python")]
    pub python: PathBuf,

    /// With --against-python: the folder holding DeepSeek-OCR's .py files [default: the
    /// --model snapshot in the hub cache]
    #[arg(long, value_name = "DIR", requires = "against_python")]
    pub remote_code: Option<PathBuf>,

    /// With --against-python and no --remote-code: the hub model whose cached snapshot to use
    #[arg(long, value_name = "ORG/NAME", default_value = "deepseek-ai/DeepSeek-OCR", requires = "against_python")]
    pub model: String,

    /// With --against-python and no --remote-code: the hub cache [default: $HF_HUB_CACHE,
    /// $HUGGINGFACE_HUB_CACHE or $HF_HOME/hub]
    #[arg(long, value_name = "DIR", requires = "against_python")]
    pub cache_dir: Option<PathBuf>,

    /// With --against-python and no --weights: the seed of the synthetic weights
    #[arg(long, default_value_t = 1, requires = "against_python")]
    pub seed: u64,

    /// With --against-python: keep the goldens (and the synthetic checkpoint) in this folder
    /// instead of a temporary one
    #[arg(long, value_name = "DIR", requires = "against_python")]
    pub keep: Option<PathBuf>,

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

/// The snapshot folder of `model` in the hub cache that holds the remote code.
fn cached_remote_code(args: &VerifyArgs) -> anyhow::Result<PathBuf> {
    let opts = RootOptions { cache_dir: args.cache_dir.clone(), modules_dir: None, paths: vec![] };
    let roots = Roots::resolve(&opts, |k| std::env::var_os(k));
    let found: Vec<PathBuf> = layout::discover(&roots, Some(&args.model), &|f: &str| f.ends_with(".py"))
        .into_iter()
        .filter(|t| t.kind == TargetKind::HubSnapshot && t.files.iter().any(|f| f == "modeling_deepseekocr.py"))
        .map(|t| t.dir)
        .collect();
    match found.as_slice() {
        [] => anyhow::bail!(
            "--against-python: no cached snapshot of {} with its remote code in {}; fetch it with \
             `ocr-patch fetch {}`, or pass --remote-code DIR",
            args.model,
            roots.hub.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            args.model
        ),
        [one] => Ok(one.clone()),
        many => anyhow::bail!(
            "--against-python: {} snapshots of {} are cached ({}); pick one with --remote-code DIR",
            many.len(),
            args.model,
            many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// `--against-python`: probe the interpreter, check the remote code, make the goldens.
fn python_goldens(args: &VerifyArgs, workdir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let remote_code = match &args.remote_code {
        Some(d) => d.clone(),
        None => cached_remote_code(args)?,
    };
    python::check_remote_files(&remote_code)?;
    let interpreter = python::probe(&args.python)?;
    python::check_patched(&remote_code, &interpreter.transformers)?;
    let config = match (&args.weights, args.configs.as_slice()) {
        (Some(w), []) => w.join("config.json"),
        (_, []) => golden_dir(args).join("configs").join("cpu.json"),
        (_, [c]) if c == "real" => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/deepseek-ocr/config.json"),
        (_, [c]) if c.ends_with(".json") => PathBuf::from(c),
        (_, [c]) => golden_dir(args).join("configs").join(format!("{c}.json")),
        (_, many) => anyhow::bail!("--against-python: one config at a time (--configs {})", many.join(",")),
    };
    if !config.is_file() {
        anyhow::bail!("{}: no such config; pass --configs cpu|mla|group|PATH", config.display());
    }
    let cases = if args.cases.is_empty() { vec!["tiny".to_string()] } else { args.cases.clone() };
    eprintln!(
        "verify: transformers {} (torch {}, {}) on {}, {} weights, cases {}; this takes minutes on a small CPU",
        interpreter.transformers,
        interpreter.torch,
        interpreter.python.display(),
        remote_code.display(),
        args.weights.as_ref().map_or_else(|| format!("synthetic (seed {})", args.seed), |w| w.display().to_string()),
        cases.join(",")
    );
    let opts = python::PythonOptions {
        interpreter,
        remote_code,
        config,
        weights: args.weights.clone(),
        seed: args.seed,
        cases,
        workdir: workdir.to_path_buf(),
    };
    let (goldens, _log) = python::make_goldens(&opts)?;
    Ok(goldens)
}

pub fn run(args: VerifyArgs) -> anyhow::Result<Exit> {
    let dev = device(&args.device)?;
    let mut _scratch = None;
    let goldens = if args.against_python {
        if !args.goldens.is_empty() {
            anyhow::bail!("--against-python makes its own goldens; leave out --golden");
        }
        let workdir = match &args.keep {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("{}: cannot create", d.display()))?;
                d.clone()
            }
            None => {
                let t = tempfile::Builder::new().prefix("ocrp-verify-py-").tempdir().context("cannot make a temp folder")?;
                let p = t.path().to_path_buf();
                _scratch = Some(t);
                p
            }
        };
        python_goldens(&args, &workdir)?
    } else if args.goldens.is_empty() {
        select(&args)?
    } else {
        args.goldens.clone()
    };
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
