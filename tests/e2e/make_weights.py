"""Writes deterministic synthetic weights for a remote-code model folder.

    python make_weights.py <model folder with config.json + remote code> <out.safetensors>

Run with a transformers release on PYTHONPATH that runs the folder's code unchanged (4.46.3).
The model is built from its config only to learn tensor names and shapes; every value comes
from one torch.Generator seeded with 0, tensor by tensor in sorted-name order:

    norm weights          1 + 0.1 * N(0, 1)
    other 1-D tensors     0.05 * N(0, 1)     (biases, class/newline/separator embeddings)
    embed_tokens          N(0, 1)
    position tables       0.1 * N(0, 1)
    matrices and convs    N(0, 1) / sqrt(fan_in)

so activations keep their scale and greedy decoding does not collapse onto one token.
CLIP's `embeddings.position_ids` buffer is left out, as in the real checkpoint (breakage L).
"""
import math
import os
import sys
import tempfile

NORM_MARKERS = ("norm", "neck.1.", "neck.3.")


def is_norm_weight(name, shape):
    """LayerNorm / RMSNorm / LayerNorm2d scales."""
    return len(shape) == 1 and name.endswith("weight") and any(m in name for m in NORM_MARKERS)


def synth_tensor(torch, gen, name, shape):
    """The value for one tensor, drawn from `gen` (see the module docstring)."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if is_norm_weight(name, shape):
        return 1.0 + 0.1 * noise
    if len(shape) == 1:
        return 0.05 * noise
    if "embed_tokens" in name:
        return noise
    if "pos_embed" in name or "position_embedding" in name:
        return 0.1 * noise
    fan_in = math.prod(shape[1:])
    return noise / math.sqrt(fan_in)


def synth_state_dict(torch, model):
    """name -> tensor for every persistent tensor except CLIP's position_ids."""
    gen = torch.Generator().manual_seed(0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return {
        name: synth_tensor(torch, gen, name, shapes[name]).contiguous()
        for name in sorted(shapes)
        if not name.endswith("embeddings.position_ids")
    }


def main(folder, out):
    os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="ocrp-modules-"))
    import torch
    import transformers
    from safetensors.torch import save_file

    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = transformers.AutoModel.from_config(config, trust_remote_code=True)
    save_file(synth_state_dict(torch, model), out, metadata={"format": "pt"})
    print(f"{out}: {len(model.state_dict())} tensors in the model")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
