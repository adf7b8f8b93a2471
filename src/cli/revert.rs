//! `ocr-patch revert`: restore the original files and symlinks.

use clap::Args;

use super::apply::print_report;
use super::{progress, Exit, OutputArgs, ScanArgs};
use crate::cache::ops::{self, Options};

/// Restore every patched file to its original bytes: hub snapshot files become the same
/// symlink into `blobs/` again; module copies are restored from `.ocr-patch/` backups.
#[derive(Debug, Clone, Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct RevertArgs {
    #[command(flatten)]
    pub scan: ScanArgs,

    /// Restore files even if they changed after ocr-patch wrote them
    #[arg(long)]
    pub force: bool,

    /// Show what would be restored; write nothing
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub out: OutputArgs,
}

pub fn run(args: RevertArgs) -> anyhow::Result<Exit> {
    let engine = args.scan.engine()?;
    let roots = args.scan.roots();
    let targets = args.scan.targets(&roots, &|n| engine.targets(n))?;
    let opts = Options { force: args.force, ..Default::default() };
    let pb = progress(args.out.json, "reverting");
    let report = ops::revert(&engine, &targets, &opts, args.dry_run, &pb)?;
    pb.finish_and_clear();
    print_report("revert", &report, &roots, args.dry_run, args.out.json)?;
    Ok(Exit::Done)
}
