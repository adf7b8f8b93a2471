//! The PyO3 module `ocr_patch._native`: a thin face over [`crate::cache::guard`] and the engine,
//! for the import hook in `python/ocr_patch/hook.py`. Built only with the `python` feature
//! (maturin sets it; see pyproject.toml).
//!
//! The engine (rules + pins) is built once per process, at the first guarded file. Extra pins
//! come from `OCR_PATCH_LOCK` (lock files separated by `:`), as `--lock` gives them to the CLI;
//! `OCR_PATCH_ALLOW_UNPINNED=1` is `--allow-unpinned`.
//! Our own file I/O happens in Rust and raises no Python audit event, so the hook never sees it.
//! Must not hold logic: everything is asked of `cache` and `patch`.

use std::path::Path;
use std::sync::OnceLock;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::cache::guard::{guard_file, Guarded};
use crate::patch::{Engine, Lock};

static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();

fn build_engine() -> Result<Engine, String> {
    let mut engine = Engine::embedded().map_err(|e| format!("the built-in rules do not load ({e}); this is a bug, please report it"))?;
    if let Some(list) = std::env::var_os("OCR_PATCH_LOCK") {
        for p in std::env::split_paths(&list).filter(|p| !p.as_os_str().is_empty()) {
            let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: cannot read this lock file ({e}); fix OCR_PATCH_LOCK", p.display()))?;
            let lock = Lock::parse(&text, &p.display().to_string()).map_err(|e| e.to_string())?;
            engine = engine.with_lock(lock);
        }
    }
    Ok(engine)
}

fn engine() -> PyResult<&'static Engine> {
    ENGINE.get_or_init(build_engine).as_ref().map_err(|e| PyRuntimeError::new_err(e.clone()))
}

fn allow_unpinned() -> bool {
    std::env::var("OCR_PATCH_ALLOW_UNPINNED").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes" | "on"))
}

/// Patches `path` if it is a targeted remote-code file in a hub snapshot or a
/// transformers_modules copy. Returns "patched", "already-patched", "not-targeted" or
/// "outside"; raises RuntimeError with a message saying what to do when it cannot.
#[pyfunction]
fn guard(py: Python<'_>, path: &str) -> PyResult<&'static str> {
    let engine = engine()?;
    let unpinned = allow_unpinned();
    let out = py.allow_threads(|| guard_file(engine, Path::new(path), unpinned)).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok(match out {
        Guarded::Patched => "patched",
        Guarded::AlreadyPatched => "already-patched",
        Guarded::NotTargeted => "not-targeted",
        Guarded::Outside => "outside",
    })
}

/// The file names the rules patch (the hook's cheap path filter).
#[pyfunction]
fn targets() -> PyResult<Vec<String>> {
    let engine = engine()?;
    let mut names: Vec<String> = engine.lock.files.iter().filter(|e| e.patched.is_some() && engine.targets(&e.name)).map(|e| e.name.clone()).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("RULESET", crate::patch::rules_sha256())?;
    m.add_function(wrap_pyfunction!(guard, m)?)?;
    m.add_function(wrap_pyfunction!(targets, m)?)?;
    Ok(())
}
