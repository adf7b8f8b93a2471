//! `verify --against-python`: makes goldens on the spot with transformers itself, through a
//! Python interpreter of the user's environment (a subprocess running our own
//! `golden/generate.py`, embedded in the binary), on a remote-code folder (normally the hub
//! snapshot that `ocr-patch apply` patched) and the given or synthetic weights. The verifier
//! then compares the Rust model with those goldens exactly as with the committed ones.
//!
//! Owns: checking the interpreter (transformers and torch importable), the remote-code folder
//! (present, and patched where the installed transformers needs it), writing the synthetic
//! checkpoint when no weights are given, and running the script. Prints nothing itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::VerifyError;
use crate::model::synth;
use crate::patch::{Engine, Status};

/// Our golden generator, carried in the binary so that it runs outside the repository.
pub const GENERATE_PY: &str = include_str!("../../golden/generate.py");

/// The remote code's files the generator needs.
pub const REMOTE_FILES: &[&str] = &[
    "modeling_deepseekocr.py",
    "modeling_deepseekv2.py",
    "deepencoder.py",
    "configuration_deepseek_v2.py",
    "conversation.py",
];

/// What the interpreter reports.
#[derive(Debug, Clone)]
pub struct Interpreter {
    pub python: PathBuf,
    pub transformers: String,
    pub torch: String,
}

/// Runs `python -c 'import torch, transformers'` and reads their versions.
pub fn probe(python: &Path) -> Result<Interpreter, VerifyError> {
    let code = "import json, torch, transformers; \
                print(json.dumps([transformers.__version__, torch.__version__]))";
    let out = Command::new(python)
        .args(["-c", code])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            VerifyError::Python(format!(
                "cannot run `{}` ({e}); pass --python PATH to an interpreter that has transformers and torch",
                python.display()
            ))
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(VerifyError::Python(format!(
            "`{}` cannot import transformers and torch ({last}); install them in that environment \
             (pip install transformers torch) or pass --python PATH",
            python.display()
        )));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Vec<String> = line
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            VerifyError::Python(format!(
                "`{}` printed no versions: {line}",
                python.display()
            ))
        })?;
    Ok(Interpreter {
        python: python.to_path_buf(),
        transformers: v.first().cloned().unwrap_or_default(),
        torch: v.get(1).cloned().unwrap_or_default(),
    })
}

/// `major.minor` of a version string (`4.46.3`, `5.4.0.dev0`).
fn major_minor(v: &str) -> (u64, u64) {
    let mut it = v.split('.').map(|p| {
        p.chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap_or(0)
    });
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// The remote-code folder must hold the model's files.
pub fn check_remote_files(dir: &Path) -> Result<(), VerifyError> {
    if !dir.is_dir() {
        return Err(VerifyError::Python(format!(
            "{}: no such folder; pass --remote-code DIR (a folder with DeepSeek-OCR's .py files), \
             or fetch them with `ocr-patch fetch deepseek-ai/DeepSeek-OCR`",
            dir.display()
        )));
    }
    let missing: Vec<&str> = REMOTE_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(VerifyError::Python(format!(
            "{}: no DeepSeek-OCR remote code here ({} missing); pass --remote-code DIR, or fetch it with \
             `ocr-patch fetch deepseek-ai/DeepSeek-OCR`",
            dir.display(),
            missing.join(", ")
        )));
    }
    Ok(())
}

/// On transformers 4.48 and later (where the original code breaks) the remote code must be
/// ours: patched by `ocr-patch apply`.
pub fn check_patched(dir: &Path, transformers: &str) -> Result<(), VerifyError> {
    if major_minor(transformers) < (4, 48) {
        return Ok(()); // the original code runs as it is
    }
    let engine = Engine::embedded().map_err(|e| VerifyError::Python(e.to_string()))?;
    let mut unpatched = Vec::new();
    for f in REMOTE_FILES.iter().filter(|f| engine.targets(f)) {
        let bytes = std::fs::read(dir.join(f)).map_err(|e| {
            VerifyError::Python(format!("{}: cannot read ({e})", dir.join(f).display()))
        })?;
        if matches!(
            engine.classify(f, &bytes),
            Status::Original(_) | Status::Unknown
        ) {
            unpatched.push(*f);
        }
    }
    if !unpatched.is_empty() {
        return Err(VerifyError::Python(format!(
            "{}: {} not patched, and transformers {transformers} needs the patch; run `ocr-patch apply --path {}` first",
            dir.display(),
            unpatched.join(", "),
            dir.display()
        )));
    }
    Ok(())
}

/// One `--against-python` run.
pub struct PythonOptions {
    pub interpreter: Interpreter,
    pub remote_code: PathBuf,
    /// The config (`config.json` of the weights folder, or a golden config).
    pub config: PathBuf,
    /// A checkpoint folder, or `None` for synthetic weights (`seed`, bf16) written to `workdir`.
    pub weights: Option<PathBuf>,
    pub seed: u64,
    pub cases: Vec<String>,
    /// Scratch folder: the script, the synthetic checkpoint, the goldens.
    pub workdir: PathBuf,
}

/// Writes the weights if needed, runs `generate.py`, and returns the goldens it wrote
/// (language goldens first, then vision) and the script's output.
pub fn make_goldens(o: &PythonOptions) -> Result<(Vec<PathBuf>, String), VerifyError> {
    let io = |p: &Path, e: std::io::Error| VerifyError::Python(format!("{}: {e}", p.display()));
    let config: Value = std::fs::read(&o.config)
        .map_err(|e| io(&o.config, e))
        .and_then(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| VerifyError::Python(format!("{}: not JSON ({e})", o.config.display())))
        })?;
    let weights = match &o.weights {
        Some(d) => d.clone(),
        None => {
            let dir = o.workdir.join("weights");
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            let f = dir.join("model.safetensors");
            synth::write_safetensors(&f, &config, o.seed, synth::DType::Bf16)
                .map_err(|e| VerifyError::Weights(e.to_string()))?;
            dir
        }
    };
    let script = o.workdir.join("generate.py");
    std::fs::write(&script, GENERATE_PY).map_err(|e| io(&script, e))?;
    let out_dir = o.workdir.join("goldens");
    std::fs::create_dir_all(&out_dir).map_err(|e| io(&out_dir, e))?;
    let name = o
        .config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config".into());
    // A name without a dash: the golden file names are `<config>-<case>`.
    let name = if name == "config" {
        "python".to_string()
    } else {
        name.replace('-', "_")
    };
    let cfg_copy = o.workdir.join(format!("{name}.json"));
    std::fs::copy(&o.config, &cfg_copy).map_err(|e| io(&cfg_copy, e))?;
    let out = Command::new(&o.interpreter.python)
        .arg(&script)
        .arg("--remote-code")
        .arg(&o.remote_code)
        .arg("--config")
        .arg(&cfg_copy)
        .arg("--weights")
        .arg(&weights)
        .arg("--cases")
        .arg(o.cases.join(","))
        .arg("--out")
        .arg(&out_dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            VerifyError::Python(format!(
                "cannot run `{}` ({e})",
                o.interpreter.python.display()
            ))
        })?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(VerifyError::Python(format!(
            "transformers {} failed on {} (exit {}):\n{}\ncheck that the remote code is patched (`ocr-patch apply --path DIR`) and fits the weights",
            o.interpreter.transformers,
            o.remote_code.display(),
            out.status.code().map_or("signal".into(), |c| c.to_string()),
            tail.join("\n")
        )));
    }
    let mut goldens: Vec<PathBuf> = o
        .cases
        .iter()
        .map(|c| out_dir.join(format!("{name}-{c}.safetensors")))
        .collect();
    if let Some(p) = goldens.iter().find(|p| !p.exists()) {
        return Err(VerifyError::Python(format!(
            "the script wrote no {}:\n{log}",
            p.display()
        )));
    }
    goldens.sort();
    Ok((goldens, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_major_minor() {
        assert!(major_minor("4.46.3") < (4, 48));
        assert!(major_minor("4.48.0") >= (4, 48));
        assert_eq!(major_minor("5.4.0.dev0"), (5, 4));
    }
}
