//! apply / check / diff / revert on every cache layout, with the tinyocr fixture pinned by a
//! lock made at test time.

mod cli_support;

use std::path::Path;

use cli_support::*;

fn is_symlink(p: &Path) -> bool {
    std::fs::symlink_metadata(p).unwrap().file_type().is_symlink()
}

#[test]
fn apply_patches_every_layout_then_revert_restores_bytes_and_symlinks() {
    let files = fixture_files();
    let cache = Cache::full(&files);
    let lock = cache.lock_for(&files);
    let before = cache.state();

    cache.cmd().arg("check").arg("--lock").arg(&lock).assert().code(1);
    let out = cache.cmd().arg("apply").arg("--lock").arg(&lock).assert().success().get_output().stdout.clone();
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("apply: 15 patched, 0 already patched"), "{text}");

    // Hub snapshot: symlinks became regular patched files; the blobs are untouched.
    let snap = cache.repo_dir(REPO).join("snapshots").join(COMMIT);
    for (name, bytes) in &files {
        let p = snap.join(name);
        let now = std::fs::read(&p).unwrap();
        let blob = cache.repo_dir(REPO).join("blobs").join(sha(bytes));
        assert_eq!(std::fs::read(&blob).unwrap(), *bytes, "blob of {name} untouched");
        if name.starts_with("modeling_") || name == "deepencoder.py" {
            assert!(!is_symlink(&p), "{name} is now a regular file");
            assert!(now.starts_with(b"# ocr-patch: patched"), "{name} carries the marker");
        } else {
            assert!(is_symlink(&p), "{name} (not targeted) is still a symlink");
        }
    }
    // Every module copy is patched too, with a backup.
    for rel in [format!("deepseek-ai/DeepSeek-OCR/{COMMIT}"), format!("deepseek_hyphen_ai/DeepSeek_hyphen_OCR/{COMMIT}"), "tinyocr".into(), "tinyocr/0123456789abcdef".into()] {
        let d = cache.modules().join(&rel);
        let v2 = std::fs::read(d.join("modeling_deepseekv2.py")).unwrap();
        assert!(v2.starts_with(b"# ocr-patch: patched"), "{rel}");
        assert!(d.join(".ocr-patch/manifest.json").is_file(), "{rel}");
        assert!(d.join(".ocr-patch/modeling_deepseekv2.py.orig").is_file(), "{rel}");
    }

    // Idempotent.
    let after = cache.state();
    let out = cache.cmd().arg("apply").arg("--lock").arg(&lock).assert().success().get_output().stdout.clone();
    assert!(String::from_utf8_lossy(&out).contains("apply: 0 patched, 15 already patched"));
    assert_eq!(cache.state(), after, "second apply changes nothing");
    cache.cmd().arg("check").arg("--lock").arg(&lock).assert().code(0);

    // Revert: byte-identical files, the same symlinks, no backup folders left.
    cache.cmd().arg("revert").arg("--lock").arg(&lock).assert().success();
    assert_eq!(cache.state(), before);
    cache.cmd().arg("revert").assert().success();
    assert_eq!(cache.state(), before, "second revert changes nothing");
}

#[test]
fn apply_output_snapshot() {
    let files = fixture_files();
    let cache = Cache::new();
    cache.add_snapshot(REPO, COMMIT, &files);
    cache.add_module_copy(&format!("deepseek_hyphen_ai/DeepSeek_hyphen_OCR/{COMMIT}"), &files);
    let lock = cache.lock_for(&files);
    let out = cache.cmd().arg("apply").arg("--lock").arg(&lock).assert().success().get_output().clone();
    insta::assert_snapshot!("apply_text", redact(&String::from_utf8_lossy(&out.stdout), &cache));
    assert!(out.stderr.is_empty(), "no progress bar when stderr is not a terminal");
    let out = cache.cmd().arg("check").arg("--lock").arg(&lock).assert().code(0).get_output().stdout.clone();
    insta::assert_snapshot!("check_clean_text", redact(&String::from_utf8_lossy(&out), &cache));
    let out = cache.cmd().arg("revert").assert().success().get_output().stdout.clone();
    insta::assert_snapshot!("revert_text", redact(&String::from_utf8_lossy(&out), &cache));
}

#[test]
fn json_report_has_every_file() {
    let files = fixture_files();
    let cache = Cache::new();
    cache.add_snapshot(REPO, COMMIT, &files);
    let lock = cache.lock_for(&files);
    let out = cache.cmd().args(["apply", "--json", "--lock"]).arg(&lock).assert().success().get_output().stdout.clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["command"], "apply");
    assert_eq!(v["summary"]["patch"], 3);
    let t = &v["targets"][0];
    assert_eq!(t["kind"], "hub-snapshot");
    assert_eq!(t["model"], REPO);
    assert_eq!(t["revision"], COMMIT);
    let f = t["files"].as_array().unwrap().iter().find(|f| f["file"] == "modeling_deepseekv2.py").unwrap();
    assert_eq!(f["action"], "patch");
    assert_eq!(f["status"], "original");
    assert_eq!(f["pinned"], true);
    assert!(f["symlink"].as_str().unwrap().starts_with("../../blobs/"));
    assert_eq!(f["sha256_after"].as_str().unwrap(), sha(&std::fs::read(f["path"].as_str().unwrap()).unwrap()));
    assert!(!f["applied"].as_array().unwrap().is_empty());
}

#[test]
fn diff_and_dry_run_write_nothing() {
    let files = fixture_files();
    let cache = Cache::full(&files);
    let lock = cache.lock_for(&files);
    let before = cache.state();
    let out = cache.cmd().arg("diff").arg("--lock").arg(&lock).assert().success().get_output().stdout.clone();
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("+# ocr-patch: patched"), "{text}");
    assert!(text.contains("@@ "), "unified diff hunks");
    assert!(text.contains("diff: 15 to patch"), "{text}");
    let out2 = cache.cmd().args(["apply", "--dry-run", "--lock"]).arg(&lock).assert().success().get_output().stdout.clone();
    assert_eq!(String::from_utf8_lossy(&out2).replace("apply: ", "diff: "), text, "diff == apply --dry-run");
    cache.cmd().args(["revert", "--dry-run"]).assert().success();
    assert_eq!(cache.state(), before);
}

#[test]
fn model_and_path_restrict_the_scan() {
    let files = fixture_files();
    let cache = Cache::full(&files);
    cache.add_snapshot("someone/Other-OCR", COMMIT, &files);
    let lock = cache.lock_for(&files);
    let out = cache.cmd().args(["check", "--json", "--model", "someone/other-ocr", "--lock"]).arg(&lock).assert().code(1).get_output().stdout.clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let dirs: Vec<&str> = v["targets"].as_array().unwrap().iter().map(|t| t["model"].as_str().unwrap()).collect();
    assert_eq!(dirs, vec!["someone/Other-OCR"]);

    let out = cache.cmd().args(["check", "--json", "--model", REPO, "--lock"]).arg(&lock).assert().code(1).get_output().stdout.clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let kinds: Vec<&str> = v["targets"].as_array().unwrap().iter().map(|t| t["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["hub-snapshot", "module-copy", "module-copy"]);

    // --path: a plain local model folder, and nothing else.
    let local = cache.root().join("my-model");
    std::fs::create_dir_all(&local).unwrap();
    for (n, b) in &files {
        std::fs::write(local.join(n), b).unwrap();
    }
    let before = cache.state();
    cache.cmd().args(["apply", "--path"]).arg(&local).arg("--lock").arg(&lock).assert().success();
    assert_eq!(cache.state(), before, "the caches were not touched");
    assert!(std::fs::read(local.join("deepencoder.py")).unwrap().starts_with(b"# ocr-patch: patched"));
    cache.cmd().args(["revert", "--path"]).arg(&local).assert().success();
    for (n, b) in &files {
        assert_eq!(&std::fs::read(local.join(n)).unwrap(), b);
    }
    assert!(!local.join(".ocr-patch").exists());
}

#[test]
fn env_vars_choose_the_caches() {
    let files = fixture_files();
    let cache = Cache::new();
    let lock = cache.lock_for(&files);
    // A hub cache in HF_HUB_CACHE and a modules cache in HF_MODULES_CACHE, away from HF_HOME.
    let hub = cache.root().join("elsewhere/hub");
    let mods = cache.root().join("elsewhere/mods");
    std::fs::create_dir_all(&hub).unwrap();
    let c2 = Cache { tmp: tempfile::tempdir_in(cache.root()).unwrap() };
    let snap = c2.add_snapshot(REPO, COMMIT, &files);
    std::fs::rename(c2.repo_dir(REPO), hub.join(format!("models--{}", REPO.replace('/', "--")))).unwrap();
    let _ = snap;
    std::fs::create_dir_all(mods.join("transformers_modules/tinyocr")).unwrap();
    for (n, b) in &files {
        std::fs::write(mods.join("transformers_modules/tinyocr").join(n), b).unwrap();
    }
    let count = |out: &[u8]| -> u64 { serde_json::from_slice::<serde_json::Value>(out).unwrap()["summary"]["folders"].as_u64().unwrap() };
    let out = cache.cmd().env("HF_HUB_CACHE", &hub).env("HF_MODULES_CACHE", &mods).args(["check", "--json", "--lock"]).arg(&lock).output().unwrap();
    assert_eq!(count(&out.stdout), 2);
    let out = cache.cmd().env("HUGGINGFACE_HUB_CACHE", &hub).args(["check", "--json", "--lock"]).arg(&lock).output().unwrap();
    assert_eq!(count(&out.stdout), 1);
    let out = cache.cmd().env("TRANSFORMERS_CACHE", &hub).args(["check", "--json", "--lock"]).arg(&lock).output().unwrap();
    assert_eq!(count(&out.stdout), 1);
    let out = cache.cmd().args(["check", "--json", "--cache-dir"]).arg(&hub).arg("--modules-dir").arg(&mods).arg("--lock").arg(&lock).output().unwrap();
    assert_eq!(count(&out.stdout), 2);
    // XDG_CACHE_HOME when HF_HOME is unset.
    let xdg = cache.root().join("xdg");
    std::fs::create_dir_all(xdg.join("huggingface")).unwrap();
    std::fs::rename(&hub, xdg.join("huggingface/hub")).unwrap();
    let out = cache.cmd().env_remove("HF_HOME").env("XDG_CACHE_HOME", &xdg).args(["check", "--json", "--lock"]).arg(&lock).output().unwrap();
    assert_eq!(count(&out.stdout), 1);
}

#[test]
fn nothing_found_is_not_an_error() {
    let cache = Cache::new();
    let out = cache.cmd().arg("check").assert().code(0).get_output().stdout.clone();
    insta::assert_snapshot!("nothing_found", redact(&String::from_utf8_lossy(&out), &cache));
    cache.cmd().arg("apply").assert().code(0);
}

#[test]
fn two_snapshots_sharing_blobs() {
    let files = fixture_files();
    let cache = Cache::new();
    let s1 = cache.add_snapshot(REPO, COMMIT, &files);
    let s2 = cache.add_snapshot(REPO, COMMIT2, &files);
    let lock = cache.lock_for(&files);
    // Patch only the snapshot given by --path: the other one and the shared blobs stay.
    let s2_before = state_of(&s2);
    let blobs_before = state_of(&cache.repo_dir(REPO).join("blobs"));
    cache.cmd().arg("apply").arg("--path").arg(&s1).arg("--lock").arg(&lock).assert().success();
    assert_eq!(state_of(&s2), s2_before, "the other snapshot is untouched");
    assert_eq!(state_of(&cache.repo_dir(REPO).join("blobs")), blobs_before, "blobs are untouched");
    assert!(std::fs::read(s1.join("modeling_deepseekv2.py")).unwrap().starts_with(b"# ocr-patch"));
    // Then both; revert one; the other keeps its patch.
    cache.cmd().arg("apply").arg("--lock").arg(&lock).assert().success();
    cache.cmd().arg("revert").arg("--path").arg(&s2).assert().success();
    assert_eq!(state_of(&s2), s2_before);
    assert!(std::fs::read(s1.join("modeling_deepseekv2.py")).unwrap().starts_with(b"# ocr-patch"));
    assert_eq!(state_of(&cache.repo_dir(REPO).join("blobs")), blobs_before);
}

#[test]
fn revert_without_manifest_finds_the_blob() {
    // A snapshot patched by an earlier run whose `.ocr-patch/` folder was deleted: the marker
    // names the original's sha256, and the blob with that hash is still there.
    let files = fixture_files();
    let cache = Cache::new();
    let snap = cache.add_snapshot(REPO, COMMIT, &files);
    let lock = cache.lock_for(&files);
    let before = cache.state();
    cache.cmd().arg("apply").arg("--lock").arg(&lock).assert().success();
    std::fs::remove_dir_all(snap.join(".ocr-patch")).unwrap();
    cache.cmd().arg("revert").arg("--lock").arg(&lock).assert().success();
    assert_eq!(cache.state(), before);
}

#[test]
fn revert_refuses_hand_edited_files_unless_forced() {
    let files = fixture_files();
    let cache = Cache::new();
    let d = cache.add_module_copy("tinyocr", &files);
    let lock = cache.lock_for(&files);
    cache.cmd().arg("apply").arg("--lock").arg(&lock).assert().success();
    std::fs::write(d.join("deepencoder.py"), b"# edited by hand\n").unwrap();
    let before = cache.state();
    let out = cache.cmd().arg("revert").assert().code(2).get_output().stderr.clone();
    let l = lines(&out);
    assert_eq!(l.len(), 1, "{l:?}");
    assert!(l[0].contains("deepencoder.py: changed since ocr-patch wrote it") && l[0].ends_with("pass --force to restore the original anyway"), "{l:?}");
    assert_eq!(cache.state(), before);
    cache.cmd().args(["revert", "--force"]).assert().success();
    for (n, b) in &files {
        assert_eq!(&std::fs::read(d.join(n)).unwrap(), b);
    }
}

#[test]
fn help_documents_exit_codes() {
    let out = Cache::new().cmd().arg("--help").assert().success().get_output().stdout.clone();
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("Exit codes:") && text.contains("1  changes pending"), "{text}");
    for sub in ["apply", "check", "diff", "revert", "doctor"] {
        let out = Cache::new().cmd().args([sub, "--help"]).assert().success().get_output().stdout.clone();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("--json") && text.contains("Exit codes:"), "{sub}: {text}");
    }
}
