//! File-system primitives with one promise: a reader (transformers, another ocr-patch) sees a
//! file either as it was or as we meant it, never half-written.
//!
//! - [`FolderLock`]: an exclusive `fs4` lock on `<folder>/.ocr-patch.lock`. Only ocr-patch takes
//!   it; `from_pretrained` never does, and never needs to, because every change is a rename.
//! - [`replace_with_bytes`] / [`replace_with_symlink`]: temp entry in the same folder, fsync,
//!   `rename(2)` over the destination, fsync the folder. `rename` replaces the directory entry
//!   itself, so a snapshot symlink is swapped for a regular file and the shared blob it pointed
//!   to is never opened for writing.
//! - Temp entries are named `.ocr-patch-tmp-*`; leftovers of a killed run are removed by the
//!   next run while it holds the lock ([`clean_temps`]).

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fs4::fs_std::FileExt;

use super::error::{CacheError, Result};

pub const LOCK_NAME: &str = ".ocr-patch.lock";
pub const TEMP_PREFIX: &str = ".ocr-patch-tmp-";

/// How long to wait for another ocr-patch run to release a folder.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(120);

/// An exclusive lock on one target folder, released on drop (and by the kernel if we die).
#[derive(Debug)]
pub struct FolderLock {
    file: File,
    path: PathBuf,
}

impl FolderLock {
    pub fn acquire(dir: &Path, timeout: Duration) -> Result<FolderLock> {
        let path = dir.join(LOCK_NAME);
        let file = match OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path) {
            Ok(f) => f,
            // An existing lock file in a folder we may not write: flock works on a read-only fd,
            // and the probe in `check_writable` reports the real problem.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                File::open(&path).map_err(|_| CacheError::Lock { path: path.clone(), err: e })?
            }
            Err(e) => return Err(CacheError::Lock { path, err: e }),
        };
        let start = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            match FileExt::try_lock_exclusive(&file) {
                Ok(true) => return Ok(FolderLock { file, path }),
                Ok(false) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(CacheError::Lock { path, err: e }),
            }
            if start.elapsed() >= timeout {
                return Err(CacheError::LockTimeout { path, secs: timeout.as_secs() });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        let _ = FileExt::unlock(&self.file);
    }
}

/// Reads a file, following symlinks (a snapshot file is read through its blob).
pub fn read(path: &Path) -> Result<Vec<u8>> {
    let mut f = File::open(path).map_err(|e| CacheError::read(path, e))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(|e| CacheError::read(path, e))?;
    Ok(buf)
}

/// The link text if `path` is a symlink, `None` for anything else.
pub fn symlink_target(path: &Path) -> Result<Option<PathBuf>> {
    let md = fs::symlink_metadata(path).map_err(|e| CacheError::read(path, e))?;
    if md.file_type().is_symlink() {
        Ok(Some(fs::read_link(path).map_err(|e| CacheError::read(path, e))?))
    } else {
        Ok(None)
    }
}

/// Permissions of what `path` resolves to (for a snapshot symlink: the blob's), so a patched
/// file keeps the mode of the original.
pub fn permissions(path: &Path) -> Result<Permissions> {
    Ok(fs::metadata(path).map_err(|e| CacheError::read(path, e))?.permissions())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn temp_builder() -> tempfile::Builder<'static, 'static> {
    let mut b = tempfile::Builder::new();
    b.prefix(TEMP_PREFIX);
    b
}

/// Atomically replaces `dest` (a regular file, a symlink, or nothing) with a regular file
/// holding `bytes`: temp file in the same folder, fsync, rename, fsync the folder.
pub fn replace_with_bytes(dest: &Path, bytes: &[u8], perms: Option<Permissions>) -> Result<()> {
    let dir = parent(dest);
    let werr = |e: io::Error| CacheError::write(dest, e);
    let mut tmp = temp_builder().tempfile_in(dir).map_err(werr)?;
    tmp.write_all(bytes).map_err(werr)?;
    if let Some(p) = perms {
        tmp.as_file().set_permissions(p).map_err(werr)?;
    }
    tmp.as_file().sync_all().map_err(werr)?;
    tmp.persist(dest).map_err(|e| werr(e.error))?;
    sync_dir(dir).map_err(werr)?;
    Ok(())
}

/// Atomically replaces `dest` with a symlink whose text is `target`.
pub fn replace_with_symlink(dest: &Path, target: &Path) -> Result<()> {
    let dir = parent(dest);
    let werr = |e: io::Error| CacheError::write(dest, e);
    let tmp = temp_builder().make_in(dir, |p| std::os::unix::fs::symlink(target, p)).map_err(werr)?;
    tmp.persist(dest).map_err(|e| werr(e.error))?;
    sync_dir(dir).map_err(werr)?;
    Ok(())
}

/// Creates and removes a temp file in `dir`: the cheapest honest answer to "can we write here?"
/// (it also works when running as root, where permission bits do not tell).
pub fn check_writable(dir: &Path) -> Result<()> {
    temp_builder().tempfile_in(dir).map(drop).map_err(|e| CacheError::write(dir, e))
}

/// Removes `.ocr-patch-tmp-*` leftovers of killed runs. Call only while holding the lock.
pub fn clean_temps(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn parent(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_symlink_keeps_blob() {
        let t = tempfile::tempdir().unwrap();
        let blob = t.path().join("blob");
        fs::write(&blob, b"original").unwrap();
        let link = t.path().join("f.py");
        std::os::unix::fs::symlink("blob", &link).unwrap();
        replace_with_bytes(&link, b"patched", permissions(&link).ok()).unwrap();
        assert!(symlink_target(&link).unwrap().is_none());
        assert_eq!(fs::read(&link).unwrap(), b"patched");
        assert_eq!(fs::read(&blob).unwrap(), b"original");
        replace_with_symlink(&link, Path::new("blob")).unwrap();
        assert_eq!(symlink_target(&link).unwrap(), Some(PathBuf::from("blob")));
        let left: Vec<_> = fs::read_dir(t.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 2, "no temp files left: {left:?}");
    }

    #[test]
    fn lock_is_exclusive_and_times_out() {
        let t = tempfile::tempdir().unwrap();
        let a = FolderLock::acquire(t.path(), LOCK_TIMEOUT).unwrap();
        let err = FolderLock::acquire(t.path(), Duration::from_millis(30)).unwrap_err();
        assert!(err.to_string().contains("is another ocr-patch process running?"), "{err}");
        drop(a);
        FolderLock::acquire(t.path(), Duration::from_millis(30)).unwrap();
    }

    #[test]
    fn clean_and_probe() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join(".ocr-patch-tmp-abc"), b"x").unwrap();
        fs::write(t.path().join("keep.py"), b"x").unwrap();
        check_writable(t.path()).unwrap();
        clean_temps(t.path());
        let left: Vec<_> = fs::read_dir(t.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("keep.py")]);
    }

    #[test]
    fn read_errors_say_what_to_do() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        std::os::unix::fs::symlink("b", &a).unwrap();
        std::os::unix::fs::symlink("a", t.path().join("b")).unwrap();
        let e = read(&a).unwrap_err().to_string();
        assert!(e.contains("symlink loop"), "{e}");
        let e = read(&t.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
