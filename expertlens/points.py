"""The point table: every named value of the forward pass, where it lives, how it is read and written.

:data:`POINTS` is the one place that knows the point vocabulary. From it derive:

* the point properties (``model.layers[i].moe.router_logits`` ...): each is a :class:`PointAttr`
  descriptor that reads and writes through the table;
* persistent edits (``model.add_edit(name, fn, layer)``, in :mod:`expertlens.edits`), which attach
  by the entry's :attr:`Site.kind`;
* the trailing shapes interventions validate against (:func:`point_shape`), the editable names
  (:data:`EDITABLE_POINTS`), the model-level names (:data:`MODEL_POINTS`);
* the address table of ``docs/concepts/points.md`` (:func:`address_table`);
* write validation: every trace-time write passes :func:`check_write` and every edit result
  :func:`check_edit` (shape / dtype / device / finiteness / index-range checks go there; each
  point's ``validate_write`` / ``validate_edit`` slot plugs in too).

Where a value lives is a :class:`Site`: a module path (from the layer's
:class:`~expertlens.layout.LayerLayout`) and a kind saying how the value sits there —
``"hook"`` (the output of an expertlens hook point), ``"output"`` (a module's output, first
element of a tuple), ``"input"`` (a module's first input), ``"input_in_place"`` (same, written in
place), ``"heads"`` (``attn.head_out``, derived from the output projection),
``"expert_slots"`` (one expert's slots of ``expert_out``) or ``"returned_logits"`` (the logits the
model returns, for families that scale or soft-cap them after the unembedding).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import torch
from greenlet import getcurrent
from jaxtyping import Float
from torch import Tensor

from . import instrument as _instrument
from . import writes as _writes
from .families import get_module
from .writes import PointError

if TYPE_CHECKING:
    from .layout import LayerLayout
    from .model import ExpertModel

__all__ = [
    "Point",
    "Site",
    "POINTS",
    "EDITABLE_POINTS",
    "MODEL_POINTS",
    "PointError",
    "PointAttr",
    "point",
    "point_shape",
    "check_write",
    "check_edit",
    "address_table",
    "LayerPoints",
    "AttentionPoints",
    "MLPPoints",
    "MoEPoints",
    "ExpertPoint",
]


SiteKind = Literal["hook", "output", "input", "input_in_place", "heads", "expert_slots", "returned_logits", "derived"]


@dataclass(frozen=True)
class Site:
    """Where a point's value lives: a module path and how the value sits at it.

    Example:
        >>> from expertlens.points import Site
        >>> Site("model.layers.0.mlp.gate.el_router_logits", "hook").kind
        'hook'
    """

    path: str
    kind: SiteKind


Where = Callable[["ExpertModel", "LayerLayout | None"], Site]
Shape = Callable[["ExpertModel", "LayerLayout | None"], tuple[int, ...]]
#: ``(point, value, model, layout, current) -> value to write``; ``current()`` reads the value now there.
WriteCheck = Callable[["Point", Any, "ExpertModel", "LayerLayout | None", Callable[[], Tensor]], Any]
#: ``(point, new, old, layout) -> value to pass on`` for what an edit function returned.
EditCheck = Callable[["Point", Any, Tensor, "LayerLayout | None"], Any]


@dataclass(frozen=True)
class Point:
    """One named value of the forward pass (a row of :data:`POINTS`).

    Attributes:
        name: The string name (``"moe.router_logits"``) used by ``add_edit`` and interventions.
        attr: How it is addressed in a trace (``"layers[i].moe.router_logits"``).
        level: ``"model"`` (no layer), ``"layer"`` (every layer), ``"moe"`` (MoE layers) or
            ``"expert"`` (one routed expert of an MoE layer: ``expert=`` is needed).
        where: ``(model, layout) -> Site``: the module and kind holding the value.
        shape: ``(model, layout) -> trailing shape`` after the leading dimensions (``[b, p]``,
            or ``[n]`` for per-expert points).
        dims: The full shape, for the docs (``"[b, p, d]"``).
        dtype: ``"float"``, ``"index"`` (int64 expert ids) or ``"bool"``.
        meaning: What the value is (the docs' "read" column).
        on_write: What a write does (the docs' "write" column).
        not_writable: Why the point cannot be written (``None``: it can).
        leading: Leading dimensions before the trailing shape: 2 (``[b, p]``) or 1 (``[n]``).
        needs: ``(model, layout) -> reason | None``: why this model / layer lacks the point.
        validate_write: Optional check of every trace-time write (see :func:`check_write`).
        validate_edit: Optional check of every edit result (see :func:`check_edit`).

    Example:
        >>> from expertlens.points import point
        >>> p = point("moe.router_logits")
        >>> p.level, p.dtype, p.writable
        ('moe', 'float', True)
    """

    name: str
    attr: str
    level: Literal["model", "layer", "moe", "expert"]
    where: Where
    shape: Shape
    dims: str
    dtype: Literal["float", "index", "bool"]
    meaning: str
    on_write: str = "yes"
    not_writable: str | None = None
    needs: Callable[[ExpertModel, LayerLayout | None], str | None] | None = None
    leading: int = 2
    validate_write: WriteCheck | None = field(default=None, compare=False)
    validate_edit: EditCheck | None = field(default=None, compare=False)

    @property
    def writable(self) -> bool:
        return self.not_writable is None

    @property
    def per_expert(self) -> bool:
        return self.level == "expert"

    @property
    def batched(self) -> bool:
        """Whether the value is ``[b, p, ...]`` (``moe.experts.output`` is ``[n, d]``)."""
        return self.leading == 2

    # ---- trace-time access --------------------------------------------------------------------
    def site(self, model: ExpertModel, layer: int | None) -> Site:
        """The :class:`Site` of this point on ``model`` (layer already range-checked)."""
        lay = model.layout[layer] if layer is not None else None
        if self.level in ("moe", "expert") and not lay.is_moe:
            _ = model.layers[layer].moe  # raises the dense-layer PointError
        if self.needs is not None:
            why = self.needs(model, lay)
            if why is not None:
                raise PointError(why)
        return self.where(model, lay)

    def read(self, model: ExpertModel, layer: int | None, expert: int | None = None) -> Any:
        """The value, inside a trace (an nnsight value).

        A value read here may then be edited in place (``router_logits[..., 0] = v``, the README's
        idiom): :func:`_watch_in_place` runs the same checks as an assignment on it before the model
        goes on with it.
        """
        site = self.site(model, layer)  # a point this model lacks says so first, in a trace or not
        _need_trace(self, layer, "read")
        lay = model.layout[layer] if layer is not None else None
        watch = _watch_in_place(self, model, layer, lay, site, expert)
        if site.kind == "heads":
            z = _point_read("attn.z", model, layer)
            w = get_module(model._module, site.path).weight
            w = w.view(w.shape[0], lay.n_heads, lay.d_head)
            return watch(torch.einsum("bphk,dhk->bphd", z, w.to(z.dtype)))
        env = _site_envoy(model, site)
        if site.kind == "returned_logits":
            return watch(env.output.logits)
        if site.kind == "derived":  # the per-expert masks, from the selected ids
            slot = env.output[0] == expert
            return slot if self.name == "moe.experts.slot_mask" else slot.any(-1)
        if site.kind == "expert_slots":
            indices, out = env.output
            rows = model._moe_points(layer)._expert_rows(indices, expert)
            return watch(out.reshape(-1, out.shape[-1])[rows], rows)
        if site.kind in ("input", "input_in_place"):
            x = env.input
            return watch(_view(self.name, x, lay))
        out = env.output
        return watch(out[0] if isinstance(out, tuple) else out)

    def write(self, model: ExpertModel, layer: int | None, value: Tensor, expert: int | None = None) -> None:
        """Write the value, inside a trace."""
        if self.not_writable is not None:
            raise PointError(f"point {self.name!r} cannot be written: {self.not_writable}")
        site = self.site(model, layer)
        _need_trace(self, layer, "written")
        lay = model.layout[layer] if layer is not None else None
        value = check_write(self, value, model, lay, lambda: self.read(model, layer, expert))
        if site.kind == "heads":
            total = value.sum(dim=-2)
            bias = get_module(model._module, site.path).bias
            _site_envoy(model, Site(site.path, "output")).output = total + bias if bias is not None else total
            return
        env = _site_envoy(model, site)
        if site.kind == "returned_logits":
            current = env.output.logits
            current[...] = value.to(current.dtype)
        elif site.kind == "expert_slots":
            indices, out = env.output
            out.view(-1, out.shape[-1])[model._moe_points(layer)._expert_rows(indices, expert)] = value.to(out.dtype)
        elif site.kind == "input_in_place":
            current = env.input
            current[...] = value.to(current.dtype)
        elif site.kind == "input":
            env.input = _unview(self.name, value, lay)
        else:
            out = env.output
            env.output = (value, *out[1:]) if isinstance(out, tuple) else value


# --------------------------------------------------------------------------------------------
# Helpers shared by the table, the properties and the edits
# --------------------------------------------------------------------------------------------


def as_index(value: Any, what: str) -> int:
    """``value`` as a Python int: ints and numpy/torch integer scalars are accepted; bools, floats
    and anything else raise ``TypeError`` naming the type.

    Example:
        >>> import numpy as np
        >>> from expertlens.points import as_index
        >>> as_index(np.int64(3), "layer")
        3
        >>> try:
        ...     as_index(1.7, "layer")
        ... except TypeError as err:
        ...     print(err)
        layer index must be an int (or a numpy/torch integer scalar), got float 1.7
    """
    import numbers

    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{what} index must be an int (or a numpy/torch integer scalar), got bool {value!r}")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.is_floating_point() and not value.is_complex():
            return int(value.item())
        raise TypeError(
            f"{what} index must be an int (or a numpy/torch integer scalar), got a tensor of shape "
            f"{tuple(value.shape)} and dtype {value.dtype}"
        )
    if isinstance(value, numbers.Integral):
        return int(value)
    raise TypeError(
        f"{what} index must be an int (or a numpy/torch integer scalar), got {type(value).__name__} {value!r}"
    )


def _no_such_point(group: Any, name: str) -> AttributeError:
    cls = type(group)
    kinds = (property, cached_property, PointAttr)
    points = sorted(n for n in dir(cls) if not n.startswith("_") and isinstance(cls.__dict__.get(n, getattr(cls, n)),
                                                                                 kinds))
    return AttributeError(f"{cls.__name__} of layer {group.layer} has no point {name!r}; points are {points}")


class _NamedPoints:
    """Mixin: a typo'd point name lists the valid ones."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if hasattr(type(self), name):  # a real point whose read raised AttributeError: do not call it a typo
            raise AttributeError(f"{type(self).__name__}.{name} exists but reading it raised AttributeError")
        raise _no_such_point(self, name)


def _envoy(root: Any, path: str) -> Any:
    """Walk an nnsight Envoy tree by dotted path (numeric parts index ModuleLists)."""
    env = root
    for part in path.split("."):
        if not part:
            continue
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _site_envoy(model: ExpertModel, site: Site) -> Any:
    if site.kind in ("hook", "expert_slots") and not _instrument.is_installed(model._module):
        raise PointError(
            "this model's expertlens instrumentation was removed (model.restore()): MoE points are gone; "
            "wrap the model again with ExpertModel(...)"
        )
    cache = model.__dict__.get("_point_cache")
    if cache is None:
        return _envoy(model, site.path)
    key = ("envoy", site.path)  # the Envoy tree is fixed for the wrapper's life: resolve each path once
    env = cache.get(key)
    if env is None:
        env = cache[key] = _envoy(model, site.path)
    return env


def _view(name: str, x: Tensor, lay: LayerLayout | None) -> Tensor:
    """The raw module value -> the point's shape (only ``attn.z`` splits by head)."""
    if name == "attn.z":
        return x.view(*x.shape[:-1], lay.n_heads, lay.d_head)
    return x


def _unview(name: str, value: Tensor, lay: LayerLayout | None) -> Tensor:
    if name == "attn.z":
        return value.reshape(*value.shape[:-2], lay.n_heads * lay.d_head)
    return value


def _point_read(name: str, model: ExpertModel, layer: int | None) -> Any:
    return POINTS[name].read(model, layer)


def _point_label(point: Point, layer: int | None) -> str:
    return point.attr.replace("[i]", f"[{layer}]") if layer is not None else point.attr


def _need_trace(point: Point, layer: int | None, verb: str) -> None:
    """A clear error for a point used outside a trace (nnsight's own names its internal module path)."""
    if getattr(getcurrent(), "mediator", None) is None:  # nnsight runs trace bodies in a greenlet with a mediator
        raise PointError(
            f"model.{_point_label(point, layer)} can only be {verb} inside `with model.trace(...)` or "
            "`with model.generate(...)` (values exist only while the model runs); outside one use "
            "model.add_edit(...) or expertlens.edits.record(...)"
        )


_WATCHES = "_el_watches"  # on the HF model: {handle id: (handle, finish)} of reads not yet checked
_LAST_READ = "_el_last_read"  # on the HF model: the point read last in this trace, for a failed indexed write


def _unwatched(value: Any, rows: Tensor | None = None) -> Any:
    return value


def _watch_in_place(
    point: Point, model: ExpertModel, layer: int | None, lay: LayerLayout | None, site: Site, expert: int | None
) -> Callable[..., Any]:
    """Make an in-place edit of a read value (``x[..., 0] = v``, ``x.clamp_(...)``) pass :func:`check_write`.

    Returns ``watch(value, rows=None) -> value``, to call on the value served. A one-shot forward hook on
    the point's module runs, once the trace body has let the model go on, the checks an assignment runs
    (finite values, expert ids in range) — only if the value was modified (its version counter moved), so
    plain reads cost no device sync. In-place edits that could not reach the model (``attn.head_out`` is
    computed for the reader) are refused; ``experts[e].output`` (a gathered copy) is written back. Reads
    whose hook cannot fire (the module was already running) are checked when the trace ends.
    """
    if not point.writable or (site.kind in ("hook", "expert_slots") and not _instrument.is_installed(model._module)):
        return _unwatched  # (after model.restore() the read itself raises the clear error)
    module = get_module(model._module, site.path) if site.path else model._module
    served: dict[str, Any] = {}
    watches = model._module.__dict__.setdefault(_WATCHES, {})

    def finish(output: Any = None) -> None:
        handle.remove()
        watches.pop(id(handle), None)
        value = served["value"]
        if value._version == served["version"]:
            return
        label = _point_label(point, layer).replace("experts[e]", f"experts[{expert}]")
        if site.kind == "heads":
            raise PointError(
                f"model.{label} was edited in place, which cannot reach the model (head_out is computed from "
                "attn.z for reading); assign the point instead: `head_out = new_value` (the sum replaces the "
                "projection's output)"
            )
        checked = check_write(point, value, model, lay, lambda: value)
        if site.kind == "expert_slots":  # a gathered copy: put the edited rows back
            if output is None:
                raise PointError(
                    f"model.{label} was edited in place after the model had used it (the layer was already "
                    "running when it was read); assign it instead: `experts[e].output = new_value`"
                )
            out = output[1]
            out.view(-1, out.shape[-1])[served["rows"]] = checked.to(out.dtype)

    def after(mod: Any, args: Any, output: Any) -> None:
        if "value" in served:  # else an earlier visit (generation step) than the one read
            finish(output)

    def watch(value: Any, rows: Tensor | None = None) -> Any:
        if isinstance(value, Tensor):
            served.update(value=value, version=value._version, rows=rows)
            label = _point_label(point, layer).replace("experts[e]", f"experts[{expert}]")
            model._module.__dict__[_LAST_READ] = f"model.{label}, shape {tuple(value.shape)} {point.dims}"
        return value

    handle = module.register_forward_hook(after)
    watches[id(handle)] = (handle, lambda: "value" in served and finish())
    return watch


def indexed_write_error(model: ExpertModel, err: BaseException) -> PointError | None:
    """A torch shape error from an indexed write in a trace (``point[..., 0] = v``) names no point: this one
    names the point read last (the one most likely written), or ``None`` when ``err`` is something else."""
    last = model._module.__dict__.get(_LAST_READ)
    text = str(err)
    shape_error = "must match the existing size" in text or "shape mismatch" in text
    if last is None or not isinstance(err, RuntimeError) or not shape_error:
        return None
    return PointError(
        f"a write in the trace has the wrong shape ({text.strip()}); the point read last was {last}: an indexed "
        "write (point[...] = v) needs a value that broadcasts to the indexed part"
    )


def finish_watches(model: ExpertModel, check: bool) -> None:
    """At the end of a trace: check the in-place edits whose hook never fired (``check``), drop the hooks."""
    model._module.__dict__.pop(_LAST_READ, None)
    watches = model._module.__dict__.pop(_WATCHES, {})
    for handle, _ in list(watches.values()):
        handle.remove()
    if check:
        for _, finish in watches.values():
            finish()


def check_write(
    point: Point, value: Any, model: ExpertModel, layout: LayerLayout | None, current: Callable[[], Tensor]
) -> Any:
    """Validate a trace-time write to ``point``; return the value to write.

    The one place write validation goes (shape, dtype, device, finiteness, index range):
    ``current()`` reads the point's value now (call it only if needed; inside a trace it is
    served before the write). Runs the point's ``validate_write`` slot when set.

    Example:
        >>> import torch
        >>> from expertlens.points import check_write, point
        >>> v = torch.zeros(1, 2, 64)
        >>> check_write(point("resid_pre"), v, None, None, lambda: v) is v   # no check registered
        True
    """
    if point.validate_write is not None:
        value = point.validate_write(point, value, model, layout, current)
    # Every write, after any per-point slot: shape, dtype kind, device, finiteness and expert-id range.
    name = "moe.experts.output" if point.per_expert else point.name
    return _writes.check_write(model, name, layout.index if layout is not None else None, value, current(),
                               n_experts=layout.n_experts if layout is not None and layout.is_moe else None)


def check_edit(point: Point, new: Any, old: Tensor, layout: LayerLayout | None) -> Any:
    """Validate what an edit function returned at ``point`` (``old``: the value it received);
    return the value to pass on. Runs the point's ``validate_edit`` slot when set.

    Example:
        >>> import torch
        >>> from expertlens.points import check_edit, point
        >>> x = torch.zeros(1, 2, 64)
        >>> check_edit(point("resid_pre"), x + 1, x, None).sum().item()
        128.0
    """
    if point.validate_edit is not None:
        new = point.validate_edit(point, new, old, layout)
    # Every edit result, after any per-point slot: shape and dtype kind, no device sync.
    return _writes.check_edit_output(point.name, layout.index if layout is not None else None, new, old)


def _needs_attn(model: ExpertModel, lay: LayerLayout | None) -> str | None:
    if lay.attn is None:
        with_attn = [row.index for row in model.layout if row.attn is not None]
        return (
            f"layer {lay.index} is a {lay.layer_type} with no attention (a recurrent or convolution mixer in this "
            f"{model.family} hybrid stack): it has no attention points. Layers with attention: {with_attn}"
        )
    return None


def _needs_o_proj(model: ExpertModel, lay: LayerLayout | None) -> str | None:
    if lay.attn is None:
        return _needs_attn(model, lay)
    if lay.o_proj is None:
        return f"layer {lay.index}: attention has no linear output projection to split by head"
    return None


def _needs_dense_o(model: ExpertModel, lay: LayerLayout | None) -> str | None:
    why = _needs_o_proj(model, lay)
    if why is None:
        o_proj = get_module(model._module, lay.o_proj)
        if _instrument.tp_sharded(o_proj) is not None:
            return (
                f"layer {lay.index}: tensor parallelism shards the attention output projection across ranks, so "
                "attn.head_out (which needs the whole W_O) is unavailable; attn.z and attn.output are whole on every "
                "rank (gather W_O yourself: o_proj.weight.full_tensor())"
            )
        try:
            dense_o_weight(o_proj, lay.index)
        except PointError as err:
            return str(err)
    return why


def _needs_attn_write(model: ExpertModel, lay: LayerLayout | None) -> str | None:
    return None if lay.attn_write is not None else _needs_attn(model, lay)


def _needs_mid(model: ExpertModel, lay: LayerLayout | None) -> str | None:
    if lay.mid is None:
        return (
            f"layer {lay.index} ({lay.layer_type}) of this {model.family} model has no resid_mid: its residual "
            f"wiring is {model.spec.residual!r} (no stream between attention and the feed-forward sublayer); use "
            "resid_pre / resid_post"
        )
    return None


def _needs_shared(model: ExpertModel, lay: LayerLayout | None) -> str | None:
    if not lay.has_shared:
        return f"family {model.family!r} has no shared expert" + ("" if model.spec.shared is None else
                                                                    f" at layer {lay.index}")
    return None


def dense_o_weight(o_proj: torch.nn.Module, layer: int) -> Tensor:
    """``o_proj.weight`` as a dense ``[out, in]`` float matrix, or a PointError for a quantised one (bnb 4/8-bit).

    Example:
        >>> from torch import nn
        >>> from expertlens.points import dense_o_weight
        >>> dense_o_weight(nn.Linear(8, 4, bias=False), layer=0).shape
        torch.Size([4, 8])
    """
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


def _d(model, lay):
    return (model.d_model,)


def _mlp_site(model, lay) -> Site:
    return Site(f"{lay.block}.el_output", "hook") if lay.is_moe else Site(lay.mlp, "output")


def _logits_site(model, lay) -> Site:
    if getattr(model, "_head", (1.0, None)) != (1.0, None) or "_el_tp_head" in model._module.__dict__:
        # a head transform, or a tensor-parallel unembedding whose output is this rank's vocab slice (possibly
        # uneven): the logits the model returns, whole
        return Site("", "returned_logits")
    return Site(model.spec.lm_head, "output")


def _hook(owner: str, name: str) -> Where:
    return lambda model, lay: Site(f"{getattr(lay, owner)}.{name}", "hook")


_ROUTING = "selection and weights follow through the family's router"

#: The point table, in computation order (the order to read points within one invoke).
POINTS: dict[str, Point] = {
    p.name: p
    for p in [
        Point("embed", "embed", "model", lambda m, lay: Site(m.spec.embed, "output"), _d,
              "[b, p, d]", "float", "token embeddings"),
        Point("resid_pre", "layers[i].resid_pre", "layer", lambda m, lay: Site(lay.path, "input"), _d,
              "[b, p, d]", "float", "residual stream entering layer `i`"),
        Point("attn.z", "layers[i].attn.z", "layer", lambda m, lay: Site(lay.o_proj, "input"),
              lambda m, lay: (lay.n_heads, lay.d_head), "[b, p, h, d_head]", "float",
              "input of the attention output projection, split by head", needs=_needs_o_proj),
        Point("attn.head_out", "layers[i].attn.head_out", "layer", lambda m, lay: Site(lay.o_proj, "heads"),
              lambda m, lay: (lay.n_heads, m.d_model), "[b, p, h, d]", "float",
              "each head's write, `z[..., h, :] @ W_O[:, h]ᵀ` (no bias)",
              on_write="yes (the sum replaces the projection's output)", needs=_needs_dense_o),
        Point("attn.output", "layers[i].attn.output", "layer", lambda m, lay: Site(lay.attn, "output"), _d,
              "[b, p, d]", "float", "attention output, `Σ_h head_out + o_bias`", needs=_needs_attn),
        Point("attn_write", "layers[i].attn_write", "layer",
              lambda m, lay: Site(lay.attn_write or lay.attn, "output"), _d, "[b, p, d]", "float",
              "what attention adds to the residual stream (differs from `attn.output` only for post-norm "
              "families)", needs=lambda m, lay: None if lay.attn_write else _needs_attn(m, lay)),
        Point("resid_mid", "layers[i].resid_mid", "layer", lambda m, lay: Site(lay.mid, "input_in_place"), _d,
              "[b, p, d]", "float", "residual stream after attention", on_write="yes (in place)", needs=_needs_mid),
        Point("moe.input", "layers[i].moe.input", "moe", lambda m, lay: Site(lay.block, "input"), _d,
              "[b, p, d]", "float", "the MoE block's input (the normalised stream router and experts read)"),
        Point("moe.router_logits", "layers[i].moe.router_logits", "moe", _hook("router", "el_router_logits"),
              lambda m, lay: (lay.n_experts,), "[b, p, E]", "float", "pre-softmax router logits",
              on_write=f"yes — {_ROUTING}"),
        Point("moe.router_probs", "layers[i].moe.router_probs", "moe", _hook("router", "el_router_probs"),
              lambda m, lay: (lay.n_experts,), "[b, p, E]", "float",
              "the family's scores from the (possibly edited) logits: softmax, or sigmoid for deepseek_v3/glm4_moe",
              on_write="yes — a read-out: later readers (records, `ExpertSteer` weights) see the new value; "
              "routing does not change (edit `router_logits`)"),
        Point("moe.topk_indices", "layers[i].moe.topk_indices", "moe", _hook("router", "el_topk_indices"),
              lambda m, lay: (lay.top_k,), "[b, p, k]", "index", "selected experts",
              on_write="yes — the new experts run in those slots"),
        Point("moe.topk_weights", "layers[i].moe.topk_weights", "moe", _hook("router", "el_topk_weights"),
              lambda m, lay: (lay.top_k,), "[b, p, k]", "float", "their routing weights"),
        Point("moe.experts.output", "layers[i].moe.experts[e].output", "expert",
              lambda m, lay: Site(f"{lay.experts}.el_expert_view", "expert_slots"), _d, "[n, d]", "float",
              "expert `e`'s outputs where it was selected (`[0, d]` if never)",
              on_write="yes (in place: those slots of `expert_out`)", leading=1),
        Point("moe.experts.slot_mask", "layers[i].moe.experts[e].slot_mask", "expert",
              lambda m, lay: Site(f"{lay.experts}.el_expert_view", "derived"), lambda m, lay: (lay.top_k,),
              "[b, p, k]", "bool", "slots where expert `e` was selected",
              not_writable="derived from topk_indices; write moe.topk_indices to change the routing"),
        Point("moe.experts.mask", "layers[i].moe.experts[e].mask", "expert",
              lambda m, lay: Site(f"{lay.experts}.el_expert_view", "derived"), lambda m, lay: (), "[b, p]",
              "bool", "tokens routed to expert `e`",
              not_writable="derived from topk_indices; write moe.topk_indices to change the routing"),
        Point("moe.expert_out", "layers[i].moe.expert_out", "moe", _hook("experts", "el_expert_out"),
              lambda m, lay: (lay.top_k, m.d_model), "[b, p, k, d]", "float",
              "each selected expert's output, before its weight"),
        Point("moe.expert_contrib", "layers[i].moe.expert_contrib", "moe", _hook("experts", "el_expert_contrib"),
              lambda m, lay: (lay.top_k, m.d_model), "[b, p, k, d]", "float",
              "what each selected slot adds to `moe.output`: its weight times `expert_out`, times the family's "
              "routed scale where the block applies one (Llama-4: `expert_out`, the weight is inside); "
              "`Σ_k expert_contrib` is the routed part of `moe.output` on every family",
              on_write="yes — their sum replaces the routed part of `moe.output` (weights and scale are not "
              "re-applied)"),
        Point("moe.shared_out", "layers[i].moe.shared_out", "moe", lambda m, lay: Site(lay.shared_point, "hook"), _d,
              "[b, p, d]", "float", "shared expert's contribution after its gate (`None` without one)",
              needs=_needs_shared),
        Point("moe.output", "layers[i].moe.output", "moe", _hook("block", "el_output"), _d, "[b, p, d]",
              "float", "`Σ_k topk_weights · expert_out + shared_out`"),
        Point("mlp.output", "layers[i].mlp.output", "layer", _mlp_site, _d, "[b, p, d]", "float",
              "feed-forward output, dense or MoE (on MoE layers, `moe.output`)"),
        Point("mlp_write", "layers[i].mlp_write", "layer",
              lambda m, lay: Site(lay.ffn_write, "output") if lay.ffn_write else _mlp_site(m, lay), _d,
              "[b, p, d]", "float",
              "what the feed-forward sublayer adds to the residual stream (differs from `mlp.output` only for "
              "post-norm families)"),
        Point("resid_post", "layers[i].resid_post", "layer", lambda m, lay: Site(lay.path, "output"), _d,
              "[b, p, d]", "float", "residual stream leaving layer `i`"),
        Point("logits", "logits", "model", _logits_site, lambda m, lay: (m.vocab_size,), "[b, p, vocab]", "float",
              "the logits the model returns (the unembedding output, after any scaling / soft-capping the family "
              "applies)"),
    ]
}

#: Names ``ExpertModel.add_edit`` and the interventions accept (writable ``[b, p, ...]`` points).
EDITABLE_POINTS: tuple[str, ...] = tuple(
    n for n, p in POINTS.items() if p.writable and p.batched and not p.per_expert
)
#: Model-level points (no layer).
MODEL_POINTS: tuple[str, ...] = tuple(n for n, p in POINTS.items() if p.level == "model")


def point(name: str) -> Point:
    """The table row of a point, or a :class:`PointError` listing the names.

    Example:
        >>> from expertlens.points import point
        >>> point("attn.z").dims
        '[b, p, h, d_head]'
    """
    try:
        return POINTS[name]
    except (KeyError, TypeError):
        raise PointError(f"unknown point {name!r}; points are {tuple(POINTS)}") from None


def point_shape(model: ExpertModel, name: str, layer: int | None = None) -> tuple[int, ...]:
    """Trailing shape (after ``[b, p]``; after ``[n]`` for ``moe.experts.output``) of a point's value.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.points import point_shape
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> point_shape(model, "moe.expert_out", 0)
        (2, 64)
    """
    p = point(name)
    lay = model.layout[layer] if layer is not None else None
    if lay is None and p.level != "model":
        lay = next((row for row in model.layout if row.is_moe or p.level == "layer"), None)
    return tuple(p.shape(model, lay))


def address_table() -> str:
    """The markdown address table of ``docs/concepts/points.md``, rendered from :data:`POINTS`.

    Example:
        >>> from expertlens.points import address_table
        >>> address_table().splitlines()[0]
        '| point | string name | shape | read | write |'
    """
    lines = ["| point | string name | shape | read | write |", "|---|---|---|---|---|"]
    for p in POINTS.values():
        write = p.on_write if p.writable else f"read-only: {p.not_writable}"
        expert = " (`expert=e`)" if p.per_expert else ""
        lines.append(f"| `model.{p.attr}` | `{p.name}`{expert} | `{p.dims}` | {p.meaning} | {write} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Point groups: the properties users address, each a descriptor over a table row
# --------------------------------------------------------------------------------------------


class PointAttr:
    """A point property: reads and writes ``POINTS[name]`` through the table.

    The owning group provides ``_model``, ``layer`` (and ``expert`` for per-expert points); on
    ``ExpertModel`` itself (model-level points) the model is the owner.

    Example:
        >>> from expertlens.points import LayerPoints
        >>> LayerPoints.resid_pre.name
        'resid_pre'
    """

    def __init__(self, name: str):
        self.name = name
        row = POINTS[name]
        self.__doc__ = f"{row.meaning} — ``{row.dims}``. Write: {row.on_write if row.writable else 'read-only'}."

    def __get__(self, group: Any, owner: type | None = None) -> Any:
        if group is None:
            return self
        if self.name in MODEL_POINTS:
            return POINTS[self.name].read(group, None)
        return POINTS[self.name].read(group._model, group.layer, group.__dict__.get("expert"))

    def __set__(self, group: Any, value: Any) -> None:
        if self.name in MODEL_POINTS:
            POINTS[self.name].write(group, None, value)
            return
        POINTS[self.name].write(group._model, group.layer, value, group.__dict__.get("expert"))


class AttentionPoints(_NamedPoints):
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

    output = PointAttr("attn.output")
    z = PointAttr("attn.z")
    head_out = PointAttr("attn.head_out")

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer
        lay = model.layout[layer]
        self._o_path = lay.o_proj
        self.n_heads: int = lay.n_heads
        self.d_head: int = lay.d_head

    def _o_proj(self):
        why = _needs_attn(self._model, self._model.layout[self.layer])
        if why is not None:
            raise PointError(why)
        if self._o_path is None:
            raise PointError(f"layer {self.layer}: attention has no linear output projection to split by head")
        return get_module(self._model._module, self._o_path)

    @property
    def o_weight(self) -> Float[Tensor, "d_model heads d_head"]:
        """The output projection as ``[d_model, heads, d_head]`` (a view of the real weight)."""
        w = dense_o_weight(self._o_proj(), self.layer)
        return w.view(w.shape[0], self.n_heads, self.d_head)

    @property
    def o_bias(self) -> Float[Tensor, " d_model"] | None:
        """The output projection's bias (``None`` for most families)."""
        return self._o_proj().bias


class MLPPoints(_NamedPoints):
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

    output = PointAttr("mlp.output")

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer
        self.is_moe = model.layout[layer].is_moe


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

    output = PointAttr("moe.experts.output")

    def __init__(self, moe: MoEPoints, expert: int):
        self._moe, self.expert = moe, expert
        self._model, self.layer = moe._model, moe.layer

    slot_mask = PointAttr("moe.experts.slot_mask")
    mask = PointAttr("moe.experts.mask")


class _ExpertList:
    def __init__(self, moe: MoEPoints):
        self._moe = moe

    def __len__(self) -> int:
        return self._moe.n_experts

    def __getitem__(self, expert: int) -> ExpertPoint:
        n = self._moe.n_experts
        expert = as_index(expert, "expert")
        if not -n <= expert < n:
            raise PointError(
                f"expert {expert!r} out of range: layer {self._moe.layer} has {n} routed experts (0..{n - 1})"
            )
        return ExpertPoint(self._moe, expert % n)


class MoEPoints(_NamedPoints):
    """MoE points of one layer (see :data:`POINTS` for shapes).

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

    input = PointAttr("moe.input")
    router_logits = PointAttr("moe.router_logits")
    router_probs = PointAttr("moe.router_probs")
    topk_indices = PointAttr("moe.topk_indices")
    topk_weights = PointAttr("moe.topk_weights")
    expert_out = PointAttr("moe.expert_out")
    expert_contrib = PointAttr("moe.expert_contrib")
    output = PointAttr("moe.output")

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer
        lay = model.layout[layer]
        self.n_experts: int = lay.n_experts
        self.top_k: int = lay.top_k
        self.has_shared: bool = lay.has_shared

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
    def experts(self) -> _ExpertList:
        """``experts[e]`` addresses one routed expert (:class:`ExpertPoint`)."""
        return _ExpertList(self)

    @property
    def shared_out(self) -> Float[Tensor, "batch pos d_model"] | None:
        """The shared expert's contribution (after its gate), or ``None`` for families without one."""
        if not self.has_shared:
            return None
        return POINTS["moe.shared_out"].read(self._model, self.layer)

    @shared_out.setter
    def shared_out(self, value: Tensor) -> None:
        POINTS["moe.shared_out"].write(self._model, self.layer, value)


class LayerPoints(_NamedPoints):
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

    resid_pre = PointAttr("resid_pre")
    resid_mid = PointAttr("resid_mid")
    resid_post = PointAttr("resid_post")
    attn_write = PointAttr("attn_write")
    mlp_write = PointAttr("mlp_write")

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer

    def __repr__(self) -> str:
        kind = "moe" if self.is_moe else "dense"
        return f"<LayerPoints {self.layer} ({kind}) of {self._model.family}>"

    @property
    def is_moe(self) -> bool:
        return self._model.layout[self.layer].is_moe

    @property
    def envoy(self):
        """The raw nnsight Envoy of the decoder layer."""
        return _envoy(self._model, self._model.layout[self.layer].path)

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
