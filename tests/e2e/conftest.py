"""Session fixtures of the end-to-end matrix: synthetic weights, hub files, memoised child runs.

See e2e_support.py for the environment variables. Every child run gets its own HF_HOME, built
fresh from the fixture, so patched and unpatched runs never share a module cache.
Set OCR_PATCH_E2E_REPORT=<file.md> to get a table of every run at the end of the session.
"""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import e2e_support as support
from expectations import breakage_of

_RUNS = {}


@pytest.fixture(scope="session")
def work_root():
    """A session-wide temporary folder (kept when OCR_PATCH_E2E_KEEP is set)."""
    root = Path(tempfile.mkdtemp(prefix="ocrp-e2e-"))
    yield root
    if os.environ.get("OCR_PATCH_E2E_KEEP"):
        print(f"\ne2e work folder kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


def reference_env():
    """The first environment that has the reference release installed."""
    for env in all_envs():
        if env.has(support.REFERENCE):
            return env
    return None


def all_envs():
    """The two environments: torch 2.6 ("base") and the newer torch ("new")."""
    return [support.env_for(support.REFERENCE), support.env_for("99.0.0")]


@pytest.fixture(scope="session")
def hub_files_for(work_root):
    """hub_files_for(attn) -> name -> bytes of the fixture repo (variant `attn`: 'mha' or
    'mla') as the hub cache holds it; synthetic weights made once per variant by 4.46.3."""
    made = {}

    def get(attn="mha"):
        if attn not in made:
            env = reference_env()
            if env is None:
                pytest.skip(f"transformers {support.REFERENCE} is not installed (run tests/e2e/setup_matrix.sh)")
            folder = support.fixture_folder(attn, work_root / f"fixture-{attn}")
            out = work_root / f"model-{attn}.safetensors"
            proc = support.run_python(
                env, support.REFERENCE, work_root / f"weights_hf_home-{attn}",
                [support.HERE / "make_weights.py", folder, out], cwd=work_root,
            )
            if proc.returncode != 0 or not out.exists():
                raise AssertionError(f"make_weights.py ({attn}) failed:\n{proc.stdout}\n{proc.stderr[-6000:]}")
            made[attn] = support.model_files(folder, out)
        return made[attn]

    return get


@pytest.fixture(scope="session")
def hub_files(hub_files_for):
    """name -> bytes of the (MHA) fixture repo as the hub cache holds it."""
    return hub_files_for("mha")


def apply_patch(hf_home):
    """Runs `ocr-patch apply` on a hub cache; fails the test with its output if it fails."""
    cmd = support.apply_command(hf_home / "hub")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=support.REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")


MODES = {
    # mode: (child arguments, prepare the cache)
    "reference": (["--cuda-noop"], None),
    "plain": (["--cuda-noop"], None),
    "shims": (["--cuda-noop", "--import-shims"], None),
    "no-cuda-noop": ([], None),
    "patched": ([], apply_patch),
}


@pytest.fixture(scope="session")
def run_model(work_root, hub_files_for):
    """run_model(version, mode, env=None, attn="mha") -> RunResult, memoised for the session."""

    def run(version, mode, env=None, attn="mha"):
        env = env or support.env_for(version)
        key = (version, mode, env.name, attn)
        if key not in _RUNS:
            if not env.has(version):
                pytest.skip(f"transformers {version} is not installed under {env.tf_root} for {env.python}")
            args, before = MODES[mode]
            work = work_root / f"{env.name}-{version}-{mode}-{attn}"
            _RUNS[key] = support.run_child(env, version, work, hub_files_for(attn), mode, args, before)
            _RUNS[key].logits()  # kept in memory for the report, after the work folder is gone
        return _RUNS[key]

    return run


def pytest_sessionfinish(session, exitstatus):
    """Writes the table of runs to $OCR_PATCH_E2E_REPORT, if set."""
    target = os.environ.get("OCR_PATCH_E2E_REPORT")
    if not target or not _RUNS:
        return
    lines = [
        "| transformers | env | torch | attention | mode | outcome | breakage | max \\|Δlogit\\| vs 4.46.3 | tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (version, mode, env_name, attn), run in sorted(_RUNS.items(), key=lambda kv: (support.version_tuple(kv[0][0]), kv[0][3], kv[0][1])):
        failure = run.first_failure
        if failure is None:
            breakage = ""
        elif mode in ("plain", "shims"):
            breakage = breakage_of(failure, version, mode, attn)
        else:
            breakage = {"no-cuda-noop": "hard-coded .cuda()"}.get(mode, "?")
        outcome = run.summary().replace("|", "\\|")[:160]
        torch_version = run.data.get("torch", "?")
        ref = _RUNS.get((support.REFERENCE, "reference", env_name, attn))
        diff = ""
        if ref is not None and ref is not run and run.logits() is not None:
            diff = f"{support.max_abs_diff(run.logits(), ref.logits()):.2g}"
        lines.append(f"| {version} | {env_name} | {torch_version} | {attn} | {mode} | {outcome} | {breakage} | {diff} | {run.data.get('tokens')} |")
    Path(target).write_text("\n".join(lines) + "\n")
