//! The lock: which upstream files we know, byte for byte, and what our rules make of them.
//!
//! Owns the format of `patches/lock.toml` (and of extra locks given with `--lock`): for each
//! known file, its name, where it comes from, the sha256 of the upstream bytes and the sha256 of
//! the patched result under the current ruleset. Touches no file itself: callers hand it text.

use serde::{Deserialize, Serialize};

pub const LOCK_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockEntry {
    /// File name inside the model folder, e.g. `modeling_deepseekv2.py`.
    pub name: String,
    /// Where these bytes come from, e.g. `deepseek-ai/DeepSeek-OCR` or `tests/fixtures/tinyocr`.
    pub source: String,
    /// sha256 of the upstream bytes.
    pub upstream: String,
    /// sha256 of our patched result; absent when no rule targets the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patched: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub format: u32,
    /// The ruleset the `patched` hashes were computed with.
    #[serde(default)]
    pub ruleset: String,
    /// sha256 of the rules and prelude text the `patched` hashes were computed with, so a stale
    /// lock is caught without the upstream files (see [`super::rules_sha256`]).
    #[serde(default)]
    pub rules_sha256: String,
    #[serde(default, rename = "file")]
    pub files: Vec<LockEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{origin}: not a valid lock file: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: lock format {found} is not supported (this ocr-patch reads format {LOCK_FORMAT}); upgrade ocr-patch")]
    Format { origin: String, found: u32 },
    #[error("{origin}: `{value}` is not a sha256 (64 lowercase hex digits) in the entry for {name}")]
    BadHash { origin: String, name: String, value: String },
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Lock {
    /// Parses lock text; `origin` names it in errors (a path, or "the embedded lock").
    pub fn parse(text: &str, origin: &str) -> Result<Lock, LockError> {
        let lock: Lock = toml::from_str(text)
            .map_err(|e| LockError::Parse { origin: origin.to_string(), message: e.message().to_string() })?;
        if lock.format != LOCK_FORMAT {
            return Err(LockError::Format { origin: origin.to_string(), found: lock.format });
        }
        for e in &lock.files {
            for value in std::iter::once(&e.upstream).chain(e.patched.iter()) {
                if !is_sha256(value) {
                    return Err(LockError::BadHash {
                        origin: origin.to_string(),
                        name: e.name.clone(),
                        value: value.clone(),
                    });
                }
            }
        }
        Ok(lock)
    }

    pub fn to_toml(&self) -> String {
        let header = "# ocr-patch lock: sha256 of each known upstream file and of our patched result.\n\
                      # Regenerate with `ocr-patch lock --upstream DIR --out FILE` after changing patches/.\n";
        format!("{header}{}", toml::to_string_pretty(self).unwrap_or_default())
    }

    pub fn by_upstream(&self, name: &str, sha256: &str) -> Option<&LockEntry> {
        self.files.iter().find(|e| e.name == name && e.upstream == sha256)
    }

    pub fn by_patched(&self, name: &str, sha256: &str) -> Option<&LockEntry> {
        self.files.iter().find(|e| e.name == name && e.patched.as_deref() == Some(sha256))
    }

    pub fn merge(&mut self, other: Lock) {
        for e in other.files {
            if !self.files.contains(&e) {
                self.files.push(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "5835e0b9e1942fe36df9123009d1d80a2b78ccbe6a2d535668a6561e3d4068b1";
    const H2: &str = "69184a0493d1fdac21c360f9f9eabc5b5af3188e0265df44cfaeafc44f9095e3";

    #[test]
    fn round_trips_and_looks_up() {
        let lock = Lock {
            format: 1,
            ruleset: "r1".into(),
            rules_sha256: H1.into(),
            files: vec![LockEntry {
                name: "a.py".into(),
                source: "x".into(),
                upstream: H1.into(),
                patched: Some(H2.into()),
            }],
        };
        let back = Lock::parse(&lock.to_toml(), "test").unwrap();
        assert_eq!(back, lock);
        assert!(back.by_upstream("a.py", H1).is_some());
        assert!(back.by_patched("a.py", H2).is_some());
        assert!(back.by_upstream("b.py", H1).is_none());
    }

    #[test]
    fn rejects_bad_hashes_and_formats() {
        let bad = "format = 1\n[[file]]\nname='a.py'\nsource='x'\nupstream='abc'\n";
        assert!(matches!(Lock::parse(bad, "t"), Err(LockError::BadHash { .. })));
        assert!(matches!(Lock::parse("format = 9\n", "t"), Err(LockError::Format { found: 9, .. })));
        assert!(matches!(Lock::parse("format = [", "t"), Err(LockError::Parse { .. })));
    }
}
