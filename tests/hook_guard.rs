//! The import hook's cache side (`cache::guard`): a snapshot file patched at its first read,
//! huggingface_hub's download lock honoured, module copies patched, user folders left alone,
//! unknown files refused without a write.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use ocr_patch::cache::guard::{guard_file, Guarded};
use ocr_patch::cache::hub::{git_blob_sha1, hf_lock_path, HfLock};
use ocr_patch::patch::{Engine, Lock};

fn engine() -> Engine {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/lock.toml")).unwrap();
    Engine::embedded().unwrap().with_lock(Lock::parse(&text, "fixture lock").unwrap())
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tinyocr").join(name)).unwrap()
}

/// hub/models--o--m/{blobs/<etag>, snapshots/c1/<name> -> ../../blobs/<etag>}
fn snapshot(hub: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let repo = hub.join("models--o--m");
    let etag = git_blob_sha1(bytes);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots/c1")).unwrap();
    std::fs::write(repo.join("blobs").join(&etag), bytes).unwrap();
    let link = repo.join("snapshots/c1").join(name);
    symlink(Path::new("../../blobs").join(&etag), &link).unwrap();
    link
}

#[test]
fn snapshot_file_is_patched_once_and_blob_kept() {
    let t = tempfile::tempdir().unwrap();
    let orig = fixture("modeling_deepseekv2.py");
    let link = snapshot(t.path(), "modeling_deepseekv2.py", &orig);
    let e = engine();
    assert_eq!(guard_file(&e, &link, false).unwrap(), Guarded::Patched);
    assert!(std::fs::read_to_string(&link).unwrap().starts_with("# ocr-patch: patched"));
    assert_eq!(std::fs::read(t.path().join("models--o--m/blobs").join(git_blob_sha1(&orig))).unwrap(), orig);
    assert_eq!(guard_file(&e, &link, false).unwrap(), Guarded::AlreadyPatched);
    let other = snapshot(t.path(), "conversation.py", &fixture("conversation.py"));
    assert_eq!(guard_file(&e, &other, false).unwrap(), Guarded::NotTargeted);
}

#[test]
fn waits_for_huggingface_hub_download_lock() {
    let t = tempfile::tempdir().unwrap();
    let orig = fixture("deepencoder.py");
    let link = snapshot(t.path(), "deepencoder.py", &orig);
    let held = HfLock::acquire(&hf_lock_path(t.path(), "o/m", &git_blob_sha1(&orig)), Duration::from_secs(1)).unwrap();
    let path = link.clone();
    let worker = std::thread::spawn(move || guard_file(&engine(), &path, false).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert!(std::fs::read_link(&link).is_ok(), "patched while huggingface_hub held its lock");
    drop(held);
    assert_eq!(worker.join().unwrap(), Guarded::Patched);
}

#[test]
fn module_copies_user_folders_and_unknown_files() {
    let t = tempfile::tempdir().unwrap();
    let e = engine();
    let copy = t.path().join("modules/transformers_modules/o/m/c1");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::write(copy.join("modeling_deepseekocr.py"), fixture("modeling_deepseekocr.py")).unwrap();
    assert_eq!(guard_file(&e, &copy.join("modeling_deepseekocr.py"), false).unwrap(), Guarded::Patched);
    let mine = t.path().join("my-model");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("modeling_deepseekocr.py"), fixture("modeling_deepseekocr.py")).unwrap();
    assert_eq!(guard_file(&e, &mine.join("modeling_deepseekocr.py"), false).unwrap(), Guarded::Outside);
    assert_eq!(std::fs::read(mine.join("modeling_deepseekocr.py")).unwrap(), fixture("modeling_deepseekocr.py"));
    let link = snapshot(&t.path().join("hub"), "modeling_deepseekv2.py", b"x = 1\n");
    let err = guard_file(&e, &link, false).unwrap_err().to_string();
    assert!(err.contains("unknown file"), "{err}");
    assert!(std::fs::read_link(&link).is_ok(), "nothing written");
}
