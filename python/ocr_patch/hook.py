"""The import hook: an audit hook on `open` plus a meta-path finder.

transformers loads the entry module (modeling_*.py) with `spec_from_file_location` and
`exec_module`, never through `sys.meta_path`, so a finder alone misses it. Python's audit hooks
see every `open` before the file is opened; on a cold cache the hub snapshot file is read first
(the import check), then copied into `transformers_modules/`, then read again (hash, exec). The
hook patches the file at its first read (Rust, `ocr_patch._native.guard`, under the same locks
as `ocr-patch apply`), so every later read sees the patched bytes. The finder patches what a
relative import of a `transformers_modules.*` module is about to load: a second line.

Cost when there is nothing to do: one Python call per audit event with a string compare, and
for `open` events a suffix check against the few targeted file names.

Never breaks an unrelated import: any failure is reported once (a RuntimeWarning on stderr) and
the open proceeds unpatched, unless OCR_PATCH_STRICT=1, where the failure is raised in the
`open` (and so in `from_pretrained`). OCR_PATCH_DISABLE=1 turns the hook off.
"""
import os
import sys
import threading
import warnings

_STATE = {"installed": False, "native": None, "broken": False, "warned": set(), "names": None}
_LOCAL = threading.local()
_WRITE_FLAGS = getattr(os, "O_WRONLY", 1) | getattr(os, "O_RDWR", 2)
# Until the native module tells us, the names the rules patch (kept in sync by a test).
_DEFAULT_NAMES = ("deepencoder.py", "modeling_deepseekocr.py", "modeling_deepseekv2.py")
_PLACES = ("snapshots", "transformers_modules")


def _strict():
    return os.environ.get("OCR_PATCH_STRICT", "").strip().lower() in ("1", "true", "yes", "on")


def _report(key, message):
    """Warns once per key; in strict mode raises instead."""
    if _strict():
        raise ImportError(f"ocr-patch (OCR_PATCH_STRICT=1): {message}")
    if key in _STATE["warned"]:
        return
    _STATE["warned"].add(key)
    warnings.warn(f"ocr-patch: {message}; continuing unpatched (set OCR_PATCH_STRICT=1 to make this an error)", RuntimeWarning, stacklevel=3)


def _native():
    if _STATE["native"] is None and not _STATE["broken"]:
        try:
            from . import _native as native

            _STATE["names"] = tuple(native.targets())
            _STATE["native"] = native
        except Exception as exc:  # the extension is missing or does not load
            _STATE["broken"] = True
            _report("native", f"the native module does not load ({exc}); reinstall with `just install`")
    return _STATE["native"]


def guard(path):
    """Patches `path` if it is a targeted file in a cache; returns what happened (or None)."""
    if getattr(_LOCAL, "busy", False):
        return None
    native = _native()
    if native is None:
        return None
    _LOCAL.busy = True
    try:
        return native.guard(path)
    except Exception as exc:
        _report(path, f"{exc}")
        return None
    finally:
        _LOCAL.busy = False


def _audit(event, args):
    if event != "open":
        return
    path = args[0]
    if type(path) is not str:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        elif isinstance(path, os.PathLike):
            path = os.fspath(path)
            if type(path) is not str:
                return
        else:
            return
    if not path.endswith(_STATE["names"] or _DEFAULT_NAMES):
        return
    mode = args[1] if len(args) > 1 else None
    if mode is not None:
        if isinstance(mode, str) and ("w" in mode or "a" in mode or "x" in mode):
            return
    elif len(args) > 2 and isinstance(args[2], int) and args[2] & _WRITE_FLAGS:
        return
    if _PLACES[0] not in path and _PLACES[1] not in path:
        return
    guard(path)


class RemoteCodeFinder:
    """Meta-path finder for `transformers_modules.*`: patches the file the next finder will
    load, then lets the normal machinery load it (returns None)."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if not fullname.startswith("transformers_modules.") or getattr(_LOCAL, "busy", False):
            return None
        from importlib.machinery import PathFinder

        try:
            spec = PathFinder.find_spec(fullname, path, target)
        except Exception:
            return None
        if spec is not None and isinstance(spec.origin, str) and spec.origin.endswith(".py"):
            guard(spec.origin)
        return None

    @classmethod
    def invalidate_caches(cls):
        pass


def install():
    """Registers the audit hook (for the life of the process: audit hooks cannot be removed)
    and the finder. Idempotent; does nothing when OCR_PATCH_DISABLE=1."""
    if _STATE["installed"] or os.environ.get("OCR_PATCH_DISABLE", "").strip() in ("1", "true", "yes"):
        return False
    sys.addaudithook(_audit)
    if not any(f is RemoteCodeFinder for f in sys.meta_path):
        sys.meta_path.insert(0, RemoteCodeFinder)
    _STATE["installed"] = True
    return True


def uninstall():
    """Removes the finder and disables the audit hook (it stays registered but does nothing)."""
    _STATE["names"] = ("\0never",)
    _STATE["broken"] = True
    sys.meta_path[:] = [f for f in sys.meta_path if f is not RemoteCodeFinder]
    _STATE["installed"] = False


def active():
    """True when the hook is installed in this process."""
    return _STATE["installed"]
