//! The backup folder `<target>/.ocr-patch/`: `manifest.json` plus `<file>.orig` copies.
//!
//! For a hub snapshot file (a symlink into `blobs/`) the blob itself is the backup: the entry
//! records the link text and `revert` re-creates the same symlink. For a regular file (module
//! copies, local folders) a byte-exact copy is kept as `.ocr-patch/<file>.orig`.
//!
//! The manifest records intent, not truth: every reader re-hashes the files. Write order on
//! apply is backup, then manifest, then the file; a crash in between leaves an entry for a file
//! that is still original, which `revert` and `apply` recognise by its hash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{CacheError, Result};
use super::fsx;

pub const DIR_NAME: &str = ".ocr-patch";
pub const FILE_NAME: &str = "manifest.json";
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// sha256 of the original bytes (what `revert` restores).
    pub original_sha256: String,
    /// sha256 of what we wrote.
    pub patched_sha256: String,
    /// The original symlink's text (hub snapshots), e.g. `../../blobs/<etag>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<PathBuf>,
    /// Backup copy inside `.ocr-patch/` (regular files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// `rules` (our engine) or `fork` (apply --fork).
    pub source: String,
    /// Rule ids applied, or the fork URL.
    #[serde(default)]
    pub applied: Vec<String>,
    /// ocr-patch version that wrote it.
    pub tool_version: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub files: BTreeMap<String, Entry>,
}

pub fn dir(target: &Path) -> PathBuf {
    target.join(DIR_NAME)
}

pub fn backup_path(target: &Path, file: &str) -> PathBuf {
    dir(target).join(format!("{file}.orig"))
}

impl Manifest {
    /// Loads `<target>/.ocr-patch/manifest.json`; a missing one is empty.
    pub fn load(target: &Path) -> Result<Manifest> {
        let path = dir(target).join(FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest { format: FORMAT, ..Default::default() }),
            Err(e) => return Err(CacheError::read(path, e)),
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| CacheError::Manifest { path: path.clone(), msg: e.to_string() })?;
        if m.format != FORMAT {
            return Err(CacheError::Manifest { path, msg: format!("format {} is not {FORMAT}; upgrade ocr-patch", m.format) });
        }
        Ok(m)
    }

    /// Writes the manifest atomically; removes the folder when nothing is left in it.
    /// Call only while holding the target's lock.
    pub fn save(&self, target: &Path) -> Result<()> {
        let d = dir(target);
        let path = d.join(FILE_NAME);
        if self.files.is_empty() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CacheError::write(path, e)),
            }
            fsx::clean_temps(&d);
            let _ = std::fs::remove_dir(&d); // fails harmlessly if something else is in it
            return Ok(());
        }
        std::fs::create_dir_all(&d).map_err(|e| CacheError::write(&d, e))?;
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| CacheError::Manifest { path: path.clone(), msg: e.to_string() })?;
        json.push(b'\n');
        fsx::replace_with_bytes(&path, &json, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_cleanup() {
        let t = tempfile::tempdir().unwrap();
        assert!(Manifest::load(t.path()).unwrap().files.is_empty());
        let mut m = Manifest { format: FORMAT, ..Default::default() };
        m.files.insert(
            "a.py".into(),
            Entry {
                original_sha256: "o".into(),
                patched_sha256: "p".into(),
                symlink_target: Some("../../blobs/x".into()),
                backup: None,
                source: "rules".into(),
                applied: vec!["r1".into()],
                tool_version: "0".into(),
            },
        );
        m.save(t.path()).unwrap();
        assert_eq!(Manifest::load(t.path()).unwrap(), m);
        m.files.clear();
        m.save(t.path()).unwrap();
        assert!(!dir(t.path()).exists());
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir(t.path())).unwrap();
        std::fs::write(dir(t.path()).join(FILE_NAME), b"{not json").unwrap();
        let e = Manifest::load(t.path()).unwrap_err().to_string();
        assert!(e.contains("manifest.json: backup manifest is unreadable"), "{e}");
    }
}
