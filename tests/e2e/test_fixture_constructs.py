"""The fixture holds every construct the patch rules match, in the same syntactic places.

Each check walks Python's syntax tree (not text) and names the breakage it pins. The same
checks run on the real remote code when OCR_PATCH_UPSTREAM points at it (an ignored folder,
never committed), which proves that the fixture and the real files share each construct.
These tests need only the standard library.
"""
import ast
import os
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tinyocr"
UPSTREAM = os.environ.get("OCR_PATCH_UPSTREAM")


def sources():
    """(label, folder) pairs to check: always the fixture, the real code when available."""
    found = [("fixture", FIXTURE)]
    if UPSTREAM:
        found.append(("upstream", Path(UPSTREAM)))
    return found


def tree(folder, name):
    return ast.parse((folder / name).read_text(encoding="utf-8"))


def find_class(module, name):
    for node in ast.walk(module):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found")


def find_method(cls, name):
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{cls.name}.{name} not found")


def imported_names(module, from_module):
    """Names imported by `from <from_module> import ...` at any depth."""
    return {
        alias.name
        for node in ast.walk(module)
        if isinstance(node, ast.ImportFrom) and node.module == from_module
        for alias in node.names
    }


def attributes(node):
    """Attribute names used anywhere under `node`."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def calls_with_keyword(node, keyword):
    """Calls under `node` that pass `keyword=`."""
    return [
        n for n in ast.walk(node)
        if isinstance(n, ast.Call) and any(k.arg == keyword for k in n.keywords)
    ]


def param_names(func):
    return [a.arg for a in func.args.args] + ([func.args.kwarg.arg] if func.args.kwarg else [])


def v2(folder):
    return tree(folder, "modeling_deepseekv2.py")


def ocr(folder):
    return tree(folder, "modeling_deepseekocr.py")


def check_a(folder):
    m = v2(folder)
    assert {"LlamaAttention", "LlamaFlashAttention2"} <= imported_names(m, "transformers.models.llama.modeling_llama")
    table = next(
        n.value for n in m.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "ATTENTION_CLASSES"
    )
    entries = {k.value: getattr(v, "id", None) for k, v in zip(table.keys, table.values)}
    assert entries["mha_flash_attention_2"] == "LlamaFlashAttention2"
    assert entries["mha_eager"] == "LlamaAttention" and entries["mla_eager"] == "DeepseekV2Attention"


def check_b_i(folder):
    m = v2(folder)
    assert "is_torch_greater_or_equal_than_1_13" in imported_names(m, "transformers.pytorch_utils")
    assert "is_torch_fx_available" in imported_names(m, "transformers.utils.import_utils")
    guard = next(n for n in m.body if isinstance(n, ast.If) and "is_torch_fx_available" in ast.dump(n.test))
    assert "is_torch_greater_or_equal_than_1_13" in ast.dump(guard)
    assert "wrap" in attributes(guard)


def check_c_k(folder):
    layer = find_class(v2(folder), "DeepseekV2DecoderLayer")
    forward = find_method(layer, "forward")
    assert "past_key_value" in param_names(forward)
    assigns = [
        n for n in ast.walk(forward)
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
        and isinstance(n.value.func, ast.Attribute) and n.value.func.attr == "self_attn"
    ]
    assert len(assigns) == 1
    target, call = assigns[0].targets[0], assigns[0].value
    assert isinstance(target, ast.Tuple) and len(target.elts) == 3
    assert {"hidden_states", "attention_mask", "position_ids", "past_key_value"} <= {k.arg for k in call.keywords}
    model_forward = find_method(find_class(v2(folder), "DeepseekV2Model"), "forward")
    assert calls_with_keyword(model_forward, "past_key_value")


def check_d_g_p(folder):
    prep = find_method(find_class(ocr(folder), "DeepseekOCRForCausalLM"), "prepare_inputs_for_generation")
    assert param_names(prep) == ["self", "input_ids", "past_key_values", "attention_mask", "inputs_embeds", "kwargs"]
    assert {"seen_tokens", "get_max_length", "get_seq_length"} <= attributes(prep)
    source = ast.unparse(prep)
    assert "position_ids = kwargs.get('position_ids', None)" in source
    assert "if attention_mask is not None and position_ids is None:" in source
    assert "cache_position = torch.arange(" in source
    for key in ("images", "images_seq_mask", "images_spatial_crop"):
        assert f"'{key}': kwargs.get('{key}', None)" in source


def check_g_usable_length(folder):
    m = v2(folder)
    assert "get_usable_length" in attributes(find_method(find_class(m, "DeepseekV2Model"), "forward"))
    assert "get_usable_length" in attributes(find_method(find_class(m, "DeepseekV2Attention"), "forward"))
    assert "update" in attributes(find_method(find_class(m, "DeepseekV2Attention"), "forward"))


def check_e(folder):
    infer = find_method(find_class(ocr(folder), "DeepseekOCRForCausalLM"), "infer")
    nested = [n for n in ast.walk(infer) if isinstance(n, ast.Import)]
    assert any(a.name == "matplotlib.pyplot" for n in nested for a in n.names)


def check_f_s(folder):
    m = ocr(folder)
    cls = find_class(m, "DeepseekOCRForCausalLM")
    assert [b.id for b in cls.bases] == ["DeepseekV2ForCausalLM"]
    pre = find_class(v2(folder), "DeepseekV2PreTrainedModel")
    flags = {t.id for n in pre.body if isinstance(n, ast.Assign) for t in ast.walk(n) if isinstance(t, ast.Name)}
    assert {"_supports_flash_attn_2", "_supports_cache_class"} <= flags
    assert "_supports_flash_attn" not in flags


def check_j(folder):
    forward = find_method(find_class(v2(folder), "DeepseekV2Model"), "forward")
    assert {"from_legacy_cache", "to_legacy_cache"} <= attributes(forward)
    assert "use_legacy_cache = not isinstance(past_key_values, Cache)" in ast.unparse(forward)


def check_l(folder):
    emb = find_class(tree(folder, "deepencoder.py"), "CLIPVisionEmbeddings")
    init_src, fwd_src = ast.unparse(find_method(emb, "__init__")), ast.unparse(find_method(emb, "forward"))
    assert "self.register_buffer('position_ids', torch.arange(self.num_positions).expand((1, -1)))" in init_src
    assert "self.position_embedding(self.position_ids)" in fwd_src


def check_m(folder):
    init = find_method(find_class(v2(folder), "DeepseekV2PreTrainedModel"), "_init_weights")
    assert "module.weight.data.normal_(mean=0.0, std=std)" in ast.unparse(init)


def check_n(folder):
    rope = find_class(v2(folder), "DeepseekV2RotaryEmbedding")
    init = find_method(rope, "__init__")
    assert "self.register_buffer('inv_freq', inv_freq, persistent=False)" in ast.unparse(init)
    last = init.body[-1]
    assert ast.unparse(last) == "self.max_seq_len_cached = None"
    assert param_names(find_method(rope, "forward")) == ["self", "x", "seq_len"]
    find_method(rope, "_set_cos_sin_cache")


def check_o(folder):
    lm = find_class(v2(folder), "DeepseekV2ForCausalLM")
    tied = [n for n in lm.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_tied_weights_keys"]
    assert len(tied) == 1 and isinstance(tied[0].value, ast.List)


def check_q(folder):
    cfg = find_class(ocr(folder), "DeepseekOCRConfig")
    assert [b.id for b in cfg.bases] == ["DeepseekV2Config"]
    assert not any(isinstance(n, ast.FunctionDef) for n in cfg.body)
    assert any(isinstance(n, ast.Assign) and n.targets[0].id == "model_type" for n in cfg.body)


def check_r(folder):
    m = v2(folder)
    assert "is_flash_attn_greater_or_equal_2_10" in imported_names(m, "transformers.utils")
    init = find_method(find_class(m, "DeepseekV2FlashAttention2"), "__init__")
    assert "is_flash_attn_greater_or_equal_2_10()" in ast.unparse(init)


def check_t(folder):
    m = v2(folder)
    assert "_prepare_4d_causal_attention_mask" in imported_names(m, "transformers.modeling_attn_mask_utils")
    forward = find_method(find_class(m, "DeepseekV2Model"), "forward")
    calls = [
        n for n in ast.walk(forward)
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "_prepare_4d_causal_attention_mask"
    ]
    assert len(calls) == 1 and len(calls[0].args) == 4


def check_cuda(folder):
    forward = find_method(find_class(ocr(folder), "DeepseekOCRModel"), "forward")
    source = ast.unparse(forward)
    assert "inputs_embeds[idx].masked_scatter_(images_seq_mask[idx].unsqueeze(-1).cuda(), images_in_this_batch)" in source
    assert "super(DeepseekOCRModel, self).forward(" in source


def check_config_json(folder):
    import json

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling_deepseekocr.DeepseekOCRConfig",
        "AutoModel": "modeling_deepseekocr.DeepseekOCRForCausalLM",
    }
    assert config["use_mla"] is False and config["topk_method"] == "greedy"


CHECKS = {
    "A_flash_attention_import": check_a,
    "B_I_fx_block": check_b_i,
    "C_K_attention_call": check_c_k,
    "D_G_P_prepare_inputs": check_d_g_p,
    "G_usable_length": check_g_usable_length,
    "E_matplotlib_in_infer": check_e,
    "F_S_bases_and_flags": check_f_s,
    "J_legacy_cache": check_j,
    "L_clip_position_ids": check_l,
    "M_init_weights": check_m,
    "N_rope_buffer": check_n,
    "O_tied_weights_list": check_o,
    "Q_config_without_init": check_q,
    "R_flash_version_helper": check_r,
    "T_mask_helper": check_t,
    "cuda_hardcoded": check_cuda,
    "config_json": check_config_json,
}


@pytest.mark.parametrize("label,folder", sources(), ids=[label for label, _ in sources()])
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_construct(check, label, folder):
    CHECKS[check](folder)


def test_same_files_as_upstream():
    """The fixture has the real repo's code and config files, under the same names."""
    names = {p.name for p in FIXTURE.iterdir() if p.suffix in (".py", ".json")}
    assert names == {
        "modeling_deepseekocr.py", "modeling_deepseekv2.py", "deepencoder.py",
        "configuration_deepseek_v2.py", "conversation.py", "config.json",
    }


@pytest.mark.skipif(not UPSTREAM, reason="OCR_PATCH_UPSTREAM is not set")
def test_fixture_is_not_a_copy():
    """At most a handful of long lines (imports aside) equal a line of the real file."""
    for path in FIXTURE.glob("*.py"):
        upstream = {line.strip() for line in (Path(UPSTREAM) / path.name).read_text().splitlines()}
        same = [
            line.strip() for line in path.read_text().splitlines()
            if len(line.strip()) >= 40 and line.strip() in upstream
            and not line.strip().startswith(("from ", "import "))
        ]
        assert len(same) < 10, f"{path.name}: {len(same)} long lines equal upstream's: {same}"
