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

This module holds loading and wrapping only: the points are declared once in
:mod:`expertlens.points` (``POINTS``), edits live in :mod:`expertlens.edits`, the per-layer module
paths in :mod:`expertlens.layout`, the instrumentation in :mod:`expertlens.instrument`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from nnsight import TransformersModel
from torch import Tensor, nn

from . import edits as _edits
from . import instrument as _instrument
from .edits import EditContext, EditHandle, EditRegistry
from .families import resolve_family
from .layout import editable_paths, resolve_layout
from .points import (
    EDITABLE_POINTS,
    AttentionPoints,
    ExpertPoint,
    LayerPoints,
    MLPPoints,
    MoEPoints,
    PointAttr,
    PointError,
    _envoy,
)

__all__ = [
    "ExpertModel",
    "LayerPoints",
    "AttentionPoints",
    "MLPPoints",
    "MoEPoints",
    "ExpertPoint",
    "PointError",
    "EditContext",
    "EditHandle",
    "EDITABLE_POINTS",
]


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
        family: Force an address table by name instead of resolving it from ``config.model_type``.
        validate: Run the reconstruction and routing checks on a short dummy input when wrapping.
            Default: on for models under 1B parameters.
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

        spec = resolve_family(family if family is not None else hf_model)
        layout = resolve_layout(hf_model, spec)
        hf_model.eval()
        if hasattr(hf_model.config, "output_router_logits"):
            # HF's auxiliary-loss path breaks generate() with a KV cache; analysis never needs it.
            hf_model.config.output_router_logits = False
        editable = _editable_modules(hf_model, editable_paths(spec, layout))
        _instrument.install(hf_model, spec, editable)
        try:
            super().__init__(hf_model, tokenizer=tokenizer, **nnsight_kwargs)
        except Exception:
            _instrument.restore(hf_model)
            raise
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "_point_cache", {})
        object.__setattr__(self, "edit_context", EditContext())
        object.__setattr__(self, "edit_registry", EditRegistry())
        object.__setattr__(self, "_tracker", _edits.track_context(self))
        if validate is None:
            validate = sum(p.numel() for p in hf_model.parameters()) < 1_000_000_000
        if validate:
            from .checks import check_model

            try:
                check_model(self)
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
        return len(self.layout)

    @property
    def moe_layers(self) -> list[int]:
        return [lay.index for lay in self.layout if lay.is_moe]

    @property
    def n_experts(self) -> int:
        """Routed experts per MoE layer (0 for dense models)."""
        return next((lay.n_experts for lay in self.layout if lay.is_moe), 0)

    @property
    def top_k(self) -> int:
        return next((lay.top_k for lay in self.layout if lay.is_moe), 0)

    @property
    def _layer_info(self) -> list[dict[str, Any]]:
        """Deprecated: the per-layer dicts; use ``model.layout[i]`` (a :class:`LayerLayout`)."""
        warnings.warn("ExpertModel._layer_info is deprecated; use model.layout[i]", DeprecationWarning, stacklevel=2)
        return [lay.as_dict() for lay in self.layout]

    @property
    def d_model(self) -> int:
        return int(self._module.config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.layout[-1].n_heads)

    @property
    def d_head(self) -> int:
        return int(self.layout[-1].d_head)

    @property
    def vocab_size(self) -> int:
        return int(self._module.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self._module.parameters()).device

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

    embed = PointAttr("embed")
    logits = PointAttr("logits")

    @property
    def final_norm(self):
        """The Envoy of the final norm (its ``.input`` is the last residual stream)."""
        return _envoy(self, self.spec.final_norm)

    # ---- edits (the registry lives in expertlens.edits) ----------------------------------------
    def add_edit(self, point: str, fn, layer: int | None = None, *, expert: int | None = None) -> EditHandle:
        """Apply ``fn(value, ctx) -> value`` at a point on every forward until removed.

        ``value`` has the point's ``[b, p, ...]`` shape (``[n, d]`` for the per-expert point
        ``moe.experts.output``, with ``expert=``); ``ctx`` is the :class:`EditContext`.
        Edits run inside the modules nnsight wraps, so reads of the point in a trace see the edited
        value; they apply in traces, generation (every step, KV cache on) and plain calls.

        Example:
            >>> from expertlens.testing import tiny_model, tiny_tokenizer
            >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
            >>> h = model.add_edit("resid_pre", lambda x, ctx: x * 0, layer=1)
            >>> h.remove()
        """
        return _edits.add_edit(self, point, fn, layer, expert=expert)

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
        return _edits.intervene(self, *interventions)

    def clear_edits(self) -> None:
        """Remove every registered edit (weight edits restored), nnsight's stored edits included."""
        super().clear_edits()
        _edits.clear_edits(self)

    def n_edits(self) -> int:
        """How many edits are registered (0 when the model is clean), nnsight's stored edits included."""
        return _edits.n_edits(self)

    # ---- lifecycle ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Undo the instrumentation: original router/block classes, no hook points, and the
        original experts implementation. MoE points are unavailable afterwards."""
        _instrument.restore(self._module)
        self._tracker.remove()

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

    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    if tokenizer is None:
        tokenizer = _load_tokenizer(name, trust_remote_code)
    else:
        tokenizer = copy.deepcopy(tokenizer)
    return model, tokenizer


def _editable_modules(model: nn.Module, paths: list[str]) -> list[nn.Module]:
    """The modules at ``paths`` (each once), made editable at wrap time."""
    mods: list[nn.Module] = []
    for path in paths:
        module = model.get_submodule(path) if path else None
        if module is not None and not any(module is m for m in mods):
            mods.append(module)
    return mods
