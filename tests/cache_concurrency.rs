//! Crashes and concurrency: 16 `apply` runs at once, and `apply` killed with SIGKILL at random
//! moments. Afterwards every file is either original (for hub files: the same symlink into
//! `blobs/`) or completely patched, never a mix; `revert` restores the starting state.

mod cli_support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cli_support::*;

/// For each targeted file: its original bytes and symlink, and the patched sha256 (from a
/// completed run on a copy).
struct Expect {
    files: BTreeMap<PathBuf, (Option<PathBuf>, String, String)>,
}

fn layout() -> (Cache, PathBuf, Vec<(String, Vec<u8>)>) {
    let files = fixture_files();
    let cache = Cache::full(&files);
    cache.add_snapshot(REPO, COMMIT2, &files); // shares every blob with COMMIT
    let lock = cache.lock_for(&files);
    (cache, lock, files)
}

fn expectations(cache: &Cache, lock: &PathBuf) -> Expect {
    let out = cache.cmd().args(["check", "--json", "--lock"]).arg(lock).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut files = BTreeMap::new();
    for t in v["targets"].as_array().unwrap() {
        for f in t["files"].as_array().unwrap() {
            let p = PathBuf::from(f["path"].as_str().unwrap());
            let link = f["symlink"].as_str().map(PathBuf::from);
            files.insert(p, (link, f["sha256"].as_str().unwrap().to_string(), f["sha256_after"].as_str().unwrap().to_string()));
        }
    }
    assert!(files.len() >= 18, "{}", files.len());
    Expect { files }
}

/// Every file is either exactly original or exactly patched.
fn assert_each_file_whole(e: &Expect, context: &str) -> (usize, usize) {
    let (mut orig, mut patched) = (0, 0);
    for (p, (link, osha, psha)) in &e.files {
        let md = std::fs::symlink_metadata(p).unwrap_or_else(|err| panic!("{context}: {} vanished: {err}", p.display()));
        let cur_link = md.file_type().is_symlink().then(|| std::fs::read_link(p).unwrap());
        let cur = sha(&std::fs::read(p).unwrap());
        if cur == *osha && cur_link == *link {
            orig += 1;
        } else if cur == *psha && cur_link.is_none() {
            patched += 1;
        } else {
            panic!("{context}: {} is neither original nor patched (sha {cur}, link {cur_link:?})", p.display());
        }
    }
    (orig, patched)
}

fn blobs_state(cache: &Cache) -> BTreeMap<String, String> {
    state_of(&cache.repo_dir(REPO).join("blobs"))
}

#[test]
fn sixteen_concurrent_applies() {
    let (cache, lock, _) = layout();
    let before = cache.state();
    let blobs = blobs_state(&cache);
    let expect = expectations(&cache, &lock);
    let children: Vec<_> = (0..16)
        .map(|_| cache.std_cmd().arg("apply").arg("--lock").arg(&lock).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (orig, patched) = assert_each_file_whole(&expect, "after 16 applies");
    assert_eq!((orig, patched), (0, expect.files.len()));
    assert_eq!(blobs_state(&cache), blobs, "blobs untouched");
    assert!(!cache.state().keys().any(|k| k.contains(".ocr-patch-tmp-")), "no temp files left");
    cache.cmd().arg("check").arg("--lock").arg(&lock).assert().code(0);

    // And 16 reverts at once.
    let children: Vec<_> = (0..16)
        .map(|_| cache.std_cmd().arg("revert").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(cache.state(), before);
}

/// A tiny xorshift: no rand crate, a printed seed for reproduction.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_at_random_moments() {
    let (cache, lock, _) = layout();
    let before = cache.state();
    let blobs = blobs_state(&cache);
    let expect = expectations(&cache, &lock);
    let seed = std::env::var("OCRP_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("OCRP_KILL_SEED={seed}");
    let mut rng = Rng(seed);

    // How long a full apply takes here, to spread the kills over it.
    let t0 = Instant::now();
    cache.std_cmd().args(["apply", "--dry-run", "--lock"]).arg(&lock).stdout(Stdio::null()).status().unwrap();
    let span = (t0.elapsed().as_millis() as u64 * 2).max(20);

    let mut seen_partial = false;
    for round in 0..20 {
        // Alternate apply and revert so both write paths get killed mid-way.
        let mut cmd = cache.std_cmd();
        if round % 4 == 3 {
            cmd.arg("revert");
        } else {
            cmd.arg("apply").arg("--lock").arg(&lock);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.next() % span));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let (o, p) = assert_each_file_whole(&expect, &format!("round {round} (seed {seed})"));
        seen_partial |= o > 0 && p > 0;
        assert_eq!(blobs_state(&cache), blobs, "round {round}: blobs untouched");
    }
    eprintln!("saw a partly patched cache between kills: {seen_partial}");

    // A clean run finishes the job and sweeps the temp files of the killed ones.
    cache.cmd().arg("apply").arg("--lock").arg(&lock).assert().success();
    let (o, p) = assert_each_file_whole(&expect, "final apply");
    assert_eq!((o, p), (0, expect.files.len()));
    cache.cmd().arg("revert").assert().success();
    let after = cache.state();
    let leftovers: Vec<_> = after.keys().filter(|k| k.contains(".ocr-patch-tmp-")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(after, before);
}
