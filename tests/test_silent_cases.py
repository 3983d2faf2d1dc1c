"""Issue 24, item 4: inputs that used to give a silently wrong result.

Each case now either gives the right value (checked against plain torch / a hand computation) or
raises an error whose message names what was wrong and what is accepted.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from expertlens import Direction, ExpertModel, PointError
from expertlens.attribution import LogitDiff
from expertlens.interventions import (
    AblateDirection,
    AddVector,
    ForceExperts,
    MaskExperts,
    MeanAblate,
    OrthogonalizeWeights,
    Positions,
    RouterBias,
    run_logits,
)
from expertlens.testing import tiny_model, tiny_tokenizer

torch.set_num_threads(1)
PROMPT = "the quick brown fox, ok"  # 23 characters = 23 tokens of the tiny tokenizer


@functools.cache
def get(family: str = "olmoe") -> ExpertModel:
    return ExpertModel(tiny_model(family), tiny_tokenizer())


def vec(seed: int = 0, d: int = 64) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def no_hooks_left(model: ExpertModel) -> bool:
    return all(not m._forward_hooks for m in model.hf_model.modules() if type(m).__name__ == "HookPoint")


# ---- writes inside a trace -------------------------------------------------------------------

def _nan_logits(m):
    m.layers[0].moe.router_logits[..., 0] = float("nan")


def _bad_ids(m):
    m.layers[0].moe.topk_indices[..., 0] = 99


def _nan_resid(m):
    m.layers[0].resid_post[:, 0] = float("nan")


def _iadd_nan(m):
    m.layers[0].moe.router_logits += float("nan")


def _clamp_weights(m):
    m.layers[1].moe.topk_weights.fill_(float("inf"))


@pytest.mark.parametrize(
    "write, parts",
    [
        (_nan_logits, ("layers[0].moe.router_logits", "NaN or +inf", "-inf for experts")),
        (_bad_ids, ("layers[0].moe.topk_indices", "expert ids must be in 0..7", "got [99]")),
        (_nan_resid, ("layers[0].resid_post", "NaN or inf", "only finite values")),
        (_iadd_nan, ("layers[0].moe.router_logits", "NaN or +inf")),
        (_clamp_weights, ("layers[1].moe.topk_weights", "NaN or inf", "only finite values")),
    ],
    ids=["indexed-nan-logits", "indexed-ids-99", "indexed-nan-resid", "iadd-nan", "fill-inf-weights"],
)
def test_in_place_writes_pass_the_write_checks(write, parts):
    model = get()
    with pytest.raises(PointError) as info:
        with torch.no_grad(), model.trace(PROMPT):
            write(model)
            model.logits.save()
    for part in parts:
        assert part in str(info.value)
    assert no_hooks_left(model)


def test_in_place_edits_that_pass_still_apply():
    """``router_logits[..., 5] += 100`` (the README idiom) still routes every token to expert 5, and -inf masks."""
    model = get()
    with torch.no_grad(), model.trace(PROMPT):
        model.layers[0].moe.router_logits[..., 5] += 100.0
        model.layers[0].moe.router_logits[..., 2] = float("-inf")
        idx = model.layers[0].moe.topk_indices.save()
    assert (idx == 5).any(-1).all() and not (idx == 2).any()
    assert no_hooks_left(model)


def test_plain_assignment_of_masked_logits_is_accepted():
    model = get()
    with torch.no_grad(), model.trace(PROMPT):
        logits = model.layers[0].moe.router_logits
        new = logits.clone()
        new[..., 3] = float("-inf")
        model.layers[0].moe.router_logits = new
        idx = model.layers[0].moe.topk_indices.save()
    assert not (idx == 3).any()


def test_in_place_edit_of_one_expert_reaches_the_model():
    """``experts[e].output`` is a gathered copy: an in-place edit is written back into ``expert_out``."""
    model = get()
    with torch.no_grad(), model.trace(PROMPT):
        idx = model.layers[0].moe.topk_indices.save()
    e = int(idx[0, 0, 0])
    with torch.no_grad(), model.trace(PROMPT):
        model.layers[0].moe.experts[e].output[:] = 0.0
        out = model.layers[0].moe.expert_out.save()
    assert (out[idx == e] == 0).all() and (out[idx != e] != 0).any(-1).all()


def test_in_place_edit_of_head_out_is_refused():
    model = get()
    with pytest.raises(PointError, match=r"layers\[0\]\.attn\.head_out was edited in place.*assign the point"):
        with torch.no_grad(), model.trace(PROMPT):
            model.layers[0].attn.head_out[..., 0, :] = 0.0
            model.logits.save()
    assert no_hooks_left(model)


def test_complex_write_is_refused():
    model = get()
    with pytest.raises(TypeError, match=r"layers\[0\]\.resid_post: the point holds real .* got complex"):
        with torch.no_grad(), model.trace(PROMPT):
            model.layers[0].resid_post = torch.ones(1, 23, 64, dtype=torch.complex64)


@pytest.mark.parametrize("point", ["resid_post", "moe.router_logits"])
def test_wrong_shape_indexed_write_names_the_point(point):
    model = get()
    with pytest.raises(PointError, match=rf"wrong shape .*point read last was model\.layers\[0\]\.{point}"):
        with torch.no_grad(), model.trace(PROMPT):
            target = model.layers[0].moe if point.startswith("moe.") else model.layers[0]
            getattr(target, point.removeprefix("moe."))[..., 0] = torch.zeros(7)


@pytest.mark.parametrize("what", ["read", "written"])
def test_point_outside_a_trace(what):
    model = get()
    with pytest.raises(PointError, match=rf"model\.layers\[0\]\.moe\.router_logits can only be {what} "
                                         r"inside `with model\.trace"):
        if what == "read":
            model.layers[0].moe.router_logits  # noqa: B018
        else:
            model.layers[0].moe.router_logits = torch.zeros(1, 2, 8)


# ---- generation without a KV cache -----------------------------------------------------------

def _greedy_reference(model: ExpertModel, v: torch.Tensor, positions, n: int) -> list[int]:
    """Plain torch: a greedy loop over the whole sequence, adding ``v`` to layer 0's output at ``positions``."""
    ids = model.tokenize(PROMPT)["input_ids"]
    plen = ids.shape[1]
    layer = model.hf_model.get_submodule(model.layout[0].path)

    def hook(module, args, out):
        sel = torch.tensor([p in positions(plen, out.shape[1]) for p in range(out.shape[1])])
        return out + sel.view(1, -1, 1) * v

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for _ in range(n):
                logits = model.hf_model(input_ids=ids, use_cache=False).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        handle.remove()
    return ids[0].tolist()


@pytest.mark.parametrize(
    "positions, pick",
    [(Positions.last(1), lambda plen, p: [plen - 1]), ("generated", lambda plen, p: range(plen, p))],
    ids=["last1", "generated"],
)
@pytest.mark.parametrize("use_cache", [False, True])
def test_generate_steps_without_a_cache(positions, pick, use_cache):
    model = get()
    v = 3.0 * vec(1)
    steer = AddVector("resid_post", v, layers=0, positions=positions)
    with model.intervene(steer), torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=5, do_sample=False, use_cache=use_cache) as tracer:
            out = tracer.result.save()
    assert out[0].tolist() == _greedy_reference(model, v, pick, 5)


# ---- granite's layer-level shared MLP, granitemoehybrid's mamba layers -----------------------

@pytest.mark.parametrize("family", ["granitemoeshared", "granitemoehybrid"])
def test_directional_ablation_reaches_the_layer_level_shared_mlp(family):
    model = get(family)
    d = vec(2)
    d = d / d.norm()
    got = {}
    for name, iv in [("none", None), ("act", AblateDirection(d)), ("weights", OrthogonalizeWeights(d))]:
        with model.intervene(*([iv] if iv else [])), torch.no_grad(), model.trace(PROMPT):
            resid = [model.layers[i].resid_post.save() for i in range(model.n_layers)]
            got[name] = (torch.stack([r @ d for r in resid]).abs().max(), model.logits.save())
    assert got["none"][0] > 0.5
    assert got["act"][0] < 1e-4 and got["weights"][0] < 1e-4
    torch.testing.assert_close(got["act"][1], got["weights"][1], atol=1e-4, rtol=1e-4)


# ---- refusals --------------------------------------------------------------------------------

def _steer(vector=None, **kwargs):
    return AddVector("resid_pre", vec() if vector is None else vector, **{"layers": 0, **kwargs})


REFUSED = [
    ("nested-mask-force", lambda m: _nested(m), ValueError,
     ("expert 3 at layer 1", "MaskExperts (#1, attached earlier)", "ForceExperts (#1)")),
    ("routerbias-keys", lambda m: run_logits(m, PROMPT, RouterBias({1: torch.zeros(8), -1: torch.ones(8)})),
     ValueError, ("keys 1 and -1 both name layer 1", "give each layer once")),
    ("meanablate-keys", lambda m: run_logits(m, PROMPT, MeanAblate("resid_pre", {1: vec(), -1: vec(1)})),
     ValueError, ("keys 1 and -1 both name layer 1",)),
    ("rows-bools", lambda m: run_logits(m, [PROMPT, "hi"], _steer(rows=[True, False])), TypeError,
     ("rows=[True, False]", "bools are not row numbers", "torch.tensor([True, False])")),
    ("rows-float", lambda m: run_logits(m, [PROMPT, "hi"], _steer(rows=[0.9])), TypeError,
     ("element 0.9 is a float", "a list of row numbers")),
    ("indices-float", lambda m: Positions.indices([1.7]), TypeError, ("element 1.7 is a float", "accepted are ints")),
    ("last-bool", lambda m: Positions.last(True), ValueError, ("positive int, got True",)),
    ("position-past-end", lambda m: run_logits(m, PROMPT, _steer(positions=[50])), ValueError,
     ("position 50 is past the end of this 23-token", "accepted are 0..22 or -23..-1")),
    ("position-before-start", lambda m: run_logits(m, PROMPT, _steer(positions=[-100])), ValueError,
     ("position -100 is before the start of the 23-token", "accepted are -23..-1")),
    ("layers-empty-slice", lambda m: run_logits(m, PROMPT, _steer(layers=slice(5, 9))), PointError,
     ("layers=slice(5, 9, None) selects no layer", "2 layers (0..1)")),
    ("mask-rows", lambda m: run_logits(m, [PROMPT, "hi"], _steer(positions=Positions.mask(torch.ones(3, 23,
                                                                                                  dtype=torch.bool)))),
     ValueError, ("Positions.mask has 3 rows but the batch has 2", "a [2, total] one")),
    ("complex-vector", lambda m: run_logits(m, PROMPT, _steer(vector=vec().to(torch.complex64))), TypeError,
     ("complex dtype", "accepted are real")),
    ("logitdiff-bools", lambda m: LogitDiff([True], [False]), TypeError,
     ("positive token True is a bool", "accepted are token ids (ints) and token strings")),
    ("logitdiff-str", lambda m: LogitDiff("Sure"), TypeError, ("positive='Sure' must be a list", "['Sure']")),
    ("run-logits-empty", lambda m: run_logits(m, ["hi", ""]), ValueError,
     ("prompt 1 ('') is empty", "at least one token")),
    ("trace-empty", lambda m: _trace_empty(m), ValueError, ("the prompt is empty", "at least one token")),
    ("direction-family", lambda m: run_logits(m, PROMPT, _steer(vector=Direction(vec(), family="qwen3_moe"))),
     ValueError, ("computed on a 'qwen3_moe' model; this model is 'olmoe'", "direction.vector")),
]


def _nested(model):
    with model.intervene(MaskExperts({1: [3]})), model.intervene(ForceExperts({1: [3]})):
        pass


def _trace_empty(model):
    with model.trace(""):
        pass


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused(case):
    _, run, exc, parts = case
    model = get()
    with pytest.raises(exc) as info:
        run(model)
    for part in parts:
        assert part in str(info.value), str(info.value)
    assert model.n_edits() == 0


def test_coeff_overflowing_fp16_is_refused():
    model = ExpertModel(tiny_model("olmoe").half(), tiny_tokenizer())
    with pytest.raises(ValueError, match=r"coeff 100000 × vector overflows the model's torch.float16 .* lower coeff"):
        with model.intervene(AddVector("resid_pre", torch.ones(64), coeff=1e5, layers=0)):
            pass
    assert model.n_edits() == 0


def test_nan_direction_is_not_saved(tmp_path: Path):
    path = tmp_path / "d.safetensors"
    with pytest.raises(ValueError, match=r"Direction\.save\(.*'vector' contains NaN or inf; only finite"):
        Direction(torch.full((4,), float("nan"))).save(path)
    assert not path.exists()


def test_nested_mask_force_on_different_experts_is_fine():
    """Only the same (layer, expert) conflicts; after the outer block ends its claims are gone."""
    model = get()
    with model.intervene(MaskExperts({1: [3]})), model.intervene(ForceExperts({1: [4]})):
        pass
    with model.intervene(ForceExperts({1: [3]})):
        pass
