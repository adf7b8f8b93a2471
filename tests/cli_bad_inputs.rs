//! Bad inputs: each gives exactly one `error:` line that starts with the path and says what to
//! do, exits 2, and leaves every byte and symlink of the cache as it was.

mod cli_support;

use std::os::unix::fs::symlink;
use std::path::Path;

use cli_support::*;

/// Runs `args`, expects exit 2, one error line containing `needle`, and an unchanged cache.
fn fails_cleanly(cache: &Cache, args: &[&str], needle: &str) -> String {
    let before = cache.state();
    let out = cache.cmd().args(args).output().unwrap();
    let err = lines(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: stderr {err:?}");
    assert_eq!(err.len(), 1, "{args:?}: exactly one line: {err:?}");
    assert!(err[0].starts_with("error: "), "{err:?}");
    assert!(err[0].contains(needle), "{args:?}: {:?} lacks {needle:?}", err[0]);
    assert_eq!(cache.state(), before, "{args:?} changed the cache");
    err[0].clone()
}

fn v2(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    vec![("modeling_deepseekv2.py".to_string(), bytes.to_vec())]
}

#[test]
fn unknown_hash_is_refused_then_allowed() {
    let cache = Cache::new();
    let snap = cache.add_snapshot(REPO, COMMIT, &v2(UNKNOWN_V2.as_bytes()));
    let path = snap.join("modeling_deepseekv2.py");
    let line = fails_cleanly(&cache, &["apply"], "not pinned in any lock");
    assert!(line.starts_with(&format!("error: {}: unknown file (sha256 ", path.display())), "{line}");
    assert!(line.ends_with("pass --allow-unpinned to patch it anyway, or --lock FILE with its pin"), "{line}");
    fails_cleanly(&cache, &["check"], "not pinned");
    fails_cleanly(&cache, &["diff"], "not pinned");

    cache.cmd().args(["check", "--allow-unpinned"]).assert().code(1);
    let out = cache.cmd().args(["apply", "--allow-unpinned"]).assert().success().get_output().stdout.clone();
    assert!(String::from_utf8_lossy(&out).contains("unpinned"));
    let now = std::fs::read(&path).unwrap();
    assert!(now.starts_with(b"# ocr-patch: patched"));
    // A patched unpinned file is "outdated" to the engine (marker, hash not in the lock); apply
    // with --allow-unpinned again must not stack a second patch on it.
    cache.cmd().args(["apply", "--allow-unpinned"]).assert().success();
    assert_eq!(std::fs::read(&path).unwrap(), now, "idempotent");
    cache.cmd().arg("revert").assert().success();
    assert_eq!(std::fs::read(&path).unwrap(), UNKNOWN_V2.as_bytes());
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
}

#[test]
fn syntax_error_in_a_cached_file() {
    let cache = Cache::new();
    cache.add_module_copy("tinyocr", &v2(b"def broken(:\n    pass\n"));
    fails_cleanly(&cache, &["apply", "--allow-unpinned"], "modeling_deepseekv2.py: ");
}

#[test]
fn truncated_file() {
    let files = fixture_files();
    let cache = Cache::new();
    let lock = cache.lock_for(&files);
    let (name, bytes) = files.iter().find(|(n, _)| n == "modeling_deepseekv2.py").unwrap();
    let cut = &bytes[..bytes.len() / 2];
    let mut layout: Vec<(String, Vec<u8>)> = files.iter().filter(|(n, _)| n != name).cloned().collect();
    layout.push((name.clone(), cut.to_vec()));
    cache.add_snapshot(REPO, COMMIT, &layout);
    cache.add_module_copy("tinyocr", &layout);
    let lock = lock.display().to_string();
    // Its hash is no longer the pinned one...
    fails_cleanly(&cache, &["apply", "--lock", &lock], "not pinned in any lock");
    // ...and with --allow-unpinned it does not parse. Either way the other, good files of the
    // run were not patched either.
    fails_cleanly(&cache, &["apply", "--allow-unpinned", "--lock", &lock], "modeling_deepseekv2.py");
}

#[test]
fn missing_blob() {
    let cache = Cache::new();
    let snap = cache.add_snapshot(REPO, COMMIT, &v2(UNKNOWN_V2.as_bytes()));
    std::fs::remove_file(cache.repo_dir(REPO).join("blobs").join(sha(UNKNOWN_V2.as_bytes()))).unwrap();
    let line = fails_cleanly(&cache, &["apply", "--allow-unpinned"], "the file or the blob it links to is missing");
    assert!(line.starts_with(&format!("error: {}: cannot read", snap.join("modeling_deepseekv2.py").display())));
    fails_cleanly(&cache, &["revert"], "missing");
}

#[test]
fn symlink_loop() {
    let cache = Cache::new();
    let snap = cache.repo_dir(REPO).join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    symlink("deepencoder.py", snap.join("modeling_deepseekv2.py")).unwrap();
    symlink("modeling_deepseekv2.py", snap.join("deepencoder.py")).unwrap();
    fails_cleanly(&cache, &["apply", "--allow-unpinned"], "it is a symlink loop");
    fails_cleanly(&cache, &["check", "--allow-unpinned"], "symlink loop");
}

#[test]
fn missing_and_bad_arguments() {
    let cache = Cache::new();
    fails_cleanly(&cache, &["apply", "--path", "/nonexistent/ocrp"], "/nonexistent/ocrp: not a folder");
    fails_cleanly(&cache, &["apply", "--cache-dir", "/nonexistent/ocrp"], "/nonexistent/ocrp: not a folder");
    fails_cleanly(&cache, &["apply", "--lock", "/nonexistent/lock.toml"], "/nonexistent/lock.toml: cannot read this lock file");
    let bad = cache.root().join("bad-lock.toml");
    std::fs::write(&bad, "format = [").unwrap();
    let out = cache.cmd().arg("apply").arg("--lock").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = lines(&out.stderr);
    assert!(err[0].contains("bad-lock.toml: not a valid lock file"), "{err:?}");
    fails_cleanly(&cache, &["doctor", "--transformers-version", "banana"], "banana");
    // clap's own usage errors exit 2 as well.
    cache.cmd().args(["apply", "--no-such-flag"]).assert().code(2);
}

#[test]
fn json_errors_are_json_too() {
    let cache = Cache::new();
    cache.add_module_copy("tinyocr", &v2(UNKNOWN_V2.as_bytes()));
    let out = cache.cmd().args(["apply", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("not pinned in any lock"));
}

#[test]
fn corrupt_manifest() {
    let cache = Cache::new();
    let d = cache.add_module_copy("tinyocr", &v2(UNKNOWN_V2.as_bytes()));
    std::fs::create_dir_all(d.join(".ocr-patch")).unwrap();
    std::fs::write(d.join(".ocr-patch/manifest.json"), b"{oops").unwrap();
    fails_cleanly(&cache, &["apply", "--allow-unpinned"], "manifest.json: backup manifest is unreadable");
    fails_cleanly(&cache, &["revert"], "manifest.json: backup manifest is unreadable");
}

fn run_as_nobody_available() -> bool {
    std::process::Command::new("setpriv").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

/// A read-only cache. Tests run as root, where permission bits do not stop writes, so the
/// binary is run as `nobody` through `setpriv`; skipped (with a message) where that is missing.
#[test]
fn read_only_cache() {
    let is_root = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if is_root && !run_as_nobody_available() {
        eprintln!("skipped: running as root without setpriv, cannot make a folder read-only");
        return;
    }
    let files = fixture_files();
    let cache = Cache::new();
    let lock = cache.lock_for(&files);
    // Two folders: the first writable (by sort order), the second read-only: nothing at all
    // may be written, not even in the writable one.
    let writable = cache.add_module_copy("a-writable", &files);
    let ro = cache.add_module_copy("b-readonly", &files);
    chmod_tree(cache.root(), 0o755, 0o644);
    std::fs::set_permissions(&lock, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let nobody_owns = |p: &Path| {
        std::process::Command::new("chown").args(["-R", "65534:65534"]).arg(p).status().unwrap();
    };
    if is_root {
        nobody_owns(&writable);
    }
    std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let before = cache.state();
    let mut cmd = std::process::Command::new("setpriv");
    if is_root {
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    }
    cmd.arg(assert_cmd::cargo::cargo_bin("ocr-patch"));
    let out = cmd
        .args(["apply", "--lock"])
        .arg(&lock)
        .env("HF_HOME", cache.hf_home())
        .env("HOME", cache.root())
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_MODULES_CACHE")
        .env_remove("TRANSFORMERS_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("XDG_CACHE_HOME")
        .output()
        .unwrap();
    let err = lines(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err:?}");
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains(&ro.display().to_string()) && err[0].contains("run as its owner"), "{err:?}");
    assert_eq!(cache.state(), before, "nothing written anywhere");
    std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

fn chmod_tree(root: &Path, dir_mode: u32, file_mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    for e in walkdir::WalkDir::new(root).follow_links(false) {
        let e = e.unwrap();
        if e.file_type().is_symlink() {
            continue;
        }
        let mode = if e.file_type().is_dir() { dir_mode } else { file_mode };
        std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// `bench` refuses a roofline bandwidth that is not a positive number of GB/s before it
/// measures anything.
#[test]
fn bench_refuses_a_bandwidth_that_is_not_one() {
    let cache = Cache::new();
    let dir = cache.root().to_str().unwrap().to_string();
    for gbs in ["0", "-3350", "NaN", "inf"] {
        let flag = format!("--bandwidth-gbs={gbs}");
        fails_cleanly(&cache, &["bench", "--model-dir", &dir, &flag], "--bandwidth-gbs must be a positive number");
    }
}

/// `bench` on a build without the GPU path says how to get one, for every `--profile` target;
/// an unknown target is a usage error that lists the real ones.
#[cfg(not(feature = "cuda"))]
#[test]
fn bench_without_the_gpu_path() {
    let cache = Cache::new();
    let dir = cache.root().to_str().unwrap().to_string();
    for target in ["decode", "vision"] {
        fails_cleanly(&cache, &["bench", "--model-dir", &dir, "--profile", target], "rebuild with `cargo build --release --features cuda`");
    }
    let out = cache.cmd().args(["bench", "--model-dir", &dir, "--profile", "banana"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("decode") && err.contains("vision"), "{err}");
}
