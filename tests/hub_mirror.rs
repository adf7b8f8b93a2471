//! `ocr-patch fetch` against `ocr-patch mirror` (the Hub stand-in) on loopback: the happy path
//! into a cold cache, the exact huggingface_hub layout, LFS redirects and Range resume, retries
//! after 500s, and every refusal (404 revision, wrong token, altered bytes, unpinned code, no
//! network, offline) writing nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use assert_cmd::Command;
use ocr_patch::cache::hub::{git_blob_sha1, FetchRequest, Hub, HubConfig, HubError};
use ocr_patch::cache::mirror::{Faults, Mirror, MirrorHandle, MirrorOptions};
use ocr_patch::patch::{sha256_hex, Engine, Lock};

const REPO: &str = "ocrpatch/tiny-ocr";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tinyocr")
}

fn lock_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lock.toml")
}

fn engine() -> Engine {
    let text = std::fs::read_to_string(lock_path()).unwrap();
    Engine::embedded().unwrap().with_lock(Lock::parse(&text, "fixture lock").unwrap())
}

/// A copy of the fixture plus a fake weights file (served as LFS).
fn model_dir(tmp: &Path) -> PathBuf {
    let d = tmp.join("model");
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(fixture()).unwrap().flatten() {
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    let weights: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(d.join("model.safetensors"), weights).unwrap();
    d
}

fn serve(dir: &Path, opts: MirrorOptions) -> MirrorHandle {
    Mirror::load(dir, &engine(), &opts).unwrap().serve(0, 4).unwrap()
}

fn config(endpoint: String) -> HubConfig {
    HubConfig { endpoint, token: None, offline: false, retries: 3, backoff: Duration::from_millis(5), connect_timeout: Duration::from_secs(5) }
}

fn request(all: bool) -> FetchRequest {
    FetchRequest { repo: REPO.into(), revision: "main".into(), all, allow_unpinned: false }
}

fn fetch(cfg: HubConfig, hub: &Path, all: bool) -> Result<ocr_patch::cache::hub::Fetched, HubError> {
    Hub::new(cfg).unwrap().fetch(hub, &engine(), &request(all), &indicatif::ProgressBar::hidden())
}

/// Every path under `dir`, relative, sorted (empty when `dir` does not exist).
fn tree(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .flatten()
        .map(|e| e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn cmd(endpoint: &str) -> Command {
    let mut c = Command::cargo_bin("ocr-patch").unwrap();
    for k in ["HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"] {
        c.env_remove(k);
    }
    c.env("HF_ENDPOINT", endpoint).env("NO_PROXY", "127.0.0.1");
    c
}

#[test]
fn fetch_cold_cache_gives_the_huggingface_hub_layout_patched() {
    let t = tempfile::tempdir().unwrap();
    let m = serve(&model_dir(t.path()), MirrorOptions { large_from: 1 << 30, ..Default::default() });
    let hf = t.path().join("hf");
    let out = cmd(&m.endpoint())
        .env("HF_HOME", &hf)
        .args(["fetch", REPO, "--lock"])
        .arg(lock_path())
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("6 files, 6 downloaded"), "{out}");
    assert!(out.contains("apply: 3 patched"), "{out}");
    let repo = hf.join("hub/models--ocrpatch--tiny-ocr");
    let commit = std::fs::read_to_string(repo.join("refs/main")).unwrap();
    assert_eq!(commit.len(), 40);
    let snap = repo.join("snapshots").join(&commit);
    for e in std::fs::read_dir(fixture()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let orig = std::fs::read(e.path()).unwrap();
        let blob = repo.join("blobs").join(git_blob_sha1(&orig));
        assert_eq!(std::fs::read(&blob).unwrap(), orig, "{name}: the blob holds the original");
        let link = std::fs::read_link(snap.join(&name));
        let patched = ["deepencoder.py", "modeling_deepseekocr.py", "modeling_deepseekv2.py"].contains(&name.as_str());
        if patched {
            assert!(link.is_err(), "{name} became a patched regular file");
            assert!(std::fs::read_to_string(snap.join(&name)).unwrap().starts_with("# ocr-patch: patched"));
        } else {
            assert_eq!(link.unwrap(), Path::new("../../blobs").join(git_blob_sha1(&orig)), "{name}");
        }
        assert!(hf.join("hub/.locks/models--ocrpatch--tiny-ocr").join(format!("{}.lock", git_blob_sha1(&orig))).exists());
    }
    assert!(!snap.join("model.safetensors").exists(), "weights only with --all");
    // Again: nothing to download, nothing to patch.
    let again = cmd(&m.endpoint()).env("HF_HOME", &hf).args(["fetch", REPO, "--lock"]).arg(lock_path()).assert().success();
    let again = String::from_utf8(again.get_output().stdout.clone()).unwrap();
    assert!(again.contains("0 downloaded") && again.contains("0 patched, 3 already patched"), "{again}");
}

#[test]
fn all_files_lfs_redirect_and_range_resume() {
    let t = tempfile::tempdir().unwrap();
    let dir = model_dir(t.path());
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    let sha = sha256_hex(&weights);
    let m = serve(&dir, MirrorOptions::default());
    let hub = t.path().join("hub");
    // A download cut at half way, left by huggingface_hub or by us.
    let blobs = hub.join("models--ocrpatch--tiny-ocr/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{sha}.incomplete")), &weights[..weights.len() / 2]).unwrap();
    let f = fetch(config(m.endpoint()), &hub, true).unwrap();
    assert_eq!(f.files.len(), 7);
    assert_eq!(std::fs::read(blobs.join(&sha)).unwrap(), weights);
    assert!(!blobs.join(format!("{sha}.incomplete")).exists());
    assert_eq!(std::fs::read(f.snapshot.join("model.safetensors")).unwrap(), weights);
    assert_eq!(std::fs::read_link(f.snapshot.join("model.safetensors")).unwrap(), Path::new("../../blobs").join(&sha));
}

#[test]
fn retries_after_server_errors() {
    let t = tempfile::tempdir().unwrap();
    let m = serve(&model_dir(t.path()), MirrorOptions { faults: Faults { fail_first: 2, corrupt: vec![] }, ..Default::default() });
    let f = fetch(config(m.endpoint()), &t.path().join("hub"), false).unwrap();
    assert_eq!(f.files.len(), 6);
    let m = serve(&model_dir(t.path()), MirrorOptions { faults: Faults { fail_first: 9, corrupt: vec![] }, ..Default::default() });
    let hub = t.path().join("hub2");
    let e = fetch(config(m.endpoint()), &hub, false).unwrap_err().to_string();
    assert!(e.contains("answered 500 after 4 tries; try again later"), "{e}");
    assert!(tree(&hub).is_empty(), "nothing written: {:?}", tree(&hub));
}

#[test]
fn altered_bytes_are_refused_and_nothing_is_written() {
    let t = tempfile::tempdir().unwrap();
    let dir = model_dir(t.path());
    // The server's bytes do not match its own ETag.
    let m = serve(&dir, MirrorOptions { faults: Faults { fail_first: 0, corrupt: vec!["modeling_deepseekocr.py".into()] }, ..Default::default() });
    let hub = t.path().join("hub");
    let e = fetch(config(m.endpoint()), &hub, false).unwrap_err().to_string();
    assert!(e.starts_with("modeling_deepseekocr.py: the downloaded bytes do not match the git sha1 ETag"), "{e}");
    assert!(tree(&hub).is_empty(), "{:?}", tree(&hub));
    // Consistent bytes, but not what the lock pins (the repo changed upstream).
    let mut code = std::fs::read_to_string(dir.join("modeling_deepseekv2.py")).unwrap();
    code.push_str("\n# changed\n");
    std::fs::write(dir.join("modeling_deepseekv2.py"), code).unwrap();
    let m = serve(&dir, MirrorOptions::default());
    let e = fetch(config(m.endpoint()), &hub, false).unwrap_err().to_string();
    assert!(e.contains("modeling_deepseekv2.py: sha256") && e.contains("is not pinned in any lock; refused, nothing was written"), "{e}");
    assert!(tree(&hub).is_empty(), "{:?}", tree(&hub));
    // The CLI says the same and exits 2.
    cmd(&m.endpoint())
        .args(["fetch", REPO, "--cache-dir"])
        .arg(&hub)
        .arg("--lock")
        .arg(lock_path())
        .assert()
        .code(2)
        .stderr(predicates::str::contains("is not pinned in any lock"));
    assert!(tree(&hub).is_empty());
}

#[test]
fn not_found_revision_repo_and_wrong_token() {
    let t = tempfile::tempdir().unwrap();
    let dir = model_dir(t.path());
    let m = serve(&dir, MirrorOptions { repo: Some(REPO.into()), token: Some("hf_good".into()), ..Default::default() });
    let hub = t.path().join("hub");
    let mut cfg = config(m.endpoint());
    let e = fetch(cfg.clone(), &hub, false).unwrap_err().to_string();
    assert!(e.contains("refused access (401); the repo is private or does not exist: set HF_TOKEN"), "{e}");
    cfg.token = Some("hf_bad".into());
    let e = fetch(cfg.clone(), &hub, false).unwrap_err().to_string();
    assert!(e.contains("HF_TOKEN is wrong or expired"), "{e}");
    cfg.token = Some("hf_good".into());
    let hub_client = Hub::new(cfg.clone()).unwrap();
    let req = FetchRequest { revision: "v9".into(), ..request(false) };
    let e = hub_client.fetch(&hub, &engine(), &req, &indicatif::ProgressBar::hidden()).unwrap_err().to_string();
    assert_eq!(e, "ocrpatch/tiny-ocr: revision `v9` not found (404); check --revision (a branch, tag or commit of this repo)");
    let req = FetchRequest { repo: "ocrpatch/nope".into(), ..request(false) };
    let e = hub_client.fetch(&hub, &engine(), &req, &indicatif::ProgressBar::hidden()).unwrap_err().to_string();
    assert!(e.starts_with("ocrpatch/nope: no such repository"), "{e}");
    assert!(tree(&hub).is_empty());
    fetch(cfg, &hub, false).unwrap();
}

#[test]
fn no_network_and_offline() {
    let t = tempfile::tempdir().unwrap();
    let hub = t.path().join("hub");
    // Nothing listens on port 9 of loopback.
    let out = cmd("http://127.0.0.1:9").args(["fetch", REPO, "--cache-dir"]).arg(&hub).assert().code(2);
    let err = String::from_utf8(out.get_output().stderr.clone()).unwrap();
    assert!(err.contains("cannot reach the Hub") && err.contains("--offline") && err.contains("ocr-patch mirror"), "{err}");
    cmd("http://127.0.0.1:9")
        .env("HF_HUB_OFFLINE", "1")
        .args(["fetch", REPO, "--cache-dir"])
        .arg(&hub)
        .assert()
        .code(2)
        .stderr(predicates::str::contains("HF_HUB_OFFLINE is set and this revision is not in"));
    assert!(tree(&hub).is_empty());
    // Filled once from the mirror, then offline with the mirror gone: verified and patched.
    {
        let m = serve(&model_dir(t.path()), MirrorOptions::default());
        cmd(&m.endpoint()).args(["fetch", REPO, "--no-patch", "--cache-dir"]).arg(&hub).arg("--lock").arg(lock_path()).assert().success();
    }
    let out = cmd("http://127.0.0.1:9")
        .args(["fetch", REPO, "--offline", "--cache-dir"])
        .arg(&hub)
        .arg("--lock")
        .arg(lock_path())
        .assert()
        .success();
    let out = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(out.contains("offline, from the cache") && out.contains("apply: 3 patched"), "{out}");
}

#[test]
fn patched_mirror_serves_patched_code() {
    let t = tempfile::tempdir().unwrap();
    let m = serve(&model_dir(t.path()), MirrorOptions { patched: true, ..Default::default() });
    let hub = t.path().join("hub");
    let f = fetch(config(m.endpoint()), &hub, false).unwrap();
    let pins: Vec<_> = f.files.iter().filter(|x| x.pin == "patched").map(|x| x.file.as_str()).collect();
    assert_eq!(pins, ["deepencoder.py", "modeling_deepseekocr.py", "modeling_deepseekv2.py"]);
    assert!(std::fs::read_to_string(f.snapshot.join("modeling_deepseekv2.py")).unwrap().starts_with("# ocr-patch: patched"));
}

/// How `disk_full_*` fills a disk: a 128 KiB tmpfs in a private mount namespace (`unshare`, as
/// root or through an unprivileged user namespace), else a 128 KiB file-size limit (`ulimit -f`,
/// which fails the write with EFBIG instead of ENOSPC) where namespaces are not allowed.
fn full_disk_mode(probe: &Path) -> &'static str {
    std::fs::create_dir_all(probe).unwrap();
    let ok = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs \"$0\""])
        .arg(probe)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        "tmpfs"
    } else {
        "ulimit"
    }
}

#[test]
fn disk_full_leaves_nothing_half_written_and_resumes() {
    let t = tempfile::tempdir().unwrap();
    let dir = model_dir(t.path());
    let weights_sha = sha256_hex(&std::fs::read(dir.join("model.safetensors")).unwrap());
    let m = serve(&dir, MirrorOptions::default());
    let mode = full_disk_mode(&t.path().join("probe"));
    let disk = t.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    // Both runs happen inside one shell, so the tmpfs (private to its namespace) can be listed and
    // then grown to let the second run resume.
    let script = r#"
set -u
if [ "$MODE" = tmpfs ]; then mount -t tmpfs -o size=128k tmpfs "$D" || exit 90; else ulimit -S -f 128; trap '' XFSZ; fi
"$BIN" fetch "$REPO" --all --cache-dir "$D/hub" --lock "$LOCK" >/dev/null 2>"$ERR"; echo "rc1=$?"
find "$D/hub" \( -type f -o -type l \) -printf 'entry %P\n' 2>/dev/null
find -L "$D/hub" -type l -printf 'broken %P\n' 2>/dev/null
if [ "$MODE" = tmpfs ]; then mount -o remount,size=16m "$D"; else ulimit -S -f unlimited; fi
"$BIN" fetch "$REPO" --all --cache-dir "$D/hub" --lock "$LOCK" >/dev/null 2>>"$ERR"; echo "rc2=$?"
for f in "$D"/hub/models--*/snapshots/*/model.safetensors; do echo "weights $(sha256sum < "$f" | cut -d' ' -f1)"; done
"#;
    let shell: Vec<&str> = if mode == "tmpfs" { vec!["unshare", "-rm", "bash", "-c", script] } else { vec!["bash", "-c", script] };
    let err_file = t.path().join("stderr.txt");
    let out = std::process::Command::new(shell[0])
        .args(&shell[1..])
        .env("MODE", mode)
        .env("D", &disk)
        .env("ERR", &err_file)
        .env("BIN", assert_cmd::cargo::cargo_bin("ocr-patch"))
        .env("REPO", REPO)
        .env("LOCK", lock_path())
        .env("HF_ENDPOINT", m.endpoint())
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = std::fs::read_to_string(&err_file).unwrap_or_default();
    let log = format!("mode {mode}\n{stdout}\nstderr of the runs:\n{stderr}");
    assert!(stdout.contains("rc1=2"), "the fetch onto a full disk must fail with exit 2:\n{log}");
    assert!(!stderr.contains("panicked"), "{log}");
    if mode == "tmpfs" {
        assert!(stderr.contains("no space left on the device; nothing was half-written"), "{log}");
    }
    // What the failed run left: only huggingface_hub's lock files and a resumable partial blob.
    let left: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("entry ")).collect();
    assert!(!stdout.contains("broken "), "a snapshot link points at nothing:\n{log}");
    for path in &left {
        assert!(path.starts_with(".locks/") || path.ends_with(".incomplete"), "`{path}` was written by the failed run:\n{log}");
    }
    assert!(left.iter().any(|p| p.ends_with(".incomplete")), "the partial download should stay for resuming:\n{log}");
    // With room again, the same command resumes and completes, with the right bytes.
    assert!(stdout.contains("rc2=0"), "{log}");
    assert!(stdout.contains(&format!("weights {weights_sha}")), "{log}");
}

/// `docker/entrypoint.sh` as the container runs it: `ocr-patch` on PATH, the loopback mirror as
/// the Hub. `argv` is the server command it must exec (only after the cache is patched).
fn entrypoint(endpoint: &str, hf_home: &Path, env: &[(&str, &str)], argv: &[&str]) -> std::process::Output {
    let bin = assert_cmd::cargo::cargo_bin("ocr-patch");
    let path = format!("{}:{}", bin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let mut c = std::process::Command::new("sh");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/entrypoint.sh")).args(argv);
    for k in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"] {
        c.env_remove(k);
    }
    c.env("PATH", path)
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .env("NO_PROXY", "127.0.0.1")
        .env("OCR_PATCH_MODEL", REPO)
        .env("OCR_PATCH_ARGS", format!("--lock {}", lock_path().display()));
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn docker_entrypoint_patches_before_the_server_starts() {
    let t = tempfile::tempdir().unwrap();
    let hf_home = t.path().join("hf");
    let server = ["sh", "-c", "echo server-started; head -c 20 \"$HF_HOME\"/hub/models--ocrpatch--tiny-ocr/snapshots/*/modeling_deepseekv2.py"];
    {
        let m = serve(&model_dir(t.path()), MirrorOptions::default());
        let out = entrypoint(&m.endpoint(), &hf_home, &[], &server);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        // The server ran after the fetch, and saw the patched file.
        assert!(stdout.contains("server-started\n# ocr-patch: patched"), "{stdout}");
    }
    // The mirror is gone: offline, the entrypoint verifies what the volume holds and starts.
    let out = entrypoint("http://127.0.0.1:9", &hf_home, &[("HF_HUB_OFFLINE", "1")], &server);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("server-started"), "{}", String::from_utf8_lossy(&out.stderr));
    // No Hub and a cold volume: the container stops with exit 2 and never starts the server.
    let out = entrypoint("http://127.0.0.1:9", &t.path().join("cold"), &[], &server);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("server-started"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the Hub"));
    // A wrong mode is refused the same way.
    let out = entrypoint("http://127.0.0.1:9", &hf_home, &[("OCR_PATCH_MODE", "sometimes")], &server);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OCR_PATCH_MODE must be fetch, hook, apply or off"));
}
