"""The peer of examples/gpu_bench.rs: HF transformers running DeepSeek-OCR's PATCHED remote code
on the same GPU, same synthetic weights, same inputs (golden/generate.py's `build_case`), eager
attention; and the comparison of both engines' greedy tokens and logits.

    python3 bench/gpu/tf_peer.py run --model-dir W --remote-code R --dtype bf16 \
        --json tf-bf16.json --logits tf-bf16.safetensors
    python3 bench/gpu/tf_peer.py compare --dir D --json compare.json

`run`: W holds model.safetensors (ocr-patch-synth); R holds the remote code's .py files and
config.json, already patched by `ocr-patch apply --path R`. Measures, after warm-up, the median
of --repeat runs (CUDA-synchronised wall clock): vision encode (sam_model + vision_model +
projector, as DeepseekOCRModel.forward calls them) for Base and Gundam 3x2; the decoder prefill
of the Base prompt (DeepseekV2Model.forward on the merged embeddings + lm_head of the last
position); the whole prompt forward (vision included); `generate(do_sample=False)` for --steps
tokens, timed per step by a logits processor that synchronises. Writes the tokens and each
step's raw logits.

`compare`: reads {rust,tf}-{bf16,f32}.safetensors in D and reports leading greedy-token
agreement and logit errors (step 0, and every step while the token prefixes agree).
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "golden"))


def median(v):
    s = sorted(v)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def run(args):
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModel, LogitsProcessor, LogitsProcessorList

    import generate as golden  # golden/generate.py: inputs exactly as the goldens build them

    dtype = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}[args.dtype]
    # True f32 (cuDNN would run the SAM convolutions in TF32 by default): the f32 runs are the
    # accuracy reference, and candle does plain f32 too.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    work = tempfile.mkdtemp(prefix="ocrp-tf-")
    os.environ["HF_HOME"] = os.path.join(work, "hf")
    mdir = os.path.join(work, "model")
    os.makedirs(mdir)
    for f in os.listdir(args.remote_code):
        if f.endswith(".py") or f == "config.json":
            shutil.copy(os.path.join(args.remote_code, f), mdir)
    os.symlink(os.path.abspath(os.path.join(args.model_dir, "model.safetensors")),
               os.path.join(mdir, "model.safetensors"))
    with open(os.path.join(mdir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]

    used0 = torch.cuda.mem_get_info() if cuda else (0, 0)
    t = time.perf_counter()
    model, info = AutoModel.from_pretrained(
        mdir, trust_remote_code=True, dtype=dtype, attn_implementation=args.attn,
        output_loading_info=True, **({"device_map": {"": 0}} if cuda else {}),
    )
    model.eval()
    sync()
    load_s = time.perf_counter() - t
    missing = [k for k in info["missing_keys"] if k != "model.vision_model.embeddings.position_ids"]
    if missing or info["unexpected_keys"] or info.get("mismatched_keys"):
        sys.exit(f"weights do not fit the model: {info}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    quiet = lambda: contextlib.redirect_stdout(io.StringIO())  # the remote code prints per forward

    base = golden.build_case("base", vocab)
    gun = golden.build_case("gundam", vocab)
    if args.pixels == "page":
        # examples/gpu_bench.rs `view_pixels`: u8' = 255 - (u8 >> 2). The golden pattern sums to
        # ~0 (exactly 0 in bf16) and the remote code treats sum(pixels) == 0 as "no image".
        import numpy as np

        page = lambda u: golden.normalise((255 - (u.astype(np.int64) >> 2)).astype(np.uint8))
        for c in (base, gun):
            px = c["pixels"]
            ori = page(px["global_u8"])[None]
            crops = (torch.stack([page(t) for t in px["tiles_u8"]]) if px["tiles_u8"]
                     else c["images"][0][0])
            c["images"] = [(crops, ori)]
    ids = base["input_ids"].to(dev)
    am = torch.ones_like(ids)
    seq_mask = base["images_seq_mask"].to(dev)
    crop = base["images_spatial_crop"].to(dev)
    images = [(base["images"][0][0].to(dev, dtype), base["images"][0][1].to(dev, dtype))]
    g_tiles = gun["images"][0][0].to(dev, dtype)
    g_ori = gun["images"][0][1].to(dev, dtype)

    def timed(fn, warmup=args.warmup, repeat=args.repeat):
        for _ in range(warmup):
            fn()
            sync()
        times, out = [], None
        for _ in range(max(repeat, 1)):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            times.append((time.perf_counter() - t) * 1e3)
        return times, out

    m = model.model

    def views(px):
        f1 = m.sam_model(px)
        f2 = m.vision_model(px, f1)
        return m.projector(torch.cat((f2[:, 1:], f1.flatten(2).permute(0, 2, 1)), dim=-1))

    report = {
        "engine": f"transformers {transformers.__version__} + patched remote code, {args.attn}",
        "attn": args.attn,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "tf32": False,
        "dtype": args.dtype,
        "pixels": args.pixels,
        "image_sum_bf16": float(torch.sum(images[0][1].bfloat16()).item()),
        "load_s": load_s,
    }
    with torch.no_grad(), quiet():
        vb, _ = timed(lambda: views(images[0][1]))
        vg, _ = ([], None) if args.no_gundam else timed(lambda: (views(g_tiles), views(g_ori)))
        # merged embeddings as the model builds them: hidden_states[0]; MoE routing per layer
        routing, hooks = {}, []
        for i, layer in enumerate(m.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "top_k"):
                def keep(mod, inp, o, i=i):  # returns None: the output is left alone
                    routing.setdefault(i, o[0].detach().cpu())

                hooks.append(gate.register_forward_hook(keep))
        sub = {}  # per layer: attention output and MLP/MoE output (before the residual add)
        for i, layer in enumerate(m.layers):
            for name, mod in (("attn_out", layer.self_attn), ("mlp_out", layer.mlp)):
                def keep_sub(mod, inp, o, key=(name, i)):
                    o = o[0] if isinstance(o, tuple) else o
                    sub.setdefault(key, o[0].detach().float().cpu())

                hooks.append(mod.register_forward_hook(keep_sub))
        out = model(input_ids=ids, attention_mask=am, images=images, images_seq_mask=seq_mask,
                    images_spatial_crop=crop, output_hidden_states=True, use_cache=False,
                    return_dict=True)
        for h in hooks:
            h.remove()
        embeds = out.hidden_states[0]
        stages = {
            "vision_rows": embeds[0][seq_mask[0]].float().cpu().contiguous(),
            "hidden": torch.stack([h[0].float() for h in out.hidden_states]).cpu().contiguous(),
        }
        for name in ("attn_out", "mlp_out"):
            keys = sorted(k for k in sub if k[0] == name)
            if keys:
                stages[name] = torch.stack([sub[k] for k in keys]).contiguous()
        if routing:
            stages["routing"] = torch.stack([routing[i] for i in sorted(routing)]).to(torch.int64).contiguous()
        fwd_logits = out.logits[0, -1].float()
        del out
        parent = super(type(m), m)

        def prefill():
            h = parent.forward(input_ids=None, attention_mask=am, inputs_embeds=embeds,
                               use_cache=True, return_dict=True)[0]
            return model.lm_head(h[:, -1:]).float().cpu()

        pf, pf_logits = timed(prefill)

        def prompt():
            o = model(input_ids=ids, attention_mask=am, images=images, images_seq_mask=seq_mask,
                      images_spatial_crop=crop, use_cache=True, return_dict=True)
            return o.logits[0, -1].float().cpu()

        pt, _ = timed(prompt)

        class StepTimer(LogitsProcessor):
            def __init__(self):
                self.stamps = []

            def __call__(self, input_ids, scores):
                sync()
                self.stamps.append(time.perf_counter())
                return scores

        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0

        def gen(n, timer):
            return model.generate(ids, attention_mask=am, images=images, images_seq_mask=seq_mask,
                                  images_spatial_crop=crop, do_sample=False, max_new_tokens=n,
                                  eos_token_id=None, output_logits=True,
                                  return_dict_in_generate=True, use_cache=True,
                                  logits_processor=LogitsProcessorList([timer]))

        gen(4, StepTimer())  # warm-up
        step_ms, gen_total, g, identical = [], [], None, True
        for _ in range(max(args.decode_runs, 1)):
            timer = StepTimer()
            sync()
            t = time.perf_counter()
            gi = gen(args.steps, timer)
            sync()
            gen_total.append((time.perf_counter() - t) * 1e3)
            step_ms += [(b - a) * 1e3 for a, b in zip(timer.stamps, timer.stamps[1:])]
            if g is None:
                g = gi
            else:
                identical &= torch.equal(g.sequences, gi.sequences)
        used_b1 = torch.cuda.mem_get_info() if cuda else (0, 0)
        batched = [batched_decode(b, args.steps, parent, model, embeds, vocab, dev, sync)
                   for b in args.batches]
    tokens = g.sequences[0, ids.shape[1]:].cpu()
    logits = torch.stack([l[0] for l in g.logits]).float().cpu()
    if not torch.equal(logits.argmax(-1), tokens):
        print("warning: generate() tokens are not the argmax of its logits", file=sys.stderr)
    free, total = torch.cuda.mem_get_info() if cuda else (0, 0)
    ms = median(step_ms)
    gib = lambda b: b / 2**30
    report.update({
        "vision_base_ms": {"median_ms": median(vb), "runs_ms": vb},
        "vision_gundam_ms": {"median_ms": median(vg), "runs_ms": vg},
        "prompt_tokens": ids.shape[1],
        "prefill_decoder_ms": {"median_ms": median(pf), "runs_ms": pf},
        "prompt_total_ms": {"median_ms": median(pt), "runs_ms": pt},
        "decode": {
            "steps_timed": len(step_ms),
            "ms_per_token_median": ms,
            "ms_per_token_mean": sum(step_ms) / max(len(step_ms), 1),
            "tokens_per_s": 1e3 / ms,
            "runs": max(args.decode_runs, 1),
            "runs_tokens_identical": identical,
            "generate_total_ms_per_run": gen_total,
            "step_ms": step_ms,
        },
        "greedy_tokens": tokens.tolist(),
        "decode_batched": batched,
        "step0_vs_forward_maxdiff": (logits[0] - fwd_logits.cpu()).abs().max().item(),
        "prefill_vs_forward_maxdiff": (pf_logits.flatten() - fwd_logits.cpu()).abs().max().item(),
        "memory": {
            "torch_max_allocated_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
            "torch_max_reserved_gib": gib(torch.cuda.max_memory_reserved()) if cuda else None,
            "device_used_before_load_gib": gib(used0[1] - used0[0]),
            "device_used_end_gib": gib(total - free),
            "device_used_before_batched_gib": gib(used_b1[1] - used_b1[0]),
            "note": "torch's caching allocator keeps what it reserved: device_used_end ~ peak",
        },
    })
    if args.logits:
        save_file({"tokens": tokens.to(torch.int64).contiguous(), "logits": logits.contiguous(),
                   **stages}, args.logits)
    s = json.dumps(report, indent=1)
    print(s)
    if args.json:
        with open(args.json, "w") as f:
            f.write(s)
    shutil.rmtree(work, ignore_errors=True)


def batched_decode(b, steps, parent, model, embeds, vocab, dev, sync):
    """`b` sequences decoded together by the decoder (DeepseekV2Model.forward with its KV cache,
    lm_head, greedy argmax read back every step): the Base prompt's embeddings for all, then
    sequence i > 0 starts from its own token (so that the sequences route to different experts,
    as different prompts would; the Rust side does the same). Tokens/s over `steps` steps after
    3 untimed ones."""
    import torch

    def run(n):
        e = embeds.expand(b, -1, -1).contiguous()
        t0 = e.shape[1]
        out = parent.forward(input_ids=None, attention_mask=torch.ones(b, t0, dtype=torch.long, device=dev),
                             inputs_embeds=e, use_cache=True, return_dict=True)
        pkv = out.past_key_values
        first = model.lm_head(out[0][:, -1:]).argmax(-1)
        tok = (first + 7919 * torch.arange(b, device=dev).view(b, 1)) % vocab
        tok[0] = first[0]
        times = []
        for s in range(n):
            sync()
            t = time.perf_counter()
            pos = torch.full((b, 1), t0 + s, dtype=torch.long, device=dev)
            o = parent.forward(input_ids=tok, attention_mask=torch.ones(b, t0 + s + 1, dtype=torch.long, device=dev),
                               position_ids=pos, past_key_values=pkv, use_cache=True, return_dict=True)
            pkv = o.past_key_values
            tok = model.lm_head(o[0][:, -1:]).argmax(-1)
            tok.cpu()
            times.append(time.perf_counter() - t)
        return times

    try:
        with torch.no_grad():
            run(3)
            times = run(steps)
        total = sum(times)
        return {"batch": b, "steps": steps, "ms_per_step": total * 1e3 / steps,
                "tokens_per_s": b * steps / total}
    except Exception as e:  # reported, the other measurements stand
        return {"batch": b, "error": f"{type(e).__name__}: {e}"}


def pair(a, b):
    """a vs b (b the reference): leading token agreement, logit errors while prefixes agree."""
    import torch

    ta, tb = a["tokens"].long(), b["tokens"].long()
    la, lb = a["logits"].double(), b["logits"].double()
    n = min(len(ta), len(tb))
    agree = 0
    while agree < n and ta[agree] == tb[agree]:
        agree += 1
    # step k's logits are comparable while tokens[:k] agree: k = 0..agree (inclusive, if < n)
    comparable = min(agree + 1, n)
    steps = []
    for k in range(comparable):
        d = la[k] - lb[k]
        top2 = torch.topk(lb[k], 2).values
        steps.append({
            "step": k,
            "max_abs": d.abs().max().item(),
            "rel_l2": (d.norm() / lb[k].norm()).item(),
            "ref_top2_margin": (top2[0] - top2[1]).item(),
        })
    rel = lambda x, y: ((x.double() - y.double()).norm() / y.double().norm()).item()
    st = {}
    if "vision_rows" in a and "vision_rows" in b:
        st["vision_rows_rel_l2"] = rel(a["vision_rows"], b["vision_rows"])
    if "hidden" in a and "hidden" in b and a["hidden"].shape == b["hidden"].shape:
        ha, hb = a["hidden"], b["hidden"]
        # index i: input of decoder layer i (0 = merged embeddings); last: after the final norm
        st["hidden_rel_l2_all_positions"] = [rel(ha[i], hb[i]) for i in range(len(ha))]
        st["hidden_rel_l2_last_position"] = [rel(ha[i, -1], hb[i, -1]) for i in range(len(ha))]
    for name in ("attn_out", "mlp_out"):
        if name in a and name in b:
            st[f"{name}_rel_l2_per_layer"] = [rel(x, y) for x, y in zip(a[name], b[name])]
    if "routing" in a and "routing" in b:
        ra, rb = a["routing"], b["routing"]  # (layers, positions, k), as topk gives them
        same = [(ra[l].sort(-1).values == rb[l].sort(-1).values).all(-1).double().mean().item()
                for l in range(len(ra))]
        st["routing_same_expert_set_fraction_per_moe_layer"] = same
    out = {
        "stages": st,
        "tokens_compared": n,
        "leading_tokens_equal": agree,
        "all_equal": agree == n,
        "step0_max_abs": steps[0]["max_abs"],
        "step0_rel_l2": steps[0]["rel_l2"],
        "max_abs_over_agreeing_steps": max(s["max_abs"] for s in steps),
        "steps": steps,
    }
    if agree < n:
        out["first_divergence"] = {"step": agree, "ref_token": int(tb[agree]),
                                   "other_token": int(ta[agree]),
                                   "ref_top2_margin": steps[agree]["ref_top2_margin"]
                                   if agree < len(steps) else None}
    return out


def compare(args):
    from safetensors.torch import load_file

    runs = {}
    for eng in ("rust", "tf"):
        for dt in ("bf16", "f32"):
            p = os.path.join(args.dir, f"{eng}-{dt}.safetensors")
            if os.path.exists(p):
                runs[f"{eng}-{dt}"] = load_file(p)
    pairs = [
        ("rust-bf16", "tf-bf16"), ("rust-f32", "tf-f32"), ("tf-bf16", "tf-f32"),
        ("rust-bf16", "tf-f32"), ("rust-bf16", "rust-f32"),
    ]
    rep = {"available": sorted(runs)}
    for a, b in pairs:
        if a in runs and b in runs:
            rep[f"{a} vs {b}"] = pair(runs[a], runs[b])
    s = json.dumps(rep, indent=1)
    with open(args.json, "w") as f:
        f.write(s)
    # short table last
    print(f"{'pair':24} {'tokens eq':>9} {'step0 max|d|':>12} {'step0 relL2':>11} "
          f"{'vision relL2':>12} {'L1 in relL2':>11} {'norm relL2':>10} {'route same':>10}")
    for k, v in rep.items():
        if isinstance(v, dict):
            st = v["stages"]
            hid = st.get("hidden_rel_l2_all_positions") or [float("nan")] * 2
            route = st.get("routing_same_expert_set_fraction_per_moe_layer")
            print(f"{k:24} {v['leading_tokens_equal']:>3}/{v['tokens_compared']:<5} "
                  f"{v['step0_max_abs']:>12.3e} {v['step0_rel_l2']:>11.3e} "
                  f"{st.get('vision_rows_rel_l2', float('nan')):>12.3e} {hid[1]:>11.3e} "
                  f"{hid[-1]:>10.3e} {min(route) if route else float('nan'):>10.3f}")
    for k, v in rep.items():
        if isinstance(v, dict) and "hidden_rel_l2_all_positions" in v["stages"]:
            print(k, "hidden relL2 per layer input (all positions):",
                  " ".join(f"{x:.2e}" for x in v["stages"]["hidden_rel_l2_all_positions"]))
        for name in ("attn_out", "mlp_out"):
            if isinstance(v, dict) and f"{name}_rel_l2_per_layer" in v["stages"]:
                print(k, f"{name} relL2 per layer:",
                      " ".join(f"{x:.2e}" for x in v["stages"][f"{name}_rel_l2_per_layer"]))
        if isinstance(v, dict) and "routing_same_expert_set_fraction_per_moe_layer" in v["stages"]:
            print(k, "same expert set per MoE layer:",
                  " ".join(f"{x:.3f}" for x in v["stages"]["routing_same_expert_set_fraction_per_moe_layer"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model-dir", required=True)
    r.add_argument("--remote-code", required=True)
    r.add_argument("--dtype", default="bf16")
    r.add_argument("--device", default="cuda")
    r.add_argument("--no-gundam", action="store_true")
    r.add_argument("--steps", type=int, default=32)
    # 8 warm-ups: with 2, its Base encode fell from 33 to 26 ms over the 5 timed runs (tenth
    # session, docs/benchmarks.md); with 8 it held at 22.2-22.7 ms over 10
    r.add_argument("--warmup", type=int, default=8)
    r.add_argument("--repeat", type=int, default=10)
    r.add_argument("--decode-runs", type=int, default=3)
    r.add_argument("--pixels", default="page", choices=["page", "golden"])
    r.add_argument("--attn", default="eager", help="attn_implementation (eager, sdpa)")
    r.add_argument("--batches", default="", type=lambda v: [int(x) for x in v.split(",") if x],
                   help="also decode this many sequences together, comma-separated (8,32,64)")
    r.add_argument("--json")
    r.add_argument("--logits")
    c = sub.add_parser("compare")
    c.add_argument("--dir", required=True)
    c.add_argument("--json", required=True)
    args = ap.parse_args()
    run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    main()
