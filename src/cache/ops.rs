//! Plan, then write: what `apply`, `check`, `revert` and `doctor` do to a set of targets.
//!
//! Every command first *plans* every target without taking a lock or writing anything: it reads
//! each file (through its symlink), hashes it, and asks the engine. Any error (unknown hash,
//! syntax error, missing blob, symlink loop) stops the run there, so a bad input changes
//! nothing on disk. Then, for the targets that need a change, in path order (so concurrent runs
//! never deadlock): take each folder's lock and probe that it is writable; re-plan under the
//! locks (another run may have finished the job meanwhile); only then write, each file by an
//! atomic rename.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::Serialize;

use super::error::{CacheError, Result};
use super::fork::{Fetcher, ForkSpec};
use super::fsx::{self, FolderLock};
use super::layout::{Target, TargetKind};
use super::manifest::{self, Entry, Manifest};
use crate::patch::{marker_origin, sha256_hex, Engine, Outcome, PatchOptions, Status, Version};

/// Blobs larger than this are never hashed when looking for an original (they are weights).
const MAX_SOURCE_BLOB: u64 = 8 << 20;

/// A pinned fork and the fetcher that downloads from it.
pub struct Fork {
    pub spec: ForkSpec,
    pub fetcher: Fetcher,
}

#[derive(Default)]
pub struct Options<'a> {
    pub allow_unpinned: bool,
    /// `revert --force`: restore files that changed after we patched them.
    pub force: bool,
    pub fork: Option<&'a Fork>,
}

/// What a file is, as far as the engine and our marker tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileStatus {
    /// A pinned upstream file.
    Original,
    /// Our patched output for a pinned upstream file.
    Patched,
    /// Carries our marker but not the current ruleset's output (older ocr-patch, or edited).
    Outdated,
    /// Not in any lock.
    Unknown,
    /// Matches the fork's pin.
    Fork,
}

/// What a command does (or would do) to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Patch,
    AlreadyPatched,
    NotTargeted,
    Revert,
    AlreadyOriginal,
}

impl Action {
    pub fn changes(self) -> bool {
        matches!(self, Action::Patch | Action::Revert)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BreakageReport {
    pub id: String,
    pub title: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub file: String,
    pub path: PathBuf,
    pub status: FileStatus,
    pub action: Action,
    pub sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_after: Option<String>,
    /// Link text when the file is (or is restored to) a symlink into `blobs/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink: Option<PathBuf>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unmatched: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    /// doctor: breakages this (unpatched) file will hit with the given transformers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breakages: Option<Vec<BreakageReport>>,
    #[serde(skip)]
    change: Option<Change>,
}

#[derive(Debug, Clone)]
enum Change {
    /// Write `bytes`; first back up `backup` (regular files) and record `entry`.
    Write { bytes: Vec<u8>, entry: Entry, backup: Option<Vec<u8>>, perms: Option<std::fs::Permissions> },
    RestoreSymlink { target: PathBuf },
    RestoreBytes { bytes: Vec<u8>, perms: Option<std::fs::Permissions> },
    /// The file is already original: only forget its manifest entry.
    Forget,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub dir: PathBuf,
    pub kind: TargetKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    pub files: Vec<FileReport>,
    /// The manifest as read when planning (to tell, under the lock, whether anything moved).
    #[serde(skip)]
    manifest: Option<Manifest>,
}

impl TargetReport {
    fn new(t: &Target) -> TargetReport {
        TargetReport { dir: t.dir.clone(), kind: t.kind, model: t.model.clone(), revision: t.revision.clone(), files: vec![], manifest: None }
    }

    /// True when every file still has the hash and link it had when planned, and the manifest
    /// is unchanged: the plan can be written as is.
    fn still_current(&self) -> bool {
        let Ok(man) = Manifest::load(&self.dir) else { return false };
        if self.manifest.as_ref() != Some(&man) {
            return false;
        }
        self.files.iter().all(|f| {
            let link = fsx::symlink_target(&f.path).ok().flatten();
            let planned_link = match f.action {
                // A revert report carries the link it will restore, not the current one.
                Action::Revert => link.clone(),
                _ => f.symlink.clone(),
            };
            link == planned_link && fsx::read(&f.path).map(|b| sha256_hex(&b) == f.sha256).unwrap_or(false)
        })
    }
    pub fn changes(&self) -> usize {
        self.files.iter().filter(|f| f.action.changes()).count()
    }
    fn has_work(&self) -> bool {
        self.files.iter().any(|f| f.change.is_some())
    }
}

/// The outcome of a command over all targets.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub targets: Vec<TargetReport>,
}

impl Report {
    pub fn files(&self) -> impl Iterator<Item = &FileReport> {
        self.targets.iter().flat_map(|t| t.files.iter())
    }
    pub fn count(&self, a: Action) -> usize {
        self.files().filter(|f| f.action == a).count()
    }
    pub fn changes(&self) -> usize {
        self.files().filter(|f| f.action.changes()).count()
    }
}

/// `dir` inside `models--x/snapshots/<commit>/[sub/]`: returns `models--x/blobs` and the `../`
/// prefix that leads from `dir` back to `models--x`.
fn blobs_of(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let mut up = PathBuf::new();
    let mut cur = dir;
    for _ in 0..8 {
        let parent = cur.parent()?;
        up.push("..");
        if parent.file_name()? == "snapshots" {
            up.push("..");
            return Some((parent.parent()?.join("blobs"), up));
        }
        cur = parent;
    }
    None
}

/// Looks for the original bytes of `file` (sha256 `sha`): the manifest's backup or blob first,
/// then any blob of the same hub repo with that hash. Returns the bytes and, for a blob, the
/// symlink text that points at it.
fn find_original(dir: &Path, file: &str, man: &Manifest, sha: &str) -> Option<(Vec<u8>, Option<PathBuf>)> {
    if let Some(e) = man.files.get(file).filter(|e| e.original_sha256 == sha) {
        if let Some(t) = &e.symlink_target {
            if let Ok(b) = std::fs::read(dir.join(t)) {
                if sha256_hex(&b) == sha {
                    return Some((b, Some(t.clone())));
                }
            }
        }
        if let Some(name) = &e.backup {
            if let Ok(b) = std::fs::read(manifest::dir(dir).join(name)) {
                if sha256_hex(&b) == sha {
                    return Some((b, None));
                }
            }
        }
    }
    let (blobs, up) = blobs_of(dir)?;
    let mut entries: Vec<_> = std::fs::read_dir(&blobs).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let md = match e.metadata() {
            Ok(m) if m.is_file() && m.len() <= MAX_SOURCE_BLOB => m,
            _ => continue,
        };
        let _ = md;
        if let Ok(b) = std::fs::read(e.path()) {
            if sha256_hex(&b) == sha {
                return Some((b, Some(up.join("blobs").join(e.file_name()))));
            }
        }
    }
    None
}

fn unified_diff(path: &Path, before: &[u8], after: &[u8]) -> String {
    let a = String::from_utf8_lossy(before);
    let b = String::from_utf8_lossy(after);
    let p = path.display().to_string();
    similar::TextDiff::from_lines(a.as_ref(), b.as_ref())
        .unified_diff()
        .context_radius(3)
        .header(&p, &format!("{p} (patched)"))
        .to_string()
}

struct Current {
    path: PathBuf,
    link: Option<PathBuf>,
    bytes: Vec<u8>,
    sha: String,
}

fn read_current(dir: &Path, file: &str) -> Result<Current> {
    let path = dir.join(file);
    let link = fsx::symlink_target(&path)?;
    let bytes = fsx::read(&path)?;
    let sha = sha256_hex(&bytes);
    Ok(Current { path, link, bytes, sha })
}

fn status_of(engine: &Engine, file: &str, bytes: &[u8]) -> FileStatus {
    match engine.classify(file, bytes) {
        Status::Original(_) => FileStatus::Original,
        Status::Patched(_) => FileStatus::Patched,
        Status::Marked { .. } => FileStatus::Outdated,
        Status::Unknown => FileStatus::Unknown,
    }
}

fn base_report(file: &str, cur: &Current, status: FileStatus, action: Action) -> FileReport {
    FileReport {
        file: file.to_string(),
        path: cur.path.clone(),
        status,
        action,
        sha256: cur.sha.clone(),
        sha256_after: None,
        symlink: cur.link.clone(),
        applied: vec![],
        unmatched: vec![],
        pinned: None,
        source: None,
        diff: None,
        breakages: None,
        change: None,
    }
}

/// The manifest entry and backup for replacing `cur`: keeps the recorded original when `cur` is
/// our own earlier output, else `cur` is the original.
fn write_change(file: &str, cur: &Current, man: &Manifest, new: Vec<u8>, source: &str, applied: Vec<String>) -> Result<Change> {
    let perms = fsx::permissions(&cur.path).ok();
    let (entry, backup) = match man.files.get(file).filter(|e| e.patched_sha256 == cur.sha) {
        Some(old) => (Entry { patched_sha256: sha256_hex(&new), source: source.into(), applied, tool_version: env!("CARGO_PKG_VERSION").into(), ..old.clone() }, None),
        None => {
            let backup = cur.link.is_none().then(|| cur.bytes.clone());
            (
                Entry {
                    original_sha256: cur.sha.clone(),
                    patched_sha256: sha256_hex(&new),
                    symlink_target: cur.link.clone(),
                    backup: backup.as_ref().map(|_| format!("{file}.orig")),
                    source: source.into(),
                    applied,
                    tool_version: env!("CARGO_PKG_VERSION").into(),
                },
                backup,
            )
        }
    };
    Ok(Change::Write { bytes: new, entry, backup, perms })
}

/// Plans `apply` for one target: reads and hashes every file, asks the engine (or the fork).
fn plan_apply(engine: &Engine, t: &Target, opts: &Options, with_diff: bool) -> Result<TargetReport> {
    let man = Manifest::load(&t.dir)?;
    let mut rep = TargetReport::new(t);
    rep.manifest = Some(man.clone());
    let popts = PatchOptions { allow_unpinned: opts.allow_unpinned };
    for file in &t.files {
        let cur = read_current(&t.dir, file)?;
        // A fork pins the exact bytes it wants; our rules are not consulted for that file.
        if let Some((fork, pin)) = opts.fork.and_then(|f| f.spec.pin(file).map(|p| (f, p))) {
            let url = fork.spec.url(t.model.as_deref(), file)?;
            if cur.sha.eq_ignore_ascii_case(pin) {
                let mut r = base_report(file, &cur, FileStatus::Fork, Action::AlreadyPatched);
                r.source = Some(url);
                rep.files.push(r);
                continue;
            }
            let bytes = fork.fetcher.fetch(&url, pin)?;
            let mut r = base_report(file, &cur, status_of(engine, file, &cur.bytes), Action::Patch);
            r.sha256_after = Some(sha256_hex(&bytes));
            r.source = Some(url.clone());
            if with_diff {
                r.diff = Some(unified_diff(&cur.path, &cur.bytes, &bytes));
            }
            r.change = Some(write_change(file, &cur, &man, bytes, "fork", vec![url])?);
            rep.files.push(r);
            continue;
        }
        if !engine.targets(file) {
            rep.files.push(base_report(file, &cur, FileStatus::Unknown, Action::NotTargeted));
            continue;
        }
        let status = status_of(engine, file, &cur.bytes);
        let (source_bytes, outcome) = match engine.classify(file, &cur.bytes) {
            Status::Patched(_) => {
                rep.files.push(base_report(file, &cur, status, Action::AlreadyPatched));
                continue;
            }
            Status::Marked { from_sha256 } => {
                // Patched by another ruleset: re-patch from the original if we still have it.
                let from = from_sha256.or_else(|| marker_origin(&cur.bytes)).unwrap_or_else(|| "unknown".into());
                let Some((orig, _)) = find_original(&t.dir, file, &man, &from) else {
                    return Err(CacheError::NoBackup { path: cur.path.clone(), sha256: from });
                };
                let out = engine.patch(file, &orig, &popts).map_err(|e| CacheError::Patch { path: cur.path.clone(), err: e })?;
                (Some(orig), out)
            }
            _ => (None, engine.patch(file, &cur.bytes, &popts).map_err(|e| CacheError::Patch { path: cur.path.clone(), err: e })?),
        };
        match outcome {
            Outcome::AlreadyPatched => rep.files.push(base_report(file, &cur, status, Action::AlreadyPatched)),
            Outcome::NotTargeted => rep.files.push(base_report(file, &cur, status, Action::NotTargeted)),
            Outcome::Patched { bytes, applied, unmatched, pinned } => {
                if bytes == cur.bytes {
                    rep.files.push(base_report(file, &cur, status, Action::AlreadyPatched));
                    continue;
                }
                let mut r = base_report(file, &cur, status, Action::Patch);
                r.sha256_after = Some(sha256_hex(&bytes));
                r.applied = applied.clone();
                r.unmatched = unmatched;
                r.pinned = Some(pinned);
                r.source = Some("rules".into());
                if with_diff {
                    r.diff = Some(unified_diff(&cur.path, &cur.bytes, &bytes));
                }
                let mut change = write_change(file, &cur, &man, bytes, "rules", applied)?;
                // Re-patching an outdated file: the manifest may not know it; the original we
                // found is what revert must restore.
                if let (Some(orig), Change::Write { entry, backup, .. }) = (source_bytes, &mut change) {
                    let osha = sha256_hex(&orig);
                    if entry.original_sha256 != osha {
                        let link = find_original(&t.dir, file, &man, &osha).and_then(|(_, l)| l);
                        entry.original_sha256 = osha;
                        entry.symlink_target = link.clone();
                        entry.backup = link.is_none().then(|| format!("{file}.orig"));
                        *backup = link.is_none().then_some(orig);
                    }
                }
                r.change = Some(change);
                rep.files.push(r);
            }
        }
    }
    Ok(rep)
}

/// Plans `revert` for one target.
fn plan_revert(engine: &Engine, t: &Target, opts: &Options) -> Result<TargetReport> {
    let man = Manifest::load(&t.dir)?;
    let mut rep = TargetReport::new(t);
    rep.manifest = Some(man.clone());
    let names: BTreeSet<&str> = t.files.iter().map(String::as_str).chain(man.files.keys().map(String::as_str)).collect();
    for file in names {
        let cur = read_current(&t.dir, file)?;
        let status = status_of(engine, file, &cur.bytes);
        let entry = man.files.get(file);
        let origin = match entry {
            Some(e) => {
                if cur.sha == e.original_sha256 && cur.link == e.symlink_target {
                    let mut r = base_report(file, &cur, status, Action::AlreadyOriginal);
                    r.change = Some(Change::Forget);
                    rep.files.push(r);
                    continue;
                }
                let ours = cur.sha == e.patched_sha256 || matches!(status, FileStatus::Patched | FileStatus::Outdated);
                if !ours && !opts.force {
                    return Err(CacheError::ChangedSincePatch { path: cur.path.clone(), sha256: cur.sha.clone() });
                }
                e.original_sha256.clone()
            }
            None => match marker_origin(&cur.bytes) {
                Some(sha) => sha,
                None => {
                    rep.files.push(base_report(file, &cur, status, Action::AlreadyOriginal));
                    continue;
                }
            },
        };
        let Some((orig, link)) = find_original(&t.dir, file, &man, &origin) else {
            // Tell a damaged backup from a missing one.
            if let Some(e) = entry {
                let p = match (&e.symlink_target, &e.backup) {
                    (Some(l), _) => Some(t.dir.join(l)),
                    (None, Some(b)) => Some(manifest::dir(&t.dir).join(b)),
                    _ => None,
                };
                if let Some(Ok(b)) = p.as_ref().map(std::fs::read) {
                    return Err(CacheError::BadBackup { path: p.unwrap_or_default(), expected: origin, found: sha256_hex(&b) });
                }
            }
            return Err(CacheError::NoBackup { path: cur.path.clone(), sha256: origin });
        };
        let mut r = base_report(file, &cur, status, Action::Revert);
        r.sha256_after = Some(sha256_hex(&orig));
        r.change = Some(match link {
            Some(l) => {
                r.symlink = Some(l.clone());
                Change::RestoreSymlink { target: l }
            }
            None => Change::RestoreBytes { bytes: orig, perms: fsx::permissions(&cur.path).ok() },
        });
        rep.files.push(r);
    }
    Ok(rep)
}

fn write_apply(t: &TargetReport) -> Result<()> {
    let mut man = Manifest::load(&t.dir)?;
    let mut writes = Vec::new();
    for f in &t.files {
        if let Some(Change::Write { bytes, entry, backup, perms }) = &f.change {
            if let Some(b) = backup {
                let d = manifest::dir(&t.dir);
                std::fs::create_dir_all(&d).map_err(|e| CacheError::write(&d, e))?;
                fsx::replace_with_bytes(&manifest::backup_path(&t.dir, &f.file), b, None)?;
            }
            man.files.insert(f.file.clone(), entry.clone());
            writes.push((&f.path, bytes, perms));
        }
    }
    man.save(&t.dir)?;
    for (path, bytes, perms) in writes {
        fsx::replace_with_bytes(path, bytes, perms.clone())?;
    }
    Ok(())
}

fn write_revert(t: &TargetReport) -> Result<()> {
    let mut man = Manifest::load(&t.dir)?;
    for f in &t.files {
        match &f.change {
            Some(Change::RestoreSymlink { target }) => fsx::replace_with_symlink(&f.path, target)?,
            Some(Change::RestoreBytes { bytes, perms }) => fsx::replace_with_bytes(&f.path, bytes, perms.clone())?,
            _ => {}
        }
    }
    let mut dropped = Vec::new();
    for f in &t.files {
        if f.change.is_some() {
            if let Some(e) = man.files.remove(&f.file) {
                dropped.extend(e.backup);
            }
        }
    }
    man.save(&t.dir)?;
    for b in dropped {
        let _ = std::fs::remove_file(manifest::dir(&t.dir).join(b));
    }
    if man.files.is_empty() {
        fsx::clean_temps(&manifest::dir(&t.dir));
        let _ = std::fs::remove_dir(manifest::dir(&t.dir));
    }
    Ok(())
}

/// Plans every target; the first error stops the run (nothing has been written yet).
fn plan_all(
    targets: &[Target],
    pb: &ProgressBar,
    plan: impl Fn(&Target) -> Result<TargetReport>,
) -> Result<Vec<TargetReport>> {
    pb.set_length(targets.len() as u64);
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        pb.set_message(t.dir.display().to_string());
        match plan(t) {
            Ok(rep) => out.push(rep),
            // Planning reads without the lock, so another process may be half-way through this
            // folder (a backup already removed, its file not yet restored). Plan again under
            // the lock before calling it an error; a folder we cannot lock keeps the first error.
            Err(first) => {
                let Ok(_lock) = FolderLock::acquire(&t.dir, fsx::LOCK_TIMEOUT) else { return Err(first) };
                out.push(plan(t)?);
            }
        }
        pb.inc(1);
    }
    Ok(out)
}

/// Locks the targets that have work (in path order), re-plans them under the locks, writes.
fn commit(
    reports: &mut [TargetReport],
    targets: &[Target],
    plan: impl Fn(&Target) -> Result<TargetReport>,
    write: impl Fn(&TargetReport) -> Result<()>,
) -> Result<()> {
    let mut idx: Vec<usize> = (0..reports.len()).filter(|&i| reports[i].has_work()).collect();
    idx.sort_by(|&a, &b| targets[a].dir.cmp(&targets[b].dir));
    let mut locks: Vec<FolderLock> = Vec::with_capacity(idx.len());
    for &i in &idx {
        let dir = &targets[i].dir;
        locks.push(FolderLock::acquire(dir, fsx::LOCK_TIMEOUT)?);
        fsx::clean_temps(dir);
        fsx::clean_temps(&manifest::dir(dir));
        fsx::check_writable(dir)?;
    }
    // Re-read and re-hash under the locks; re-plan only what moved since planning.
    let mut fresh = Vec::with_capacity(idx.len());
    for &i in &idx {
        if reports[i].still_current() {
            fresh.push((i, reports[i].clone()));
        } else {
            fresh.push((i, plan(&targets[i])?));
        }
    }
    for (i, rep) in fresh {
        if rep.has_work() {
            write(&rep)?;
        }
        reports[i] = rep;
    }
    drop(locks);
    Ok(())
}

/// `apply` (and with `dry_run`, `diff`): patch every target, or show what would change.
pub fn apply(engine: &Engine, targets: &[Target], opts: &Options, dry_run: bool, pb: &ProgressBar) -> Result<Report> {
    let plan = |t: &Target| plan_apply(engine, t, opts, dry_run);
    let mut reports = plan_all(targets, pb, plan)?;
    if !dry_run {
        commit(&mut reports, targets, plan, write_apply)?;
    }
    Ok(Report { targets: reports })
}

/// `check`: what `apply` would change, without writing.
pub fn check(engine: &Engine, targets: &[Target], opts: &Options, pb: &ProgressBar) -> Result<Report> {
    let reports = plan_all(targets, pb, |t| plan_apply(engine, t, opts, false))?;
    Ok(Report { targets: reports })
}

/// `revert`: restore the original bytes and symlinks.
pub fn revert(engine: &Engine, targets: &[Target], opts: &Options, dry_run: bool, pb: &ProgressBar) -> Result<Report> {
    let plan = |t: &Target| plan_revert(engine, t, opts);
    let mut reports = plan_all(targets, pb, plan)?;
    if !dry_run {
        commit(&mut reports, targets, plan, write_revert)?;
    }
    Ok(Report { targets: reports })
}

/// `doctor`: the state of every file and, for unpatched ones, the breakages `version` brings.
/// Never fails on a single bad file: its error is returned in the list of problems.
pub fn doctor(engine: &Engine, targets: &[Target], version: Option<&Version>, pb: &ProgressBar) -> Result<(Report, Vec<String>)> {
    let mut problems = Vec::new();
    pb.set_length(targets.len() as u64);
    let mut reps = Vec::new();
    for t in targets {
        let mut rep = TargetReport::new(t);
        let man = match Manifest::load(&t.dir) {
            Ok(m) => m,
            Err(e) => {
                problems.push(e.to_string());
                Manifest::default()
            }
        };
        for file in &t.files {
            let cur = match read_current(&t.dir, file) {
                Ok(c) => c,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            let mut status = status_of(engine, file, &cur.bytes);
            // Our own output for an unpinned file carries the marker but is in no lock: the
            // manifest says we wrote exactly these bytes.
            let ours = man.files.get(file.as_str()).is_some_and(|e| e.patched_sha256 == cur.sha);
            if status == FileStatus::Outdated && ours {
                status = FileStatus::Patched;
            }
            let action = match status {
                FileStatus::Patched | FileStatus::Fork => Action::AlreadyPatched,
                _ => Action::Patch,
            };
            let mut r = base_report(file, &cur, status, action);
            if let (Some(v), FileStatus::Original | FileStatus::Unknown) = (version, status) {
                match engine.breakages(file, &cur.bytes, v) {
                    Ok(hits) => {
                        r.breakages = Some(hits.into_iter().map(|h| BreakageReport { id: h.id.to_string(), title: h.title.to_string() }).collect())
                    }
                    Err(e) => problems.push(CacheError::Patch { path: cur.path.clone(), err: e }.to_string()),
                }
            }
            rep.files.push(r);
        }
        reps.push(rep);
        pb.inc(1);
    }
    Ok((Report { targets: reps }, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_is_found() {
        let sha = "a".repeat(64);
        let f = format!("# ocr-patch: patched v1 from sha256:{sha}\nimport x\n");
        assert_eq!(marker_origin(f.as_bytes()), Some(sha));
        assert_eq!(marker_origin(b"import x\n"), None);
        assert_eq!(marker_origin(b"# ocr-patch: patched v1 from sha256:abc\n"), None);
    }

    #[test]
    fn blobs_path_from_snapshot() {
        let (b, up) = blobs_of(Path::new("/c/models--a--b/snapshots/123")).unwrap();
        assert_eq!(b, PathBuf::from("/c/models--a--b/blobs"));
        assert_eq!(up, PathBuf::from("../.."));
        let (_, up) = blobs_of(Path::new("/c/models--a--b/snapshots/123/sub")).unwrap();
        assert_eq!(up, PathBuf::from("../../.."));
        assert!(blobs_of(Path::new("/c/transformers_modules/a/b/c")).is_none());
    }
}
