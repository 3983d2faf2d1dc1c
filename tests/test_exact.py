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

    decoder = model.hf_model.get_submodule(model.layout[layer].path)
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


# ---- multi-device: routing tensors live on each layer's device -------------------------------


def _offloaded(family):
    """A tiny model whose embedding and layer 1 sit on ``meta``, loaded at forward by accelerate hooks."""
    from accelerate import cpu_offload

    hf = tiny_model(family)
    cpu_offload(hf.get_input_embeddings(), execution_device="cpu")
    cpu_offload(hf.model.layers[1], execution_device="cpu")
    hf.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.1": "cpu", "": "cpu"}
    return hf


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_routing_interventions_on_an_offloaded_layer_match_the_resident_model(family):
    from expertlens.interventions import ForceExperts, MaskExperts, SteerMoE
    from expertlens.interventions.routing import layer_device

    hf = _offloaded(family)
    assert hf.get_input_embeddings().weight.is_meta and hf.model.layers[1].mlp.gate.weight.is_meta
    model = ExpertModel(hf, tiny_tokenizer())  # wraps and passes the truth test with meta weights
    resident = ExpertModel(tiny_model(family), tiny_tokenizer())
    assert model.device == torch.device("cpu") and layer_device(model, 1) == torch.device("cpu")
    ids = torch.tensor([[5, 9, 11, 40, 41]])
    for iv in (MaskExperts({1: [0, 1]}), ForceExperts({1: [4]}), SteerMoE({1: [3]}, {1: [2]})):
        got, want = [], []
        for m, out in ((model, got), (resident, want)):
            with m.intervene(iv), torch.no_grad(), m.trace(ids):
                idx = m.layers[1].moe.topk_indices.save()
                logits = m.logits.save()
            out += [idx, logits]
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert model.n_edits() == 0


def test_weight_edits_and_forced_means_refuse_offloaded_weights():
    from expertlens.refusal import expert_output_means

    model = ExpertModel(_offloaded("olmoe"), tiny_tokenizer())
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight is on the meta device \(offloaded"):
        OrthogonalizeWeights(torch.ones(64)).apply(model)
    assert model.n_edits() == 0
    with pytest.raises(ValueError, match="expert weights of .* are on the meta device"):
        expert_output_means(model, ["hello there"], layer=1, positions=[-1])
    means, _ = expert_output_means(model, ["hello there"], layer=0, positions=[-1])  # resident layer: fine
    assert torch.isfinite(means).all()


def test_weight_edits_refuse_quantised_weights():
    model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
    experts = model.hf_model.model.layers[1].mlp.experts
    before = _params(model)
    packed = torch.nn.Parameter(torch.zeros(8, 64, 16, dtype=torch.uint8), requires_grad=False)  # 4-bit packed
    experts.down_proj = packed
    with pytest.raises(ValueError, match=r"down_proj is quantised \(Parameter, dtype torch.uint8\).* unquantised"):
        OrthogonalizeWeights(torch.ones(64)).apply(model)
    assert model.n_edits() == 0
    untouched = [(n, p) for n, p in model.hf_model.named_parameters() if "layers.1.mlp.experts.down" not in n]
    assert all(torch.equal(before[n], p) for n, p in untouched)


# ---- no side effects, no leaks ---------------------------------------------------------------


def _fingerprint(hf):
    return (
        [type(m) for m in hf.modules()],
        sorted(n for n, _ in hf.named_modules()),
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules()),
        sorted(k for m in hf.modules() for k in m.__dict__ if k.startswith(("_el", "__nnsight")) or k == "forward"),
        hf.config._experts_implementation,
    )


def test_wrapping_never_changes_a_config_shared_with_another_model():
    a = tiny_model("olmoe")
    b = tiny_model("olmoe")
    b.config = a.config  # e.g. two models built from one config object
    for m in b.modules():
        if "config" in m.__dict__:
            m.__dict__["config"] = a.config
    impl = a.config._experts_implementation
    model = ExpertModel(b, tiny_tokenizer())
    assert a.config._experts_implementation == impl and b.config is not a.config
    assert b.config._experts_implementation == "expertlens"
    model.restore()
    assert b.config is a.config and a.config._experts_implementation == impl


def test_del_frees_the_wrapper_and_uninstruments_the_model():
    import gc
    import weakref

    hf = tiny_model("qwen2_moe")
    clean = _fingerprint(hf)

    def use():  # a trace snapshots its frame's locals (CPython f_locals), so wrap and trace in a frame of its own
        model = ExpertModel(hf, tiny_tokenizer())
        with model.trace("hi"):
            model.logits.save()
        assert _fingerprint(hf) != clean
        return weakref.ref(model)

    ref = use()
    gc.collect()
    assert ref() is None
    assert _fingerprint(hf) == clean

    def use_and_leave_edits():  # edits left behind are undone when the wrapper goes, weights included
        model = ExpertModel(hf, tiny_tokenizer())
        model.add_edit("resid_pre", lambda x, ctx: x * 0, layer=1)
        model.add_edit("moe.output", lambda x, ctx: x * 0, layer=1)
        OrthogonalizeWeights(torch.ones(64)).apply(model)
        return weakref.ref(model)

    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    ref = use_and_leave_edits()
    gc.collect()
    assert all(torch.equal(before[n], p) for n, p in hf.named_parameters())
    assert ref() is None
    assert _fingerprint(hf) == clean


def test_wrapping_the_same_model_twice_is_refused_and_restore_leaves_nothing_behind():
    hf = tiny_model("olmoe")
    clean = _fingerprint(hf)
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    model = ExpertModel(hf, tiny_tokenizer())
    wrapped_state = _fingerprint(hf)
    with pytest.raises(ValueError, match=r"already wrapped by an ExpertModel .* use the existing wrapper, or call its "
                                         r"\.restore\(\) first"):
        ExpertModel(hf, tiny_tokenizer())
    assert _fingerprint(hf) == wrapped_state
    model.add_edit("resid_pre", lambda x, ctx: x * 0, layer=1)
    OrthogonalizeWeights(torch.ones(64)).apply(model)
    model.restore()
    assert _fingerprint(hf) == clean  # no classes, hooks, hook points, nnsight controllers, tracker
    assert all(torch.equal(before[n], p) for n, p in hf.named_parameters())  # weight edits undone
    model.restore()  # idempotent
    again = ExpertModel(hf, tiny_tokenizer())  # and it can be wrapped again
    again.restore()
    assert _fingerprint(hf) == clean
