# --- ocr-patch prelude (begin): compatibility helpers written by ocr-patch ---
# Each helper keeps the original behaviour where the installed transformers still has the old
# API (so 4.46.3 runs exactly as before) and uses the new API where it does not. The rule ids
# (A..V) are those of ocr-patch's breakage table.
import inspect as _ocrp_inspect

import torch as _ocrp_torch
import transformers as _ocrp_transformers
from transformers.generation import GenerationMixin as _OcrpGenerationMixin

_OCRP_TRANSFORMERS_MAJOR = int(_ocrp_transformers.__version__.split(".")[0])
_OCRP_FORWARD_PARAMS = {}


def _ocrp_forward_params(module):
    """The parameters the installed forward of this module's class declares (cached per class)."""
    cls = type(module)
    params = _OCRP_FORWARD_PARAMS.get(cls)
    if params is None:
        params = _ocrp_inspect.signature(cls.forward).parameters
        _OCRP_FORWARD_PARAMS[cls] = params
    return params


def _ocrp_rope_theta(config):
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict):
            theta = params.get("rope_theta")
    return float(theta) if theta is not None else 10000.0


def _ocrp_rope(attn, hidden_states, position_ids):
    """C: (cos, sin) as transformers' default LlamaRotaryEmbedding computed them in 4.46."""
    config = attn.config
    dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
    device = hidden_states.device
    if position_ids is None:
        position_ids = _ocrp_torch.arange(hidden_states.shape[1], device=device).unsqueeze(0)
    exponent = _ocrp_torch.arange(0, dim, 2, dtype=_ocrp_torch.int64).to(device=device, dtype=_ocrp_torch.float) / dim
    inv_freq = 1.0 / (_ocrp_rope_theta(config) ** exponent)
    inv_freq = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    device_type = device.type if isinstance(device.type, str) and device.type != "mps" else "cpu"
    with _ocrp_torch.autocast(device_type=device_type, enabled=False):
        freqs = (inv_freq.float() @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = _ocrp_torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
    return cos.to(dtype=hidden_states.dtype), sin.to(dtype=hidden_states.dtype)


def _ocrp_attention(attn):
    """C, K, T: call `attn` with the arguments its installed forward declares.

    4.48 made transformers' LlamaAttention take `position_embeddings` and return two values;
    5.0 renamed the cache argument `past_key_values` (a `past_key_value=` is then silently
    ignored) and 5.24 `cache`. Where the old signature is installed the call is unchanged.
    """
    params = _ocrp_forward_params(attn)

    def call(hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
             output_attentions=False, use_cache=False, **kwargs):
        args = dict(kwargs)
        args["hidden_states"] = hidden_states
        args["attention_mask"] = attention_mask
        for name, value in (("position_ids", position_ids), ("output_attentions", output_attentions),
                            ("use_cache", use_cache)):
            if name in params:
                args[name] = value
        cache_name = next((n for n in ("past_key_value", "past_key_values", "cache") if n in params),
                          "past_key_value")
        args[cache_name] = past_key_value
        # Up to 4.47 the attention owned a rotary_emb and computed (cos, sin) itself.
        if "position_embeddings" in params and getattr(attn, "rotary_emb", None) is None:
            args["position_embeddings"] = _ocrp_rope(attn, hidden_states, position_ids)
        out = attn(**args)
        if len(out) == 2:
            return out[0], out[1], past_key_value
        return out

    return call


def _ocrp_usable_length(cache, new_seq_length, layer_idx=0):
    """G: Cache.get_usable_length left in 4.54; for a dynamic cache it is get_seq_length(layer)."""
    method = getattr(cache, "get_usable_length", None)
    if method is not None:
        return method(new_seq_length, layer_idx)
    return cache.get_seq_length(layer_idx)


def _ocrp_seen_tokens(cache):
    """G: Cache.seen_tokens left in 4.54; it counted what get_seq_length() counts."""
    if hasattr(type(cache), "seen_tokens") or "seen_tokens" in getattr(cache, "__dict__", {}):
        return cache.seen_tokens
    return cache.get_seq_length()


def _ocrp_cache_from_legacy(past_key_values):
    """J: DynamicCache.from_legacy_cache left in 5.0: start an empty DynamicCache instead."""
    from transformers.cache_utils import DynamicCache

    method = getattr(DynamicCache, "from_legacy_cache", None)
    if method is not None:
        return method(past_key_values)
    cache = DynamicCache()
    for layer_idx, (key, value) in enumerate(past_key_values or ()):
        cache.update(key, value, layer_idx)
    return cache


def _ocrp_cache_to_legacy(cache):
    """J: Cache.to_legacy_cache left in 5.0: keep the Cache object."""
    method = getattr(cache, "to_legacy_cache", None)
    return method() if method is not None else cache


def _ocrp_cache_kwarg(past_key_values, kwargs):
    """T: 5.24's generate passes the cache as `cache=`."""
    if past_key_values is None and "cache" in kwargs:
        return kwargs.pop("cache")
    return past_key_values


def _ocrp_trim_positions(position_ids, input_ids):
    """P: from 5.3 generate keeps full-length position_ids; keep those of the current input."""
    if position_ids is not None and input_ids is not None and position_ids.shape[-1] > input_ids.shape[-1]:
        return position_ids[:, -input_ids.shape[-1]:]
    return position_ids


def _ocrp_prepare_4d_causal_attention_mask(attention_mask, input_shape, inputs_embeds,
                                           past_key_values_length, sliding_window=None):
    """T: the 4D additive causal mask of transformers' AttentionMaskConverter (4.46), for
    releases without transformers.modeling_attn_mask_utils."""
    batch_size, query_length = input_shape[0], input_shape[-1]
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    key_length = query_length + past_key_values_length
    lowest = _ocrp_torch.finfo(dtype).min
    causal = None
    if query_length > 1 or sliding_window is not None:
        causal = _ocrp_torch.full((query_length, key_length), lowest, dtype=dtype, device=device)
        causal = _ocrp_torch.triu(causal, diagonal=past_key_values_length + 1)
        if sliding_window is not None:
            band = _ocrp_torch.ones((query_length, key_length), dtype=_ocrp_torch.bool, device=device)
            band = _ocrp_torch.tril(band, diagonal=past_key_values_length - sliding_window)
            causal = causal.masked_fill(band, lowest)
        causal = causal[None, None].expand(batch_size, 1, query_length, key_length)
    if attention_mask is None:
        return causal
    if attention_mask.dim() == 4:
        return attention_mask
    expanded = attention_mask[:, None, None, :].expand(batch_size, 1, query_length, key_length).to(dtype)
    inverted = 1.0 - expanded
    padding = inverted.masked_fill(inverted.to(_ocrp_torch.bool), lowest)
    if causal is None:
        return padding
    return padding.masked_fill(causal.bool(), lowest)


def _ocrp_flash_attn_ge_2_10():
    """R: is_flash_attn_greater_or_equal_2_10 left transformers.utils in 5.4."""
    try:
        from importlib.metadata import version
        from packaging.version import Version

        return Version(version("flash_attn")) >= Version("2.1.0")
    except Exception:
        return False


def _ocrp_is_initialised(module):
    """M: from 5.0, loaded tensors carry `_is_hf_initialized`; the remote _init_weights must not
    draw new values over them (it writes through .data, past transformers' init guards)."""
    if getattr(module, "_is_hf_initialized", False):
        return True
    return any(getattr(p, "_is_hf_initialized", False) for p in module.parameters(recurse=False))


def _ocrp_rope_refresh(rope):
    """N: 5.x leaves non-persistent buffers uninitialised after loading: recompute inv_freq
    (in the buffer's dtype, as loading used to leave it) before the first cos/sin cache."""
    if rope.max_seq_len_cached is None:
        exponent = _ocrp_torch.arange(0, rope.dim, 2).float().to(rope.inv_freq.device) / rope.dim
        rope.inv_freq = (1.0 / (rope.base ** exponent)).to(rope.inv_freq.dtype)


def _ocrp_rope_scaling(config):
    """V: 4.x keeps `rope_scaling` as the config gave it (None: no scaling). From 5.0 a config
    without one reads back as {"rope_type": "default", ...}, and a scaled one names its kind
    `rope_type` where the remote attention reads ["type"]. None when there is no scaling to
    apply; otherwise the dict, with "type" set."""
    scaling = getattr(config, "rope_scaling", None)
    if not isinstance(scaling, dict):
        return scaling
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default"):
        return None
    scaling.setdefault("type", kind)
    return scaling


def _ocrp_tied_weights_keys(keys):
    """O: 5.0 wants {tied parameter: source parameter}; 4.x a list of names."""
    if _OCRP_TRANSFORMERS_MAJOR >= 5:
        return {key: "model.embed_tokens.weight" for key in keys}
    return keys
# --- ocr-patch prelude (end) ---
