"""Cost of the import hook when there is nothing to do (run with the hook's python):

    python tests/e2e/bench_hook.py [SNAPSHOT_DIR_WITH_PATCHED_FILES]

1. per audit event: `_audit` on an `open` of an unrelated file, and on a non-open event;
2. per import: importing every pure-Python stdlib module in a child, hook on vs off
   (OCR_PATCH_DISABLE=1), best of 3, divided by the number of modules imported;
3. per remote-code file already patched: `guard()` on it (read, hash, classify; no lock).
"""
import os
import subprocess
import sys
import time
import timeit

CHILD = r"""
import sys, time, pkgutil, sysconfig
names = sorted(m.name for m in pkgutil.iter_modules([sysconfig.get_paths()['stdlib']])
               if not m.name.startswith(('_', 'idlelib', 'tkinter', 'turtle', 'antigravity', 'this')))
t = time.perf_counter(); n = 0
for name in names:
    before = len(sys.modules)
    try:
        __import__(name)
    except BaseException:
        pass
    n += len(sys.modules) - before
print(time.perf_counter() - t, n)
"""


def child(disable):
    env = dict(os.environ, OCR_PATCH_DISABLE="1" if disable else "")
    best = None
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
        secs, n = out.stdout.split()
        best = min(best or float("inf"), float(secs))
    return best, int(n)


def main():
    from ocr_patch import hook

    hook.install()
    hook._native()
    n = 200_000
    per_open = timeit.timeit(lambda: hook._audit("open", ("/usr/lib/python3/x.py", "r", 0)), number=n) / n
    per_other = timeit.timeit(lambda: hook._audit("exec", (None,)), number=n) / n
    print(f"audit hook, unrelated open: {per_open * 1e9:.0f} ns; other event: {per_other * 1e9:.0f} ns")
    on, n_on = child(False)
    off, n_off = child(True)
    print(f"importing {n_on} stdlib modules: hook on {on * 1e3:.1f} ms, off {off * 1e3:.1f} ms, "
          f"difference per import {(on - off) / max(n_on, 1) * 1e6:.1f} us")
    if len(sys.argv) > 1:
        for name in ("modeling_deepseekocr.py", "modeling_deepseekv2.py", "deepencoder.py"):
            path = os.path.join(sys.argv[1], name)
            if os.path.exists(path):
                hook.guard(path)
                k = 50
                t = timeit.timeit(lambda: hook.guard(path), number=k) / k
                print(f"guard({name}), already patched: {t * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
