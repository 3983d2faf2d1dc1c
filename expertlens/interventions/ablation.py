"""Directional ablation (Arditi et al.): as activation edits, and as the equivalent weight edit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..direction import Direction
from ..edits import track
from ..families import get_module
from ..points import PointError
from .base import Intervention
from .selectors import LayerSpec, Positions, apply_masked, check_vector, resolve_layers, token_selection

if TYPE_CHECKING:
    from ..model import EditHandle, ExpertModel

__all__ = ["AblateDirection", "OrthogonalizeWeights", "WeightEditHandle", "WRITES", "weight_edits"]

#: Residual-stream writes ``AblateDirection`` can edit, and the point each one edits.
WRITES = {"embed": "embed", "resid_pre": "resid_pre", "attn": "attn_write", "mlp": "mlp_write"}


def _unit(model: ExpertModel, direction: Direction | Tensor, what: str) -> Tensor:
    v = check_vector(model, direction, (model.d_model,), what, nonzero=True).double()  # float64: no underflow
    return (v / v.norm()).float()


@dataclass(frozen=True, eq=False, repr=False)
class AblateDirection(Intervention):
    """Directional ablation: ``x ← x − r̂ r̂ᵀ x`` at every write into the residual stream.

    ``r̂ = r/‖r‖``. With the default ``writes=("resid_pre", "attn", "mlp")`` the component along
    ``r̂`` is removed from the input of every selected layer, from each attention write
    (``attn_write``) and each MLP/MoE write (``mlp_write``), at every position, so no component
    along ``r̂`` can be written or read anywhere (Arditi et al., 2024). ``"embed"`` also edits the
    token embeddings. Pathway ablations restrict the writes: ``writes=("attn",)`` (attention
    only) or ``writes=("mlp",)`` (MoE/MLP only). This is the activation-space twin of
    :class:`OrthogonalizeWeights` (equal logits for pre-norm families).

    Example:
        >>> import torch
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.interventions import AblateDirection
        >>> model = ExpertModel(tiny_model("qwen2_moe"), tiny_tokenizer())
        >>> r = torch.randn(64)
        >>> with model.intervene(AblateDirection(r, writes=("mlp",))), model.trace("hi"):
        ...     w = model.layers[0].mlp_write.save()
        >>> bool((w @ (r / r.norm())).abs().max() < 1e-5)
        True
    """

    direction: Direction | Tensor
    writes: Sequence[str] = ("resid_pre", "attn", "mlp")
    layers: LayerSpec = None
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def _writes(self) -> tuple[str, ...]:
        writes = (self.writes,) if isinstance(self.writes, str) else tuple(self.writes)
        bad = [w for w in writes if w not in WRITES]
        if bad or not writes:
            raise ValueError(
                f"AblateDirection: unknown writes {bad or writes!r}; accepted are {tuple(WRITES)}"
            )
        return writes

    def validate(self, model: ExpertModel) -> None:
        self._writes()
        _unit(model, self.direction, "AblateDirection")
        resolve_layers(model, self.layers, what="AblateDirection: ")
        Positions.coerce(self.positions)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        r = _unit(model, self.direction, "AblateDirection")
        pos, rows = Positions.coerce(self.positions), self.rows

        def edit(x, ctx):
            rr = r.to(x)
            new = x - (x @ rr).unsqueeze(-1) * rr
            return apply_masked(x, new, token_selection(pos, rows, ctx, x))

        handles = []
        writes = self._writes()
        if "embed" in writes:
            handles.append(model.add_edit("embed", edit))
        for layer in resolve_layers(model, self.layers):
            for w in ("resid_pre", "attn", "mlp"):
                if w in writes:
                    for point in _write_points(model, layer, w):
                        handles.append(model.add_edit(point, edit, layer=layer))
        return handles


def _write_points(model: ExpertModel, layer: int, write: str) -> list[str]:
    """The points carrying one of ``AblateDirection``'s writes on ``layer``.

    A hybrid stack's recurrent / convolution layer has no attention write: its mixer's write is removed at
    ``resid_mid`` (the stream right after it; the stream before it is already ablated, so the two are equal). A
    layer-level shared MLP (granitemoeshared / granitemoehybrid) writes beside the MoE block, outside
    ``mlp_write``: its ``moe.shared_out`` is edited too.
    """
    lay = model.layout[layer]
    if write == "attn" and lay.attn_write is None and lay.attn is None:
        if lay.mid is None:
            raise PointError(
                f"AblateDirection: layer {layer} ({lay.layer_type}) has no attention and no resid_mid, so its "
                "mixer's write cannot be ablated; pass writes=('resid_pre', 'mlp') or choose other layers"
            )
        return ["resid_mid"]
    if write == "mlp" and lay.has_shared and model.spec.shared_level == "layer":
        return [WRITES[write], "moe.shared_out"]
    return [WRITES[write]]


class WeightEditHandle:
    """Restores weights changed by :class:`OrthogonalizeWeights` (bit-identical); ``remove()``
    is idempotent, so the handle works with ``model.intervene``.

    Example:
        >>> import torch
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.interventions import OrthogonalizeWeights
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> before = model.hf_model.lm_head.weight.clone()
        >>> handles = OrthogonalizeWeights(torch.randn(64)).attach(model)   # [WeightEditHandle]
        >>> for h in handles:
        ...     h.remove()
        >>> torch.equal(before, model.hf_model.lm_head.weight)
        True
    """

    def __init__(self, saved: list[tuple[nn.Parameter, Tensor]], stack: list | None = None):
        self._saved = saved
        self._stack = stack if stack is not None else []
        self.active = True
        if saved:
            self._stack.append(self)

    def remove(self) -> None:
        """Restore the weights. Weight edits on the same model are undone last-in first-out:
        removing one while a later one is still applied raises before touching any weight (its
        saved originals would overwrite the later edit)."""
        if not self.active:
            return
        later = self._stack[self._stack.index(self) + 1:] if self in self._stack else []
        if later:
            raise RuntimeError(
                f"OrthogonalizeWeights: this weight edit is #{self._stack.index(self) + 1} of {len(self._stack)} on "
                f"the model, and {len(later)} applied after it are still active; remove weight edits in reverse "
                "order (latest first), or call model.clear_edits() to undo them all. No weight was changed"
            )
        with torch.no_grad():
            for param, original in reversed(self._saved):
                param.copy_(original)
        self.active = False
        if self in self._stack:
            self._stack.remove(self)

    restore = remove


def weight_edits(model: ExpertModel) -> list[WeightEditHandle]:
    """The active weight edits on ``model``, oldest first (``model.n_edits()`` counts them).

    Example:
        >>> import torch
        >>> from expertlens import ExpertModel
        >>> from expertlens.interventions import OrthogonalizeWeights
        >>> from expertlens.interventions.ablation import weight_edits
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> with model.intervene(OrthogonalizeWeights(torch.ones(model.d_model))):
        ...     len(weight_edits(model))
        1
        >>> len(weight_edits(model))
        0
    """
    return model.hf_model.__dict__.setdefault("_el_weight_edits", [])


def _down_linear(model: ExpertModel, module: nn.Module, what: str) -> nn.Linear:
    out = model.spec.mlp_out_linear(module)
    if out is None:
        raise ValueError(
            f"OrthogonalizeWeights: {what} ({type(module).__name__}) has no Linear output projection at "
            f"{model.spec.mlp_out!r} (FamilySpec.mlp_out)"
        )
    return out


def _shared_linear(model: ExpertModel, module: nn.Module, what: str) -> nn.Linear:
    """A shared expert's output projection: ``FamilySpec.mlp_out``, else (granite's ``input_linear`` /
    ``output_linear`` MLP) its one direct Linear child writing ``d_model``."""
    if model.spec.mlp_out_linear(module) is None:
        writes = [c for n, c in module.named_children() if isinstance(c, nn.Linear) and n != "input_linear"
                  and c.out_features == model.d_model]
        if len(writes) == 1:
            return writes[0]
    return _down_linear(model, module, what)


def _mixer_out(model: ExpertModel, row: Any) -> nn.Linear:
    """The Linear through which a layer's mixer writes the residual stream: attention's output projection, or
    (hybrid stacks) the recurrent / convolution mixer's ``out_proj``."""
    hf = model.hf_model
    if row.o_proj is not None:
        return hf.get_submodule(row.o_proj)
    if row.attn is None:
        layer = hf.get_submodule(row.path)
        found = [(n, c.out_proj) for n, c in layer.named_children()
                 if isinstance(getattr(c, "out_proj", None), nn.Linear) and c.out_proj.out_features == model.d_model]
        if len(found) == 1:
            return found[0][1]
        raise ValueError(
            f"OrthogonalizeWeights: layer {row.index} is a {row.layer_type} with no attention (a recurrent or "
            f"convolution mixer), and its mixer has no single Linear out_proj writing d_model={model.d_model} "
            f"(found {[n for n, _ in found]}); use AblateDirection"
        )
    raise ValueError(f"OrthogonalizeWeights: layer {row.index}'s attention has no linear output projection")


@dataclass(frozen=True, eq=False, repr=False)
class OrthogonalizeWeights(Intervention):
    """The weight-space twin of :class:`AblateDirection`: every matrix writing into the residual
    stream is projected off ``r̂``, ``W_out ← W_out − r̂ r̂ᵀ W_out`` (and biases
    ``b ← b − r̂ r̂ᵀ b``), and the embedding rows ``E[t] ← E[t] − r̂ r̂ᵀ E[t]``.

    Covered: token embeddings, attention output projections (and bias), dense MLP down
    projections, fused 3-D expert ``down_proj`` (``[E, d, I]``, or ``[E, I, d]`` for
    ``is_transposed`` layouts such as gpt_oss) with ``down_proj_bias`` ``[E, d]``, and shared
    experts. Supported for pre-norm families and granitemoe (its residual multipliers are plain
    scalars, so orthogonality survives them). Refused with the reason for post-norm families
    (flex_olmo: each write passes through a norm, which is not linear) and minimax (its residual
    branch is the *normed* stream, so an orthogonal input does not stay orthogonal), and for tied
    embeddings (editing the embedding would also edit the unembedding).

    ``apply(model)`` edits in place and returns a :class:`WeightEditHandle` whose ``remove()``
    restores the original weights bit for bit; used in ``model.intervene`` it is restored on exit.

    Example:
        >>> import torch
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.interventions import OrthogonalizeWeights
        >>> model = ExpertModel(tiny_model("gpt_oss"), tiny_tokenizer())
        >>> handle = OrthogonalizeWeights(torch.randn(64)).apply(model)
        >>> handle.remove()  # original weights back
    """

    direction: Direction | Tensor

    def validate(self, model: ExpertModel) -> None:
        _unit(model, self.direction, "OrthogonalizeWeights")
        spec = model.spec
        if spec.residual == "post_norm":
            raise ValueError(
                f"OrthogonalizeWeights: {model.family} is post-norm (x + norm(f(x))); the norm after each "
                "sublayer is not linear, so no weight edit equals directional ablation. Use AblateDirection"
            )
        if not spec.additive_residual:
            raise ValueError(
                f"OrthogonalizeWeights: {model.family} scales a normed residual branch, so weight "
                "orthogonalisation does not equal directional ablation. Use AblateDirection"
            )
        hf = model.hf_model
        if hf.get_output_embeddings().weight is hf.get_input_embeddings().weight:
            raise ValueError(
                "OrthogonalizeWeights: the embeddings are tied to the unembedding; untie them first"
            )
        self._targets(model)

    def _targets(self, model: ExpertModel) -> list[tuple[nn.Parameter, str]]:
        """(parameter, how) pairs: how = "rows" (d last), "out" ([..., d, in]) or "bias"."""
        hf, spec = model.hf_model, model.spec
        out: list[tuple[nn.Parameter, str]] = [(hf.get_input_embeddings().weight, "rows")]

        def linear(mod: nn.Linear) -> None:
            out.append((mod.weight, "out"))
            if mod.bias is not None:
                out.append((mod.bias, "rows"))

        for i, row in enumerate(model.layout):
            linear(_mixer_out(model, row))
            if row.block is None:
                linear(_down_linear(model, hf.get_submodule(row.mlp), f"layer {i}'s MLP"))
                continue
            block = hf.get_submodule(row.block)
            experts = hf.get_submodule(row.experts)
            if getattr(experts, "has_post_expert_norm", False):
                raise ValueError(f"OrthogonalizeWeights: layer {i}'s experts apply a norm after down_proj")
            out.append((experts.down_proj, "rows" if experts.is_transposed else "out"))
            if getattr(experts, "has_bias", False) and getattr(experts, "down_proj_bias", None) is not None:
                out.append((experts.down_proj_bias, "rows"))
            if spec.shared is not None:
                # a layer-level shared MLP (granitemoeshared) sits beside the block, in the decoder layer
                owner = hf.get_submodule(row.path) if spec.shared_level == "layer" else block
                shared = get_module(owner, spec.shared)
                if shared is not None:
                    linear(_shared_linear(model, shared, f"layer {i}'s shared expert"))
        d = model.d_model
        names = {id(p): n for n, p in hf.named_parameters()}
        for param, how in out:
            name = names.get(id(param), type(param).__name__)
            kind = type(param).__name__
            if param.is_meta or param.device.type == "meta":
                raise ValueError(
                    f"OrthogonalizeWeights: {name} is on the meta device (offloaded, e.g. device_map with disk/CPU "
                    "offload), so it cannot be edited in place; load the model without offloading, or use "
                    "AblateDirection (the activation-space equivalent)"
                )
            quantised = kind in ("Params4bit", "Int8Params") or hasattr(param, "quant_state")
            if quantised or not param.dtype.is_floating_point:
                raise ValueError(
                    f"OrthogonalizeWeights: {name} is quantised ({kind}, dtype {param.dtype}); projecting its "
                    "packed values would edit bytes, not weights. Load the model unquantised (a float dtype), "
                    "or use AblateDirection"
                )
            dim = -1 if how == "rows" else -2
            if param.shape[dim] != d:
                raise ValueError(
                    f"OrthogonalizeWeights: {name} has shape {tuple(param.shape)}; a residual write needs "
                    f"d_model = {d} on dim {dim}"
                )
        return out

    def apply(self, model: ExpertModel) -> WeightEditHandle:
        """Validate, then edit the weights in place; returns the restoring handle."""
        self.validate(model)
        r = _unit(model, self.direction, "OrthogonalizeWeights")
        saved: list[tuple[nn.Parameter, Tensor]] = []
        try:
            with torch.no_grad():
                for param, how in self._targets(model):
                    if any(param is p for p, _ in saved):
                        continue
                    saved.append((param, param.detach().clone()))
                    w = param.detach().float()
                    rr = r.to(w.device)
                    if how == "rows":  # [..., d]: w - (w·r) r
                        new = w - (w @ rr).unsqueeze(-1) * rr
                    else:  # [..., d, in]: w - r (rᵀ w)
                        new = w - rr.unsqueeze(-1) * (rr @ w).unsqueeze(-2)
                    param.copy_(new.to(param.dtype))
        except BaseException:
            WeightEditHandle(saved).remove()
            raise
        return track(model, WeightEditHandle(saved, weight_edits(model)))

    def attach(self, model: ExpertModel) -> list[Any]:
        return [self.apply(model)]
