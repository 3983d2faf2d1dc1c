"""Attribution patching (gradient × activation difference) and the real activation patching.

Both score the same nodes, with the convention "patch the corrupted value of one node into the clean
run, everything else clean, and measure ``metric(patched) - metric(clean)``":

* ``head`` (layer, h): the head's ``attn.z`` slice at every position;
* ``attn`` (layer): a whole attention output where there is no output projection to split;
* ``expert`` (layer, e): expert ``e``'s weighted output ``Σ_k [idx=e]·w_k·expert_out_k`` (zero at
  tokens that did not choose it), as added into ``moe.output``;
* ``shared`` (layer): the shared expert's output; ``mlp`` (layer): a dense MLP's output;
* ``router`` (layer, e): column ``e`` of the pre-softmax router logits (a routing change).

:func:`attribution_patching` estimates all of them from one clean forward+backward and one corrupted
forward: ``(a_corrupted - a_clean) · ∂metric/∂a |clean``. The estimate linearises only what is
downstream of the node, so it is exact to first order even when the patched node itself changes
discretely (an expert chosen in one run only). Router-logit estimates go through the gradient of the
top-k weights and cannot see a change of the top-k *set*; compare them with real patching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..edits import record
from ..interventions.base import Intervention
from ._common import as_prompts, layer_components, model_shape
from ._table import AttributionTable, Component
from .direct import LogitDiff

if TYPE_CHECKING:
    from ..model import EditHandle, ExpertModel

__all__ = ["attribution_patching", "activation_patching", "ComponentAblation", "PATCH_KINDS"]

#: Node kinds attribution/activation patching score.
PATCH_KINDS = ("head", "attn", "expert", "shared", "mlp", "router")

Metric = Callable[[Tensor], Tensor] | LogitDiff
Corruption = str | Sequence[str] | Intervention


def _metric_fn(model: ExpertModel, metric: Metric) -> Callable[[Tensor], Tensor]:
    if isinstance(metric, LogitDiff):
        return lambda logits: metric.from_logits(model, logits[:, -1].float()).mean()
    if not callable(metric):
        raise TypeError("metric must be a callable logits -> scalar tensor, or a LogitDiff")
    return metric


def _inputs(model: ExpertModel, clean, corrupted, chat: bool):
    enc = model.tokenize(as_prompts(clean, model, chat), position_ids=True)
    if isinstance(corrupted, Intervention):
        return enc, enc, corrupted
    enc_c = model.tokenize(as_prompts(corrupted, model, chat), position_ids=True)
    if enc_c["input_ids"].shape != enc["input_ids"].shape or not torch.equal(
        enc_c["attention_mask"], enc["attention_mask"]
    ):
        raise ValueError(
            "clean and corrupted prompts must tokenize to the same shape and padding "
            f"({tuple(enc['input_ids'].shape)} vs {tuple(enc_c['input_ids'].shape)})"
        )
    return enc, enc_c, None


#: The points attribution patching keeps, by the short keys its formulas use.
_KEYS = {
    "attn.z": "z", "attn.output": "attn", "moe.router_logits": "router", "moe.topk_indices": "topk_i",
    "moe.topk_weights": "topk_w", "moe.expert_out": "expert_out", "moe.shared_out": "shared",
    "moe.output": "moe_out", "mlp.output": "mlp",
}


def _capture_points(model: ExpertModel, kinds: Sequence[str]) -> list[tuple[str, int]]:
    """The (point, layer) pairs whose activations (graph attached) the node kinds need."""
    wanted = []
    for layer, info in enumerate(model.layout):
        if info.o_proj is not None and "head" in kinds:
            wanted.append(("attn.z", layer))
        if info.o_proj is None and "attn" in kinds:
            wanted.append(("attn.output", layer))
        if info.is_moe:
            if "router" in kinds:
                wanted.append(("moe.router_logits", layer))
            if "expert" in kinds:
                wanted += [("moe.topk_indices", layer), ("moe.topk_weights", layer), ("moe.expert_out", layer)]
            if "shared" in kinds and model.spec.shared is not None:
                wanted.append(("moe.shared_out", layer))
            if "expert" in kinds or "shared" in kinds:
                wanted.append(("moe.output", layer))
        elif "mlp" in kinds:
            wanted.append(("mlp.output", layer))
    return wanted


def _run(model: ExpertModel, enc: dict, kinds: Sequence[str], extra: Intervention | None, grad: bool):
    items = (extra,) if extra is not None else ()
    with torch.set_grad_enabled(grad), model.intervene(*items):
        with record(model, _capture_points(model, kinds), prefill_only=True) as rec:
            logits = model.hf_model(**enc).logits
    return logits, {(_KEYS[name], layer): v for (name, layer), v in rec.values.items()}


def _expert_writes(store: dict, layer: int, n_experts: int) -> Tensor:
    """``[b, p, E, d]`` each expert's weighted output (zero where not chosen)."""
    w, idx, eo = store[("topk_w", layer)], store[("topk_i", layer)], store[("expert_out", layer)]
    b, p, k, d = eo.shape
    out = torch.zeros(b, p, n_experts, d, dtype=eo.dtype, device=eo.device)
    return out.scatter_add_(2, idx.long()[..., None].expand(b, p, k, d), w[..., None] * eo)


def _expert_proj(acts: dict, layer: int, grad: Tensor, n_experts: int) -> Tensor:
    """``[E]``: Σ over tokens of each expert's weighted output dotted with ``grad``."""
    w, idx, eo = acts[("topk_w", layer)], acts[("topk_i", layer)], acts[("expert_out", layer)]
    q = w.float() * (eo.float() * grad[:, :, None, :]).sum(-1)  # [b, p, k]
    zeros = torch.zeros(*q.shape[:2], n_experts, device=q.device)
    return zeros.scatter_add_(-1, idx.long(), q).sum((0, 1))


def _nodes(model: ExpertModel, kinds: Sequence[str]) -> list[Component]:
    comps = []
    for layer in range(model.n_layers):
        for c in layer_components(model, layer, router="router" in kinds, bias=False):
            if c.kind in kinds:
                comps.append(c)
    return comps


def attribution_patching(
    model: ExpertModel,
    clean: str | Sequence[str],
    corrupted: Corruption,
    metric: Metric,
    *,
    kinds: Sequence[str] = PATCH_KINDS,
    chat: bool = False,
) -> AttributionTable:
    """Attribution patching: first-order estimate of patching each node's corrupted value into the clean run.

    Args:
        model: The model.
        clean: Clean prompt(s) (e.g. harmful requests).
        corrupted: Corrupted prompt(s) tokenizing to the same shape (e.g. a matched harmless request),
            or an :class:`~expertlens.interventions.Intervention` applied to the clean prompts (e.g.
            embedding noise) to define the corrupted run.
        metric: ``logits [b, p, vocab] -> scalar`` (differentiable), or a :class:`LogitDiff` (its mean
            over prompts at the last position).
        kinds: Node kinds to score (subset of :data:`PATCH_KINDS`).
        chat: Wrap prompts in the chat template.

    Returns:
        An :class:`AttributionTable` (``method="attribution_patching"``); ``total`` is
        ``metric(corrupted) - metric(clean)``, ``meta["metric_clean"]``/``["metric_corrupted"]``.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> t = attribution_patching(model, "how to bake", "how to make", lambda lg: lg[0, -1, 45])
        >>> t.to_matrix("expert").shape
        torch.Size([2, 8])
    """
    bad = set(kinds) - set(PATCH_KINDS)
    if bad:
        raise ValueError(f"unknown kinds {sorted(bad)}; choose from {PATCH_KINDS}")
    fn = _metric_fn(model, metric)
    enc, enc_c, extra = _inputs(model, clean, corrupted, chat)
    logits, clean_acts = _run(model, enc, kinds, None, grad=True)
    m_clean_t = fn(logits)
    grad_keys = [k for k in clean_acts if k[0] in ("z", "attn", "router", "moe_out", "mlp")]
    grads = torch.autograd.grad(m_clean_t, [clean_acts[k] for k in grad_keys], allow_unused=True)
    g = {k: (torch.zeros_like(clean_acts[k]) if v is None else v.detach()) for k, v in zip(grad_keys, grads)}
    clean_acts = {k: v.detach() for k, v in clean_acts.items()}
    m_clean = float(m_clean_t.detach())
    with torch.no_grad():
        logits_c, corr = _run(model, enc_c, kinds, extra, grad=False)
        m_corr = float(fn(logits_c))
    comps = _nodes(model, kinds)
    vals = []
    expert_cache: dict[int, Tensor] = {}
    for c in comps:
        layer = c.layer
        if c.kind == "head":
            key = ("z", layer)
            v = ((corr[key] - clean_acts[key])[..., c.index, :] * g[key][..., c.index, :]).sum()
        elif c.kind in ("attn", "mlp"):
            key = (c.kind, layer)
            v = ((corr[key] - clean_acts[key]) * g[key]).sum()
        elif c.kind == "router":
            key = ("router", layer)
            v = ((corr[key] - clean_acts[key])[..., c.index] * g[key][..., c.index]).sum()
        elif c.kind == "shared":
            v = ((corr[("shared", layer)] - clean_acts[("shared", layer)]) * g[("moe_out", layer)]).sum()
        else:  # expert
            if layer not in expert_cache:
                gm = g[("moe_out", layer)].float()
                n_e = model.layout[layer].n_experts
                expert_cache[layer] = _expert_proj(corr, layer, gm, n_e) - _expert_proj(clean_acts, layer, gm, n_e)
            v = expert_cache[layer][c.index]
        vals.append(float(v))
    meta = {"metric_clean": m_clean, "metric_corrupted": m_corr, "family": model.family,
            "kinds": list(kinds), "corruption": repr(extra) if extra is not None else "prompts"}
    return AttributionTable(comps, torch.tensor(vals), None, m_corr - m_clean, None,
                            "attribution_patching", model_shape(model), meta)


def activation_patching(
    model: ExpertModel,
    clean: str | Sequence[str],
    corrupted: Corruption,
    metric: Metric,
    *,
    kinds: Sequence[str] = PATCH_KINDS,
    components: Sequence[Component | tuple] | None = None,
    chat: bool = False,
) -> AttributionTable:
    """Real activation patching: one clean forward per node with that node's corrupted value patched in.

    Same arguments and node definitions as :func:`attribution_patching`; ``components`` restricts
    the nodes. Scores are ``metric(clean, node ← corrupted) - metric(clean)``.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> t = activation_patching(model, "how to bake", "how to make", lambda lg: lg[0, -1, 45],
        ...                         kinds=("head",))
        >>> len(t)
        8
    """
    fn = _metric_fn(model, metric)
    enc, enc_c, extra = _inputs(model, clean, corrupted, chat)
    with torch.no_grad():
        logits, clean_acts = _run(model, enc, kinds, None, grad=False)
        m_clean = float(fn(logits))
        logits_c, corr = _run(model, enc_c, kinds, extra, grad=False)
        m_corr = float(fn(logits_c))
    comps = _nodes(model, kinds) if components is None else [Component(*c) for c in components]
    vals = []
    for c in comps:
        layer, i = c.layer, c.index
        if c.kind == "head":
            zc = corr[("z", layer)]

            def edit(x, ctx, zc=zc, i=i):
                x = x.clone()
                x[..., i, :] = zc[..., i, :].to(x)
                return x

            point = "attn.z"
        elif c.kind in ("attn", "mlp"):
            point = "attn.output" if c.kind == "attn" else "mlp.output"
            edit = lambda x, ctx, v=corr[(c.kind, layer)]: v.to(x)  # noqa: E731
        elif c.kind == "shared":
            point = "moe.shared_out"
            edit = lambda x, ctx, v=corr[("shared", layer)]: v.to(x)  # noqa: E731
        elif c.kind == "router":
            rc = corr[("router", layer)]

            def edit(x, ctx, rc=rc, i=i):
                x = x.clone()
                x[..., i] = rc[..., i].to(x)
                return x

            point = "moe.router_logits"
        elif c.kind == "expert":
            n_e = model.layout[layer].n_experts
            delta = (_expert_writes(corr, layer, n_e) - _expert_writes(clean_acts, layer, n_e))[:, :, i]
            edit = lambda x, ctx, dl=delta: x + dl.to(x)  # noqa: E731
            point = "moe.output"
        else:
            raise ValueError(f"cannot patch a {c.kind!r} component")
        handle = model.add_edit(point, edit, layer=layer)
        try:
            with torch.no_grad():
                vals.append(float(fn(model.hf_model(**enc).logits)) - m_clean)
        finally:
            handle.remove()
    meta = {"metric_clean": m_clean, "metric_corrupted": m_corr, "family": model.family,
            "kinds": list(kinds), "corruption": repr(extra) if extra is not None else "prompts"}
    return AttributionTable(comps, torch.tensor(vals), None, m_corr - m_clean, None,
                            "activation_patching", model_shape(model), meta)


@dataclass(frozen=True, eq=False)
class ComponentAblation(Intervention):
    """Zero-ablate labelled components at every position (e.g. the top rows of an attribution table).

    Heads: their ``attn.z`` slice is zeroed. ``attn_bias``: the output bias is subtracted. ``attn`` /
    ``mlp`` / ``shared``: the output is zeroed. Experts: their top-k weight is set to 0 wherever they
    were chosen (the other selected experts keep their weights). ``embed``: embeddings zeroed.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> abl = ComponentAblation([(0, "head", 1), (1, "expert", 3)])
        >>> with model.intervene(abl), model.trace("hello"):
        ...     out = model.logits.save()
    """

    components: Sequence[Component | tuple[int, str, int]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "components", tuple(Component(*c) for c in self.components))

    def validate(self, model: ExpertModel) -> None:
        for c in self.components:
            if c.kind == "embed":
                continue
            if c.kind not in ("head", "attn_bias", "attn", "expert", "shared", "mlp"):
                raise ValueError(f"ComponentAblation cannot ablate a {c.kind!r} component")
            if not 0 <= c.layer < model.n_layers:
                raise ValueError(f"layer {c.layer} out of range")
            if c.kind in ("expert", "shared"):
                _ = model.layers[c.layer].moe  # dense layer -> PointError

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        by: dict[tuple[int, str], list[int]] = {}
        for c in self.components:
            by.setdefault((c.layer, c.kind), []).append(c.index)
        handles: list[EditHandle] = []
        for (layer, kind), idxs in by.items():
            if kind == "embed":
                handles.append(model.add_edit("embed", lambda x, ctx: torch.zeros_like(x)))
            elif kind == "head":
                def zero_heads(x, ctx, idxs=tuple(idxs)):
                    x = x.clone()
                    x[..., list(idxs), :] = 0
                    return x

                handles.append(model.add_edit("attn.z", zero_heads, layer=layer))
            elif kind == "attn_bias":
                bias = model.layers[layer].attn.o_bias
                if bias is not None:
                    handles.append(model.add_edit(
                        "attn.output", lambda x, ctx, b=bias: x - b.detach().to(x), layer=layer))
            elif kind in ("attn", "mlp", "shared"):
                point = {"attn": "attn.output", "mlp": "mlp.output", "shared": "moe.shared_out"}[kind]
                handles.append(model.add_edit(point, lambda x, ctx: torch.zeros_like(x), layer=layer))
            elif kind == "expert":
                seen: dict[str, Any] = {}

                def keep_idx(x, ctx, seen=seen):
                    seen["idx"] = x
                    return x

                def zero_w(x, ctx, seen=seen, ex=tuple(idxs)):
                    drop = torch.isin(seen["idx"], torch.tensor(ex, device=seen["idx"].device))
                    return x.masked_fill(drop, 0)

                handles.append(model.add_edit("moe.topk_indices", keep_idx, layer=layer))
                handles.append(model.add_edit("moe.topk_weights", zero_w, layer=layer))
        return handles
