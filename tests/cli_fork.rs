//! `apply --fork`: patched files from a pinned external source, served by a tiny HTTP server on
//! 127.0.0.1 started here (no other network).

mod cli_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use cli_support::*;

/// Serves `files` (path -> bytes) over HTTP/1.1 until the test ends; returns the base URL and
/// the list of requested paths.
fn serve(files: HashMap<String, Vec<u8>>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                    break;
                }
            }
            let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
            log2.lock().unwrap().push(path.clone());
            let (status, body) = match files.get(&path) {
                Some(b) => ("200 OK", b.clone()),
                None => ("404 Not Found", b"not found".to_vec()),
            };
            let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (base, log)
}

const FORKED: &[u8] = b"# a forked, already-fixed file\nclass DeepseekOCRForCausalLM:\n    pass\n";

fn fork_toml(cache: &Cache, base: &str, pin: &str) -> std::path::PathBuf {
    let p = cache.root().join("fork.toml");
    std::fs::write(
        &p,
        format!("url_template = \"{base}/{{repo}}/raw/{{commit}}/{{file}}\"\ncommit = \"abc123\"\n\n[files]\n\"modeling_deepseekocr.py\" = \"{pin}\"\n"),
    )
    .unwrap();
    p
}

#[test]
fn fork_files_are_verified_then_written_and_reverted() {
    let files = fixture_files();
    let cache = Cache::new();
    let snap = cache.add_snapshot(REPO, COMMIT, &files);
    let copy = cache.add_module_copy(&format!("deepseek_hyphen_ai/DeepSeek_hyphen_OCR/{COMMIT}"), &files);
    let lock = cache.lock_for(&files);
    let before = cache.state();
    let mut served = HashMap::new();
    served.insert(format!("/{REPO}/raw/abc123/modeling_deepseekocr.py"), FORKED.to_vec());
    let (base, log) = serve(served);
    let fork = fork_toml(&cache, &base, &sha(FORKED));

    cache.cmd().arg("apply").arg("--fork").arg(&fork).arg("--lock").arg(&lock).assert().success();
    for d in [&snap, &copy] {
        assert_eq!(std::fs::read(d.join("modeling_deepseekocr.py")).unwrap(), FORKED, "fork file written in {}", d.display());
        // The files the fork does not list get our rules.
        assert!(std::fs::read(d.join("modeling_deepseekv2.py")).unwrap().starts_with(b"# ocr-patch: patched"));
    }
    assert_eq!(log.lock().unwrap().len(), 1, "downloaded once, used twice: {:?}", log.lock().unwrap());

    // Idempotent: nothing to fetch or write any more.
    let out = cache.cmd().args(["apply", "--json", "--fork"]).arg(&fork).arg("--lock").arg(&lock).assert().success().get_output().stdout.clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["summary"]["patch"], 0);
    assert_eq!(log.lock().unwrap().len(), 1);

    cache.cmd().arg("revert").assert().success();
    assert_eq!(cache.state(), before);
}

#[test]
fn fork_hash_mismatch_writes_nothing() {
    let files = fixture_files();
    let cache = Cache::new();
    cache.add_snapshot(REPO, COMMIT, &files);
    let lock = cache.lock_for(&files);
    let mut served = HashMap::new();
    served.insert(format!("/{REPO}/raw/abc123/modeling_deepseekocr.py"), b"# tampered\n".to_vec());
    let (base, _) = serve(served);
    let fork = fork_toml(&cache, &base, &sha(FORKED));
    let before = cache.state();
    let out = cache.cmd().arg("apply").arg("--fork").arg(&fork).arg("--lock").arg(&lock).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = lines(&out.stderr);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].starts_with(&format!("error: {base}/")) && err[0].contains("does not match the pin") && err[0].contains("nothing was written"), "{err:?}");
    assert_eq!(cache.state(), before);
}

#[test]
fn fork_404_and_bad_fork_file() {
    let files = fixture_files();
    let cache = Cache::new();
    cache.add_snapshot(REPO, COMMIT, &files);
    let lock = cache.lock_for(&files);
    let (base, _) = serve(HashMap::new());
    let fork = fork_toml(&cache, &base, &sha(FORKED));
    let before = cache.state();
    let out = cache.cmd().arg("apply").arg("--fork").arg(&fork).arg("--lock").arg(&lock).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(lines(&out.stderr)[0].contains("server answered 404"), "{:?}", lines(&out.stderr));
    std::fs::write(&fork, "url_template = 3\n").unwrap();
    let out = cache.cmd().arg("apply").arg("--fork").arg(&fork).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(lines(&out.stderr)[0].contains("fork.toml: not a valid fork file"), "{:?}", lines(&out.stderr));
    assert_eq!(cache.state(), before);
}
