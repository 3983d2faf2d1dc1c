"""Routing edits through the router logits: masking, forcing, biasing, SteerMoE.

All of them edit ``moe.router_logits``; the family's own router then turns the edited logits
into a selection and weights, so renormalisation follows each family's rule automatically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..edits import record
from .base import Intervention
from .selectors import (
    LayerSpec,
    Positions,
    apply_masked,
    check_scalar,
    layer_keys,
    resolve_experts,
    resolve_layers,
    token_selection,
)

if TYPE_CHECKING:
    from ..model import EditHandle, ExpertModel

__all__ = ["MaskExperts", "ForceExperts", "RouterBias", "SteerMoE", "calibrate_router_bias"]

#: Logit given to masked experts. -inf is NaN-free for every supported family (tested).
MASK_VALUE = float("-inf")


def _router(model: ExpertModel, layer: int):
    return model.hf_model.get_submodule(model.layout[layer].router)


def _n_groups(model: ExpertModel, layer: int) -> tuple[int, int] | None:
    return model.spec.rule.groups(_router(model, layer))


def _guarantee(
    model: ExpertModel, layer: int, masked: Tensor | None, forced: Tensor | None, pos, rows
) -> list[EditHandle]:
    """For biased-selection families: re-route (by the family's rule) the tokens where the edited
    logits still selected a masked expert or missed a forced one. Returns the edit handles."""
    if not model.spec.rule.biased_selection:
        return []
    rec = record(model, [("moe.router_logits", layer)])
    stash: dict[str, Any] = {}

    def fix_indices(idx, ctx, masked=masked, forced=forced):
        masked = masked.to(idx.device) if masked is not None else None
        forced = forced.to(idx.device) if forced is not None else None
        bad = torch.zeros(idx.shape[:-1], dtype=torch.bool, device=idx.device)
        if masked is not None and len(masked):
            bad |= torch.isin(idx, masked).any(-1)
        if forced is not None and len(forced):
            bad |= ~(idx.unsqueeze(-1) == forced).any(-2).all(-1)
        sel = token_selection(pos, rows, ctx, idx)
        if sel is not None:
            bad &= sel
        stash["bad"] = bad
        # Re-routed every forward and selected with `where` (no `if bad.any()`: that would be a host sync per
        # layer per step); where no token is bad the result is `idx` exactly.
        logits = rec[("moe.router_logits", layer)]
        w, new = model.spec.rule.reroute(logits.reshape(-1, logits.shape[-1]), _router(model, layer), masked, forced)
        stash["w"] = w.reshape(*idx.shape)
        return torch.where(bad.unsqueeze(-1), new.reshape(idx.shape).to(idx.dtype), idx)

    def fix_weights(w, ctx):
        bad = stash.pop("bad")
        return torch.where(bad.unsqueeze(-1), stash.pop("w").to(w.dtype), w)

    try:
        return [
            *rec.handles,
            model.add_edit("moe.topk_indices", fix_indices, layer=layer),
            model.add_edit("moe.topk_weights", fix_weights, layer=layer),
        ]
    except BaseException:
        rec.remove()
        raise


@dataclass(frozen=True, eq=False, repr=False)
class MaskExperts(Intervention):
    """Never route to some experts: their router logits become ``−inf`` before the family's router.

    With ``ℓ_e = −inf`` the expert's softmax probability (or sigmoid score) is exactly 0 and it
    loses every top-k comparison; the remaining weights are renormalised by the family's own rule
    (e.g. Mixtral: ``w_i = p_i / Σ_{j∈topk} p_j`` over the unmasked softmax). At least ``top_k``
    experts per layer must stay unmasked. Families that choose on ``score + correction bias``
    (deepseek_v3, glm4_moe, ernie4_5_moe) can still pick a zero-score expert with a large bias;
    there, tokens that did are re-routed by the family's rule with that expert's selection score
    at −inf (the weights come from the family's scores of the experts actually chosen).

    Example:
        >>> from expertlens.interventions import MaskExperts
        >>> MaskExperts({1: [0, 3]})
        MaskExperts(experts={1: [0, 3]})
    """

    experts: dict[int, Sequence[int]]
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def validate(self, model: ExpertModel) -> None:
        table = resolve_experts(model, self.experts, "MaskExperts")
        for layer, ex in table.items():
            if model.n_experts - len(ex) < model.top_k:
                raise ValueError(
                    f"MaskExperts: masking {len(ex)} of {model.n_experts} experts at layer {layer} leaves "
                    f"fewer "
                    f"than top_k={model.top_k}; at most {model.n_experts - model.top_k} can be masked"
                )
        Positions.coerce(self.positions)

    def routing_claims(self, model: ExpertModel) -> list[tuple[int, int, str]]:
        """``(layer, expert, "out")`` for every masked expert (conflict checks in ``attach_all``)."""
        table = resolve_experts(model, self.experts, "MaskExperts")
        return [(layer, e, "out") for layer, ex in table.items() for e in ex]

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        pos, rows = Positions.coerce(self.positions), self.rows
        handles = []
        for layer, ex in resolve_experts(model, self.experts, "MaskExperts").items():
            idx = torch.tensor(ex, device=layer_device(model, layer))

            def edit(logits, ctx, idx=idx):
                idx = idx.to(logits.device)
                new = logits.clone()
                new[..., idx] = MASK_VALUE
                return apply_masked(logits, new, token_selection(pos, rows, ctx, logits))

            handles.append(model.add_edit("moe.router_logits", edit, layer=layer))
            handles += _guarantee(model, layer, idx, None, pos, rows)
        return handles


def layer_device(model: ExpertModel, layer: int) -> torch.device:
    """The device layer ``layer``'s router computes on (``device_map`` may spread layers over devices).

    An offloaded router (weights on ``meta``, loaded by an accelerate hook) computes on the hook's
    execution device.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.interventions.routing import layer_device
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> layer_device(ExpertModel(tiny_model("olmoe"), tiny_tokenizer()), 1).type
        'cpu'
    """
    router = _router(model, layer)
    for mod in (router, *router.modules()):
        hook = getattr(mod, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for t in (*router.parameters(), *router.buffers()):
        if not t.is_meta:
            return t.device
    return model.device


@dataclass(frozen=True, eq=False, repr=False)
class ForceExperts(Intervention):
    """Always route to some experts: their logits are raised just above the competition.

    For softmax / logit-top-k families the forced logit becomes ``max(ℓ_f, max_{j∉F} ℓ_j + margin)``;
    for sigmoid + correction-bias families (deepseek_v3, glm4_moe) the logit is raised until the
    *selection score* ``σ(ℓ_f) + b_f`` exceeds every other expert's by ``margin``; for
    group-limited routers whose forced experts fill all ``topk_group`` groups, experts in other
    groups are masked (they could not be chosen anyway). The family's router then computes the
    weights from the edited logits (its own renormalisation). For correction-bias families any
    token that still misses a forced expert is re-routed by the family's rule with the forced
    selection scores at +inf. Forcing more than ``top_k``
    experts, or experts in more groups than ``topk_group``, is an error.

    Example:
        >>> from expertlens.interventions import ForceExperts
        >>> ForceExperts({0: [5]})
        ForceExperts(experts={0: [5]})
    """

    experts: dict[int, Sequence[int]]
    margin: float = 1.0
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def validate(self, model: ExpertModel) -> None:
        table = resolve_experts(model, self.experts, "ForceExperts")
        margin = check_scalar(self.margin, "ForceExperts: margin")
        if margin <= 0:
            raise ValueError(f"ForceExperts: margin must be > 0, got {margin}")
        for layer, ex in table.items():
            if len(ex) > model.top_k:
                raise ValueError(
                    f"ForceExperts: {len(ex)} experts forced at layer {layer} but the router picks only "
                    f"top_k={model.top_k}; force at most {model.top_k}"
                )
            groups = _n_groups(model, layer)
            if groups is not None:
                size = model.n_experts // groups[0]
                used = {e // size for e in ex}
                if len(used) > groups[1]:
                    raise ValueError(
                        f"ForceExperts: experts {ex} at layer {layer} span groups {sorted(used)} "
                        "but the router "
                        f"picks only topk_group={groups[1]} of {groups[0]} groups (size {size})"
                    )
        Positions.coerce(self.positions)

    def routing_claims(self, model: ExpertModel) -> list[tuple[int, int, str]]:
        """``(layer, expert, "in")`` for every forced expert (conflict checks in ``attach_all``)."""
        table = resolve_experts(model, self.experts, "ForceExperts")
        return [(layer, e, "in") for layer, ex in table.items() for e in ex]

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        pos, rows, margin = Positions.coerce(self.positions), self.rows, float(self.margin)
        handles = []
        for layer, ex in resolve_experts(model, self.experts, "ForceExperts").items():
            idx = torch.tensor(ex, device=layer_device(model, layer))

            def edit(logits, ctx, idx=idx, layer=layer, ids=tuple(ex)):
                new = model.spec.rule.force_logits(
                    logits, _router(model, layer), idx.to(logits.device), margin, MASK_VALUE, forced_ids=ids
                )
                return apply_masked(logits, new, token_selection(pos, rows, ctx, logits))

            handles.append(model.add_edit("moe.router_logits", edit, layer=layer))
            handles += _guarantee(model, layer, None, idx, pos, rows)
        return handles


@dataclass(frozen=True, eq=False, repr=False)
class RouterBias(Intervention):
    """Add a bias to the pre-softmax router logits: ``ℓ_l ← ℓ_l + β_l`` (method A).

    ``bias`` is an ``[n_layers, E]`` tensor (rows of dense layers must be zero), an
    ``[len(moe_layers), E]`` tensor (one row per MoE layer, in order) or a dict
    ``{layer: [E] tensor}``. A positive ``β_{l,e}`` of the size of the router-logit range
    (:func:`calibrate_router_bias`) makes expert ``e`` win at layer ``l``; a negative one
    removes it. Selection and weights follow from the edited logits by the family's rule.

    Example:
        >>> import torch
        >>> from expertlens.interventions import RouterBias
        >>> b = torch.zeros(8); b[3] = 5.0
        >>> RouterBias({1: b}).bias[1][3].item()
        5.0
    """

    bias: Float[Tensor, "layers n_experts"] | dict[int, Tensor]
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    @staticmethod
    def promote(
        experts: dict[int, Sequence[int]],
        magnitude: dict[int, float] | float,
        n_experts: int,
        sign: float = 1.0,
    ) -> RouterBias:
        """A bias of ``sign·magnitude[l]`` on the given experts of each layer (0 elsewhere).

        Example:
            >>> RouterBias.promote({1: [2]}, {1: 3.5}, n_experts=8).bias[1].tolist()[2]
            3.5
        """
        table = {}
        for layer, ex in experts.items():
            m = magnitude[layer] if isinstance(magnitude, dict) else magnitude
            b = torch.zeros(n_experts)
            b[list(ex)] = sign * float(m)
            table[int(layer)] = b
        return RouterBias(table)

    def _table(self, model: ExpertModel) -> dict[int, Tensor]:
        E, moe = model.n_experts, model.moe_layers
        if isinstance(self.bias, dict):
            lays = layer_keys(model, self.bias, "RouterBias")
            rows = {lay: torch.as_tensor(b) for lay, b in zip(lays, self.bias.values())}
        elif isinstance(self.bias, Tensor):
            b = self.bias
            if b.dim() != 2 or b.shape[1] != E or b.shape[0] not in (model.n_layers, len(moe)):
                raise ValueError(
                    f"RouterBias: bias has shape {tuple(b.shape)}; accepted are [{model.n_layers}, {E}] "
                    f"(n_layers, E), [{len(moe)}, {E}] (one row per MoE layer {moe}) "
                    f"or a dict {{layer: [{E}]}}"
                )
            if b.shape[0] == len(moe):
                rows = {layer: b[i] for i, layer in enumerate(moe)}
            else:
                dense = [i for i in range(model.n_layers) if i not in moe and bool(b[i].ne(0).any())]
                if dense:
                    raise ValueError(f"RouterBias: rows {dense} are dense layers (no router) but are non-zero")
                rows = {layer: b[layer] for layer in moe}
        else:
            raise TypeError("RouterBias: bias must be an [L, E] tensor or a dict {layer: [E] tensor}")
        out = {}
        for layer, b in rows.items():
            if b.shape != (E,):
                raise ValueError(f"RouterBias: layer {layer} bias has shape {tuple(b.shape)}; accepted is ({E},)")
            if not bool(torch.isfinite(b).all()):
                raise ValueError(f"RouterBias: layer {layer} bias has NaN/inf; only finite values are accepted")
            out[layer] = b.detach().to(device=layer_device(model, layer), dtype=torch.float32)
        return out

    def validate(self, model: ExpertModel) -> None:
        self._table(model)
        Positions.coerce(self.positions)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        pos, rows = Positions.coerce(self.positions), self.rows
        handles = []
        for layer, b in self._table(model).items():

            def edit(logits, ctx, b=b):
                return apply_masked(logits, logits + b.to(logits), token_selection(pos, rows, ctx, logits))

            handles.append(model.add_edit("moe.router_logits", edit, layer=layer))
        return handles


def calibrate_router_bias(
    model: ExpertModel,
    layers: LayerSpec = None,
    eps: float = 0.01,
    *,
    prompts: str | list[str] | None = None,
    reduce: str = "mean",
    seed: int = 0,
) -> dict[int, float]:
    """Bias magnitude per MoE layer: the router-logit range ``max_e ℓ_e − min_e ℓ_e`` plus ``eps``.

    Without ``prompts`` (the paper's recipe) the range comes from one random hidden vector
    ``h ~ N(0, I)`` passed through layer ``l``'s router. With ``prompts`` it is the per-token
    range over the real tokens of those prompts, reduced by ``"mean"`` or ``"max"``.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> mags = calibrate_router_bias(model)
        >>> sorted(mags) == model.moe_layers and all(m > 0 for m in mags.values())
        True
    """
    check_scalar(eps, "calibrate_router_bias: eps")
    if reduce not in ("mean", "max"):
        raise ValueError(f"calibrate_router_bias: reduce={reduce!r}; accepted are 'mean' and 'max'")
    lays = resolve_layers(model, layers, moe_only=True, what="calibrate_router_bias: ")
    rec = record(model, [("moe.router_logits", layer) for layer in lays], detach=True)
    try:
        with torch.no_grad():
            if prompts is None:
                gen = torch.Generator().manual_seed(seed)
                h = torch.randn(1, model.d_model, generator=gen).to(device=model.device, dtype=model.dtype)
                for layer in lays:
                    _router(model, layer)(h)
            else:
                enc = model.tokenize(prompts if isinstance(prompts, list) else [prompts], position_ids=True)
                model.hf_model(**enc, use_cache=False)
                real = enc["attention_mask"].bool()
    finally:
        rec.remove()
    out = {}
    for layer in lays:
        logits = rec[("moe.router_logits", layer)].float().reshape(-1, model.n_experts)
        rng = logits.max(-1).values - logits.min(-1).values
        if prompts is not None:
            rng = rng[real.reshape(-1)]
        out[layer] = float(rng.mean() if reduce == "mean" else rng.max()) + float(eps)
    return out


@dataclass(frozen=True, eq=False, repr=False)
class SteerMoE(Intervention):
    """SteerMoE's router rewrite: ``s = log_softmax(ℓ)``; activated experts ``s_e ← max(s) + ε``,
    deactivated ``s_e ← min(s) − ε``; the rewritten ``s`` replaces the logits.

    ``activate`` / ``deactivate`` are ``{layer: [experts]}``; at most ``top_k`` activated per
    layer, and an expert cannot be both.

    Example:
        >>> from expertlens.interventions import SteerMoE
        >>> SteerMoE(activate={1: [2]}, deactivate={1: [5, 6]})
        SteerMoE(activate={1: [2]}, deactivate={1: [5, 6]})
    """

    activate: dict[int, Sequence[int]] | None = None
    deactivate: dict[int, Sequence[int]] | None = None
    eps: float = 0.01
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def _tables(self, model: ExpertModel):
        act = resolve_experts(model, self.activate or {}, "SteerMoE(activate)")
        deact = resolve_experts(model, self.deactivate or {}, "SteerMoE(deactivate)")
        for layer, ex in act.items():
            if len(ex) > model.top_k:
                raise ValueError(
                    f"SteerMoE: {len(ex)} experts activated at layer {layer}; at most top_k={model.top_k} can be"
                )
            both = set(ex) & set(deact.get(layer, []))
            if both:
                raise ValueError(
                    f"SteerMoE: experts {sorted(both)} at layer {layer} are both activated and deactivated"
                )
        for layer, ex in deact.items():
            if model.n_experts - len(ex) < model.top_k:
                raise ValueError(
                    f"SteerMoE: deactivating {len(ex)} experts at layer {layer} leaves fewer than top_k={model.top_k}"
                )
        return act, deact

    def validate(self, model: ExpertModel) -> None:
        check_scalar(self.eps, "SteerMoE: eps")
        self._tables(model)
        Positions.coerce(self.positions)

    def routing_claims(self, model: ExpertModel) -> list[tuple[int, int, str]]:
        """Activated experts ``"in"``, deactivated ``"out"`` (conflict checks in ``attach_all``)."""
        act, deact = self._tables(model)
        return [(la, e, "in") for la, ex in act.items() for e in ex] + [
            (la, e, "out") for la, ex in deact.items() for e in ex
        ]

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        act, deact = self._tables(model)
        pos, rows, eps = Positions.coerce(self.positions), self.rows, float(self.eps)
        handles = []
        for layer in sorted(set(act) | set(deact)):
            dev = layer_device(model, layer)
            a = torch.tensor(act.get(layer, []), dtype=torch.long, device=dev)
            d = torch.tensor(deact.get(layer, []), dtype=torch.long, device=dev)

            def edit(logits, ctx, a=a, d=d):
                a, d = a.to(logits.device), d.to(logits.device)
                s = torch.log_softmax(logits.float(), dim=-1)
                hi = s.max(dim=-1, keepdim=True).values + eps
                lo = s.min(dim=-1, keepdim=True).values - eps
                if len(a):
                    s[..., a] = hi.expand(*s.shape[:-1], len(a))
                if len(d):
                    s[..., d] = lo.expand(*s.shape[:-1], len(d))
                return apply_masked(logits, s.to(logits), token_selection(pos, rows, ctx, logits))

            handles.append(model.add_edit("moe.router_logits", edit, layer=layer))
        return handles
