"""Hot paths make no host syncs beyond the model's own (counted on CPU, see tests/_syncs.py).

Each case runs the same forward on an uninstrumented copy (transformers' grouped_mm experts) and through
expertlens with an intervention, and compares the number of calls that would make the host wait for an
accelerator. On CPU the grouped GEMM itself reads its offsets (``_local_scalar_dense``), so the bare copy's count
is the baseline, not zero.
"""

from __future__ import annotations

import copy

import nnsight
import pytest
import torch

from expertlens import ExpertModel
from expertlens.compat import cache_kwarg, output_cache
from expertlens.interventions import (
    AddVector,
    AllExpertsSteer,
    ExpertSteer,
    ForceExperts,
    MaskExperts,
    Patch,
    cache_points,
)
from expertlens.testing import MOE_FAMILIES, tiny_model, tiny_tokenizer
from tests._syncs import count_syncs


def _pair(family: str):
    hf = tiny_model(family)
    bare = copy.deepcopy(hf)
    bare.set_experts_implementation("grouped_mm")
    return bare, ExpertModel(hf, tiny_tokenizer())


def _ids(model, b=2, p=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 99, (b, p), generator=g)


def _syncs(fn) -> tuple[int, dict]:
    with torch.no_grad(), count_syncs() as c:
        fn()
    return c.total, dict(c.ops)


def test_counter_can_fail():
    """The counter sees the sync calls the hot paths used to make."""
    x = torch.randn(4, 3)
    n, ops = _syncs(lambda: (x[x[:, 0] > 0], bool((x > 0).any()), x.tolist(), x.sum().item()))
    assert n == 4, ops


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routing_edits_add_no_sync(family):
    bare, model = _pair(family)
    ids = _ids(model)
    base, _ = _syncs(lambda: bare(input_ids=ids))
    layer = model.moe_layers[-1]
    for iv in (MaskExperts({layer: [0, 3]}), ForceExperts({layer: [1]})):
        with model.intervene(iv):
            n, ops = _syncs(lambda: model.hf_model(input_ids=ids))
        assert n == base, f"{family} {type(iv).__name__}: {ops} vs {base} without expertlens"


def test_steering_expert_steer_patch_add_no_sync():
    bare, model = _pair("qwen3_moe")
    ids = _ids(model)
    base, _ = _syncs(lambda: bare(input_ids=ids))
    layer = model.moe_layers[-1]
    v = torch.randn(model.d_model)
    source = cache_points(model, ["abcdefg", "hijklmn"], points=["resid_pre", "moe.output"], layers=layer)
    cases = {
        "AddVector": AddVector("resid_pre", v, layers=layer),
        "ExpertSteer": ExpertSteer(layer=layer, expert=2, direction=v, coeff=2.0),
        "AllExpertsSteer": AllExpertsSteer(
            layer=layer, directions=torch.randn(model.n_experts, model.d_model), coeff=2.0
        ),
        "Patch": Patch("resid_pre", source, layers=layer),
        "Patch moe.output": Patch("moe.output", source, layers=layer),
    }
    for name, iv in cases.items():
        with model.intervene(iv):
            n, ops = _syncs(lambda: model.hf_model(input_ids=ids))
        assert n == base, f"{name}: {ops} vs {base} without expertlens"


def test_steered_decode_step_adds_no_sync():
    """One decode step with a KV cache, as generate() runs it, steered vs bare."""
    bare, model = _pair("qwen3_moe")
    ids = _ids(model)
    layer = model.moe_layers[-1]
    v = torch.randn(model.d_model)
    nxt = torch.tensor([[5], [6]])

    def step(m):
        with torch.no_grad():
            cache = output_cache(m(input_ids=ids, use_cache=True))
        name = cache_kwarg(m)  # "cache" from transformers 5.25 ("past_key_values" is deprecated there)
        return lambda: m(input_ids=nxt, **{name: copy.deepcopy(cache)}, use_cache=True)

    base, _ = _syncs(step(bare))
    for iv in (AddVector("resid_pre", v, layers=layer), ExpertSteer(layer=layer, expert=2, direction=v, coeff=2.0)):
        with model.intervene(iv):
            n, ops = _syncs(step(model.hf_model))
        assert n == base, f"decode step under {type(iv).__name__}: {ops} vs {base} without expertlens"


def test_per_expert_reads_and_writes_sync_once_per_layer():
    """Reading (and writing) every expert of every MoE layer: one host read per layer (the per-expert counts
    decide the result sizes), not one per expert."""
    _, model = _pair("qwen3_moe")
    ids = _ids(model)

    def empty():
        with model.trace(ids):
            pass

    def every_expert():
        with model.trace(ids):
            for i in model.moe_layers:
                moe = model.layers[i].moe
                for e in range(model.n_experts):
                    moe.experts[e].output.save()
                moe.experts[1].output = moe.experts[1].output * 2.0

    base, _ = _syncs(empty)
    n, ops = _syncs(every_expert)
    # one host read per layer for the reads, plus one finiteness check per write (every write is validated)
    assert n - base <= 2 * len(model.moe_layers), ops
    assert model.n_experts > 4  # so one sync per expert would exceed the bound


def test_per_expert_rows_match_the_boolean_mask():
    """The sorted-rows read gives exactly ``expert_out[topk_indices == e]``, in (batch, pos, slot) order, and a
    write changes exactly those slots."""
    _, model = _pair("qwen3_moe")
    ids = _ids(model, b=3, p=9)
    layer = model.moe_layers[0]
    with torch.no_grad(), model.trace(ids):
        moe = model.layers[layer].moe
        idx = moe.topk_indices.save()
        rows = nnsight.save([moe.experts[e].output for e in range(model.n_experts)])
        eo = moe.expert_out.save()
    for e, r in enumerate(rows):
        assert torch.equal(r, eo[idx == e])
    with torch.no_grad(), model.trace(ids):
        moe = model.layers[layer].moe
        moe.experts[3].output = moe.experts[3].output * 0 + 7.0
        written = moe.expert_out.save()
    assert torch.all(written[idx == 3] == 7.0)
    assert torch.equal(written[idx != 3], eo[idx != 3])
