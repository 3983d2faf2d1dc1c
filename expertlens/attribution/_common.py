"""Shared helpers: prompts, positions, frozen norms, per-layer residual coefficients, components."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..families import get_module
from ..prompts import format_chat
from ._table import Component

if TYPE_CHECKING:
    from ..model import ExpertModel

#: Token positions to attribute at: one index, several, or None (all). Not interventions.Positions.
TokenPositions = int | Sequence[int] | None


def as_prompts(prompts: str | Sequence[str], model: ExpertModel, chat: bool) -> list[str]:
    """A list of prompt strings, optionally wrapped in the tokenizer's chat template."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError("no prompts given")
    return format_chat(model.tokenizer, items) if chat else items


def resolve_positions(positions: TokenPositions, p: int) -> list[int] | None:
    """Absolute indices into a padded sequence of length ``p`` (``None``: every position)."""
    if positions is None:
        return None
    items = [positions] if isinstance(positions, int) else list(positions)
    out = []
    for pos in items:
        if not -p <= pos < p:
            raise IndexError(f"position {pos} out of range for a sequence of {p} tokens")
        out.append(pos % p)
    return out


def pick(x: Tensor, idx: list[int] | None) -> Tensor:
    """``x[:, idx]`` (a detached CPU copy), or all of ``x``."""
    x = x.detach()
    return (x if idx is None else x[:, idx]).to("cpu", copy=True)


def original_call(module: nn.Module, x: Tensor) -> Tensor:
    """Call a module without the expertlens edits registered on it."""
    st = module.__dict__.get("_el_edit_state")
    if st is not None:
        return st.original_class.forward(module, x)
    return module(x)


def frozen_norm(module: nn.Module, x: Tensor) -> tuple[Tensor, bool, Tensor | None]:
    """A norm made linear by freezing its scale at ``x``: ``(scale, center, bias)`` such that
    ``module(x) == (x - center·mean(x)) * scale + bias``.

    RMS norms (``w * x / rms(x)`` and ``(1 + w) * x / rms(x)`` alike: the gain is probed with an
    all-ones input) give ``center=False, bias=None``; ``nn.LayerNorm`` gives ``center=True`` and its
    bias. Other norms raise ``NotImplementedError``.
    """
    out = _frozen_norm(module, x.to(_module_device(module)))
    return out[0].cpu(), out[1], None if out[2] is None else out[2].cpu()


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _frozen_norm(module: nn.Module, x: Tensor) -> tuple[Tensor, bool, Tensor | None]:
    xf = x.float()
    if isinstance(module, nn.LayerNorm):
        mu = xf.mean(-1, keepdim=True)
        var = (xf - mu).pow(2).mean(-1, keepdim=True)
        w = module.weight.detach().float() if module.weight is not None else torch.ones_like(xf[0, 0])
        scale = torch.rsqrt(var + module.eps) * w
        bias = module.bias.detach().float() if module.bias is not None else None
        return scale, True, bias
    eps = next((float(getattr(module, a)) for a in ("variance_epsilon", "eps", "epsilon")
                if isinstance(getattr(module, a, None), (int, float))), 1e-6)
    d = x.shape[-1]
    with torch.no_grad():
        probe = torch.ones(1, d, dtype=x.dtype, device=x.device)
        gain = original_call(module, probe).float().reshape(d) * (1.0 + eps) ** 0.5
        scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * gain
        actual = original_call(module, x).float()
    err = (actual - xf * scale).abs().max().item() if x.numel() else 0.0
    tol = 1e-3 * max(1.0, actual.abs().max().item()) if x.numel() else 0.0
    if err > tol:
        raise NotImplementedError(
            f"{type(module).__name__} is neither an RMS norm nor a LayerNorm (frozen-scale reconstruction "
            f"error {err:.3g}); direct attribution through it is not supported"
        )
    return scale, False, None


def norm_scale(module: nn.Module, x: Tensor) -> Tensor:
    """The per-position multiplier ``s`` with ``module(x) == x * s`` for an RMS norm frozen at ``x``."""
    scale, center, bias = frozen_norm(module, x)
    if center or bias is not None:
        raise NotImplementedError(
            f"{type(module).__name__} centres or adds a bias; direct attribution through a sublayer-write "
            "LayerNorm is not supported"
        )
    return scale


def residual_coefficients(model: ExpertModel, layer: int) -> tuple[float, float, float, float]:
    """``(alpha_attn, beta_attn, alpha_ffn, beta_ffn)``: ``resid_mid = a_a·resid_pre + b_a·attn_write``,
    ``resid_post = a_f·resid_mid + b_f·mlp_write`` (all 1 for pre- and post-norm families; GraniteMoE
    scales writes by ``residual_multiplier``).

    Raises ``NotImplementedError`` for MiniMax, whose layers re-normalise the residual stream itself
    (``norm(x)·alpha + f(norm(x))·beta``), so it is not a sum of component writes.
    """
    mod = model.spec.layer_list(model.hf_model)[layer]
    try:
        return model.spec.write_factors(mod)
    except NotImplementedError as exc:
        raise NotImplementedError(f"{exc}; direct attribution is not supported") from None


def write_norms(model: ExpertModel, layer: int) -> tuple[nn.Module | None, nn.Module | None]:
    """For post-norm families, the norms applied to the attention / feed-forward write."""
    info = model.layout[layer]
    if model.spec.residual != "post_norm":
        return None, None
    root = model.hf_model
    a = get_module(root, info.attn_write) if info.attn_write else None
    f = get_module(root, info.ffn_write) if info.ffn_write else None
    return a, f


def layer_components(model: ExpertModel, layer: int, *, router: bool = False,
                     bias: bool = True, other: bool = False) -> list[Component]:
    """Labels of the components that write the residual stream in ``layer``."""
    info = model.layout[layer]
    out: list[Component] = []
    if info.o_proj is not None:
        out += [Component(layer, "head", h) for h in range(info.n_heads)]
        if bias and model.layers[layer].attn.o_bias is not None:
            out.append(Component(layer, "attn_bias", 0))
    else:
        out.append(Component(layer, "attn", 0))
    if info.block is not None:
        if router:
            out += [Component(layer, "router", e) for e in range(info.n_experts)]
        out += [Component(layer, "expert", e) for e in range(info.n_experts)]
        if model.spec.shared is not None:
            out.append(Component(layer, "shared", 0))
    else:
        out.append(Component(layer, "mlp", 0))
    if other:
        out.append(Component(layer, "other", 0))
    return out


def model_shape(model: ExpertModel) -> dict[str, Any]:
    return {
        "n_layers": model.n_layers,
        "n_heads": max(int(r.n_heads) for r in model.layout),
        "n_experts": model.n_experts,
    }
