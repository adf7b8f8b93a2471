"""Reference cases for the Rust model, produced by DeepSeek-OCR's own remote code.

Usage: make_ref.py UPSTREAM_DIR OUT_DIR [--real-vision]

UPSTREAM_DIR holds the Hub's deepencoder.py, modeling_deepseekv2.py, modeling_deepseekocr.py,
configuration_deepseek_v2.py and conversation.py (never committed to this repository). Each
case builds a piece of that code with seeded random weights, runs it on CPU in float32 and
writes OUT_DIR/<case>.safetensors holding the weights under the checkpoint's own names plus
`ref.input.*` and `ref.output.*` tensors; its metadata holds the case's config as JSON.

--real-vision writes only `vision_real`: the real `build_sam_vit_b()` and `build_clip_l()`
(393M parameters, a 1.6 GB file) on one 640 px view.

Run with the transformers the code was written for (4.46.3) and torch (CPU).
"""

import atexit
import json
import math
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file

# The remote code moves tensors to the GPU in places; everything here stays on the CPU.
torch.Tensor.cuda = lambda self, *a, **k: self


def import_upstream(upstream):
    pkg_root = tempfile.mkdtemp(prefix="ocr_ref_pkg_")
    atexit.register(shutil.rmtree, pkg_root, True)
    pkg = os.path.join(pkg_root, "ocr_upstream")
    os.mkdir(pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    for f in os.listdir(upstream):
        if f.endswith(".py"):
            os.symlink(os.path.join(os.path.abspath(upstream), f), os.path.join(pkg, f))
    sys.path.insert(0, pkg_root)
    import importlib

    de = importlib.import_module("ocr_upstream.deepencoder")
    v2 = importlib.import_module("ocr_upstream.modeling_deepseekv2")
    cfg = importlib.import_module("ocr_upstream.configuration_deepseek_v2")
    ocr = importlib.import_module("ocr_upstream.modeling_deepseekocr")
    return de, v2, cfg, ocr


def randomize(module, seed):
    """Seeded weights of sensible scale for every parameter (zero-initialised ones included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            r = torch.randn(p.shape, generator=g)
            leaf = name.split(".")[-1]
            if leaf == "weight" and p.dim() == 1 and "gate" not in name:
                p.copy_(1.0 + 0.1 * r)  # norms
            elif leaf == "bias" or p.dim() == 1:
                p.copy_(0.1 * r)
            elif "rel_pos" in name or "pos_embed" in name or "position_embedding" in name:
                p.copy_(0.5 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            else:
                fan_in = p[0].numel()
                p.copy_(r / math.sqrt(fan_in))


def save(out_dir, case, weights, inputs, outputs, config):
    tensors = {k: v.detach().contiguous().float() if v.is_floating_point() else v.detach().contiguous()
               for k, v in weights.items()}
    for k, v in inputs.items():
        tensors["ref.input." + k] = v.detach().contiguous()
    for k, v in outputs.items():
        tensors["ref.output." + k] = v.detach().contiguous().float()
    meta = {"case": case, "config": json.dumps(config), "torch": torch.__version__}
    save_file(tensors, os.path.join(out_dir, case + ".safetensors"), metadata=meta)
    print(f"{case}: {len(weights)} weights, outputs {sorted(outputs)}")


def small_sam(de, img_size=256, embed_dim=64, depth=3, heads=4, global_idx=(1,)):
    from functools import partial

    return de.ImageEncoderViT(
        depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(global_idx), window_size=14,
        out_chans=256,
    ).eval()


def small_clip(de, hidden=64, layers=2, heads=4, ffn=128):
    from easydict import EasyDict as adict

    cfg = adict(num_layers=layers, hidden_size=hidden, num_heads=heads, num_attention_heads=heads,
                ffn_hidden_size=ffn, seq_length=256, max_position_embeddings=256, use_flash_attn=False,
                hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-5,
                pre_layernorm_epsilon=1e-5, image_size=224, patch_size=14)
    return de.VitModel(cfg).eval(), dict(cfg)


def case_sam(de, out):
    sam = small_sam(de)
    randomize(sam, 1)
    g = torch.Generator().manual_seed(11)
    inputs, outputs = {}, {}
    # 256: trained grid (16); 160: grid 10, positions and global rel-pos shrunk;
    # 384: grid 24, both grown, windows padded 24 -> 28.
    for s in (256, 160, 384):
        x = torch.randn(1, 3, s, s, generator=g)
        with torch.no_grad():
            inputs[f"x{s}"] = x
            outputs[f"y{s}"] = sam(x)
    w = {"model.sam_model." + k: v for k, v in sam.state_dict().items()}
    cfg = dict(img_size=256, patch_size=16, embed_dim=64, depth=3, num_heads=4, mlp_ratio=4.0,
               out_chans=256, window_size=14, global_attn_indexes=[1])
    save(out, "sam_small", w, inputs, outputs, cfg)


def case_clip(de, out):
    clip, cfg = small_clip(de)
    randomize(clip, 2)
    g = torch.Generator().manual_seed(12)
    inputs, outputs = {}, {}
    for b, s in ((1, 10), (2, 16), (1, 20)):
        x = torch.randn(b, 64, s, s, generator=g)
        with torch.no_grad():
            inputs[f"x{s}"] = x
            outputs[f"y{s}"] = clip(torch.zeros(b, 3, 1, 1), x)  # only .shape[0] is read
    w = {"model.vision_model." + k: v for k, v in clip.state_dict().items()}
    save(out, "clip_small", w, inputs, outputs, cfg)


def decode_steps(model, ids, steps, **prefill_kw):
    """Prefill then greedy single-token steps with the cache; returns (prefill_out, step logits, tokens)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                    output_hidden_states=True, return_dict=True, **prefill_kw)
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        n = ids.shape[1]
        step_logits, toks = [], []
        for i in range(steps):
            toks.append(tok)
            o = model(input_ids=tok, attention_mask=torch.ones(1, n + i + 1, dtype=torch.long),
                      past_key_values=past, use_cache=True, return_dict=True)
            past = o.past_key_values
            step_logits.append(o.logits[:, -1])
            tok = o.logits[:, -1].argmax(-1, keepdim=True)
    return out, torch.cat(step_logits, 0), torch.cat(toks, 1)


def case_decoder(v2, cfgmod, out, case, lang, seed, seq=9, steps=3):
    config = cfgmod.DeepseekV2Config(**lang)
    config._attn_implementation = "eager"
    model = v2.DeepseekV2ForCausalLM(config).eval()
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(0, lang["vocab_size"], (1, seq), generator=g)
    res, step_logits, toks = decode_steps(model, ids, steps)
    outputs = {"logits": res.logits[0], "step_logits": step_logits}
    for i, h in enumerate(res.hidden_states):
        outputs[f"hidden.{i}"] = h[0]
    save(out, case, model.state_dict(), {"ids": ids, "step_tokens": toks}, outputs, lang)


def case_ocr(de, v2, cfgmod, ocr, out):
    # Small vision towers: the real code hard-codes build_sam_vit_b()/build_clip_l(); swap
    # them for small ones of the same classes (CLIP must stay 1024 wide: net_3 gives 1024).
    ocr.build_sam_vit_b = lambda: small_sam(de, img_size=256, embed_dim=64, depth=2, global_idx=(1,))
    clip_cfg = {}

    def build_clip():
        m, c = small_clip(de, hidden=1024, layers=1, heads=16, ffn=256)
        clip_cfg.update(c)
        return m

    ocr.build_clip_l = build_clip
    lang = dict(vocab_size=300, hidden_size=1280, intermediate_size=256, moe_intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, n_shared_experts=2,
                n_routed_experts=8, num_experts_per_tok=3, topk_method="greedy", n_group=1, topk_group=1,
                first_k_dense_replace=1, use_mla=False, kv_lora_rank=None, q_lora_rank=None,
                qk_rope_head_dim=0, qk_nope_head_dim=0, v_head_dim=0, bos_token_id=0, eos_token_id=1,
                max_position_embeddings=512)
    config = ocr.DeepseekOCRConfig(**lang)
    config._attn_implementation = "eager"
    model = ocr.DeepseekOCRForCausalLM(config).eval()
    randomize(model, 4)
    g = torch.Generator().manual_seed(14)
    image_token = 7
    # Global 256 px -> 4x4 features: 4*(4+1) + 1 = 21 rows; tiles of 128 px -> 2x2 each,
    # 3 wide x 2 high -> 4 rows of 3*2+1 = 7: 28 rows. 49 image tokens in all.
    wc, hc = 3, 2
    n_img = 4 * 5 + 1 + (hc * 2) * (wc * 2 + 1)
    pre = torch.randint(10, 300, (5,), generator=g)
    post = torch.randint(10, 300, (4,), generator=g)
    ids = torch.cat([pre, torch.full((n_img,), image_token), post]).unsqueeze(0)
    mask = ids == image_token
    glob = torch.randn(1, 3, 256, 256, generator=g)
    tiles = torch.randn(wc * hc, 3, 128, 128, generator=g)
    images = [(tiles, glob)]
    crop = torch.tensor([[wc, hc]])
    res, step_logits, toks = decode_steps(model, ids, 2, images=images, images_seq_mask=mask,
                                          images_spatial_crop=crop)
    outputs = {"logits": res.logits[0], "step_logits": step_logits}
    for i, h in enumerate(res.hidden_states):
        outputs[f"hidden.{i}"] = h[0]
    with torch.no_grad():
        outputs["global_view"] = model.model.projector(torch.cat(
            (model.model.vision_model(glob, model.model.sam_model(glob))[:, 1:],
             model.model.sam_model(glob).flatten(2).permute(0, 2, 1)), dim=-1))
    # The global view alone (all-zero tiles: `torch.sum(patches) == 0`): 21 image tokens.
    ids2 = torch.cat([pre, torch.full((4 * 5 + 1,), image_token), post]).unsqueeze(0)
    mask2 = ids2 == image_token
    with torch.no_grad():
        res2 = model(input_ids=ids2, images=[(torch.zeros(1, 3, 128, 128), glob)],
                     images_seq_mask=mask2, images_spatial_crop=torch.tensor([[1, 1]]),
                     return_dict=True)
    outputs["global_only_logits"] = res2.logits[0]
    inputs = {"ids": ids, "mask": mask.to(torch.uint8), "global": glob, "tiles": tiles,
              "crop": crop, "step_tokens": toks, "global_only_ids": ids2,
              "global_only_mask": mask2.to(torch.uint8)}
    cfg = {"language": lang, "clip": clip_cfg, "image_token": image_token,
           "sam": dict(img_size=256, embed_dim=64, depth=2, num_heads=4, global_attn_indexes=[1])}
    save(out, "ocr_e2e_mha", model.state_dict(), inputs, outputs, cfg)


def case_real_vision(de, out):
    """The real builders at a real view size (640 px: grid 40, windows padded to 42, SAM's
    positions 64 -> 40, CLIP's 16 -> 10)."""
    sam = de.build_sam_vit_b().eval()
    randomize(sam, 7)
    clip = de.build_clip_l().eval()
    randomize(clip, 8)
    g = torch.Generator().manual_seed(17)
    x = torch.randn(1, 3, 640, 640, generator=g)
    with torch.no_grad():
        f1 = sam(x)
        f2 = clip(x, f1)
    w = {"model.sam_model." + k: v for k, v in sam.state_dict().items()}
    w.update({"model.vision_model." + k: v for k, v in clip.state_dict().items()})
    save(out, "vision_real", w, {"x": x}, {"sam": f1, "clip": f2}, {})


def main():
    upstream, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    torch.set_grad_enabled(False)
    de, v2, cfgmod, ocr = import_upstream(upstream)
    if "--real-vision" in sys.argv[3:]:
        case_real_vision(de, out)
        return
    case_sam(de, out)
    case_clip(de, out)
    mla_common = dict(vocab_size=200, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_hidden_layers=4, num_attention_heads=4, use_mla=True, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                      num_experts_per_tok=3, max_position_embeddings=512)
    # MLA with q LoRA; group-limited top-k; normalised, scaled weights; MoE every 2nd layer.
    case_decoder(v2, cfgmod, out, "decoder_mla_group", dict(
        mla_common, q_lora_rank=48, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, moe_layer_freq=2,
        n_shared_experts=1), seed=5)
    # MLA with a plain q_proj; DeepSeek-V3's noaux_tc routing with sigmoid scores.
    case_decoder(v2, cfgmod, out, "decoder_mla_noaux", dict(
        mla_common, q_lora_rank=None, topk_method="noaux_tc", scoring_func="sigmoid", n_group=2,
        topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5, first_k_dense_replace=0,
        n_shared_experts=None), seed=6)
    case_ocr(de, v2, cfgmod, ocr, out)


if __name__ == "__main__":
    main()
