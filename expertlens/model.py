"""``ExpertModel``: an nnsight model whose MoE internals are named, shaped, writable points.

Inside ``model.trace(...)`` or ``model.generate(...)``::

    model.layers[i].resid_pre / .resid_mid / .resid_post        [b, p, d]
    model.layers[i].attn.output [b, p, d]   .z [b, p, h, d_head]   .head_out [b, p, h, d]
    model.layers[i].moe.router_logits / .router_probs            [b, p, E]
    model.layers[i].moe.topk_indices / .topk_weights             [b, p, k]
    model.layers[i].moe.expert_out                               [b, p, k, d]
    model.layers[i].moe.experts[e].output                        [n_routed, d]
    model.layers[i].moe.shared_out / .output                     [b, p, d]
    model.layers[i].mlp.output                                   [b, p, d]  (dense or MoE)
    model.embed [b, p, d]    model.logits [b, p, vocab]

Each point reads like an nnsight value (``.save()`` it to keep it) and is assigned to write it.
Within one invoke, read points in the order the model computes them (nnsight's rule); within a
layer that order is the one listed above.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from nnsight import TransformersModel
from torch import Tensor, nn

from . import instrument as _instrument
from .families import FamilySpec, UnsupportedModelError, get_module, resolve_family

__all__ = [
    "ExpertModel",
    "LayerPoints",
    "AttentionPoints",
    "MLPPoints",
    "MoEPoints",
    "ExpertPoint",
    "PointError",
]


class PointError(ValueError):
    """A point that does not exist: layer/expert out of range, MoE point on a dense layer, ...

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())
        >>> from expertlens import PointError
        >>> try:
        ...     model.layers[99]
        ... except PointError as err:
        ...     print(err)
        layer 99 out of range: the model has 2 layers (0..1)
    """


def _envoy(root: Any, path: str) -> Any:
    """Walk an nnsight Envoy tree by dotted path (numeric parts index ModuleLists)."""
    env = root
    for part in path.split("."):
        if not part:
            continue
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _module_path(root: nn.Module, module: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is module:
            return name
    raise KeyError(type(module).__name__)


# --------------------------------------------------------------------------------------------
# Point groups
# --------------------------------------------------------------------------------------------


class AttentionPoints:
    """Attention points of one layer: ``output``, ``z`` and ``head_out``.

    ``head_out[..., h, :]`` is head ``h``'s write through the output projection,
    ``z[..., h, :] @ W_O[:, h]ᵀ``; it excludes the projection bias, so
    ``head_out.sum(-2) + bias == output`` (``bias`` is :attr:`o_bias`, zero for most families).
    For post-norm families (``flex_olmo``) ``output`` is the attention module's output, before the
    norm that precedes the residual add.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())
        >>> with model.trace("hi"):
        ...     heads = model.layers[0].attn.head_out.save()   # [b, p, h, d]
        ...     out = model.layers[0].attn.output.save()       # [b, p, d]
        >>> bool((heads.sum(-2) - out).abs().max() < 1e-5)
        True
    """

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer
        info = model._layer_info[layer]
        self._attn_path = info["attn"]
        self._o_path = info["o_proj"]
        self.n_heads: int = info["n_heads"]
        self.d_head: int = info["d_head"]

    @property
    def _attn(self):
        if self._attn_path is None:
            info = self._model._layer_info[self.layer]
            raise PointError(
                f"layer {self.layer} is a {info['layer_type']} with no attention (a recurrent or convolution "
                f"mixer in this {self._model.family} hybrid stack): it has no attention points. Layers with "
                f"attention: {[i for i, r in enumerate(self._model._layer_info) if r['attn'] is not None]}"
            )
        return _envoy(self._model, self._attn_path)

    @property
    def _o(self):
        if self._attn_path is None:
            self._attn  # noqa: B018  (raises the hybrid-layer error)
        if self._o_path is None:
            raise PointError(f"layer {self.layer}: attention has no linear output projection to split by head")
        return _envoy(self._model, self._o_path)

    @property
    def o_weight(self) -> Float[Tensor, "d_model heads d_head"]:
        """The output projection as ``[d_model, heads, d_head]`` (a view of the real weight)."""
        if self._o_path is None:
            self._o  # noqa: B018  (raises the no-projection / no-attention error)
        w = _dense_o_weight(get_module(self._model._module, self._o_path), self.layer)
        return w.view(w.shape[0], self.n_heads, self.d_head)

    @property
    def o_bias(self) -> Float[Tensor, " d_model"] | None:
        return get_module(self._model._module, self._o_path).bias

    @property
    def output(self) -> Float[Tensor, "batch pos d_model"]:
        out = self._attn.output
        return out[0] if isinstance(out, tuple) else out

    @output.setter
    def output(self, value: Tensor) -> None:
        out = self._attn.output
        if isinstance(out, tuple):
            self._attn.output = (value, *out[1:])
        else:
            self._attn.output = value

    @property
    def z(self) -> Float[Tensor, "batch pos heads d_head"]:
        x = self._o.input
        return x.view(*x.shape[:-1], self.n_heads, self.d_head)

    @z.setter
    def z(self, value: Tensor) -> None:
        self._o.input = value.reshape(*value.shape[:-2], self.n_heads * self.d_head)

    @property
    def head_out(self) -> Float[Tensor, "batch pos heads d_model"]:
        w = self.o_weight  # before reading z: a quantised W_O refuses before the trace requests anything
        z = self.z
        return torch.einsum("bphk,dhk->bphd", z, w.to(z.dtype))

    @head_out.setter
    def head_out(self, value: Tensor) -> None:
        total = value.sum(dim=-2)
        if self.o_bias is not None:
            total = total + self.o_bias
        self._o.output = total


class MLPPoints:
    """The feed-forward sublayer of a layer, dense or MoE: ``output`` ``[b, p, d]``.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())
        >>> with model.trace("hi"):
        ...     ffn = model.layers[1].mlp.output.save()
        >>> ffn.shape[-1] == model.d_model
        True
    """

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer
        self.is_moe = layer in model.moe_layers

    @property
    def output(self) -> Float[Tensor, "batch pos d_model"]:
        if self.is_moe:
            return self._model.layers[self.layer].moe.output
        out = _envoy(self._model, self._model._layer_info[self.layer]["mlp"]).output
        return out[0] if isinstance(out, tuple) else out

    @output.setter
    def output(self, value: Tensor) -> None:
        if self.is_moe:
            self._model.layers[self.layer].moe.output = value
        else:
            _envoy(self._model, self._model._layer_info[self.layer]["mlp"]).output = value


class ExpertPoint:
    """One routed expert of one layer: its outputs where it was selected.

    ``output`` is ``[n, d]`` — the expert's outputs (before routing weights) at every
    (batch, pos, slot) where it was in the top-k, in that order; ``[0, d]`` where it never
    fired. Several experts of a layer can be read in one trace, in any order, but before that
    layer's ``expert_out`` (``experts[e]`` is served just before it). Assigning ``output``
    writes those slots in place.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())
        >>> with model.trace("hello"):
        ...     out3 = model.layers[0].moe.experts[3].output.save()   # [n, d], n = tokens routed to 3
        ...     mask3 = model.layers[0].moe.experts[3].mask.save()    # [b, p]
        >>> out3.shape[0] == int(mask3.sum())
        True
    """

    def __init__(self, moe: MoEPoints, expert: int):
        self._moe, self.expert = moe, expert

    @property
    def slot_mask(self) -> Bool[Tensor, "batch pos k"]:
        """``[b, p, k]`` True at the slots where this expert was selected."""
        return self._moe._expert_view[0] == self.expert

    @property
    def mask(self) -> Bool[Tensor, "batch pos"]:
        """``[b, p]`` True at tokens routed to this expert."""
        return self.slot_mask.any(-1)

    @property
    def output(self) -> Float[Tensor, "n d_model"]:
        indices, out = self._moe._expert_view
        return out.reshape(-1, out.shape[-1])[self._moe._expert_rows(indices, self.expert)]

    @output.setter
    def output(self, value: Tensor) -> None:
        indices, out = self._moe._expert_view
        out.view(-1, out.shape[-1])[self._moe._expert_rows(indices, self.expert)] = value.to(out.dtype)


class MoEPoints:
    """MoE points of one layer (see the module docstring for shapes).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())
        >>> with model.trace("hello"):
        ...     moe = model.layers[1].moe
        ...     logits = moe.router_logits.save()     # [b, p, E]
        ...     idx = moe.topk_indices.save()         # [b, p, k]
        ...     per_slot = moe.expert_out.save()      # [b, p, k, d]
        >>> logits.shape[-1], idx.shape[-1], per_slot.shape[-2]
        (8, 2, 2)
    """

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer
        info = model._layer_info[layer]
        self._router_path = info["router"]
        self._experts_path = info["experts"]
        self._block_path = info["block"]
        self.n_experts: int = info["n_experts"]
        self.top_k: int = info["top_k"]
        self.has_shared: bool = info["has_shared"]

    def _get(self, path: str):
        if not _instrument.is_installed(self._model._module):
            raise PointError(
                "this model's expertlens instrumentation was removed (model.restore()): MoE points are gone; "
                "wrap the model again with ExpertModel(...)"
            )
        return _envoy(self._model, path)

    def _expert_rows(self, indices: Tensor, expert: int) -> Tensor:
        """Flat (batch, pos, slot) row numbers where ``expert`` was selected, in that order.

        One stable sort and one host read of the per-expert counts per layer and forward, shared by every
        ``experts[e]`` read or write of that forward (a boolean mask per expert would sync once per expert).
        """
        cached = self.__dict__.get("_rows")
        if cached is None or cached[0]() is not indices:
            flat = indices.reshape(-1)
            order = torch.sort(flat, stable=True).indices
            counts = torch.zeros(self.n_experts, dtype=torch.long, device=flat.device)
            counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.long))
            ends = counts.cumsum(0).tolist()  # the one host sync: the result's size depends on the routing
            cached = (weakref.ref(indices), order, [0, *ends])
            self.__dict__["_rows"] = cached
        _, order, bounds = cached
        return order[bounds[expert] : bounds[expert + 1]]

    @property
    def _expert_view(self) -> tuple[Tensor, Tensor]:
        """(topk_indices, expert_out) of this forward, as one value that can be read repeatedly."""
        return self._get(f"{self._experts_path}.el_expert_view").output

    @property
    def input(self) -> Float[Tensor, "batch pos d_model"]:
        """The MoE block's input (the normalised residual stream the router and experts read)."""
        return self._get(self._block_path).input

    # router ---------------------------------------------------------------------------------
    @property
    def router_logits(self) -> Float[Tensor, "batch pos n_experts"]:
        """Pre-softmax router logits; edits change selection and weights through the family's router."""
        return self._get(f"{self._router_path}.el_router_logits").output

    @router_logits.setter
    def router_logits(self, value: Tensor) -> None:
        self._get(f"{self._router_path}.el_router_logits").output = value

    @property
    def router_probs(self) -> Float[Tensor, "batch pos n_experts"]:
        """The family's scores from the (possibly edited) logits: softmax, or sigmoid for DeepSeek-V3.

        A derived read-out: writing it does not change routing (edit ``router_logits`` or ``topk_*``).
        """
        return self._get(f"{self._router_path}.el_router_probs").output

    @property
    def topk_indices(self) -> Int[Tensor, "batch pos k"]:
        return self._get(f"{self._router_path}.el_topk_indices").output

    @topk_indices.setter
    def topk_indices(self, value: Tensor) -> None:
        self._get(f"{self._router_path}.el_topk_indices").output = value

    @property
    def topk_weights(self) -> Float[Tensor, "batch pos k"]:
        return self._get(f"{self._router_path}.el_topk_weights").output

    @topk_weights.setter
    def topk_weights(self, value: Tensor) -> None:
        self._get(f"{self._router_path}.el_topk_weights").output = value

    # experts --------------------------------------------------------------------------------
    @property
    def expert_out(self) -> Float[Tensor, "batch pos k d_model"]:
        """Each selected expert's output before its routing weight, slot by slot."""
        return self._get(f"{self._experts_path}.el_expert_out").output

    @expert_out.setter
    def expert_out(self, value: Tensor) -> None:
        self._get(f"{self._experts_path}.el_expert_out").output = value

    @property
    def experts(self) -> _ExpertList:
        """``experts[e]`` addresses one routed expert (:class:`ExpertPoint`)."""
        return _ExpertList(self)

    @property
    def shared_out(self) -> Float[Tensor, "batch pos d_model"] | None:
        """The shared expert's contribution (after its gate), or ``None`` for families without one."""
        if not self.has_shared:
            return None
        return self._get(self._model._layer_info[self.layer]["shared_point"]).output

    @shared_out.setter
    def shared_out(self, value: Tensor) -> None:
        if not self.has_shared:
            raise PointError(f"family {self._model.family!r} has no shared expert to write")
        self._get(self._model._layer_info[self.layer]["shared_point"]).output = value

    @property
    def output(self) -> Float[Tensor, "batch pos d_model"]:
        """The MoE block's output: ``Σ_k topk_weights·expert_out (+ shared_out)``."""
        return self._get(f"{self._block_path}.el_output").output

    @output.setter
    def output(self, value: Tensor) -> None:
        self._get(f"{self._block_path}.el_output").output = value


class _ExpertList:
    def __init__(self, moe: MoEPoints):
        self._moe = moe

    def __len__(self) -> int:
        return self._moe.n_experts

    def __getitem__(self, expert: int) -> ExpertPoint:
        n = self._moe.n_experts
        if not isinstance(expert, int) or not -n <= expert < n:
            raise PointError(
                f"expert {expert!r} out of range: layer {self._moe.layer} has {n} routed experts (0..{n - 1})"
            )
        return ExpertPoint(self._moe, expert % n)


class LayerPoints:
    """Points of one decoder layer: residual stream, ``attn``, ``mlp`` and (MoE layers) ``moe``.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())
        >>> with model.trace("hi"):
        ...     pre = model.layers[1].resid_pre.save()
        ...     model.layers[1].resid_post[:] = 0   # write: zero the layer's output
        >>> model.layers[1]
        <LayerPoints 1 (moe) of qwen3_moe>
    """

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer
        self._info = model._layer_info[layer]

    def __repr__(self) -> str:
        kind = "moe" if self.is_moe else "dense"
        return f"<LayerPoints {self.layer} ({kind}) of {self._model.family}>"

    @property
    def is_moe(self) -> bool:
        return self.layer in self._model.moe_layers

    @property
    def envoy(self):
        """The raw nnsight Envoy of the decoder layer."""
        return _envoy(self._model, self._info["path"])

    @property
    def resid_pre(self) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream entering the layer."""
        return self.envoy.input

    @resid_pre.setter
    def resid_pre(self, value: Tensor) -> None:
        self.envoy.input = value

    @property
    def resid_mid(self) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream after attention (``resid_pre + attn.output`` for pre-norm families).

        Assigning writes *in place*: the layer keeps this tensor as its residual, so an in-place
        write is what reaches both the feed-forward input and the residual add.
        """
        return _envoy(self._model, self._mid_path()).input

    def _mid_path(self) -> str:
        if self._info["mid"] is None:
            raise PointError(
                f"layer {self.layer} ({self._info['layer_type']}) of this {self._model.family} model has no "
                f"resid_mid: its residual wiring is {self._model.spec.residual!r} (no stream between attention "
                "and the feed-forward sublayer); use resid_pre / resid_post"
            )
        return self._info["mid"]

    @resid_mid.setter
    def resid_mid(self, value: Tensor) -> None:
        current = _envoy(self._model, self._mid_path()).input
        current[...] = value.to(current.dtype)

    @property
    def resid_post(self) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream leaving the layer."""
        out = self.envoy.output
        return out[0] if isinstance(out, tuple) else out

    @resid_post.setter
    def resid_post(self, value: Tensor) -> None:
        self.envoy.output = value

    @cached_property
    def attn(self) -> AttentionPoints:
        return AttentionPoints(self._model, self.layer)

    @cached_property
    def mlp(self) -> MLPPoints:
        return MLPPoints(self._model, self.layer)

    @property
    def moe(self) -> MoEPoints:
        if not self.is_moe:
            spec = self._model.spec
            why = "a dense family" if not spec.is_moe else "a dense layer"
            raise PointError(
                f"layer {self.layer} of this {self._model.family} model is {why}: it has no MoE points. "
                f"MoE layers are {self._model.moe_layers}"
            )
        return self._model._moe_points(self.layer)

    # The writes into the residual stream (what directional ablation edits).
    @property
    def attn_write(self) -> Float[Tensor, "batch pos d_model"]:
        path = self._info.get("attn_write")
        if path is None:
            return self.attn.output
        return _envoy(self._model, path).output

    @attn_write.setter
    def attn_write(self, value: Tensor) -> None:
        path = self._info.get("attn_write")
        if path is None:
            self.attn.output = value
        else:
            _envoy(self._model, path).output = value

    @property
    def mlp_write(self) -> Float[Tensor, "batch pos d_model"]:
        path = self._info.get("ffn_write")
        if path is None:
            return self.mlp.output
        return _envoy(self._model, path).output

    @mlp_write.setter
    def mlp_write(self, value: Tensor) -> None:
        path = self._info.get("ffn_write")
        if path is None:
            self.mlp.output = value
        else:
            _envoy(self._model, path).output = value


class _LayerList:
    def __init__(self, model: ExpertModel):
        self._model = model

    def __len__(self) -> int:
        return self._model.n_layers

    def __iter__(self) -> Iterator[LayerPoints]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, layer: int) -> LayerPoints:
        n = self._model.n_layers
        if not isinstance(layer, int) or isinstance(layer, bool) or not -n <= layer < n:
            raise PointError(f"layer {layer!r} out of range: the model has {n} layers (0..{n - 1})")
        return self._model._layer_points(layer % n)


# --------------------------------------------------------------------------------------------
# Edits: functions applied at a point on every forward (the mechanism interventions use)
# --------------------------------------------------------------------------------------------

#: Points that ``ExpertModel.add_edit`` accepts. ``moe.router_probs`` is a read-out, not editable.
EDITABLE_POINTS = (
    "embed", "logits", "resid_pre", "resid_mid", "resid_post", "attn.output", "attn.z", "attn.head_out",
    "attn_write", "mlp.output", "mlp_write", "moe.router_logits", "moe.topk_indices", "moe.topk_weights",
    "moe.expert_out", "moe.shared_out", "moe.output",
)
_MODEL_POINTS = ("embed", "logits")


@dataclass
class EditContext:
    """Where a forward pass is, for edits that depend on position or generation step.

    Attributes:
        step: 0 for a forward over the whole prompt (a trace, or generation's prefill); n for the
            n-th decode step of a generation.
        prompt_len: Padded prompt length: positions ``< prompt_len`` are prompt tokens (prompts are
            left-padded, so the last prompt token of every row sits at ``prompt_len - 1``).
        positions: ``[p]`` absolute (padded) positions of the tokens in this forward.
        attention_mask: ``[b, total_len]`` mask so far (``None`` if the call passed none).
    """

    step: int = 0
    forward_id: int = 0
    prompt_len: int = 0
    positions: Tensor | None = None
    attention_mask: Tensor | None = None

    @property
    def is_prefill(self) -> bool:
        return self.step == 0

    def token_mask(self) -> Bool[Tensor, "batch pos"] | None:
        """``[b, p]`` True at real (non-pad) tokens of this forward; ``None`` without a mask."""
        if self.attention_mask is None or self.positions is None:
            return None
        return self.attention_mask[:, self.positions].bool()


class _StepTracker:
    """Keeps an :class:`EditContext` up to date on every forward of the HF model.

    Prefill vs decode is decided by the KV cache *object*: a forward that receives the cache the
    previous forward returned continues that sequence (a decode step), whatever length the
    cache reports (MiniMax's linear-attention cache reports 0). A fresh cache falls back on its
    reported length, then on the attention mask. The hooks hold the context, never the
    ``ExpertModel``, so the HF model does not keep its wrapper alive.
    """

    def __init__(self, ctx: EditContext, module: nn.Module):
        self.ctx = ctx
        self._last_cache: Any = None
        self._last_total = 0
        self._handles = [
            module.register_forward_pre_hook(self.pre, with_kwargs=True),
            module.register_forward_hook(self.post),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._last_cache = None


    def pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return None
        p = ids.shape[1]
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = 0
        if cache is not None and self._last_cache is not None and cache is self._last_cache():
            past = self._last_total
        elif cache is not None and hasattr(cache, "get_seq_length"):
            try:
                past = int(cache.get_seq_length())
            except Exception:  # noqa: BLE001 - caches that cannot say: fall back on the mask
                past = 0
        if past == 0 and mask is not None and mask.shape[-1] > p:
            past = mask.shape[-1] - p
        total = past + p
        ctx = self.ctx
        ctx.forward_id += 1
        if past == 0:  # a fresh sequence: trace, or generation's prefill
            ctx.step, ctx.prompt_len = 0, p
        else:
            ctx.step += 1
        ctx.positions = torch.arange(total - p, total, device=ids.device)
        ctx.attention_mask = mask if mask is not None and mask.shape[-1] == total else None
        self._pending_total = total
        return None

    def post(self, module, args, output):
        cache = getattr(output, "past_key_values", None)
        self._last_cache = None
        if cache is not None:
            try:
                self._last_cache = weakref.ref(cache)
            except TypeError:
                self._last_cache = (lambda c: lambda: c)(cache)
            self._last_total = getattr(self, "_pending_total", 0)
        return None


class _HookHandle:
    """An :class:`EditHandle` for an edit implemented as a torch forward pre-hook."""

    def __init__(self, torch_handle, fn: Any):
        self._handle, self._fn, self._live = torch_handle, fn, True

    def remove(self) -> None:
        self._handle.remove()
        self._live = False

    @property
    def active(self) -> bool:
        return self._live


class EditHandle:
    """Returned by :meth:`ExpertModel.add_edit`; ``remove()`` takes the edit out (idempotent)."""

    def __init__(self, lst: list, fn: Any):
        self._list, self._fn = lst, fn

    def remove(self) -> None:
        if self._fn in self._list:
            self._list.remove(self._fn)

    @property
    def active(self) -> bool:
        return self._fn in self._list


# --------------------------------------------------------------------------------------------
# ExpertModel
# --------------------------------------------------------------------------------------------

_NNSIGHT_KWARGS = ("dispatch", "rename", "envoys", "revision")


class ExpertModel(TransformersModel):
    """An nnsight ``TransformersModel`` with MoE internals as named points.

    Args:
        model: A hub name or local folder (loaded with ``AutoModelForCausalLM.from_pretrained``;
            ``dtype``, ``device_map``, ``attn_implementation``, ... are passed through), or an
            already-built ``PreTrainedModel``.
        tokenizer: Tokenizer to use. It is copied, never mutated (nnsight sets left padding on the
            copy). Loaded from ``model`` when omitted.
        family: Force an address table (a registered name, or a :class:`FamilySpec`) instead of
            resolving it from ``config.model_type``.
        validate: Run the checks on a short dummy input when wrapping: the truth test
            (:func:`expertlens.checks.check_truth`: logits and every MoE block's output equal the
            uninstrumented model's) and the reconstruction/routing checks (:func:`~expertlens.checks.check_model`).
            Default (``None``): on at every size, skipped only for a model whose weights sit on the meta device
            with nothing to load them; ``False`` opts out.
        trust_remote_code: Off unless asked.
        **kwargs: ``from_pretrained`` keyword arguments, and nnsight's (``dispatch``, ``rename``).

    Attributes:
        family: The family name (e.g. ``"qwen3_moe"``); ``spec`` is its :class:`FamilySpec`.
        n_layers, moe_layers, n_experts, top_k, d_model, n_heads, d_head, vocab_size.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())
        >>> with model.trace("hello"):
        ...     logits = model.layers[1].moe.router_logits.save()
        >>> logits.shape[-1] == model.n_experts
        True
    """

    def __init__(
        self,
        model: str | Path | nn.Module,
        tokenizer: Any = None,
        *,
        family: str | None = None,
        validate: bool | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:
        nnsight_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _NNSIGHT_KWARGS}
        if isinstance(model, (str, Path)):
            hf_model, tokenizer = _load_pretrained(str(model), tokenizer, trust_remote_code, kwargs)
        elif isinstance(model, nn.Module):
            if kwargs:
                raise TypeError(
                    f"loading keyword arguments {sorted(kwargs)} only apply when `model` is a name or path"
                )
            hf_model = model
            if tokenizer is None:
                tokenizer = _load_tokenizer(getattr(model.config, "_name_or_path", ""), trust_remote_code)
            else:
                tokenizer = copy.deepcopy(tokenizer)
        else:
            raise TypeError(f"`model` must be a hub name, a local folder or a torch module, got {type(model)}")

        if _instrument.is_installed(hf_model) or "_el_step_tracker" in hf_model.__dict__:
            raise ValueError(
                f"this {type(hf_model).__name__} is already wrapped by an ExpertModel (two wrappers would share one "
                "instrumentation and one edit state); use the existing wrapper, or call its .restore() first"
            )
        if isinstance(family, FamilySpec):
            spec = family
        else:
            try:
                spec = resolve_family(family if family is not None else hf_model)
            except UnsupportedModelError as err:
                if family is not None or "no address table" not in str(err):
                    raise
                from .infer import infer_family

                spec = infer_family(hf_model, str(err))
        reference = None
        if spec.inference is not None:
            from .infer import reference_logits

            reference = reference_logits(hf_model)
        info = _layer_table(hf_model, spec)
        hf_model.eval()
        editable = _editable_modules(hf_model, spec, info)
        head = _head_transform(hf_model)
        if head != (1.0, None):
            editable.append(hf_model)  # the `logits` point is then the model's returned logits
        _own_config(hf_model)
        if hasattr(hf_model.config, "output_router_logits"):
            # HF's auxiliary-loss path breaks generate() with a KV cache; analysis never needs it.
            hf_model.config.output_router_logits = False
        try:
            _instrument.install(hf_model, spec, editable)
            super().__init__(hf_model, tokenizer=tokenizer, **nnsight_kwargs)
        except Exception:
            _release(hf_model)
            raise
        weakref.finalize(self, _release_ref, weakref.ref(hf_model))
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "_head", head)
        object.__setattr__(self, "_layer_info", info)
        object.__setattr__(self, "_point_cache", {})
        object.__setattr__(self, "edit_context", EditContext())
        # Kept on the HF module (never serialised with the wrapper, e.g. for nnsight remote runs).
        hf_model.__dict__["_el_step_tracker"] = _StepTracker(self.edit_context, hf_model)
        if reference is not None:
            # a table inferred from structure is accepted only if the truth test passes
            from .infer import verify_inferred

            try:
                verify_inferred(self, reference)
            except Exception:
                self.restore()
                raise
        elif validate is None or validate:
            from .checks import check_model, check_truth

            runnable = _can_run(hf_model)
            if not runnable and validate:
                self.restore()
                raise ValueError(
                    "validate=True, but some weights are on the meta device with no offload hooks to load them, "
                    "so the model cannot run; pass validate=False to wrap it for inspection only"
                )
            if runnable:
                try:
                    check_model(self)
                    check_truth(self)
                except Exception:
                    self.restore()
                    raise

    # ---- identity ---------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.spec.name

    @property
    def hf_model(self) -> nn.Module:
        """The underlying transformers model."""
        return self._module

    @property
    def config(self):
        return self._module.config

    @property
    def n_layers(self) -> int:
        return len(self._layer_info)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, row in enumerate(self._layer_info) if row["block"] is not None]

    @property
    def n_experts(self) -> int:
        """Routed experts per MoE layer (0 for dense models)."""
        rows = [r for r in self._layer_info if r["block"] is not None]
        return rows[0]["n_experts"] if rows else 0

    @property
    def top_k(self) -> int:
        rows = [r for r in self._layer_info if r["block"] is not None]
        return rows[0]["top_k"] if rows else 0

    @property
    def d_model(self) -> int:
        return int(self._module.config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self._layer_info[-1]["n_heads"])

    @property
    def d_head(self) -> int:
        return int(self._layer_info[-1]["d_head"])

    @property
    def vocab_size(self) -> int:
        return int(self._module.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the token embedding computes on (its offload hook's execution
        device when its weights are offloaded to ``meta``), else the first non-meta weight's."""
        return _execution_device(self._module, self.spec.embed)

    @property
    def dtype(self) -> torch.dtype:
        return next(self._module.parameters()).dtype

    def __repr__(self) -> str:
        return (
            f"ExpertModel(family={self.family!r}, n_layers={self.n_layers}, moe_layers={self.moe_layers}, "
            f"n_experts={self.n_experts}, top_k={self.top_k}, d_model={self.d_model})"
        )

    # ---- points -------------------------------------------------------------------------------
    @property
    def layers(self) -> _LayerList:
        """``layers[i]`` gives layer ``i``'s points (:class:`LayerPoints`)."""
        return _LayerList(self)

    def _layer_points(self, layer: int) -> LayerPoints:
        key = ("layer", layer)
        if key not in self._point_cache:
            self._point_cache[key] = LayerPoints(self, layer)
        return self._point_cache[key]

    def _moe_points(self, layer: int) -> MoEPoints:
        key = ("moe", layer)
        if key not in self._point_cache:
            self._point_cache[key] = MoEPoints(self, layer)
        return self._point_cache[key]

    @property
    def embed(self) -> Float[Tensor, "batch pos d_model"]:
        """The token embeddings (the residual stream before layer 0)."""
        return _envoy(self, self.spec.embed).output

    @embed.setter
    def embed(self, value: Tensor) -> None:
        _envoy(self, self.spec.embed).output = value

    @property
    def logits_scale(self) -> float:
        """The factor the model multiplies the unembedding's output by (``1 / logits_scaling`` for
        Granite-MoE, ``logit_scale`` for Cohere; 1.0 for most families). ``logits`` includes it."""
        return self._head[0]

    @property
    def logits_softcap(self) -> float | None:
        """``c`` when the model soft-caps its logits (``c·tanh(x/c)``, Gemma-style), else ``None``."""
        return self._head[1]

    @property
    def logits(self) -> Float[Tensor, "batch pos vocab"]:
        """The logits the model returns: the unembedding's output, after any scaling or soft-capping
        the family applies to it (see :attr:`logits_scale`, :attr:`logits_softcap`)."""
        if self._head != (1.0, None):
            return self.output.logits
        return _envoy(self, self.spec.lm_head).output

    @logits.setter
    def logits(self, value: Tensor) -> None:
        if self._head != (1.0, None):
            current = self.output.logits
            current[...] = value.to(current.dtype)
            return
        _envoy(self, self.spec.lm_head).output = value

    @property
    def final_norm(self):
        """The Envoy of the final norm (its ``.input`` is the last residual stream)."""
        return _envoy(self, self.spec.final_norm)

    # ---- edits --------------------------------------------------------------------------------
    def add_edit(self, point: str, fn, layer: int | None = None) -> EditHandle:
        """Apply ``fn(value, ctx) -> value`` at a point on every forward until removed.

        ``value`` has the point's ``[b, p, ...]`` shape; ``ctx`` is the :class:`EditContext`.
        Edits run inside the modules nnsight wraps, so reads of the point in a trace see the edited
        value; they apply in traces, generation (every step, KV cache on) and plain calls.

        Example:
            >>> from expertlens.testing import tiny_model, tiny_tokenizer
            >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
            >>> h = model.add_edit("resid_pre", lambda x, ctx: x * 0, layer=1)
            >>> h.remove()
        """
        if point not in EDITABLE_POINTS:
            raise PointError(f"unknown or read-only point {point!r}; editable points are {EDITABLE_POINTS}")
        if point in _MODEL_POINTS:
            if layer is not None:
                raise PointError(f"point {point!r} is model-level; do not pass a layer")
        else:
            if layer is None:
                raise PointError(f"point {point!r} needs a layer (0..{self.n_layers - 1})")
            _ = self.layers[layer]  # range check with a clear error
            layer = layer % self.n_layers
        ctx = self.edit_context
        info = self._layer_info[layer] if layer is not None else None
        mod = lambda path: self._module.get_submodule(path)  # noqa: E731

        def out_edit(path: str, pick=None):
            """Register an output edit on a module made editable at wrap time."""
            st = mod(path).__dict__.get("_el_edit_state")
            if st is None:
                raise PointError(f"{path} is not editable on this model (was it restored?)")

            def edit(out, args, kwargs):
                if isinstance(out, tuple):
                    return (fn(out[0], ctx), *out[1:])
                return fn(out, ctx)

            st.edits.append(edit)
            return EditHandle(st.edits, edit)

        def hook_point_edit(path: str):
            hp = mod(path)
            edit = lambda x: fn(x, ctx)  # noqa: E731
            hp.edits.append(edit)
            return EditHandle(hp.edits, edit)

        def pre_edit(path: str, in_place: bool = False, view=None):
            module = mod(path)

            def hook(m, args, kwargs):
                if args:
                    x, rest = args[0], args[1:]
                else:
                    key = next(iter(kwargs))
                    x = kwargs[key]
                shaped = view(x) if view else x
                new = fn(shaped, ctx).reshape(x.shape).to(x.dtype)
                if in_place:
                    with torch.no_grad() if not x.requires_grad else _nullcontext():
                        x.copy_(new)
                    return None
                if args:
                    return (new, *rest), kwargs
                kwargs = dict(kwargs)
                kwargs[key] = new
                return args, kwargs

            return _HookHandle(module.register_forward_pre_hook(hook, with_kwargs=True), hook)

        if point == "embed":
            return out_edit(self.spec.embed)
        if point == "logits":
            if self._head != (1.0, None):  # edit the returned logits, after the family's head transform
                st = self._module.__dict__["_el_edit_state"]

                def logits_edit(out, args, kwargs):
                    out.logits = fn(out.logits, ctx)
                    return out

                st.edits.append(logits_edit)
                return EditHandle(st.edits, logits_edit)
            return out_edit(self.spec.lm_head)
        if point == "resid_pre":
            return pre_edit(info["path"])
        if point == "resid_mid":
            return pre_edit(info["mid"], in_place=True)
        if point == "resid_post":
            return out_edit(info["path"])
        if point in ("attn.output",) or (point == "attn_write" and info["attn_write"] is None):
            return out_edit(info["attn"])
        if point == "attn_write":
            return out_edit(info["attn_write"])
        if point in ("attn.z", "attn.head_out"):
            if info["o_proj"] is None:
                raise PointError(f"layer {layer}: attention has no linear output projection to split by head")
            h, dh = info["n_heads"], info["d_head"]
            if point == "attn.z":
                return pre_edit(info["o_proj"], view=lambda x: x.view(*x.shape[:-1], h, dh))
            o_proj = mod(info["o_proj"])
            _dense_o_weight(o_proj, layer)
            st = o_proj.__dict__["_el_edit_state"]

            def head_edit(out, args, kwargs):
                z = args[0] if args else next(iter(kwargs.values()))
                z = z.view(*z.shape[:-1], h, dh)
                w = _dense_o_weight(o_proj, layer).view(o_proj.weight.shape[0], h, dh).to(z.dtype)
                heads = fn(torch.einsum("bphk,dhk->bphd", z, w), ctx)
                total = heads.sum(dim=-2)
                return total + o_proj.bias if o_proj.bias is not None else total

            st.edits.append(head_edit)
            return EditHandle(st.edits, head_edit)
        is_moe_layer = info["block"] is not None
        if point == "mlp_write" and info["ffn_write"] is not None:
            return out_edit(info["ffn_write"])
        if point in ("mlp.output", "mlp_write"):
            if is_moe_layer:
                return hook_point_edit(f"{info['block']}.el_output")
            return out_edit(info["mlp"])
        # MoE points
        if not is_moe_layer:
            _ = self.layers[layer].moe  # raises the dense-layer PointError
        if point == "moe.router_logits":
            return hook_point_edit(f"{info['router']}.el_router_logits")
        if point == "moe.topk_indices":
            return hook_point_edit(f"{info['router']}.el_topk_indices")
        if point == "moe.topk_weights":
            return hook_point_edit(f"{info['router']}.el_topk_weights")
        if point == "moe.expert_out":
            return hook_point_edit(f"{info['experts']}.el_expert_out")
        if point == "moe.shared_out":
            if not info.get("has_shared"):
                raise PointError(f"family {self.family!r} has no shared expert")
            return hook_point_edit(info["shared_point"])
        return hook_point_edit(f"{info['block']}.el_output")

    def intervene(self, *interventions):
        """Attach interventions for a ``with`` block, around traces, generation or plain calls.

        Every edit is removed on exit, also when the block raises.

        Example:
            >>> import torch
            >>> from expertlens.testing import tiny_model, tiny_tokenizer
            >>> from expertlens.interventions import Compose
            >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
            >>> with model.intervene(Compose()):
            ...     with model.trace("hi"):
            ...         out = model.logits.save()
        """
        from .interventions.base import intervene

        return intervene(self, *interventions)

    def clear_edits(self) -> None:
        """Remove every registered edit, weight edits (``OrthogonalizeWeights``) included."""
        for handle in reversed(list(self._module.__dict__.get("_el_weight_edits", ()))):
            handle.remove()  # latest first, so every weight gets its original back
        for module in self._module.modules():
            if isinstance(module, _instrument.HookPoint):
                module.edits.clear()
            st = module.__dict__.get("_el_edit_state")
            if st is not None:
                st.edits.clear()
            for key, hook in list(module._forward_pre_hooks.items()):
                if getattr(hook, "__qualname__", "").startswith("ExpertModel.add_edit"):
                    del module._forward_pre_hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)

    def n_edits(self) -> int:
        """How many edits are registered (0 when the model is clean), weight edits included."""
        n = len(self._module.__dict__.get("_el_weight_edits", ()))
        for module in self._module.modules():
            if isinstance(module, _instrument.HookPoint):
                n += len(module.edits)
            st = module.__dict__.get("_el_edit_state")
            if st is not None:
                n += len(st.edits)
            n += sum(
                1 for hook in module._forward_pre_hooks.values()
                if getattr(hook, "__qualname__", "").startswith("ExpertModel.add_edit")
            )
        return n

    # ---- lifecycle ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Undo everything wrapping did: remove every edit (weight edits restore their weights),
        original router/block classes, no hook points, the original experts implementation and
        config object, no step tracker and no nnsight controllers. MoE points are unavailable
        afterwards. Idempotent; also run when the wrapper is garbage-collected."""
        _release(self._module)

    def __enter__(self) -> ExpertModel:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def tokenize(self, prompts: str | list[str], **kwargs) -> dict[str, Tensor]:
        """Tokenize with the model's (left-padding) tokenizer, on the model's device."""
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, **kwargs)
        return {k: v.to(self.device) for k, v in enc.items()}


# --------------------------------------------------------------------------------------------
# loading and the layer table
# --------------------------------------------------------------------------------------------


def _load_tokenizer(name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not name:
        raise ValueError("no tokenizer given and the model has no name_or_path to load one from; pass tokenizer=")
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"could not load a tokenizer for {name!r} ({exc}); pass tokenizer=") from exc


def _load_pretrained(name: str, tokenizer: Any, trust_remote_code: bool, kwargs: dict):
    from transformers import AutoModelForCausalLM

    local = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
    if looks_local and not local.exists():
        raise FileNotFoundError(
            f"ExpertModel({name!r}): no such folder. Pass a local folder holding config.json and weights, a hub id "
            "such as 'allenai/OLMoE-1B-7B-0924', or an already-built transformers model"
        )
    if local.is_file():
        raise ValueError(
            f"ExpertModel({name!r}): is a file; pass the folder holding config.json and weights (from save_pretrained)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:
        if "custom code" in str(exc) and not trust_remote_code:
            raise ValueError(
                f"ExpertModel({name!r}): the checkpoint needs its own Python code (config.json 'auto_map'); "
                "expertlens never runs remote code unless asked, and its address tables cover transformers' "
                "built-in families only. Use a checkpoint of a built-in family, or pass trust_remote_code=True "
                "after reading that code"
            ) from exc
        raise
    if tokenizer is None:
        tokenizer = _load_tokenizer(name, trust_remote_code)
    else:
        tokenizer = copy.deepcopy(tokenizer)
    return model, tokenizer


def _head_transform(model: nn.Module) -> tuple[float, float | None]:
    """``(scale, softcap)`` the model applies after its unembedding (``(1.0, None)``: none).

    Read from the config: ``logits_scaling`` (Granite-MoE divides by it), ``logit_scale`` (Cohere
    multiplies) and ``final_logit_softcapping`` (Gemma). The truth test catches any other transform.
    """
    cfg = model.config
    configs = [cfg]
    text = getattr(cfg, "get_text_config", None)
    if callable(text):
        sub = text()
        if sub is not cfg:
            configs.append(sub)
    scale, cap = 1.0, None
    for c in configs:
        ls = getattr(c, "logits_scaling", None)
        if isinstance(ls, (int, float)) and ls != 1:
            scale /= float(ls)
        mult = getattr(c, "logit_scale", None)
        if isinstance(mult, (int, float)) and mult != 1:
            scale *= float(mult)
        sc = getattr(c, "final_logit_softcapping", None)
        if isinstance(sc, (int, float)) and sc:
            cap = float(sc)
        if scale != 1.0 or cap is not None:
            break
    return scale, cap


def _own_config(model: nn.Module) -> None:
    """Give ``model`` a private shallow copy of its config (every module that holds it), so that
    switching its experts implementation never changes another model sharing the config object.
    :func:`_release` puts the original object back."""
    cfg = model.config
    own = copy.copy(cfg)
    for module in model.modules():
        if module.__dict__.get("config") is cfg:
            module.__dict__["config"] = own
    model.__dict__["_el_shared_config"] = cfg


def _release(hf: nn.Module) -> None:
    """Undo wrapping on the HF model (see ``ExpertModel.restore``); safe to call repeatedly."""
    from nnsight.intervention.source import STATE, Controller

    for handle in reversed(list(hf.__dict__.get("_el_weight_edits", ()))):
        handle.remove()  # latest first, so every weight gets its original back
    for module in hf.modules():  # edits registered as forward pre-hooks (resid_pre, resid_mid, attn.z)
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "__qualname__", "").startswith("ExpertModel.add_edit"):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    _instrument.restore(hf)
    tracker = hf.__dict__.pop("_el_step_tracker", None)
    if tracker is not None:
        tracker.remove()
    if not hf.__dict__.get("_el_weight_edits", True):
        del hf.__dict__["_el_weight_edits"]
    original = hf.__dict__.pop("_el_shared_config", None)
    if original is not None:
        own = hf.config
        for module in hf.modules():
            if module.__dict__.get("config") is own:
                module.__dict__["config"] = original
    for module in hf.modules():
        if isinstance(module.__dict__.get("forward"), Controller):
            del module.__dict__["forward"]
            module.__dict__.pop(STATE, None)
        # With no controller left to hold the wrapped forwards, the per-module records can go too.
        if not _instrument.is_installed(hf):
            module.__dict__.pop("_el_edit_state", None)
            module.__dict__.pop("_el_state", None)


def _release_ref(ref: weakref.ref) -> None:
    hf = ref()
    if hf is not None:
        try:
            _release(hf)
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


def _execution_device(model: nn.Module, embed_path: str) -> torch.device:
    embed = get_module(model, embed_path)
    for mod in (embed, model):
        dev = getattr(getattr(mod, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    weight = getattr(embed, "weight", None)
    if isinstance(weight, Tensor) and not weight.is_meta:
        return weight.device
    for param in model.parameters():
        if not param.is_meta:
            return param.device
    return next(model.parameters()).device


def _can_run(model: nn.Module) -> bool:
    """False when some weight is on the meta device and no accelerate offload hook can load it."""
    if not any(p.is_meta for p in model.parameters()):
        return True
    return any(hasattr(m, "_hf_hook") for m in model.modules())


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _editable_modules(model: nn.Module, spec: FamilySpec, info: list[dict[str, Any]]) -> list[nn.Module]:
    """Modules whose outputs edits may change: layers, attention, o_proj, dense MLPs, writes, ends."""
    paths = [spec.embed, spec.lm_head]
    for row in info:
        paths += [row["path"], row["attn"], row["o_proj"], row["attn_write"], row["ffn_write"]]
        if row["block"] is None:
            paths.append(row["mlp"])
    mods = []
    for path in paths:
        if path is None:
            continue
        module = get_module(model, path)
        if module is not None and module not in mods:
            mods.append(module)
    return mods


def _dense_o_weight(o_proj: nn.Module, layer: int) -> Tensor:
    """``o_proj.weight`` as a dense ``[out, in]`` float matrix, or a PointError for a quantised one (bnb 4/8-bit)."""
    w = o_proj.weight
    shape_ok = tuple(w.shape) == (o_proj.out_features, o_proj.in_features)
    if not shape_ok or not w.is_floating_point() or w.element_size() < 2:
        cls = type(o_proj).__name__.removeprefix("ExpertLens")
        raise PointError(
            f"layer {layer}: the attention output projection is quantised ({cls}, weight "
            f"{type(w).__name__} {tuple(w.shape)} {w.dtype}), so attn.o_weight and attn.head_out (which need W_O) are "
            "unavailable; attn.z and attn.output still work. Keep o_proj unquantised to use them, e.g. "
            "BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=['o_proj', 'lm_head'])"
        )
    return w


def _write_path(layer: nn.Module, path: str, rel: str | None) -> str | None:
    return f"{path}.{rel}" if rel is not None and get_module(layer, rel) is not None else None


def _heads(attn: nn.Module, in_features: int, config) -> tuple[int, int]:
    try:
        config_heads = getattr(config, "num_attention_heads", None)
    except Exception:  # per-layer configs (dots3_note_text) refuse global reads; the module knows its own
        config_heads = None
    candidates = [
        getattr(attn, "num_heads", None),
        getattr(attn, "num_attention_heads", None),
        getattr(attn, "num_v_heads", None),
        config_heads,
    ]
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "v_head_dim", None)
    if head_dim and in_features % head_dim == 0:
        return in_features // head_dim, head_dim
    for n in candidates:
        if isinstance(n, int) and n > 0 and in_features % n == 0:
            return n, in_features // n
    return 1, in_features


def _layer_table(model: nn.Module, spec: FamilySpec) -> list[dict[str, Any]]:
    """Resolve every point's module path for every layer, failing loudly with the inventory."""
    layers = spec.layer_list(model)
    base = _module_path(model, layers)
    rows: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        path = f"{base}.{i}"
        found = spec.attn_module(layer)
        attn_name, attn = found if found is not None else (None, None)
        o = spec.o_proj_module(attn) if attn is not None else None
        n_heads, d_head = _heads(attn, o[1].in_features, model.config) if o else (0, 0)
        mid = get_module(layer, spec.mid) if spec.mid is not None else None
        if mid is None and spec.mid is not None:
            raise UnsupportedModelError(
                f"family {spec.name!r}: layer {i} has no {spec.mid!r} module (needed for resid_mid); "
                f"children are {[n for n, _ in layer.named_children()]}"
            )
        block = spec.moe_block(layer)
        row: dict[str, Any] = {
            "path": path,
            "attn": f"{path}.{attn_name}" if attn_name else None,
            "o_proj": f"{path}.{attn_name}.{o[0]}" if o else None,
            "n_heads": n_heads,
            "d_head": d_head,
            "layer_type": type(layer).__name__,
            "mid": f"{path}.{spec.mid}" if spec.mid is not None else None,
            "mlp": f"{path}.{spec.moe}",
            # a write module missing on this layer (a dense layer of a family whose MoE block owns it): none
            "attn_write": _write_path(layer, path, spec.attn_write),
            "ffn_write": _write_path(layer, path, spec.ffn_write),
            "block": None,
        }
        if block is not None:
            router = get_module(block, spec.router)
            experts = get_module(block, spec.experts)
            layer_shared = spec.shared is not None and spec.shared_level == "layer"
            shared_owner = f"{path}.{spec.shared}" if layer_shared else f"{path}.{spec.moe}"
            row.update(
                shared_point=f"{shared_owner}.el_shared_out",
                has_shared=spec.shared is not None
                and get_module(layer if layer_shared else block, spec.shared) is not None,
                block=f"{path}.{spec.moe}",
                router=f"{path}.{spec.moe}.{spec.router}",
                experts=f"{path}.{spec.moe}.{spec.experts}",
                n_experts=_instrument.global_num_experts(experts),
                top_k=int(router.top_k),
            )
        rows.append(row)
    if spec.is_moe and not any(r["block"] for r in rows):
        raise UnsupportedModelError(
            f"family {spec.name!r}: no layer has an MoE block at {spec.moe!r} with {spec.router!r} and "
            f"{spec.experts!r}; layer 0 children are {[n for n, _ in layers[0].named_children()]}"
        )
    return rows
