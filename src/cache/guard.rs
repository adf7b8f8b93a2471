//! The runtime guard's cache side: patch one remote-code file at the moment Python first opens
//! it (called by the import hook, `src/hook.rs`), with the same locks and atomic writes as
//! `ocr-patch apply`.
//!
//! A file is guarded only where transformers keeps remote code: a hub snapshot
//! (`models--org--name/snapshots/<commit>/`) or a copy under `transformers_modules/`. A user's
//! own model folder is never written (its copy in `transformers_modules/` is what gets executed,
//! and that copy is patched when it is read).
//!
//! For a snapshot file that is still huggingface_hub's symlink, huggingface_hub's download lock
//! `.locks/models--org--name/<etag>.lock` is held while patching: huggingface_hub creates the
//! symlink under that lock after checking that the file is missing, so a concurrent download in
//! another process can never put the unpatched symlink back over our patched file.
//! Must not touch: rule logic (asked of the engine through [`super::ops`]).

use std::path::{Component, Path};

use indicatif::ProgressBar;
use serde::Serialize;

use super::error::{CacheError, Result};
use super::hub::{hf_lock_path, HfLock};
use super::layout::{desanitize, Target, TargetKind};
use super::ops::{self, Action, Options};
use crate::patch::Engine;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Guarded {
    /// We wrote the patched bytes.
    Patched,
    /// Already our result (or patched by another process meanwhile).
    AlreadyPatched,
    /// No rule targets this file name.
    NotTargeted,
    /// Not in a hub snapshot nor in transformers_modules: left alone.
    Outside,
}

/// Where `path` sits: its target folder description, or `None` outside the caches.
pub fn target_of(path: &Path, file: &str) -> Option<(Target, Option<std::path::PathBuf>)> {
    let dir = path.parent()?.to_path_buf();
    let parts: Vec<String> = dir
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let n = parts.len();
    // .../models--org--name/snapshots/<commit>/[sub/]file
    if let Some(i) = parts.iter().rposition(|p| p == "snapshots") {
        if i >= 1 && i + 1 < n && parts[i - 1].starts_with("models--") {
            let model = parts[i - 1]["models--".len()..].replacen("--", "/", 1);
            let hub = dir.ancestors().nth(n - i + 1).map(Path::to_path_buf);
            let t = Target { dir, kind: TargetKind::HubSnapshot, model: Some(model), revision: Some(parts[i + 1].clone()), files: vec![file.into()] };
            return Some((t, hub));
        }
    }
    let i = parts.iter().rposition(|p| p == "transformers_modules")?;
    let rel = &parts[i + 1..];
    let (kind, model, rev) = match rel {
        [org, repo, commit] => (TargetKind::ModuleCopy, format!("{}/{}", desanitize(org), desanitize(repo)), Some(commit.clone())),
        [base] => (TargetKind::LocalCopy, desanitize(base), None),
        [base, h] => (TargetKind::LocalCopy, desanitize(base), Some(h.clone())),
        [] => return None,
        more => (TargetKind::LocalCopy, desanitize(&more.join("/")), None),
    };
    Some((Target { dir, kind, model: Some(model), revision: rev, files: vec![file.into()] }, None))
}

/// Patches `path` if it is a targeted file in a cache folder. Errors (unknown hash, unwritable
/// cache) are returned; the hook decides whether they stop the import.
pub fn guard_file(engine: &Engine, path: &Path, allow_unpinned: bool) -> Result<Guarded> {
    let Some(file) = path.file_name().and_then(|n| n.to_str()) else { return Ok(Guarded::NotTargeted) };
    if !engine.targets(file) {
        return Ok(Guarded::NotTargeted);
    }
    let Some((target, hub)) = target_of(path, file) else { return Ok(Guarded::Outside) };
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(Guarded::Outside); // not there (yet): the open will fail on its own.
    }
    // The common case, nothing to do: our pinned result already. One read and one hash, no lock.
    if let Ok(bytes) = std::fs::read(path) {
        if matches!(engine.classify(file, &bytes), crate::patch::Status::Patched(_)) {
            return Ok(Guarded::AlreadyPatched);
        }
    }
    let opts = Options { allow_unpinned, force: false, fork: None };
    let pb = ProgressBar::hidden();
    // A snapshot file that is still huggingface_hub's symlink: hold its download lock.
    let _hf_lock = match (&hub, &target.model, std::fs::read_link(path).ok()) {
        (Some(hub), Some(model), Some(link)) => {
            let etag = link.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let lock = hf_lock_path(hub, model, &etag);
            Some(HfLock::acquire(&lock, super::fsx::LOCK_TIMEOUT).map_err(|e| CacheError::write(lock, std::io::Error::other(e.to_string())))?)
        }
        _ => None,
    };
    let report = ops::apply(engine, std::slice::from_ref(&target), &opts, false, &pb)?;
    let action = report.files().next().map(|f| f.action);
    Ok(match action {
        Some(Action::Patch) => Guarded::Patched,
        Some(Action::NotTargeted) => Guarded::NotTargeted,
        _ => Guarded::AlreadyPatched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_files_sit() {
        let (t, hub) = target_of(Path::new("/c/hub/models--a--b-c/snapshots/123/m.py"), "m.py").unwrap();
        assert_eq!((t.kind, t.model.as_deref(), t.revision.as_deref()), (TargetKind::HubSnapshot, Some("a/b-c"), Some("123")));
        assert_eq!(hub.unwrap(), Path::new("/c/hub"));
        let (t, _) = target_of(Path::new("/m/transformers_modules/a_hyphen_b/c/123/m.py"), "m.py").unwrap();
        assert_eq!((t.kind, t.model.as_deref()), (TargetKind::ModuleCopy, Some("a-b/c")));
        let (t, _) = target_of(Path::new("/m/transformers_modules/mymodel/m.py"), "m.py").unwrap();
        assert_eq!(t.kind, TargetKind::LocalCopy);
        assert!(target_of(Path::new("/home/me/models/tiny/m.py"), "m.py").is_none());
    }
}
