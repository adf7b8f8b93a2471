//! Errors of the cache room. Each message is one line: it starts with the path concerned and
//! ends with what to do. The underlying `io::Error` is folded into the message (not exposed as
//! a `source`) so that `main`, which prints the whole chain, prints it once.

use std::io;
use std::path::PathBuf;

use crate::patch::PatchError;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{}: cannot read ({err}); {}", path.display(), read_hint(err))]
    Read { path: PathBuf, err: io::Error },

    #[error("{}: cannot write ({err}); {}", path.display(), write_hint(err))]
    Write { path: PathBuf, err: io::Error },

    #[error("{}: cannot take the lock ({err}); is the folder writable? run as its owner", path.display())]
    Lock { path: PathBuf, err: io::Error },

    #[error("{}: timeout waiting for lock after {secs}s; is another ocr-patch process running?", path.display())]
    LockTimeout { path: PathBuf, secs: u64 },

    #[error("{}: {}", path.display(), patch_message(path, err))]
    Patch { path: PathBuf, err: PatchError },

    #[error("{}: backup manifest is unreadable ({msg}); move the `.ocr-patch` folder away and delete this folder to let transformers fetch the files again", path.display())]
    Manifest { path: PathBuf, msg: String },

    #[error("{}: changed since ocr-patch wrote it (sha256 {sha256}); not reverting it; pass --force to restore the original anyway", path.display())]
    ChangedSincePatch { path: PathBuf, sha256: String },

    #[error("{}: no backup of the original (sha256 {sha256}) was found; delete this folder and let transformers fetch the files again", path.display())]
    NoBackup { path: PathBuf, sha256: String },

    #[error("{}: the backup does not hold the original (sha256 {found}, expected {expected}); delete this folder and let transformers fetch the files again", path.display())]
    BadBackup { path: PathBuf, expected: String, found: String },

    /// `what` is the fork file or the URL concerned.
    #[error("{what}: {msg}")]
    Fork { what: String, msg: String },
}

/// An error and its sources on one line (`a: b: c`), for messages that fold a library's error in
/// (reqwest nests the useful part, "connection refused", a few sources down).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// ENOSPC (28) and EDQUOT (122) on Linux; 28 and 69 on macOS.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28) | Some(122)) || (cfg!(target_os = "macos") && e.raw_os_error() == Some(69))
}

fn write_hint(e: &io::Error) -> &'static str {
    if is_disk_full(e) {
        "the disk is full; nothing was half-written (every write goes to a temp file first): free some space and run again"
    } else {
        "is the cache read-only? run as its owner, or point --cache-dir/--path at a writable copy"
    }
}

fn read_hint(e: &io::Error) -> &'static str {
    // ELOOP is 40 on Linux, 62 on macOS.
    if matches!(e.raw_os_error(), Some(40) | Some(62)) {
        return "it is a symlink loop: delete it and download the model again";
    }
    match e.kind() {
        io::ErrorKind::NotFound => {
            "the file or the blob it links to is missing: download the model again or delete this folder"
        }
        io::ErrorKind::PermissionDenied => "check its permissions, or run as the cache's owner",
        _ => "check the file and the disk",
    }
}

/// The engine names files by their bare name (`modeling_x.py: ...`); we lead with the full path,
/// so that prefix is dropped.
fn patch_message(path: &std::path::Path, e: &PatchError) -> String {
    let text = e.to_string();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let text = text.strip_prefix(&format!("{name}: ")).map(str::to_string).unwrap_or(text);
    match e {
        PatchError::UnknownHash { sha256, .. } => format!(
            "unknown file (sha256 {sha256}), not pinned in any lock; pass --allow-unpinned to patch it anyway, or --lock FILE with its pin"
        ),
        _ => text,
    }
}

impl CacheError {
    pub fn read(path: impl Into<PathBuf>, err: io::Error) -> Self {
        CacheError::Read { path: path.into(), err }
    }
    pub fn write(path: impl Into<PathBuf>, err: io::Error) -> Self {
        CacheError::Write { path: path.into(), err }
    }
}

pub type Result<T, E = CacheError> = std::result::Result<T, E>;
