"""Derive the reduced synthetic configs in golden/configs/ from the Hub's config.json.

Our own script. The real config is never copied into the project: `real` always means
../shared/data/deepseek-ocr/config.json (beside the checkout). The reduced configs keep every
field the remote code reads, the full vision tower (its sizes are hard-coded in deepencoder.py)
and hidden_size 1280 (hard-coded n_embed), and shrink the language model. Each override is
applied both at the top level (what DeepseekOCRConfig reads) and in `language_config` (kept
consistent for readers of the file).

    python golden/make_configs.py [path/to/config.json]
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(HERE, "..", "..", "shared", "data", "deepseek-ocr", "config.json")

# 2-layer decoder: layer 0 dense, layer 1 MoE (8 experts, top-2, 2 shared), vocab 1024.
CPU = {
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 2,
    "vocab_size": 1024,
}

VARIANTS = {
    "cpu": dict(CPU),
    # Multi-head latent attention: q LoRA, kv LoRA latent, decoupled RoPE part.
    "mla": dict(
        CPU,
        use_mla=True,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
    ),
    # Group-limited top-k: 8 experts in 4 groups, keep the best 2 groups, top-2 inside them;
    # normalised top-k weights with a routed scaling factor (both read by MoEGate).
    "group": dict(
        CPU,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.0,
    ),
}


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else REAL
    with open(src) as f:
        real = json.load(f)
    for name, over in VARIANTS.items():
        cfg = json.loads(json.dumps(real))
        cfg["_name_or_path"] = f"ocr-patch/synthetic-{name}"
        cfg.update(over)
        cfg["language_config"].update(over)
        out = os.path.join(HERE, "configs", f"{name}.json")
        with open(out, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        print(out)


if __name__ == "__main__":
    main()
