//! `ocr-patch-synth --config CONFIG --seed N -o model.safetensors [--dtype bf16|f32]`: deterministic
//! synthetic weights for a DeepSeek-OCR config (see `ocr_patch::model::synth`). A stand-in for
//! the `ocr-patch synth` subcommand until the CLI takes it over; it only wires arguments.
//!
//! Exit codes: 0 written, 2 error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use ocr_patch::model::synth::{self, DType};

/// Write deterministic synthetic weights (real tensor names and shapes) for a DeepSeek-OCR config.
///
/// Exit codes: 0 written, 2 error.
#[derive(Parser, Debug)]
#[command(name = "ocr-patch-synth", version)]
struct Args {
    /// The model's config.json.
    #[arg(long)]
    config: PathBuf,
    /// Seed of the generator: the same seed gives the same bytes everywhere.
    #[arg(long, required_unless_present = "list")]
    seed: Option<u64>,
    /// Where to write the .safetensors file (replaced atomically).
    #[arg(short = 'o', long = "output", required_unless_present = "list")]
    output: Option<PathBuf>,
    /// Print the plan (name, shape, initialiser; one tensor a line) instead of writing.
    #[arg(long)]
    list: bool,
    /// Element type: bf16 (the checkpoint's) or f32.
    #[arg(long, default_value = "bf16")]
    dtype: DType,
}

fn run(args: &Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("{}: cannot read the config", args.config.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", args.config.display()))?;
    if args.list {
        let specs = synth::plan(&config).with_context(|| format!("{}", args.config.display()))?;
        for s in specs {
            println!("{}\t{:?}\t{:?}", s.name, s.shape, s.init);
        }
        return Ok(());
    }
    let (Some(output), Some(seed)) = (&args.output, args.seed) else {
        anyhow::bail!("nothing to write; pass -o FILE and --seed N");
    };
    let t = Instant::now();
    let s = synth::write_safetensors(output, &config, seed, args.dtype)
        .with_context(|| format!("{}: cannot write synthetic weights", output.display()))?;
    println!(
        "{}: {} tensors, {} params, {} bytes, {} seed {}, {:.2}s ({})",
        output.display(),
        s.tensors,
        s.params,
        s.bytes,
        args.dtype,
        seed,
        t.elapsed().as_secs_f64(),
        synth::ALGORITHM
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
