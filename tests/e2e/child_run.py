"""One end-to-end run of a DeepSeek-OCR-shaped remote-code model on one transformers release.

Run by the e2e suite in a child process, with the release first on PYTHONPATH and HF_HOME
pointing at a hub-cache layout (HF_HUB_OFFLINE=1). It loads the model through AutoModel with
trust_remote_code, runs one forward and one greedy generation with fixed inputs, tries
save_pretrained, and writes:

    <out>/result.json   versions, each stage's outcome, the first failure, generated tokens
    <out>/logits.npy    forward logits, float32, shape (1, seq, vocab)

A failing stage is recorded, never raised: the suite compares outcomes with predictions.

Options that change the environment, never the remote code's files:
    --cuda-noop     make Tensor.cuda() return the tensor itself (the unpatched remote code
                    hard-codes .cuda(); CPU reference runs need this; patched runs must not)
    --import-shims  put back the names transformers removed (breaks A, B, I, R, T), to see
                    which break comes next at run time
"""
import argparse
import json
import os
import sys
import tempfile
import traceback
import types

STAGES = ("import", "load", "forward", "generate", "save")


def parse_args(argv=None):
    """Command line of the child."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default="ocrpatch/tiny-ocr", help="hub repo id in HF_HOME/hub")
    p.add_argument("--out", required=True, help="folder for result.json and logits.npy")
    p.add_argument("--global-size", type=int, default=256, help="global view side in pixels")
    p.add_argument("--crop-size", type=int, default=128, help="tile side in pixels")
    p.add_argument("--crops", default="2x1", help="tiles as WxH, or 0 for global view only")
    p.add_argument("--image-token", type=int, default=100, help="token id of <image>")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--cuda-noop", action="store_true")
    p.add_argument("--import-shims", action="store_true")
    return p.parse_args(argv)


def version_tuple(text):
    """'4.46.3' or '5.0.0.dev0' -> (4, 46, 3)."""
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def install_cuda_noop(torch):
    """Lets `.cuda()` in the remote code run on a machine without a GPU."""
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self


def causal_mask_4d(attention_mask, input_shape, inputs_embeds, past_key_values_length):
    """Stand-in for transformers' removed `_prepare_4d_causal_attention_mask` (eager path)."""
    import torch

    bsz, q_len = input_shape
    kv_len = q_len + past_key_values_length
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    low = torch.finfo(dtype).min
    q_pos = torch.arange(q_len, device=device)[:, None] + past_key_values_length
    allowed = torch.arange(kv_len, device=device)[None, :] <= q_pos
    if attention_mask is not None:
        allowed = allowed[None, :, :] & attention_mask[:, None, :kv_len].bool()
    else:
        allowed = allowed[None].expand(bsz, q_len, kv_len)
    mask = torch.zeros(bsz, 1, q_len, kv_len, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], low)


def install_import_shims():
    """Puts back names removed from transformers (A, B, I, R, T); returns what was added."""
    import importlib

    added = []

    def ensure(module_name, attr, value):
        module = importlib.import_module(module_name)
        if not hasattr(module, attr):
            setattr(module, attr, value)
            added.append(f"{module_name}.{attr}")

    llama = importlib.import_module("transformers.models.llama.modeling_llama")
    ensure("transformers.models.llama.modeling_llama", "LlamaFlashAttention2", llama.LlamaAttention)
    ensure("transformers.pytorch_utils", "is_torch_greater_or_equal_than_1_13", True)
    ensure("transformers.utils", "is_flash_attn_greater_or_equal_2_10", lambda: False)
    ensure("transformers.utils.import_utils", "is_torch_fx_available", lambda: False)
    try:
        importlib.import_module("transformers.modeling_attn_mask_utils")
    except ImportError:
        shim = types.ModuleType("transformers.modeling_attn_mask_utils")
        shim._prepare_4d_causal_attention_mask = causal_mask_4d
        sys.modules[shim.__name__] = shim
        added.append(shim.__name__)
    return added


def image_layout(args):
    """Tokens per view: the encoder maps a side of S pixels to S // 64 tokens per row."""
    side = args.global_size // 64
    crops = (0, 0) if args.crops == "0" else tuple(int(n) for n in args.crops.split("x"))
    count = side * (side + 1) + 1  # global rows with newlines, then the view separator
    if crops[0]:
        side2 = args.crop_size // 64
        count += (crops[1] * side2) * (crops[0] * side2 + 1)
    return crops, count


def pixels(torch, shape, phase):
    """Deterministic image-like values in [-0.5, 0.5] that do not depend on any RNG."""
    n = 1
    for dim in shape:
        n *= dim
    ramp = torch.arange(n, dtype=torch.float64)
    return (0.5 * torch.sin(ramp * 0.0137 + phase)).to(torch.float32).reshape(shape)


def make_inputs(torch, args):
    """input_ids, images, images_seq_mask and images_spatial_crop, as infer() builds them."""
    crops, count = image_layout(args)
    ids = [0, 10, 11, 12, 13, 14] + [args.image_token] * count + [20, 21, 22, 23]
    input_ids = torch.tensor([ids], dtype=torch.long)
    images_seq_mask = input_ids == args.image_token
    n_tiles = crops[0] * crops[1]
    if n_tiles:
        patches = pixels(torch, (n_tiles, 3, args.crop_size, args.crop_size), 0.3)
        spatial = torch.tensor([[crops[0], crops[1]]], dtype=torch.long)
    else:
        patches = torch.zeros((1, 3, args.crop_size, args.crop_size))
        spatial = torch.tensor([[1, 1]], dtype=torch.long)
    global_view = pixels(torch, (1, 3, args.global_size, args.global_size), 1.1)
    return {
        "input_ids": input_ids,
        "images": [(patches, global_view)],
        "images_seq_mask": images_seq_mask,
        "images_spatial_crop": spatial,
    }


def describe(exc):
    """A short, stable description of an exception for result.json."""
    message = str(exc).strip().splitlines()
    return {
        "type": type(exc).__name__,
        "message": (message[0] if message else "")[:500],
        "traceback": traceback.format_exc()[-3000:],
    }


def load_model(transformers, torch, repo):
    """AutoModel with trust_remote_code, float32; `dtype=` where `torch_dtype` is deprecated."""
    key = "dtype" if version_tuple(transformers.__version__) >= (4, 56, 0) else "torch_dtype"
    model = transformers.AutoModel.from_pretrained(repo, trust_remote_code=True, **{key: torch.float32})
    return model.eval()


def run(args):
    """Runs the stages in order, stopping at the first failure; returns the result dict."""
    result = {"stages": {}, "first_failure": None, "tokens": None, "shims": []}
    state = {}

    def stage_import():
        import numpy  # noqa: F401  (needed to write the logits)
        import torch
        import transformers

        state.update(torch=torch, transformers=transformers)
        result["transformers"] = transformers.__version__
        result["torch"] = torch.__version__
        result["cuda_available"] = bool(torch.cuda.is_available())
        result["transformers_path"] = os.path.dirname(transformers.__file__)
        torch.manual_seed(0)
        if args.cuda_noop:
            install_cuda_noop(torch)
        if args.import_shims:
            result["shims"] = install_import_shims()

    def stage_load():
        state["model"] = load_model(state["transformers"], state["torch"], args.repo)
        state["inputs"] = make_inputs(state["torch"], args)

    def stage_forward():
        import numpy as np

        torch = state["torch"]
        with torch.no_grad():
            out = state["model"](**state["inputs"], use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        logits = logits.detach().to(torch.float32).cpu().numpy()
        np.save(os.path.join(args.out, "logits.npy"), logits)
        result["logits_shape"] = list(logits.shape)
        result["logits_finite"] = bool(np.isfinite(logits).all())

    def stage_generate():
        torch = state["torch"]
        inputs = state["inputs"]
        with torch.no_grad():
            output_ids = state["model"].generate(
                **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True
            )
        prompt_len = inputs["input_ids"].shape[1]
        result["tokens"] = output_ids[0, prompt_len:].tolist()

    def stage_save():
        with tempfile.TemporaryDirectory() as tmp:
            state["model"].save_pretrained(tmp)

    steps = dict(zip(STAGES, (stage_import, stage_load, stage_forward, stage_generate, stage_save)))
    for name in STAGES:
        try:
            steps[name]()
        except BaseException as exc:  # noqa: BLE001  (record everything, including SystemExit)
            failure = dict(stage=name, **describe(exc))
            result["stages"][name] = failure
            # A failed save does not stop the comparison; anything earlier does.
            if result["first_failure"] is None:
                result["first_failure"] = failure
            if name != "save":
                break
        else:
            result["stages"][name] = "ok"
    return result


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    result = run(args)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
