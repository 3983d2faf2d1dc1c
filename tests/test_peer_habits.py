"""Habits researchers bring from TransformerLens (issue 25, item 6): run_with_cache, to_tokens, and patching
positions counted per prompt rather than in the padded batch."""

from __future__ import annotations

import pytest
import torch

from expertlens import ExpertModel
from expertlens.interventions import ActivationCache, Patch, cache_points, generate
from expertlens.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return ExpertModel(tiny_model("olmoe"), tiny_tokenizer())


def test_to_tokens_are_the_ids_a_trace_runs_on(model):
    ids = model.to_tokens(["hello", "hi"])
    assert ids.shape == (2, 5) and ids.dtype == torch.long
    assert torch.equal(ids, model.tokenize(["hello", "hi"])["input_ids"])
    assert (ids[1, :3] == model.tokenizer.pad_token_id).all()  # left padding, as in a trace


def test_run_with_cache_matches_a_trace_and_stacks_layers(model):
    prompts = ["hello", "hi"]
    logits, cache = model.run_with_cache(prompts, points=["resid_pre", "moe.router_logits", "logits"])
    with model.trace(prompts):
        rl0 = model.layers[0].moe.router_logits.save()
        r1 = model.layers[1].resid_pre.save()
        out = model.logits.save()
    assert isinstance(cache, ActivationCache) and isinstance(cache, dict)
    assert torch.allclose(cache["resid_pre", 1], r1, atol=1e-5)  # no_grad vs a traced forward: float noise
    assert torch.allclose(cache["moe.router_logits", 0], rl0, atol=1e-5)
    assert torch.allclose(logits, out, atol=1e-5) and torch.equal(cache["logits", None], logits)
    assert cache.stack("resid_pre").shape == (2, 2, 5, 64) and cache.stack("resid_pre", [1]).shape == (1, 2, 5, 64)
    assert cache.points == ["resid_pre", "moe.router_logits", "logits"] and cache.layers("resid_pre") == [0, 1]
    assert torch.equal(cache.attention_mask, model.tokenize(prompts)["attention_mask"])
    with pytest.raises(KeyError, match=r"keys are \(point, layer\) pairs.*cache\['resid_pre', 0\], or "
                                       r"cache.stack\('resid_pre'\)"):  # fmt: skip
        cache["resid_pre"]
    with pytest.raises(KeyError, match="model-level"):
        cache.stack("logits")
    with pytest.raises(KeyError, match=r"layers \[5\] were not recorded"):
        cache.stack("resid_pre", [5])
    text = repr(cache)
    assert text.startswith("ActivationCache({('resid_pre', 0): tensor[2, 5, 64] norm=") and "entries)" in text
    assert model.n_edits() == 0


def test_default_run_with_cache_points(model):
    _, cache = model.run_with_cache("hi")
    assert cache.points == ["resid_pre", "attn.output", "mlp.output", "resid_post"]
    assert cache_points(model, "hi", layers=1).attention_mask.shape == (1, 2)


def test_patch_per_prompt_positions_lines_up_prompts_of_different_lengths(model):
    clean_prompts, run_prompts = ["abcd", "ab"], ["xbcd", "xbc"]
    clean = cache_points(model, clean_prompts, points=["resid_pre"], layers=1)
    src = clean["resid_pre", 1]  # [2, 4, d]: row 1 has two pads
    with model.trace(run_prompts):
        before = model.layers[1].resid_pre.save()
    patch = Patch("resid_pre", clean, layers=1, positions_relative_to="prompt")
    with model.intervene(patch), model.trace(run_prompts):
        got = model.layers[1].resid_pre.save()
    # row 0: no padding either side, the whole prompt patched
    assert torch.equal(got[0], src[0])
    # row 1: the run has one pad, the source two; tokens 0, 1 of each prompt line up, token 2 has no source
    assert torch.equal(got[1, 1:3], src[1, 2:4])
    assert torch.equal(got[1, 0], before[1, 0]) and torch.equal(got[1, 3], before[1, 3])
    only_first = Patch("resid_pre", clean, layers=1, positions=[0], positions_relative_to="prompt")
    with model.intervene(only_first), model.trace(run_prompts):
        first = model.layers[1].resid_pre.save()
    assert torch.equal(first[1, 1], src[1, 2]) and torch.equal(first[1, 2:], before[1, 2:])
    assert torch.equal(first[0, 0], src[0, 0]) and torch.equal(first[0, 1:], before[0, 1:])
    last = Patch("resid_pre", clean, layers=1, positions=[-1], positions_relative_to="prompt")
    with model.intervene(last), model.trace(run_prompts):
        end = model.layers[1].resid_pre.save()
    assert torch.equal(end[1, :3], before[1, :3])  # row 1's last token (its 3rd) has no source token
    assert torch.equal(end[0, 3], src[0, 3])
    # the absolute default refuses the different padded length
    with pytest.raises(ValueError, match="padded length must be the same"), model.intervene(
        Patch("resid_pre", cache_points(model, ["abcd", "a"], layers=1), layers=1)
    ), model.trace(["abcde", "a"]):
        model.logits.save()


def test_patch_per_prompt_equals_absolute_when_padding_matches_and_runs_in_generation(model):
    prompts = ["abcd", "ab"]
    clean = cache_points(model, prompts, points=["moe.output"], layers=1)
    outs = []
    for mode in ("batch", "prompt"):
        with model.intervene(Patch("moe.output", clean, layers=1, positions_relative_to=mode)):
            with model.trace(["abce", "ac"]):
                outs.append(model.logits.save())
    assert torch.equal(outs[0], outs[1])
    texts = generate(model, ["abce", "ac"], 3, Patch("moe.output", clean, layers=1, positions_relative_to="prompt"))
    assert len(texts) == 2 and model.n_edits() == 0
    with pytest.raises(ValueError, match="positions_relative_to='padded'; accepted are 'batch'"):
        with model.intervene(Patch("moe.output", clean, layers=1, positions_relative_to="padded")):
            pass


def _forgot_save(model):
    with model.trace("hello"):
        resid = [model.layers[i].resid_pre.save() for i in range(2)]  # saves the items, not the list
        logits = model.layers[1].resid_post  # no .save()
        kept = model.logits.save()
    return logits, resid, kept


def test_a_forgotten_save_says_so_when_used(model):
    from expertlens.unsaved import NotSavedError, Unsaved

    logits, resid, kept = _forgot_save(model)
    assert isinstance(logits, Unsaved) and kept.shape == (1, 5, 256)
    assert "without .save()" in repr(logits)
    with pytest.raises(NotSavedError, match=r"'logits' was assigned inside model.trace.*`logits = ....save\(\)`"):
        logits.shape
    with pytest.raises(NameError, match=r"'resid'.*nnsight.save\(\[...\]\)"):
        len(resid)
    with pytest.raises(NotSavedError):
        torch.softmax(logits, -1)
    with pytest.raises(NotSavedError):
        logits[0]


def test_a_name_that_existed_before_the_trace_is_left_alone(model):
    prior = "kept"
    with model.trace("hi"):
        prior2 = model.logits  # noqa: F841 - unsaved on purpose
    assert prior == "kept"
