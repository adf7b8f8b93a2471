"""`ocr-patch fetch` from `ocr-patch mirror` (the Hub stand-in on loopback), then transformers.

The mirror serves the fixture model (code, config and the session's synthetic weights) with the
Hub's download protocol on 127.0.0.1; `HF_ENDPOINT` points `ocr-patch fetch` at it. Into a cold
cache, `fetch --all` downloads, verifies against tests/fixtures/lock.toml and patches; then
`from_pretrained` with HF_HUB_OFFLINE=1 must load it and give the 4.46.3 logits and tokens on
4.46.3, 5.0.0 and the newest release installed.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import e2e_support as support

LOGITS_ATOL = 1e-5


def newest_installed():
    """The newest release of the matrix that is installed in its environment."""
    have = [v for v in support.versions() if support.env_for(v).has(v)]
    return have[-1] if have else None


def hub_versions():
    wanted = [support.REFERENCE, "5.0.0", newest_installed()]
    return [v for v in dict.fromkeys(wanted) if v]


def mirror_folder(root, hub_files):
    """A plain model folder holding the session's hub files (weights hard-linked)."""
    folder = Path(root) / "mirror-model"
    if not folder.exists():
        folder.mkdir(parents=True)
        for name, data in sorted(hub_files.items()):
            support.write_blob(folder / name, data)
    return folder


class MirrorProcess:
    """`ocr-patch mirror --from DIR --port 0 --json` in the background."""

    def __init__(self, folder, *extra):
        cmd = [str(support.ocr_patch_bin()), "mirror", "--from", str(folder), "--port", "0", "--json", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"mirror did not start: {self.proc.stderr.read()}")
        self.info = json.loads(line)
        self.endpoint = self.info["endpoint"]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def mirror(work_root, hub_files):
    binary = support.ocr_patch_bin()
    if not binary.exists():
        pytest.skip(f"{binary} does not exist (cargo build)")
    m = MirrorProcess(mirror_folder(work_root, hub_files))
    yield m
    m.stop()


def fetch(endpoint, hf_home, *extra):
    """`ocr-patch fetch` of the fixture repo into `hf_home`; returns its JSON report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, NO_PROXY="127.0.0.1,localhost")
    cmd = [str(support.ocr_patch_bin()), "fetch", support.HUB_REPO, "--lock", str(support.LOCK), "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout)


def run_offline(version, work, label):
    """child_run.py with HF_HUB_OFFLINE=1 on the HF_HOME in `work`."""
    env = support.env_for(version)
    out = work / "out"
    proc = support.run_python(env, version, work / "hf_home", [support.HERE / "child_run.py", "--out", out], cwd=work)
    log = f"$ child ({label}, {version}) rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = out / "result.json"
    assert result.exists(), f"child wrote no result.json:\n{log}"
    return support.RunResult(version, label, out, json.loads(result.read_text()), log)


@pytest.mark.parametrize("version", hub_versions())
def test_fetch_cold_cache_then_offline_load(mirror, run_model, work_root, version):
    env = support.env_for(version)
    if not env.has(version):
        pytest.skip(f"transformers {version} is not installed under {env.tf_root}")
    work = work_root / f"hub-fetch-{version}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = fetch(mirror.endpoint, work / "hf_home", "--all")
    files = {f["file"]: f for f in report["fetch"]["files"]}
    assert set(files) == {p.name for p in support.FIXTURE.iterdir()} | {"model.safetensors"}
    assert report["apply"]["summary"]["patch"] == 3, report["apply"]
    run = run_offline(version, work, "fetched")
    assert run.first_failure is None, run.log
    ref = run_model(support.REFERENCE, "reference", env=env)
    diff = support.max_abs_diff(run.logits(), ref.logits())
    assert diff <= LOGITS_ATOL, f"transformers {version}: max |logit difference| {diff:.3g} vs 4.46.3"
    assert run.data["tokens"] == ref.data["tokens"]


def test_fetch_is_idempotent_and_offline_flag_needs_no_network(mirror, work_root):
    work = work_root / "hub-idempotent"
    shutil.rmtree(work, ignore_errors=True)
    first = fetch(mirror.endpoint, work / "hf_home")
    assert first["apply"]["summary"]["patch"] == 3
    again = fetch(mirror.endpoint, work / "hf_home")
    assert not any(f["downloaded"] for f in again["fetch"]["files"])
    assert again["apply"]["summary"] == {**again["apply"]["summary"], "patch": 0, "already_patched": 3}
    offline = fetch("http://127.0.0.1:9", work / "hf_home", "--offline")
    assert offline["fetch"]["offline"] is True
