"""Why does transformers' bf16 run of the patched remote code disagree with its f32 run?

    python3 bench/gpu/tf_diag.py --model-dir W --remote-code R

Loads the model with dtype=bf16 and with dtype=f32 (eager, on the GPU), then:
1. every parameter and buffer of each load against the checkpoint (cast to the load's dtype):
   the ones that differ;
2. the vision stages (sam_model, vision_model, projector) on the Base pixels: bf16 load vs f32
   load, and bf16 load vs the f32 load cast to bf16 after loading (same weights, bf16
   arithmetic), relative L2 of each stage.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "golden"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--remote-code", required=True)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch
    from safetensors import safe_open
    from transformers import AutoModel

    import generate as golden

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    work = tempfile.mkdtemp(prefix="ocrp-diag-")
    os.environ["HF_HOME"] = os.path.join(work, "hf")
    mdir = os.path.join(work, "model")
    os.makedirs(mdir)
    for f in os.listdir(args.remote_code):
        if f.endswith(".py") or f == "config.json":
            shutil.copy(os.path.join(args.remote_code, f), mdir)
    wfile = os.path.abspath(os.path.join(args.model_dir, "model.safetensors"))
    os.symlink(wfile, os.path.join(mdir, "model.safetensors"))

    def load(dtype):
        m = AutoModel.from_pretrained(mdir, trust_remote_code=True, dtype=dtype,
                                      attn_implementation="eager", device_map={"": 0})
        return m.eval()

    rep = {}
    models = {"bf16": load(torch.bfloat16), "f32": load(torch.float32)}
    with safe_open(wfile, "pt", device="cuda") as f:
        names = set(f.keys())
        for tag, m in models.items():
            bad, dtypes, missing = [], {}, []
            for n, p in list(m.named_parameters()) + list(m.named_buffers()):
                dtypes[str(p.dtype)] = dtypes.get(str(p.dtype), 0) + 1
                if n not in names:
                    missing.append(f"{n} {tuple(p.shape)} {p.dtype} "
                                   f"finite={bool(torch.isfinite(p.float()).all())}")
                    continue
                ref = f.get_tensor(n).to(p.dtype)
                if ref.shape != p.shape or not torch.equal(ref, p.data):
                    d = (ref.float() - p.data.float()).abs().max().item() if ref.shape == p.shape else None
                    bad.append({"name": n, "dtype": str(p.dtype), "max_abs_diff": d})
            rep[f"{tag}: tensors differing from the checkpoint"] = bad[:50]
            rep[f"{tag}: count differing"] = len(bad)
            rep[f"{tag}: not in checkpoint"] = missing
            rep[f"{tag}: dtypes"] = dtypes
    models["f32->bf16"] = load(torch.float32).to(torch.bfloat16)

    base = golden.build_case("base", 129280)
    px = base["images"][0][1].cuda()

    def stages(m, dtype):
        mm = m.model
        x = px.to(dtype)
        with torch.no_grad():
            f1 = mm.sam_model(x)
            f2 = mm.vision_model(x, f1)
            p = mm.projector(torch.cat((f2[:, 1:], f1.flatten(2).permute(0, 2, 1)), dim=-1))
        return {"sam": f1.double(), "clip": f2.double(), "projector": p.double()}

    out = {k: stages(m, torch.float32 if k == "f32" else torch.bfloat16) for k, m in models.items()}
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    for a in ("bf16", "f32->bf16"):
        rep[f"{a} vs f32 stage relL2"] = {s: rel(out[a][s], out["f32"][s]) for s in out["f32"]}
    rep["bf16 vs f32->bf16 stage relL2"] = {s: rel(out["bf16"][s], out["f32->bf16"][s]) for s in out["f32"]}
    s = json.dumps(rep, indent=1)
    print(s)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(s)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
