"""Address tables inferred from a model's structure, for families expertlens has no table for.

:func:`infer_family` reads an unknown transformers MoE model the way a person would write its table: the
decoder-layer list, a block holding a decorated fused experts module and a router with an ``[E, d]`` weight,
shared children, the router's extra inputs, the norm whose output the block reads, and the residual
wiring (found by one forward with hooks). The routing rule is the first candidate that reproduces the
router's own selection and weights on random inputs.

A guess is only a guess: ``ExpertModel`` accepts an inferred table only after the truth test passes
(no-op logits bit-identical to the unwrapped model, reconstruction and routing re-computation on every
MoE layer), and warns with the table and how to register it. Otherwise it raises the usual
:class:`~expertlens.families.UnsupportedModelError`, saying what the inferred table got wrong.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from .families import (
    BiasedSoftmaxTopK,
    FamilySpec,
    GroupLimitedSoftmax,
    RoutingRule,
    ScoredTopK,
    SigmoidGroupTopK,
    SoftmaxTopK,
    TopKThenScore,
    TopKThenSoftmax,
    UnsupportedModelError,
    get_module,
)

__all__ = ["InferredFamilyWarning", "infer_family", "candidate_rules", "reference_logits"]

_ATTN = ("self_attn", "linear_attn", "self_attention", "attention", "attn", "mixer")
_MID = ("pre_feedforward_layernorm", "pre_mlp_layernorm", "pre_ff_layernorm", "ffn_norm", "post_attention_layernorm")
_FFN_WRITE = ("post_feedforward_layernorm", "post_mlp_layernorm")
_ATTN_WRITE = ("post_self_attn_layernorm", "post_attention_layernorm")
_SCALES = ("routed_scaling_factor", "route_scale", "router_scaling_factor")


class InferredFamilyWarning(UserWarning):
    """Warned when ``ExpertModel`` wraps a model with a table inferred from its structure (truth test passed).

    Example:
        >>> from expertlens.infer import InferredFamilyWarning
        >>> issubclass(InferredFamilyWarning, UserWarning)
        True
    """


def candidate_rules() -> list[RoutingRule]:
    """The routing rules :func:`infer_family` tries, most specific first.

    Example:
        >>> from expertlens.infer import candidate_rules
        >>> len(candidate_rules()) > 10
        True
    """
    rules: list[RoutingRule] = [
        SigmoidGroupTopK(),
        BiasedSoftmaxTopK(),
        GroupLimitedSoftmax(),
        SoftmaxTopK(renorm="norm_topk_prob"),
        SoftmaxTopK(renorm=True, cast_to_logits_dtype=False),
        SoftmaxTopK(renorm=False),
        TopKThenSoftmax(float_logits=True),
        TopKThenSoftmax(),
        TopKThenScore(fn="sigmoid"),
    ]
    for bias in ("e_score_correction_bias", "expert_bias", None):
        for scale in (*_SCALES, None):
            for renorm in ("norm_topk_prob", True, False):
                for eps in (0.0, 1e-20, 1e-6):
                    if not renorm and eps:
                        continue
                    rules.append(ScoredTopK(bias=bias, renorm=renorm, eps=eps, scale=scale))
    return rules


def _path(root: nn.Module, module: nn.Module) -> str | None:
    for name, mod in root.named_modules():
        if mod is module:
            return name
    return None


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and (n is None or len(mod) == n):
            return name, mod
    raise UnsupportedModelError(f"{type(model).__name__}: no decoder-layer list of num_hidden_layers={n} modules")


def _router_of(block: nn.Module, n_experts: int, d: int) -> tuple[str, str] | None:
    for name, child in block.named_children():
        if hasattr(child, "has_gate"):
            continue
        for pname, param in child.named_parameters():
            if param.dim() == 2 and tuple(param.shape) == (n_experts, d) and pname.count(".") <= 1:
                return name, pname
    return None


def _moe_children(layer: nn.Module, d: int) -> dict[str, Any] | None:
    for name, block in layer.named_children():
        experts = [(n, c) for n, c in block.named_children() if hasattr(c, "has_gate") and hasattr(c, "num_experts")]
        if not experts:
            continue
        ename, emod = experts[0]
        found = _router_of(block, int(emod.num_experts), d)
        if found is None:
            continue
        return dict(moe=name, block=block, experts=ename, router=found[0], router_weight=found[1])
    return None


class _FirstLinear:
    """Stands in for ``F.linear`` during one router call and keeps its first result (the logits)."""

    def __init__(self, real, captured: dict):
        self.real, self.captured = real, captured

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        self.captured.setdefault("logits", out)
        return out


def _check_rule(rule: RoutingRule, router: nn.Module, block: nn.Module, extra: list, d: int, router_input: str) -> bool:
    import torch.nn.functional as F

    captured: dict[str, Tensor] = {}

    gen = torch.Generator().manual_seed(0)
    param = next(router.parameters())
    hidden = torch.randn(1, 24, d, generator=gen).to(param.device, param.dtype)
    router.__dict__["_el_owner"] = block
    real = F.linear
    try:
        F.linear = _FirstLinear(real, captured)  # the router's first linear call: its logits
        try:
            with torch.no_grad():
                out = router(hidden if router_input == "3d" else hidden.reshape(-1, d), *extra)
        finally:
            F.linear = real
        if "logits" not in captured or not isinstance(out, tuple) or len(out) != 3:
            return False
        weights, idx = out[1], out[2]
        logits = captured["logits"].reshape(-1, captured["logits"].shape[-1])
        w_ref, idx_ref = rule.route(logits, router)
    except Exception:
        return False
    finally:
        router.__dict__.pop("_el_owner", None)
    if idx_ref.shape != idx.shape:
        return False
    order, order_ref = idx.argsort(-1), idx_ref.argsort(-1)
    if not torch.equal(idx.gather(-1, order), idx_ref.gather(-1, order_ref)):
        return False
    return torch.allclose(weights.gather(-1, order).float(), w_ref.gather(-1, order_ref).float(), atol=1e-6, rtol=0)


def _wiring(model: nn.Module, layers: nn.ModuleList, moe: str, attn: str | None) -> dict[str, Any]:
    """One forward with hooks: which norm feeds the block, and how the layer adds its sublayers."""
    i = next(j for j, layer in enumerate(layers) if _moe_children(layer, model.config.hidden_size))
    layer = layers[i]
    seen: dict[str, tuple] = {}
    names = {moe, *(n for n in _MID + _FFN_WRITE + _ATTN_WRITE if get_module(layer, n) is not None)}
    if attn:
        names.add(attn)
    def record(name):
        def hook(module, args, kwargs, output):  # returns None: a hook's return value would replace the output
            seen.setdefault(name, (args, kwargs, output))

        return hook

    hooks = [get_module(layer, n).register_forward_hook(record(n), with_kwargs=True) for n in names]
    hooks.append(layer.register_forward_hook(record(""), with_kwargs=True))
    try:
        ids = torch.arange(6).remainder(max(getattr(model.config, "vocab_size", 8) - 4, 1)) + 4
        with torch.no_grad():
            model(ids.unsqueeze(0).to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()

    def out(name):
        o = seen[name][-1]
        return o[0] if isinstance(o, tuple) else o

    def inp(name):
        args, kwargs, _ = seen[name]
        return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))

    moe_in = inp(moe)
    mid = next((n for n in _MID if n in seen and torch.equal(out(n), moe_in)), None)
    result: dict[str, Any] = dict(mid=mid, residual="other", attn_write=None, ffn_write=None)
    if mid is None:
        return result
    layer_in, mid_in, post = inp(""), inp(mid), out("")
    ffn_write = next((n for n in _FFN_WRITE if n in seen), None)
    attn_write = next((n for n in _ATTN_WRITE if n in seen and n != mid), None)
    if torch.equal(mid_in + out(moe), post) and (attn is None or torch.equal(layer_in + out(attn), mid_in)):
        result["residual"] = "pre_norm"
    elif ffn_write and torch.equal(mid_in + out(ffn_write), post):
        result.update(residual="post_norm", ffn_write=ffn_write, attn_write=attn_write)
    else:
        result["residual"] = "scaled"
    return result


def infer_family(model: nn.Module, reason: str = "") -> FamilySpec:
    """An address table guessed from ``model``'s structure (not yet verified: see :func:`verify_inferred`).

    Raises:
        UnsupportedModelError: when no decoder layer holds a block with decorated fused experts and an
            ``[E, d]`` router, or no candidate rule reproduces the router, naming what was missing.

    Example:
        >>> from expertlens.infer import infer_family
        >>> from expertlens.testing import tiny_model
        >>> spec = infer_family(tiny_model("mellum"))
        >>> spec.moe, spec.router, type(spec.rule).__name__
        ('mlp', 'gate', 'SoftmaxTopK')
    """
    model_type = getattr(model.config, "model_type", type(model).__name__)
    prefix = f"{reason} " if reason else ""
    layers_path, layers = _layer_list(model)
    d = int(model.config.hidden_size)
    found = [_moe_children(layer, d) for layer in layers]
    moe_rows = [f for f in found if f is not None]
    if not moe_rows:
        raise UnsupportedModelError(
            f"{prefix}No table could be inferred either: no decoder layer of {type(model).__name__} holds a block "
            "with a @use_experts_implementation experts module and a router with an [n_experts, d_model] weight"
        )
    first = moe_rows[0]
    block, router = first["block"], get_module(first["block"], first["router"])
    params = list(inspect.signature(router.forward).parameters.values())[1:]
    extra_names = tuple(p.name for p in params if get_module(block, p.name) is not None and p.name != "hidden_states")
    extra = [get_module(block, n) for n in extra_names]
    rule, router_input = None, "flat"
    for router_input in ("flat", "3d"):
        rule = next((r for r in candidate_rules() if _check_rule(r, router, block, extra, d, router_input)), None)
        if rule is not None:
            break
    if rule is None:
        raise UnsupportedModelError(
            f"{prefix}No table could be inferred either: no known routing rule reproduces "
            f"{type(router).__name__}'s selection and weights"
        )
    children = dict(block.named_children())
    shared = next((n for n in children if "shared" in n and n not in (first["experts"], first["router"])
                   and not isinstance(children[n], nn.Linear)), None)
    gate = next((n for n, c in children.items() if "shared" in n and isinstance(c, nn.Linear)
                 and c.out_features == 1), None)
    layer0 = layers[found.index(first)]
    layer_shared = next((n for n, _ in layer0.named_children() if "shared" in n and n != first["moe"]), None)
    attn_on = [next((a for a in _ATTN if get_module(layer, a) is not None and a != first["moe"]), None)
               for layer in layers]
    attn_names = tuple(dict.fromkeys(a for a in attn_on if a))
    fields_ = dict(
        name=model_type, model_types=(model_type,), rule=rule, layers=layers_path, moe=first["moe"],
        router=first["router"], router_weight=first["router_weight"], experts=first["experts"],
        router_input=router_input, router_extra=extra_names, attn=attn_names or ("self_attn",),
        attn_optional=None in attn_on,
    )
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    fields_["embed"] = _path(model, embed) or "model.embed_tokens"
    fields_["lm_head"] = _path(model, head) or "lm_head"
    if shared is not None:
        fields_.update(shared=shared, shared_gate=gate)
    elif layer_shared is not None:
        fields_.update(shared=layer_shared, shared_level="layer")
    parent = get_module(model, layers_path.rsplit(".", 1)[0]) if "." in layers_path else model
    norm = next((n for n, c in parent.named_children() if "norm" in n.lower() and not isinstance(c, nn.ModuleList)),
                None)
    if norm is not None:
        fields_["final_norm"] = f"{layers_path.rsplit('.', 1)[0]}.{norm}" if "." in layers_path else norm
    fields_.update(_wiring(model, layers, first["moe"], attn_on[found.index(first)]))
    spec = FamilySpec(**fields_)
    text = ", ".join(
        f"{f.name}={getattr(spec, f.name)!r}" for f in fields(spec)
        if f.name not in ("inference", "notes") and getattr(spec, f.name) != f.default
        and f.name in fields_
    )
    return spec.with_(inference=f"FamilySpec({text})", notes="inferred from structure")


def reference_logits(model: nn.Module) -> tuple[Tensor, Tensor]:
    """(input ids, logits) of the unwrapped model on a short dummy input, for :func:`verify_inferred`.

    Example:
        >>> from expertlens.infer import reference_logits
        >>> from expertlens.testing import tiny_model
        >>> ids, logits = reference_logits(tiny_model("olmoe"))
        >>> tuple(ids.shape), logits.shape[-1]
        ((2, 6), 256)
    """
    vocab = min(getattr(model.config, "vocab_size", 104), 104)
    ids = (torch.arange(12).remainder(vocab - 4) + 4).view(2, 6).to(next(model.parameters()).device)
    with torch.no_grad():
        return ids, model(ids).logits
