"""The fixed-overhead shortcuts change no value: idle hook points skipped, logits intercepted only when used,
router_probs computed only when read, nnsight controllers dropped around expertlens' own generate."""

from __future__ import annotations

import nnsight
import pytest
import torch
from nnsight.intervention.source import Controller

from expertlens import ExpertModel
from expertlens.instrument import plain_calls
from expertlens.interventions import AddVector, generate
from expertlens.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())


def _controllers(m) -> int:
    return sum(isinstance(x.__dict__.get("forward"), Controller) for x in m.hf_model.modules())


def test_plain_calls_drops_and_restores_controllers(model):
    before = _controllers(model)
    assert before > 0
    with plain_calls(model.hf_model):
        assert _controllers(model) == 0
        with torch.no_grad():
            inside = model.hf_model(torch.tensor([[5, 6, 7, 8]])).logits
    assert _controllers(model) == before
    with torch.no_grad(), model.trace(torch.tensor([[5, 6, 7, 8]])):
        traced = model.output.logits.save()
    assert torch.equal(inside, traced)


def test_generate_tokens_unchanged_by_plain_calls(model):
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 3
    steer = AddVector("resid_pre", v, layers=1)
    prompts = ["hello there", "hi"]
    fast = generate(model, prompts, 6, [steer], return_ids=True)
    # the same generation with every controller in place
    enc = model.tokenize(prompts)
    with model.intervene(steer), torch.no_grad():
        ids = model.hf_model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    slow = ids[:, enc["input_ids"].shape[1]:]
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b[: len(a)])
    # and the steering really acted
    plain = generate(model, prompts, 6, return_ids=True)
    assert any(not torch.equal(a, b) for a, b in zip(fast, plain, strict=True))


def test_pinned_step_read_skips_earlier_visits_correctly(model):
    """Reading router_probs only at generation step 2 (earlier visits skipped as idle, but counted) gives the
    value a read at every step gives at step 2."""
    prompts, steps, layer = ["hello", "hi there"], 4, 1
    with torch.no_grad(), model.generate(prompts, max_new_tokens=steps, do_sample=False) as tracer:
        every = nnsight.save([])
        for _ in tracer.iter[:steps]:
            every.append(model.layers[layer].moe.router_probs)
    with torch.no_grad(), model.generate(prompts, max_new_tokens=steps, do_sample=False) as tracer:
        for _ in tracer.iter[2]:
            only = model.layers[layer].moe.router_probs.save()
    assert torch.equal(only, every[2])
    # the probs are the family's softmax of the logits read in the same step
    with torch.no_grad(), model.trace(prompts):
        logits = model.layers[layer].moe.router_logits.save()
        probs = model.layers[layer].moe.router_probs.save()
    assert torch.allclose(probs, logits.float().softmax(-1), atol=1e-6)


def test_untouched_router_runs_without_interception(model, monkeypatch):
    """Outside a trace, with no edit on the router's points, the router runs with no logits tap; reading the
    logits in a trace installs one per MoE layer."""
    from expertlens import instrument

    made = []
    real_init = instrument._LinearTap.__init__

    def counting_init(self, *args):
        made.append(1)
        real_init(self, *args)

    monkeypatch.setattr(instrument._LinearTap, "__init__", counting_init)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model.hf_model(ids)
    assert made == []
    with torch.no_grad(), model.trace(ids):
        for i in model.moe_layers:
            model.layers[i].moe.router_logits.save()
    assert len(made) == len(model.moe_layers)
