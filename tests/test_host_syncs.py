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
from expertlens.points import POINTS
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


def _interventions(model) -> dict:
    from expertlens.interventions import AblateDirection, MeanAblate, ZeroAblate

    layer = model.moe_layers[-1]
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.d_model, generator=g)
    return {
        "AddVector": AddVector("resid_pre", v, coeff=2.0, layers="all"),
        "ExpertSteer": ExpertSteer(layer=layer, expert=1, direction=v, coeff=2.0),
        "AllExpertsSteer": AllExpertsSteer(layer=layer, directions=torch.randn(model.n_experts, model.d_model)),
        "AblateDirection": AblateDirection(v),
        "MeanAblate": MeanAblate("resid_post", torch.randn(model.n_layers, model.d_model, generator=g)),
        "ZeroAblate": ZeroAblate("attn.output", layers=0),
        "MaskExperts": MaskExperts({layer: [0]}),
    }


#: Host reads an intervention may make when attached (validate + attach together): the one finiteness flag of
#: its vector, read where the vector lives (on the CPU here and usually: then no device sync at all). Was 4 for
#: AddVector (two checks in validate, two in attach) and 6 for AblateDirection. MeanAblate's per-layer table holds
#: one vector per layer: one flag each.
ATTACH_READS = {"AddVector": 1, "ExpertSteer": 1, "AllExpertsSteer": 1, "AblateDirection": 1, "MeanAblate": "layers"}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_interventions_and_point_reads_sync_budget(family):
    """On every family: attaching each intervention reads at most its vector's one flag; a forward under all of
    them adds nothing; a trace reading every point of every layer adds one read per MoE layer (the per-expert
    row counts of ``experts[0].output``) and nothing else."""
    from expertlens.edits import attach_all
    from expertlens.interventions import Compose

    bare, model = _pair(family)
    ids = _ids(model)
    ivs = _interventions(model)
    for name, iv in ivs.items():
        with torch.no_grad(), count_syncs() as c:
            handles = attach_all(model, [iv])
        for h in reversed(handles):
            h.remove()
        expected = ATTACH_READS.get(name, 0)
        expected = model.n_layers if expected == "layers" else expected
        assert c.total == expected, f"{family} {name} attach: {dict(c.ops)}"
    base, _ = _syncs(lambda: bare(input_ids=ids))
    with model.intervene(Compose(list(ivs.values()))):
        n, ops = _syncs(lambda: model.hf_model(input_ids=ids))
    assert n == base, f"{family}: forward under {list(ivs)}: {ops} vs {base} without expertlens"

    from bench.points import _reads, _save

    reads = _reads(model, list(POINTS))  # (point, layer) wherever the model has it, in computation order

    def empty():
        with model.trace(ids):
            pass

    def every():
        with model.trace(ids):
            for name, layer in reads:
                _save(model, name, layer)

    e, _ = _syncs(empty)
    n, ops = _syncs(every)
    per_expert = sum(1 for name, _ in reads if name == "moe.experts.output")
    assert n - e == per_expert, f"{family}: reading every point: {ops} vs {e} for an empty trace"



def test_fp8_experts_read_the_host_once_per_layer():
    """transformers' FP8 experts under expertlens: one host read per MoE layer (the per-expert slot counts),
    where the loop used to make one ``unique`` plus one ``where`` per hit expert."""
    from tests.test_quantized import _with_fp8_experts

    hf = _with_fp8_experts(tiny_model("qwen3_moe"))
    model = ExpertModel(hf, tiny_tokenizer())
    ids = _ids(model)
    with model.intervene(AddVector("resid_pre", torch.randn(model.d_model), layers=0)):
        n, ops = _syncs(lambda: model.hf_model(input_ids=ids))
    assert ops == {"Tensor.tolist": len(model.moe_layers)}, ops
    assert model.n_experts > 2  # one read per hit expert would exceed it


def test_routing_statistics_read_the_host_once_per_stage():
    """``routing_counts`` counts on the model's device and reads back once: batches add only the traces' own
    reads (here the CPU grouped GEMM's offsets), no copy, bincount or boolean mask per layer per batch."""
    from expertlens.refusal.routing import routing_counts

    _, model = _pair("olmoe")
    prompts = ["hello there", "hi", "a b c d", "one two"]
    enc = model.tokenize(prompts[:2])

    def one_batch():
        with model.trace(enc["input_ids"], attention_mask=enc["attention_mask"]):
            for i in model.moe_layers:
                model.layers[i].moe.topk_indices.save()
                model.layers[i].moe.topk_weights.save()

    trace_reads, _ = _syncs(one_batch)
    for count in ("top1", "topk"):
        n, ops = _syncs(lambda c=count: routing_counts(model, prompts, last_n=3, count=c, batch_size=2))
        assert n <= 2 * (trace_reads + 1) + 1, ops  # per batch: its trace (+ the tokenizer's list); once: the counts
        assert ops.get("Tensor.cpu", 0) == 1 and "aten::bincount" not in ops and "aten::nonzero" not in ops, ops


def test_generate_reads_the_host_once_per_batch():
    """``generate(return_ids=True)``: the rows' lengths are read once per batch, not one ``nonzero`` per row."""
    from expertlens.interventions import generate

    _, model = _pair("olmoe")
    counts = []
    for n_rows in (2, 6):
        n, ops = _syncs(lambda k=n_rows // 2: generate(model, ["hello there", "hi"] * k, 3, return_ids=True))
        assert "aten::nonzero" not in ops, ops
        counts.append(n)
    assert counts[0] == counts[1], counts


def test_mean_activations_copy_back_once():
    """Difference-in-means input: summed where the activations are, one copy to the host per call."""
    from expertlens.refusal.directions import mean_activations

    _, model = _pair("olmoe")
    n, ops = _syncs(lambda: mean_activations(model, ["hello there", "hi", "a b c d", "one two"], batch_size=2))
    assert ops.get("Tensor.cpu", 0) == 1, ops
