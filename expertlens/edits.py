"""The edit registry: functions applied at points on every forward, tracked by identity.

An *edit* is ``fn(value, ctx) -> value`` at a point (:data:`~expertlens.points.POINTS`), applied
inside the module nnsight wraps, so trace-time reads see the edited value, in traces,
generation (every step, KV cache on) and plain calls. :func:`add_edit` attaches one by the
point's site kind and returns an :class:`EditHandle`; every handle (weight edits included, see
:func:`track`) is kept in the model's :class:`EditRegistry`, so ``n_edits`` counts exactly what
is attached and ``clear_edits`` removes it — together with nnsight's own stored edits
(``Envoy.edit`` / ``Envoy.clear_edits``).

:func:`record` is the one recording primitive (an identity edit that keeps values), and
:func:`attach_all` / :func:`intervene` attach interventions (any object with ``validate`` and
``attach``) and always detach them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from . import instrument as _instrument
from .compat import output_cache
from .points import MODEL_POINTS, POINTS, PointError, check_edit, point
from .summary import summarize

if TYPE_CHECKING:
    from .model import ExpertModel

__all__ = [
    "EditContext",
    "EditHandle",
    "EditRegistry",
    "Recording",
    "add_edit",
    "track",
    "record",
    "n_edits",
    "clear_edits",
    "StepTracker",
    "attach_all",
    "intervene",
]

EditFn = Callable[[Tensor, "EditContext"], Tensor]


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
        generating: Whether this forward is driven by ``generate`` (later steps may reach positions
            past this one's input), as opposed to a single forward (a trace or a plain call).

    Example:
        >>> from expertlens.edits import EditContext
        >>> EditContext().step
        0
    """

    step: int = 0
    prompt_len: int = 0
    positions: Tensor | None = None
    attention_mask: Tensor | None = None
    generating: bool = False

    def token_mask(self) -> Bool[Tensor, "batch pos"] | None:
        """``[b, p]`` True at real (non-pad) tokens of this forward; ``None`` without a mask."""
        if self.attention_mask is None or self.positions is None:
            return None
        return self.attention_mask[:, self.positions].bool()


class EditHandle:
    """Returned by :func:`add_edit`; ``remove()`` takes the edit out (idempotent).

    The handle owns one registered function (in a hook point's or editable module's edit list)
    or one torch hook; it is found again by identity, never by name.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> h = model.add_edit("resid_pre", lambda x, ctx: x, layer=1)
        >>> h.active, model.n_edits()
        (True, 1)
        >>> h.remove()
        >>> h.active, model.n_edits()
        (False, 0)
    """

    def __init__(self, lst: list | None, fn: Any, *, hook: Any = None, label: str = ""):
        self._list, self._fn, self._hook, self.label = lst, fn, hook, label

    def owns(self, fn: Any) -> bool:
        return fn is self._fn

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            return
        if self._list is not None:
            for i, f in enumerate(self._list):
                if f is self._fn:
                    del self._list[i]
                    break

    @property
    def active(self) -> bool:
        if self._hook is not None:
            return True
        return self._list is not None and any(f is self._fn for f in self._list)

    def __repr__(self) -> str:
        return f"<EditHandle {self.label or '?'} {'active' if self.active else 'removed'}>"


class EditRegistry:
    """Every handle attached to one model, by identity (weight edits included).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> _ = model.add_edit("logits", lambda x, ctx: x)
        >>> len(model.edit_registry)
        1
        >>> model.clear_edits(); len(model.edit_registry)
        0
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def track(self, handle: Any) -> Any:
        """Keep ``handle`` (anything with ``remove()`` and ``active``); returns it."""
        self._handles = [h for h in self._handles if h.active]
        if not any(h is handle for h in self._handles):
            self._handles.append(handle)
        return handle

    def live(self) -> list[Any]:
        """The handles still attached, oldest first."""
        self._handles = [h for h in self._handles if h.active]
        return list(self._handles)

    def clear(self) -> None:
        """Remove every live handle, newest first (weight edits restore in reverse order)."""
        for handle in reversed(self.live()):
            handle.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self.live())


def _registry(model: ExpertModel) -> EditRegistry:
    return model.edit_registry


def track(model: ExpertModel, handle: Any) -> Any:
    """Count ``handle`` (e.g. a weight edit's restoring handle) in the model's edit accounting.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.edits import track
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> class Once:
        ...     active = True
        ...     def remove(self):
        ...         self.active = False
        >>> h = track(model, Once())
        >>> model.n_edits()
        1
        >>> model.clear_edits(); h.active
        False
    """
    return _registry(model).track(handle)


# --------------------------------------------------------------------------------------------
# add_edit: one mechanism per site kind
# --------------------------------------------------------------------------------------------


def _edit_state(module: torch.nn.Module, path: str):
    st = module.__dict__.get("_el_edit_state")
    if st is None:
        raise PointError(f"{path} is not editable on this model (was it restored?)")
    return st


def add_edit(
    model: ExpertModel, name: str, fn: EditFn, layer: int | None = None, *, expert: int | None = None
) -> EditHandle:
    """Apply ``fn(value, ctx) -> value`` at point ``name`` on every forward until removed.

    ``value`` has the point's shape (``[b, p, ...]``; ``[n, d]`` for ``moe.experts.output``,
    which needs ``expert=``); ``ctx`` is the model's :class:`EditContext`.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.edits import add_edit
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> h = add_edit(model, "moe.experts.output", lambda x, ctx: 0 * x, layer=1, expert=3)
        >>> h.remove()
    """
    row = POINTS.get(name) if isinstance(name, str) else None
    if row is None or not row.writable:
        why = f" ({row.not_writable})" if row is not None else ""
        raise PointError(f"unknown or read-only point {name!r}{why}; editable points are "
                         f"{tuple(n for n, p in POINTS.items() if p.writable)}")
    if name in MODEL_POINTS:
        if layer is not None:
            raise PointError(f"point {name!r} is model-level; do not pass a layer")
    else:
        if layer is None:
            raise PointError(f"point {name!r} needs a layer (0..{model.n_layers - 1})")
        _ = model.layers[layer]  # range check with a clear error
        layer = layer % model.n_layers
    if row.per_expert:
        if expert is None:
            raise PointError(f"point {name!r} is per expert: pass expert= (0..{model.n_experts - 1})")
        if row.level == "expert":
            expert = model.layers[layer].moe.experts[expert].expert  # range check
    elif expert is not None:
        raise PointError(f"point {name!r} is not per expert; do not pass expert=")
    site = row.site(model, layer)
    lay = model.layout[layer] if layer is not None else None
    ctx = model.edit_context
    module = model._module.get_submodule(site.path)
    _refuse_sharded_site(name, site.path, site.kind, module)
    label = f"{name}@{layer}" if layer is not None else name

    def apply(x: Tensor) -> Tensor:
        return check_edit(row, fn(x, ctx), x, lay)

    if site.kind == "hook":

        def edit(x):
            return apply(x)

        module.edits.append(edit)
        return _registry(model).track(EditHandle(module.edits, edit, label=label))

    if site.kind == "expert_slots":
        moe = model._moe_points(layer)

        def edit(view):
            indices, out = view
            flat = out.view(-1, out.shape[-1])
            rows = moe._expert_rows(indices, expert)
            flat[rows] = apply(flat[rows]).to(out.dtype)
            return view

        module.edits.append(edit)
        return _registry(model).track(EditHandle(module.edits, edit, label=f"{label}[{expert}]"))

    if site.kind == "output":
        st = _edit_state(module, site.path)

        def edit(out, args, kwargs):
            if isinstance(out, tuple):
                return (apply(out[0]), *out[1:])
            return apply(out)

        st.edits.append(edit)
        return _registry(model).track(EditHandle(st.edits, edit, label=label))

    if site.kind == "returned_logits":  # after the family's head transform (scaling, soft-capping)
        st = _edit_state(module, "the model")

        def edit(out, args, kwargs):
            out.logits = apply(out.logits)
            return out

        st.edits.append(edit)
        return _registry(model).track(EditHandle(st.edits, edit, label=label))

    if site.kind == "heads":
        st = _edit_state(module, site.path)
        h, dh = lay.n_heads, lay.d_head

        def edit(out, args, kwargs):
            z = args[0] if args else next(iter(kwargs.values()))
            z = z.view(*z.shape[:-1], h, dh)
            w = module.weight.view(module.weight.shape[0], h, dh).to(z.dtype)
            total = apply(torch.einsum("bphk,dhk->bphd", z, w)).sum(dim=-2)
            return total + module.bias if module.bias is not None else total

        st.edits.append(edit)
        return _registry(model).track(EditHandle(st.edits, edit, label=label))

    # inputs: a forward pre-hook
    in_place = site.kind == "input_in_place"
    heads = (lay.n_heads, lay.d_head) if name == "attn.z" else None

    def pre_hook(m, args, kwargs):
        if args:
            x, rest = args[0], args[1:]
        else:
            key = next(iter(kwargs))
            x = kwargs[key]
        shaped = x.view(*x.shape[:-1], *heads) if heads else x
        new = apply(shaped).reshape(x.shape).to(x.dtype)
        if in_place:
            with torch.no_grad() if not x.requires_grad else nullcontext():
                x.copy_(new)
            return None
        if args:
            return (new, *rest), kwargs
        kwargs = dict(kwargs)
        kwargs[key] = new
        return args, kwargs

    torch_handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return _registry(model).track(EditHandle(None, pre_hook, hook=torch_handle, label=label))


def _refuse_sharded_site(name: str, path: str, kind: str, module: nn.Module) -> None:
    """Refuse an edit whose function would receive one rank's slice of the value, not the value.

    Under transformers' tensor parallelism a module wrapped by a sharding style (``colwise``, ``rowwise``,
    ``colwise_gather_output`` ...) has its class forward, where output edits run, and its torch pre-hooks, where
    input edits run, on this rank's shard or partial sum. Trace-time reads and writes of the same points are made
    whole by nnsight; persistent edits are not, so they are refused rather than computed on a slice.
    """
    if kind in ("hook", "expert_slots", "returned_logits"):
        return  # expertlens' own hook points and the returned logits hold whole values on every rank
    qualname = _instrument.tp_sharded(module)
    if qualname is None:
        return
    raise PointError(
        f"point {name!r} sits at {path}, which transformers' tensor parallelism shards ({qualname.split('.')[0]}): "
        "an edit there would receive this rank's slice of the value. Under tensor parallelism edit a point whose "
        "value is whole on every rank (resid_pre / resid_mid / resid_post, attn.output, mlp.output, moe.*), or write "
        "this point inside a trace (nnsight gathers it)"
    )


# --------------------------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------------------------


def _raw_edit_lists(model: ExpertModel) -> Iterator[list]:
    for module in model._module.modules():
        if isinstance(module, _instrument.HookPoint):
            yield module.edits
        st = module.__dict__.get("_el_edit_state")
        if st is not None:
            yield st.edits


def n_edits(model: ExpertModel) -> int:
    """Edits attached to ``model``: tracked handles (weight edits included), functions placed in
    edit lists without a handle, and nnsight's own stored edits (``model.edit(inplace=True)``).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.edits import n_edits
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> n_edits(ExpertModel(tiny_model("olmoe"), tiny_tokenizer()))
        0
    """
    live = _registry(model).live()
    untracked = sum(
        1 for lst in _raw_edit_lists(model) for fn in lst if not any(
            isinstance(h, EditHandle) and h.owns(fn) for h in live
        )
    )
    return len(live) + untracked + len(getattr(model, "_edits", None) or ())


def clear_edits(model: ExpertModel) -> None:
    """Remove every edit: tracked handles newest first (weight edits restore their weights), any
    function left in an edit list, and nnsight's stored edits.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.edits import clear_edits
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> _ = model.add_edit("logits", lambda x, ctx: x)
        >>> clear_edits(model); model.n_edits()
        0
    """
    _registry(model).clear()
    for lst in _raw_edit_lists(model):
        lst.clear()
    if getattr(model, "_edits", None):
        model._edits = []


# --------------------------------------------------------------------------------------------
# the step tracker (keeps EditContext current)
# --------------------------------------------------------------------------------------------


def _extends_by_one(ids: Tensor, last: Tensor) -> bool:
    """Whether ``ids`` is ``last`` plus one more position (same rows, same prefix)."""
    return (ids.shape[0] == last.shape[0] and ids.shape[1] == last.shape[1] + 1 and ids.shape[2:] == last.shape[2:]
            and ids.device == last.device and bool(torch.equal(ids[:, :-1], last)))


class StepTracker:
    """Keeps an :class:`EditContext` up to date on every forward of the HF model.

    Prefill vs decode is decided by the KV cache *object*: a forward that receives the cache the
    previous forward returned continues that sequence (a decode step), whatever length the
    cache reports (MiniMax's linear-attention cache reports 0). A fresh cache falls back on its
    reported length, then on the attention mask. Without a cache (``generate(use_cache=False)``),
    a generate-driven forward whose input extends the previous one by one token is a decode step
    over the whole sequence (``positions`` covers every token, ``prompt_len`` stays). The hooks
    hold the context, never the ``ExpertModel``, so the HF model does not keep its wrapper alive.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())   # installs a StepTracker
        >>> _ = model.hf_model(**model.tokenize("hi"))
        >>> model.edit_context.step, model.edit_context.prompt_len
        (0, 2)
    """

    def __init__(self, ctx: EditContext, module: nn.Module):
        self.ctx = ctx
        self._last_cache: Any = None
        self._last_total = 0
        self._last_ids: Tensor | None = None  # the input of the last generate(use_cache=False) forward
        self._handles = [
            module.register_forward_pre_hook(self.pre, with_kwargs=True),
            module.register_forward_hook(self.post),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._last_cache = self._last_ids = None

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
        # generate(use_cache=False) runs the whole sequence every step: no cache tells a step from a new
        # prompt, so a generate-driven forward (it passes logits_to_keep) whose input is the previous one
        # plus one token continues it, over all its positions.
        uncached = cache is None and kwargs.get("use_cache") is False and "logits_to_keep" in kwargs
        last, self._last_ids = self._last_ids, (ids if uncached else None)
        total = past + p
        ctx = self.ctx
        if uncached and last is not None and _extends_by_one(ids, last):
            ctx.step += 1
        elif past == 0:  # a fresh sequence: trace, or generation's prefill
            ctx.step, ctx.prompt_len = 0, p
        else:
            ctx.step += 1
        ctx.positions = torch.arange(total - p, total, device=ids.device)
        ctx.generating = "logits_to_keep" in kwargs  # generate passes it; a trace or plain call does not
        ctx.attention_mask = mask if mask is not None and mask.shape[-1] == total else None
        self._pending_total = total
        return None

    def post(self, module, args, output):
        cache = output_cache(output)
        self._last_cache = None
        if cache is not None:
            try:
                self._last_cache = weakref.ref(cache)
            except TypeError:
                self._last_cache = (lambda c: lambda: c)(cache)
            self._last_total = getattr(self, "_pending_total", 0)
        return None


# --------------------------------------------------------------------------------------------
# record: the one recording primitive
# --------------------------------------------------------------------------------------------

PointKey = tuple[str, "int | None"]


class Recording:
    """Values kept at points on every forward: ``rec[(point, layer)]`` is the latest one.

    Returned by :func:`record`. ``remove()`` (or leaving ``with``) detaches the identity edits;
    the values stay readable.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.edits import record
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> with record(model, [("moe.router_logits", 1), ("logits", None)]) as rec:
        ...     _ = model.hf_model(**model.tokenize("hi"))
        >>> rec[("moe.router_logits", 1)].shape
        torch.Size([1, 2, 8])
    """

    def __init__(self) -> None:
        self.values: dict[PointKey, Tensor] = {}
        self.handles: list[EditHandle] = []

    def __getitem__(self, key: PointKey) -> Tensor:
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def get(self, key: PointKey, default: Any = None) -> Any:
        return self.values.get(key, default)

    def pop(self, key: PointKey) -> Tensor:
        return self.values.pop(key)

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()

    @property
    def active(self) -> bool:
        return any(h.active for h in self.handles)

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def record(
    model: ExpertModel,
    points: Iterable[PointKey | str],
    *,
    prefill_only: bool = False,
    detach: bool = False,
    on_value: Callable[[PointKey, Tensor, EditContext], None] | None = None,
    keep: bool = True,
) -> Recording:
    """Keep the values of ``points`` (``(name, layer)`` pairs; a bare name for model-level
    points) on every forward, through identity edits.

    Args:
        model: The wrapped model.
        points: What to record, in any order (edits attach where each value is computed).
        prefill_only: Skip decode steps (``ctx.step > 0``).
        detach: Keep ``x.detach().clone()`` instead of the tensor itself (graph attached).
        on_value: Called as ``on_value(key, x, ctx)`` for each recorded value, after storing it.
        keep: Store the latest values in the recording (``False``: only call ``on_value``).

    Returns:
        A :class:`Recording` (its handles are in the model's edit accounting).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.edits import record
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> rec = record(model, [("resid_pre", 0)], detach=True)
        >>> _ = model.hf_model(**model.tokenize("hello"))
        >>> rec.remove(); rec[("resid_pre", 0)].shape
        torch.Size([1, 5, 64])
    """
    rec = Recording()
    keys: list[PointKey] = []
    for item in points:
        key = (item, None) if isinstance(item, str) else (item[0], item[1])
        point(key[0])  # a clear error for an unknown name
        keys.append(key)
    try:
        for key in keys:

            def recorder(x, ctx, key=key):
                if prefill_only and ctx.step != 0:
                    return x
                if keep:
                    rec.values[key] = x.detach().clone() if detach else x
                if on_value is not None:
                    on_value(key, x, ctx)
                return x

            rec.handles.append(add_edit(model, key[0], recorder, layer=key[1]))
    except BaseException:
        rec.remove()
        raise
    return rec


# --------------------------------------------------------------------------------------------
# attaching interventions
# --------------------------------------------------------------------------------------------


_CLAIMS = "_el_routing_claims"  # on the HF model: [(handles, claims)] of attached interventions' routing claims


def _live_claims(model: ExpertModel) -> list[tuple[int, int, str, str]]:
    """Routing claims of interventions still attached (an outer ``intervene``, ``attach_all`` handles kept)."""
    held = [(hs, cs) for hs, cs in model._module.__dict__.get(_CLAIMS, []) if any(h.active for h in hs)]
    model._module.__dict__[_CLAIMS] = held
    return [claim for _, cs in held for claim in cs]


def _refuse_conflicting_routing(model: ExpertModel, items: Sequence[Any]) -> list[tuple[int, int, str, str]]:
    """One expert both kept out (MaskExperts, SteerMoE deactivation) and forced in (ForceExperts,
    SteerMoE activation) at one layer: whichever edit runs last would silently win. Interventions
    declare what they do through ``routing_claims(model) -> [(layer, expert, "in" | "out")]``; the
    claims of interventions attached earlier and still live (nested ``intervene`` calls) count too.
    Returns the new items' claims ``(layer, expert, side, label)``."""
    flat: list[Any] = []

    def walk(seq):
        for item in seq:
            inner = getattr(item, "items", None)
            walk(inner) if isinstance(inner, (list, tuple)) else flat.append(item)

    walk(items)
    new = [
        (layer, expert, side, f"{type(item).__name__} (#{i + 1})")
        for i, item in enumerate(flat)
        if getattr(item, "routing_claims", None) is not None
        for layer, expert, side in item.routing_claims(model)
    ]
    claims: dict[str, dict[tuple[int, int], str]] = {"in": {}, "out": {}}
    for layer, expert, side, label in _live_claims(model):
        claims[side].setdefault((layer, expert), f"{label[:-1]}, attached earlier)")
    for layer, expert, side, label in new:
        claims[side].setdefault((layer, expert), label)
    clash = sorted(set(claims["in"]) & set(claims["out"]))
    if clash:
        layer, e = clash[0]
        raise ValueError(
            f"conflicting routing edits: expert {e} at layer {layer} is kept out by {claims['out'][(layer, e)]} and "
            f"forced in by {claims['in'][(layer, e)]}; the later edit would silently override the earlier. Drop one "
            f"of them ({len(clash)} conflicting (layer, expert) pair(s): {clash[:5]})"
        )
    return new


def attach_all(model: ExpertModel, items: Sequence[Any]) -> list[Any]:
    """Validate then attach ``items`` in order; on any error remove what was attached and re-raise.

    ``items`` are interventions: objects with ``validate(model)`` and ``attach(model) -> handles``.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.interventions import MaskExperts, ZeroAblate, attach_all
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> handles = attach_all(model, [MaskExperts({0: [1]}), ZeroAblate("attn.output", layers=1)])
        >>> for h in handles:
        ...     h.remove()
        >>> model.n_edits()
        0
    """
    with _checks_once():  # validate and attach check each vector once between them (see checked_once)
        for item in items:
            if not (callable(getattr(item, "attach", None)) and callable(getattr(item, "validate", None))):
                raise TypeError(f"expected Intervention objects, got {type(item).__name__}")
            item.validate(model)
        claims = _refuse_conflicting_routing(model, items)
        handles: list[Any] = []
        try:
            for item in items:
                for handle in item.attach(model):
                    handles.append(track(model, handle))
        except BaseException:
            for handle in reversed(handles):
                handle.remove()
            raise
    if claims and handles:
        model._module.__dict__.setdefault(_CLAIMS, []).append((handles, claims))
    return handles


#: Within one ``attach_all`` (nested ones included): value checks already run, by key. ``validate`` and ``attach``
#: both check an intervention's vector; a finiteness check reads a flag back to the host, so it runs once.
_CHECKED: ContextVar[dict | None] = ContextVar("expertlens_checked_values", default=None)


@contextmanager
def _checks_once() -> Iterator[None]:
    if _CHECKED.get() is not None:  # an outer attach_all (a Compose) already keeps the results
        yield
        return
    token = _CHECKED.set({})
    try:
        yield
    finally:
        _CHECKED.reset(token)


def checked_once(key: tuple, keep: Any, check: Callable[[], Any]) -> Any:
    """``check()``, run once per ``key`` within one :func:`attach_all` (every call outside one runs it).

    ``keep`` (the checked object) is held with the result so that an ``id`` in ``key`` cannot be reused.
    """
    memo = _CHECKED.get()
    if memo is None:
        return check()
    if key not in memo:
        memo[key] = (keep, check())
    return memo[key][1]


@contextmanager
def intervene(model: ExpertModel, *interventions: Any) -> Iterator[list[Any]]:
    """Attach interventions for the duration of a ``with`` block (see ``ExpertModel.intervene``).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.interventions import MaskExperts, intervene
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> with intervene(model, MaskExperts({0: [1]})):   # same as model.intervene(...)
        ...     with model.trace("hi"):
        ...         idx = model.layers[0].moe.topk_indices.save()
        >>> bool((idx != 1).all())
        True
    """
    handles = attach_all(model, interventions)
    try:
        yield handles
    finally:
        for handle in reversed(handles):
            handle.remove()


# --------------------------------------------------------------------------------------------
# one recorded run: what run_with_cache / cache_points return
# --------------------------------------------------------------------------------------------


class ActivationCache(dict):
    """What ``model.run_with_cache`` and :func:`~expertlens.interventions.cache_points` return: a dict
    ``{(point, layer): [b, p, ...]}``
    (model-level points have layer ``None``) with the run's ``attention_mask`` and :meth:`stack` over layers.

    It is a plain dict otherwise, so :class:`~expertlens.interventions.Patch` takes it as ``source``; keys are
    ``(point, layer)`` pairs
    (TransformerLens's ``"blocks.1.hook_resid_pre"`` is ``("resid_pre", 1)`` here).

    Attributes:
        attention_mask: ``[b, p]`` 1 at real tokens, 0 at left padding (``None`` when not recorded).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> logits, cache = model.run_with_cache(["hello", "hi"], points=["resid_pre"])
        >>> cache["resid_pre", 1].shape, cache.stack("resid_pre").shape
        (torch.Size([2, 5, 64]), torch.Size([2, 2, 5, 64]))
    """

    def __init__(self, values: Any = (), attention_mask: Int[Tensor, "batch pos"] | None = None):
        super().__init__(values)
        self.attention_mask = attention_mask

    def __missing__(self, key: Any) -> Tensor:
        if isinstance(key, str):
            layers = self.layers(key)
            hint = (f"; this cache has it at layers {layers}: cache[{key!r}, {layers[0]}], or cache.stack({key!r})"
                    if layers else "")
            raise KeyError(f"keys are (point, layer) pairs such as ('resid_pre', 1), got {key!r}{hint}")
        raise KeyError(f"no {key!r} in this cache; keys are {sorted(self, key=str)}")

    @property
    def points(self) -> list[str]:
        """The point names in the cache, in the order they were recorded."""
        return list(dict.fromkeys(name for name, _ in self))

    def layers(self, point: str) -> list[int]:
        """The layers ``point`` was recorded at, sorted (``[]`` for an absent or model-level point)."""
        return sorted(lay for name, lay in self if name == point and lay is not None)

    def stack(self, point: str, layers: Sequence[int] | None = None) -> Float[Tensor, "layers batch pos ..."]:
        """``point`` at every recorded layer (or at ``layers``), stacked: ``[n_layers, b, p, ...]``."""
        have = self.layers(point)
        if not have:
            what = "is model-level (one value, no layer): use cache[(point, None)]" if (point, None) in self else (
                f"is not in this cache; points are {self.points}")
            raise KeyError(f"ActivationCache.stack({point!r}): {point!r} {what}")
        wanted = have if layers is None else list(layers)
        missing = [lay for lay in wanted if lay not in have]
        if missing:
            raise KeyError(f"ActivationCache.stack({point!r}): layers {missing} were not recorded; recorded are {have}")
        return torch.stack([self[(point, lay)] for lay in wanted])

    def __repr__(self) -> str:
        items = ", ".join(f"{k!r}: {summarize(v)}" for k, v in list(self.items())[:4])
        more = f", ... ({len(self)} entries)" if len(self) > 4 else ""
        return f"ActivationCache({{{items}{more}}})"


def record_run(
    model: ExpertModel, prompts: str | list[str], wanted: list[PointKey], interventions: Sequence[Any] = ()
) -> tuple[Tensor, ActivationCache]:
    """One forward of ``prompts`` (left-padded batch) under ``interventions``: ``(logits, cache)`` with the
    values at ``wanted`` ``(point, layer)`` keys (detached)."""
    with model.intervene(*interventions), record(model, wanted, detach=True) as rec:
        enc = model.tokenize(prompts if isinstance(prompts, list) else [prompts], position_ids=True)
        with torch.no_grad():
            logits = model.hf_model(**enc, use_cache=False).logits
    return logits, ActivationCache(rec.values, enc.get("attention_mask"))
