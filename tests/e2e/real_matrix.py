"""The end-to-end matrix on DeepSeek-OCR's REAL remote code (gated, not part of CI).

    OCR_PATCH_UPSTREAM=/work/main/.upstream/hub python tests/e2e/real_matrix.py \
        [--versions 4.46.3,5.0.0] [--modes reference,plain,shims,patched] [--doc docs/compatibility.md] \
        [--mla-versions 4.54.0,5.0.0]

Runs only when OCR_PATCH_UPSTREAM names a folder holding the real files (kept in an ignored
folder, never committed). It copies them into a temporary model folder with a small config
(the full vision encoder, whose sizes the code hard-codes, plus a 2-layer decoder with few
experts and a small vocabulary), makes deterministic synthetic weights with 4.46.3, and runs
the same child as the fixture suite (tests/e2e/child_run.py) on each release: reference =
unpatched 4.46.3, plain / shims = unpatched, patched = after `ocr-patch apply`.

The real config runs MHA (use_mla false: transformers' LlamaAttention). --mla-versions also runs
an MLA variant of it (use_mla true with small low-rank sizes, REAL_MLA_CONFIG) on those releases,
so the remote DeepseekV2Attention and its RoPE run too.

The reference run must give a non-degenerate greedy sequence (more than 2 distinct tokens, no
cycle of period 1-3), so that a difference in a later generation step cannot hide; the plain
draw of make_weights.py gives one (e.g. [1777, 411, 58, 1368, 450, 1466, 600, 693] for MHA).

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
# MLA variant of the real config: small low-rank sizes; q_lora_rank set, so the q_a/q_b path runs.
REAL_MLA_CONFIG = {
    "use_mla": True, "q_lora_rank": 192, "kv_lora_rank": 128,
    "qk_rope_head_dim": 32, "qk_nope_head_dim": 64, "v_head_dim": 64,
}
LOGITS_ATOL = 1e-5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", default=",".join(support.versions()))
    p.add_argument("--modes", default="reference,plain,shims,patched")
    p.add_argument("--global-size", type=int, default=512)
    p.add_argument("--crop-size", type=int, default=640)
    p.add_argument("--crops", default="0", help="tiles as WxH (e.g. 2x1), or 0 for none")
    p.add_argument("--work", help="work folder (default: a temporary one, removed afterwards); a run "
                                   "whose result is already in it is not run again (resume)")
    p.add_argument("--doc", help="markdown file to write the results table to")
    p.add_argument("--mla-versions", default="",
                   help="releases that also run the MLA variant of the config (4.46.3 is added)")
    p.add_argument("--collect", nargs="+", metavar="WORK",
                   help="run nothing: rebuild the table (and --doc) from the work folders of earlier "
                        "runs made with --work (e.g. shards of the release list run side by side)")
    return p.parse_args(argv)


def small_config(upstream, attn="mha"):
    """The real config.json with a small decoder (top level and language_config alike)."""
    config = json.loads((upstream / "config.json").read_text())
    config.update(DECODER_OVERRIDES)
    config.setdefault("language_config", {}).update(DECODER_OVERRIDES)
    return support.config_variant(config, attn, REAL_MLA_CONFIG)


def make_model_folder(upstream, dest, attn="mha"):
    """Copies the real files into `dest` (a temporary folder) with the small config."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in REAL_FILES[:-1]:
        shutil.copyfile(upstream / name, dest / name)
    (dest / "config.json").write_text(json.dumps(small_config(upstream, attn), indent=2))
    return dest


def make_weights(folder, work, attn="mha"):
    """Synthetic weights of the real tensor names and shapes, made by 4.46.3."""
    env = next((e for e in (support.env_for(support.REFERENCE),) if e.has(support.REFERENCE)), None)
    if env is None:
        raise SystemExit(f"transformers {support.REFERENCE} is not installed (tests/e2e/setup_matrix.sh)")
    out = work / f"model-{attn}.safetensors"
    if out.exists():  # --work resume: same seed, same bytes
        return out
    proc = support.run_python(env, support.REFERENCE, work / f"weights_hf_home-{attn}",
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


def child(args, env, version, folder, files, mode, before=None):
    """support.run_child, or the result an earlier run left in `folder` when --work is given."""
    result = folder / "out" / "result.json"
    if args.work and result.exists():
        run = support.RunResult(version, mode, folder / "out", json.loads(result.read_text()), "(resumed)")
        run.logits()
        return run
    shutil.rmtree(folder, ignore_errors=True)  # what an interrupted run left
    return support.run_child(env, version, folder, files, mode, child_args(args, mode), before, repo=REPO)


def run_one(args, work, files, version, mode, attn="mha"):
    """One child run; returns a RunResult (or None when the release is not installed)."""
    env = support.env_for(version)
    if not env.has(version):
        return None
    before = apply_patch if mode == "patched" else None
    return child(args, env, version, work / f"{env.name}-{version}-{mode}-{attn}", files, mode, before)


def verdict(run, mode, version, refs, attn="mha"):
    """(passed, note) of one run against its prediction or the reference."""
    if mode in ("plain", "shims") and version != support.REFERENCE:
        expected = predict(version, mode, attn)
        ok = any(matches(o, run.first_failure) for o in expected)
        return ok, "as predicted" if ok else f"expected {describe(expected)}"
    ref = refs.get((support.env_for(version).name, attn))
    if not run.ok_through("generate") or ref is None:
        return mode == "reference" and run.ok_through("generate"), run.summary()
    diff = support.max_abs_diff(run.logits(), ref.logits())
    same = run.data["tokens"] == ref.data["tokens"]
    ok = diff <= LOGITS_ATOL and same
    return ok, f"max |dlogit| {diff:.2g}, tokens {'identical' if same else 'differ'}"


def degenerate(tokens):
    """Why a greedy sequence is too regular to compare later steps (None when it is not)."""
    if not tokens or len(tokens) < 8:
        return f"only {len(tokens or [])} tokens"
    if len(set(tokens)) <= 2:
        return f"{len(set(tokens))} distinct tokens"
    for period in (1, 2, 3):
        if all(tokens[i] == tokens[i + period] for i in range(len(tokens) - period)):
            return f"a cycle of period {period}"
    return None


def unpatched_cell(run, version, mode, attn):
    """`stage: Type: message` of an unpatched run's first failure, with its breakage letter."""
    if run is None:
        return "not run"
    failure = run.first_failure
    if failure is None:
        return "runs"
    letter = breakage_of(failure, version, mode, attn)
    message = failure["message"].replace("|", "\\|")
    if len(message) > 90:
        message = message[:87] + "..."
    return f"**{letter}**: {failure['stage']}: {failure['type']}: {message}"


def patched_cell(run, ref):
    """(max |dlogit| cell, tokens cell) of a patched run against its 4.46.3 reference."""
    if run is None:
        return "not run", ""
    if not run.ok_through("generate"):
        return f"FAILS: {run.summary()[:120]}".replace("|", "\\|"), ""
    if ref is None:
        return "no reference", ""
    diff = support.max_abs_diff(run.logits(), ref.logits())
    same = run.data["tokens"] == ref.data["tokens"]
    saved = "" if run.stage("save") == "ok" else "; save_pretrained fails"
    return f"{diff:.2g}", ("8/8 identical" if same else f"DIFFER: {run.data['tokens']}") + saved


def table(results, refs, versions_by_attn):
    """Markdown table: one row per (attention, release)."""
    out = [
        "| attention | transformers | torch | unpatched (shipped code) | unpatched, removed names put back | "
        "patched: max \\|Δlogit\\| vs 4.46.3 | patched: greedy tokens vs 4.46.3 | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for attn, versions in versions_by_attn.items():
        for version in versions:
            cells = results.get((attn, version), {})
            any_run = next((r for r, _ in cells.values() if r is not None), None)
            if any_run is None:
                continue
            torch_version = any_run.data.get("torch", "?")
            if version == support.REFERENCE:
                ref_runs = [r for (e, a), r in refs.items() if a == attn]
                plain = shims = "reference (runs)"
                diff = "0 (reference)"
                toks = "; ".join(f"{r.data.get('torch', '?').split('+')[0]}: {r.data.get('tokens')}" for r in ref_runs)
                patched = cells.get("patched", (None, None))[0]
                if patched is not None and ref_runs:
                    diff, same = patched_cell(patched, refs.get((support.env_for(version).name, attn)))
                    diff = f"{diff} (patched vs original)"
                    toks = f"{same}; reference {toks}"
                torch_version = ", ".join(r.data.get("torch", "?") for r in ref_runs) or torch_version
            else:
                plain = unpatched_cell(cells.get("plain", (None, None))[0], version, "plain", attn)
                shims = unpatched_cell(cells.get("shims", (None, None))[0], version, "shims", attn)
                ref = refs.get((support.env_for(version).name, attn))
                diff, toks = patched_cell(cells.get("patched", (None, None))[0], ref)
            ok = all(v for _, v in cells.values())
            complete = version == support.REFERENCE or {"plain", "shims", "patched"} <= set(cells)
            status = ("ok" if complete else "ok so far (incomplete)") if ok else "FAIL"
            out.append(f"| {attn} | {version} | {torch_version} | {plain} | {shims} | {diff} | {toks} | {status} |")
    return "\n".join(out) + "\n"


def collect(args, argv):
    """--collect: the table from the child results kept in earlier --work folders."""
    runs = {}
    for work in args.collect:
        for out in sorted(Path(work).glob("*/out/result.json")):
            name = out.parent.parent.name  # <env>-<version>-<mode>-<attn> or <env>-reference-<attn>
            env_name, rest = name.split("-", 1)
            data = json.loads(out.read_text())
            attn = rest.rsplit("-", 1)[1]
            if rest.startswith("reference-"):
                version, mode = support.REFERENCE, "reference"
            else:
                version, mode, _ = rest.split("-")
            run = support.RunResult(version, mode, out.parent, data, "")
            run.logits()
            runs.setdefault((env_name, version, mode, attn), run)
    refs = {(e, a): r for (e, v, m, a), r in runs.items() if m == "reference"}
    results, versions_by_attn = {}, {}
    for (env_name, version, mode, attn), run in sorted(runs.items(), key=lambda kv: support.version_tuple(kv[0][1])):
        if mode == "reference":
            ok, _ = verdict(run, "reference", version, {}, attn)
            ok = ok and degenerate(run.data.get("tokens")) is None
            key = f"reference-{env_name}"
        else:
            ok, _ = verdict(run, mode, version, refs, attn)
            key = mode
        results.setdefault((attn, version), {})[key] = (run, ok)
        versions_by_attn.setdefault(attn, [])
        if version not in versions_by_attn[attn]:
            versions_by_attn[attn].append(version)
    versions_by_attn = {a: versions_by_attn[a] for a in ("mha", "mla") if a in versions_by_attn}
    text = table(results, refs, versions_by_attn)
    print(text)
    if args.doc:
        write_doc(Path(args.doc), args, argv, text, refs, versions_by_attn)
    return 0 if all(ok for cells in results.values() for _, ok in cells.values()) else 1


def main(argv=None):
    args = parse_args(argv)
    if args.collect:
        return collect(args, argv)
    upstream = os.environ.get("OCR_PATCH_UPSTREAM")
    if not upstream:
        print("real_matrix.py: OCR_PATCH_UPSTREAM is not set; nothing to do")
        return 0
    upstream = Path(upstream)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ocrp-real-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "command.txt").write_text(command_line(argv) + "\n")
    try:
        def with_reference(listed):
            chosen = {v.strip() for v in listed.split(",") if v.strip()}
            return sorted(chosen | {support.REFERENCE}, key=support.version_tuple) if chosen else []

        versions_by_attn = {"mha": with_reference(args.versions)}
        if args.mla_versions:
            versions_by_attn["mla"] = with_reference(args.mla_versions)
        modes = [m for m in args.modes.split(",") if m]
        refs, results, checks = {}, {}, []
        for attn, versions in versions_by_attn.items():
            folder = make_model_folder(upstream, work / f"model-{attn}", attn)
            files = support.model_files(folder, make_weights(folder, work, attn))
            for env in {support.env_for(v).name: support.env_for(v) for v in versions}.values():
                if "reference" in modes and env.has(support.REFERENCE):
                    ref = child(args, env, support.REFERENCE, work / f"{env.name}-reference-{attn}",
                                files, "reference")
                    ref.logits()
                    refs[(env.name, attn)] = ref
                    ok, note = verdict(ref, "reference", support.REFERENCE, {}, attn)
                    why = degenerate(ref.data.get("tokens"))
                    if ok and why:
                        ok, note = False, f"degenerate greedy sequence ({why}): {ref.data.get('tokens')}"
                    results.setdefault((attn, support.REFERENCE), {})[f"reference-{env.name}"] = (ref, ok)
                    checks.append(ok)
                    print(f"{support.REFERENCE:8} {attn} reference ({env.name}) {ref.summary()[:100]} "
                          f"tokens {ref.data.get('tokens')} {'' if ok else 'FAIL: ' + note}", file=sys.stderr)
            for version in versions:
                for mode in modes:
                    if mode == "reference" or (version == support.REFERENCE and mode in ("plain", "shims")):
                        continue
                    run = run_one(args, work, files, version, mode, attn)
                    if run is None:
                        print(f"skip {version}: not installed", file=sys.stderr)
                        continue
                    run.logits()
                    ok, note = verdict(run, mode, version, refs, attn)
                    results.setdefault((attn, version), {})[mode] = (run, ok)
                    checks.append(ok)
                    print(f"{version:8} {attn} {mode:9} {run.summary()[:100]} -> {'ok' if ok else 'FAIL'}: {note}",
                          file=sys.stderr)
        text = table(results, refs, versions_by_attn)
        print(text)
        if args.doc:
            write_doc(Path(args.doc), args, argv, text, refs, versions_by_attn)
        return 0 if checks and all(checks) else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def machine():
    """A one-line description of this machine's CPU."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model}), float32, no GPU"


def command_line(argv):
    """How this script was called (environment and interpreter included), for the doc."""
    import shlex

    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in (
        "OCR_PATCH_UPSTREAM", "OCR_PATCH_E2E_PYTHON", "OCR_PATCH_E2E_TF_ROOT", "OCR_PATCH_E2E_PYTHON_NEW",
        "OCR_PATCH_E2E_TF_ROOT_NEW", "OCR_PATCH_E2E_CHILD_TIMEOUT") if os.environ.get(k))
    args = list(argv if argv is not None else sys.argv[1:])
    return f"{env} {shlex.quote(sys.executable)} tests/e2e/real_matrix.py {shlex.join(args)}".strip()


def write_doc(path, args, argv, text, refs, versions_by_attn):
    """docs/compatibility.md: how it was made, then the table."""
    import datetime

    command = command_line(argv)
    if args.collect:
        made = [(Path(w) / "command.txt").read_text().strip() for w in args.collect
                if (Path(w) / "command.txt").exists()]
        command = "`; then `".join(made + [command])
        pending = []
        for line in made:  # the releases those runs were asked for and have no row yet
            words = line.split()
            for flag, attn in (("--versions", "mha"), ("--mla-versions", "mla")):
                if flag in words and words.index(flag) + 1 < len(words):
                    asked = words[words.index(flag) + 1].split(",")
                    done = versions_by_attn.get(attn, [])
                    pending += [f"{v} ({attn})" for v in asked if v and v not in done]
        if pending:
            text += ("\n**Incomplete**: no result yet for " + ", ".join(pending) + " (still running, or "
                     "interrupted; rerun the command above: `--work` resumes, then `--collect`).\n")
    torches = sorted({r.data.get("torch", "?") for r in refs.values()})
    pythons = sorted({str(support.env_for(v).python) for vs in versions_by_attn.values() for v in vs})
    path.write_text(
        "# Compatibility of DeepSeek-OCR's real remote code\n\n"
        "Produced by `tests/e2e/real_matrix.py` on the real remote-code files of `deepseek-ai/DeepSeek-OCR` "
        "(kept in an ignored folder, never committed), with synthetic weights.\n\n"
        f"- command: `{command}`\n"
        f"- date: {datetime.date.today().isoformat()}\n"
        f"- machine: {machine()}; torch {', '.join(torches)} (torch 2.6 up to 5.9, torch 2.11 from 5.10, "
        "each release compared with the 4.46.3 reference under the same torch)\n"
        f"- model: the real config with a small decoder `{json.dumps(DECODER_OVERRIDES)}`, the full vision "
        f"encoder (SAM-B + CLIP-L), global view {args.global_size}px, tiles {args.crops}; MLA rows use "
        f"`{json.dumps(REAL_MLA_CONFIG)}` (the shipped config is MHA)\n"
        "- weights: `make_weights.py` (seed 0), unscaled; the 8 greedy tokens of each reference vary "
        "(checked by the script: more than 2 distinct tokens, no cycle of period 1-3; the sequences are in "
        "the 4.46.3 rows)\n\n"
        "Columns: *unpatched (shipped code)* is the first failure of the files as shipped (with only a "
        "`.cuda()` no-op, since this machine has no GPU), with the letter of the breakage it is "
        "(docs/breakages.md / README); *removed names put back* is the same with the names transformers "
        "removed (A, B, I, R, T) put back, to show the first run-time break; *patched* is after "
        "`ocr-patch apply` with no harness help: the largest absolute difference of the forward logits "
        "from 4.46.3's (same torch) and whether the 8 greedy tokens are the same. *check* is ok when the "
        "unpatched runs fail as predicted and the patched run is within 1e-5 with identical tokens.\n\n"
        + text
    )


if __name__ == "__main__":
    sys.exit(main())
