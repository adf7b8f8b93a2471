//! The patch engine on the fixture model we wrote (tests/fixtures/tinyocr) and, when
//! `OCR_PATCH_UPSTREAM` points at the real remote code, on the Hub files.

use std::fs;
use std::path::{Path, PathBuf};

use ocr_patch::patch::{self, Engine, Lock, Outcome, PatchError, PatchOptions, Status, Version};

const TARGETED: [&str; 3] = ["modeling_deepseekocr.py", "modeling_deepseekv2.py", "deepencoder.py"];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tinyocr")
}

fn fixture_lock() -> Lock {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lock.toml");
    Lock::parse(&fs::read_to_string(&path).unwrap(), "tests/fixtures/lock.toml").unwrap()
}

fn engine() -> Engine {
    Engine::embedded().unwrap().with_lock(fixture_lock())
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
}

fn pinned_only() -> PatchOptions {
    PatchOptions { allow_unpinned: false }
}

#[test]
fn locks_match_the_compiled_rules() {
    let fingerprint = patch::rules_sha256();
    let embedded = Lock::parse(patch::LOCK_TOML, "patches/lock.toml").unwrap();
    assert_eq!(
        embedded.rules_sha256, fingerprint,
        "patches/lock.toml is stale: run `just lock` (needs the real remote code in .upstream/hub)"
    );
    assert_eq!(fixture_lock().rules_sha256, fingerprint, "tests/fixtures/lock.toml is stale: run `just lock`");
}

#[test]
fn fixture_files_patch_to_their_pinned_result_and_then_are_left_alone() {
    let engine = engine();
    let dir = fixture_dir();
    for name in TARGETED {
        let original = read(&dir, name);
        assert!(matches!(engine.classify(name, &original), Status::Original(_)), "{name}");
        let Outcome::Patched { bytes, applied, unmatched, pinned } = engine.patch(name, &original, &pinned_only()).unwrap()
        else {
            panic!("{name}: expected a patch");
        };
        assert!(pinned && unmatched.is_empty() && !applied.is_empty(), "{name}: {applied:?} {unmatched:?}");
        assert!(String::from_utf8_lossy(&bytes).starts_with(patch::MARKER), "{name}: no marker line");
        assert!(matches!(engine.classify(name, &bytes), Status::Patched(_)), "{name}");
        assert_eq!(engine.patch(name, &bytes, &pinned_only()).unwrap(), Outcome::AlreadyPatched, "{name}");
    }
}

#[test]
fn every_untouched_line_survives() {
    let engine = engine();
    let name = "modeling_deepseekv2.py";
    let original = String::from_utf8(read(&fixture_dir(), name)).unwrap();
    let Outcome::Patched { bytes, .. } = engine.patch(name, original.as_bytes(), &pinned_only()).unwrap() else {
        panic!("expected a patch")
    };
    let patched = String::from_utf8(bytes).unwrap();
    let diff = similar::TextDiff::from_lines(&original, &patched);
    let removed: Vec<&str> = diff
        .iter_all_changes()
        .filter(|c| c.tag() == similar::ChangeTag::Delete)
        .map(|c| c.value().trim())
        .filter(|line| !line.is_empty())
        .collect();
    assert!(!removed.is_empty(), "the rules changed nothing");
    // Only lines a rule targets may go: imports, the fx block, the rewritten calls.
    for line in &removed {
        assert!(
            ["import", "Llama", "is_", "if ", "_prepare", "torch.fx", ")", "get_", "seen_tokens", "from_legacy",
             "to_legacy", "self_attn", "class ", "_tied", "ALL_LAYERNORM"]
                .iter()
                .any(|k| line.contains(k)),
            "a line no rule targets was removed: {line:?}"
        );
    }
}

#[test]
fn unknown_hash_is_refused_unless_unpinned_is_allowed() {
    let engine = engine();
    let name = "modeling_deepseekocr.py";
    let mut changed = read(&fixture_dir(), name);
    changed.extend_from_slice(b"\n# a local edit\n");
    let err = engine.patch(name, &changed, &pinned_only()).unwrap_err();
    assert!(matches!(err, PatchError::UnknownHash { .. }), "{err}");
    assert!(err.to_string().contains("--allow-unpinned"), "{err}");
    let Outcome::Patched { applied, pinned, .. } =
        engine.patch(name, &changed, &PatchOptions { allow_unpinned: true }).unwrap()
    else {
        panic!("expected a patch")
    };
    assert!(!pinned);
    assert!(applied.contains(&"F".to_string()) && applied.contains(&"D".to_string()), "{applied:?}");
}

#[test]
fn unpinned_file_reports_rules_that_did_not_match() {
    let engine = engine();
    let src = b"class DeepseekOCRConfig(Base):\n    model_type = 'x'\n";
    let Outcome::Patched { applied, unmatched, bytes, .. } =
        engine.patch("modeling_deepseekocr.py", src, &PatchOptions { allow_unpinned: true }).unwrap()
    else {
        panic!("expected a patch")
    };
    assert_eq!(applied, vec!["Q".to_string()]);
    assert!(unmatched.contains(&"F".to_string()));
    let text = String::from_utf8(bytes).unwrap();
    assert!(text.contains("    def __init__(self, **kwargs):"), "{text}");
}

#[test]
fn syntax_errors_and_truncated_files_are_refused() {
    let engine = engine();
    let name = "modeling_deepseekv2.py";
    let original = read(&fixture_dir(), name);
    let truncated = &original[..original.len() / 2];
    for bad in [truncated, b"def broken(:\n    pass\n".as_slice()] {
        let err = engine.patch(name, bad, &PatchOptions { allow_unpinned: true }).unwrap_err();
        assert!(matches!(err, PatchError::Syntax { .. }), "{err}");
    }
}

#[test]
fn files_no_rule_targets_are_not_touched() {
    let engine = engine();
    assert_eq!(engine.patch("config.json", b"{}", &pinned_only()).unwrap(), Outcome::NotTargeted);
    assert_eq!(engine.patch("conversation.py", b"x = 1\n", &pinned_only()).unwrap(), Outcome::NotTargeted);
}

#[test]
fn doctor_breakages_follow_the_release() {
    let engine = engine();
    let v2 = read(&fixture_dir(), "modeling_deepseekv2.py");
    let ids = |v: &str| -> Vec<String> {
        engine.breakages("modeling_deepseekv2.py", &v2, &Version::parse(v).unwrap()).unwrap().into_iter().map(|h| h.id).collect()
    };
    assert!(ids("4.46.3").is_empty(), "{:?}", ids("4.46.3"));
    assert_eq!(ids("4.48.0"), vec!["A", "B", "C"]);
    assert!(ids("4.48.3").iter().all(|id| id != "B"));
    let v5 = ids("5.0.0");
    for id in ["A", "C", "D", "G", "I", "J", "M", "N", "O"] {
        assert!(v5.iter().any(|x| x == id), "5.0.0 should hit {id}: {v5:?}");
    }
    assert!(!v5.iter().any(|x| x == "R"), "R is 5.4 only: {v5:?}");
    assert!(ids("5.24.0").iter().any(|x| x == "T"));
}

#[test]
fn patched_fixture_snapshots() {
    let engine = engine();
    for name in TARGETED {
        let original = read(&fixture_dir(), name);
        let Outcome::Patched { bytes, .. } = engine.patch(name, &original, &pinned_only()).unwrap() else {
            panic!("expected a patch")
        };
        let original = String::from_utf8(original).unwrap();
        let patched = String::from_utf8(bytes).unwrap();
        // The prelude is the same in every file; snapshot only what the rules changed.
        let diff = similar::TextDiff::from_lines(&original, &patched)
            .unified_diff()
            .context_radius(1)
            .to_string();
        let mut settings = insta::Settings::clone_current();
        settings.add_filter(r"sha256:[0-9a-f]{64}", "sha256:[HASH]");
        settings.add_filter(r"ruleset \S+", "ruleset [RULESET]");
        settings.bind(|| insta::assert_snapshot!(format!("patched_{name}"), strip_prelude(&diff)));
    }
}

/// Replaces the inserted prelude block of a unified diff with one line.
fn strip_prelude(diff: &str) -> String {
    let mut out = Vec::new();
    let mut inside = false;
    for line in diff.lines() {
        if line.contains("ocr-patch prelude (begin)") {
            inside = true;
            out.push("+[prelude: patches/prelude.py]");
            continue;
        }
        if inside {
            inside = !line.contains("ocr-patch prelude (end)");
            continue;
        }
        out.push(line);
    }
    out.join("\n")
}

/// The real remote code, when present (`OCR_PATCH_UPSTREAM=.upstream/hub`): every pinned file
/// patches to the lock's hash, every rule matches as the rules say.
#[test]
fn upstream_files_patch_to_the_locked_hashes() {
    let Ok(dir) = std::env::var("OCR_PATCH_UPSTREAM") else {
        eprintln!("skipped: set OCR_PATCH_UPSTREAM to the folder holding the real remote code");
        return;
    };
    let engine = Engine::embedded().unwrap();
    for name in TARGETED {
        let original = read(Path::new(&dir), name);
        assert!(matches!(engine.classify(name, &original), Status::Original(_)), "{name}: not the pinned bytes");
        match engine.patch(name, &original, &pinned_only()) {
            Ok(Outcome::Patched { pinned: true, .. }) => {}
            other => panic!("{name}: {other:?}"),
        }
    }
}
