"""What ../shared/docs/breakages.md predicts for the fixture, per transformers release.

Two unpatched modes are predicted:

* `plain`: the remote code exactly as shipped (plus the harness's `.cuda()` no-op on CPU).
  Imports fail first, so this shows the first import-time break.
* `shims`: the same, with the removed names put back into transformers (A, B, I, R, T) by the
  child process, so the first *run-time* break shows.

A prediction is a list of allowed outcomes: None means "runs through generate", a tuple
(stage, exception type, message fragment, breakage id) means "fails there like this".
Releases between two tested ones that the breakage table does not pin get every outcome
the neighbours allow.

The attention variant matters only before 5.0 with the shims: MHA runs transformers'
LlamaAttention, which breaks first (C, 4.48); MLA runs the remote DeepseekV2Attention, so
the run goes on to generate and meets D (4.49) or G (4.54) in prepare_inputs_for_generation.
From 5.0 the vision tower (L) or the config (Q) fails before any attention runs; with MLA the
remote attention's constructor may fail first (V: 5.x reads a missing rope_scaling back as
{"rope_type": "default"}, and the attention looks up its "type").
"""
from e2e_support import version_tuple

OK = None

A_IMPORT = ("load", "ImportError", "LlamaFlashAttention2", "A")
T_MODULE = ("load", "ModuleNotFoundError", "transformers.modeling_attn_mask_utils", "T")
C_ROPE = ("forward", "TypeError", "position_embeddings", "C")
L_POSITION_IDS = ("forward", "IndexError", "index out of range", "L")
Q_CONFIG = ("load", "AttributeError", "pad_token_id", "Q")
D_MAX_LENGTH = ("generate", "AttributeError", "get_max_length", "D")
G_SEEN_TOKENS = ("generate", "AttributeError", "seen_tokens", "G")
V_ROPE_SCALING = ("load", "KeyError", "'type'", "V")


def predict(version, mode, attn="mha"):
    """Allowed outcomes of an unpatched run of `version` in `mode` ('plain' or 'shims'), with
    the fixture's attention variant `attn` ('mha', as the real model, or 'mla')."""
    if attn not in ("mha", "mla"):
        raise ValueError(f"unknown attention variant {attn}")
    v = version_tuple(version)
    if v < (4, 48, 0):
        return [OK]  # 4.46.3 is the reference; 4.47.x runs the original unchanged
    if mode == "plain":
        if v < (5, 5, 0):
            return [A_IMPORT]
        if v < (5, 24, 0):
            return [A_IMPORT, T_MODULE]  # T was first seen at 5.24.0; 5.5 still had the module
        return [T_MODULE]
    if mode == "shims":
        if v < (5, 0, 0) and attn == "mha":
            return [C_ROPE]
        if v < (4, 49, 0):
            return [OK]  # MLA: the remote attention needs nothing 4.48 removed
        if v < (4, 54, 0):
            return [D_MAX_LENGTH]
        if v < (5, 0, 0):
            return [G_SEEN_TOKENS]
        extra = [V_ROPE_SCALING] if attn == "mla" else []
        if v < (5, 4, 0):
            return [L_POSITION_IDS, *extra]  # the vision tower runs before the decoder's J and C
        return [Q_CONFIG, *extra]
    raise ValueError(f"unknown mode {mode}")


def matches(outcome, failure):
    """Whether a child's first failure (dict or None) is the predicted outcome."""
    if outcome is OK:
        return failure is None
    stage, exc_type, fragment, _ = outcome
    return (
        failure is not None
        and failure["stage"] == stage
        and failure["type"] == exc_type
        and fragment in failure["message"]
    )


def describe(outcomes):
    """Human-readable list of predictions, for assertion messages and the report."""
    parts = []
    for outcome in outcomes:
        if outcome is OK:
            parts.append("runs")
        else:
            stage, exc_type, fragment, breakage = outcome
            parts.append(f"{breakage}: {stage} {exc_type} '{fragment}'")
    return " or ".join(parts)


def breakage_of(failure, version, mode, attn="mha"):
    """The breakage id a failure corresponds to, or '?' when it was not predicted."""
    for outcome in predict(version, mode, attn):
        if outcome is not OK and matches(outcome, failure):
            return outcome[3]
    return "?"
