//! The door: argument parsing and output. One args struct per subcommand; each `run` only wires
//! flags to [`crate::cache`] and [`crate::patch`] and prints the result (text or `--json`).
//!
//! Must not hold logic: no file-system decisions, no rule decisions.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::cache::layout::{self, Roots, RootOptions, Target};
use crate::cache::ops::{Action, FileReport, Report, TargetReport};
use crate::patch::{Engine, Lock};

pub mod apply;
#[cfg(feature = "model")]
pub mod bench;
pub mod check;
pub mod diff;
pub mod doctor;
pub mod fetch;
pub mod hook;
pub mod lock;
pub mod mirror;
#[cfg(feature = "model")]
pub mod ocr;
pub mod revert;
#[cfg(feature = "serve")]
pub mod serve;
#[cfg(feature = "model")]
pub mod verify;

pub const EXIT_CODES: &str = "\
Exit codes:
  0  done, or nothing to do
  1  changes pending (`check` found files that need patching)
  2  error (nothing was changed unless the message says otherwise)";

/// Makes DeepSeek-OCR's Hugging Face remote code run correctly on every transformers release
/// from 4.46.3 on, by patching the cached copies in place (hub snapshots and
/// transformers_modules), atomically and reversibly.
#[derive(Debug, Parser)]
#[command(name = "ocr-patch", version, after_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Apply(apply::ApplyArgs),
    Check(check::CheckArgs),
    Diff(diff::DiffArgs),
    Revert(revert::RevertArgs),
    Doctor(doctor::DoctorArgs),
    Lock(lock::LockArgs),
    Fetch(fetch::FetchArgs),
    Mirror(mirror::MirrorArgs),
    Hook(hook::HookArgs),
    #[cfg(feature = "model")]
    Verify(verify::VerifyArgs),
    #[cfg(feature = "model")]
    Ocr(ocr::OcrArgs),
    #[cfg(feature = "model")]
    Bench(bench::BenchArgs),
    #[cfg(feature = "serve")]
    Serve(serve::ServeArgs),
}

/// What a command ends with; `main` turns it into the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Done = 0,
    Pending = 1,
}

impl Cli {
    pub fn json(&self) -> bool {
        match &self.command {
            Command::Apply(a) => a.out.json,
            Command::Check(a) => a.out.json,
            Command::Diff(a) => a.out.json,
            Command::Revert(a) => a.out.json,
            Command::Doctor(a) => a.out.json,
            Command::Lock(_) => false,
            Command::Fetch(a) => a.out.json,
            Command::Mirror(a) => a.out.json,
            Command::Hook(a) => a.json(),
            #[cfg(feature = "model")]
            Command::Verify(a) => a.out.json,
            #[cfg(feature = "model")]
            Command::Ocr(a) => a.out.json,
            #[cfg(feature = "model")]
            Command::Bench(a) => a.out.json,
            #[cfg(feature = "serve")]
            Command::Serve(_) => false,
        }
    }

    pub fn run(self) -> anyhow::Result<Exit> {
        match self.command {
            Command::Apply(a) => apply::run(a),
            Command::Check(a) => check::run(a),
            Command::Diff(a) => diff::run(a),
            Command::Revert(a) => revert::run(a),
            Command::Doctor(a) => doctor::run(a),
            Command::Lock(a) => lock::run(a),
            Command::Fetch(a) => fetch::run(a),
            Command::Mirror(a) => mirror::run(a),
            Command::Hook(a) => hook::run(a),
            #[cfg(feature = "model")]
            Command::Verify(a) => verify::run(a),
            #[cfg(feature = "model")]
            Command::Ocr(a) => ocr::run(a),
            #[cfg(feature = "model")]
            Command::Bench(a) => bench::run(a),
            #[cfg(feature = "serve")]
            Command::Serve(a) => serve::run(a),
        }
    }
}

/// Where to look, and which rules and pins to use.
#[derive(Debug, Clone, Args)]
pub struct ScanArgs {
    /// Hub cache to scan (the folder holding `models--*`) [default: $HF_HUB_CACHE,
    /// $HUGGINGFACE_HUB_CACHE, $TRANSFORMERS_CACHE or $HF_HOME/hub]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Modules cache to scan (the folder holding `transformers_modules/`)
    /// [default: $HF_MODULES_CACHE or $HF_HOME/modules]
    #[arg(long, value_name = "DIR")]
    pub modules_dir: Option<PathBuf>,

    /// Scan this plain folder (e.g. a local model folder) instead of the caches; repeatable
    #[arg(long = "path", value_name = "DIR")]
    pub paths: Vec<PathBuf>,

    /// Only this model (`org/name`, e.g. deepseek-ai/DeepSeek-OCR) [default: every remote-code
    /// folder whose files the rules recognise]
    #[arg(long, value_name = "ORG/NAME")]
    pub model: Option<String>,

    /// Extra lock file of pinned upstream hashes, added to the built-in one; repeatable
    #[arg(long = "lock", value_name = "FILE")]
    pub locks: Vec<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Print a JSON report on stdout instead of text (no progress bar)
    #[arg(long)]
    pub json: bool,
}

impl ScanArgs {
    pub fn engine(&self) -> anyhow::Result<Engine> {
        let mut engine = Engine::embedded().context("the built-in rules do not load; this is a bug, please report it")?;
        for path in &self.locks {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: cannot read this lock file ({e}); check the path given to --lock", path.display()))?;
            let lock = Lock::parse(&text, &path.display().to_string())?;
            engine = engine.with_lock(lock);
        }
        Ok(engine)
    }

    pub fn roots(&self) -> Roots {
        let opts = RootOptions { cache_dir: self.cache_dir.clone(), modules_dir: self.modules_dir.clone(), paths: self.paths.clone() };
        Roots::resolve(&opts, |k| std::env::var_os(k))
    }

    pub fn targets(&self, roots: &Roots, is_target: &dyn Fn(&str) -> bool) -> anyhow::Result<Vec<Target>> {
        for p in &roots.paths {
            if !p.is_dir() {
                anyhow::bail!("{}: not a folder; pass an existing folder to --path", p.display());
            }
        }
        for p in self.cache_dir.iter().chain(self.modules_dir.iter()) {
            if !p.is_dir() {
                anyhow::bail!("{}: not a folder; check --cache-dir / --modules-dir", p.display());
            }
        }
        Ok(layout::discover(roots, self.model.as_deref(), is_target))
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal or output is JSON.
pub fn progress(json: bool, what: &str) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} {wide_msg}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(what.to_string());
    pb
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let s = serde_json::to_string_pretty(value).context("cannot encode the JSON report; this is a bug, please report it")?;
    println!("{s}");
    Ok(())
}

#[derive(Serialize)]
pub struct JsonReport<'a> {
    pub command: &'static str,
    pub dry_run: bool,
    pub roots: &'a Roots,
    pub summary: Summary,
    pub targets: &'a [TargetReport],
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub folders: usize,
    pub files: usize,
    pub patch: usize,
    pub already_patched: usize,
    pub revert: usize,
    pub already_original: usize,
    pub not_targeted: usize,
}

impl Summary {
    pub fn of(r: &Report) -> Summary {
        Summary {
            folders: r.targets.len(),
            files: r.files().count(),
            patch: r.count(Action::Patch),
            already_patched: r.count(Action::AlreadyPatched),
            revert: r.count(Action::Revert),
            already_original: r.count(Action::AlreadyOriginal),
            not_targeted: r.count(Action::NotTargeted),
        }
    }
}

/// "nothing found" text, naming where we looked.
pub fn nothing_found(roots: &Roots) -> String {
    let all: Vec<String> = roots
        .paths
        .iter()
        .chain(roots.hub.iter())
        .chain(roots.modules.iter())
        .map(|p| p.display().to_string())
        .collect();
    format!("no DeepSeek-OCR remote code found in {}", all.join(", "))
}

/// One line per file: `<verb padded>  <path>  (<details>)`.
pub fn file_line(verb: &str, f: &FileReport) -> String {
    let mut details = Vec::new();
    if !f.applied.is_empty() {
        details.push(format!("{} rule{}", f.applied.len(), if f.applied.len() == 1 { "" } else { "s" }));
    }
    if !f.unmatched.is_empty() {
        details.push(format!("{} rules did not match: {}", f.unmatched.len(), f.unmatched.join(", ")));
    }
    if f.pinned == Some(false) {
        details.push("unpinned".into());
    }
    if let Some(s) = f.source.as_deref().filter(|s| *s != "rules") {
        details.push(format!("from {s}"));
    }
    let d = if details.is_empty() { String::new() } else { format!("  ({})", details.join(", ")) };
    format!("{verb:<16} {}{d}", f.path.display())
}

pub fn verb(a: Action, dry_run: bool) -> &'static str {
    match (a, dry_run) {
        (Action::Patch, false) => "patched",
        (Action::Patch, true) => "would patch",
        (Action::AlreadyPatched, _) => "already patched",
        (Action::NotTargeted, _) => "not targeted",
        (Action::Revert, false) => "reverted",
        (Action::Revert, true) => "would revert",
        (Action::AlreadyOriginal, _) => "original",
    }
}
