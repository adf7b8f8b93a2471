//! Shared helpers of the Rust integration tests: HF cache layouts in temp dirs, a hermetic
//! command, a "what is on disk" snapshot, and insta filters.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use sha2::{Digest, Sha256};

pub const REPO: &str = "deepseek-ai/DeepSeek-OCR";
pub const COMMIT: &str = "9f30c71f441d010e5429c532364a86705536c53a";
pub const COMMIT2: &str = "1e3401a3d4603e9e71ea0ec850bfead602191ec4";

/// A stand-in whose hash no lock knows.
pub const UNKNOWN_V2: &str = "import torch\n\n\nclass DeepseekV2Model:\n    def forward(self, x):\n        return x\n";

pub fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tinyocr")
}

/// The tinyocr fixture's `.py` files, sorted by name.
pub fn fixture_files() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixture_dir())
        .expect("tests/fixtures/tinyocr exists")
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.ends_with(".py").then(|| (n, std::fs::read(e.path()).unwrap()))
        })
        .collect();
    out.sort();
    out
}

/// A Hugging Face home in a temp dir: `hf/hub` and `hf/modules`.
pub struct Cache {
    pub tmp: tempfile::TempDir,
}

impl Cache {
    pub fn new() -> Cache {
        let tmp = tempfile::Builder::new().prefix("ocrp-test-").tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("hf/hub")).unwrap();
        std::fs::create_dir_all(tmp.path().join("hf/modules/transformers_modules")).unwrap();
        Cache { tmp }
    }
    pub fn root(&self) -> &Path {
        self.tmp.path()
    }
    pub fn hf_home(&self) -> PathBuf {
        self.root().join("hf")
    }
    pub fn hub(&self) -> PathBuf {
        self.hf_home().join("hub")
    }
    pub fn modules(&self) -> PathBuf {
        self.hf_home().join("modules/transformers_modules")
    }
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.hub().join(format!("models--{}", repo.replace('/', "--")))
    }

    /// A hub snapshot: each file is a blob `blobs/<sha256>` and a symlink
    /// `snapshots/<commit>/<name> -> ../../blobs/<sha256>`. Blobs are shared between commits.
    pub fn add_snapshot(&self, repo: &str, commit: &str, files: &[(String, Vec<u8>)]) -> PathBuf {
        let rd = self.repo_dir(repo);
        let snap = rd.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(rd.join("blobs")).unwrap();
        std::fs::create_dir_all(rd.join("refs")).unwrap();
        std::fs::write(rd.join("refs/main"), commit).unwrap();
        for (name, bytes) in files {
            let etag = sha(bytes);
            let blob = rd.join("blobs").join(&etag);
            if !blob.exists() {
                std::fs::write(&blob, bytes).unwrap();
            }
            symlink(format!("../../blobs/{etag}"), snap.join(name)).unwrap();
        }
        snap
    }

    /// Regular files under `transformers_modules/<rel>/`.
    pub fn add_module_copy(&self, rel: &str, files: &[(String, Vec<u8>)]) -> PathBuf {
        let d = self.modules().join(rel);
        std::fs::create_dir_all(&d).unwrap();
        for (name, bytes) in files {
            std::fs::write(d.join(name), bytes).unwrap();
        }
        d
    }

    /// The whole layout: one hub snapshot, module copies with raw (<=4.56) and sanitised (4.57+)
    /// names, and local-dir copies (<5.8 and 5.8+).
    pub fn full(files: &[(String, Vec<u8>)]) -> Cache {
        let c = Cache::new();
        c.add_snapshot(REPO, COMMIT, files);
        c.add_module_copy(&format!("deepseek-ai/DeepSeek-OCR/{COMMIT}"), files);
        c.add_module_copy(&format!("deepseek_hyphen_ai/DeepSeek_hyphen_OCR/{COMMIT}"), files);
        c.add_module_copy("tinyocr", files);
        c.add_module_copy("tinyocr/0123456789abcdef", files);
        c
    }

    /// Writes a lock pinning `files` (made with `ocr-patch lock`) and returns its path.
    pub fn lock_for(&self, files: &[(String, Vec<u8>)]) -> PathBuf {
        let up = self.root().join("upstream");
        std::fs::create_dir_all(&up).unwrap();
        for (n, b) in files {
            std::fs::write(up.join(n), b).unwrap();
        }
        let out = self.root().join("lock.toml");
        self.cmd().args(["lock", "--source", "tinyocr", "--upstream"]).arg(&up).arg("--out").arg(&out).assert().success();
        std::fs::remove_dir_all(&up).unwrap();
        out
    }

    /// `ocr-patch` with a hermetic environment pointing at this cache.
    pub fn cmd(&self) -> Command {
        let mut c = Command::cargo_bin("ocr-patch").unwrap();
        for k in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "XDG_CACHE_HOME"] {
            c.env_remove(k);
        }
        c.env("HF_HOME", self.hf_home()).env("HOME", self.root()).env("NO_COLOR", "1");
        c
    }

    /// `std::process::Command` for spawning (concurrency and kill tests).
    pub fn std_cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("ocr-patch"));
        for k in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "XDG_CACHE_HOME"] {
            c.env_remove(k);
        }
        c.env("HF_HOME", self.hf_home()).env("HOME", self.root());
        c
    }

    /// Everything on disk under the HF home: path -> `link:<text>` / `file:<sha256>:<mode>` /
    /// `dir`. Lock files are left out (they are created by design and carry no content).
    pub fn state(&self) -> BTreeMap<String, String> {
        state_of(&self.hf_home())
    }
}

pub fn state_of(root: &Path) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).follow_links(false).sort_by_file_name() {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap().display().to_string();
        if rel.ends_with(".ocr-patch.lock") {
            continue;
        }
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        let v = if md.file_type().is_symlink() {
            format!("link:{}", std::fs::read_link(e.path()).unwrap().display())
        } else if md.is_dir() {
            "dir".to_string()
        } else {
            format!("file:{}:{:o}", sha(&std::fs::read(e.path()).unwrap()), md.permissions().mode() & 0o777)
        };
        m.insert(rel, v);
    }
    m
}

/// Filters temp paths, hashes and rule counts out of CLI output for snapshots.
pub fn redact(text: &str, cache: &Cache) -> String {
    let root = cache.root().display().to_string();
    let canon = cache.root().canonicalize().unwrap().display().to_string();
    let t = text.replace(&root, "[TMP]").replace(&canon, "[TMP]");
    let sha_re = regex_lite(&t);
    sha_re
}

/// Replaces 64-hex runs by [SHA] and "N rule(s)" by "[N] rule(s)" without a regex crate.
fn regex_lite(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    let b = t.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let run = b[i..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if run == 64 && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) {
            out.push_str("[SHA]");
            i += run;
            continue;
        }
        let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) && t[i + digits..].starts_with(" rule") {
            out.push_str("[N]");
            i += digits;
            continue;
        }
        let ch = t[i..].chars().next().unwrap();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// stderr split in lines, for "exactly one error line" checks.
pub fn lines(b: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(b).lines().map(str::to_string).collect()
}
