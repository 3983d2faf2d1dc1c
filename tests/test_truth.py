"""The truth test: an instrumented model computes exactly what the uninstrumented model computes."""

from __future__ import annotations

import pytest
import torch

from expertlens import ExpertModel, resolve_family
from expertlens import instrument as _experts
from expertlens.checks import ValidationError, check_model, check_truth
from expertlens.testing import tiny_model, tiny_tokenizer

from .conftest import ALL_FAMILIES

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_shipped_table_passes_the_truth_test(family, dtype):
    model = ExpertModel(tiny_model(family, dtype=dtype), tiny_tokenizer())  # runs check_truth on wrap
    # measured: every shipped table is bit-identical in bf16 too, so hold it to that
    check_truth(model, tolerance=0.0)
    check_truth(model, torch.tensor([[5, 9, 11, 40], [7, 7, 8, 99]]), tolerance=0.0)


WRONG_TABLES = [
    ("qwen2_moe", dict(shared_gate=None)),
    ("qwen2_moe", dict(shared=None, shared_gate=None)),
    ("qwen3_next", dict(shared_gate=None)),
    ("deepseek_v3", dict(shared=None)),
    ("glm4_moe", dict(shared=None)),
    ("hunyuan_v1_moe", dict(shared=None)),
    ("ernie4_5_moe", dict(shared=None)),
]


def _assert_clean(hf, classes):
    assert not _experts.is_installed(hf)
    assert [type(m) for m in hf.modules()] == classes
    assert not any(n.startswith("el_") or ".el_" in n for n, _ in hf.named_modules())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,change", WRONG_TABLES, ids=[f"{f}-{'-'.join(c)}" for f, c in WRONG_TABLES])
def test_a_table_dropping_the_shared_expert_or_its_gate_is_refused(family, change, dtype):
    hf = tiny_model(family, dtype=dtype)
    classes = [type(m) for m in hf.modules()]
    bad = resolve_family(family).with_(**change)
    with pytest.raises(ValidationError, match=r"layer \d+: the MoE block output differs .* max\|Δ\| = "):
        ExpertModel(hf, tiny_tokenizer(), family=bad)
    _assert_clean(hf, classes)  # a refused wrap leaves the model as it was


def _scaled_blocks(hf, spec, factor):
    """Give every MoE block a forward that scales its output, as e.g. a block applying a routed
    scaling factor itself would; the generic block forward does not know about it."""
    for layer in spec.layer_list(hf):
        block = spec.moe_block(layer)
        if block is None:
            continue
        base = type(block)
        block.__class__ = type(f"Scaled{base.__name__}", (base,), {
            "forward": lambda self, x, *a, _b=base, **k: _b.forward(self, x, *a, **k) * factor,
        })


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3", "qwen2_moe"])
def test_a_block_scaling_the_table_does_not_know_about_is_refused(family):
    hf = tiny_model(family)
    spec = resolve_family(family)
    _scaled_blocks(hf, spec, 2.5)
    model = ExpertModel(hf, tiny_tokenizer(), validate=False)
    check_model(model)  # the points agree with each other: the old check cannot see it
    with pytest.raises(ValidationError, match=r"layer \d+: the MoE block output differs"):
        check_truth(model)
    model.restore()
    with pytest.raises(ValidationError, match="does not reproduce this model's MoE block"):
        ExpertModel(hf, tiny_tokenizer())


def test_truth_test_refuses_a_model_with_edits_and_a_restored_model():
    model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
    h = model.add_edit("resid_pre", lambda x, ctx: x * 0, layer=1)
    with pytest.raises(ValueError, match=r"1 edit\(s\) are registered; remove them"):
        check_truth(model)
    h.remove()
    check_truth(model)
    with pytest.raises(ValueError, match=r"input_ids must be a \[batch, pos\] integer tensor"):
        check_truth(model, torch.ones(2, 3))
    model.restore()
    with pytest.raises(ValueError, match="needs an instrumented model"):
        check_truth(model)


def test_validate_false_skips_the_truth_test():
    hf = tiny_model("qwen2_moe")
    model = ExpertModel(hf, tiny_tokenizer(), family=resolve_family("qwen2_moe").with_(shared_gate=None),
                        validate=False)
    assert _experts.is_installed(model.hf_model)


# ---- points equal what the model computes: transforms after the unembedding ---------------------


def test_granitemoe_logits_scaling_is_in_the_logits_point_and_direct_attribution():
    from expertlens.attribution import LogitDiff, direct_attribution

    hf = tiny_model("granitemoe", logits_scaling=6.0)  # real Granite checkpoints use 6-16; the tiny default is 1
    model = ExpertModel(hf, tiny_tokenizer())  # the truth test includes the logits point
    assert model.logits_scale == pytest.approx(1 / 6) and model.logits_softcap is None
    ids = torch.tensor([[5, 9, 11, 40], [7, 7, 8, 99]])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        head = hf.lm_head(hf.model(input_ids=ids).last_hidden_state)
    assert torch.equal(ref, head / 6.0)  # hand computation of what the model returns
    with model.trace(ids):
        point = model.logits.save()
    assert torch.equal(point, ref)
    # writes and edits act on the returned logits
    h = model.add_edit("logits", lambda x, ctx: x + 1.0)
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, ref + 1.0)
    h.remove()
    with model.trace(ids):
        model.logits = torch.zeros_like(ref)
        out = model.output.save()
    assert out.logits.abs().max() == 0
    # direct attribution adds up to the logit difference the model computes (6x too large before)
    prompts = ["hello there", "a b c"]
    target = LogitDiff(["I", "S", "s"])
    table = direct_attribution(model, prompts, target)
    pos, neg = target.token_ids(model)
    with model.trace(prompts):
        logits = model.logits.save()
    expected = (logits[:, -1, pos].mean(-1) - logits[:, -1, neg].mean(-1)).mean().item()
    assert table.total == pytest.approx(expected, abs=1e-5)
    assert abs(table.sum() - expected) < 1e-4
    assert table.meta["frozen_norm_error"] < 1e-4


def test_an_unknown_transform_after_the_unembedding_is_caught_by_the_truth_test():
    hf = tiny_model("olmoe")
    base = type(hf)

    def forward(self, *args, **kwargs):  # a family that scales logits without a config field saying so
        out = base.forward(self, *args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    hf.__class__ = type(base.__name__, (base,), {"forward": forward})
    with pytest.raises(ValidationError, match=r"the `logits` point differs .* transform after the unembedding"):
        ExpertModel(hf, tiny_tokenizer())


def test_a_softcapped_model_refuses_logit_difference_attribution():
    from expertlens.attribution import LogitDiff, direct_attribution

    hf = tiny_model("olmoe")
    hf.config.final_logit_softcapping = 30.0  # the config says so (the logits point is the returned logits)
    model = ExpertModel(hf, tiny_tokenizer())
    assert model.logits_softcap == 30.0
    with pytest.raises(ValueError, match=r"soft-caps its logits .* c = 30.0.* attribute a direction instead"):
        direct_attribution(model, ["hi"], LogitDiff(["I"]))
