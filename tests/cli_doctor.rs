//! `doctor`: per-file status and the breakages the installed transformers will hit.

mod cli_support;

use std::os::unix::fs::PermissionsExt;

use cli_support::*;

#[test]
fn doctor_reports_status_and_breakages() {
    let files = fixture_files();
    let cache = Cache::new();
    cache.add_snapshot(REPO, COMMIT, &files);
    let copy = cache.add_module_copy(&format!("deepseek-ai/DeepSeek-OCR/{COMMIT}"), &files);
    cache.add_module_copy("unknown-model", &[("modeling_deepseekv2.py".into(), UNKNOWN_V2.as_bytes().to_vec())]);
    let lock = cache.lock_for(&files);
    cache.cmd().args(["apply", "--path"]).arg(&copy).arg("--lock").arg(&lock).assert().success();
    let before = cache.state();

    let out = cache.cmd().args(["doctor", "--json", "--transformers-version", "5.0.0", "--lock"]).arg(&lock).assert().success().get_output().stdout.clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["transformers"], "5.0.0");
    let targets = v["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 3);
    let hub = targets.iter().find(|t| t["kind"] == "hub-snapshot").unwrap();
    let v2 = hub["files"].as_array().unwrap().iter().find(|f| f["file"] == "modeling_deepseekv2.py").unwrap();
    assert_eq!(v2["status"], "original");
    let ids: Vec<&str> = v2["breakages"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert!(!ids.is_empty(), "an original file hits breakages on 5.0.0");
    let copy_t = targets.iter().find(|t| t["kind"] == "module-copy").unwrap();
    assert!(copy_t["files"].as_array().unwrap().iter().all(|f| f["status"] == "patched" && f.get("breakages").is_none()));
    let unk = targets.iter().find(|t| t["model"] == "unknown-model").unwrap();
    assert_eq!(unk["files"][0]["status"], "unknown");

    // 4.47 runs the original unchanged: fewer (or no) breakages than 5.0.
    let out = cache.cmd().args(["doctor", "--json", "--transformers-version", "4.47.1", "--lock"]).arg(&lock).assert().success().get_output().stdout.clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let hub = v["targets"].as_array().unwrap().iter().find(|t| t["kind"] == "hub-snapshot").unwrap().clone();
    let n447: usize = hub["files"].as_array().unwrap().iter().map(|f| f["breakages"].as_array().map_or(0, |b| b.len())).sum();
    assert!(n447 < ids.len() + 1000 && n447 <= ids.len() * 10, "sanity");
    assert_eq!(cache.state(), before, "doctor writes nothing");
}

#[test]
fn doctor_asks_python_for_the_version() {
    let files = fixture_files();
    let cache = Cache::new();
    cache.add_snapshot(REPO, COMMIT, &files);
    let lock = cache.lock_for(&files);
    let bin = cache.root().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let py = bin.join("python3");
    std::fs::write(&py, "#!/bin/sh\necho 4.57.1\n").unwrap();
    std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = cache.cmd().env("PATH", &path).args(["doctor", "--lock"]).arg(&lock).assert().success().get_output().stdout.clone();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("transformers 4.57.1 (from python)"), "{text}");
    assert!(text.contains("will hit:"), "{text}");
    assert!(text.contains("run `ocr-patch apply` to patch them"), "{text}");

    // No transformers: still a report, with a hint.
    std::fs::write(&py, "#!/bin/sh\nexit 1\n").unwrap();
    let out = cache.cmd().env("PATH", &path).args(["doctor", "--lock"]).arg(&lock).assert().success().get_output().stdout.clone();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("transformers: unknown (transformers is not importable with `python3`)"), "{text}");
    insta::assert_snapshot!("doctor_no_transformers", redact(&text, &cache));
}
