"""Property tests (hypothesis) for AddVector and AblateDirection over positions, layers, coefficients."""

from __future__ import annotations

import functools

import nnsight
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertlens import ExpertModel
from expertlens.interventions import AblateDirection, AddVector, Positions
from expertlens.testing import tiny_model, tiny_tokenizer

torch.set_num_threads(1)
PROMPTS = ["hello there", "hi", "abc"]


@functools.cache
def get_model(family: str) -> ExpertModel:
    return ExpertModel(tiny_model(family), tiny_tokenizer())


@functools.cache
def baseline(family: str):
    model = get_model(family)
    with torch.no_grad(), model.trace(PROMPTS):
        pre = nnsight.save([model.layers[i].resid_pre for i in range(model.n_layers)])
    return pre


def resid_pre(model):
    with torch.no_grad(), model.trace(PROMPTS):
        pre = nnsight.save([model.layers[i].resid_pre for i in range(model.n_layers)])
    return pre


def expected_mask(kind: str, arg, b: int, p: int) -> torch.Tensor:
    m = torch.zeros(b, p, dtype=torch.bool)
    if kind == "all" or kind == "prompt":
        m[:] = True
    elif kind == "last":
        m[:, max(0, p - arg) :] = True
    elif kind == "indices":
        for i in arg:
            m[:, i % p] = True
    elif kind == "mask":
        m = arg.clone()
    return m


positions_st = st.one_of(
    st.just(("all", None)),
    st.just(("prompt", None)),
    st.just(("generated", None)),
    st.tuples(st.just("last"), st.integers(1, 12)),
    st.tuples(st.just("indices"), st.lists(st.integers(-11, 10), min_size=1, max_size=4)),
    st.tuples(st.just("mask"), st.integers(0, 2**30)),
)


def make_positions(kind, arg, b, p):
    if kind == "mask":
        g = torch.Generator().manual_seed(arg)
        arg = torch.rand(b, p, generator=g) > 0.5
        return Positions.mask(arg), arg
    if kind in ("all", "prompt", "generated"):
        return getattr(Positions, kind)(), arg
    return getattr(Positions, kind)(arg), arg


@settings(max_examples=25, deadline=None)
@given(
    family=st.sampled_from(["olmoe", "qwen2_moe", "deepseek_v3"]),
    layer=st.integers(0, 1),
    coeff=st.floats(-8, 8, allow_nan=False, width=32),
    pos=positions_st,
    seed=st.integers(0, 1000),
    rows=st.sampled_from([None, [0], [1, 2]]),
)
def test_add_vector_property(family, layer, coeff, pos, seed, rows):
    model = get_model(family)
    base = baseline(family)
    b, p = base[0].shape[:2]
    positions, arg = make_positions(*pos, b, p)
    v = torch.randn(64, generator=torch.Generator().manual_seed(seed))
    with model.intervene(AddVector("resid_pre", v, coeff=coeff, layers=layer, positions=positions, rows=rows)):
        pre = resid_pre(model)
    mask = expected_mask(pos[0], arg, b, p)
    if pos[0] == "generated":
        mask[:] = False
    if rows is not None:
        keep = torch.zeros(b, dtype=torch.bool)
        keep[rows] = True
        mask &= keep[:, None]
    for i in range(layer):
        assert torch.equal(pre[i], base[i])
    want = torch.where(mask[..., None], base[layer] + coeff * v, base[layer])
    assert torch.equal(pre[layer], want)
    assert model.n_edits() == 0


@settings(max_examples=20, deadline=None)
@given(
    family=st.sampled_from(["mixtral", "qwen2_moe", "gpt_oss"]),
    layers=st.sampled_from([[0], [1], [0, 1], "all"]),
    writes=st.sets(st.sampled_from(["embed", "resid_pre", "attn", "mlp"]), min_size=1),
    seed=st.integers(0, 1000),
    scale=st.floats(0.125, 64.0, width=32),
)
def test_ablate_direction_property(family, layers, writes, seed, scale):
    model = get_model(family)
    r = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * scale
    rhat = r / r.norm()
    with model.intervene(AblateDirection(r, writes=tuple(sorted(writes)), layers=layers)):
        with torch.no_grad(), model.trace(PROMPTS):
            embed = model.embed.save()
            rows = nnsight.save([])
            for i in range(model.n_layers):
                layer = model.layers[i]
                rows.append((layer.resid_pre, layer.attn_write, layer.mlp_write))
    chosen = [0, 1] if layers == "all" else layers
    if "embed" in writes:
        assert float((embed @ rhat).abs().max()) < 1e-5
    for i in chosen:
        for name, x in zip(("resid_pre", "attn", "mlp"), rows[i]):
            if name in writes:
                assert float((x @ rhat).abs().max()) < 1e-5, (i, name)
    if {"embed", "attn", "mlp"} <= writes and chosen == [0, 1]:
        assert all(float((x @ rhat).abs().max()) < 1e-5 for row in rows for x in row)
    assert model.n_edits() == 0
