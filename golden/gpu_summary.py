"""GPU goldens kept small ("summaries", golden/gpu/README.md): transformers running DeepSeek-OCR's
remote code on a GPU, full size, in bf16 or f32, on the synthetic weights and the goldens'
inputs (golden/generate.py's `build_case`, with the brightened `page` pixels), reduced to what a
later run needs to be compared with it:

    greedy.tokens        (32,)     generate(do_sample=False), KV cache, no EOS stop
    greedy.topk_values   (32, 8)   each step's raw logits, top 8 (sorted), float32
    greedy.topk_ids      (32, 8)
    greedy.logsumexp     (32,)
    norms.hidden         (L+1,)    L2 norm over all prompt positions of hidden_states[i]
                                   (0: after the image merge; L: after the final norm)
    norms.vision_rows    (1,)      L2 norm of the image rows of hidden_states[0]
    input_ids, images_seq_mask, images_spatial_crop

plus the golden header (format version, kind `summary`, config, synth algorithm/seed/dtype/tool,
weights sha256, remote code sha256 and state, transformers/torch versions, GPU, dtype).

    python3 golden/gpu_summary.py run --remote-code R --config C.json --weights W.safetensors \
        --dtype bf16 --state patched --out golden/gpu/real-base-bf16.safetensors
    python3 golden/gpu_summary.py compare A.safetensors B.safetensors   # B the reference

Works on transformers 4.46.3 (the original code) and 5.x (the patched code). Our own script.
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
TOPK = 8


def page(u8):
    import numpy as np

    import generate as golden

    # u8' = 255 - (u8 >> 2): the plain pattern sums to exactly 0 in bf16, which the remote code
    # takes for "no image" (docs/fidelity.md)
    return golden.normalise((255 - (u8.astype(np.int64) >> 2)).astype(np.uint8))


def cache_bytes(pkv, seq_len):
    """Bytes per token per layer of a transformers KV cache (layer 0), and the tensors' shapes."""
    keys = values = None
    if hasattr(pkv, "layers") and pkv.layers:  # transformers 5
        keys, values = pkv.layers[0].keys, pkv.layers[0].values
    elif hasattr(pkv, "key_cache") and pkv.key_cache:  # 4.x DynamicCache
        keys, values = pkv.key_cache[0], pkv.value_cache[0]
    elif isinstance(pkv, (tuple, list)) and pkv:  # legacy tuples
        keys, values = pkv[0][0], pkv[0][1]
    if keys is None:
        return None
    total = keys.numel() * keys.element_size() + values.numel() * values.element_size()
    return {"bytes_per_token_per_layer": total / seq_len,
            "keys": list(keys.shape), "values": list(values.shape), "seq_len": seq_len}


def run(args):
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModel

    import generate as golden

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    dev = torch.device(args.device)
    work = tempfile.mkdtemp(prefix="ocrp-sum-")
    os.environ["HF_HOME"] = os.path.join(work, "hf")
    mdir = os.path.join(work, "model")
    os.makedirs(mdir)
    for f in sorted(os.listdir(args.remote_code)):
        if f.endswith(".py"):
            shutil.copy(os.path.join(args.remote_code, f), mdir)
    shutil.copy(args.config, os.path.join(mdir, "config.json"))
    for src, name in golden.weight_files(args.weights):
        os.symlink(os.path.abspath(src), os.path.join(mdir, name))
    with open(args.config) as f:
        config = json.load(f)
    vocab = config["vocab_size"]

    major = int(transformers.__version__.split(".")[0])
    kw = {("dtype" if major >= 5 else "torch_dtype"): dtype}
    try:
        import accelerate  # noqa: F401  (device_map needs it on 4.x)

        kw["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else None
    except ImportError:
        pass
    model, info = AutoModel.from_pretrained(mdir, trust_remote_code=True, attn_implementation="eager",
                                            output_loading_info=True, **kw)
    missing = [k for k in info["missing_keys"] if k != "model.vision_model.embeddings.position_ids"]
    if missing or info["unexpected_keys"] or info.get("mismatched_keys"):
        sys.exit(f"weights do not fit the model: {info}")
    model = model.to(dev).eval()

    case = golden.build_case(args.case, vocab)
    px = case["pixels"]
    ori = page(px["global_u8"])[None]
    crops = torch.stack([page(t) for t in px["tiles_u8"]]) if px["tiles_u8"] else case["images"][0][0]
    ids = case["input_ids"].to(dev)
    am = torch.ones_like(ids)
    mask = case["images_seq_mask"].to(dev)
    crop = case["images_spatial_crop"].to(dev)
    images = [(crops.to(dev, dtype), ori.to(dev, dtype))]
    quiet = lambda: contextlib.redirect_stdout(io.StringIO())  # the remote code prints per forward
    with torch.no_grad(), quiet():
        out = model(input_ids=ids, attention_mask=am, images=images, images_seq_mask=mask,
                    images_spatial_crop=crop, output_hidden_states=True, use_cache=False,
                    return_dict=True)
        hs = out.hidden_states
        norms = torch.tensor([h[0].double().norm().item() for h in hs], dtype=torch.float32)
        vision_norm = torch.tensor([hs[0][0][mask[0]].double().norm().item()], dtype=torch.float32)
        fwd_last = out.logits[0, -1].float().cpu()
        del out, hs
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        g = model.generate(ids, attention_mask=am, images=images, images_seq_mask=mask,
                           images_spatial_crop=crop, do_sample=False, max_new_tokens=args.steps,
                           eos_token_id=None, output_logits=True, return_dict_in_generate=True,
                           use_cache=True)
    tokens = g.sequences[0, ids.shape[1]:].cpu()
    logits = torch.stack([l[0] for l in g.logits]).float().cpu()
    if tokens.shape[0] != args.steps or not torch.equal(logits.argmax(-1), tokens):
        sys.exit("generate() tokens are not the argmax of its logits")
    cache = None
    with contextlib.suppress(Exception):
        cache = cache_bytes(g.past_key_values, ids.shape[1] + args.steps - 1)
    v, i = torch.topk(logits, TOPK, dim=-1, sorted=True)
    weights_sha = golden.weights_sha256(args.weights)
    first = [p for p, n in golden.weight_files(args.weights) if n.endswith(".safetensors")][0]
    from safetensors import safe_open

    with safe_open(first, "pt") as f:
        wmeta = f.metadata() or {}
    remote = {f: golden.sha256_file(os.path.join(args.remote_code, f))
              for f in sorted(os.listdir(args.remote_code)) if f.endswith(".py")}
    spec = golden.CASES[args.case]
    cj = golden.canonical_json(config)
    name = args.config_name or os.path.splitext(os.path.basename(args.config))[0]
    meta = {
        "ocrp.golden.format_version": golden.FORMAT_VERSION,
        "ocrp.golden.kind": "summary",
        "ocrp.golden.generator": "golden/gpu_summary.py",
        "config.name": name,
        "config.json": cj,
        "config.sha256": hashlib.sha256(cj.encode()).hexdigest(),
        "synth.algorithm": wmeta.get("ocrp.synth.algorithm", "?"),
        "synth.seed": wmeta.get("ocrp.synth.seed", "?"),
        "synth.dtype": wmeta.get("ocrp.synth.dtype", "?"),
        "synth.tool": wmeta.get("ocrp.synth.tool", "?"),
        "weights.sha256": weights_sha,
        "remote_code.sha256": golden.canonical_json(remote),
        "remote_code.state": args.state,
        "transformers.version": transformers.__version__,
        "torch.version": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": {"bf16": "bfloat16", "f32": "float32"}[args.dtype],
        "attn_implementation": "eager",
        "tf32": "off",
        "case": args.case,
        "case.base_size": str(spec["base_size"]),
        "case.image_size": str(spec["image_size"]),
        "case.crop_mode": str(spec["crop_mode"]).lower(),
        "case.tiles_wh": json.dumps(list(spec["tiles"]) if spec["tiles"] else [1, 1]),
        "pixels.formula": golden.PIXEL_FORMULA + "; then u8' = 255 - (u8 >> 2) (variant page)",
        "pixels.variant": "page",
        "pixels.global.sha256": golden.sha256_tensor(ori),
        "prompt.text": golden.PROMPT_TEXT,
        "prompt.id_rule": golden.ID_RULE,
        "greedy.rule": f"{args.steps} steps of generate(do_sample=False), no EOS stop, KV cache; "
                       f"top {TOPK} of each step's raw logits",
        "greedy.step0_vs_forward_maxdiff": f"{(logits[0] - fwd_last).abs().max().item():.3e}",
        "norms.rule": "norms.hidden[i] = ||hidden_states[i][0]|| over all prompt positions "
                      "(0: after the image merge, L: after the final norm); norms.vision_rows = "
                      "||hidden_states[0][0][images_seq_mask]||",
    }
    if px["tiles_u8"]:
        meta["pixels.tiles.sha256"] = golden.sha256_tensor(crops)
    if cache:
        meta["cache.kv"] = json.dumps(cache)
    t = {
        "input_ids": case["input_ids"].contiguous(),
        "images_seq_mask": case["images_seq_mask"].to(torch.uint8).contiguous(),
        "images_spatial_crop": case["images_spatial_crop"].contiguous(),
        "greedy.tokens": tokens.to(torch.int64).contiguous(),
        "greedy.topk_values": v.contiguous(),
        "greedy.topk_ids": i.to(torch.int64).contiguous(),
        "greedy.logsumexp": torch.logsumexp(logits, -1).contiguous(),
        "norms.hidden": norms.contiguous(),
        "norms.vision_rows": vision_norm.contiguous(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(t, args.out, metadata=meta)
    print(json.dumps({"out": args.out, "transformers": transformers.__version__, "dtype": args.dtype,
                      "tokens": tokens.tolist(), "min_top2_margin": (v[:, 0] - v[:, 1]).min().item(),
                      "cache": cache}))
    shutil.rmtree(work, ignore_errors=True)


def compare(args):
    """A against B (B the reference): tokens, logits of B's top-k ids, norms."""
    from safetensors import safe_open

    def load(p):
        with safe_open(p, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    a, ma = load(args.a)
    b, mb = load(args.b)
    ta, tb = a["greedy.tokens"], b["greedy.tokens"]
    agree = 0
    while agree < len(tb) and ta[agree] == tb[agree]:
        agree += 1
    # logits of the same ids, while the token prefixes agree (step k compares if tokens[:k] agree)
    n = min(agree + 1, len(tb))
    d = 0.0
    for k in range(n):
        ia, ib = a["greedy.topk_ids"][k].tolist(), b["greedy.topk_ids"][k].tolist()
        for j, idx in enumerate(ib):
            if idx in ia:
                d = max(d, abs(a["greedy.topk_values"][k][ia.index(idx)].item() - b["greedy.topk_values"][k][j].item()))
    rel = ((a["norms.hidden"].double() - b["norms.hidden"].double()).abs() / b["norms.hidden"].double()).max().item()
    out = {"a": args.a, "b": args.b,
           "a_run": f"{ma.get('transformers.version')} {ma.get('remote_code.state')} {ma.get('dtype')}",
           "b_run": f"{mb.get('transformers.version')} {mb.get('remote_code.state')} {mb.get('dtype')}",
           "tokens_equal": f"{agree}/{len(tb)}", "topk_logits_max_abs": d, "norms_max_rel": rel}
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--remote-code", required=True)
    r.add_argument("--config", required=True, help="config.json")
    r.add_argument("--config-name", help="name in the header (default: the file's stem)")
    r.add_argument("--weights", required=True, help=".safetensors file or checkpoint folder")
    r.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    r.add_argument("--device", default="cuda")
    r.add_argument("--case", default="base", choices=["tiny", "base", "gundam"])
    r.add_argument("--steps", type=int, default=32)
    r.add_argument("--state", default="patched", choices=["patched", "original"])
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    main()
