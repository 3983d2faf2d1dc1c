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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

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
    "SparseMixer",
    "BiasedSoftmaxTopK",
    "UnsupportedModelError",
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
    return getattr(module, name, default)


# --------------------------------------------------------------------------------------------
# Routing rules
# --------------------------------------------------------------------------------------------


class RoutingRule:
    """How a family's router turns pre-softmax logits into probabilities and a top-k choice.

    ``probs`` gives the ``router_probs`` point; ``route`` re-computes ``(topk_weights,
    topk_indices)`` from (possibly edited) logits in eval mode, reading the router module's own
    parameters (top-k, correction bias, scaling factor, ...). ``selection_score`` is the score
    the family ranks experts by, used to make masking/forcing certain.

    Example:
        >>> from expertlens import resolve_family
        >>> resolve_family("mixtral").rule.describe()
        'softmax -> top-k -> renormalise (always)'
    """

    kind: str = "rule"

    def probs(self, logits: Float[Tensor, "*tok E"], router: nn.Module) -> Float[Tensor, "*tok E"]:
        return torch.softmax(logits.float(), dim=-1)

    def route(
        self, logits: Float[Tensor, "tok E"], router: nn.Module
    ) -> tuple[Float[Tensor, "tok k"], Int[Tensor, "tok k"]]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


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

    def route(self, logits, router):
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, idx = torch.topk(probs, _top_k(router), dim=-1)
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

    def route(self, logits, router):
        scores = logits.float().softmax(dim=-1, dtype=torch.float32)
        k = _top_k(router)
        if router.topk_method == "group_limited_greedy":
            n_group, e = router.num_group, scores.shape[-1]
            group_scores = scores.view(-1, n_group, e // n_group).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(-1, e)
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
        weights, idx = torch.topk(scores, k=k, dim=-1, sorted=False)
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

    def probs(self, logits, router):
        return logits.float().sigmoid()

    def route(self, logits, router):
        scores = logits.float().sigmoid()
        choice = scores + router.e_score_correction_bias
        n_group, e = router.num_group, scores.shape[-1]
        group_scores = choice.view(-1, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(-1, e)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        idx = torch.topk(choice, k=_top_k(router), dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, idx


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

    def route(self, logits, router):
        src = logits.float() if self.float_logits else logits
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

    def route(self, logits, router):
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

    def route(self, logits, router):
        probs = torch.softmax(logits.float(), dim=-1, dtype=torch.float)
        _, idx = torch.topk(router.moe_statics(probs), _top_k(router), dim=-1)
        weights = torch.gather(probs, dim=-1, index=idx)
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=router.norm_min)
        return weights, idx


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------

Residual = Literal["pre_norm", "post_norm", "scaled"]


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
        mid: Module whose *input* is the residual stream after attention (``resid_mid``).
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
    mid: str = "post_attention_layernorm"
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

    def attn_module(self, layer: nn.Module) -> tuple[str, nn.Module]:
        for name in self.attn:
            mod = get_module(layer, name)
            if mod is not None:
                return name, mod
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
    names = ", ".join(sorted(_REGISTRY))
    raise UnsupportedModelError(
        f"expertlens has no address table for model family {model_type!r}. Supported families: "
        f"{names}. To add one, describe where its modules sit with "
        f"expertlens.families.FamilySpec(name={model_type!r}, model_types=({model_type!r},), ...) "
        "and call expertlens.register_family(spec) before wrapping the model."
    )


_QWEN_SHARED = dict(shared="shared_expert", shared_gate="shared_expert_gate", shared_input="flat")
_DEEPSEEK_SHARED = dict(shared="shared_experts", shared_input="3d")

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
               notes="residual_multiplier scales sublayer writes"),
    FamilySpec("phimoe", ("phimoe",), rule=SparseMixer(), router="router"),
    FamilySpec("ernie4_5_moe", ("ernie4_5_moe",), rule=BiasedSoftmaxTopK(), shared="shared_experts",
               notes="MoE only in layers moe_layer_start_index..moe_layer_end_index"),
    FamilySpec("hunyuan_v1_moe", ("hunyuan_v1_moe",),
               rule=SoftmaxTopK(renorm=True, cast_to_logits_dtype=True), router_weight="wg.weight",
               shared="shared_mlp", shared_input="3d"),
    FamilySpec("llama", ("llama",), rule=None, is_moe=False, notes="dense: residual and attention points"),
    FamilySpec("qwen2", ("qwen2",), rule=None, is_moe=False, notes="dense: residual and attention points"),
]:
    register_family(_spec)

FamilyCheck = Callable[[nn.Module], None]
