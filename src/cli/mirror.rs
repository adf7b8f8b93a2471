//! `ocr-patch mirror`: serve a model folder on loopback with the Hub's download protocol.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::{Exit, OutputArgs, ScanArgs};
use crate::cache::mirror::{Faults, Mirror, MirrorOptions};

/// Serve a model folder on 127.0.0.1 with the Hugging Face Hub's download protocol (resolve
/// URLs with ETag / X-Repo-Commit, HEAD, Range, LFS redirects, the /api/models revision
/// endpoint). Point huggingface_hub, transformers or `ocr-patch fetch` at it with
/// `HF_ENDPOINT=http://127.0.0.1:PORT`: an air-gapped mirror of one model repo, pre-patched
/// with --patched. Runs until stopped (Ctrl-C).
#[derive(Debug, Clone, Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct MirrorArgs {
    /// The model folder to serve (config.json, *.py, weights), or a hub snapshot folder
    #[arg(long = "from", value_name = "DIR")]
    pub from: PathBuf,

    /// Port on 127.0.0.1 (0 picks a free one, printed on the first line)
    #[arg(long, default_value_t = 8090)]
    pub port: u16,

    /// Answer only for this repo id (`org/name`) [default: any repo id]
    #[arg(long, value_name = "ORG/NAME")]
    pub repo: Option<String>,

    /// The commit to announce [default: the folder's name for a hub snapshot, else a hash of
    /// the file list]
    #[arg(long, value_name = "HEX40")]
    pub commit: Option<String>,

    /// Serve our patched bytes for the files the rules patch (pinned files only, unless
    /// --allow-unpinned)
    #[arg(long)]
    pub patched: bool,

    /// With --patched: patch files no lock pins
    #[arg(long)]
    pub allow_unpinned: bool,

    /// Extra lock file of pinned upstream hashes (for --patched); repeatable
    #[arg(long = "lock", value_name = "FILE")]
    pub locks: Vec<PathBuf>,

    /// Files at least this many bytes are served as LFS files (302 to /lfs/<sha256>), as are
    /// weights (*.safetensors, *.bin, ...)
    #[arg(long, value_name = "BYTES", default_value_t = 10 << 20)]
    pub large_from: u64,

    /// Require `Authorization: Bearer TOKEN` (clients send $HF_TOKEN)
    #[arg(long, env = "OCR_PATCH_MIRROR_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Worker threads
    #[arg(long, default_value_t = 16)]
    pub threads: usize,

    /// Test knob: answer the first N requests of each resolve URL with 500
    #[arg(long, hide = true, default_value_t = 0)]
    pub fail_first: u32,

    /// Test knob: flip a byte of this file when serving it (ETag unchanged); repeatable
    #[arg(long, hide = true)]
    pub corrupt: Vec<String>,

    #[command(flatten)]
    pub out: OutputArgs,
}

pub fn run(args: MirrorArgs) -> anyhow::Result<Exit> {
    let scan = ScanArgs { cache_dir: None, modules_dir: None, paths: vec![], model: None, locks: args.locks.clone() };
    let engine = scan.engine()?;
    let opts = MirrorOptions {
        repo: args.repo.clone(),
        commit: args.commit.clone(),
        patched: args.patched,
        allow_unpinned: args.allow_unpinned,
        large_from: args.large_from,
        token: args.token.clone(),
        faults: Faults { fail_first: args.fail_first, corrupt: args.corrupt.clone() },
    };
    let mirror = Mirror::load(&args.from, &engine, &opts)?;
    let (commit, n, patched) = (mirror.commit.clone(), mirror.files.len(), mirror.files.values().filter(|f| f.patched).count());
    let handle = mirror.serve(args.port, args.threads)?;
    let endpoint = handle.endpoint();
    let mut out = std::io::stdout().lock();
    if args.out.json {
        let v = serde_json::json!({ "endpoint": endpoint, "port": handle.port, "commit": commit, "files": n, "patched": patched, "repo": args.repo });
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "serving {} ({n} files, {patched} patched, commit {commit}) on {endpoint}\nuse it with: HF_ENDPOINT={endpoint}",
            args.from.display()
        )?;
    }
    out.flush()?;
    drop(out);
    handle.wait();
    Ok(Exit::Done)
}
