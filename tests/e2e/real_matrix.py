"""The end-to-end matrix on DeepSeek-OCR's REAL remote code (gated, not part of CI).

    OCR_PATCH_UPSTREAM=/work/main/.upstream/hub python tests/e2e/real_matrix.py \
        [--versions 4.46.3,5.0.0] [--modes reference,plain,shims,patched] [--doc docs/compatibility.md]

Runs only when OCR_PATCH_UPSTREAM names a folder holding the real files (kept in an ignored
folder, never committed). It copies them into a temporary model folder with a small config
(the full vision encoder, whose sizes the code hard-codes, plus a 2-layer decoder with few
experts and a small vocabulary), makes deterministic synthetic weights with 4.46.3, and runs
the same child as the fixture suite (tests/e2e/child_run.py) on each release: reference =
unpatched 4.46.3, plain / shims = unpatched, patched = after `ocr-patch apply`.

The real code hard-codes `.cuda()`: unpatched runs on CPU get the harness's `.cuda()` no-op,
patched runs do not (the patch makes the code device-aware). The real code also prints.
Inputs: Tiny mode (a 512-pixel global view, 73 image positions, no tiles) unless --crops is
given, to keep SAM-B + CLIP-L cheap on a CPU.

With --doc, writes the table to that markdown file (e.g. docs/compatibility.md).
Exit status: 0 when every run matched its prediction, 1 otherwise.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_support as support  # noqa: E402
from expectations import breakage_of, describe, matches, predict  # noqa: E402

REAL_FILES = (
    "modeling_deepseekocr.py", "modeling_deepseekv2.py", "deepencoder.py",
    "configuration_deepseek_v2.py", "conversation.py", "config.json",
)
REPO = "deepseek-ai/DeepSeek-OCR"
# Small decoder; hidden size 1280 (10 heads x 128) stays, as the vision projector hard-codes it.
DECODER_OVERRIDES = {
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 128,
    "intermediate_size": 512,
    "vocab_size": 2048,
    "max_position_embeddings": 2048,
}
LOGITS_ATOL = 1e-5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", default=",".join(support.versions()))
    p.add_argument("--modes", default="reference,plain,shims,patched")
    p.add_argument("--global-size", type=int, default=512)
    p.add_argument("--crop-size", type=int, default=640)
    p.add_argument("--crops", default="0", help="tiles as WxH (e.g. 2x1), or 0 for none")
    p.add_argument("--work", help="work folder (default: a temporary one, removed afterwards)")
    p.add_argument("--doc", help="markdown file to write the results table to")
    return p.parse_args(argv)


def small_config(upstream):
    """The real config.json with a small decoder (top level and language_config alike)."""
    config = json.loads((upstream / "config.json").read_text())
    config.update(DECODER_OVERRIDES)
    config.setdefault("language_config", {}).update(DECODER_OVERRIDES)
    return config


def make_model_folder(upstream, dest):
    """Copies the real files into `dest` (a temporary folder) with the small config."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in REAL_FILES[:-1]:
        shutil.copyfile(upstream / name, dest / name)
    (dest / "config.json").write_text(json.dumps(small_config(upstream), indent=2))
    return dest


def make_weights(folder, work):
    """Synthetic weights of the real tensor names and shapes, made by 4.46.3."""
    env = next((e for e in (support.env_for(support.REFERENCE),) if e.has(support.REFERENCE)), None)
    if env is None:
        raise SystemExit(f"transformers {support.REFERENCE} is not installed (tests/e2e/setup_matrix.sh)")
    out = work / "model.safetensors"
    proc = support.run_python(env, support.REFERENCE, work / "weights_hf_home",
                              [support.HERE / "make_weights.py", folder, out], cwd=work)
    if proc.returncode != 0:
        raise SystemExit(f"make_weights.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return out


def child_args(args, mode):
    """Arguments of child_run.py for the real model in `mode`."""
    common = ["--repo", REPO, "--global-size", args.global_size, "--crop-size", args.crop_size,
              "--crops", args.crops, "--image-token", 100]
    extra = {"reference": ["--cuda-noop"], "plain": ["--cuda-noop"],
             "shims": ["--cuda-noop", "--import-shims"], "patched": []}[mode]
    return [str(a) for a in common + extra]


def apply_patch(hf_home):
    """`ocr-patch apply` on the cache (the real files are pinned by the built-in lock)."""
    import subprocess

    cmd = [str(support.ocr_patch_bin()), "apply", "--cache-dir", str(hf_home / "hub")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


def run_one(args, work, files, version, mode):
    """One child run; returns a RunResult (or None when the release is not installed)."""
    env = support.env_for(version)
    if not env.has(version):
        return None
    before = apply_patch if mode == "patched" else None
    folder = work / f"{env.name}-{version}-{mode}"
    return support.run_child(env, version, folder, files, mode, child_args(args, mode), before,
                             repo=REPO)


def verdict(run, mode, version, refs):
    """(passed, note) of one run against its prediction or the reference."""
    if mode in ("plain", "shims") and version != support.REFERENCE:
        expected = predict(version, mode)
        ok = any(matches(o, run.first_failure) for o in expected)
        return ok, "as predicted" if ok else f"expected {describe(expected)}"
    ref = refs.get(support.env_for(version).name)
    if not run.ok_through("generate") or ref is None:
        return mode == "reference" and run.ok_through("generate"), run.summary()
    diff = support.max_abs_diff(run.logits(), ref.logits())
    same = run.data["tokens"] == ref.data["tokens"]
    ok = diff <= LOGITS_ATOL and same
    return ok, f"max |dlogit| {diff:.2g}, tokens {'identical' if same else 'differ'}"


def table(rows):
    """Markdown table of the results."""
    out = [
        "| transformers | torch | mode | outcome | breakage | check |",
        "|---|---|---|---|---|---|",
    ]
    for version, mode, run, ok, note in rows:
        failure = run.first_failure
        breakage = "" if failure is None else breakage_of(failure, version, "plain" if mode == "reference" else mode)
        outcome = run.summary().replace("|", "\\|")[:140]
        out.append(f"| {version} | {run.data.get('torch', '?')} | {mode} | {outcome} | {breakage} | "
                   f"{'ok' if ok else 'FAIL'}: {note} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_args(argv)
    upstream = os.environ.get("OCR_PATCH_UPSTREAM")
    if not upstream:
        print("real_matrix.py: OCR_PATCH_UPSTREAM is not set; nothing to do")
        return 0
    upstream = Path(upstream)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ocrp-real-"))
    try:
        folder = make_model_folder(upstream, work / "model")
        files = support.model_files(folder, make_weights(folder, work))
        versions = sorted(set(args.versions.split(",")) | {support.REFERENCE}, key=support.version_tuple)
        modes = [m for m in args.modes.split(",") if m]
        refs, rows = {}, []
        for env in {support.env_for(v).name: support.env_for(v) for v in versions}.values():
            if "reference" in modes and env.has(support.REFERENCE):
                ref = support.run_child(env, support.REFERENCE, work / f"{env.name}-reference", files,
                                        "reference", child_args(args, "reference"), repo=REPO)
                refs[env.name] = ref
                rows.append((support.REFERENCE, "reference", ref, *verdict(ref, "reference", support.REFERENCE, {})))
        for version in versions:
            for mode in modes:
                if mode == "reference" or (version == support.REFERENCE and mode in ("plain", "shims")):
                    continue
                run = run_one(args, work, files, version, mode)
                if run is None:
                    print(f"skip {version}: not installed", file=sys.stderr)
                    continue
                rows.append((version, mode, run, *verdict(run, mode, version, refs)))
                print(f"{version:8} {mode:9} {run.summary()[:120]}", file=sys.stderr)
        text = table(rows)
        print(text)
        if args.doc:
            Path(args.doc).write_text(
                "# Compatibility of DeepSeek-OCR's real remote code (synthetic weights, CPU)\n\n"
                "Produced by `tests/e2e/real_matrix.py`; decoder shrunk to "
                f"`{json.dumps(DECODER_OVERRIDES)}`, full vision encoder, "
                f"global view {args.global_size}px, tiles {args.crops}.\n\n" + text
            )
        return 0 if all(ok for *_, ok, _ in rows) else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
