"""Interventions: identities for composition, activation addition, selectors, patching, bad input."""

from __future__ import annotations

import functools

import nnsight
import pytest
import torch

from expertlens import Direction, ExpertModel, PointError
from expertlens.interventions import (
    AddVector,
    Compose,
    ExpertSteer,
    ForceExperts,
    MaskExperts,
    MeanAblate,
    Patch,
    Positions,
    RouterBias,
    ScaleExpert,
    ZeroAblate,
    cache_points,
    run_logits,
)
from expertlens.testing import tiny_model, tiny_tokenizer

torch.set_num_threads(1)
FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]  # qwen2_moe/deepseek_v3: shared experts
PROMPTS = ["hello there", "hi", "a b c d e f"]


@functools.cache
def get_model(family: str) -> ExpertModel:
    return ExpertModel(tiny_model(family), tiny_tokenizer())


def vec(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (64,)), generator=torch.Generator().manual_seed(seed))


def clean(model: ExpertModel) -> bool:
    return model.n_edits() == 0 and model.hf_model.config._experts_implementation == "expertlens"


def trace_resid(model: ExpertModel, prompts=PROMPTS):
    with torch.no_grad(), model.trace(prompts):
        pre = nnsight.save([model.layers[i].resid_pre for i in range(model.n_layers)])
        logits = model.logits.save()
    return pre, logits


# ---- identities ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_compose_and_zero_coeff_are_bit_identical(family):
    model = get_model(family)
    _, base = trace_resid(model)
    with model.intervene(Compose()):
        _, empty = trace_resid(model)
    zero = [
        AddVector("resid_pre", vec(0), coeff=0.0, layers="all"),
        ExpertSteer(model.moe_layers[-1], 3, vec(1), coeff=0.0),
        ExpertSteer(model.moe_layers[-1], 3, vec(1), coeff=0.0, weighting="routed_only"),
    ]
    with model.intervene(*zero):
        _, z = trace_resid(model)
    assert torch.equal(base, empty) and torch.equal(base, z)
    assert torch.equal(run_logits(model, PROMPTS, [Compose()]), run_logits(model, PROMPTS))
    assert clean(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_add_vector_resid_pre_exact(family):
    model = get_model(family)
    base, _ = trace_resid(model)
    v, coeff, layer = vec(2), 3.5, model.n_layers - 1
    with model.intervene(AddVector("resid_pre", v, coeff=coeff, layers=layer)):
        pre, _ = trace_resid(model)
    for i in range(layer):
        assert torch.equal(pre[i], base[i])
    assert torch.equal(pre[layer], base[layer] + coeff * v)
    assert clean(model)


def test_add_vector_accepts_direction_dtype_and_device_conversion():
    model = get_model("mixtral")
    v = vec(3)
    with model.intervene(AddVector("resid_pre", v, layers=1)):
        _, a = trace_resid(model)
    with model.intervene(AddVector("resid_pre", Direction(v.double(), layer=1), layers=1)):
        _, b = trace_resid(model)
    assert torch.equal(a, b)


def test_positions_and_rows_masks():
    model = get_model("mixtral")
    base, _ = trace_resid(model)
    p = base[0].shape[1]
    v = vec(4)
    cases = {
        "last2": (Positions.last(2), None, lambda m: m.__setitem__((slice(None), slice(p - 2, p)), True)),
        "idx": (Positions.indices([0, -1]), None, lambda m: m.__setitem__((slice(None), [0, p - 1]), True)),
        "rows": (None, [1], lambda m: m.__setitem__(1, True)),
        "prompt": (Positions.prompt(), None, lambda m: m.fill_(True)),
        "generated": (Positions.generated(), None, lambda m: None),
    }
    for name, (pos, rows, fill) in cases.items():
        want = torch.zeros(base[1].shape[:2], dtype=torch.bool)
        fill(want)
        with model.intervene(AddVector("resid_pre", v, layers=1, positions=pos, rows=rows)):
            pre, _ = trace_resid(model)
        assert torch.equal(pre[1], torch.where(want[..., None], base[1] + v, base[1])), name
    mask = torch.zeros(3, p, dtype=torch.bool)
    mask[2, 3] = True
    with model.intervene(AddVector("resid_pre", v, layers=1, positions=Positions.mask(mask))):
        pre, _ = trace_resid(model)
    assert torch.equal(pre[1], torch.where(mask[..., None], base[1] + v, base[1]))


def test_composition_equals_applying_by_hand():
    model = get_model("qwen2_moe")
    a = AddVector("resid_pre", vec(5), coeff=2.0, layers=1)
    b = ExpertSteer(1, 2, vec(6), coeff=3.0)
    c = MaskExperts({0: [1, 4]})
    composed = run_logits(model, PROMPTS, [a + b + c])
    assert isinstance(a + b + c, Compose) and len((a + b + c).items) == 3
    with model.intervene(a), model.intervene(b), model.intervene(c):
        by_hand = run_logits(model, PROMPTS)
    assert torch.equal(composed, by_hand)
    assert torch.equal(run_logits(model, PROMPTS, [Compose([a, Compose([b, c])])]), composed)
    # same point, order matters: add then zero differs from zero then add
    z = ZeroAblate("resid_pre", layers=1)
    with model.intervene(z + a), model.trace(PROMPTS):
        x1 = model.layers[1].resid_pre.save()
    assert torch.equal(x1, (2.0 * vec(5)).expand_as(x1))
    assert clean(model)


def test_zero_mean_ablate_scale_expert():
    model = get_model("mixtral")
    mu = vec(7)
    with model.intervene(ZeroAblate("attn.output", layers=0), MeanAblate("moe.output", {1: mu})):
        with model.trace(PROMPTS):
            att = model.layers[0].attn.output.save()
            moe = model.layers[1].moe.output.save()
    assert torch.equal(att, torch.zeros_like(att)) and torch.equal(moe, mu.expand_as(moe))
    with model.trace(PROMPTS):
        idx = model.layers[1].moe.topk_indices.save()
        eo = model.layers[1].moe.expert_out.save()
    e = int(idx[0, -1, 0])
    with model.intervene(ScaleExpert(1, e, 0.5)), model.trace(PROMPTS):
        eo2 = model.layers[1].moe.expert_out.save()
    hit = (idx == e)[..., None]
    assert torch.equal(eo2, torch.where(hit, eo * 0.5, eo)) and bool(hit.any())
    assert clean(model)


def test_patch_from_cache_restores_clean_run():
    model = get_model("qwen2_moe")
    clean_prompts, corrupt = ["abcdef", "xyz"], ["abcdeg", "xyw"]
    cache = cache_points(model, clean_prompts, points=["resid_pre", "moe.output"], layers="all")
    assert set(cache) == {(p, i) for p in ("resid_pre", "moe.output") for i in range(2)}
    clean_logits = run_logits(model, clean_prompts, last_only=False)
    patched = run_logits(model, corrupt, [Patch("resid_pre", cache, layers=1)], last_only=False)
    for c, p in zip(clean_logits, patched):
        assert torch.allclose(c, p, atol=1e-6)
    # patching only the last position: earlier positions keep the corrupt run's own values. The corrupt
    # prompts here differ from the clean ones at the first token, so every position of the corrupt run
    # differs from the clean run (a causally identical prefix would make "kept" and "patched" the same).
    early_corrupt = ["zbcdef", "ayz"]
    with model.trace(early_corrupt):
        unpatched = model.layers[0].moe.output.save()
    with model.intervene(Patch("moe.output", cache, layers=0, positions=Positions.last(1))):
        with model.trace(early_corrupt):
            out = model.layers[0].moe.output.save()
    clean_out = cache[("moe.output", 0)]
    assert not torch.allclose(unpatched[:, :-1], clean_out[:, :-1], atol=1e-3)  # the check below can fail
    assert torch.equal(out[:, -1], clean_out[:, -1])
    assert torch.equal(out[:, :-1], unpatched[:, :-1])
    assert clean(model)


# ---- bad input -------------------------------------------------------------------------------

BAD = [
    (lambda m: AddVector("resid_pre", torch.ones(63), layers=0), ValueError, r"shape \(63,\).*\(64,\)"),
    (lambda m: AddVector("resid_pre", torch.full((64,), float("nan")), layers=0), ValueError, "NaN"),
    (lambda m: AddVector("resid_pre", torch.full((64,), float("inf")), layers=0), ValueError, "inf"),
    (lambda m: AddVector("resid_wrong", torch.ones(64), layers=0), PointError, "accepted points"),
    (lambda m: AddVector("resid_pre", torch.ones(64), layers=7), PointError, r"out of range.*0\.\.1"),
    (lambda m: AddVector("moe.output", torch.ones(64), layers=0), PointError, "dense layer"),
    (lambda m: AddVector("embed", torch.ones(64), layers=0), PointError, "model-level"),
    (lambda m: AddVector("resid_pre", "nope", layers=0), TypeError, "Tensor or expertlens.Direction"),
    (lambda m: AddVector("resid_pre", torch.ones(64), coeff=float("nan"), layers=0), ValueError, "coeff"),
    (lambda m: MaskExperts({1: [8]}), PointError, r"expert 8 out of range.*0\.\.7"),
    (lambda m: MaskExperts({1: list(range(7))}), ValueError, "fewer than top_k"),
    (lambda m: ForceExperts({1: [0, 1, 2]}), ValueError, "top_k=2"),
    (lambda m: ForceExperts({1: [0, 7]}), ValueError, "topk_group"),
    (lambda m: ExpertSteer(1, 0, torch.ones(64), weighting="sometimes"), ValueError, "router_prob"),
    (lambda m: RouterBias(torch.zeros(2, 7)), ValueError, r"\[2, 8\]"),
    (lambda m: Patch("resid_pre", torch.zeros(3, 5, 32), layers=1), ValueError, r"\[batch, pos, 64\]"),
    (lambda m: Patch("resid_pre", {("resid_pre", 0): torch.zeros(3, 5, 64)}, layers=1), ValueError, "no"),
    (lambda m: AddVector("resid_pre", torch.ones(64), layers=1, positions="middle"), ValueError, "prompt"),
    (lambda m: Compose([AddVector("resid_pre", torch.ones(64), layers=1), MaskExperts({1: [9]})]),
     PointError, "expert 9"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_is_a_clear_error_and_model_unchanged(case):
    model = get_model("deepseek_v3")
    make, exc, match = BAD[case]
    _, before = trace_resid(model)
    with pytest.raises(exc, match=match):
        with model.intervene(make(model)):
            pass
    assert clean(model)
    _, after = trace_resid(model)
    assert torch.equal(before, after)


def test_runtime_errors_and_exceptions_clean_up():
    model = get_model("deepseek_v3")
    src = cache_points(model, ["abc", "de"], points=["resid_pre"], layers=1)
    with pytest.raises(ValueError, match="source shape"):
        run_logits(model, PROMPTS, [Patch("resid_pre", src, layers=1)])
    assert clean(model)
    with pytest.raises(RuntimeError, match="boom"):
        with model.intervene(AddVector("resid_pre", vec(1), layers=1), MaskExperts({1: [2]})):
            assert model.n_edits() >= 2
            raise RuntimeError("boom")
    assert clean(model)


# ---- Direction -------------------------------------------------------------------------------


def test_direction_save_load_and_algebra(tmp_path):
    d = Direction(vec(8), family="olmoe", layer=1, position=-1, point="resid_pre", method="dim", meta={"n": 3})
    path = d.save(tmp_path / "d.safetensors")
    back = Direction.load(path)
    assert torch.equal(back.vector, d.vector)
    assert (back.family, back.layer, back.position, back.point, back.method, back.meta) == (
        "olmoe", 1, -1, "resid_pre", "dim", {"n": 3},
    )
    # a pickle renamed to .safetensors is refused without being unpickled (it could run code)
    sentinel = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    fake = tmp_path / "fake.safetensors"
    torch.save({"vector": vec(1), "payload": Payload()}, fake)
    with pytest.raises(ValueError, match=r"fake\.safetensors.*is a pickle .* never unpickles"):
        Direction.load(fake)
    assert not sentinel.exists()
    e = Direction(vec(9), family="olmoe", layer=1, method="probe")
    s = d + e
    assert torch.equal(s.vector, d.vector + e.vector) and s.layer == 1 and s.point is None
    assert torch.equal((d - e).vector, d.vector - e.vector) and "-" in (d - e).method
    assert torch.equal((2 * d / 4).vector, d.vector * 2 / 4)
    assert torch.equal((d + torch.ones(64)).vector, d.vector + 1)
    assert torch.allclose(d.unit().norm(), torch.tensor(1.0))
    with pytest.raises(TypeError, match="JSON"):
        Direction(vec(1), meta={"x": object()}).save(tmp_path / "bad.safetensors")
