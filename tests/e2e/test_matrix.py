"""End-to-end matrix: the fixture model on each transformers release, unpatched and patched.

* reference: unpatched on 4.46.3 (in each environment) loads, runs and generates 8 tokens.
* unpatched: on every other release it fails where ../shared/docs/breakages.md says.
* patched: after `ocr-patch apply` on the hub cache it loads without any harness help
  (no `.cuda()` no-op), its forward logits are within 1e-5 of 4.46.3's (same torch) and its
  8 greedy tokens are identical.

Each runs on the fixture as shipped (`mha`: use_mla false, like the real model, so the decoder
runs transformers' LlamaAttention) and, on the releases of support.mla_versions(), on its `mla`
variant (use_mla true: the remote DeepseekV2Attention with its own RoPE, rules G-usable and N).
"""
import pytest

import e2e_support as support
from conftest import all_envs
from expectations import describe, matches, predict

VERSIONS = support.versions()
MLA_VERSIONS = support.mla_versions()
# (version, attention variant): every release with MHA, a few with MLA.
CASES = [pytest.param(v, "mha", id=f"{v}-mha") for v in VERSIONS] + [
    pytest.param(v, "mla", id=f"{v}-mla") for v in MLA_VERSIONS
]
LOGITS_ATOL = 1e-5
# torch 2.6 and torch 2.11 differ in float rounding; the two 4.46.3 references agree to ~5e-6.
CROSS_TORCH_ATOL = 1e-4


def reference(run_model, version, attn="mha"):
    """The 4.46.3 run (same attention variant) in the environment that runs `version`."""
    return run_model(support.REFERENCE, "reference", env=support.env_for(version), attn=attn)


@pytest.mark.parametrize("attn", support.ATTENTION_VARIANTS)
@pytest.mark.parametrize("env_name", ["base", "new"])
def test_reference_runs(run_model, env_name, attn):
    """Unpatched 4.46.3 runs the fixture: finite logits and 8 new tokens, not all the same."""
    env = {e.name: e for e in all_envs()}[env_name]
    run = run_model(support.REFERENCE, "reference", env=env, attn=attn)
    assert run.first_failure is None, run.log
    assert run.data["logits_finite"], "reference logits are not finite"
    tokens = run.data["tokens"]
    assert len(tokens) == 8 and len(set(tokens)) > 2, f"degenerate generation {tokens}"


@pytest.mark.parametrize("attn", support.ATTENTION_VARIANTS)
def test_reference_environments_agree(run_model, attn):
    """The 4.46.3 references under torch 2.6 and the newer torch agree."""
    base, new = (run_model(support.REFERENCE, "reference", env=e, attn=attn) for e in all_envs())
    diff = support.max_abs_diff(base.logits(), new.logits())
    assert diff <= CROSS_TORCH_ATOL, f"max |logit difference| {diff:.3g}"
    assert base.data["tokens"] == new.data["tokens"]


def test_reference_needs_device_aware_code(run_model):
    """Without the harness's `.cuda()` no-op, unpatched 4.46.3 fails on a CPU-only machine."""
    run = run_model(support.REFERENCE, "no-cuda-noop")
    if run.data.get("cuda_available"):
        pytest.skip("a GPU is visible: .cuda() works")
    failure = run.first_failure
    assert failure is not None and failure["stage"] == "forward", run.summary()
    assert "NVIDIA" in failure["message"] or "CUDA" in failure["message"], run.summary()


@pytest.mark.parametrize("version,attn", CASES)
@pytest.mark.parametrize("mode", ["plain", "shims"])
def test_unpatched_breaks_as_predicted(run_model, version, attn, mode):
    """The unpatched fixture fails (or runs) exactly as breakages.md predicts."""
    run = run_model(version, "reference" if version == support.REFERENCE else mode, attn=attn)
    expected = predict(version, mode, attn)
    assert any(matches(o, run.first_failure) for o in expected), (
        f"transformers {version} ({mode}, {attn}): expected {describe(expected)}, got {run.summary()}\n{run.log}"
    )


@pytest.mark.parametrize("version,attn", [c for c in CASES if c.values[0] != support.REFERENCE
                                          and support.version_tuple(c.values[0]) < (4, 48, 0)])
def test_unpatched_old_releases_match_reference(run_model, version, attn):
    """Releases that run the original unchanged give the reference's logits and tokens."""
    run, ref = run_model(version, "plain", attn=attn), reference(run_model, version, attn)
    assert support.max_abs_diff(run.logits(), ref.logits()) <= LOGITS_ATOL
    assert run.data["tokens"] == ref.data["tokens"]


@pytest.fixture(scope="module")
def patcher():
    """Skips patched tests, with the reason, until `ocr-patch apply` and the lock exist."""
    reason = support.patcher_missing_reason()
    if reason:
        pytest.skip(f"patched runs need ocr-patch apply: {reason}")


@pytest.mark.parametrize("version,attn", CASES)
def test_patched_matches_reference(patcher, run_model, version, attn):
    """Patched: loads, logits within 1e-5 of 4.46.3, identical 8 greedy tokens, saves."""
    run, ref = run_model(version, "patched", attn=attn), reference(run_model, version, attn)
    assert run.ok_through("generate"), f"{run.summary()}\n{run.log}"
    diff = support.max_abs_diff(run.logits(), ref.logits())
    assert diff <= LOGITS_ATOL, f"transformers {version} ({attn}): max |logit difference| {diff:.3g} vs 4.46.3"
    assert run.data["tokens"] == ref.data["tokens"], (run.data["tokens"], ref.data["tokens"])
    assert run.stage("save") == "ok", f"save_pretrained (breakage O): {run.stage('save')}"
