"""Address tables: one frozen spec per architecture family.

Everything expertlens knows about a transformers architecture lives here, and nowhere else:
where its decoder layers, attention, MoE block, router, experts and shared expert sit, how the
residual stream is wired, and how its router turns logits into a top-k selection. The rest of
the package asks the spec. Adding a family is adding one entry (and its tiny config to the
test list); user code can do the same with :func:`register_family`.

Routing rules are implemented here only to *describe* routing: the ``router_probs`` point, the
re-computation checks and the hand computations of routing edits. The model's own router code
stays in charge of real routing (expertlens intercepts its logits, see :mod:`expertlens.instrument`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = [
    "FamilySpec",
    "RoutingRule",
    "SoftmaxTopK",
    "GroupLimitedSoftmax",
    "SigmoidGroupTopK",
    "TopKThenSoftmax",
    "TopKThenScore",
    "SparseMixer",
    "BiasedSoftmaxTopK",
    "ScoredTopK",
    "UnsupportedModelError",
    "REFUSED",
    "register_family",
    "resolve_family",
    "supported_families",
    "get_module",
]


class UnsupportedModelError(ValueError):
    """Raised when a model's family has no address table, or its modules do not match one.

    Example:
        >>> from expertlens import UnsupportedModelError, resolve_family
        >>> try:
        ...     resolve_family("gpt2")
        ... except UnsupportedModelError as err:
        ...     print("register_family" in str(err))
        True
    """


def get_module(root: nn.Module, path: str) -> nn.Module | None:
    """Follow a dotted path (``"model.layers"``) from ``root``; ``None`` where it breaks.

    Example:
        >>> from expertlens.families import get_module
        >>> from expertlens.testing import tiny_model
        >>> hf = tiny_model("olmoe")
        >>> get_module(hf, "model.layers.0.mlp.gate") is hf.model.layers[0].mlp.gate
        True
        >>> get_module(hf, "model.nothing") is None
        True
    """
    obj: object = root
    for part in path.split("."):
        if not part:
            continue
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj  # type: ignore[return-value]


def _attr(module: nn.Module, name: str, default=None):
    value = getattr(module, name, None)
    if value is None and module is not None:
        # Router inputs owned by the MoE block (FamilySpec.router_extra): install() records the block.
        owner = getattr(module, "__dict__", {}).get("_el_owner")
        if owner is not None:
            value = getattr(owner, name, None)
    return default if value is None else value


# --------------------------------------------------------------------------------------------
# Routing rules
# --------------------------------------------------------------------------------------------


Adjust = Callable[[Tensor], Tensor]


class RoutingRule:
    """How a family's router turns pre-softmax logits into probabilities and a top-k choice.

    Everything interventions need to know about a family's routing is a method here:

    * ``probs`` gives the ``router_probs`` point;
    * ``selection_scores`` is the score experts are ranked by (with correction biases);
    * ``route`` re-computes ``(topk_weights, topk_indices)`` from (possibly edited) logits in eval
      mode, reading the router module's own parameters (top-k, correction bias, scaling factor,
      ...); its ``adjust`` argument rewrites the selection scores just before the choice;
    * ``reroute`` routes with chosen experts' selection scores pinned to −inf / +inf;
    * ``groups`` gives ``(n_group, topk_group)`` for group-limited routers;
    * ``force_logits`` raises logits until forced experts win the selection;
    * ``biased_selection`` says whether the choice adds a bias a logit edit cannot always beat
      (then MaskExperts / ForceExperts re-route the tokens that still disobey).

    Example:
        >>> from expertlens import resolve_family
        >>> resolve_family("mixtral").rule.describe()
        'softmax -> top-k -> renormalise (always)'
    """

    kind: str = "rule"
    #: The choice ranks ``score + correction bias``: a logit edit alone cannot always win it.
    biased_selection: ClassVar[bool] = False

    def probs(self, logits: Float[Tensor, "*tok E"], router: nn.Module) -> Float[Tensor, "*tok E"]:
        return torch.softmax(logits.float(), dim=-1)

    def selection_scores(self, logits: Float[Tensor, "tok E"], router: nn.Module) -> Float[Tensor, "tok E"]:
        """The scores the top-k choice ranks (before any group limit)."""
        return self.probs(logits, router)

    def route(
        self, logits: Float[Tensor, "tok E"], router: nn.Module, adjust: Adjust | None = None
    ) -> tuple[Float[Tensor, "tok k"], Int[Tensor, "tok k"]]:
        raise NotImplementedError

    def groups(self, router: nn.Module) -> tuple[int, int] | None:
        """``(n_group, topk_group)`` when the choice is limited to the best groups, else ``None``."""
        return None

    def reroute(
        self, logits: Float[Tensor, "tok E"], router: nn.Module, masked: Tensor | None, forced: Tensor | None
    ) -> tuple[Float[Tensor, "tok k"], Int[Tensor, "tok k"]]:
        """The family's routing of ``logits`` with the selection score of ``masked`` experts at −inf
        and of ``forced`` experts at +inf; weights by the family's rule from the chosen experts."""

        def adjust(choice: Tensor) -> Tensor:
            if masked is not None and len(masked):
                choice[:, masked] = float("-inf")
            if forced is not None and len(forced):
                choice[:, forced] = float("inf")
            return choice

        return self.route(logits, router, adjust=adjust)

    def _winning_logits(self, logits: Tensor, router: nn.Module, forced: Tensor, others: Tensor,
                        margin: float) -> Tensor:
        """Logits of the forced experts that rank them first (logit-monotone scores)."""
        top = logits.masked_fill(~others, float("-inf")).max(dim=-1, keepdim=True).values
        return torch.maximum(logits[..., forced], top + margin)

    def force_logits(self, logits: Tensor, router: nn.Module, forced: Tensor, margin: float,
                     mask_value: float = float("-inf"), forced_ids: Sequence[int] = ()) -> Tensor:
        """Logits raised so the selection ranks the ``forced`` experts first; for group-limited
        routers whose forced experts fill all ``topk_group`` groups, the other groups' experts are
        set to ``mask_value`` (they could not win a slot anyway). ``forced_ids``: the same ids on
        the host (reading them off the device tensor would sync every step)."""
        new = logits.clone()
        n_experts = logits.shape[-1]
        others = torch.ones(n_experts, dtype=torch.bool, device=logits.device)
        others[forced] = False
        new[..., forced] = self._winning_logits(logits, router, forced, others, margin)
        groups = self.groups(router)
        if groups is not None:
            n_group, topk_group = groups
            size = n_experts // n_group
            forced_groups = sorted({int(e) // size for e in (forced_ids or forced.tolist())})
            if len(forced_groups) == topk_group:
                keep = torch.zeros(n_experts, dtype=torch.bool, device=logits.device)
                for g in forced_groups:
                    keep[g * size : (g + 1) * size] = True
                new = new.masked_fill(~keep, mask_value)
        return new

    def describe(self) -> str:
        return self.kind


def _limit_to_groups(choice: Tensor, n_group: int, topk_group: int, group_score: str) -> Tensor:
    """Selection scores outside the best ``topk_group`` groups set to −inf (DeepSeek routers).

    ``group_score``: ``"max"`` (a group's best expert, DeepSeek-V2) or ``"top2"`` (the sum of its
    best two, DeepSeek-V3).
    """
    e = choice.shape[-1]
    grouped = choice.view(-1, n_group, e // n_group)
    group_scores = grouped.max(dim=-1).values if group_score == "max" else grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(-1, e)
    return score_mask.bool()


def _top_k(router: nn.Module) -> int:
    return int(_attr(router, "top_k"))


@dataclass(frozen=True)
class SoftmaxTopK(RoutingRule):
    """softmax over all experts -> top-k -> optional renormalisation (Mixtral, Qwen-MoE, OLMoE).

    ``renorm``: True (always), False (never) or the name of the router attribute holding the
    flag (``"norm_topk_prob"``). ``cast_to_logits_dtype``: Qwen/OLMoE cast weights back to the
    logits' dtype; Mixtral keeps fp32.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from expertlens.families import SoftmaxTopK
        >>> router = SimpleNamespace(top_k=2, norm_topk_prob=True)
        >>> weights, idx = SoftmaxTopK().route(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), router)
        >>> idx.tolist(), round(float(weights.sum()), 4)
        ([[1, 3]], 1.0)
    """

    renorm: bool | str = "norm_topk_prob"
    cast_to_logits_dtype: bool = True
    kind: str = "softmax -> top-k -> renormalise"

    def _renorm(self, router: nn.Module) -> bool:
        if isinstance(self.renorm, str):
            return bool(_attr(router, self.renorm, False))
        return self.renorm

    def route(self, logits, router, adjust=None):
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        if adjust is None:
            weights, idx = torch.topk(probs, _top_k(router), dim=-1)
        else:
            idx = torch.topk(adjust(probs.clone()), _top_k(router), dim=-1)[1]
            weights = probs.gather(-1, idx)
        if self._renorm(router):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.cast_to_logits_dtype:
            weights = weights.to(logits.dtype)
        return weights, idx

    def describe(self) -> str:
        flag = self.renorm if isinstance(self.renorm, str) else ("always" if self.renorm else "never")
        return f"softmax -> top-k -> renormalise ({flag})"


@dataclass(frozen=True)
class GroupLimitedSoftmax(RoutingRule):
    """DeepSeek-V2: softmax -> (group-limited) greedy top-k -> x routed_scaling_factor, no renorm.

    Example:
        >>> from expertlens import resolve_family
        >>> type(resolve_family("deepseek_v2").rule).__name__
        'GroupLimitedSoftmax'
    """

    kind: str = "softmax -> group-limited top-k -> x scaling (no renorm)"

    def probs(self, logits, router):
        return logits.float().softmax(dim=-1, dtype=torch.float32)

    def groups(self, router):
        if getattr(router, "topk_method", "") == "group_limited_greedy":
            return int(router.num_group), int(router.topk_group)
        return None

    def route(self, logits, router, adjust=None):
        scores = logits.float().softmax(dim=-1, dtype=torch.float32)
        k = _top_k(router)
        choice = adjust(scores.clone()) if adjust is not None else scores
        groups = self.groups(router)
        if groups is not None:
            choice = choice.masked_fill(~_limit_to_groups(choice, *groups, "max"), 0.0)
        if adjust is None:
            weights, idx = torch.topk(choice, k=k, dim=-1, sorted=False)
        else:
            idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, idx)
        return weights * router.routed_scaling_factor, idx


@dataclass(frozen=True)
class SigmoidGroupTopK(RoutingRule):
    """DeepSeek-V3 / GLM-4-MoE: sigmoid scores; choice on score + correction bias within the
    best ``topk_group`` groups (group score = sum of its top-2); weights from the raw sigmoid,
    renormalised iff ``norm_topk_prob``, times ``routed_scaling_factor``.

    Example:
        >>> import torch
        >>> from expertlens import resolve_family
        >>> rule = resolve_family("deepseek_v3").rule
        >>> rule.probs(torch.zeros(1, 4), None)  # sigmoid, not softmax: scores do not sum to 1
        tensor([[0.5000, 0.5000, 0.5000, 0.5000]])
    """

    kind: str = "sigmoid (+correction bias for choice) -> group top-k -> renormalise -> x scaling"

    biased_selection: ClassVar[bool] = True

    def probs(self, logits, router):
        return logits.float().sigmoid()

    def selection_scores(self, logits, router):
        return logits.float().sigmoid() + router.e_score_correction_bias

    def groups(self, router):
        return int(router.num_group), int(router.topk_group)

    def route(self, logits, router, adjust=None):
        scores = logits.float().sigmoid()
        choice = scores + router.e_score_correction_bias
        if adjust is not None:
            choice = adjust(choice)
        choice = choice.masked_fill(~_limit_to_groups(choice, *self.groups(router), "top2"), float("-inf"))
        idx = torch.topk(choice, k=_top_k(router), dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, idx

    def _winning_logits(self, logits, router, forced, others, margin):
        # Selection score s = sigmoid(l) + bias. Forced experts need s_f > max over others.
        bias = router.e_score_correction_bias.to(torch.float32)
        score = logits.float().sigmoid() + bias
        best_other = score.masked_fill(~others, float("-inf")).max(dim=-1, keepdim=True).values
        need = (best_other + margin - bias[forced]).clamp(1e-6, 1 - 1e-6)
        target = torch.maximum(logits[..., forced], torch.logit(need).to(logits))
        # where even sigmoid = 1 cannot win, saturate (score = 1 + bias; the re-route safety net does the rest)
        saturate = best_other + margin - bias[forced] >= 1
        big = torch.full_like(target, torch.finfo(logits.dtype).max / 4)
        return torch.where(saturate, big, target)


@dataclass(frozen=True)
class TopKThenSoftmax(RoutingRule):
    """GPT-OSS / Granite-MoE: top-k on the raw logits, softmax over the k chosen.

    ``router_probs`` is the softmax over all experts (the probability each expert would get
    without the top-k cut), which is what expert-weighted steering needs.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from expertlens.families import TopKThenSoftmax
        >>> weights, idx = TopKThenSoftmax().route(torch.tensor([[0.0, 2.0, 1.0, 2.0]]), SimpleNamespace(top_k=2))
        >>> weights.tolist()  # softmax over the two chosen logits only
        [[0.5, 0.5]]
    """

    float_logits: bool = False
    kind: str = "top-k on logits -> softmax over the k"

    def selection_scores(self, logits, router):
        return logits.float() if self.float_logits else logits

    def route(self, logits, router, adjust=None):
        src = logits.float() if self.float_logits else logits
        if adjust is not None:
            idx = torch.topk(adjust(src.clone()), _top_k(router), dim=-1)[1]
            top = src.gather(-1, idx)
        else:
            top, idx = torch.topk(src, _top_k(router), dim=-1)
        return torch.softmax(top, dim=-1, dtype=top.dtype), idx


@dataclass(frozen=True)
class SparseMixer(RoutingRule):
    """PhiMoE sparsemixer (eval mode): hard top-2 by iterated argmax; each weight is a softmax of
    the logits masked by a relative-gap threshold ``2 * router_jitter_noise``.

    Example:
        >>> from expertlens import resolve_family
        >>> resolve_family("phimoe").rule.describe()
        'sparsemixer (hard top-2, masked softmax weights)'
    """

    kind: str = "sparsemixer (hard top-2, masked softmax weights)"

    def selection_scores(self, logits, router):
        return logits

    def route(self, logits, router, adjust=None):
        if adjust is not None:
            raise NotImplementedError("sparsemixer routing cannot be re-run from adjusted selection scores")
        eps = router.router_jitter_noise
        chosen: list[Tensor] = []
        weights: list[Tensor] = []
        scores = logits
        for _ in range(2):
            thr, best = scores.max(dim=-1, keepdim=True)
            factor = logits.abs().clamp(min=thr)
            too_far = ((thr - logits) / factor) > (2 * eps)
            gates = torch.softmax(scores.masked_fill(too_far, float("-inf")), dim=-1)
            weights.append(gates.gather(dim=-1, index=best))
            chosen.append(best)
            scores = torch.scatter(logits, -1, torch.cat(chosen, dim=-1), float("-inf"))
        return torch.cat(weights, dim=-1), torch.cat(chosen, dim=-1)


@dataclass(frozen=True)
class BiasedSoftmaxTopK(RoutingRule):
    """ERNIE-4.5-MoE: softmax; choose top-k on probs + correction bias; weights are the unbiased
    probs renormalised with a clamp at ``norm_min``.

    Example:
        >>> from expertlens import resolve_family
        >>> type(resolve_family("ernie4_5_moe").rule).__name__
        'BiasedSoftmaxTopK'
    """

    kind: str = "softmax -> top-k on (probs + correction bias) -> clamped renormalise"

    def probs(self, logits, router):
        return torch.softmax(logits.float(), dim=1 if logits.dim() == 2 else -1, dtype=torch.float)

    biased_selection: ClassVar[bool] = True

    def selection_scores(self, logits, router):
        return router.moe_statics(torch.softmax(logits.float(), dim=-1, dtype=torch.float))

    def route(self, logits, router, adjust=None):
        probs = torch.softmax(logits.float(), dim=-1, dtype=torch.float)
        choice = router.moe_statics(probs)
        _, idx = torch.topk(adjust(choice) if adjust is not None else choice, _top_k(router), dim=-1)
        weights = torch.gather(probs, dim=-1, index=idx)
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=router.norm_min)
        return weights, idx


@dataclass(frozen=True)
class ScoredTopK(RoutingRule):
    """The common modern router, described by data: score -> (biased) choice -> gather -> renorm -> scale.

    ``score``: ``"softmax"`` or ``"sigmoid"`` over all experts (``"config"``: the router's ``score_fn``
    decides). ``choose_on``: ``"scores"`` (top-k of score + bias) or ``"logits"`` (top-k of logits +
    bias, weights ``sigmoid`` of the chosen logits, Kolibri). ``bias``: router (or MoE-block)
    attribute holding the selection-only correction bias (``None``: none). ``group_limited``:
    DeepSeek-V3 group limit (``num_group`` / ``topk_group``, group score = sum of its top-2).
    ``renorm``: True, False or the router attribute holding the flag; ``eps`` is added to the
    denominator. ``scale``: router attribute multiplying the weights (``None``: none). ``softcap``:
    router attribute of a tanh logit soft-cap applied before scoring (Laguna).

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from expertlens.families import ScoredTopK
        >>> rule = ScoredTopK(score="sigmoid", bias="e_score_correction_bias", renorm=True)
        >>> router = SimpleNamespace(top_k=1, e_score_correction_bias=torch.tensor([0.0, 0.0, 5.0]))
        >>> weights, idx = rule.route(torch.tensor([[3.0, 0.0, -3.0]]), router)
        >>> idx.tolist(), weights.tolist()   # the bias picks expert 2; its weight renormalises to 1
        ([[2]], [[1.0]])
    """

    score: Literal["softmax", "sigmoid", "config"] = "sigmoid"
    choose_on: Literal["scores", "logits"] = "scores"
    bias: str | None = None
    group_limited: bool = False
    renorm: bool | str = True
    eps: float = 0.0
    scale: str | None = None
    softcap: str | None = None
    kind: str = "scored top-k"

    @property
    def biased_selection(self) -> bool:  # type: ignore[override]
        return self.bias is not None

    def _capped(self, logits: Tensor, router: nn.Module) -> Tensor:
        logits = logits.float()
        cap = _attr(router, self.softcap, 0.0) if self.softcap else 0.0
        if cap and cap > 0.0:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _scores(self, logits: Tensor, router: nn.Module) -> Tensor:
        logits = self._capped(logits, router)
        if self.score == "config":
            return _attr(router, "score_fn")(logits)
        return logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()

    def _bias(self, router: nn.Module) -> Tensor | None:
        if self.bias is None:
            return None
        if self.bias == "expert_bias" and not _attr(router, "use_expert_bias", True):
            return None
        return _attr(router, self.bias)

    def probs(self, logits, router):
        if self.choose_on == "logits":
            return logits.float().sigmoid()
        return self._scores(logits, router)

    def selection_scores(self, logits, router):
        base = logits.float() if self.choose_on == "logits" else self._scores(logits, router)
        bias = self._bias(router)
        return base if bias is None else base + bias.to(base.dtype)

    def groups(self, router):
        if not self.group_limited:
            return None
        n_group = int(_attr(router, "num_group", 1))
        return n_group, int(_attr(router, "topk_group", n_group))

    def route(self, logits, router, adjust=None):
        base = logits.float() if self.choose_on == "logits" else self._scores(logits, router)
        choice = self.selection_scores(logits, router)
        if adjust is not None:
            choice = adjust(choice.clone())
        groups = self.groups(router)
        if groups is not None:
            choice = choice.masked_fill(~_limit_to_groups(choice, *groups, "top2"), float("-inf"))
        idx = torch.topk(choice, _top_k(router), dim=-1)[1]
        weights = base.gather(-1, idx)
        if self.choose_on == "logits":
            weights = weights.sigmoid()
        renorm = bool(_attr(router, self.renorm, False)) if isinstance(self.renorm, str) else self.renorm
        if renorm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.eps)
        if self.scale is not None:
            weights = weights * _attr(router, self.scale, 1.0)
        return weights, idx

    def describe(self) -> str:
        parts = ["router's score_fn" if self.score == "config" else self.score]
        if self.softcap:
            parts.insert(0, "tanh soft-cap")
        on = "logits" if self.choose_on == "logits" else "scores"
        parts.append(("group-limited " if self.group_limited else "") + f"top-k on {on}"
                     + (" + correction bias" if self.bias else ""))
        if self.choose_on == "logits":
            parts.append("sigmoid of the chosen")
        if self.renorm:
            flag = self.renorm if isinstance(self.renorm, str) else "always"
            parts.append(f"renormalise ({flag})")
        if self.scale:
            parts.append(f"x {self.scale}")
        return " -> ".join(parts)


@dataclass(frozen=True)
class TopKThenScore(RoutingRule):
    """Top-k on the raw logits, then softmax over the k or sigmoid of each (Cohere2-MoE, Flint-style).

    ``fn``: ``"softmax"``, ``"sigmoid"`` or the router attribute naming one (``"expert_selection_fn"``).
    Sigmoid weights are renormalised iff the router's ``norm_topk_prob``.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from expertlens.families import TopKThenScore
        >>> router = SimpleNamespace(top_k=1, norm_topk_prob=False)
        >>> TopKThenScore(fn="sigmoid").route(torch.tensor([[0.0, 2.0]]), router)[1].tolist()
        [[1]]
    """

    fn: str = "softmax"
    kind: str = "top-k on logits -> softmax or sigmoid"

    def selection_scores(self, logits, router):
        return logits

    def route(self, logits, router, adjust=None):
        fn = self.fn if self.fn in ("softmax", "sigmoid") else _attr(router, self.fn, "softmax")
        if adjust is not None:
            idx = torch.topk(adjust(logits.clone()), _top_k(router), dim=-1)[1]
            top = logits.gather(-1, idx)
        else:
            top, idx = torch.topk(logits, _top_k(router), dim=-1)
        if fn == "softmax":
            weights = torch.softmax(top, dim=-1, dtype=torch.float)
        else:
            weights = top.sigmoid()
            if _attr(router, "norm_topk_prob", False):
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), idx

    def describe(self) -> str:
        fn = self.fn if self.fn in ("softmax", "sigmoid") else f"router.{self.fn}"
        return f"top-k on logits -> {fn} over the k"


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------

Residual = Literal["pre_norm", "post_norm", "scaled", "parallel", "single", "hyper", "other"]


@dataclass(frozen=True)
class FamilySpec:
    """Where everything sits in one architecture family, and how it routes.

    Paths are dotted attribute paths. Layer-level paths are relative to a decoder layer;
    MoE-level paths are relative to the MoE block.

    Attributes:
        name: Family name (a transformers ``model_type``).
        model_types: ``fnmatch`` patterns matched against ``config.model_type``.
        layers: Path from the ``*ForCausalLM`` module to the decoder-layer list.
        embed: Path to the token embedding.
        final_norm: Path to the final norm before the unembedding.
        lm_head: Path to the unembedding.
        attn: Candidate attention modules in a layer (first present wins; hybrid families list
            their linear-attention module too).
        o_proj: Candidate output projections inside the attention module.
        mid: Module whose *input* is the residual stream after attention (``resid_mid``); ``None``
            where no such stream exists (parallel attention/MoE blocks, one-mixer layers).
        attn_write / ffn_write: For post-norm families, the module whose output is what the
            attention / feed-forward sublayer adds to the residual stream (``None``: the
            sublayer's own output is the write).
        residual: ``"pre_norm"`` (x + f(norm(x))), ``"post_norm"`` (x + norm(f(x))), or
            ``"scaled"`` (residual multipliers; the additive identities do not hold).
        moe: Attribute of a decoder layer holding the MoE block (or dense MLP on dense layers).
        router / router_weight: Router module in the block and its logits weight (a path
            relative to the router); expertlens intercepts the linear call that uses it.
        experts: The fused experts module in the block.
        shared / shared_gate: Shared expert module and its optional sigmoid gate (``None``).
        shared_input: Whether the family feeds the shared expert ``"flat"`` [T, d] or ``"3d"``.
        returns_tuple: The block returns ``(hidden, router_scores)`` (GPT-OSS).
        rule: The routing rule.
        is_moe: ``False`` for dense families (residual and attention points only).
        notes: Free text shown in the supported-architectures table.
        router_input: The router is called with ``"flat"`` [T, d] or ``"3d"`` [b, p, d] hidden states.
        router_extra: MoE-block attributes the router takes after the hidden states, in order
            (``("e_score_correction_bias",)`` for MiniMax-M2 / HY-V3, ``("expert_bias",)`` for AFMoE and
            LFM2-MoE); routing rules find them on the router too.
        routed_scale: MoE-block attribute multiplying the routed output *outside* the router (Beam,
            Laguna); ``topk_weights`` are the router's and ``expert_out`` the experts' (neither includes the factor),
            ``expert_contrib`` does: see :attr:`output_identity`.
        shared_level: ``"block"`` (the shared expert is a child of the MoE block) or ``"layer"`` (a
            child of the decoder layer that the layer adds to the block's output, Granite-MoE-Shared);
            for ``"layer"`` the ``moe.output`` point is the routed output and ``shared_out`` the shared
            MLP's output (the layer adds them).
        identity_wraps: MoE-block children applied around the experts that must be ``nn.Identity``
            for per-expert outputs to be exact (Nemotron-H's latent projections); anything else is refused.
        attn_optional: Hybrid stacks: layers whose attention path is missing (or is a recurrent mixer)
            have no attention points; asking for them raises an error naming the layer type.
        attn_exclude: ``fnmatch`` patterns of module class names that are never attention (state-space
            and convolution mixers on the same attribute as attention, Nemotron-H's ``mixer``).
        block_requires: ``(attribute, value)`` pairs an MoE block with a shared expert must satisfy for
            the generic block forward to be exact (how it combines the shared output); anything else is
            refused with the attribute named.
        shared_optional: The block has the shared expert only when its config asks for one (Cohere2-MoE's
            ``num_shared_experts``); layers without it have no ``shared_out``.
        router_returns: ``"topk"`` (``(logits, topk_weights, topk_indices)``) or ``"dense_scores"``
            (``(scores [T, E], logits)`` with zeros off the top-k, Llama-4; the top-k is read from the logits).
        experts_kind: ``"fused"`` (a decorated fused experts module) or ``"dense_input_scaled"`` (Llama-4: a
            dense bmm over every expert whose *input* is multiplied by the routing weight). For the latter,
            ``expert_out`` is each chosen expert applied to its weight-scaled input and
            ``moe.output == Σ_k expert_out + shared_out`` (exact for top-k ≤ 2; Llama-4 routes top-1).
        flat_output: The block returns ``[T, d]`` rather than ``[b, p, d]`` (Llama-4).
        block_norm: A norm the MoE block applies to its summed output (AXK1's ``post_mlp_layernorm``):
            ``moe.output`` is the sum before it (the reconstruction identity holds there) and the norm's
            output is the sublayer's write (``ffn_write``).
        inference: ``None`` for a registered table; for a table inferred from structure, the text of
            the warning that names it.
        residual_multiplier: For ``"scaled"`` families whose sublayer writes are multiplied by a
            plain scalar, the decoder-layer attribute holding it (GraniteMoE:
            ``"residual_multiplier"``); ``None`` for a scaled family means the residual stream is
            not a sum of component writes (MiniMax re-normalises it).
        mlp_out: The output projection of a dense MLP / shared expert (relative to it).

    Example:
        >>> from expertlens import resolve_family
        >>> spec = resolve_family("qwen2_moe")
        >>> spec.router, spec.experts, spec.shared
        ('gate', 'experts', 'shared_expert')
        >>> variant = spec.with_(name="my_qwen2_moe", model_types=("my_qwen2_moe",))
    """

    name: str
    model_types: tuple[str, ...]
    rule: RoutingRule | None = field(default_factory=SoftmaxTopK)
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: tuple[str, ...] = ("self_attn",)
    o_proj: tuple[str, ...] = ("o_proj", "out_proj")
    mid: str | None = "post_attention_layernorm"
    attn_write: str | None = None
    ffn_write: str | None = None
    residual: Residual = "pre_norm"
    moe: str = "mlp"
    router: str = "gate"
    router_weight: str = "weight"
    experts: str = "experts"
    shared: str | None = None
    shared_gate: str | None = None
    shared_input: Literal["flat", "3d"] = "flat"
    returns_tuple: bool = False
    is_moe: bool = True
    notes: str = ""
    router_input: Literal["flat", "3d"] = "flat"
    router_extra: tuple[str, ...] = ()
    routed_scale: str | None = None
    shared_level: Literal["block", "layer"] = "block"
    identity_wraps: tuple[str, ...] = ()
    attn_optional: bool = False
    attn_exclude: tuple[str, ...] = ("*Mamba*", "*ShortConv*", "*MoE", "*Moe", "*MLP")
    block_requires: tuple[tuple[str, object], ...] = ()
    shared_optional: bool = False
    router_returns: Literal["topk", "dense_scores"] = "topk"
    experts_kind: Literal["fused", "dense_input_scaled"] = "fused"
    flat_output: bool = False
    block_norm: str | None = None
    inference: str | None = None
    residual_multiplier: str | None = None
    mlp_out: str = "down_proj"

    # ---- helpers used by the model layer ---------------------------------------------------
    def matches(self, model_type: str) -> bool:
        return any(fnmatch.fnmatch(model_type, pat) for pat in self.model_types)

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        layers = get_module(model, self.layers)
        if layers is None:
            raise UnsupportedModelError(
                f"family {self.name!r}: no decoder-layer list at {self.layers!r} on "
                f"{type(model).__name__}"
            )
        return layers  # type: ignore[return-value]

    def attn_module(self, layer: nn.Module) -> tuple[str, nn.Module] | None:
        """The layer's attention module, or ``None`` on a hybrid stack's layer without attention."""
        for name in self.attn:
            mod = get_module(layer, name)
            if mod is None:
                continue
            if self.attn_optional and (
                any(fnmatch.fnmatch(type(mod).__name__, pat) for pat in self.attn_exclude)
                or self.o_proj_module(mod) is None
            ):
                continue
            return name, mod
        if self.attn_optional:
            return None
        raise UnsupportedModelError(
            f"family {self.name!r}: none of the attention paths {self.attn} exist on "
            f"{type(layer).__name__}; children are {[n for n, _ in layer.named_children()]}"
        )

    def o_proj_module(self, attn: nn.Module) -> tuple[str, nn.Module] | None:
        for name in self.o_proj:
            mod = get_module(attn, name)
            if isinstance(mod, nn.Linear):
                return name, mod
        return None

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The MoE block of a layer, or ``None`` for a dense layer."""
        if not self.is_moe:
            return None
        block = get_module(layer, self.moe)
        if block is None:
            return None
        if get_module(block, self.router) is None or get_module(block, self.experts) is None:
            return None
        return block

    @property
    def weights_on_input(self) -> bool:
        """Routing weights scale the experts' *input* (Llama-4): ``moe.output == Σ_k expert_out (+ shared)``."""
        return self.experts_kind == "dense_input_scaled"

    def routed_factor(self, block: nn.Module) -> float:
        """The factor the MoE block multiplies its routed output by outside the router (1.0 for most).

        ``moe.output == routed_factor · Σ_k topk_weights·expert_out (+ shared_out)``.
        """
        if self.routed_scale is None:
            return 1.0
        return float(getattr(block, self.routed_scale))

    @property
    def output_identity(self) -> str:
        """What ``moe.output`` equals in terms of the points on this family (the architectures page's column).

        Read with :meth:`moe_output_from`, which computes it, so the text and the check cannot drift apart. Whatever
        the family, ``Σ_k expert_contrib`` is the routed part: ``moe.output == Σ_k expert_contrib + shared_out`` with
        the shared expert in the block, ``== Σ_k expert_contrib`` where the decoder layer adds it (``shared_level``).

        Example:
            >>> from expertlens import resolve_family
            >>> resolve_family("beam").output_identity
            'routed_scaling_factor·Σ_k topk_weights·expert_out'
            >>> resolve_family("llama4_text").output_identity
            'Σ_k expert_out + shared_out'
        """
        if not self.is_moe:
            return "—"
        routed = "Σ_k expert_out" if self.weights_on_input else "Σ_k topk_weights·expert_out"
        if self.routed_scale is not None:
            routed = f"{self.routed_scale}·{routed}"
        if self.shared is None:
            return routed
        if self.shared_level == "layer":
            return f"{routed} (the decoder layer adds shared_out)"
        return f"{routed} + shared_out" + (" (where the layer has one)" if self.shared_optional else "")

    def moe_output_from(self, expert_out: Tensor, topk_weights: Tensor, shared_out: Tensor | None,
                        block: nn.Module) -> Tensor:
        """``moe.output`` computed from ``expert_out`` ``[..., k, d]``, ``topk_weights`` ``[..., k]`` and ``shared_out``
        by :attr:`output_identity` (in ``expert_out``'s dtype; ``block``: the MoE block, for its routed scale).

        Example:
            >>> import torch
            >>> from expertlens import resolve_family
            >>> spec = resolve_family("olmoe")
            >>> eo, w = torch.ones(1, 2, 2, 4), torch.full((1, 2, 2), 0.5)
            >>> spec.moe_output_from(eo, w, None, block=None).tolist()[0][0]
            [1.0, 1.0, 1.0, 1.0]
        """
        weights = topk_weights.to(expert_out.dtype)
        routed = expert_out.sum(-2) if self.weights_on_input else (expert_out * weights.unsqueeze(-1)).sum(-2)
        routed = routed * self.routed_factor(block)
        if shared_out is not None and self.shared_level == "block":
            routed = routed + shared_out.to(routed.dtype)
        return routed

    @property
    def additive_residual(self) -> bool:
        """Whether the residual stream is a sum of (scalar-scaled) sublayer writes, without norms."""
        return self.residual == "pre_norm" or (self.residual == "scaled" and self.residual_multiplier is not None)

    def write_factors(self, layer: nn.Module) -> tuple[float, float, float, float]:
        """``(a_attn, b_attn, a_ffn, b_ffn)`` with ``resid_mid = a_attn·resid_pre + b_attn·attn_write``
        and ``resid_post = a_ffn·resid_mid + b_ffn·mlp_write`` for one decoder layer.

        Raises ``NotImplementedError`` for scaled families without a plain multiplier (their layers
        re-normalise the residual stream, so it is not a sum of component writes).
        """
        if self.residual == "scaled" and self.residual_multiplier is None:
            raise NotImplementedError(
                f"{self.name}: layers re-normalise the residual stream (alpha/beta factors on a normed "
                "residual), so it is not a sum of component writes"
            )
        value = getattr(layer, self.residual_multiplier, 1.0) if self.residual_multiplier else 1.0
        mult = float(value) if isinstance(value, (int, float)) else 1.0
        return 1.0, mult, 1.0, mult

    def mlp_out_linear(self, module: nn.Module) -> nn.Linear | None:
        """The output projection (``mlp_out``) of a dense MLP or shared expert, if it is a Linear."""
        out = get_module(module, self.mlp_out)
        return out if isinstance(out, nn.Linear) else None

    def with_(self, **changes) -> FamilySpec:
        """A copy with some fields changed (for registering a variant family)."""
        return replace(self, **changes)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec, *, overwrite: bool = False) -> FamilySpec:
    """Register an address table so :func:`resolve_family` (and ``ExpertModel``) find it.

    Example:
        >>> from expertlens.families import FamilySpec, SoftmaxTopK, register_family
        >>> spec = FamilySpec("my_moe", ("my_moe",), rule=SoftmaxTopK(renorm=True))
        >>> _ = register_family(spec, overwrite=True)
    """
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"family {spec.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[spec.name] = spec
    return spec


def supported_families() -> dict[str, FamilySpec]:
    """All registered address tables, by name.

    Example:
        >>> from expertlens import supported_families
        >>> "olmoe" in supported_families() and "deepseek_v3" in supported_families()
        True
    """
    return dict(_REGISTRY)


def resolve_family(model_or_type: nn.Module | str) -> FamilySpec:
    """Find the address table for a model (or a ``model_type`` string).

    Raises:
        UnsupportedModelError: naming the family, listing the supported ones and saying how to
            register one.

    Example:
        >>> from expertlens import resolve_family
        >>> resolve_family("olmoe").name
        'olmoe'
        >>> from expertlens.testing import tiny_model
        >>> resolve_family(tiny_model("mixtral")).name
        'mixtral'
    """
    if isinstance(model_or_type, str):
        if model_or_type in _REGISTRY:
            return _REGISTRY[model_or_type]
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None) or type(model_or_type).__name__
    for spec in _REGISTRY.values():
        if spec.matches(model_type):
            return spec
    if model_type in REFUSED:
        raise UnsupportedModelError(
            f"expertlens cannot address model family {model_type!r} exactly: {REFUSED[model_type]}. "
            "The documentation's Supported architectures page lists the supported families."
        )
    names = ", ".join(sorted(_REGISTRY))
    raise UnsupportedModelError(
        f"expertlens has no address table for model family {model_type!r}. Supported families: "
        f"{names}. To add one, describe where its modules sit with "
        f"expertlens.families.FamilySpec(name={model_type!r}, model_types=({model_type!r},), ...) "
        "and call expertlens.register_family(spec) before wrapping the model."
    )


_QWEN_SHARED = dict(shared="shared_expert", shared_gate="shared_expert_gate", shared_input="flat")
_DEEPSEEK_SHARED = dict(shared="shared_experts", shared_input="3d")

#: MoE causal-LM types (``expertlens.testing.moe_census``) that cannot be addressed exactly, with the structural
#: reason.
REFUSED: dict[str, str] = {
    "deepseek_v4": "hash-routed layers choose experts from token ids (a tid2eid table), not from router logits, so "
    "router_logits edits cannot change their selection; the residual is hyper-connected",
    "gemma4_text": "the router and experts are direct children of the decoder layer, running in parallel with a "
    "dense MLP on differently normalised inputs: there is no MoE block module to instrument, and the router "
    "returns probabilities, not logits",
    "jetmoe": "experts are unfused ParallelExperts called with per-expert token counts (no @use_experts_implementation "
    "module), and attention is itself a mixture of attention heads with its own router",
    "longcat_flash": "zero-computation experts (indices >= n_routed_experts are identities) and two attention and two "
    "MLP sublayers per layer around a shortcut-connected MoE",
    "zaya": "the router is an MLP over a down-projected state threaded from layer to layer, with a skip-expert slot; "
    "its logits are not a linear function of the MoE input",
    "inkling_text": "the router also emits the shared experts' gammas (a joint softmax over routed and shared "
    "logits), so the shared output depends on router internals the generic block cannot reproduce",
    "dbrx": "experts are unfused 2-D weights (w1/v1/w2 of shape [E*I, d]) looped over in Python and top-k is taken "
    "in a block method, not a router module: there is no decorated experts module to expose per-slot outputs",
    "doge": "Doge's MoE (CDMoE) retrieves product-key embedding experts by key scores: there is no router/experts "
    "pair; its configs with is_moe=False build a dense model",
}
# AutoModelForCausalLM builds the whole multimodal model for gemma4 (not its text tower's model, as for llama4)
REFUSED["gemma4"] = f"Gemma4ForConditionalGeneration wraps the gemma4_text tower, and {REFUSED['gemma4_text']}"

for _spec in [
    FamilySpec("mixtral", ("mixtral",), rule=SoftmaxTopK(renorm=True, cast_to_logits_dtype=False)),
    FamilySpec(
        "minimax", ("minimax",), rule=SoftmaxTopK(renorm=True, cast_to_logits_dtype=False),
        residual="scaled", notes="Lightning (linear) attention layers use self_attn.out_proj; "
        "residual uses alpha/beta factors",
    ),
    FamilySpec("olmoe", ("olmoe",)),
    FamilySpec("qwen3_moe", ("qwen3_moe",)),
    FamilySpec("qwen2_moe", ("qwen2_moe",), **_QWEN_SHARED),
    FamilySpec(
        "qwen3_next", ("qwen3_next",), attn=("self_attn", "linear_attn"), **_QWEN_SHARED,
        notes="linear-attention layers (GatedDeltaNet) expose linear_attn.out_proj",
    ),
    FamilySpec(
        "flex_olmo", ("flex_olmo",), residual="post_norm", mid="mlp",
        attn_write="post_attention_layernorm", ffn_write="post_feedforward_layernorm",
        notes="post-norm: sublayer writes pass through a norm",
    ),
    FamilySpec("deepseek_v2", ("deepseek_v2",), rule=GroupLimitedSoftmax(), **_DEEPSEEK_SHARED,
               notes="MLA attention; dense prefix layers"),
    FamilySpec("deepseek_v3", ("deepseek_v3", "deepseek_v32"), rule=SigmoidGroupTopK(),
               **_DEEPSEEK_SHARED, notes="MLA attention; dense prefix layers"),
    FamilySpec("glm4_moe", ("glm4_moe",), rule=SigmoidGroupTopK(), **_DEEPSEEK_SHARED,
               notes="dense prefix layers"),
    FamilySpec("gpt_oss", ("gpt_oss",), rule=TopKThenSoftmax(), router="router", returns_tuple=True,
               notes="o_proj bias and attention sinks; transposed, interleaved expert weights"),
    FamilySpec("granitemoe", ("granitemoe",), rule=TopKThenSoftmax(float_logits=True),
               moe="block_sparse_moe", router="router", residual="scaled",
               residual_multiplier="residual_multiplier", notes="residual_multiplier scales sublayer writes"),
    FamilySpec("phimoe", ("phimoe",), rule=SparseMixer(), router="router"),
    FamilySpec("ernie4_5_moe", ("ernie4_5_moe",), rule=BiasedSoftmaxTopK(), shared="shared_experts",
               notes="MoE only in layers moe_layer_start_index..moe_layer_end_index"),
    FamilySpec("hunyuan_v1_moe", ("hunyuan_v1_moe",),
               rule=SoftmaxTopK(renorm=True, cast_to_logits_dtype=True), router_weight="wg.weight",
               shared="shared_mlp", shared_input="3d"),
    # ---- coverage of transformers 5.24's text MoE causal LMs (issue 14) -----------------------
    *[
        FamilySpec(name, (name,), rule=SigmoidGroupTopK(), **_DEEPSEEK_SHARED, notes=note)
        for name, note in [
            ("dots1", "DeepSeek-V3 routing; dense prefix layers"),
            ("dots3_note_text", "text tower; DeepSeek-V3 routing; dense prefix layers"),
            ("exaone_moe", "DeepSeek-V3 routing; dense prefix layers"),
            ("glm4_moe_lite", "MLA attention; DeepSeek-V3 routing; dense prefix layers"),
            ("solar_open", "DeepSeek-V3 routing"),
            ("kimi_linear", "linear (KDA) and MLA attention layers; DeepSeek-V3 routing; dense prefix layers"),
            ("bailing_hybrid", "linear and full attention layers; DeepSeek-V3 routing; dense prefix layers"),
            ("glm_moe_dsa", "MLA attention with a DSA top-k key indexer; DeepSeek-V3 routing; dense prefix layers"),
            ("axk2", "MLA attention with a DSA key indexer and a sigmoid output gate; DeepSeek-V3 routing; dense "
             "prefix layers"),
            ("sarvam_mla", "the DeepSeek-V3 model (DeepseekV3ForCausalLM) under its own model_type; dense prefix "
             "layers"),
            ("sarvam_moe", "the GLM-4-MoE model (Glm4MoeForCausalLM) under its own model_type; dense prefix layers"),
            ("param2moe", "the GLM-4-MoE model (Glm4MoeForCausalLM) under its own model_type; dense prefix layers"),
            ("minicpm5_moe", "gated attention (q_gate_proj); DeepSeek-V3 routing"),
        ]
    ],
    FamilySpec(
        "axk1", ("axk1",), rule=SigmoidGroupTopK(), **_DEEPSEEK_SHARED, block_norm="post_mlp_layernorm",
        ffn_write="mlp.post_mlp_layernorm", residual="post_norm",
        notes="MLA attention; the MoE block normalises its summed output: moe.output is the sum before "
        "post_mlp_layernorm, mlp_write the normalised write; dense prefix layers",
    ),
    FamilySpec("mimo_v2_flash", ("mimo_v2_flash",), rule=SigmoidGroupTopK(), notes="DeepSeek-V3 routing, no shared"),
    FamilySpec(
        "hy_v4", ("hy_v4",), rule=SigmoidGroupTopK(), **_DEEPSEEK_SHARED, mid="ffn_hc", residual="hyper",
        notes="hyper-connections: resid_* points are the [b, p, n, d] multi-stream residual; MoE and attention "
        "points are exact",
    ),
    FamilySpec("mellum", ("mellum",)),
    FamilySpec("qwen3_5_moe_text", ("qwen3_5_moe_text",), rule=SoftmaxTopK(renorm=True),
               attn=("self_attn", "linear_attn"), **_QWEN_SHARED,
               notes="text tower of Qwen3.5-MoE; linear-attention layers (GatedDeltaNet) expose linear_attn.out_proj"),
    FamilySpec(
        "qwen4_exp_text", ("qwen4_exp_text",), attn=("self_attn", "linear_attn"), **_QWEN_SHARED,
        mid="mlp_hyper_connection", residual="hyper",
        notes="text tower; gated hyper-connections: resid_* points are the multi-stream residual",
    ),
    FamilySpec("lara_mini", ("lara_mini",), attn=("self_attn", "linear_attn"), shared="shared_expert",
               notes="linear-attention layers expose linear_attn.out_proj; ungated shared expert"),
    FamilySpec("flint", ("flint",), rule=ScoredTopK(score="sigmoid", renorm="norm_topk_prob"),
               shared="shared_expert", notes="sigmoid top-k; ungated shared expert"),
    FamilySpec("aria_text", ("aria_text",), rule=TopKThenSoftmax(), router="router", shared="shared_experts",
               shared_input="3d", notes="text tower of Aria"),
    FamilySpec(
        "minimax_m2", ("minimax_m2",), rule=ScoredTopK(bias="e_score_correction_bias"),
        router_extra=("e_score_correction_bias",),
        notes="the correction bias lives on the MoE block and is passed to the router",
    ),
    FamilySpec(
        "minimax_m3_vl_text", ("minimax_m3_vl_text",), rule=ScoredTopK(bias="e_score_correction_bias"),
        routed_scale="routed_scaling_factor", shared="shared_experts",
        notes="text tower; routed output x routed_scaling_factor outside the router",
    ),
    FamilySpec(
        "hy_v3", ("hy_v3",),
        rule=ScoredTopK(bias="e_score_correction_bias", eps=1e-20, scale="router_scaling_factor"),
        router_extra=("e_score_correction_bias",), shared="shared_experts",
        notes="the correction bias lives on the MoE block and is passed to the router",
    ),
    FamilySpec(
        "laguna", ("laguna",), rule=ScoredTopK(bias="e_score_correction_bias", softcap="router_logit_softcapping"),
        routed_scale="routed_scaling_factor", shared="shared_experts",
        notes="routed output x routed_scaling_factor outside the router; dense prefix layers",
    ),
    FamilySpec(
        "afmoe", ("afmoe",), rule=ScoredTopK(bias="expert_bias", eps=1e-20, scale="route_scale"), router="router",
        router_input="3d", router_extra=("expert_bias",), shared="shared_experts", mid="pre_mlp_layernorm",
        attn_write="post_attention_layernorm", ffn_write="post_mlp_layernorm", residual="post_norm",
        notes="sandwich norms (sublayer writes pass through a norm); expert bias on the MoE block; gated attention",
    ),
    _KOLIBRI1 := FamilySpec(
        "kolibri1", ("kolibri1",),
        rule=ScoredTopK(choose_on="logits", bias="e_score_correction_bias", renorm="norm_topk_prob"),
        shared="shared_experts", shared_input="3d", attn_write="post_self_attn_layernorm",
        ffn_write="post_mlp_layernorm", residual="post_norm", notes="sandwich norms; top-k on biased logits",
    ),
    _KOLIBRI1.with_(
        name="kolibri1_1", model_types=("kolibri1_1",),
        notes="Kolibri-1 blocks with indexed sparse attention (key/value sharing across layers) and dense prefix "
        "layers; sandwich norms; top-k on biased logits",
    ),
    FamilySpec(
        "ergo", ("ergo",),
        rule=ScoredTopK(bias="e_score_correction_bias", eps=1e-20, scale="routed_scaling_factor"),
        router_weight="linear.weight", **_DEEPSEEK_SHARED, mid="pre_feedforward_layernorm",
        attn_write="post_attention_layernorm", ffn_write="post_feedforward_layernorm", residual="other",
        notes="each expert's output passes its own RMSNorm (ErgoExperts.post_expert_norm, outside the experts "
        "implementation): expert_out is the normalised slot output; gated residual (resid = g·write + g'·resid "
        "with learned per-dimension gates), attn_write / mlp_write are the sandwich norms' outputs before the "
        "gates; dense prefix layers",
    ),
    FamilySpec(
        "beam", ("beam",),
        rule=ScoredTopK(bias="e_score_correction_bias", group_limited=True, renorm="norm_topk_prob", eps=1e-20),
        routed_scale="routed_scaling_factor", mid="pre_feedforward_layernorm", attn_write="post_attention_layernorm",
        ffn_write="post_feedforward_layernorm", residual="scaled",
        notes="routed output x routed_scaling_factor outside the router; sandwich norms; depth-scaled residual",
    ),
    FamilySpec(
        "cohere2_moe", ("cohere2_moe",), rule=TopKThenScore(fn="expert_selection_fn"), shared="shared_experts",
        mid=None, residual="parallel", block_requires=(("shared_expert_combination_strategy", "sum"),),
        shared_optional=True,
        notes="parallel block: resid_post = resid_pre + attn.output + mlp.output (no resid_mid)",
    ),
    FamilySpec(
        "inkling2_text", ("inkling2_text", "inkling2_loop_text"),
        rule=ScoredTopK(score="config", bias="e_score_correction_bias", eps=1e-20, scale="routed_scaling_factor"),
        mid=None, residual="other", o_proj=("o_proj.linear", "o_proj"),
        notes="gated output projection (heads are read at o_proj.linear); block attention-residuals and short "
        "convolutions around each sublayer: no resid_mid",
    ),
    FamilySpec(
        "jamba", ("jamba",), rule=SoftmaxTopK(renorm=False), router="router", moe="feed_forward",
        mid="pre_ff_layernorm", attn_optional=True,
        notes="hybrid: Mamba layers have no attention points; MoE every expert_layer_period layers",
    ),
    FamilySpec(
        "lfm2_moe", ("lfm2_moe",),
        rule=ScoredTopK(bias="expert_bias", renorm="norm_topk_prob", eps=1e-6, scale="routed_scaling_factor"),
        moe="feed_forward", router_extra=("expert_bias",), mid="ffn_norm", attn_optional=True,
        final_norm="model.embedding_norm",
        notes="hybrid: short-convolution layers have no attention points; expert bias on the MoE block",
    ),
    FamilySpec(
        "nemotron_h", ("nemotron_h",), rule=SigmoidGroupTopK(), **_DEEPSEEK_SHARED, moe="mixer", attn=("mixer",),
        attn_optional=True, mid=None, residual="single", identity_wraps=("fc1_latent_proj", "fc2_latent_proj"),
        embed="model.embeddings", final_norm="model.norm_f",
        notes="one mixer per layer (Mamba-2, attention, MLP or MoE): resid_post = resid_pre + the mixer's output; "
        "ReLU² experts; latent MoE projections refused",
    ),
    *[
        FamilySpec(
            name, (name,), rule=TopKThenSoftmax(float_logits=True), moe="block_sparse_moe", router="router",
            residual="scaled", shared="shared_mlp", shared_level="layer", residual_multiplier="residual_multiplier",
            notes="residual_multiplier scales sublayer writes; the layer-level shared_mlp is moe.shared_out "
            "(moe.output is the routed part)",
        )
        for name in ("granitemoeshared", "granitemoe_swa")
    ],
    FamilySpec(
        "granitemoehybrid", ("granitemoehybrid",), rule=TopKThenSoftmax(float_logits=True), moe="block_sparse_moe",
        router="router", residual="scaled", shared="shared_mlp", shared_level="layer", attn_optional=True,
        residual_multiplier="residual_multiplier",
        notes="hybrid: Mamba-2 layers have no attention points; residual_multiplier scales sublayer writes; the "
        "layer-level shared_mlp is moe.shared_out",
    ),
    FamilySpec(
        "llama4_text", ("llama4_text",), rule=TopKThenScore(fn="sigmoid"), moe="feed_forward", router="router",
        shared="shared_expert", router_returns="dense_scores", experts_kind="dense_input_scaled", flat_output=True,
        returns_tuple=True,
        notes="text tower of Llama-4: sigmoid routing weights scale the experts' input (a dense bmm over all "
        "experts); expert_out is each chosen expert on its scaled input, moe.output = Σ_k expert_out + shared_out",
    ),
    FamilySpec("llama", ("llama",), rule=None, is_moe=False, notes="dense: residual and attention points"),
    FamilySpec("qwen2", ("qwen2",), rule=None, is_moe=False, notes="dense: residual and attention points"),
]:
    register_family(_spec)
