"""Property tests (hypothesis): random compositions of interventions against a plain-torch hook reference.

Each example draws a composition of interventions (activation additions at several points, direction ablation,
expert masks, forced experts, router biases, activation patching), with random layers, positions, rows, batch
padding, dtype (fp32 / bf16) and run mode (a trace, or short greedy generation with the KV cache on or off). The
reference is a second copy of the same tiny model with ``register_forward_hook`` / ``register_forward_pre_hook`` on
its transformers modules, written from the documented meaning of each intervention and the family's own router
code (no expertlens code runs in it); the logits (forward) or the generated ids (generation) must be equal.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from expertlens import ExpertModel
from expertlens.interventions import (
    AblateDirection,
    AddVector,
    ForceExperts,
    MaskExperts,
    Patch,
    Positions,
    RouterBias,
    cache_points,
)
from expertlens.testing import tiny_model, tiny_tokenizer

torch.set_num_threads(1)

# Families whose router is softmax -> top-k -> renormalise (written out in `_route`); qwen2_moe adds a gated
# shared expert inside the block.
FAMILIES = ("olmoe", "qwen2_moe")
PROMPTS = ("hello there", "hi", "abc d", "xy")
D, E, K = 64, 8, 2
SETTINGS = dict(max_examples=12, deadline=None, derandomize=True, database=None)


@functools.cache
def models(family: str, dtype: torch.dtype) -> tuple[ExpertModel, torch.nn.Module]:
    """The wrapped model and an identical plain transformers copy for the reference."""
    model = ExpertModel(tiny_model(family).to(dtype), tiny_tokenizer())
    ref = tiny_model(family).to(dtype).eval()
    assert all(torch.equal(a, b) for a, b in zip(model.hf_model.state_dict().values(), ref.state_dict().values()))
    return model, ref


# ---- the reference: plain forward hooks ------------------------------------------------------------------------


class Reference:
    """Hooks on a plain transformers model, keeping the absolute padded position of every token they see."""

    def __init__(self, hf: torch.nn.Module, prompt_len: int, batch: int, use_cache: bool):
        self.hf, self.prompt_len, self.batch, self.use_cache = hf, prompt_len, batch, use_cache
        self.offset = self.seen = 0
        self.handles = [hf.register_forward_pre_hook(self._step, with_kwargs=True)]
        self.router_edits: dict[int, list] = {}

    def _step(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        n = ids.shape[1]
        self.offset = self.seen if self.use_cache else 0  # without a cache every step re-reads the whole sequence
        self.seen = self.offset + n

    def select(self, positions: tuple, rows: list[int] | None, p: int) -> torch.Tensor:
        """The ``[b, p]`` mask of a position choice (absolute padded positions) and rows, for this forward."""
        at = torch.arange(self.offset, self.offset + p)
        big_p = self.prompt_len
        kind, arg = positions
        if kind == "all":
            m = torch.ones(p, dtype=torch.bool)
        elif kind == "prompt":
            m = at < big_p
        elif kind == "generated":
            m = at >= big_p
        elif kind == "last":
            m = (at >= big_p - arg) & (at < big_p)
        else:  # indices: negative ones count from the end of the prompt
            m = torch.isin(at, torch.tensor([i if i >= 0 else big_p + i for i in arg]))
        m = m.unsqueeze(0).expand(self.batch, p).clone()
        if rows is not None:
            keep = torch.zeros(self.batch, dtype=torch.bool)
            keep[rows] = True
            m &= keep[:, None]
        return m

    def at(self, layer: int, where: str, fn) -> None:
        """Apply ``fn(x [b, p, d]) -> x`` to a value: ``resid_pre`` (layer input), ``resid_post`` (layer output),
        ``attn`` (attention output), ``mlp`` (MoE block output)."""
        dec = self.hf.model.layers[layer]
        if where == "resid_pre":
            def pre(module, args, kwargs):
                if args:
                    return (fn(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
            self.handles.append(dec.register_forward_pre_hook(pre, with_kwargs=True))
            return
        module = {"resid_post": dec, "attn": dec.self_attn, "mlp": dec.mlp}[where]

        def post(module, args, out):
            return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
        self.handles.append(module.register_forward_hook(post))

    def route(self, layer: int, edit) -> None:
        """Edit layer ``layer``'s pre-softmax logits (``edit(logits [b, p, E]) -> logits``), then route them."""
        if layer not in self.router_edits:
            self.router_edits[layer] = []
            gate = self.hf.model.layers[layer].mlp.gate

            def hook(module, args, out, edits=self.router_edits[layer]):
                h = args[0].reshape(-1, D)
                logits = F.linear(h, module.weight).view(self.batch, -1, E)
                for fn in edits:
                    logits = fn(logits)
                logits = logits.reshape(-1, E)
                # the family's router, as transformers writes it (OlmoeTopKRouter / Qwen2MoeTopKRouter)
                probs = F.softmax(logits, dtype=torch.float, dim=-1)
                top, idx = torch.topk(probs, module.top_k, dim=-1)
                if module.norm_topk_prob:
                    top /= top.sum(dim=-1, keepdim=True)
                return logits, top.to(logits.dtype), idx
            self.handles.append(gate.register_forward_hook(hook))
        self.router_edits[layer].append(edit)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _where(sel: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(sel.view(*sel.shape, *(1,) * (x.dim() - 2)), new, x)


# ---- strategies: one intervention and its reference -------------------------------------------------------------

positions_st = st.one_of(
    st.just(("all", None)), st.just(("prompt", None)), st.just(("generated", None)),
    st.tuples(st.just("last"), st.integers(1, 4)),
    # every prompt has >= 2 tokens: these exist in a trace too (a trace refuses positions past the prompt)
    st.tuples(st.just("indices"), st.lists(st.integers(-2, 1), min_size=1, max_size=2, unique=True)),
)
rows_st = st.sampled_from([None, [0], [1, 2]])


def _positions(pos: tuple) -> Positions:
    kind, arg = pos
    return getattr(Positions, kind)() if arg is None else getattr(Positions, kind)(arg)


@st.composite
def add_vector(draw):
    point = draw(st.sampled_from(["resid_pre", "resid_post", "moe.output"]))
    layer, pos, rows = draw(st.integers(0, 1)), draw(positions_st), draw(rows_st)
    coeff = draw(st.floats(-4, 4, allow_nan=False, width=32))
    v = torch.randn(D, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    iv = AddVector(point, v, coeff=coeff, layers=layer, positions=_positions(pos), rows=rows)

    def ref(r: Reference):
        where = {"moe.output": "mlp"}.get(point, point)
        # the vector is converted to the model's dtype first (check_vector), then scaled
        r.at(layer, where, lambda x: _where(r.select(pos, rows, x.shape[1]), x + coeff * v.to(x), x))
    return iv, ref


@st.composite
def ablate_direction(draw):
    writes = tuple(sorted(draw(st.sets(st.sampled_from(["resid_pre", "attn", "mlp"]), min_size=1))))
    layers = draw(st.sampled_from([[0], [1], [0, 1]]))
    d = torch.randn(D, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    iv = AblateDirection(d, writes=writes, layers=layers)
    def ablate(x):
        # r̂ from the direction in the model's dtype (check_vector converts it), normalised in float64 (no underflow)
        dd = d.to(x.dtype).double()
        u = (dd / dd.norm()).float().to(x)
        return x - (x @ u).unsqueeze(-1) * u

    def ref(r: Reference):
        for layer in layers:
            for w in writes:
                r.at(layer, w, ablate)
    return iv, ref


@st.composite
def routing(draw, taken: set):
    """A router-logit edit on one layer; ``taken``: experts already masked or forced there (conflicts refused)."""
    kind, layer = draw(st.sampled_from(["mask", "force", "bias"])), draw(st.integers(0, 1))
    free = [e for e in range(E) if (layer, e) not in taken]
    pos, rows = draw(positions_st), draw(rows_st)
    if kind == "bias":
        b = torch.randn(E, generator=torch.Generator().manual_seed(draw(st.integers(0, 999)))) * 3
        iv = RouterBias({layer: b}, positions=_positions(pos), rows=rows)

        def edit(r, logits):
            return logits + b.to(logits)
    else:
        most = E - K - sum(1 for (lay, _) in taken if lay == layer) if kind == "mask" else K
        chosen = draw(st.lists(st.sampled_from(free), min_size=1, max_size=max(1, min(most, 3)), unique=True))
        taken.update((layer, e) for e in chosen)
        idx = torch.tensor(chosen)
        if kind == "mask":
            iv = MaskExperts({layer: chosen}, positions=_positions(pos), rows=rows)

            def edit(r, logits):
                new = logits.clone()
                new[..., idx] = float("-inf")
                return new
        else:
            margin = draw(st.sampled_from([0.5, 1.0, 4.0]))
            iv = ForceExperts({layer: chosen}, margin=margin, positions=_positions(pos), rows=rows)

            def edit(r, logits):  # each forced logit raised to beat the best other expert by the margin
                others = torch.ones(E, dtype=torch.bool)
                others[idx] = False
                best = logits.masked_fill(~others, float("-inf")).max(-1, keepdim=True).values
                new = logits.clone()
                new[..., idx] = torch.maximum(logits[..., idx], best + margin)
                return new

    def ref(r: Reference):
        r.route(layer, lambda logits: _where(r.select(pos, rows, logits.shape[1]), edit(r, logits), logits))
    return iv, ref


@st.composite
def composition(draw, patch_ok: bool):
    taken: set = set()
    n = draw(st.integers(1, 3))
    parts = []
    for _ in range(n):
        kind = draw(st.sampled_from(["add", "ablate", "route", "route", "patch"] if patch_ok else
                                    ["add", "ablate", "route", "route"]))
        if kind == "add":
            parts.append(draw(add_vector()))
        elif kind == "ablate":
            parts.append(draw(ablate_direction()))
        elif kind == "route":
            parts.append(draw(routing(taken)))
        else:
            parts.append(("patch", draw(st.integers(0, 1)), draw(st.sampled_from([("all", None), ("last", 2)]))))
    return parts


# ---- the tests -----------------------------------------------------------------------------------------------------


def _encode(model: ExpertModel, prompts: list[str]):
    return model.tokenizer(prompts, return_tensors="pt", padding=True)


def _forward_inputs(enc) -> dict:
    """A trace's inputs: nnsight passes each row's own positions (left padding skipped), as generate does."""
    return {**enc, "position_ids": (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)}


def _source_stream(model: ExpertModel, hf: torch.nn.Module, source: list[str], layer: int) -> torch.Tensor:
    """The clean source run's residual stream entering ``layer``, read with a hook on the plain copy."""
    seen = {}
    h = hf.model.layers[layer].register_forward_pre_hook(
        lambda m, a, k: seen.update(x=(a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            hf(**_forward_inputs(_encode(model, source)))
    finally:
        h.remove()
    return seen["x"]


def _build(parts, model: ExpertModel, ref: Reference, prompts: list[str], source: list[str]):
    """Interventions in order, and the same edits in order on the reference; a patch caches the clean source run
    (before any reference hook is in place)."""
    sources = {part[1]: _source_stream(model, ref.hf, source, part[1]) for part in parts if part[0] == "patch"}
    ivs = []
    for part in parts:
        if part[0] == "patch":
            _, layer, pos = part
            clean = cache_points(model, source, points=["resid_pre"], layers=layer)
            ivs.append(Patch("resid_pre", clean, layers=layer, positions=_positions(pos)))
            ref.at(layer, "resid_pre", lambda x, src=sources[layer], pos=pos: _where(
                ref.select(pos, None, x.shape[1]), src.to(x), x))
        else:
            iv, add_ref = part
            ivs.append(iv)
            add_ref(ref)
    return ivs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(**SETTINGS)
@given(data=st.data())
def test_compositions_in_a_trace_match_plain_torch_hooks(dtype, data):
    family = data.draw(st.sampled_from(FAMILIES), "family")
    prompts = data.draw(st.lists(st.sampled_from(PROMPTS), min_size=3, max_size=3), "prompts")
    parts = data.draw(composition(patch_ok=True), "interventions")
    model, hf = models(family, dtype)
    enc = _encode(model, prompts)
    b, p = enc["input_ids"].shape
    longest = max(len(s) for s in prompts)
    source = [s[::-1].ljust(longest, "q") for s in prompts]  # the same padded length: batch-relative patching
    ref = Reference(hf, p, b, use_cache=False)
    try:
        ivs = _build(parts, model, ref, prompts, source)
        with torch.no_grad():
            want = hf(**_forward_inputs(enc)).logits
    finally:
        ref.close()
    with torch.no_grad(), model.intervene(*ivs), model.trace(prompts):
        got = model.logits.save()
    assert torch.equal(got, want), (parts, (got - want).abs().max())
    assert model.n_edits() == 0


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@settings(**SETTINGS)
@given(data=st.data())
def test_compositions_in_generation_match_plain_torch_hooks(use_cache, data):
    family = data.draw(st.sampled_from(FAMILIES), "family")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), "dtype")
    prompts = data.draw(st.lists(st.sampled_from(PROMPTS), min_size=3, max_size=3), "prompts")
    parts = data.draw(composition(patch_ok=False), "interventions")
    model, hf = models(family, dtype)
    enc = _encode(model, prompts)
    b, p = enc["input_ids"].shape
    kwargs = dict(max_new_tokens=3, do_sample=False, use_cache=use_cache, pad_token_id=model.tokenizer.pad_token_id)
    ref = Reference(hf, p, b, use_cache=use_cache)
    try:
        ivs = _build(parts, model, ref, prompts, [])
        with torch.no_grad():
            want = hf.generate(**enc, **kwargs)
    finally:
        ref.close()
    with torch.no_grad(), model.intervene(*ivs):
        got = model.hf_model.generate(**enc, **kwargs)
    assert torch.equal(got, want), (parts, got, want)
    assert model.n_edits() == 0


def test_run_logits_of_a_padded_row_equal_the_prompt_alone_in_bf16():
    """Plain calls pass each row's own position_ids (as a trace and generate do): a left-padded row's logits do
    not depend on the prompts it is batched with, even in bf16 where shifted RoPE positions round differently."""
    from expertlens.interventions import run_logits

    model, _ = models("olmoe", torch.bfloat16)
    batched = run_logits(model, ["hello there", "xy"])
    alone = run_logits(model, ["xy"])
    assert torch.equal(batched[1], alone[0])
