//! A Hub stand-in on loopback: serves one model folder with the Hub's download protocol, so
//! `HF_ENDPOINT=http://127.0.0.1:PORT` makes huggingface_hub, transformers and `ocr-patch fetch`
//! download from it. Used as an air-gapped (optionally pre-patched) mirror, and as the test
//! server of the Rust and Python suites.
//!
//! Routes (what huggingface_hub 0.2x and 1.x call):
//! - `GET/HEAD /{repo}/resolve/{rev}/{file}`: the bytes, with `X-Repo-Commit`, `ETag` (git sha1
//!   of the bytes), `Content-Length`, `Accept-Ranges`; `Range: bytes=a-b` gives 206. A large
//!   file (weights, or bigger than `large_from`) is answered as the Hub answers LFS files: a 302
//!   to `/lfs/{sha256}` on the other loopback name (`localhost` <-> `127.0.0.1`, as the Hub's
//!   CDN is another host) carrying `X-Linked-Etag` (sha256) and `X-Linked-Size`.
//! - `GET /api/models/{repo}[/revision/{rev}]`: `{"id", "sha", "siblings": [{"rfilename"}]}`.
//! - `GET /api/models/{repo}/tree/{rev}`: the file list with sizes.
//! - Errors as the Hub gives them: 404 with `X-Error-Code` `RepoNotFound` / `RevisionNotFound` /
//!   `EntryNotFound`; 401 when `token` is set and the request's bearer token differs.
//!
//! Revisions accepted: `main` and the commit (default: the sha1 of the file list, the same
//! scheme as tests/e2e/e2e_support.py; the folder's name when it is a hub snapshot).
//! Must not touch: the served folder (read only) and rule logic (`patched` asks the engine).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

use super::hub::git_blob_sha1;
use crate::patch::{Engine, Outcome, PatchOptions};

/// Extensions the Hub stores with LFS by default (`.gitattributes` of a new repo).
const LFS_EXT: &[&str] = &["safetensors", "bin", "pt", "pth", "ckpt", "h5", "msgpack", "onnx", "gguf", "npz", "model", "zip", "tar", "gz"];

#[derive(Debug, Clone, Serialize)]
pub struct MirrorFile {
    pub name: String,
    pub size: u64,
    /// git sha1 of the bytes (what the Hub's ETag is for a regular file).
    pub git_sha1: String,
    pub sha256: String,
    /// Served as an LFS file: 302 to `/lfs/{sha256}`.
    pub lfs: bool,
    /// Patched bytes served instead of the folder's (with `patched`).
    pub patched: bool,
    #[serde(skip)]
    body: Body,
}

#[derive(Debug, Clone)]
enum Body {
    Memory(Arc<Vec<u8>>),
    Disk(PathBuf),
}

/// Test knobs; also reachable from the CLI as hidden flags, for the Python suite.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer the first N requests of each resolve URL with 500.
    pub fail_first: u32,
    /// Files whose served bytes have one byte flipped (the ETag stays the true one).
    pub corrupt: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// Serve only this repo id (`org/name`); `None`: answer for any repo id.
    pub repo: Option<String>,
    pub commit: Option<String>,
    /// Serve our patched bytes for the files the engine patches.
    pub patched: bool,
    pub allow_unpinned: bool,
    /// Files at least this large are served as LFS files.
    pub large_from: u64,
    /// Require `Authorization: Bearer <token>`.
    pub token: Option<String>,
    pub faults: Faults,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions { repo: None, commit: None, patched: false, allow_unpinned: false, large_from: 10 << 20, token: None, faults: Faults::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("{}: cannot read ({source}); pass a model folder (config.json, *.py, weights) to --from", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: holds no files to serve; pass a model folder to --from", path.display())]
    Empty { path: PathBuf },
    #[error("{}: {msg}", path.display())]
    Patch { path: PathBuf, msg: String },
    #[error("127.0.0.1:{port}: cannot listen ({msg}); pick another --port (0 picks a free one)")]
    Bind { port: u16, msg: String },
}

/// A model folder, ready to serve.
pub struct Mirror {
    pub repo: Option<String>,
    pub commit: String,
    pub files: BTreeMap<String, MirrorFile>,
    token: Option<String>,
    faults: Faults,
    hits: Mutex<HashMap<String, u32>>,
}

fn hex_sha256_file(path: &Path) -> std::io::Result<(String, String, u64)> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut s256 = Sha256::new();
    let mut s1 = Sha1::new();
    s1.update(format!("blob {len}\0").as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s256.update(&buf[..n]);
        s1.update(&buf[..n]);
    }
    Ok((hex::encode(s256.finalize()), hex::encode(s1.finalize()), len))
}

impl Mirror {
    /// Reads `dir` (a plain model folder or a hub snapshot folder; symlinks followed).
    pub fn load(dir: &Path, engine: &Engine, opts: &MirrorOptions) -> Result<Mirror, MirrorError> {
        let rerr = |path: &Path, e: std::io::Error| MirrorError::Read { path: path.to_path_buf(), source: e };
        if !dir.is_dir() {
            return Err(rerr(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder")));
        }
        let mut files = BTreeMap::new();
        let walker = walkdir::WalkDir::new(dir).follow_links(true).sort_by_file_name().into_iter().filter_entry(|e| {
            let n = e.file_name().to_string_lossy();
            e.depth() == 0 || !(n.starts_with('.') || n == "__pycache__")
        });
        for e in walker {
            let e = e.map_err(|e| rerr(dir, e.into()))?;
            if e.file_type().is_dir() {
                continue;
            }
            let Ok(rel) = e.path().strip_prefix(dir) else { continue };
            let name = rel.to_string_lossy().replace('\\', "/");
            let md = std::fs::metadata(e.path()).map_err(|err| rerr(e.path(), err))?;
            let ext = name.rsplit('.').next().unwrap_or("");
            let lfs = md.len() >= opts.large_from || (name.contains('.') && LFS_EXT.contains(&ext));
            let file = if lfs {
                let (sha256, git_sha1, size) = hex_sha256_file(e.path()).map_err(|err| rerr(e.path(), err))?;
                MirrorFile { name: name.clone(), size, git_sha1, sha256, lfs, patched: false, body: Body::Disk(e.path().to_path_buf()) }
            } else {
                let mut bytes = std::fs::read(e.path()).map_err(|err| rerr(e.path(), err))?;
                let base = name.rsplit('/').next().unwrap_or(&name);
                let mut patched = false;
                if opts.patched && engine.targets(base) {
                    let popts = PatchOptions { allow_unpinned: opts.allow_unpinned };
                    match engine.patch(base, &bytes, &popts) {
                        Ok(Outcome::Patched { bytes: b, .. }) => {
                            bytes = b;
                            patched = true;
                        }
                        Ok(_) => {}
                        Err(err) => return Err(MirrorError::Patch { path: e.path().to_path_buf(), msg: err.to_string() }),
                    }
                }
                MirrorFile {
                    name: name.clone(),
                    size: bytes.len() as u64,
                    git_sha1: git_blob_sha1(&bytes),
                    sha256: crate::patch::sha256_hex(&bytes),
                    lfs,
                    patched,
                    body: Body::Memory(Arc::new(bytes)),
                }
            };
            files.insert(name, file);
        }
        if files.is_empty() {
            return Err(MirrorError::Empty { path: dir.to_path_buf() });
        }
        // A hub snapshot folder names its commit and repo.
        let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let snap_commit = abs.parent().filter(|p| p.file_name().is_some_and(|n| n == "snapshots")).and_then(|_| abs.file_name()).map(|n| n.to_string_lossy().into_owned());
        let commit = opts.commit.clone().or(snap_commit).unwrap_or_else(|| {
            let listing: String = files.values().map(|f| format!("{}:{}\n", f.name, if f.lfs { &f.sha256 } else { &f.git_sha1 })).collect();
            hex::encode(Sha1::digest(listing.as_bytes()))
        });
        Ok(Mirror {
            repo: opts.repo.clone(),
            commit,
            files,
            token: opts.token.clone(),
            faults: opts.faults.clone(),
            hits: Mutex::new(HashMap::new()),
        })
    }

    /// Serves on `127.0.0.1:port` (0: any free port) with `threads` workers, in the background.
    pub fn serve(self, port: u16, threads: usize) -> Result<MirrorHandle, MirrorError> {
        let server = Server::http(SocketAddr::from(([127, 0, 0, 1], port))).map_err(|e| MirrorError::Bind { port, msg: e.to_string() })?;
        let addr = server.server_addr().to_ip().map(|a| a.port()).unwrap_or(port);
        let server = Arc::new(server);
        let me = Arc::new(self);
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..threads.max(1))
            .map(|_| {
                let (server, me, stop) = (server.clone(), me.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match server.recv() {
                            Ok(req) => me.handle(req, addr),
                            Err(_) => break,
                        }
                    }
                })
            })
            .collect();
        Ok(MirrorHandle { port: addr, server, stop, workers })
    }

    fn repo_ok(&self, repo: &str) -> bool {
        self.repo.as_deref().map_or(true, |r| r.eq_ignore_ascii_case(repo))
    }

    fn rev_ok(&self, rev: &str) -> bool {
        rev == "main" || rev == self.commit
    }

    fn handle(&self, req: Request, port: u16) {
        let resp = self.route(&req, port);
        let _ = req.respond(resp);
    }

    fn route(&self, req: &Request, port: u16) -> Response<Box<dyn Read + Send>> {
        let method = req.method().clone();
        if !matches!(method, Method::Get | Method::Head) {
            return text(405, "only GET and HEAD", None);
        }
        if let Some(t) = &self.token {
            let given = req.headers().iter().find(|h| h.field.equiv("authorization")).map(|h| h.value.as_str().to_string());
            if given.as_deref() != Some(&format!("Bearer {t}")) {
                return text(401, "Invalid credentials in Authorization header", None);
            }
        }
        let url = req.url().split('?').next().unwrap_or("").to_string();
        let path = percent_decode(&url);
        let range = req.headers().iter().find(|h| h.field.equiv("range")).map(|h| h.value.as_str().to_string());
        let host = req.headers().iter().find(|h| h.field.equiv("host")).map(|h| h.value.as_str().to_string()).unwrap_or_else(|| format!("127.0.0.1:{port}"));
        if let Some(rest) = path.strip_prefix("/api/models/") {
            return self.api(rest);
        }
        if let Some(sha) = path.strip_prefix("/lfs/") {
            return match self.files.values().find(|f| f.lfs && f.sha256 == sha) {
                Some(f) => self.body(f, range.as_deref(), vec![]),
                None => text(404, "Entry not found", Some("EntryNotFound")),
            };
        }
        let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
            return text(404, "Not found", None);
        };
        if !self.repo_ok(repo) {
            return text(404, "Repository not found", Some("RepoNotFound"));
        }
        let Some((rev, file)) = rest.split_once('/') else {
            return text(404, "Entry not found", Some("EntryNotFound"));
        };
        if !self.rev_ok(rev) {
            return text(404, &format!("Invalid rev id: {rev}"), Some("RevisionNotFound"));
        }
        let Some(f) = self.files.get(file) else {
            return text(404, "Entry not found", Some("EntryNotFound"));
        };
        if self.faults.fail_first > 0 {
            let mut hits = self.hits.lock().unwrap_or_else(|p| p.into_inner());
            let n = hits.entry(url.clone()).or_insert(0);
            *n += 1;
            if *n <= self.faults.fail_first {
                return text(500, "injected failure", None);
            }
        }
        let commit = header("X-Repo-Commit", &self.commit);
        if f.lfs {
            // The Hub redirects LFS files to another host (its CDN), and huggingface_hub >= 1.0
            // follows same-host redirects on HEAD: name the other loopback host.
            let other = match host.rsplit_once(':') {
                Some((h, p)) if h == "localhost" => format!("127.0.0.1:{p}"),
                Some((_, p)) => format!("localhost:{p}"),
                None => format!("localhost:{port}"),
            };
            let loc = format!("http://{other}/lfs/{}", f.sha256);
            let r = text(302, "", None)
                .with_header(header("Location", &loc))
                .with_header(header("X-Linked-Etag", &format!("\"{}\"", f.sha256)))
                .with_header(header("X-Linked-Size", &f.size.to_string()))
                .with_header(header("ETag", &format!("\"{}\"", f.git_sha1)))
                .with_header(commit);
            return r;
        }
        self.body(f, range.as_deref(), vec![commit, header("ETag", &format!("\"{}\"", f.git_sha1))])
    }

    fn api(&self, rest: &str) -> Response<Box<dyn Read + Send>> {
        let rest = rest.trim_end_matches('/');
        let (repo, tail) = match rest.find("/revision/").or_else(|| rest.find("/tree/")) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if !self.repo_ok(repo) {
            return text(404, "Repository not found", Some("RepoNotFound"));
        }
        let siblings: Vec<serde_json::Value> = self.files.values().map(|f| serde_json::json!({ "rfilename": f.name })).collect();
        let info = serde_json::json!({
            "_id": self.commit[..24.min(self.commit.len())],
            "id": repo, "modelId": repo, "sha": self.commit, "private": false, "gated": false,
            "disabled": false, "tags": ["transformers"], "library_name": "transformers",
            "lastModified": "2026-01-01T00:00:00.000Z", "siblings": siblings,
        });
        if let Some(rev) = tail.strip_prefix("/revision/") {
            if !self.rev_ok(rev) {
                return text(404, &format!("Invalid rev id: {rev}"), Some("RevisionNotFound"));
            }
            return json(&info);
        }
        if let Some(t) = tail.strip_prefix("/tree/") {
            let rev = t.split('/').next().unwrap_or("");
            if !self.rev_ok(rev) {
                return text(404, &format!("Invalid rev id: {rev}"), Some("RevisionNotFound"));
            }
            let list: Vec<serde_json::Value> = self
                .files
                .values()
                .map(|f| {
                    let mut v = serde_json::json!({ "type": "file", "path": f.name, "size": f.size, "oid": f.git_sha1 });
                    if f.lfs {
                        v["lfs"] = serde_json::json!({ "oid": f.sha256, "size": f.size, "pointerSize": 134 });
                    }
                    v
                })
                .collect();
            return json(&serde_json::Value::Array(list));
        }
        json(&info)
    }

    fn body(&self, f: &MirrorFile, range: Option<&str>, extra: Vec<Header>) -> Response<Box<dyn Read + Send>> {
        let (start, end) = match range.and_then(|r| parse_range(r, f.size)) {
            Some(Ok(r)) => r,
            Some(Err(())) => {
                return text(416, "Range not satisfiable", None).with_header(header("Content-Range", &format!("bytes */{}", f.size)));
            }
            None => (0, f.size),
        };
        let len = end - start;
        let reader: Box<dyn Read + Send> = match &f.body {
            Body::Memory(b) => {
                let mut v = b[start as usize..end as usize].to_vec();
                if self.faults.corrupt.iter().any(|c| c == &f.name) && !v.is_empty() {
                    v[0] ^= 0x20;
                }
                Box::new(std::io::Cursor::new(v))
            }
            Body::Disk(p) => match File::open(p).and_then(|mut fh| fh.seek(SeekFrom::Start(start)).map(|_| fh)) {
                Ok(fh) => Box::new(fh.take(len)),
                Err(_) => return text(500, "cannot read the file", None),
            },
        };
        let status = if range.is_some() { 206 } else { 200 };
        let mut r = Response::new(StatusCode(status), vec![], reader, Some(len as usize), None)
            .with_header(header("Accept-Ranges", "bytes"))
            .with_header(header("Content-Type", "application/octet-stream"));
        if status == 206 {
            r = r.with_header(header("Content-Range", &format!("bytes {start}-{}/{}", end.saturating_sub(1), f.size)));
        }
        for h in extra {
            r = r.with_header(h);
        }
        r
    }
}

/// `bytes=a-b` / `bytes=a-` / `bytes=-n` -> half-open `[start, end)`; `Err` when unsatisfiable.
fn parse_range(h: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // multiple ranges: answer the whole file, as servers may.
    }
    let (a, b) = spec.split_once('-')?;
    let r = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size)
        }
        (a, "") => (a.parse().ok()?, size),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.saturating_add(1).min(size)),
    };
    Some(if r.0 >= size || r.0 >= r.1 { Err(()) } else { Ok(r) })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn header(k: &str, v: &str) -> Header {
    Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap_or_else(|_| Header::from_bytes(&b"X-Bad-Header"[..], &b"1"[..]).expect("static header"))
}

fn text(status: u16, msg: &str, code: Option<&str>) -> Response<Box<dyn Read + Send>> {
    let body = msg.as_bytes().to_vec();
    let len = body.len();
    let mut r = Response::new(StatusCode(status), vec![], Box::new(std::io::Cursor::new(body)) as Box<dyn Read + Send>, Some(len), None)
        .with_header(header("Content-Type", "text/plain; charset=utf-8"));
    if let Some(c) = code {
        r = r.with_header(header("X-Error-Code", c)).with_header(header("X-Error-Message", msg));
    }
    r
}

fn json(v: &serde_json::Value) -> Response<Box<dyn Read + Send>> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let len = body.len();
    Response::new(StatusCode(200), vec![], Box::new(std::io::Cursor::new(body)) as Box<dyn Read + Send>, Some(len), None)
        .with_header(header("Content-Type", "application/json"))
}

/// A running mirror; stops (and joins its workers) on drop.
pub struct MirrorHandle {
    pub port: u16,
    server: Arc<Server>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl MirrorHandle {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Blocks until the workers end (never, unless the server fails).
    pub fn wait(mut self) {
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for MirrorHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for _ in 0..self.workers.len() {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 10))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 100))));
        assert_eq!(parse_range("bytes=-5", 100), Some(Ok((95, 100))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("items=1-2", 100), None);
        assert_eq!(percent_decode("refs%2Fpr%2F1/a%20b"), "refs/pr/1/a b");
    }
}
