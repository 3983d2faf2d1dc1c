"""Routing edits and expert steering, checked against hand computations of each family's router."""

from __future__ import annotations

import functools

import pytest
import torch

from expertlens import ExpertModel
from expertlens.interventions import (
    AllExpertsSteer,
    ExpertSteer,
    ForceExperts,
    MaskExperts,
    RouterBias,
    SteerMoE,
    calibrate_router_bias,
)
from expertlens.testing import MOE_FAMILIES, tiny_model, tiny_tokenizer

torch.set_num_threads(1)
PROMPTS = ["hello there", "hi", "a b c d e f", "routing!"]


@functools.cache
def get_model(family: str) -> ExpertModel:
    return ExpertModel(tiny_model(family), tiny_tokenizer())


def vec(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (64,)), generator=torch.Generator().manual_seed(seed))


def routing(model: ExpertModel, layer: int, prompts=PROMPTS):
    with torch.no_grad(), model.trace(prompts):
        moe = model.layers[layer].moe
        logits = moe.router_logits.save()
        idx = moe.topk_indices.save()
        w = moe.topk_weights.save()
        out = moe.output.save()
        final = model.logits.save()
    return logits, idx, w, out, final


# Hand computations of the routers (independent of expertlens.families) on [T, E] logits.
def hand_softmax_renorm(logits, k):
    p = torch.softmax(logits.float(), -1)
    w, i = p.topk(k, -1)
    return w / w.sum(-1, keepdim=True), i


def hand_gpt_oss(logits, k):
    top, i = logits.topk(k, -1)
    return torch.softmax(top, -1), i


def hand_deepseek_v3(logits, k, router, masked=()):
    s = logits.float().sigmoid()
    choice = s + router.e_score_correction_bias
    choice[:, list(masked)] = float("-inf")
    T, E = s.shape
    g = router.num_group
    gs = choice.view(T, g, E // g).topk(2, -1).values.sum(-1)
    keep = torch.zeros(T, g, dtype=torch.bool)
    keep.scatter_(1, gs.topk(router.topk_group, -1).indices, True)
    choice = choice.masked_fill(~keep.repeat_interleave(E // g, 1), float("-inf"))
    i = choice.topk(k, -1).indices
    w = s.gather(1, i)
    return w / w.sum(-1, keepdim=True) * router.routed_scaling_factor, i


def hand_route(model, layer, logits):
    flat = logits.reshape(-1, logits.shape[-1])
    k = model.top_k
    if model.family in ("mixtral", "olmoe"):
        return hand_softmax_renorm(flat, k)
    if model.family == "gpt_oss":
        return hand_gpt_oss(flat, k)
    router = model.hf_model.get_submodule(model.layout[layer].router)
    return hand_deepseek_v3(flat, k, router)


def assert_weights_match(model, layer, logits, idx, w):
    hw, hi = hand_route(model, layer, logits)
    idx, w = idx.reshape(-1, idx.shape[-1]), w.reshape(-1, w.shape[-1])
    a, b = idx.sort(-1), hi.sort(-1)
    assert torch.equal(a.values, b.values)
    assert torch.allclose(w.gather(1, a.indices), hw.gather(1, b.indices).to(w.dtype), atol=1e-6)


HAND = ["mixtral", "olmoe", "deepseek_v3", "gpt_oss"]


@pytest.mark.parametrize("family", HAND)
def test_mask_experts_never_selected_weights_follow_rule(family):
    model = get_model(family)
    layer = model.moe_layers[-1]
    _, base_idx, *_ = routing(model, layer)
    masked = sorted({int(x) for x in base_idx[:, -1].reshape(-1)})[:3]
    with model.intervene(MaskExperts({layer: masked})):
        logits, idx, w, _, final = routing(model, layer)
    assert not bool(torch.isin(idx, torch.tensor(masked)).any())
    assert torch.isneginf(logits[..., masked]).all() and torch.isfinite(final).all()
    assert_weights_match(model, layer, logits, idx, w)
    assert model.n_edits() == 0


@pytest.mark.parametrize("family", HAND)
def test_force_experts_always_selected_weights_follow_rule(family):
    model = get_model(family)
    layer = model.moe_layers[-1]
    base_logits, base_idx, *_ = routing(model, layer)
    counts = torch.bincount(base_idx.reshape(-1), minlength=model.n_experts)
    forced = [int(counts.argmin())]  # the least used expert
    if family != "deepseek_v3":
        forced.append(int(counts.argsort()[1]))
    with model.intervene(ForceExperts({layer: forced})):
        logits, idx, w, _, final = routing(model, layer)
    for e in forced:
        assert bool((idx == e).any(-1).all()), f"expert {e} not always selected"
    assert torch.isfinite(final).all()
    assert_weights_match(model, layer, logits, idx, w)
    # only the forced logits (and, for group routers, non-forced groups) were touched
    others = [e for e in range(model.n_experts) if e not in forced]
    if family != "deepseek_v3":
        assert torch.equal(logits[..., others], base_logits[..., others])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mask_and_force_no_nan_any_family(family):
    model = get_model(family)
    layer = model.moe_layers[-1]
    mask = MaskExperts({layer: [0, 1, 2, 3, 4, 5]})
    with model.intervene(mask):
        _, idx, w, out, final = routing(model, layer)
    assert set(idx.unique().tolist()) <= {6, 7}
    assert torch.isfinite(w).all() and torch.isfinite(out).all() and torch.isfinite(final).all()
    with model.intervene(ForceExperts({layer: [5]})):
        _, idx, w, out, final = routing(model, layer)
    assert bool((idx == 5).any(-1).all())
    assert torch.isfinite(w).all() and torch.isfinite(final).all()


def test_force_sigmoid_family_with_correction_bias():
    model = ExpertModel(tiny_model("deepseek_v3", seed=3), tiny_tokenizer())
    layer = model.moe_layers[-1]
    router = model.hf_model.get_submodule(model.layout[layer].router)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0]))
    with model.intervene(ForceExperts({layer: [2]})):
        logits, idx, w, _, _ = routing(model, layer)
    assert bool((idx == 2).any(-1).all())
    assert_weights_match(model, layer, logits, idx, w)


@pytest.mark.parametrize("family", ["deepseek_v3", "ernie4_5_moe"])
def test_mask_and_force_with_large_correction_bias(family):
    model = ExpertModel(tiny_model(family, seed=3), tiny_tokenizer())
    layer = model.moe_layers[-1]
    router = model.hf_model.get_submodule(model.layout[layer].router)
    param = router.e_score_correction_bias if family == "deepseek_v3" else router.moe_statics.e_score_correction_bias
    with torch.no_grad():
        param.zero_()
        param.view(-1)[1] = 5.0  # expert 1 wins every token on its bias alone
    _, base_idx, *_ = routing(model, layer)
    assert bool((base_idx == 1).any(-1).all())
    with model.intervene(MaskExperts({layer: [1]})):
        logits, idx, w, _, final = routing(model, layer)
    assert not bool((idx == 1).any()) and torch.isfinite(final).all()
    if family == "deepseek_v3":
        hw, hi = hand_deepseek_v3(logits.reshape(-1, 8), 2, router, masked=[1])
        a, b = idx.reshape(-1, 2).sort(-1), hi.sort(-1)
        assert torch.equal(a.values, b.values)
        assert torch.allclose(w.reshape(-1, 2).gather(1, a.indices), hw.gather(1, b.indices), atol=1e-6)
    else:  # softmax probs of the chosen two, renormalised
        p = torch.softmax(logits.reshape(-1, 8), -1).gather(1, idx.reshape(-1, 2))
        assert torch.allclose(w.reshape(-1, 2), p / p.sum(-1, keepdim=True), atol=1e-6)
    with model.intervene(ForceExperts({layer: [6]})):
        _, idx, *_ = routing(model, layer)
    assert bool((idx == 6).any(-1).all())
    assert model.n_edits() == 0


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_router_bias_and_calibration(family):
    model = get_model(family)
    layer = model.moe_layers[-1]
    base_logits, *_ = routing(model, layer)
    mags = calibrate_router_bias(model)
    assert sorted(mags) == model.moe_layers
    # the paper's range: one N(0, I) vector through the router's linear map
    router = model.hf_model.get_submodule(model.layout[layer].router)
    h = torch.randn(1, model.d_model, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.linear(h, router.weight).detach()
    assert mags[layer] == pytest.approx(float(ref.max() - ref.min()) + 0.01, rel=1e-5)
    data = calibrate_router_bias(model, prompts=PROMPTS, reduce="max")
    assert data[layer] == pytest.approx(
        float((base_logits.max(-1).values - base_logits.min(-1).values).max()) + 0.01, rel=1e-5
    )
    bias = RouterBias.promote({layer: [4]}, mags, model.n_experts)
    with model.intervene(bias):
        logits, idx, *_ = routing(model, layer)
    assert torch.allclose(logits, base_logits + bias.bias[layer], atol=1e-6)
    table = torch.zeros(model.n_layers, model.n_experts)
    table[layer] = bias.bias[layer]
    with model.intervene(RouterBias(table)):
        logits2, *_ = routing(model, layer)
    assert torch.equal(logits, logits2)
    if family == "mixtral":  # range + eps on the logits beats every other expert under softmax top-k
        assert bool((idx == 4).any(-1).float().mean() > 0.5)


def test_steer_moe_rewrite():
    model = get_model("olmoe")
    layer = 1
    base_logits, *_ = routing(model, layer)
    with model.intervene(SteerMoE(activate={layer: [3]}, deactivate={layer: [0, 5]}, eps=0.05)):
        logits, idx, *_ = routing(model, layer)
    s = torch.log_softmax(base_logits, -1)
    want = s.clone()
    want[..., 3] = s.max(-1).values + 0.05
    want[..., [0, 5]] = (s.min(-1).values - 0.05)[..., None]
    assert torch.allclose(logits, want, atol=1e-6)
    assert bool((idx == 3).any(-1).all()) and not bool(torch.isin(idx, torch.tensor([0, 5])).any())
    with pytest.raises(ValueError, match="both"):
        with model.intervene(SteerMoE(activate={1: [2]}, deactivate={1: [2]})):
            pass
    with pytest.raises(ValueError, match="top_k=2"):
        with model.intervene(SteerMoE(activate={1: [1, 2, 3]})):
            pass
    assert model.n_edits() == 0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_expert_steer_routed_only_equals_expert_out_slot_edit(family):
    model = get_model(family)
    layer, d, coeff = model.moe_layers[-1], vec(11), 2.5
    _, base_idx, *_ = routing(model, layer)
    e = int(base_idx.reshape(-1).mode().values)
    with model.intervene(ExpertSteer(layer, e, d, coeff, weighting="routed_only")):
        *_, out_a, final_a = routing(model, layer)
    stash = {}

    def grab(idx, ctx):
        stash["idx"] = idx
        return idx

    def slot_add(eo, ctx):
        return eo + coeff * d * (stash["idx"] == e).unsqueeze(-1).to(eo.dtype)

    hs = [
        model.add_edit("moe.topk_indices", grab, layer=layer),
        model.add_edit("moe.expert_out", slot_add, layer=layer),
    ]
    try:
        *_, out_b, final_b = routing(model, layer)
    finally:
        for h in hs:
            h.remove()
    *_, base_out, _ = routing(model, layer)
    assert bool((base_idx == e).any())
    assert not torch.allclose(out_a, base_out)
    assert torch.allclose(out_a, out_b, atol=1e-5) and torch.allclose(final_a, final_b, atol=1e-5)
    assert model.n_edits() == 0


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_expert_steer_router_prob_and_all_experts(family):
    model = get_model(family)
    layer, d, coeff = model.moe_layers[-1], vec(12), 4.0
    with torch.no_grad(), model.trace(PROMPTS):
        probs = model.layers[layer].moe.router_probs.save()
        base = model.layers[layer].moe.output.save()
    with model.intervene(ExpertSteer(layer, 6, d, coeff)), model.trace(PROMPTS):
        out = model.layers[layer].moe.output.save()
    assert torch.allclose(out - base, coeff * probs[..., 6:7] * d, atol=1e-5)
    with model.intervene(ExpertSteer(layer, 6, d, coeff, weighting="constant")), model.trace(PROMPTS):
        out = model.layers[layer].moe.output.save()
    assert torch.allclose(out - base, (coeff * d).expand_as(out), atol=1e-5)
    D = vec(13, model.n_experts, model.d_model)
    with model.intervene(AllExpertsSteer(layer, D, coeff)), model.trace(PROMPTS):
        out = model.layers[layer].moe.output.save()
    assert torch.allclose(out - base, coeff * probs @ D, atol=1e-5)
    # a routing edit attached first is seen by the steering weights (same forward)
    bias = torch.zeros(model.n_experts)
    bias[6] = 3.0
    with model.intervene(RouterBias({layer: bias}), ExpertSteer(layer, 6, d, coeff)), model.trace(PROMPTS):
        probs_b = model.layers[layer].moe.router_probs.save()
        out_b = model.layers[layer].moe.output.save()
    with model.intervene(RouterBias({layer: bias})), model.trace(PROMPTS):
        base_b = model.layers[layer].moe.output.save()
    assert torch.allclose(out_b - base_b, coeff * probs_b[..., 6:7] * d, atol=1e-5)
    assert not torch.allclose(probs_b, probs)
    assert model.n_edits() == 0
