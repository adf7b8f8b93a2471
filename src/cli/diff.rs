//! `ocr-patch diff`: the same as `apply --dry-run`.

use clap::Args;

use super::apply::{print_report, scan_and_apply, PatchArgs};
use super::{Exit, OutputArgs, ScanArgs};

/// Show a unified diff of what `apply` would change, without writing anything
/// (the same as `apply --dry-run`).
#[derive(Debug, Clone, Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct DiffArgs {
    #[command(flatten)]
    pub scan: ScanArgs,

    #[command(flatten)]
    pub patch: PatchArgs,

    #[command(flatten)]
    pub out: OutputArgs,
}

pub fn run(args: DiffArgs) -> anyhow::Result<Exit> {
    let (report, roots) = scan_and_apply(&args.scan, &args.patch, args.out.json, true, true)?;
    print_report("diff", &report, &roots, true, args.out.json)?;
    Ok(Exit::Done)
}
