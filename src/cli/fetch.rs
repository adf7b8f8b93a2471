//! `ocr-patch fetch`: download a model repo's remote code into the hub cache, verify it against
//! the lock, then patch it, so that `from_pretrained` finds everything cached and patched.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::apply::{print_report, scan_and_apply, PatchArgs};
use super::{print_json, Exit, JsonReport, OutputArgs, ScanArgs, Summary};
use crate::cache::hub::{FetchRequest, Fetched, Hub, HubConfig};
use crate::cache::layout::Roots;

/// Download a model repo's remote code (`*.py`, `config.json`; every file with --all) at a
/// revision into the hub cache, in the layout huggingface_hub uses (blobs, snapshots, refs, its
/// lock files); check each file against the lock before anything is written; then patch it
/// (as `apply` does). Afterwards transformers finds the files cached and patched, online or
/// offline, and never imports an unpatched file.
///
/// Environment: HF_ENDPOINT (default https://huggingface.co; an `ocr-patch mirror` works),
/// HF_TOKEN (or $HF_HOME/token), HF_HUB_OFFLINE, HTTPS_PROXY / NO_PROXY, and the cache
/// variables `apply` reads.
#[derive(Debug, Clone, Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct FetchArgs {
    /// The model repo, `org/name` (e.g. deepseek-ai/DeepSeek-OCR)
    #[arg(value_name = "ORG/NAME")]
    pub repo: String,

    #[command(flatten)]
    pub hub: HubArgs,

    /// Hub cache to download into [default: $HF_HUB_CACHE, $HUGGINGFACE_HUB_CACHE or $HF_HOME/hub]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Modules cache to patch as well [default: $HF_MODULES_CACHE or $HF_HOME/modules]
    #[arg(long, value_name = "DIR")]
    pub modules_dir: Option<PathBuf>,

    /// Extra lock file of pinned upstream hashes; repeatable
    #[arg(long = "lock", value_name = "FILE")]
    pub locks: Vec<PathBuf>,

    /// Accept and patch remote code whose sha256 no lock pins
    #[arg(long)]
    pub allow_unpinned: bool,

    /// Download and verify only; do not patch
    #[arg(long)]
    pub no_patch: bool,

    #[command(flatten)]
    pub out: OutputArgs,
}

/// Flags shared by `fetch` and `apply --fetch`.
#[derive(Debug, Clone, Args)]
pub struct HubArgs {
    /// Branch, tag or commit to download
    #[arg(long, default_value = "main")]
    pub revision: String,

    /// Download every file of the repo (weights included), not only the remote code and config
    #[arg(long)]
    pub all: bool,

    /// Use only what the cache holds (as HF_HUB_OFFLINE=1): verify and patch, no network
    #[arg(long)]
    pub offline: bool,

    /// The Hub to download from [env: HF_ENDPOINT; default https://huggingface.co]
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
}

/// `$HF_HOME`, as huggingface_hub resolves it (for the token file).
fn hf_home() -> PathBuf {
    let get = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    get("HF_HOME").unwrap_or_else(|| {
        get("XDG_CACHE_HOME").or_else(|| get("HOME").map(|h| h.join(".cache"))).unwrap_or_else(|| PathBuf::from(".cache")).join("huggingface")
    })
}

/// The hub cache downloads go to: `--cache-dir`, else huggingface_hub's own.
pub fn download_dir(roots: &Roots, cache_dir: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match cache_dir.cloned().or_else(|| roots.hub.last().cloned()) {
        Some(d) => Ok(d),
        None => anyhow::bail!("no hub cache to download into; pass --cache-dir"),
    }
}

fn bytes_bar(json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    if let Ok(s) = ProgressStyle::with_template("{spinner} downloading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}") {
        pb.set_style(s.progress_chars("=> "));
    }
    pb
}

/// Downloads `repo` as `hub` says into `cache`; shared by `fetch` and `apply --fetch`.
pub fn prefetch(scan: &ScanArgs, hub: &HubArgs, repo: &str, allow_unpinned: bool, json: bool) -> anyhow::Result<Fetched> {
    let engine = scan.engine()?;
    let roots = scan.roots();
    let dir = download_dir(&roots, scan.cache_dir.as_ref())?;
    if !repo.contains('/') || repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
        anyhow::bail!("{repo}: not a repo id; pass it as org/name (e.g. deepseek-ai/DeepSeek-OCR)");
    }
    let mut cfg = HubConfig::from_env(|k| std::env::var(k).ok(), &hf_home());
    if hub.offline {
        cfg.offline = true;
    }
    if let Some(e) = &hub.endpoint {
        cfg.endpoint = e.trim_end_matches('/').to_string();
    }
    let client = Hub::new(cfg)?;
    let req = FetchRequest { repo: repo.to_string(), revision: hub.revision.clone(), all: hub.all, allow_unpinned };
    let pb = bytes_bar(json);
    let out = client.fetch(&dir, &engine, &req, &pb);
    pb.finish_and_clear();
    Ok(out?)
}

#[derive(Serialize)]
struct FetchJson<'a> {
    command: &'static str,
    fetch: &'a Fetched,
    #[serde(skip_serializing_if = "Option::is_none")]
    apply: Option<JsonReport<'a>>,
}

pub fn run(args: FetchArgs) -> anyhow::Result<Exit> {
    let scan = ScanArgs {
        cache_dir: args.cache_dir.clone(),
        modules_dir: args.modules_dir.clone(),
        paths: vec![],
        model: Some(args.repo.clone()),
        locks: args.locks.clone(),
    };
    let fetched = prefetch(&scan, &args.hub, &args.repo, args.allow_unpinned, args.out.json)?;
    // Patch what is now in the hub cache (and any module copy of it).
    let scan = ScanArgs { cache_dir: Some(fetched.snapshot.ancestors().nth(3).map(PathBuf::from).unwrap_or_default()), ..scan };
    let applied = if args.no_patch {
        None
    } else {
        let patch = PatchArgs { allow_unpinned: args.allow_unpinned, fork: None };
        Some(scan_and_apply(&scan, &patch, args.out.json, false, true)?)
    };
    if args.out.json {
        let apply = applied.as_ref().map(|(report, roots)| JsonReport {
            command: "apply",
            dry_run: false,
            roots,
            summary: Summary::of(report),
            targets: &report.targets,
        });
        print_json(&FetchJson { command: "fetch", fetch: &fetched, apply })?;
        return Ok(Exit::Done);
    }
    print_fetched(&fetched);
    if let Some((report, roots)) = &applied {
        print_report("apply", report, roots, false, false)?;
    }
    Ok(Exit::Done)
}

pub fn print_fetched(f: &Fetched) {
    let got = f.files.iter().filter(|x| x.downloaded).count();
    let how = if f.offline { "offline, from the cache" } else { "downloaded" };
    println!(
        "fetch: {}@{} (commit {}): {} file{}, {got} {how}, into {}",
        f.repo,
        f.revision,
        f.commit,
        f.files.len(),
        if f.files.len() == 1 { "" } else { "s" },
        f.snapshot.display()
    );
}
