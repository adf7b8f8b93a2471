//! `ocr-patch lock`: pin a folder of upstream files (sha256 of each file and of our result).

use std::path::PathBuf;

use clap::Args;

use super::{Exit, ScanArgs};

/// Write a lock for the upstream files in a folder: the sha256 of each `.py` file and of our
/// patched result under the current rules. Use it with `--lock FILE` to patch files that the
/// built-in lock does not pin, or to regenerate `patches/lock.toml` after changing the rules.
#[derive(Debug, Clone, Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct LockArgs {
    /// Folder holding the original (unpatched) files
    #[arg(long, value_name = "DIR")]
    pub upstream: PathBuf,

    /// Where the files come from, recorded in each entry [default: the folder's name]
    #[arg(long, value_name = "NAME")]
    pub source: Option<String>,

    /// Write the lock here instead of stdout (atomically)
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Extra lock files (only for their pins; rarely needed)
    #[command(flatten)]
    pub scan: ScanArgs,
}

pub fn run(args: LockArgs) -> anyhow::Result<Exit> {
    let engine = args.scan.engine()?;
    let dir = &args.upstream;
    let rd = std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("{}: cannot list this folder ({e}); pass an existing folder to --upstream", dir.display()))?;
    let mut files = Vec::new();
    let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        let Some(name) = name.to_str().map(str::to_string) else { continue };
        if !name.ends_with(".py") {
            continue;
        }
        let bytes = crate::cache::fsx::read(&dir.join(&name))?;
        files.push((name, bytes));
    }
    if files.is_empty() {
        anyhow::bail!("{}: no .py files here; pass the folder that holds the model's remote code", dir.display());
    }
    let source = match &args.source {
        Some(s) => s.clone(),
        None => dir.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "local".into()),
    };
    let lock = engine.lock_for(&source, &files).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let text = lock.to_toml();
    match &args.out {
        Some(p) => crate::cache::fsx::replace_with_bytes(p, text.as_bytes(), None)?,
        None => print!("{text}"),
    }
    Ok(Exit::Done)
}
