//! The Hub client: downloads a model repo's files at one revision into the hub cache, laid out
//! exactly as huggingface_hub lays them out, so transformers later finds everything cached.
//!
//! Layout (huggingface_hub `file_download.py`):
//! `<hub>/models--org--name/blobs/<etag>`, `snapshots/<commit>/<file>` (a relative symlink to
//! the blob), `refs/<revision>` (the commit, when the revision is a branch or tag), and the
//! download lock `<hub>/.locks/models--org--name/<etag>.lock` (huggingface_hub's `FileLock` is a
//! `flock`, so taking it here keeps a concurrent `from_pretrained` out of the same blob).
//!
//! Protocol: `GET {endpoint}/api/models/{repo}/revision/{rev}` gives the commit (`sha`) and the
//! file list (`siblings`); `HEAD {endpoint}/{repo}/resolve/{commit}/{file}` answers with
//! `X-Repo-Commit`, `ETag` (or `X-Linked-Etag` and `X-Linked-Size` for LFS files, with a redirect
//! to the storage host), and `GET` the same URL downloads it (redirects followed, `Range` to
//! resume). Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`).
//!
//! Order, so that a refusal writes nothing: list, then download every small file (the remote
//! code) into memory and verify it (its git-sha1 or sha256 ETag, then our lock for the files the
//! engine patches); then stream large files to `blobs/<etag>.incomplete` (resumed with `Range`,
//! checked against their sha256 ETag before the rename into place); only then write the small
//! blobs, the snapshot symlinks and the ref. Every write is a temp file + rename, so a crash or
//! a full disk leaves no half-written file under a name anyone reads.
//!
//! Honours `HF_ENDPOINT`, `HF_TOKEN` (or the token file `$HF_HOME/token`), `HF_HUB_OFFLINE`
//! and the usual proxy variables (reqwest reads `HTTPS_PROXY`, `NO_PROXY` & co).
//! Must not touch: rule logic (the engine only says whether bytes are pinned).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fs4::fs_std::FileExt;
use indicatif::ProgressBar;
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{HeaderMap, AUTHORIZATION, RANGE};
use reqwest::StatusCode;
use serde::Serialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::error::{error_chain, is_disk_full};
use super::fsx;
use super::layout::hub_folder_name;
use crate::patch::{sha256_hex, Engine, Status};

/// Files at most this large (and not LFS) are downloaded into memory and verified before
/// anything is written; larger ones are streamed to `blobs/<etag>.incomplete`.
pub const SMALL_FILE: u64 = 8 << 20;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{repo}@{revision}: HF_HUB_OFFLINE is set and this revision is not in {}; unset HF_HUB_OFFLINE to download it (or point HF_ENDPOINT at a mirror, see `ocr-patch mirror`)", cache.display())]
    Offline { repo: String, revision: String, cache: PathBuf },

    #[error("{endpoint}: cannot reach the Hub ({msg}); check the network and proxy settings, or use --offline with a filled cache, or serve the files with `ocr-patch mirror` and set HF_ENDPOINT")]
    Network { endpoint: String, msg: String },

    #[error("{url}: the server refused access ({status}); {hint}")]
    Auth { url: String, status: u16, hint: &'static str },

    #[error("{repo}: no such repository on {endpoint} (404); check the name (org/name)")]
    RepoNotFound { repo: String, endpoint: String },

    #[error("{repo}: revision `{revision}` not found (404); check --revision (a branch, tag or commit of this repo)")]
    RevisionNotFound { repo: String, revision: String },

    #[error("{repo}@{revision}: file `{file}` not found (404); the repo listed it, so it may have changed meanwhile: run again")]
    EntryNotFound { repo: String, revision: String, file: String },

    #[error("{url}: the server answered {status} after {tries} tries; try again later")]
    Server { url: String, status: u16, tries: u32 },

    #[error("{url}: unexpected answer ({msg}); is HF_ENDPOINT a Hugging Face Hub (or an `ocr-patch mirror`)?")]
    Protocol { url: String, msg: String },

    #[error("{file}: the downloaded bytes do not match {what} (expected {expected}, got {got}); refused, nothing was written: the server or a proxy altered the file, try again or check the mirror")]
    Corrupt { file: String, what: &'static str, expected: String, got: String },

    #[error("{file}: sha256 {sha256} is not pinned in any lock; refused, nothing was written: the repo changed upstream (run `ocr-patch doctor` after fetching with --allow-unpinned to inspect it), or pass --lock FILE with its pin")]
    Unpinned { file: String, sha256: String },

    #[error("{}: no space left on the device; nothing was half-written (a large file's partial download stays as `<blob>.incomplete` and resumes next time): free some space and run again", path.display())]
    DiskFull { path: PathBuf },

    #[error("{}: cannot write ({source}); is the cache read-only? run as its owner or pass --cache-dir", path.display())]
    Write { path: PathBuf, source: io::Error },

    #[error("{}: timeout waiting for huggingface_hub's download lock; is another download of this file stuck? delete the lock file if not", path.display())]
    LockTimeout { path: PathBuf },
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;

fn write_err(path: &Path, e: io::Error) -> HubError {
    if is_disk_full(&e) {
        HubError::DiskFull { path: path.to_path_buf() }
    } else {
        HubError::Write { path: path.to_path_buf(), source: e }
    }
}

/// Atomically puts `bytes` at `dest` (temp file in the same folder, fsync, rename), mode 0644.
fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let werr = |e: io::Error| write_err(dest, e);
    let mut tmp = tempfile::Builder::new().prefix(fsx::TEMP_PREFIX).tempfile_in(dir).map_err(werr)?;
    tmp.write_all(bytes).map_err(werr)?;
    tmp.as_file().set_permissions(fs::Permissions::from_mode(0o644)).map_err(werr)?;
    tmp.as_file().sync_all().map_err(werr)?;
    tmp.persist(dest).map_err(|e| werr(e.error))?;
    Ok(())
}

/// Atomically puts a symlink with text `target` at `dest`.
fn symlink_atomic(dest: &Path, target: &Path) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let werr = |e: io::Error| write_err(dest, e);
    let tmp = tempfile::Builder::new().prefix(fsx::TEMP_PREFIX).make_in(dir, |p| std::os::unix::fs::symlink(target, p)).map_err(werr)?;
    tmp.persist(dest).map_err(|e| werr(e.error))?;
    Ok(())
}

/// Where and how to talk to the Hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub endpoint: String,
    pub token: Option<String>,
    pub offline: bool,
    /// Extra tries after a 5xx, a timeout or a cut connection.
    pub retries: u32,
    /// First pause between tries; doubled each time.
    pub backoff: Duration,
    pub connect_timeout: Duration,
}

fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

impl HubConfig {
    /// Reads `HF_ENDPOINT`, `HF_TOKEN` (then `HUGGING_FACE_HUB_TOKEN`, then the token file
    /// `$HF_TOKEN_PATH` or `$HF_HOME/token`), `HF_HUB_OFFLINE` as huggingface_hub does.
    pub fn from_env(env: impl Fn(&str) -> Option<String>, hf_home: &Path) -> HubConfig {
        let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let endpoint = get("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.into()).trim_end_matches('/').to_string();
        let token = get("HF_TOKEN").or_else(|| get("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let path = get("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
            fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let offline = get("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v));
        HubConfig {
            endpoint,
            token: token.map(|t| t.trim().to_string()),
            offline,
            retries: 4,
            backoff: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// What to download.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub repo: String,
    pub revision: String,
    /// Every file of the repo, not only the remote code (`*.py`) and `config.json`.
    pub all: bool,
    /// Accept remote-code files whose sha256 no lock pins.
    pub allow_unpinned: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FetchedFile {
    pub file: String,
    pub etag: String,
    pub size: u64,
    /// False when the blob was already in the cache.
    pub downloaded: bool,
    /// Pinned, patched (a patched mirror), unpinned or not-targeted.
    pub pin: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fetched {
    pub repo: String,
    pub revision: String,
    pub commit: String,
    pub snapshot: PathBuf,
    pub offline: bool,
    pub files: Vec<FetchedFile>,
}

/// True for the files fetched without `--all`: the remote code and the config.
pub fn is_code_file(name: &str) -> bool {
    name.ends_with(".py") || name.rsplit('/').next() == Some("config.json")
}

/// Percent-encodes a URL path segment (a revision such as `refs/pr/1` becomes `refs%2Fpr%2F1`);
/// with `keep_slash`, `/` is kept (a file path inside the repo).
pub fn quote(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let ok = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (keep_slash && b == b'/');
        if ok {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `"abc"` or `W/"abc"` -> `abc`.
pub fn normalize_etag(v: &str) -> String {
    v.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// The id git (and the Hub, as the ETag of a non-LFS file) gives these bytes.
pub fn git_blob_sha1(bytes: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex::encode(h.finalize())
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks bytes against an ETag that is a content hash (git sha1 or sha256); other ETags say
/// nothing about the content and pass.
fn check_etag(file: &str, etag: &str, bytes: &[u8]) -> Result<()> {
    let (what, got) = if is_hex(etag, 40) {
        ("the git sha1 ETag the server announced", git_blob_sha1(bytes))
    } else if is_hex(etag, 64) {
        ("the sha256 ETag the server announced", sha256_hex(bytes))
    } else {
        return Ok(());
    };
    if !got.eq_ignore_ascii_case(etag) {
        return Err(HubError::Corrupt { file: file.into(), what, expected: etag.into(), got });
    }
    Ok(())
}

/// What the lock says of a file's bytes; an error when a targeted file is not pinned.
fn check_pin(engine: &Engine, file: &str, bytes: &[u8], allow_unpinned: bool) -> Result<&'static str> {
    let name = file.rsplit('/').next().unwrap_or(file);
    if !engine.targets(name) {
        return Ok("not-targeted");
    }
    match engine.classify(name, bytes) {
        Status::Original(_) => Ok("pinned"),
        Status::Patched(_) => Ok("patched"),
        _ if allow_unpinned => Ok("unpinned"),
        _ => Err(HubError::Unpinned { file: file.into(), sha256: sha256_hex(bytes) }),
    }
}

/// An exclusive `flock` on huggingface_hub's `.locks/models--org--name/<etag>.lock`.
pub struct HfLock {
    file: File,
}

impl HfLock {
    pub fn acquire(path: &Path, timeout: Duration) -> Result<HfLock> {
        if let Some(d) = path.parent() {
            fs::create_dir_all(d).map_err(|e| write_err(d, e))?;
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(|e| write_err(path, e))?;
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            match FileExt::try_lock_exclusive(&file) {
                Ok(true) => return Ok(HfLock { file }),
                Ok(false) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(write_err(path, e)),
            }
            if start.elapsed() >= timeout {
                return Err(HubError::LockTimeout { path: path.to_path_buf() });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

impl Drop for HfLock {
    fn drop(&mut self) {
        let _ = FileExt::unlock(&self.file);
    }
}

/// `<hub>/.locks/models--org--name/<etag>.lock`.
pub fn hf_lock_path(hub: &Path, repo: &str, etag: &str) -> PathBuf {
    hub.join(".locks").join(hub_folder_name(repo)).join(format!("{etag}.lock"))
}

/// One file's metadata from a HEAD of its resolve URL.
#[derive(Debug, Clone)]
struct Meta {
    file: String,
    etag: String,
    size: u64,
    lfs: bool,
}

pub struct Hub {
    cfg: HubConfig,
    client: Client,
    /// For `HEAD`: redirects are reported, not followed (the LFS metadata is on the 302).
    no_redirect: Client,
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Result<Hub> {
        let client = Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(None::<Duration>)
            .user_agent(concat!("ocr-patch/", env!("CARGO_PKG_VERSION"), "; hf_hub/compatible"))
            .build()
            .map_err(|e| HubError::Network { endpoint: cfg.endpoint.clone(), msg: format!("cannot start the https client: {}", error_chain(&e)) })?;
        let no_redirect = Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| HubError::Network { endpoint: cfg.endpoint.clone(), msg: format!("cannot start the https client: {}", error_chain(&e)) })?;
        Ok(Hub { cfg, client, no_redirect })
    }

    pub fn config(&self) -> &HubConfig {
        &self.cfg
    }

    fn authed(&self, rb: RequestBuilder) -> RequestBuilder {
        match &self.cfg.token {
            Some(t) => rb.header(AUTHORIZATION, format!("Bearer {t}")),
            None => rb,
        }
    }

    /// Sends a request, retrying 5xx, 429, timeouts and cut connections with backoff.
    fn send(&self, url: &str, make: &dyn Fn() -> RequestBuilder) -> Result<Response> {
        let mut pause = self.cfg.backoff;
        let mut tries = 0;
        let mut refused = 0;
        loop {
            tries += 1;
            let last = tries > self.cfg.retries;
            match self.authed(make()).send() {
                // A refused connection is retried once only: no network should fail fast.
                Err(e) if e.is_connect() && !e.is_timeout() && refused >= 1 => {
                    return Err(HubError::Network { endpoint: self.cfg.endpoint.clone(), msg: error_chain(&e) })
                }
                Err(e) if e.is_connect() && !e.is_timeout() => refused += 1,
                Ok(r) if (r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS) && !last => {}
                Ok(r) if r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS => {
                    return Err(HubError::Server { url: url.into(), status: r.status().as_u16(), tries })
                }
                Ok(r) => return Ok(r),
                Err(e) if !last && (e.is_timeout() || e.is_connect() || e.is_request() || e.is_body()) => {}
                Err(e) => return Err(HubError::Network { endpoint: self.cfg.endpoint.clone(), msg: error_chain(&e) }),
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(8));
        }
    }

    /// Maps a non-success answer to an error that says what to do.
    fn fail(&self, url: &str, r: &Response, repo: &str, revision: &str, file: Option<&str>) -> HubError {
        let status = r.status().as_u16();
        let code = header(r.headers(), "x-error-code").unwrap_or_default();
        match (status, code.as_str()) {
            (_, "RevisionNotFound") => HubError::RevisionNotFound { repo: repo.into(), revision: revision.into() },
            (_, "EntryNotFound") => HubError::EntryNotFound { repo: repo.into(), revision: revision.into(), file: file.unwrap_or("?").into() },
            (401, _) if self.cfg.token.is_some() => HubError::Auth { url: url.into(), status, hint: "HF_TOKEN is wrong or expired (or the repo does not exist): set HF_TOKEN to a valid read token" },
            (401, _) => HubError::Auth { url: url.into(), status, hint: "the repo is private or does not exist: set HF_TOKEN to a token with read access" },
            (_, "RepoNotFound") | (404, _) if file.is_none() => HubError::RepoNotFound { repo: repo.into(), endpoint: self.cfg.endpoint.clone() },
            (404, _) => HubError::EntryNotFound { repo: repo.into(), revision: revision.into(), file: file.unwrap_or("?").into() },
            (_, "GatedRepo") => HubError::Auth {
                url: url.into(),
                status,
                hint: "the repo is gated: accept its terms on the Hub, then set HF_TOKEN to a token of that account",
            },
            (403, _) => HubError::Auth { url: url.into(), status, hint: "HF_TOKEN has no read access to this repo: use a token with read access" },
            _ => HubError::Protocol { url: url.into(), msg: format!("status {status}") },
        }
    }

    /// `GET /api/models/{repo}/revision/{rev}`: the commit and the file list.
    pub fn list(&self, repo: &str, revision: &str) -> Result<(String, Vec<String>)> {
        let url = format!("{}/api/models/{}/revision/{}", self.cfg.endpoint, repo, quote(revision, false));
        let r = self.send(&url, &|| self.client.get(&url))?;
        if !r.status().is_success() {
            return Err(self.fail(&url, &r, repo, revision, None));
        }
        let body = r.bytes().map_err(|e| HubError::Network { endpoint: self.cfg.endpoint.clone(), msg: error_chain(&e) })?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| HubError::Protocol { url: url.clone(), msg: format!("not JSON: {e}") })?;
        let sha = v.get("sha").and_then(|s| s.as_str()).ok_or_else(|| HubError::Protocol { url: url.clone(), msg: "no `sha` in the answer".into() })?;
        let files = v
            .get("siblings")
            .and_then(|s| s.as_array())
            .ok_or_else(|| HubError::Protocol { url: url.clone(), msg: "no `siblings` in the answer".into() })?
            .iter()
            .filter_map(|s| s.get("rfilename").and_then(|f| f.as_str()).map(str::to_string))
            .collect();
        Ok((sha.to_string(), files))
    }

    fn resolve_url(&self, repo: &str, commit: &str, file: &str) -> String {
        format!("{}/{}/resolve/{}/{}", self.cfg.endpoint, repo, quote(commit, false), quote(file, true))
    }

    /// `HEAD` of a file's resolve URL, without following redirects (as huggingface_hub does).
    fn head(&self, repo: &str, revision: &str, commit: &str, file: &str) -> Result<Meta> {
        let url = self.resolve_url(repo, commit, file);
        let r = self.send(&url, &|| self.no_redirect.head(&url).header("accept-encoding", "identity"))?;
        if !(r.status().is_success() || r.status().is_redirection()) {
            return Err(self.fail(&url, &r, repo, revision, Some(file)));
        }
        let h = r.headers();
        let linked = header(h, "x-linked-etag");
        let etag = linked.clone().or_else(|| header(h, "etag")).map(|e| normalize_etag(&e));
        let etag = etag.filter(|e| !e.is_empty()).ok_or_else(|| HubError::Protocol { url: url.clone(), msg: "no ETag header".into() })?;
        if etag.contains('/') || etag.contains("..") {
            return Err(HubError::Protocol { url, msg: format!("ETag `{etag}` is not a blob name") });
        }
        let size = header(h, "x-linked-size").or_else(|| header(h, "content-length")).and_then(|s| s.parse().ok()).unwrap_or(0);
        if let Some(c) = header(h, "x-repo-commit") {
            if c != commit {
                return Err(HubError::Protocol { url, msg: format!("X-Repo-Commit is {c}, the revision listed {commit}") });
            }
        }
        Ok(Meta { file: file.into(), etag, size, lfs: linked.is_some() })
    }

    /// Downloads a small file into memory.
    fn get_bytes(&self, repo: &str, revision: &str, commit: &str, m: &Meta, pb: &ProgressBar) -> Result<Vec<u8>> {
        let url = self.resolve_url(repo, commit, &m.file);
        let mut tries = 0;
        loop {
            tries += 1;
            let r = self.send(&url, &|| self.client.get(&url).timeout(Duration::from_secs(120)))?;
            if !r.status().is_success() {
                return Err(self.fail(&url, &r, repo, revision, Some(&m.file)));
            }
            match r.bytes() {
                Ok(b) => {
                    pb.inc(b.len() as u64);
                    return Ok(b.to_vec());
                }
                Err(e) if tries <= self.cfg.retries => {
                    let _ = e;
                    std::thread::sleep(self.cfg.backoff);
                }
                Err(e) => return Err(HubError::Network { endpoint: self.cfg.endpoint.clone(), msg: error_chain(&e) }),
            }
        }
    }

    /// Streams a large file to `part`, resuming with `Range` from what is there.
    fn get_to_file(&self, repo: &str, revision: &str, commit: &str, m: &Meta, part: &Path, pb: &ProgressBar) -> Result<()> {
        let url = self.resolve_url(repo, commit, &m.file);
        let mut f = OpenOptions::new().create(true).append(true).open(part).map_err(|e| write_err(part, e))?;
        let mut tries = 0;
        loop {
            tries += 1;
            let have = f.metadata().map(|md| md.len()).unwrap_or(0);
            let r = self.send(&url, &|| {
                let rb = self.client.get(&url);
                if have > 0 { rb.header(RANGE, format!("bytes={have}-")) } else { rb }
            })?;
            let status = r.status();
            if status == StatusCode::RANGE_NOT_SATISFIABLE || (have > 0 && status == StatusCode::OK) {
                // The server ignores or refuses the range: start over.
                f.set_len(0).map_err(|e| write_err(part, e))?;
                f.seek(SeekFrom::Start(0)).map_err(|e| write_err(part, e))?;
                if status == StatusCode::RANGE_NOT_SATISFIABLE {
                    continue;
                }
            } else if !status.is_success() {
                return Err(self.fail(&url, &r, repo, revision, Some(&m.file)));
            }
            pb.inc(f.metadata().map(|md| md.len()).unwrap_or(0));
            match copy_body(r, &mut f, part, pb) {
                Ok(()) => {
                    f.sync_all().map_err(|e| write_err(part, e))?;
                    return Ok(());
                }
                Err(BodyError::Write(e)) => return Err(e),
                Err(BodyError::Read(e)) if tries <= self.cfg.retries => {
                    let _ = e;
                    std::thread::sleep(self.cfg.backoff);
                }
                Err(BodyError::Read(e)) => return Err(HubError::Network { endpoint: self.cfg.endpoint.clone(), msg: format!("download of {} cut short: {e}", m.file) }),
            }
        }
    }

    /// Downloads `req` into the hub cache `hub` and returns what is there. See the module doc
    /// for the order that keeps a refusal from writing anything.
    pub fn fetch(&self, hub: &Path, engine: &Engine, req: &FetchRequest, pb: &ProgressBar) -> Result<Fetched> {
        let repo_dir = hub.join(hub_folder_name(&req.repo));
        if self.cfg.offline {
            return cached(hub, engine, req);
        }
        let (commit, listed) = self.list(&req.repo, &req.revision)?;
        if !is_hex(&commit, 40) {
            return Err(HubError::Protocol { url: self.cfg.endpoint.clone(), msg: format!("commit `{commit}` is not 40 hex digits") });
        }
        let wanted: Vec<String> = listed.into_iter().filter(|f| req.all || is_code_file(f)).filter(|f| safe_rel(f)).collect();
        let mut metas = Vec::new();
        for f in &wanted {
            metas.push(self.head(&req.repo, &req.revision, &commit, f)?);
        }
        let blobs = repo_dir.join("blobs");
        let have = |m: &Meta| blobs.join(&m.etag).is_file();
        pb.set_length(metas.iter().filter(|m| !have(m)).map(|m| m.size).sum());
        // 1. small files into memory, verified.
        let mut small: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut downloaded = std::collections::BTreeSet::new();
        let mut pins: BTreeMap<String, &'static str> = BTreeMap::new();
        for m in metas.iter().filter(|m| !m.lfs && m.size <= SMALL_FILE) {
            let bytes = if have(m) {
                fs::read(blobs.join(&m.etag)).map_err(|e| write_err(&blobs, e))?
            } else {
                pb.set_message(m.file.clone());
                downloaded.insert(m.file.clone());
                self.get_bytes(&req.repo, &req.revision, &commit, m, pb)?
            };
            check_etag(&m.file, &m.etag, &bytes)?;
            pins.insert(m.file.clone(), check_pin(engine, &m.file, &bytes, req.allow_unpinned)?);
            small.insert(m.file.clone(), bytes);
        }
        // 2. large files, each under huggingface_hub's lock, into blobs/ by rename.
        for m in metas.iter().filter(|m| m.lfs || m.size > SMALL_FILE) {
            pins.insert(m.file.clone(), "not-targeted");
            if have(m) {
                continue;
            }
            fs::create_dir_all(&blobs).map_err(|e| write_err(&blobs, e))?;
            let _lock = HfLock::acquire(&hf_lock_path(hub, &req.repo, &m.etag), fsx::LOCK_TIMEOUT)?;
            if have(m) {
                continue;
            }
            pb.set_message(m.file.clone());
            downloaded.insert(m.file.clone());
            let part = blobs.join(format!("{}.incomplete", m.etag));
            self.get_to_file(&req.repo, &req.revision, &commit, m, &part, pb)?;
            if is_hex(&m.etag, 64) {
                let got = sha256_file(&part).map_err(|e| write_err(&part, e))?;
                if !got.eq_ignore_ascii_case(&m.etag) {
                    let _ = fs::remove_file(&part);
                    return Err(HubError::Corrupt { file: m.file.clone(), what: "the sha256 ETag the server announced", expected: m.etag.clone(), got });
                }
            }
            set_mode(&part);
            fs::rename(&part, blobs.join(&m.etag)).map_err(|e| write_err(&part, e))?;
        }
        // 3. small blobs, snapshot links, the ref.
        let snapshot = repo_dir.join("snapshots").join(&commit);
        for m in &metas {
            let _lock = HfLock::acquire(&hf_lock_path(hub, &req.repo, &m.etag), fsx::LOCK_TIMEOUT)?;
            let blob = blobs.join(&m.etag);
            if let Some(bytes) = small.get(&m.file) {
                if !blob.is_file() {
                    fs::create_dir_all(&blobs).map_err(|e| write_err(&blobs, e))?;
                    write_atomic(&blob, bytes)?;
                }
            }
            let link = snapshot.join(&m.file);
            if fs::symlink_metadata(&link).is_ok() {
                continue; // already there (maybe a patched regular file): keep it.
            }
            let dir = link.parent().unwrap_or(&snapshot).to_path_buf();
            fs::create_dir_all(&dir).map_err(|e| write_err(&dir, e))?;
            let depth = m.file.matches('/').count() + 2;
            let mut target = PathBuf::new();
            for _ in 0..depth {
                target.push("..");
            }
            let target = target.join("blobs").join(&m.etag);
            symlink_atomic(&link, &target)?;
        }
        if req.revision != commit {
            let r = repo_dir.join("refs").join(&req.revision);
            let d = r.parent().unwrap_or(&repo_dir).to_path_buf();
            fs::create_dir_all(&d).map_err(|e| write_err(&d, e))?;
            write_atomic(&r, commit.as_bytes())?;
        }
        let files = metas
            .iter()
            .map(|m| FetchedFile {
                file: m.file.clone(),
                etag: m.etag.clone(),
                size: m.size,
                downloaded: downloaded.contains(&m.file),
                pin: pins.get(&m.file).copied().unwrap_or("not-targeted"),
            })
            .collect();
        Ok(Fetched { repo: req.repo.clone(), revision: req.revision.clone(), commit, snapshot, offline: false, files })
    }
}

/// A repo-relative path that stays inside the snapshot.
fn safe_rel(f: &str) -> bool {
    !f.is_empty() && !f.starts_with('/') && f.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// `--offline` / `HF_HUB_OFFLINE`: what the cache already holds for `req`, verified the same way.
pub fn cached(hub: &Path, engine: &Engine, req: &FetchRequest) -> Result<Fetched> {
    let repo_dir = hub.join(hub_folder_name(&req.repo));
    let offline = || HubError::Offline { repo: req.repo.clone(), revision: req.revision.clone(), cache: hub.to_path_buf() };
    let commit = if is_hex(&req.revision, 40) && repo_dir.join("snapshots").join(&req.revision).is_dir() {
        req.revision.clone()
    } else {
        fs::read_to_string(repo_dir.join("refs").join(&req.revision)).map(|s| s.trim().to_string()).map_err(|_| offline())?
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(offline());
    }
    let mut files = Vec::new();
    for e in walkdir::WalkDir::new(&snapshot).follow_links(false).into_iter().flatten() {
        if e.file_type().is_dir() {
            continue;
        }
        let Ok(rel) = e.path().strip_prefix(&snapshot) else { continue };
        let rel = rel.to_string_lossy().into_owned();
        if rel.starts_with('.') || rel.contains("/.") || !(req.all || is_code_file(&rel)) {
            continue;
        }
        let md = fs::metadata(e.path()).map_err(|_| offline())?;
        let etag = fs::read_link(e.path()).ok().and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_default();
        let pin = if md.len() <= SMALL_FILE {
            let bytes = fs::read(e.path()).map_err(|_| offline())?;
            check_pin(engine, &rel, &bytes, req.allow_unpinned)?
        } else {
            "not-targeted"
        };
        files.push(FetchedFile { file: rel, etag, size: md.len(), downloaded: false, pin });
    }
    files.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(Fetched { repo: req.repo.clone(), revision: req.revision.clone(), commit, snapshot, offline: true, files })
}

enum BodyError {
    Read(String),
    Write(HubError),
}

fn copy_body(mut r: Response, f: &mut File, part: &Path, pb: &ProgressBar) -> std::result::Result<(), BodyError> {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = r.read(&mut buf).map_err(|e| BodyError::Read(e.to_string()))?;
        if n == 0 {
            return Ok(());
        }
        f.write_all(&buf[..n]).map_err(|e| BodyError::Write(write_err(part, e)))?;
        pb.inc(n as u64);
    }
}

fn sha256_file(p: &Path) -> io::Result<String> {
    let mut f = File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

fn set_mode(p: &Path) {
    let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o644));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_etags() {
        assert_eq!(quote("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(quote("sub dir/a.py", true), "sub%20dir/a.py");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(git_blob_sha1(b""), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
        assert!(is_code_file("a/b.py") && is_code_file("config.json") && !is_code_file("model.safetensors"));
        assert!(safe_rel("a/b.py") && !safe_rel("../x") && !safe_rel("/etc/passwd") && !safe_rel("a//b"));
    }

    #[test]
    fn env_is_read_like_huggingface_hub() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("token"), "hf_file\n").unwrap();
        let c = HubConfig::from_env(|_| None, t.path());
        assert_eq!((c.endpoint.as_str(), c.token.as_deref(), c.offline), (DEFAULT_ENDPOINT, Some("hf_file"), false));
        let c = HubConfig::from_env(
            |k| match k {
                "HF_ENDPOINT" => Some("http://127.0.0.1:9/".into()),
                "HF_TOKEN" => Some("hf_env".into()),
                "HF_HUB_OFFLINE" => Some("yes".into()),
                _ => None,
            },
            t.path(),
        );
        assert_eq!((c.endpoint.as_str(), c.token.as_deref(), c.offline), ("http://127.0.0.1:9", Some("hf_env"), true));
    }
}
