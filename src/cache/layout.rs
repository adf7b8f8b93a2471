//! Where Hugging Face keeps remote code, found the way huggingface_hub and transformers find it.
//!
//! Hub cache (huggingface_hub `constants.py`, transformers `utils/hub.py`):
//! `HF_HOME` = `$HF_HOME` or `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`;
//! hub cache = `HF_HUB_CACHE` or `HUGGINGFACE_HUB_CACHE` or `$HF_HOME/hub`; transformers 4.x
//! also honours the legacy `TRANSFORMERS_CACHE`, so when it is set it is scanned too.
//! Modules cache (transformers `dynamic_module_utils.py`): `HF_MODULES_CACHE` or
//! `$HF_HOME/modules`, package folder `transformers_modules`.
//!
//! A *target* is one folder that holds at least one file the engine targets:
//! - a hub snapshot folder `models--org--repo/snapshots/<commit>/` (files are symlinks into
//!   `../../blobs/<etag>`);
//! - a module copy `transformers_modules/<org>/<repo>/<commit>/` (raw names up to 4.56,
//!   `_hyphen_` / `_dot_` sanitised names from 4.57);
//! - a local-dir copy `transformers_modules/<basename>/` (before 5.8) or
//!   `transformers_modules/<basename>/<sha16>/` (5.8+);
//! - a plain folder given with `--path`.
//!
//! This module only reads directory listings; it never opens file contents.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// What kind of folder a target is; decides how a file is backed up and restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// `models--org--repo/snapshots/<commit>/`: files are symlinks to shared blobs.
    HubSnapshot,
    /// `transformers_modules/<org>/<repo>/<commit>/`: regular files copied by transformers.
    ModuleCopy,
    /// `transformers_modules/<basename>/[<sha16>/]`: copies of a local model folder.
    LocalCopy,
    /// A folder given with `--path`.
    Path,
}

impl TargetKind {
    pub fn label(self) -> &'static str {
        match self {
            TargetKind::HubSnapshot => "hub snapshot",
            TargetKind::ModuleCopy => "module copy",
            TargetKind::LocalCopy => "local-dir copy",
            TargetKind::Path => "folder",
        }
    }
}

/// One folder holding remote code we know how to patch.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub dir: PathBuf,
    pub kind: TargetKind,
    /// `org/repo` for hub snapshots and module copies (de-sanitised), the folder basename for
    /// local-dir copies, `None` for `--path` folders.
    pub model: Option<String>,
    /// The commit (hub, module copy) or the 16-hex content hash (5.8+ local copies).
    pub revision: Option<String>,
    /// File names in `dir` that the engine (or the fork) targets, sorted.
    pub files: Vec<String>,
}

/// The roots to scan, resolved once from flags and the environment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Roots {
    /// Hub caches (folders holding `models--*`).
    pub hub: Vec<PathBuf>,
    /// Module caches (folders holding `transformers_modules/`).
    pub modules: Vec<PathBuf>,
    /// Plain folders (`--path`); when non-empty, the caches are not scanned.
    pub paths: Vec<PathBuf>,
}

/// Flags that override the environment.
#[derive(Debug, Clone, Default)]
pub struct RootOptions {
    pub cache_dir: Option<PathBuf>,
    pub modules_dir: Option<PathBuf>,
    pub paths: Vec<PathBuf>,
}

/// The environment variables we honour, in the order they are looked up.
pub const ENV_VARS: &[&str] = &[
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_MODULES_CACHE",
    "XDG_CACHE_HOME",
    "HOME",
];

fn expand_user(p: OsString, home: Option<&Path>) -> PathBuf {
    let p = PathBuf::from(p);
    match (p.strip_prefix("~"), home) {
        (Ok(rest), Some(h)) => h.join(rest),
        _ => p,
    }
}

impl Roots {
    /// Resolves the roots from flags and an environment lookup (`std::env::var_os` in the
    /// binary; a map in tests). Empty variables count as unset, as in huggingface_hub.
    pub fn resolve(opts: &RootOptions, env: impl Fn(&str) -> Option<OsString>) -> Roots {
        let get = |k: &str| env(k).filter(|v| !v.is_empty());
        let home = get("HOME").map(PathBuf::from);
        let hf_home = match get("HF_HOME") {
            Some(h) => expand_user(h, home.as_deref()),
            None => {
                let xdg = get("XDG_CACHE_HOME")
                    .map(|x| expand_user(x, home.as_deref()))
                    .or_else(|| home.as_ref().map(|h| h.join(".cache")))
                    .unwrap_or_else(|| PathBuf::from(".cache"));
                xdg.join("huggingface")
            }
        };
        if !opts.paths.is_empty() {
            return Roots { hub: vec![], modules: vec![], paths: opts.paths.clone() };
        }
        let mut hub = Vec::new();
        match &opts.cache_dir {
            Some(d) => hub.push(d.clone()),
            None => {
                // transformers 4.x reads TRANSFORMERS_CACHE for its downloads, huggingface_hub
                // reads HF_HUB_CACHE; a user with both set may have files in both.
                if let Some(t) = get("TRANSFORMERS_CACHE") {
                    hub.push(expand_user(t, home.as_deref()));
                }
                let main = get("HF_HUB_CACHE")
                    .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
                    .map(|p| expand_user(p, home.as_deref()))
                    .unwrap_or_else(|| hf_home.join("hub"));
                if !hub.contains(&main) {
                    hub.push(main);
                }
            }
        }
        let modules = match &opts.modules_dir {
            Some(d) => vec![d.clone()],
            None => vec![get("HF_MODULES_CACHE")
                .map(|p| expand_user(p, home.as_deref()))
                .unwrap_or_else(|| hf_home.join("modules"))],
        };
        Roots { hub, modules, paths: vec![] }
    }
}

/// `deepseek_hyphen_ai` -> `deepseek-ai` (transformers 4.57+ sanitises module folder names).
pub fn desanitize(name: &str) -> String {
    name.replace("_hyphen_", "-").replace("_dot_", ".")
}

/// `deepseek-ai/DeepSeek-OCR` -> `models--deepseek-ai--DeepSeek-OCR`.
pub fn hub_folder_name(model: &str) -> String {
    format!("models--{}", model.replace('/', "--"))
}

fn model_matches(filter: Option<&str>, model: &str) -> bool {
    filter.map_or(true, |f| f.eq_ignore_ascii_case(model))
}

fn is_hex16(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Groups the targeted files under `root` (up to `depth` levels) by the folder holding them.
/// Symlinks are listed, never followed: a snapshot file is a symlink, and a loop must not hang
/// the scan (it is reported when the file is read).
fn collect(root: &Path, depth: usize, is_target: &dyn Fn(&str) -> bool) -> BTreeMap<PathBuf, Vec<String>> {
    let mut groups: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    let walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .max_depth(depth)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let n = e.file_name().to_string_lossy();
            e.depth() == 0 || !(n.starts_with('.') || n == "__pycache__")
        });
    for entry in walker.flatten() {
        if entry.file_type().is_dir() {
            continue;
        }
        let Some(name) = entry.file_name().to_str() else { continue };
        if !is_target(name) {
            continue;
        }
        if let Some(parent) = entry.path().parent() {
            groups.entry(parent.to_path_buf()).or_default().push(name.to_string());
        }
    }
    groups
}

/// Finds every target under `roots`, restricted to `model` (`org/repo`, case-insensitive) when
/// given. `is_target` says whether a file name is one the engine (or a fork) rewrites.
/// Missing roots are skipped; the result is sorted by folder and free of duplicates.
pub fn discover(roots: &Roots, model: Option<&str>, is_target: &dyn Fn(&str) -> bool) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    for p in &roots.paths {
        for (dir, files) in collect(p, 3, is_target) {
            out.push(Target { dir, kind: TargetKind::Path, model: None, revision: None, files });
        }
    }
    for hub in &roots.hub {
        let Ok(rd) = std::fs::read_dir(hub) else { continue };
        let mut repos: Vec<_> = rd.flatten().collect();
        repos.sort_by_key(|e| e.file_name());
        for repo in repos {
            let name = repo.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_prefix("models--") else { continue };
            let id = id.replace("--", "/");
            if !model_matches(model, &id) {
                continue;
            }
            let snaps = repo.path().join("snapshots");
            let Ok(rd) = std::fs::read_dir(&snaps) else { continue };
            let mut commits: Vec<_> = rd.flatten().collect();
            commits.sort_by_key(|e| e.file_name());
            for commit in commits {
                let rev = commit.file_name().to_string_lossy().into_owned();
                for (dir, files) in collect(&commit.path(), 4, is_target) {
                    out.push(Target {
                        dir,
                        kind: TargetKind::HubSnapshot,
                        model: Some(id.clone()),
                        revision: Some(rev.clone()),
                        files,
                    });
                }
            }
        }
    }
    for m in &roots.modules {
        let tm = m.join("transformers_modules");
        for (dir, files) in collect(&tm, 5, is_target) {
            let Ok(rel) = dir.strip_prefix(&tm) else { continue };
            let parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            let (kind, id, rev) = match parts.as_slice() {
                [org, repo, commit] => {
                    (TargetKind::ModuleCopy, format!("{}/{}", desanitize(org), desanitize(repo)), Some(commit.clone()))
                }
                [base] => (TargetKind::LocalCopy, desanitize(base), None),
                [base, h] if is_hex16(h) => (TargetKind::LocalCopy, desanitize(base), Some(h.clone())),
                _ => (TargetKind::LocalCopy, desanitize(&parts.join("/")), None),
            };
            let keep = match (model, kind) {
                (None, _) => true,
                (Some(f), TargetKind::ModuleCopy) => f.eq_ignore_ascii_case(&id),
                // A local folder has no model id; match its basename with the repo's name.
                (Some(f), _) => f.rsplit('/').next().is_some_and(|n| n.eq_ignore_ascii_case(&id)),
            };
            if keep {
                out.push(Target { dir, kind, model: Some(id), revision: rev, files });
            }
        }
    }
    // The same folder reached twice (e.g. TRANSFORMERS_CACHE == HF_HUB_CACHE) is one target.
    let mut seen = std::collections::HashSet::new();
    out.retain(|t| seen.insert(std::fs::canonicalize(&t.dir).unwrap_or_else(|_| t.dir.clone())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let m: HashMap<String, OsString> = pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn defaults_follow_home() {
        let r = Roots::resolve(&RootOptions::default(), env(&[("HOME", "/h")]));
        assert_eq!(r.hub, vec![PathBuf::from("/h/.cache/huggingface/hub")]);
        assert_eq!(r.modules, vec![PathBuf::from("/h/.cache/huggingface/modules")]);
    }

    #[test]
    fn xdg_then_hf_home() {
        let r = Roots::resolve(&RootOptions::default(), env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]));
        assert_eq!(r.hub, vec![PathBuf::from("/x/huggingface/hub")]);
        let r = Roots::resolve(
            &RootOptions::default(),
            env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x"), ("HF_HOME", "~/hf")]),
        );
        assert_eq!(r.hub, vec![PathBuf::from("/h/hf/hub")]);
        assert_eq!(r.modules, vec![PathBuf::from("/h/hf/modules")]);
    }

    #[test]
    fn hub_cache_precedence_and_legacy() {
        let r = Roots::resolve(
            &RootOptions::default(),
            env(&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/old"), ("HF_HUB_CACHE", "/new")]),
        );
        assert_eq!(r.hub, vec![PathBuf::from("/new")]);
        let r = Roots::resolve(&RootOptions::default(), env(&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/old")]));
        assert_eq!(r.hub, vec![PathBuf::from("/old")]);
        let r = Roots::resolve(&RootOptions::default(), env(&[("HF_HOME", "/hf"), ("TRANSFORMERS_CACHE", "/tc")]));
        assert_eq!(r.hub, vec![PathBuf::from("/tc"), PathBuf::from("/hf/hub")]);
        let r = Roots::resolve(&RootOptions::default(), env(&[("HF_HOME", "/hf"), ("HF_MODULES_CACHE", "/mods"), ("HF_HUB_CACHE", "")]));
        assert_eq!(r.hub, vec![PathBuf::from("/hf/hub")], "empty counts as unset");
        assert_eq!(r.modules, vec![PathBuf::from("/mods")]);
    }

    #[test]
    fn flags_override_env() {
        let opts = RootOptions { cache_dir: Some("/c".into()), modules_dir: Some("/m".into()), paths: vec![] };
        let r = Roots::resolve(&opts, env(&[("HF_HUB_CACHE", "/new"), ("TRANSFORMERS_CACHE", "/tc")]));
        assert_eq!((r.hub, r.modules), (vec![PathBuf::from("/c")], vec![PathBuf::from("/m")]));
        let opts = RootOptions { paths: vec!["/p".into()], ..Default::default() };
        let r = Roots::resolve(&opts, env(&[]));
        assert!(r.hub.is_empty() && r.modules.is_empty());
    }

    #[test]
    fn names() {
        assert_eq!(desanitize("deepseek_hyphen_ai"), "deepseek-ai");
        assert_eq!(desanitize("DeepSeek_hyphen_OCR_dot_v2"), "DeepSeek-OCR.v2");
        assert_eq!(hub_folder_name("deepseek-ai/DeepSeek-OCR"), "models--deepseek-ai--DeepSeek-OCR");
    }

    #[test]
    fn discovers_every_layout() {
        let t = tempfile::tempdir().unwrap();
        let hub = t.path().join("hub");
        let mods = t.path().join("modules");
        let snap = hub.join("models--deepseek-ai--DeepSeek-OCR/snapshots/abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(hub.join("models--deepseek-ai--DeepSeek-OCR/blobs")).unwrap();
        std::os::unix::fs::symlink("../../blobs/e1", snap.join("modeling_x.py")).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        let tm = mods.join("transformers_modules");
        for d in ["deepseek-ai/DeepSeek-OCR/abc", "deepseek_hyphen_ai/DeepSeek_hyphen_OCR/abc", "mymodel", "mymodel/0123456789abcdef", "other/x/y"] {
            std::fs::create_dir_all(tm.join(d)).unwrap();
            std::fs::write(tm.join(d).join("modeling_x.py"), "x = 1\n").unwrap();
        }
        std::fs::create_dir_all(tm.join("mymodel/__pycache__")).unwrap();
        std::fs::write(tm.join("mymodel/__pycache__/modeling_x.py"), "").unwrap();
        let roots = Roots { hub: vec![hub, t.path().join("missing")], modules: vec![mods], paths: vec![] };
        let is_t = |n: &str| n == "modeling_x.py";
        let all = discover(&roots, None, &is_t);
        let kinds: Vec<_> = all.iter().map(|t| (t.kind, t.model.clone().unwrap(), t.revision.clone())).collect();
        assert_eq!(
            kinds,
            vec![
                (TargetKind::HubSnapshot, "deepseek-ai/DeepSeek-OCR".into(), Some("abc".into())),
                (TargetKind::ModuleCopy, "deepseek-ai/DeepSeek-OCR".into(), Some("abc".into())),
                (TargetKind::ModuleCopy, "deepseek-ai/DeepSeek-OCR".into(), Some("abc".into())),
                (TargetKind::LocalCopy, "mymodel".into(), None),
                (TargetKind::LocalCopy, "mymodel".into(), Some("0123456789abcdef".into())),
                (TargetKind::ModuleCopy, "other/x".into(), Some("y".into())),
            ]
        );
        let only = discover(&roots, Some("DeepSeek-AI/deepseek-ocr"), &is_t);
        assert_eq!(only.len(), 3);
        assert!(only.iter().all(|t| t.model.as_deref() == Some("deepseek-ai/DeepSeek-OCR")));
        let local = discover(&roots, Some("someone/mymodel"), &is_t);
        assert_eq!(local.len(), 2);
    }
}
