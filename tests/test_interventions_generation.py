"""Generation under interventions (greedy, left padding, KV cache on) against plain-torch hooks."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from expertlens import ExpertModel
from expertlens.interventions import (
    AblateDirection,
    AddVector,
    ExpertSteer,
    MaskExperts,
    OrthogonalizeWeights,
    Positions,
    generate,
    run_logits,
)
from expertlens.testing import tiny_model, tiny_tokenizer

torch.set_num_threads(1)
PROMPTS = ["hello there, friend", "hi", "abc de", "x"]  # different lengths -> left padding
N = 6


@functools.cache
def get_model(family: str) -> ExpertModel:
    return ExpertModel(tiny_model(family), tiny_tokenizer())


def vec(seed: int) -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(seed))


def hf_generate(model: ExpertModel, prompts=PROMPTS, n=N) -> torch.Tensor:
    enc = model.tokenize(prompts)
    with torch.no_grad():
        ids = model.hf_model.generate(
            **enc,
            max_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    return ids[:, enc["input_ids"].shape[1] :]


def pre_hook_adding(delta: torch.Tensor, when):
    """A plain forward pre-hook on a decoder layer adding ``delta`` when ``when(seq_len)``."""

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if not when(x.shape[1]):
            return None
        x = x + delta
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    return hook


def ids_of(model, prompts, interventions, n=N):
    rows = generate(model, prompts, n, interventions, return_ids=True)
    return [r.tolist() for r in rows]


def trim(ids: torch.Tensor):
    out = []
    for row in ids.tolist():
        out.append(row[: row.index(2) + 1] if 2 in row else row)
    return out


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("mode", ["all", "prompt", "generated"])
def test_steering_every_step_matches_reference_hook(family, mode):
    model = get_model(family)
    layer, coeff, v = 1, 6.0, vec(1)
    when = {"all": lambda p: True, "prompt": lambda p: p > 1, "generated": lambda p: p == 1}[mode]
    steer = AddVector("resid_pre", v, coeff=coeff, layers=layer, positions=mode)
    got = ids_of(model, PROMPTS, [steer])
    decoder = model.hf_model.get_submodule(model.layout[layer].path)
    h = decoder.register_forward_pre_hook(pre_hook_adding(coeff * v, when), with_kwargs=True)
    try:
        want = trim(hf_generate(model))
    finally:
        h.remove()
    assert got == want
    assert got != trim(hf_generate(model))  # steering changed something
    assert model.n_edits() == 0


def test_generate_strings_batching_and_nnsight_generate_agree():
    model = get_model("qwen2_moe")
    iv = [
        AddVector("resid_pre", vec(2), coeff=5.0, layers=0),
        ExpertSteer(1, 2, vec(3), coeff=8.0),
        MaskExperts({0: [1]}),
    ]
    a = generate(model, PROMPTS, N, iv, batch_size=4)
    b = generate(model, PROMPTS, N, iv, batch_size=1)  # no padding at all
    assert a == b and len(a) == len(PROMPTS)
    assert a != generate(model, PROMPTS, N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with model.intervene(*iv), torch.no_grad(), model.generate(PROMPTS, max_new_tokens=N, do_sample=False):
            out = model.generator.output.save()
    enc = model.tokenize(PROMPTS)
    texts = model.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert texts == a
    assert model.n_edits() == 0


def test_ablation_generation_matches_orthogonalised_weights():
    model = get_model("deepseek_v3")
    r = vec(4) * 3
    ablated = generate(model, PROMPTS, N, [AblateDirection(r, writes=("embed", "attn", "mlp"))])
    with model.intervene(OrthogonalizeWeights(r)):
        ortho = generate(model, PROMPTS, N)
    assert ablated == ortho


def test_run_logits_batches_and_positions():
    model = get_model("olmoe")
    last = run_logits(model, PROMPTS, batch_size=2)
    full = run_logits(model, PROMPTS, batch_size=3, last_only=False)
    assert last.shape == (len(PROMPTS), model.vocab_size)
    assert [f.shape[0] for f in full] == [len(p) for p in PROMPTS]
    for a, f in zip(last, full):
        assert torch.allclose(a, f[-1], atol=1e-5)
    steered = run_logits(model, PROMPTS, AddVector("resid_pre", vec(5), layers=1, positions=Positions.last(1)))
    assert not torch.allclose(steered, last)
    with pytest.raises(ValueError, match="batch_size"):
        run_logits(model, PROMPTS, batch_size=0)
    assert model.n_edits() == 0
