//! `ocr-patch apply`: patch every DeepSeek-OCR remote-code file in the caches.

use std::path::PathBuf;

use clap::Args;

use super::{file_line, nothing_found, print_json, progress, verb, Exit, JsonReport, OutputArgs, ScanArgs, Summary};
use crate::cache::fork::{Fetcher, ForkSpec};
use crate::cache::ops::{self, Fork, Options, Report};

/// Patch the cached remote code in place (idempotent). Hub snapshot files, which are symlinks to
/// shared blobs, are replaced by patched regular files (the blob is kept as the backup); module
/// copies get a backup in `.ocr-patch/`. Each folder is locked and each file is swapped in by an
/// atomic rename, so a concurrent `from_pretrained` or a crash never sees a half-written file.
#[derive(Debug, Clone, Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub scan: ScanArgs,

    #[command(flatten)]
    pub patch: PatchArgs,

    /// Show a unified diff of what would change; write nothing
    #[arg(long)]
    pub dry_run: bool,

    /// First download the model's remote code into the hub cache (as `ocr-patch fetch`; needs
    /// --model), so that a cold cache is filled and patched before anything imports it
    #[arg(long, requires = "model")]
    pub fetch: bool,

    #[command(flatten)]
    pub hub: super::fetch::HubArgs,

    #[command(flatten)]
    pub out: OutputArgs,
}

/// Options shared by `apply`, `diff` and `check`.
#[derive(Debug, Clone, Args)]
pub struct PatchArgs {
    /// Patch files whose sha256 is not pinned in any lock (rules are applied where they match)
    #[arg(long)]
    pub allow_unpinned: bool,

    /// Take patched files from a pinned fork instead of our rules, for the files it lists: a TOML
    /// file with `url_template = "https://host/{repo}/{commit}/{file}"`, `commit = "..."`,
    /// optional `repo = "org/name"`, and `[files] "name.py" = "<sha256>"`. Every download is
    /// checked against its sha256 before anything is written.
    #[arg(long, value_name = "FORK.toml")]
    pub fork: Option<PathBuf>,
}

impl PatchArgs {
    pub fn load_fork(&self) -> anyhow::Result<Option<Fork>> {
        match &self.fork {
            None => Ok(None),
            Some(p) => Ok(Some(Fork { spec: ForkSpec::load(p)?, fetcher: Fetcher::new()? })),
        }
    }
}

/// Shared by `apply`, `diff` and `check`: scan, plan (and write unless `dry_run`).
pub(super) fn scan_and_apply(
    scan: &ScanArgs,
    patch: &PatchArgs,
    json: bool,
    dry_run: bool,
    write: bool,
) -> anyhow::Result<(Report, crate::cache::layout::Roots)> {
    let engine = scan.engine()?;
    let fork = patch.load_fork()?;
    let roots = scan.roots();
    let is_target = |n: &str| engine.targets(n) || fork.as_ref().is_some_and(|f| f.spec.pin(n).is_some());
    let targets = scan.targets(&roots, &is_target)?;
    let opts = Options { allow_unpinned: patch.allow_unpinned, force: false, fork: fork.as_ref() };
    let pb = progress(json, if write { "patching" } else { "checking" });
    let report = if write {
        ops::apply(&engine, &targets, &opts, dry_run, &pb)?
    } else {
        ops::check(&engine, &targets, &opts, &pb)?
    };
    pb.finish_and_clear();
    Ok((report, roots))
}

pub fn run(args: ApplyArgs) -> anyhow::Result<Exit> {
    if args.fetch {
        let repo = args.scan.model.clone().unwrap_or_default();
        let fetched = super::fetch::prefetch(&args.scan, &args.hub, &repo, args.patch.allow_unpinned, args.out.json)?;
        if !args.out.json {
            super::fetch::print_fetched(&fetched);
        }
    }
    let (report, roots) = scan_and_apply(&args.scan, &args.patch, args.out.json, args.dry_run, true)?;
    print_report("apply", &report, &roots, args.dry_run, args.out.json)?;
    Ok(Exit::Done)
}

pub(super) fn print_report(
    command: &'static str,
    report: &Report,
    roots: &crate::cache::layout::Roots,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let summary = Summary::of(report);
    if json {
        return print_json(&JsonReport { command, dry_run, roots, summary, targets: &report.targets });
    }
    if report.targets.is_empty() {
        println!("{}", nothing_found(roots));
        return Ok(());
    }
    for f in report.files() {
        if let Some(d) = &f.diff {
            print!("{d}");
        }
    }
    for f in report.files() {
        println!("{}", file_line(verb(f.action, dry_run), f));
    }
    let mut parts = Vec::new();
    let (p, r) = (summary.patch, summary.revert);
    if command == "revert" {
        parts.push(format!("{r} {}", if dry_run { "to revert" } else { "reverted" }));
        parts.push(format!("{} already original", summary.already_original));
    } else {
        parts.push(format!("{p} {}", if dry_run { "to patch" } else { "patched" }));
        parts.push(format!("{} already patched", summary.already_patched));
    }
    if summary.not_targeted > 0 {
        parts.push(format!("{} not targeted", summary.not_targeted));
    }
    println!("{}: {} in {} folder{}", command, parts.join(", "), summary.folders, if summary.folders == 1 { "" } else { "s" });
    Ok(())
}
