"""Support for the end-to-end matrix: where the releases are, hub-cache layouts, child runs.

Environment (shared by CI and local runs; tests/e2e/setup_matrix.sh prints these):

    OCR_PATCH_E2E_PYTHON        python with torch 2.6 + the remote code's packages (no transformers)
    OCR_PATCH_E2E_TF_ROOT       folder of `<version>/transformers` installs for that python
    OCR_PATCH_E2E_PYTHON_NEW    python with torch >= 2.7, for releases from 5.10 on
    OCR_PATCH_E2E_TF_ROOT_NEW   folder of `<version>/transformers` installs for that python
    OCR_PATCH_E2E_VERSIONS      optional comma list replacing the default release list
    OCR_PATCH_E2E_MLA_VERSIONS  optional comma list of releases that also run the MLA variant
    OCR_PATCH_BIN               the ocr-patch binary (default target/debug/ocr-patch)
    OCR_PATCH_E2E_KEEP          keep the temporary folders (prints where they are)
    OCR_PATCH_E2E_CHILD_TIMEOUT seconds one child run may take (default 300; raise it on a busy machine)

Without OCR_PATCH_E2E_PYTHON the defaults are `$OCR_PATCH_E2E_VENV/bin/python` (or
`.venv-e2e/bin/python`) with `tf/` inside that venv, as setup_matrix.sh makes them.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "tinyocr"
LOCK = REPO_ROOT / "tests" / "fixtures" / "lock.toml"
REFERENCE = "4.46.3"
HUB_REPO = "ocrpatch/tiny-ocr"
DEFAULT_VERSIONS = (
    "4.46.3", "4.48.0", "4.49.0", "4.54.0", "4.57.1", "5.0.0", "5.3.0", "5.4.0", "5.24.0",
)
# The fixture runs MHA (use_mla false), as the real model does. The "mla" variant writes the same
# files with an MLA config, so the remote DeepseekV2Attention (G-usable, N) runs too; it runs on
# fewer releases to keep the matrix short: the reference, G (4.54), the 5.0 breaks, 5.24.
ATTENTION_VARIANTS = ("mha", "mla")
DEFAULT_MLA_VERSIONS = ("4.46.3", "4.54.0", "5.0.0", "5.24.0")
# The sizes the fixture's DeepseekV2Attention reads (it has no q_lora_rank path: q_proj only).
MLA_CONFIG = {
    "use_mla": True, "q_lora_rank": None, "kv_lora_rank": 32,
    "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32,
}
# Releases from this one on need torch >= 2.7 (the "new" environment).
NEW_TORCH_FROM = (5, 10, 0)
CHILD_TIMEOUT_S = int(os.environ.get("OCR_PATCH_E2E_CHILD_TIMEOUT", "300"))


def version_tuple(text):
    """'5.24.0' -> (5, 24, 0)."""
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:3])


def versions():
    """The releases under test, oldest first."""
    listed = os.environ.get("OCR_PATCH_E2E_VERSIONS")
    chosen = [v.strip() for v in listed.split(",") if v.strip()] if listed else list(DEFAULT_VERSIONS)
    return sorted(set(chosen), key=version_tuple)


def mla_versions():
    """The releases that also run the MLA variant (a subset of versions()), oldest first."""
    listed = os.environ.get("OCR_PATCH_E2E_MLA_VERSIONS")
    chosen = [v.strip() for v in listed.split(",") if v.strip()] if listed else list(DEFAULT_MLA_VERSIONS)
    return [v for v in versions() if v in chosen]


def config_variant(config, attn, mla_config=None):
    """The config dict for `attn` ('mha' leaves it as is; 'mla' sets use_mla and the MLA sizes
    at the top level and in language_config)."""
    if attn == "mha":
        return config
    if attn != "mla":
        raise ValueError(f"unknown attention variant {attn}")
    out = json.loads(json.dumps(config))
    overrides = mla_config or MLA_CONFIG
    out.update(overrides)
    if isinstance(out.get("language_config"), dict):
        out["language_config"].update(overrides)
    return out


def fixture_folder(attn, dest):
    """The fixture folder for `attn`: the fixture itself for MHA, else a copy in `dest` whose
    config.json is the variant (the .py files are byte-identical, so the lock still pins them)."""
    if attn == "mha":
        return FIXTURE
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(FIXTURE.iterdir()):
        if path.suffix == ".py":
            shutil.copyfile(path, dest / path.name)
    config = json.loads((FIXTURE / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(config_variant(config, attn), indent=2) + "\n")
    return dest


@dataclasses.dataclass(frozen=True)
class Env:
    """One python plus the folder holding its transformers releases."""

    name: str
    python: Path
    tf_root: Path

    def tf_dir(self, version):
        return self.tf_root / version

    def has(self, version):
        return self.python.exists() and (self.tf_dir(version) / "transformers").is_dir()


def _venv_default():
    venv = Path(os.environ.get("OCR_PATCH_E2E_VENV", REPO_ROOT / ".venv-e2e"))
    return venv


def env_for(version):
    """The environment that runs `version` (torch 2.6 before 5.10, newer torch after)."""
    if version_tuple(version) >= NEW_TORCH_FROM:
        venv = Path(str(_venv_default()) + "-new")
        python = os.environ.get("OCR_PATCH_E2E_PYTHON_NEW", venv / "bin" / "python")
        root = os.environ.get("OCR_PATCH_E2E_TF_ROOT_NEW", venv / "tf")
        return Env("new", Path(python), Path(root))
    venv = _venv_default()
    python = os.environ.get("OCR_PATCH_E2E_PYTHON", venv / "bin" / "python")
    root = os.environ.get("OCR_PATCH_E2E_TF_ROOT", venv / "tf")
    return Env("base", Path(python), Path(root))


def ocr_patch_bin():
    """Path of the ocr-patch binary under test."""
    return Path(os.environ.get("OCR_PATCH_BIN", REPO_ROOT / "target" / "debug" / "ocr-patch"))


def patcher_missing_reason():
    """Why patched runs cannot happen yet, or None when `ocr-patch apply` is there."""
    binary = ocr_patch_bin()
    if not binary.exists():
        return f"{binary} does not exist yet (cargo build, or set OCR_PATCH_BIN)"
    probe = subprocess.run([str(binary), "apply", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`{binary.name} apply` is not implemented yet: {probe.stderr.strip()[:200]}"
    return None


def apply_command(hub_dir):
    """`ocr-patch apply` on a hub cache and the modules cache beside it (`hub_dir/../modules`),
    pinned by tests/fixtures/lock.toml: never the machine's own caches."""
    modules = Path(hub_dir).parent / "modules"
    modules.mkdir(parents=True, exist_ok=True)
    return [str(ocr_patch_bin()), "apply", "--cache-dir", str(hub_dir), "--modules-dir", str(modules), "--lock", str(LOCK)]


# ----------------------------------------------------------------------------- hub layout


def git_blob_sha1(data):
    """The id git (and the Hub, as the etag of non-LFS files) gives a file's bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def blob_name(filename, data):
    """Hub blob names: sha256 for LFS files (weights), git blob sha1 for the rest."""
    if isinstance(data, BigFile):
        return data.sha256
    if filename.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return git_blob_sha1(data)


def write_blob(path, data):
    """Writes bytes, or hard-links a big file given as a BigFile (copies across devices)."""
    if isinstance(data, BigFile):
        try:
            os.link(data.path, path)
        except OSError:
            shutil.copyfile(data.path, path)
    else:
        path.write_bytes(data)


@dataclasses.dataclass(frozen=True)
class BigFile:
    """A large file (weights) linked into each hub cache instead of read into memory."""

    path: Path
    sha256: str


def build_hub_cache(hub_dir, files, repo=HUB_REPO):
    """Writes `files` (name -> bytes or BigFile) as the Hub caches them; returns the snapshot.

    hub_dir/models--org--name/{blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag>,
    refs/main}. The commit is a 40-hex digest of the file list, so it is stable per content.
    """
    org, name = repo.split("/")
    root = Path(hub_dir) / f"models--{org}--{name}"
    listing = "".join(f"{n}:{blob_name(n, d)}\n" for n, d in sorted(files.items()))
    commit = hashlib.sha1(listing.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for filename, data in sorted(files.items()):
        etag = blob_name(filename, data)
        write_blob(root / "blobs" / etag, data)
        link = snapshot / filename
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / ".." / "blobs" / etag)
    return snapshot


def model_files(folder, weights):
    """name -> content of a model folder's config.json and .py files, plus the weights."""
    folder = Path(folder)
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".py", ".json")}
    files["model.safetensors"] = BigFile(Path(weights), sha256_file(weights))
    return files


def sha256_file(path):
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- child runs


def child_env(env, version, hf_home):
    """Environment of a child: one release first on PYTHONPATH, offline, private caches."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON", "TRANSFORMERS_"))}
    out.update(
        PYTHONPATH=str(env.tf_dir(version)),
        PYTHONDONTWRITEBYTECODE="1",
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    )
    return out


def run_python(env, version, hf_home, args, cwd):
    """Runs `env.python args...` (niced) for one release; returns the CompletedProcess."""
    cmd = ["nice", "-n", "10", str(env.python), *map(str, args)]
    if shutil.which("nice") is None:
        cmd = cmd[3:]
    return subprocess.run(
        cmd, cwd=cwd, env=child_env(env, version, hf_home),
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
    )


@dataclasses.dataclass
class RunResult:
    """What one child run left behind."""

    version: str
    mode: str
    out_dir: Path
    data: dict
    log: str
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def first_failure(self):
        return self.data.get("first_failure")

    def stage(self, name):
        return self.data.get("stages", {}).get(name)

    def ok_through(self, name):
        """True when every stage up to and including `name` succeeded."""
        from child_run import STAGES

        return all(self.stage(s) == "ok" for s in STAGES[: STAGES.index(name) + 1])

    def logits(self):
        """The forward logits (read once, then kept: the work folder may be gone by the report)."""
        import numpy as np

        if "logits" not in self._cache:
            path = self.out_dir / "logits.npy"
            self._cache["logits"] = np.load(path) if path.exists() else None
        return self._cache["logits"]

    def summary(self):
        failure = self.first_failure
        if not failure:
            return "ok"
        return f"{failure['stage']}: {failure['type']}: {failure['message']}"


def run_child(env, version, work_dir, hub_files, mode, child_args=(), before=None, repo=HUB_REPO):
    """Builds a fresh HF_HOME in work_dir, runs `before(hf_home)` if given, then the child."""
    work_dir = Path(work_dir)
    hf_home = work_dir / "hf_home"
    out_dir = work_dir / "out"
    build_hub_cache(hf_home / "hub", hub_files, repo=repo)
    if before is not None:
        before(hf_home)
    proc = run_python(
        env, version, hf_home, [HERE / "child_run.py", "--out", out_dir, *child_args], cwd=work_dir
    )
    log = f"$ child ({mode}, {version}) rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    result_file = out_dir / "result.json"
    if not result_file.exists():
        raise AssertionError(f"child wrote no result.json:\n{log}")
    data = json.loads(result_file.read_text())
    return RunResult(version, mode, out_dir, data, log)


def max_abs_diff(a, b):
    """Largest absolute difference of two same-shaped arrays (inf when shapes differ)."""
    import numpy as np

    if a is None or b is None or a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def python_for_tests():
    """The interpreter running pytest (for messages)."""
    return sys.executable
