//! `ocr-patch check`: does anything need patching? (exit 1 if so).

use clap::Args;

use super::apply::{print_report, scan_and_apply, PatchArgs};
use super::{Exit, OutputArgs, ScanArgs};

/// Report which cached files still need patching, without writing anything. Exits 1 when
/// something needs patching, 0 when everything is patched (or nothing was found), 2 on error
/// (e.g. a file whose hash is not pinned: pass --allow-unpinned to count it as pending).
#[derive(Debug, Clone, Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct CheckArgs {
    #[command(flatten)]
    pub scan: ScanArgs,

    #[command(flatten)]
    pub patch: PatchArgs,

    #[command(flatten)]
    pub out: OutputArgs,
}

pub fn run(args: CheckArgs) -> anyhow::Result<Exit> {
    let (report, roots) = scan_and_apply(&args.scan, &args.patch, args.out.json, true, false)?;
    print_report("check", &report, &roots, true, args.out.json)?;
    Ok(if report.changes() > 0 { Exit::Pending } else { Exit::Done })
}
