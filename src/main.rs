//! The door: parse the arguments, run, print the whole error chain once, pick the exit code
//! (0 done / nothing to do, 1 changes pending, 2 error).

use std::process::ExitCode;

use clap::Parser;
use ocr_patch::cli::{Cli, Exit};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json();
    match cli.run() {
        Ok(Exit::Done) => ExitCode::from(0),
        Ok(Exit::Pending) => ExitCode::from(1),
        Err(err) => {
            let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
            for line in &chain {
                eprintln!("error: {line}");
            }
            if json {
                let v = serde_json::json!({ "error": chain.first(), "chain": chain });
                println!("{v}");
            }
            ExitCode::from(2)
        }
    }
}
