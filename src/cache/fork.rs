//! A pinned external source of already-patched files (`apply --fork FORK.toml`).
//!
//! ```toml
//! url_template = "https://host/{repo}/{commit}/{file}"
//! commit = "0123abc"
//! repo = "someone/DeepSeek-OCR-fixed"   # optional; default: the target's model id
//! [files]
//! "modeling_deepseekocr.py" = "<sha256>"
//! ```
//!
//! Every download is checked against its pinned sha256 before anything is written; the bytes
//! then go through the same locked, atomic write as our own patches.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

use super::error::{error_chain, CacheError, Result};
use crate::patch::sha256_hex;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkSpec {
    pub url_template: String,
    pub commit: String,
    #[serde(default)]
    pub repo: Option<String>,
    pub files: BTreeMap<String, String>,
}

impl ForkSpec {
    pub fn load(path: &Path) -> Result<ForkSpec> {
        let what = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| CacheError::read(path, e))?;
        let spec: ForkSpec = toml::from_str(&text)
            .map_err(|e| CacheError::Fork { what: what.clone(), msg: format!("not a valid fork file ({}); see `ocr-patch apply --help`", e.message()) })?;
        for (file, sha) in &spec.files {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(CacheError::Fork { what, msg: format!("the pin of `{file}` is not a sha256 (64 hex digits); fix the fork file") });
            }
        }
        if !spec.url_template.contains("{file}") {
            return Err(CacheError::Fork { what, msg: "url_template has no `{file}`; add it".into() });
        }
        Ok(spec)
    }

    pub fn pin(&self, file: &str) -> Option<&str> {
        self.files.get(file).map(String::as_str)
    }

    /// The URL of `file` for a target whose model id is `model`.
    pub fn url(&self, model: Option<&str>, file: &str) -> Result<String> {
        let repo = match (self.repo.as_deref(), model) {
            (Some(r), _) => r,
            (None, Some(m)) => m,
            (None, None) if self.url_template.contains("{repo}") => {
                return Err(CacheError::Fork {
                    what: self.url_template.clone(),
                    msg: "this folder has no model id to fill `{repo}`; add `repo = \"org/name\"` to the fork file".into(),
                })
            }
            (None, None) => "",
        };
        Ok(self.url_template.replace("{repo}", repo).replace("{commit}", &self.commit).replace("{file}", file))
    }
}

/// Downloads pinned files once each and checks their hashes.
pub struct Fetcher {
    client: reqwest::blocking::Client,
    done: Mutex<HashMap<String, Vec<u8>>>,
}

impl Fetcher {
    pub fn new() -> Result<Fetcher> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("ocr-patch/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CacheError::Fork { what: "https client".into(), msg: format!("cannot start ({e}); check the TLS setup") })?;
        Ok(Fetcher { client, done: Mutex::new(HashMap::new()) })
    }

    /// Fetches `url` and returns its bytes only if their sha256 is `sha256`.
    pub fn fetch(&self, url: &str, sha256: &str) -> Result<Vec<u8>> {
        if let Some(b) = self.done.lock().ok().and_then(|m| m.get(url).cloned()) {
            return Ok(b);
        }
        let err = |msg: String| CacheError::Fork { what: url.to_string(), msg };
        let resp = self.client.get(url).send().map_err(|e| err(format!("cannot download ({}); check the URL and the network", error_chain(&e))))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(err(format!("server answered {status}; check url_template and commit in the fork file")));
        }
        let bytes = resp.bytes().map_err(|e| err(format!("download cut short ({}); try again", error_chain(&e))))?.to_vec();
        let got = sha256_hex(&bytes);
        if !got.eq_ignore_ascii_case(sha256) {
            return Err(err(format!(
                "sha256 {got} does not match the pin {sha256}; nothing was written: check the fork's commit or update the pin"
            )));
        }
        if let Ok(mut m) = self.done.lock() {
            m.insert(url.to_string(), bytes.clone());
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_filling() {
        let s: ForkSpec = toml::from_str(
            "url_template = \"http://h/{repo}/{commit}/{file}\"\ncommit = \"c1\"\n[files]\n\"m.py\" = \"00\"\n",
        )
        .unwrap();
        assert_eq!(s.url(Some("a/b"), "m.py").unwrap(), "http://h/a/b/c1/m.py");
        assert!(s.url(None, "m.py").is_err());
    }

    #[test]
    fn bad_pin_is_rejected() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("fork.toml");
        std::fs::write(&p, "url_template = \"http://h/{file}\"\ncommit = \"c\"\n[files]\n\"m.py\" = \"xyz\"\n").unwrap();
        let e = ForkSpec::load(&p).unwrap_err().to_string();
        assert!(e.contains("is not a sha256"), "{e}");
    }
}
