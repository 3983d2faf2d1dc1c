"""Exact or loud: weight edits always restore, generation bookkeeping on every family, devices."""

from __future__ import annotations

import pytest
import torch

from expertlens import ExpertModel
from expertlens.interventions import AddVector, OrthogonalizeWeights, generate
from expertlens.testing import tiny_model, tiny_tokenizer

from .conftest import ALL_FAMILIES

torch.set_num_threads(1)


def _params(model):
    return {n: p.detach().clone() for n, p in model.hf_model.named_parameters()}


def _same(model, saved):
    return all(torch.equal(saved[n], p) for n, p in model.hf_model.named_parameters())


# ---- weight edits ----------------------------------------------------------------------------


def test_weight_edits_removed_out_of_order_are_refused_before_touching_anything(wrapped):
    model = wrapped("olmoe")
    before = _params(model)
    h1 = OrthogonalizeWeights(torch.randn(64, generator=torch.Generator().manual_seed(1))).apply(model)
    h2 = OrthogonalizeWeights(torch.randn(64, generator=torch.Generator().manual_seed(2))).apply(model)
    assert model.n_edits() == 2  # weight edits count
    mid = _params(model)
    with pytest.raises(RuntimeError, match=r"weight edit is #1 of 2 .* 1 applied after it .* No weight was changed"):
        h1.remove()
    assert _same(model, mid) and h1.active
    h2.remove()
    h1.remove()
    assert _same(model, before) and model.n_edits() == 0


def test_clear_edits_undoes_weight_edits_bit_for_bit(wrapped):
    model = wrapped("qwen2_moe")
    before = _params(model)
    for seed in range(3):
        OrthogonalizeWeights(torch.randn(64, generator=torch.Generator().manual_seed(seed))).apply(model)
    assert model.n_edits() == 3 and not _same(model, before)
    model.clear_edits()
    assert _same(model, before) and model.n_edits() == 0


# ---- generation bookkeeping ------------------------------------------------------------------

PROMPTS = ["hello there", "hi", "abc de"]  # different lengths: left padding


def _record(model):
    """An identity edit recording (step, positions) of every forward."""
    seen = []

    def fn(x, ctx):
        seen.append((ctx.step, ctx.prompt_len, ctx.positions.tolist()))
        return x

    return seen, model.add_edit("resid_pre", fn, layer=0)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("prompts", [PROMPTS, ["hello"]], ids=["batched-left-padded", "single"])
def test_step_tracking_does_not_depend_on_the_cache_reporting_a_length(family, prompts):
    model = ExpertModel(tiny_model(family), tiny_tokenizer())
    n = 4
    p = model.tokenize(prompts)["input_ids"].shape[1]
    seen, h = _record(model)
    try:
        generate(model, prompts, n, return_ids=True)
    finally:
        h.remove()
    # generation may stop early at EOS; every forward it ran must be bookkept correctly
    assert seen[0] == (0, p, list(range(p)))
    assert seen[1:] == [(s, p, [p + s - 1]) for s in range(1, len(seen))]
    assert len(seen) >= 2


def _hf_steered(model, layer, delta, when, n):
    """Greedy HF generation with a plain pre-hook adding ``delta`` when ``when(seq_len)``."""

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if not when(x.shape[1]):
            return None
        x = x + delta.to(x.dtype)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    decoder = model.hf_model.get_submodule(model._layer_info[layer]["path"])
    h = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    enc = model.tokenize(PROMPTS)
    try:
        with torch.no_grad():
            ids = model.hf_model.generate(**enc, max_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                                          temperature=None, top_p=None, top_k=None)
    finally:
        h.remove()
    out = []
    for row in ids[:, enc["input_ids"].shape[1]:].tolist():
        out.append(row[: row.index(2) + 1] if 2 in row else row)
    return out


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("mode", ["prompt", "generated"])
def test_positions_prompt_and_generated_match_a_reference_hook_on_every_family(family, mode):
    model = ExpertModel(tiny_model(family), tiny_tokenizer())
    n, coeff = 4, 8.0
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    when = {"prompt": lambda p: p > 1, "generated": lambda p: p == 1}[mode]
    got = [r.tolist() for r in generate(model, PROMPTS, n, [AddVector("resid_pre", v, coeff=coeff, layers=0,
                                                                      positions=mode)], return_ids=True)]
    assert got == _hf_steered(model, 0, coeff * v, when, n)
    assert got != _hf_steered(model, 0, 0 * v, when, n), "steering must change the continuation"
    assert model.n_edits() == 0
