//! The cache room: where Hugging Face keeps remote code, and how we change it safely.
//!
//! Owns:
//! - [`layout`]: finding the caches the way transformers and huggingface_hub do (`HF_HOME` & co),
//!   hub snapshots (`models--org--repo/snapshots/<commit>/`, symlinks into `blobs/`) and the
//!   modules cache (`transformers_modules/...`, raw and sanitised names, local-dir copies);
//! - [`fsx`]: per-folder locks, atomic writes and symlink swaps, fsync;
//! - [`manifest`]: the `.ocr-patch/` backup folder that makes `revert` byte-exact;
//! - [`fork`]: the pinned external source of patched files (`apply --fork`);
//! - [`hub`]: the Hub client of `fetch` (downloads into the exact huggingface_hub layout);
//! - [`guard`]: patch one file at its first read (the import hook's cache side);
//! - [`mirror`]: a Hub stand-in on loopback serving one model folder (`ocr-patch mirror`);
//! - [`ops`]: plan-then-write for apply / check / revert / doctor.
//!
//! Must not touch: rule logic. Whether a file is original, patched or unknown, and what its
//! patched bytes are, is always asked of [`crate::patch::Engine`]; this module only moves bytes.
//!
//! The one invariant everything here keeps: at any instant (a crash, SIGKILL, a concurrent
//! `from_pretrained`), each cached file is either its original bytes or our complete patched
//! bytes, and a shared blob under `blobs/` is never written.

pub mod error;
pub mod fork;
pub mod fsx;
pub mod guard;
pub mod hub;
pub mod layout;
pub mod manifest;
pub mod mirror;
pub mod ops;
