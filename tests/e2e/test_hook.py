"""The import hook end to end: a cold cache, transformers downloading from the loopback mirror.

A throw-away environment gets the `ocr_patch` wheel (maturin, target/wheels or
$OCR_PATCH_WHEEL) and `ocr-patch hook install`; it sees the e2e python's packages through a
`.pth`. Then `from_pretrained(..., trust_remote_code=True)` runs **online** against
`ocr-patch mirror` (unpatched fixture), HF_HOME empty: the hook patches each remote-code file at
its first read, so the load succeeds and gives the 4.46.3 logits and tokens. With the hook
disabled the same load fails or differs, as the breakages predict. Eight processes loading at
once on one cold cache all succeed and leave the cache files intact (patched, pinned).
"""
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import e2e_support as support
from test_hub import MirrorProcess, mirror_folder, newest_installed

LOGITS_ATOL = 1e-5
PATCHED_NAMES = ("deepencoder.py", "modeling_deepseekocr.py", "modeling_deepseekv2.py")


def wheel():
    given = os.environ.get("OCR_PATCH_WHEEL")
    if given:
        return Path(given)
    found = sorted((support.REPO_ROOT / "target" / "wheels").glob("ocr_patch-*.whl"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def hook_versions():
    """4.48.0, 5.0.0 and the newest installed release (from 5.10 on, in the newer-torch venv)."""
    wanted = ["4.48.0", "5.0.0", newest_installed()]
    return [v for v in dict.fromkeys(wanted) if v]


@pytest.fixture(scope="module")
def hook_python(work_root):
    """`hook_python(version)`: a venv on that release's e2e python (torch 2.6, or the newer torch
    from 5.10) with the wheel and the hook installed; one venv per python, made at first use."""
    whl = wheel()
    if whl is None or not whl.exists():
        pytest.skip("no ocr_patch wheel: run `maturin build -o target/wheels` (or set OCR_PATCH_WHEEL)")
    made = {}

    def for_version(version):
        env = support.env_for(version)
        if env.name not in made:
            made[env.name] = make_hook_venv(env.python, work_root / f"hook-venv-{env.name}", whl)
        return made[env.name]

    return for_version


def make_hook_venv(base, venv, whl):
    """A venv on `base`'s interpreter that sees `base`'s packages, with the wheel and the hook."""
    if not base.exists():
        pytest.skip(f"{base} does not exist (tests/e2e/setup_matrix.sh)")
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([str(python), "-c", purelib], capture_output=True, text=True, check=True).stdout.strip()
    base_site = subprocess.run([str(base), "-c", purelib], capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "e2e_base.pth").write_text(base_site + "\n")
    subprocess.run([str(base), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, str(whl)], check=True)
    cli = [str(support.ocr_patch_bin()), "hook"]
    out = subprocess.run([*cli, "install", "--python", str(python)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    status = subprocess.run([*cli, "status", "--python", str(python), "--json"], capture_output=True, text=True)
    assert status.returncode == 0 and json.loads(status.stdout)["status"]["active"], status.stdout + status.stderr
    return python


@pytest.fixture(scope="module")
def mirror(work_root, hub_files):
    m = MirrorProcess(mirror_folder(work_root, hub_files))
    yield m
    m.stop()


def online_env(version, hf_home, endpoint, **extra):
    env = support.child_env(support.env_for(version), version, hf_home)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(k, None)
    env.update(HF_ENDPOINT=endpoint, NO_PROXY="127.0.0.1,localhost", OCR_PATCH_LOCK=str(support.LOCK), **extra)
    return env


def load_online(python, version, work, endpoint, label, **extra):
    """child_run.py with `python`, online against the mirror; returns (RunResult, stderr)."""
    out = work / f"out-{label}"
    proc = subprocess.run(
        ["nice", "-n", "10", str(python), str(support.HERE / "child_run.py"), "--out", str(out)],
        cwd=work, env=online_env(version, work / "hf_home", endpoint, **extra),
        capture_output=True, text=True, timeout=support.CHILD_TIMEOUT_S,
    )
    log = f"$ child ({label}, {version}) rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = out / "result.json"
    assert result.exists(), f"child wrote no result.json:\n{log}"
    return support.RunResult(version, label, out, json.loads(result.read_text()), log), proc.stderr


def fresh(work_root, name):
    work = work_root / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def lock_patched():
    """name -> the sha256 the fixture lock pins for our patched result."""
    import tomllib

    data = tomllib.loads(support.LOCK.read_text())
    return {e["name"]: e["patched"] for e in data["file"] if "patched" in e}


def assert_cache_patched(hf_home):
    """Every targeted file in the hub snapshot and the module copies is our pinned result."""
    pins = lock_patched()
    seen = 0
    for path in list((hf_home / "hub").rglob("*.py")) + list((hf_home / "modules").rglob("*.py")):
        if path.name in PATCHED_NAMES and ".ocr-patch" not in path.parts:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest == pins[path.name], f"{path} is not the patched file (sha256 {digest})"
            seen += 1
    assert seen >= 6, f"expected the snapshot and module copies, saw {seen} files"


@pytest.mark.parametrize("version", hook_versions())
def test_hook_cold_cache_online_gives_reference_logits(hook_python, mirror, run_model, work_root, version):
    env = support.env_for(version)
    if not env.has(version):
        pytest.skip(f"transformers {version} is not installed under {env.tf_root}")
    work = fresh(work_root, f"hook-{version}")
    run, stderr = load_online(hook_python(version), version, work, mirror.endpoint, "hook")
    assert run.first_failure is None, run.log
    assert "ocr-patch:" not in stderr, stderr[-2000:]
    ref = run_model(support.REFERENCE, "reference", env=env)
    diff = support.max_abs_diff(run.logits(), ref.logits())
    assert diff <= LOGITS_ATOL, f"transformers {version}: max |logit difference| {diff:.3g} vs 4.46.3"
    assert run.data["tokens"] == ref.data["tokens"]
    assert_cache_patched(work / "hf_home")


def test_without_the_hook_it_breaks(hook_python, mirror, run_model, work_root):
    version = "5.0.0"
    if not support.env_for(version).has(version):
        pytest.skip("5.0.0 is not installed")
    work = fresh(work_root, "hook-disabled")
    run, _ = load_online(hook_python(version), version, work, mirror.endpoint, "disabled", OCR_PATCH_DISABLE="1")
    ref = run_model(support.REFERENCE, "reference", env=support.env_for(version))
    broke = run.first_failure is not None or support.max_abs_diff(run.logits(), ref.logits()) > LOGITS_ATOL
    assert broke, "unpatched 5.0.0 matched 4.46.3: the hook test proves nothing"


def test_eight_processes_on_one_cold_cache(hook_python, mirror, run_model, work_root):
    version = "5.0.0"
    env = support.env_for(version)
    if not env.has(version):
        pytest.skip("5.0.0 is not installed")
    work = fresh(work_root, "hook-8")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(load_online, hook_python(version), version, work, mirror.endpoint, f"p{i}", OMP_NUM_THREADS="1") for i in range(8)]
        runs = [f.result() for f in futures]
    ref = run_model(support.REFERENCE, "reference", env=env)
    for run, stderr in runs:
        assert run.first_failure is None, run.log
        assert support.max_abs_diff(run.logits(), ref.logits()) <= LOGITS_ATOL, run.log
    assert_cache_patched(work / "hf_home")


def test_hook_leaves_unrelated_imports_alone(hook_python, work_root):
    """A broken cache file elsewhere never breaks an import; strict mode makes it an error."""
    work = fresh(work_root, "hook-unrelated")
    python = hook_python(support.REFERENCE)
    snap = work / "hub" / "models--x--y" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "modeling_deepseekv2.py").write_text("x = 1  # not a file any lock pins\n")
    code = f"import warnings, runpy; warnings.simplefilter('always'); print(runpy.run_path({str(snap / 'modeling_deepseekv2.py')!r})['x'])"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCR_PATCH", "PYTHON"))}
    ok = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.strip() == "1", ok.stderr
    assert ok.stderr.count("ocr-patch:") == 1 and "unknown file" in ok.stderr, ok.stderr
    strict = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env={**env, "OCR_PATCH_STRICT": "1"})
    assert strict.returncode != 0 and "OCR_PATCH_STRICT=1" in strict.stderr, strict.stderr
