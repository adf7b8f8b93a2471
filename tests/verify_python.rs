//! `ocr-patch verify --against-python`: transformers itself, run by a Python subprocess on the
//! patched remote code, makes the goldens that the Rust model is then compared with.
//!
//! Ungated: its bad inputs (no interpreter, an interpreter without transformers, no remote
//! code, no cached snapshot), each a clear error with exit 2.
//!
//! Gated on `OCR_PATCH_UPSTREAM` (a folder holding DeepSeek-OCR's real remote code, never
//! committed) and `OCR_PATCH_PYTHON` (an interpreter with transformers and torch; its
//! `PYTHONPATH` is passed through), e.g.
//!
//!     PY=$(../shared/tools/tf-matrix.sh 5.4.0)
//!     OCR_PATCH_UPSTREAM=.upstream/hub OCR_PATCH_PYTHON=$PY \
//!       PYTHONPATH=~/.cache/tf-matrix/tf/5.4.0 cargo test --test verify_python
//!
//! the remote code is copied to a temp folder, patched with `ocr-patch apply --path`, and the
//! `cpu` config's tiny case runs through transformers and the Rust model (a few minutes on 2
//! cores).
#![cfg(feature = "model")]

use std::path::{Path, PathBuf};

use assert_cmd::Command;

const REMOTE_FILES: &[&str] = &[
    "modeling_deepseekocr.py",
    "modeling_deepseekv2.py",
    "deepencoder.py",
    "configuration_deepseek_v2.py",
    "conversation.py",
];

fn bin() -> Command {
    let mut c = Command::cargo_bin("ocr-patch").unwrap();
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// A folder with empty files of the remote code's names: enough to get past the file check.
fn fake_remote(dir: &Path) -> PathBuf {
    let r = dir.join("remote");
    std::fs::create_dir_all(&r).unwrap();
    for f in REMOTE_FILES {
        std::fs::write(r.join(f), "").unwrap();
    }
    r
}

fn fails_with(cmd: &mut Command, needle: &str) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn no_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let r = fake_remote(dir.path());
    fails_with(
        bin()
            .args([
                "verify",
                "--against-python",
                "--python",
                "/nonexistent/python3",
                "--remote-code",
            ])
            .arg(&r),
        "cannot run `/nonexistent/python3`",
    );
}

#[test]
fn interpreter_without_transformers() {
    // Whatever python3 has installed, this shim makes `import transformers` fail as it does
    // where the package is missing.
    let dir = tempfile::tempdir().unwrap();
    let r = fake_remote(dir.path());
    let shim = dir.path().join("shim");
    std::fs::create_dir_all(&shim).unwrap();
    std::fs::write(
        shim.join("transformers.py"),
        "raise ModuleNotFoundError(\"No module named 'transformers'\")\n",
    )
    .unwrap();
    std::fs::write(shim.join("torch.py"), "").unwrap();
    fails_with(
        bin().env("PYTHONPATH", &shim).args(["verify", "--against-python", "--python", "python3", "--remote-code"]).arg(&r),
        "cannot import transformers and torch (ModuleNotFoundError: No module named 'transformers')",
    );
}

#[test]
fn missing_remote_code() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(
        bin()
            .args(["verify", "--against-python", "--remote-code"])
            .arg(dir.path().join("nope")),
        "no such folder",
    );
    let r = fake_remote(dir.path());
    std::fs::remove_file(r.join("deepencoder.py")).unwrap();
    fails_with(
        bin()
            .args(["verify", "--against-python", "--remote-code"])
            .arg(&r),
        "no DeepSeek-OCR remote code here (deepencoder.py missing)",
    );
    // No --remote-code: the hub cache's snapshot, and this cache has none.
    let cache = dir.path().join("hub");
    std::fs::create_dir_all(&cache).unwrap();
    fails_with(
        bin()
            .args(["verify", "--against-python", "--cache-dir"])
            .arg(&cache),
        "no cached snapshot of deepseek-ai/DeepSeek-OCR",
    );
    // --golden and --against-python do not mix.
    fails_with(
        bin().args([
            "verify",
            "--against-python",
            "--golden",
            "golden/cpu-tiny.safetensors",
        ]),
        "leave out --golden",
    );
}

/// The real thing (gated): transformers on the patched real remote code against Rust.
#[test]
fn against_transformers_on_the_patched_real_code() {
    let (Some(upstream), Some(python)) = (
        std::env::var_os("OCR_PATCH_UPSTREAM"),
        std::env::var_os("OCR_PATCH_PYTHON"),
    ) else {
        eprintln!("skipped: set OCR_PATCH_UPSTREAM and OCR_PATCH_PYTHON (see the file's docs)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("remote");
    std::fs::create_dir_all(&r).unwrap();
    for f in REMOTE_FILES {
        std::fs::copy(Path::new(&upstream).join(f), r.join(f)).unwrap();
    }
    // Unpatched, on a transformers that needs the patch: refused before anything runs.
    fails_with(
        bin()
            .args(["verify", "--against-python", "--python"])
            .arg(&python)
            .arg("--remote-code")
            .arg(&r),
        "not patched",
    );
    bin().args(["apply", "--path"]).arg(&r).assert().success();
    let keep = dir.path().join("goldens");
    let out = bin()
        .args([
            "verify",
            "--against-python",
            "--configs",
            "cpu",
            "--cases",
            "tiny",
            "--verbose",
            "--python",
        ])
        .arg(&python)
        .arg("--remote-code")
        .arg(&r)
        .arg("--keep")
        .arg(&keep)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("verify: 2 goldens pass on cpu"), "{stdout}");
    assert!(
        stdout.contains("cpu-tiny.safetensors  (language golden"),
        "{stdout}"
    );
    assert!(stdout.contains("greedy.tokens"), "{stdout}");
    assert!(
        keep.join("goldens/cpu-tiny.safetensors").exists()
            && keep.join("goldens/vision-tiny.safetensors").exists()
    );
    // The goldens it made are the transformers of that interpreter, not the committed 4.46.3.
    assert!(
        !stdout.contains("transformers 4.46.3,") || stderr.contains("transformers 4.46.3 "),
        "{stdout}"
    );
}
