"""``ExpertModel``: an nnsight model whose MoE internals are named, shaped, writable points.

The points, inside ``model.trace(...)`` or ``model.generate(...)`` (``b`` batch, ``p`` positions,
``d`` model width, ``h`` heads, ``E`` experts, ``k`` experts per token):

| point | shape |
|---|---|
| ``model.layers[i].resid_pre``, ``.resid_mid``, ``.resid_post`` | ``[b, p, d]`` |
| ``model.layers[i].attn.output`` | ``[b, p, d]`` |
| ``model.layers[i].attn.z`` | ``[b, p, h, d_head]`` |
| ``model.layers[i].attn.head_out`` | ``[b, p, h, d]`` |
| ``model.layers[i].moe.router_logits``, ``.router_probs`` | ``[b, p, E]`` |
| ``model.layers[i].moe.topk_indices``, ``.topk_weights`` | ``[b, p, k]`` |
| ``model.layers[i].moe.expert_out`` | ``[b, p, k, d]`` |
| ``model.layers[i].moe.experts[e].output`` | ``[n_routed, d]`` |
| ``model.layers[i].moe.shared_out``, ``.output`` | ``[b, p, d]`` |
| ``model.layers[i].mlp.output`` (dense or MoE) | ``[b, p, d]`` |
| ``model.embed`` | ``[b, p, d]`` |
| ``model.logits`` | ``[b, p, vocab]`` |

Each point reads like an nnsight value (``.save()`` it to keep it) and is assigned to write it.
Within one invoke, read points in the order the model computes them (nnsight's rule); within a
layer that order is the one listed above.

This module holds loading and wrapping only: the points are declared once in
:mod:`expertlens.points` (``POINTS``), edits live in :mod:`expertlens.edits`, the per-layer module
paths in :mod:`expertlens.layout`, the instrumentation in :mod:`expertlens.instrument`.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from nnsight import TransformersModel
from torch import Tensor, nn

from . import edits as _edits
from . import instrument as _instrument
from .compat import check_versions, quiet_loading
from .edits import EditContext, EditHandle, EditRegistry, StepTracker
from .families import FamilySpec, UnsupportedModelError, get_module, resolve_family
from .layout import editable_paths, resolve_layout
from .points import (
    EDITABLE_POINTS,
    MODEL_POINTS,
    AttentionPoints,
    ExpertPoint,
    LayerPoints,
    MLPPoints,
    MoEPoints,
    PointAttr,
    PointError,
    _envoy,
    as_index,
    finish_watches,
    indexed_write_error,
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
        layer = as_index(layer, "layer")
        if not -n <= layer < n:
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
        family (str): The family name (e.g. ``"qwen3_moe"``); ``spec`` is its :class:`FamilySpec`.
        layout (tuple[LayerLayout, ...]): One frozen :class:`~expertlens.layout.LayerLayout` per layer
            (module paths, heads, experts).
        edit_context (EditContext): The :class:`~expertlens.edits.EditContext` edits receive;
            ``edit_registry`` holds every attached edit's handle.

    The sizes are properties: ``n_layers``, ``moe_layers``, ``n_experts``, ``top_k``, ``d_model``,
    ``n_heads``, ``d_head``, ``vocab_size``.

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
        check_versions()
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
        try:
            layout = resolve_layout(hf_model, spec)
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"{err}{_forced_hint(hf_model, family, spec)}") from None
        if validate and not _can_run(hf_model):
            raise ValueError(
                "validate=True, but some weights are on the meta device with no offload hooks to load them, "
                "so the model cannot run; pass validate=False to wrap it for inspection only"
            )
        hf_model.eval()
        editable = _editable_modules(hf_model, editable_paths(spec, layout))
        head = _head_transform(hf_model)
        lm_head = get_module(hf_model, spec.lm_head) if spec.lm_head else None
        if lm_head is not None and _instrument.tp_sharded(lm_head) is not None:
            hf_model.__dict__["_el_tp_head"] = True  # tensor parallel: the `logits` point reads the returned logits
        if head != (1.0, None) or "_el_tp_head" in hf_model.__dict__:
            editable.append(hf_model)  # the `logits` point is then the model's returned logits
        _own_config(hf_model)
        if hasattr(hf_model.config, "output_router_logits"):
            # HF's auxiliary-loss path breaks generate() with a KV cache; analysis never needs it.
            hf_model.config.output_router_logits = False
        try:
            _instrument.install(hf_model, spec, editable)
            with _first_mapped_device_runs(hf_model, spec.embed):
                super().__init__(hf_model, tokenizer=tokenizer, **nnsight_kwargs)
        except Exception:
            _release(hf_model)
            raise
        weakref.finalize(self, _release_ref, weakref.ref(hf_model))
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "_head", head)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "_point_cache", {})
        object.__setattr__(self, "edit_context", EditContext())
        # Kept on the HF module (never serialised with the wrapper, e.g. for nnsight remote runs).
        hf_model.__dict__["_el_step_tracker"] = StepTracker(self.edit_context, hf_model)
        hf_model.__dict__["_el_edit_registry"] = EditRegistry()
        if reference is not None:
            # a table inferred from structure is accepted only if the truth test passes
            try:
                _accept_inferred(self, reference)
            except Exception:
                self.restore()
                raise
        elif validate is None or validate:
            from .checks import ValidationError, check_model, check_truth

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
                except ValidationError as err:
                    self.restore()
                    raise ValidationError(f"{err}{_forced_hint(hf_model, family, spec)}") from None
                except Exception:
                    self.restore()
                    raise

    # ---- tracing ----------------------------------------------------------------------------
    def trace(self, *inputs: Any, **kwargs: Any):
        """nnsight's ``trace``, plus: a trace refused while another thread traces this model, and
        out-of-order reads reported by point name (``layers[1].moe.router_logits``) with the order
        points must be read in.

        Example:
            >>> from expertlens.testing import tiny_model, tiny_tokenizer
            >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
            >>> with model.trace("hi"):
            ...     out = model.logits.save()
        """
        busy = self._module.__dict__.get("_el_trace_thread")
        me = threading.current_thread()
        if busy is not None and busy is not me and busy.is_alive():
            raise RuntimeError(
                f"this model is being traced by thread {busy.name!r}; nnsight runs one trace of a model at a time "
                "(a second thread's trace body would be skipped or fail). Trace from one thread, or wrap a separate "
                "copy of the model per thread"
            )
        _refuse_empty_inputs(self, inputs)
        tracer = super().trace(*inputs, **kwargs)
        if kwargs.get("remote"):  # serialised and run elsewhere: keep nnsight's own tracer
            return tracer
        self._module.__dict__["_el_trace_thread"] = me
        tracer.__class__ = _friendly_tracer(type(tracer))
        tracer.__dict__["_el_model"] = self
        return tracer

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
    def edit_registry(self) -> EditRegistry:
        """The handles of every edit attached to this model (kept on the HF model, see :mod:`expertlens.edits`)."""
        return self._module.__dict__.setdefault("_el_edit_registry", EditRegistry())

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

    def _repr_html_(self) -> str:
        """Jupyter's view: the sizes, the layers (MoE or dense) and the points this model has, with shapes."""
        import html

        from .points import POINTS

        lays = ", ".join(f"{lay.index}{'' if lay.is_moe else ' (dense)'}" for lay in self.layout)
        head = (
            f"<p><b>ExpertModel</b> family <code>{html.escape(self.family)}</code>: {self.n_layers} layers "
            f"({lays}); {self.n_experts} experts, top-{self.top_k}, d_model {self.d_model}, {self.n_heads} heads "
            f"of {self.d_head}, vocab {self.vocab_size}</p>"
        )
        rows = []
        for point in POINTS.values():
            if point.level == "model":
                if point.needs and point.needs(self, None):
                    continue
                at = "model"
            else:
                where = [lay for lay in self.layout if point.level == "layer" or lay.is_moe]
                ok = [lay.index for lay in where if not (point.needs and point.needs(self, lay))]
                if not ok:  # e.g. attn.z on a family without an o_proj
                    continue
                at = _layer_span(ok)
            write = "yes" if point.writable else "read-only"
            rows.append(
                f"<tr><td><code>{html.escape(point.attr)}</code></td><td><code>{html.escape(point.name)}</code></td>"
                f"<td>{html.escape(point.dims)}</td><td>{html.escape(at)}</td><td>{write}</td></tr>"
            )
        table = (
            "<table><thead><tr><th>point</th><th>string name</th><th>shape</th><th>layers</th><th>write</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>"
        )
        return f"<div>{head}{table}</div>"

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
    def logits_scale(self) -> float:
        """The factor the model multiplies the unembedding's output by (``1 / logits_scaling`` for
        Granite-MoE, ``logit_scale`` for Cohere; 1.0 for most families). ``logits`` includes it."""
        return self._head[0]

    @property
    def logits_softcap(self) -> float | None:
        """``c`` when the model soft-caps its logits (``c·tanh(x/c)``, Gemma-style), else ``None``."""
        return self._head[1]

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
        """Undo everything wrapping did: remove every edit (weight edits restore their weights),
        original router/block classes, no hook points, the original experts implementation and
        config object, no step tracker and no nnsight controllers. MoE points are unavailable
        afterwards. Idempotent; also run when the wrapper is garbage-collected."""
        _release(self._module)

    def __enter__(self) -> ExpertModel:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def tokenize(self, prompts: str | list[str], *, position_ids: bool = False, **kwargs) -> dict[str, Tensor]:
        """Tokenize with the model's (left-padding) tokenizer, on the model's device.

        ``position_ids=True`` adds each row's own positions (0 at its first real token, as ``generate`` and a
        trace count them), for a plain forward of a padded batch: without them a left-padded row's tokens sit
        at shifted positions, and its logits depend, by rounding, on the prompts it is batched with.

        Example:
            >>> from expertlens.testing import tiny_model, tiny_tokenizer
            >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
            >>> model.tokenize(["hello", "hi"], position_ids=True)["position_ids"].tolist()
            [[0, 1, 2, 3, 4], [1, 1, 1, 0, 1]]
        """
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, **kwargs)
        mask = enc.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.numel():
            _refuse_empty(prompts, mask.sum(-1).tolist())
            if position_ids:  # generate's rule: count real tokens; padding gets a harmless 1
                enc["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return {k: v.to(self.device) for k, v in enc.items()}

    def to_tokens(self, prompts: str | list[str], **kwargs: Any) -> Int[Tensor, "batch pos"]:
        """Token ids ``[b, p]`` of ``prompts``, left-padded, on the model's device (TransformerLens's name).

        Unlike TransformerLens no BOS is prepended: the tokenizer's own settings apply (as in a trace), so the
        ids are the ones ``model.trace(prompts)`` runs on. ``tokenize`` gives the attention mask as well.

        Example:
            >>> from expertlens.testing import tiny_model, tiny_tokenizer
            >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
            >>> model.to_tokens(["hello", "hi"]).shape
            torch.Size([2, 5])
        """
        return self.tokenize(prompts, **kwargs)["input_ids"]

    def run_with_cache(
        self,
        prompts: str | list[str],
        points: Sequence[str] | str = ("resid_pre", "attn.output", "mlp.output", "resid_post"),
        layers: Any = None,
        interventions: Sequence[Any] = (),
    ) -> tuple[Float[Tensor, "batch pos vocab"], Any]:
        """One forward of ``prompts``: ``(logits, cache)``, as TransformerLens spells it.

        ``cache`` is an :class:`~expertlens.edits.ActivationCache`: a dict keyed like
        :func:`~expertlens.interventions.cache_points`, ``cache["resid_pre", 3]`` ``[b, p, d]``, with
        ``cache.stack("resid_pre")`` ``[layers, b, p, d]`` and the run's ``attention_mask``. ``points`` are point
        names (``"moe.router_logits"``, ``"attn.z"``, ...), at every layer that has them or at ``layers`` (an int or a
        list; :func:`~expertlens.interventions.cache_points` takes every layer selector); ``interventions`` are
        attached for the run. Inside a trace, read points directly instead (``model.layers[3].resid_pre.save()``).

        Example:
            >>> from expertlens.testing import tiny_model, tiny_tokenizer
            >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
            >>> logits, cache = model.run_with_cache("hello", points=["resid_pre", "moe.topk_indices"])
            >>> cache.stack("resid_pre").shape, cache["moe.topk_indices", 1].shape
            (torch.Size([2, 1, 5, 64]), torch.Size([1, 5, 2]))
        """
        names = [points] if isinstance(points, str) else list(points)
        if layers is None:
            chosen = list(range(self.n_layers))
        else:
            chosen = [layers] if not isinstance(layers, (list, tuple, range)) else list(layers)
            chosen = sorted({self.layers[i].layer for i in chosen})  # each checked: an int in range
        wanted: list = []
        for name in names:
            if name not in EDITABLE_POINTS:
                raise PointError(f"run_with_cache: unknown point {name!r}; points are {sorted(EDITABLE_POINTS)}")
            if name in MODEL_POINTS:
                wanted.append((name, None))
                continue
            at = [i for i in chosen if i in self.moe_layers] if name.startswith("moe.") else chosen
            if layers is not None and len(at) < len(chosen):
                dense = [i for i in chosen if i not in at]
                raise PointError(f"run_with_cache: {name!r} is an MoE point and layers {dense} are dense; MoE "
                                 f"layers are {self.moe_layers}")  # fmt: skip
            wanted += [(name, i) for i in at]
        return _edits.record_run(self, prompts, wanted, interventions)


# --------------------------------------------------------------------------------------------
# loading and wrapping
# --------------------------------------------------------------------------------------------


def _layer_span(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"`` (short enough for a table cell)."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


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
        with quiet_loading(name):
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


def _forced_hint(model: nn.Module, family: Any, spec: FamilySpec) -> str:
    """For a table forced with ``family=``: which family the model itself resolves to."""
    if family is None:
        return ""
    model_type = getattr(model.config, "model_type", "?")
    try:
        own = resolve_family(model).name
    except UnsupportedModelError:
        own = None
    if own == spec.name:
        return ""
    tail = f"it resolves to family {own!r} (drop family= to use it)" if own else "no registered family matches it"
    return f" [family={spec.name!r} was forced, but this model's config.model_type is {model_type!r}: {tail}]"


_FRIENDLY_TRACERS: dict[type, type] = {}

#: The order points must be read in within one invoke (nnsight's rule), for error messages.
READ_ORDER = (
    "embed, then layer by layer: resid_pre, attn.z / attn.head_out, attn.output, resid_mid, moe.router_logits, "
    "moe.router_probs, moe.topk_indices, moe.topk_weights, moe.experts[e], moe.expert_out, moe.expert_contrib, "
    "moe.shared_out, moe.output / mlp.output, resid_post; then logits"
)


def _refuse_empty(prompts: Any, lengths: list[int]) -> None:
    """A prompt of no tokens: an error naming it (a forward over 0 positions fails deep inside attention, and a
    padded batch would give an all-padding row)."""
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        which = "the prompt" if isinstance(prompts, str) else f"prompt {empty[0]} ({prompts[empty[0]]!r})"
        raise ValueError(
            f"{which} is empty: it tokenizes to 0 tokens; every prompt needs at least one token "
            f"({len(empty)} empty of {len(lengths)})"
        )


def _refuse_empty_inputs(model: ExpertModel, inputs: tuple) -> None:
    """``trace("")`` / ``trace(["hi", ""])`` / a ``[b, 0]`` id tensor, refused before nnsight batches them."""
    for value in inputs:
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[-1] == 0:
            raise ValueError(f"the input ids have shape {tuple(value.shape)}: 0 tokens; every prompt needs a token")
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        if any(isinstance(t, str) and not t for t in texts):  # only "" can tokenize to nothing: ask about those
            lengths = [len(model.tokenizer(t)["input_ids"]) if isinstance(t, str) and not t else 1 for t in texts]
            _refuse_empty(value, lengths)


def _friendly_tracer(cls: type) -> type:
    if cls not in _FRIENDLY_TRACERS:
        from nnsight.tracing.tracer import _local as _nnsight_local

        from .loops import GuardedIterations, explain_never_reached
        from .unsaved import bind_unsaved

        def __exit__(self, exc_type, exc_value, tb):
            model = self.__dict__.get("_el_model")
            caught: list[warnings.WarningMessage] = []
            frame, names, before = _block_names(self, exc_type)
            ok = False
            try:
                with warnings.catch_warnings(record=True) as caught:
                    done = cls.__exit__(self, exc_type, exc_value, tb)
                ok = exc_type is None
                if frame is not None and getattr(_nnsight_local, "depth", 0) == 0:  # the outermost trace ended
                    bind_unsaved(frame, names, before)
                return done
            except Exception as err:
                if type(err).__name__ == "OutOfOrderError" and model is not None:
                    raise type(err)(_out_of_order_message(model, str(err))).with_traceback(err.__traceback__) from None
                named = indexed_write_error(model, err) if model is not None else None
                if named is not None:
                    raise named.with_traceback(err.__traceback__) from None
                raise
            finally:
                if model is not None:  # check in-place edits of points no hook saw; never leave the hooks behind
                    finish_watches(model, check=ok)
                if model is not None and model._module.__dict__.get("_el_trace_thread") is threading.current_thread():
                    model._module.__dict__.pop("_el_trace_thread", None)
                for w in caught:  # re-issued after the run; nnsight's "never reached" told as it happened
                    point_names = _point_names(model) if model is not None else {}
                    text = explain_never_reached(model, str(w.message), point_names) if model is not None else None
                    message = w.message if text is None else type(w.message)(text)
                    warnings.warn_explicit(message, w.category, w.filename, w.lineno, source=w.source)

        def iter(self) -> GuardedIterations:  # noqa: A001 - nnsight's name
            """nnsight's ``tracer.iter``; an open-ended loop whose body asks nothing of the model is stopped."""
            return GuardedIterations()

        def all(self) -> GuardedIterations:  # noqa: A001 - nnsight's name
            """nnsight's ``tracer.all()`` (``tracer.iter[:]``), guarded the same way."""
            return GuardedIterations()[:]

        body = {"__exit__": __exit__, "iter": property(iter), "all": all, "__module__": cls.__module__}
        _FRIENDLY_TRACERS[cls] = type(cls.__name__, (cls,), body)
    return _FRIENDLY_TRACERS[cls]


def _block_names(tracer: Any, exc_type: Any) -> tuple[Any, list[str], set[str]]:
    """``(frame, names the block assigns, names the frame had)`` for a block that is about to run, else
    ``(None, [], set())`` (the block raised, or nnsight captured no block)."""
    from nnsight.tracing.tracer import ExitTracingException

    from .unsaved import assigned_names

    info, node = getattr(tracer, "info", None), getattr(tracer, "node", None)
    if exc_type not in (None, ExitTracingException) or info is None or info.frame is None or node is None:
        return None, [], set()
    try:
        return info.frame, assigned_names(node.body), set(info.frame.f_locals)
    except Exception:  # noqa: BLE001 - the hint is optional; never let it break a trace
        return None, [], set()


def _point_names(model: ExpertModel) -> dict[str, str]:
    """nnsight location prefix (module path + ``.input``/``.output``) -> expertlens point name."""
    names = {f"{model.spec.embed}.output": "embed", f"{model.spec.lm_head}.output": "logits"}
    for lay in model.layout:
        row, at = lay.as_dict(), f"layers[{lay.index}]"
        names[f"{row['path']}.input"] = f"{at}.resid_pre"
        names[f"{row['path']}.output"] = f"{at}.resid_post"
        names[f"{row['attn']}.output"] = f"{at}.attn.output"
        if row.get("o_proj"):
            names[f"{row['o_proj']}.input"] = f"{at}.attn.z"
            names[f"{row['o_proj']}.output"] = f"{at}.attn.head_out"
        names[f"{row['mid']}.input"] = f"{at}.resid_mid"
        names[f"{row['mlp']}.output"] = f"{at}.mlp.output"
        if row.get("block"):
            names[f"{row['block']}.input"] = f"{at}.moe.input"
            for point in ("router_logits", "router_probs", "topk_indices", "topk_weights"):
                names[f"{row['router']}.el_{point}.output"] = f"{at}.moe.{point}"
            names[f"{row['experts']}.el_expert_out.output"] = f"{at}.moe.expert_out"
            names[f"{row['experts']}.el_expert_view.output"] = f"{at}.moe.experts[e]"
            names[f"{row['experts']}.el_expert_contrib.output"] = f"{at}.moe.expert_contrib"
            names[f"{row['block']}.el_shared_out.output"] = f"{at}.moe.shared_out"
            names[f"{row['block']}.el_output.output"] = f"{at}.moe.output"
    return names


def _out_of_order_message(model: ExpertModel, message: str) -> str:
    import re

    match = re.search(r"'([^']+)' was requested", message)
    location = match.group(1) if match else ""
    path = re.sub(r"^model\.", "", location)
    path = re.sub(r"\.i\d+$", "", path)
    name = _point_names(model).get(path)
    if name is None:
        return f"{message}. Read points in computation order within one invoke: {READ_ORDER}"
    if not _instrument.is_installed(model._module) and ".moe." in name:
        return (f"{name} was requested, but this model's instrumentation was removed (model.restore()), so MoE "
                f"points are never computed; wrap the model again (nnsight location {location!r})")
    return (
        f"{name} was read after the model had already computed it (or it is never computed in this forward). "
        f"Within one invoke read points in computation order: {READ_ORDER}; or read it in a separate invoke "
        f"or trace (nnsight location {location!r})"
    )


def _own_config(model: nn.Module) -> None:
    """Give ``model`` a private deep copy of its config (every module that holds it or one of its
    sub-configs), so that switching its experts implementation never changes another model sharing
    the config object. :func:`_release` puts the original objects back."""
    memo: dict[int, Any] = {}
    copy.deepcopy(model.config, memo)  # sub-configs (text_config, ...) get copies too
    swapped = []
    for module in model.modules():
        cfg = module.__dict__.get("config")
        if cfg is not None and id(cfg) in memo and memo[id(cfg)] is not cfg:
            swapped.append((module, cfg))
            module.__dict__["config"] = memo[id(cfg)]
    model.__dict__["_el_shared_config"] = swapped


def _release(hf: nn.Module) -> None:
    """Undo wrapping on the HF model (see ``ExpertModel.restore``); safe to call repeatedly."""
    from nnsight.intervention.source import STATE, Controller

    registry = hf.__dict__.pop("_el_edit_registry", None)
    if registry is not None:
        registry.clear()  # every edit by its handle, newest first: weight edits restore their weights
    for handle in reversed(list(hf.__dict__.get("_el_weight_edits", ()))):
        handle.remove()  # weight edits applied outside the registry, latest first
    _instrument.restore(hf)
    hf.__dict__.pop("_el_tp_head", None)
    tracker = hf.__dict__.pop("_el_step_tracker", None)
    if tracker is not None:
        tracker.remove()
    if not hf.__dict__.get("_el_weight_edits", True):
        del hf.__dict__["_el_weight_edits"]
    for module, original in hf.__dict__.pop("_el_shared_config", ()):
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


@contextlib.contextmanager
def _first_mapped_device_runs(model: nn.Module, embed_path: str) -> Iterator[None]:
    """While nnsight wraps the model, put a device that computes first in ``hf_device_map``.

    nnsight builds a transformers pipeline, which takes its device from the map's first entry; with
    ``device_map=...`` placing the embedding on ``"disk"`` that entry is ``"disk"``, no torch device (a raw
    RuntimeError from inside nnsight). The embedding's offload hook computes on its execution device, so that
    device is what the pipeline should see. The map's own order is restored afterwards.
    """
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict) or not device_map:
        yield
        return
    first = next(iter(device_map.values()))
    if first not in ("disk", "meta"):
        yield
        return
    saved = dict(device_map)
    device = _execution_device(model, embed_path)
    model.hf_device_map = {"": str(device), **saved}
    try:
        yield
    finally:
        model.hf_device_map = saved


def _can_run(model: nn.Module) -> bool:
    """False when some weight is on the meta device and no accelerate offload hook can load it."""
    if not any(p.is_meta for p in model.parameters()):
        return True
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def _editable_modules(model: nn.Module, paths: list[str]) -> list[nn.Module]:
    """The modules at ``paths`` (each once), made editable at wrap time."""
    mods: list[nn.Module] = []
    for path in paths:
        module = model.get_submodule(path) if path else None
        if module is not None and not any(module is m for m in mods):
            mods.append(module)
    return mods


def _accept_inferred(model: ExpertModel, reference: tuple[Tensor, Tensor]) -> None:
    """The truth test for a table inferred from structure (``expertlens.infer``): ``check_truth`` (logits and
    every MoE block's output equal the uninstrumented model's), the no-op ``logits`` point against the
    reference taken before instrumenting, then ``check_model``. Raises ``UnsupportedModelError`` naming the
    inferred table; on success warns ``InferredFamilyWarning`` with the ``register_family`` call."""
    from .checks import ValidationError, check_model, check_truth
    from .infer import InferredFamilyWarning

    ids, logits = reference
    try:
        check_truth(model)
        with torch.no_grad(), model.trace(ids):
            got = model.logits.save()
        if not torch.equal(got, logits):
            err = (got.float() - logits.float()).abs().max().item()
            raise ValidationError(f"no-op logits differ from the unwrapped model's by {err:.3g}")
        check_model(model)
    except Exception as exc:
        raise UnsupportedModelError(
            f"expertlens has no address table for {model.spec.name!r}, and the table inferred from its structure "
            f"failed the truth test ({exc}); the inferred table was {model.spec.inference}. Describe the family "
            "with expertlens.families.FamilySpec(...) and call expertlens.register_family(spec) before wrapping."
        ) from exc
    warnings.warn(
        f"expertlens has no address table for {model.spec.name!r}; it wrapped the model with a table inferred from "
        f"its structure, which passed the truth test: {model.spec.inference}. To make it explicit (and silence this "
        f"warning): expertlens.register_family(expertlens.families.{model.spec.inference})",
        InferredFamilyWarning,
        stacklevel=3,
    )
