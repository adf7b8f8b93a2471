//! The patch engine: given a file's name and bytes, decide whether it is a known upstream file,
//! already patched, or unknown, and compute the patched bytes.
//!
//! Owns: the rules, the prelude and the lock in `patches/` (compiled in), the Python rewriting
//! (`python`), hashes. Pure: it reads no file and writes none; `cache` does all I/O and asks this
//! module what to write. Must not depend on `cache`, `model` or the CLI.

pub mod lock;
pub mod python;
pub mod rules;
pub mod version;

use sha2::{Digest, Sha256};

pub use lock::{Lock, LockEntry, LockError};
pub use python::{Edit, EditError};
pub use rules::{Action, Rule, RuleSet, RulesError};
pub use version::{Version, VersionError, VersionRange};

/// Our rules, compiled into the binary.
pub const RULES_TOML: &str = include_str!("../../patches/rules.toml");
/// The compatibility helpers inserted at the top of each patched file.
pub const PRELUDE_PY: &str = include_str!("../../patches/prelude.py");
/// The pins of known upstream files.
pub const LOCK_TOML: &str = include_str!("../../patches/lock.toml");

/// First line of every file we patched.
pub const MARKER: &str = "# ocr-patch: patched";

/// The fingerprint of the compiled-in rules and prelude; a lock records the one it was made with.
pub fn rules_sha256() -> String {
    sha256_hex(format!("{RULES_TOML}\0{PRELUDE_PY}").as_bytes())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error(
        "{file}: sha256 {sha256} is not a known upstream version; run `ocr-patch doctor` to see what \
         changed, or pass --allow-unpinned to apply the rules that match"
    )]
    UnknownHash { file: String, sha256: String },
    #[error("{file}: {source}; the file is damaged or not Python: delete it so transformers fetches it again")]
    Syntax { file: String, source: EditError },
    #[error("{file}: {source}")]
    Edit { file: String, source: EditError },
    #[error(
        "{file}: rule {rule} matched {found} place(s) in a pinned file, expected {expected}: the ruleset \
         and the lock disagree (a bug in ocr-patch; please report it)"
    )]
    RuleMismatch { file: String, rule: String, found: usize, expected: String },
    #[error("{file}: the patched result does not parse ({source}): a bug in rule(s) {rules}; please report it")]
    BadOutput { file: String, source: EditError, rules: String },
    #[error(
        "{file}: the patched result has sha256 {got}, the lock expects {expected}: the ruleset and the \
         lock disagree (regenerate the lock with `ocr-patch lock`)"
    )]
    LockMismatch { file: String, expected: String, got: String },
    #[error(transparent)]
    Rules(#[from] RulesError),
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// What we know of a file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Pinned upstream bytes.
    Original(LockEntry),
    /// Our patched result of a pinned file, under the current ruleset.
    Patched(LockEntry),
    /// Carries our marker but is not the current result (an older ruleset, or edited by hand).
    Marked { from_sha256: Option<String> },
    /// Neither pinned nor ours.
    Unknown,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PatchOptions {
    /// Apply the rules that match to files whose hash the lock does not know.
    pub allow_unpinned: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No rule targets this file name.
    NotTargeted,
    /// Already our result: nothing to do.
    AlreadyPatched,
    Patched {
        bytes: Vec<u8>,
        /// Rules that changed something, in rule order.
        applied: Vec<String>,
        /// Rules for this file that matched nothing (only possible for unpinned files).
        unmatched: Vec<String>,
        /// True when the input was a pinned upstream file (and the output matches the lock).
        pinned: bool,
    },
}

/// A breakage a file would hit on a given transformers release.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BreakageHit {
    pub id: String,
    pub title: String,
    pub affects: String,
    pub rules: Vec<String>,
}

pub struct Engine {
    pub rules: RuleSet,
    pub lock: Lock,
}

impl Engine {
    /// The ruleset, prelude and lock compiled into this binary.
    pub fn embedded() -> Result<Engine, PatchError> {
        Ok(Engine {
            rules: RuleSet::parse_lazy(RULES_TOML, PRELUDE_PY, "patches/rules.toml")?,
            lock: Lock::parse(LOCK_TOML, "patches/lock.toml")?,
        })
    }

    /// Adds the pins of another lock (a fork's, a test fixture's).
    pub fn with_lock(mut self, lock: Lock) -> Engine {
        self.lock.merge(lock);
        self
    }

    pub fn targets(&self, file_name: &str) -> bool {
        self.rules.targets(file_name)
    }

    pub fn classify(&self, file_name: &str, bytes: &[u8]) -> Status {
        let sha = sha256_hex(bytes);
        if let Some(e) = self.lock.by_upstream(file_name, &sha) {
            return Status::Original(e.clone());
        }
        if let Some(e) = self.lock.by_patched(file_name, &sha) {
            return Status::Patched(e.clone());
        }
        match marker_source(bytes) {
            Some(from) => Status::Marked { from_sha256: from },
            None => Status::Unknown,
        }
    }

    pub fn patch(&self, file_name: &str, bytes: &[u8], opts: &PatchOptions) -> Result<Outcome, PatchError> {
        if !self.targets(file_name) {
            return Ok(Outcome::NotTargeted);
        }
        let sha = sha256_hex(bytes);
        let pinned = match self.classify(file_name, bytes) {
            Status::Patched(_) | Status::Marked { .. } => return Ok(Outcome::AlreadyPatched),
            Status::Original(e) => Some(e),
            Status::Unknown if opts.allow_unpinned => None,
            Status::Unknown => return Err(PatchError::UnknownHash { file: file_name.to_string(), sha256: sha }),
        };
        let rewrite = self.rewrite(file_name, bytes)?;
        if let Some(entry) = &pinned {
            for (rule, found) in &rewrite.matches {
                let ok = match rule.spec.expect {
                    Some(n) => *found == n,
                    None => *found >= 1,
                };
                if !ok {
                    return Err(PatchError::RuleMismatch {
                        file: file_name.to_string(),
                        rule: rule.spec.id.clone(),
                        found: *found,
                        expected: rule.spec.expect.map_or("at least 1".into(), |n| n.to_string()),
                    });
                }
            }
            let got = sha256_hex(&rewrite.bytes);
            if let Some(expected) = entry.patched.as_ref().filter(|p| **p != got) {
                return Err(PatchError::LockMismatch {
                    file: file_name.to_string(),
                    expected: expected.clone(),
                    got,
                });
            }
        }
        let applied = rewrite.matches.iter().filter(|(_, n)| *n > 0).map(|(r, _)| r.spec.id.clone()).collect();
        let unmatched = rewrite.matches.iter().filter(|(_, n)| *n == 0).map(|(r, _)| r.spec.id.clone()).collect();
        Ok(Outcome::Patched { bytes: rewrite.bytes, applied, unmatched, pinned: pinned.is_some() })
    }

    /// Runs every rule for `file_name` on `bytes`, whatever the hash. The lock is not consulted.
    pub fn rewrite<'a>(&'a self, file_name: &str, bytes: &[u8]) -> Result<Rewrite<'a>, PatchError> {
        let tree = python::parse(bytes).map_err(|source| PatchError::Syntax { file: file_name.to_string(), source })?;
        let mut edits = Vec::new();
        let mut matches = Vec::new();
        for rule in self.rules.for_file(file_name) {
            let (rule_edits, found) = python::rule_edits(rule, &tree, bytes)
                .map_err(|source| PatchError::Edit { file: file_name.to_string(), source })?;
            edits.extend(rule_edits);
            matches.push((rule, found));
        }
        let applied: Vec<&str> = matches.iter().filter(|(_, n)| *n > 0).map(|(r, _)| r.spec.id.as_str()).collect();
        let marker = format!(
            "{MARKER} by ruleset {} from sha256:{} (rules {}); undo with `ocr-patch revert`\n",
            self.rules.name,
            sha256_hex(bytes),
            applied.join(" ")
        );
        let mut head = vec![Edit { start: 0, end: 0, text: marker, rule: "marker".into() }];
        if edits.iter().any(|e| e.text.contains("_ocrp") || e.text.contains("_Ocrp")) {
            let at = python::prelude_offset(&tree, bytes);
            let prelude = format!("{}\n\n", self.rules.prelude.trim_end());
            head.push(Edit { start: at, end: at, text: prelude, rule: "prelude".into() });
        }
        head.extend(edits);
        let out = python::splice(bytes, head).map_err(|source| PatchError::Edit { file: file_name.to_string(), source })?;
        python::parse(&out).map_err(|source| PatchError::BadOutput {
            file: file_name.to_string(),
            source,
            rules: applied.join(", "),
        })?;
        Ok(Rewrite { bytes: out, matches })
    }

    /// The breakages an unpatched file would hit on `version`: rules whose range holds the
    /// version and whose query matches the file, grouped by breakage.
    pub fn breakages(&self, file_name: &str, bytes: &[u8], version: &Version) -> Result<Vec<BreakageHit>, PatchError> {
        let tree = python::parse(bytes).map_err(|source| PatchError::Syntax { file: file_name.to_string(), source })?;
        let mut hits: Vec<BreakageHit> = Vec::new();
        for rule in self.rules.for_file(file_name).filter(|r| r.affects.contains(version)) {
            let (_, found) = python::rule_edits(rule, &tree, bytes)
                .map_err(|source| PatchError::Edit { file: file_name.to_string(), source })?;
            if found == 0 {
                continue;
            }
            match hits.iter_mut().find(|h| h.id == rule.spec.breakage) {
                Some(hit) => hit.rules.push(rule.spec.id.clone()),
                None => hits.push(BreakageHit {
                    id: rule.spec.breakage.clone(),
                    title: rule.spec.title.clone(),
                    affects: rule.affects.to_string(),
                    rules: vec![rule.spec.id.clone()],
                }),
            }
        }
        hits.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(hits)
    }

    /// A lock for the given upstream files under the current ruleset (for `ocr-patch lock`).
    pub fn lock_for(&self, source: &str, files: &[(String, Vec<u8>)]) -> Result<Lock, PatchError> {
        let mut lock = Lock {
            format: lock::LOCK_FORMAT,
            ruleset: self.rules.name.clone(),
            rules_sha256: sha256_hex(format!("{}\0{}", self.rules.source, self.rules.prelude).as_bytes()),
            files: Vec::new(),
        };
        for (name, bytes) in files {
            let patched = if self.targets(name) {
                let rewrite = self.rewrite(name, bytes)?;
                if let Some((rule, _)) = rewrite.matches.iter().find(|(r, n)| match r.spec.expect {
                    Some(e) => *n != e,
                    None => *n == 0,
                }) {
                    let found = rewrite.matches.iter().find(|(r, _)| r.spec.id == rule.spec.id).map_or(0, |m| m.1);
                    return Err(PatchError::RuleMismatch {
                        file: name.clone(),
                        rule: rule.spec.id.clone(),
                        found,
                        expected: rule.spec.expect.map_or("at least 1".into(), |n| n.to_string()),
                    });
                }
                Some(sha256_hex(&rewrite.bytes))
            } else {
                None
            };
            lock.files.push(LockEntry {
                name: name.clone(),
                source: source.to_string(),
                upstream: sha256_hex(bytes),
                patched,
            });
        }
        Ok(lock)
    }
}

/// The result of running the rules on one file.
pub struct Rewrite<'a> {
    pub bytes: Vec<u8>,
    /// Each rule for the file with its number of matches.
    pub matches: Vec<(&'a Rule, usize)>,
}

/// The upstream sha256 named in our marker line, if the file starts with one.
/// The sha256 of the original a patched file was made from, read from our marker line (the
/// first line of every file we write); `None` for a file without a marker or with a damaged one.
pub fn marker_origin(bytes: &[u8]) -> Option<String> {
    marker_source(bytes).flatten().filter(|sha| sha.len() == 64).map(|sha| sha.to_ascii_lowercase())
}

fn marker_source(bytes: &[u8]) -> Option<Option<String>> {
    let first = bytes.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(first).ok()?;
    if !line.starts_with(MARKER) {
        return None;
    }
    Some(line.split("sha256:").nth(1).map(|rest| rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect()))
}
