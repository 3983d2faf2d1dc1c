"""Selectors shared by all interventions: layers, token positions and batch rows.

* Layers: an ``int``, a list of ints, a ``slice``, or ``"all"``.
* Positions (:class:`Positions`): evaluated on every forward from the
  :class:`~expertlens.model.EditContext`, giving a ``[p]`` or ``[b, p]`` boolean mask for the
  tokens of *this* forward (the whole prompt in a trace or prefill, one token per decode step).
* Rows: ``None`` (all), an ``int``, a list of ints, or a ``[b]`` boolean tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool
from torch import Tensor

from ..direction import Direction, as_tensor
from ..edits import checked_once
from ..points import EDITABLE_POINTS, PointError, point_shape

if TYPE_CHECKING:
    from ..edits import EditContext
    from ..model import ExpertModel

__all__ = ["Positions", "LayerSpec", "resolve_layers", "layer_keys", "point_shape"]

LayerSpec = int | Sequence[int] | slice | str | None


def resolve_layers(
    model: ExpertModel, layers: LayerSpec, *, moe_only: bool = False, what: str = ""
) -> list[int]:
    """Layer selector -> sorted list of layer indices (``moe_only``: "all" means the MoE layers).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("deepseek_v3"), tiny_tokenizer())
        >>> resolve_layers(model, "all"), resolve_layers(model, "all", moe_only=True)
        ([0, 1], [1])
        >>> resolve_layers(model, -1)
        [1]
    """
    n = model.n_layers
    pool = model.moe_layers if moe_only else list(range(n))
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return list(pool)
    if isinstance(layers, str):
        raise ValueError(f"{what}layers={layers!r}: accepted are an int, a list of ints, a slice or 'all'")
    accepted = "accepted are an int (or numpy/torch integer), a list of them, a slice or 'all'"
    if isinstance(layers, slice):
        out = list(range(n))[layers]
        if not out:  # a slice past the end selects nothing: a silent no-op otherwise
            raise PointError(f"{what}layers={layers!r} selects no layer: the model has {n} layers (0..{n - 1})")
    elif isinstance(layers, Tensor) and layers.dim() == 0 or _is_int(layers):
        out = [_as_int(layers, f"{what}layers={layers!r}", accepted)]
    elif isinstance(layers, Sequence) or isinstance(layers, Tensor):
        out = [_as_int(x, f"{what}layers={layers!r}: element {x!r}", accepted) for x in layers]
    else:
        raise TypeError(f"{what}layers={layers!r} ({type(layers).__name__}): {accepted}")
    res = []
    for layer in out:
        if not -n <= layer < n:
            raise PointError(f"{what}layer {layer} out of range: the model has {n} layers (0..{n - 1})")
        layer %= n
        if moe_only and layer not in model.moe_layers:
            raise PointError(
                f"{what}layer {layer} is a dense layer of this {model.family} model; MoE layers are "
                f"{model.moe_layers}"
            )
        if layer not in res:
            res.append(layer)
    return sorted(res)


def resolve_experts(
    model: ExpertModel, table: dict[int, Sequence[int] | int], what: str
) -> dict[int, list[int]]:
    """``{layer: experts}`` -> normalised, range-checked ``{layer: [experts]}`` on MoE layers."""
    if not isinstance(table, dict):
        raise TypeError(f"{what}: expected a dict {{layer: [experts]}}, got {type(table).__name__}")
    out: dict[int, list[int]] = {}
    accepted = "accepted are ints (or numpy/torch integers)"
    for lay, (layer, experts) in zip(layer_keys(model, table, what), table.items()):
        if _is_int(experts) or isinstance(experts, Tensor) and experts.dim() == 0:
            experts = [experts]
        elif not isinstance(experts, (Sequence, Tensor)) or isinstance(experts, str):
            raise TypeError(f"{what}: experts for layer {layer!r} are {experts!r}; {accepted}, or a list of them")
        n = model.n_experts
        ex = [_as_int(e, f"{what}: expert {e!r} at layer {lay}", accepted) for e in experts]
        for e in ex:
            if not 0 <= e < n:
                raise PointError(f"{what}: expert {e!r} out of range at layer {lay}: experts are 0..{n - 1}")
        out[lay] = sorted(set(ex))
    return out


def layer_keys(model: ExpertModel, table: dict, what: str, *, moe_only: bool = True) -> list[int]:
    """The layers a ``{layer: ...}`` table's keys name, in key order: ints (negative from the end), in range,
    each layer named once (keys 1 and -1 of a 2-layer model are the same layer: one would silently win).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> layer_keys(ExpertModel(tiny_model("olmoe"), tiny_tokenizer()), {-1: 0, 0: 0}, "RouterBias")
        [1, 0]
    """
    accepted = "accepted are ints (or numpy/torch integers)"
    keys: dict[int, Any] = {}
    for layer in table:
        (lay,) = resolve_layers(model, _as_int(layer, f"{what}: layer key {layer!r}", accepted), moe_only=moe_only,
                                what=f"{what}: ")
        if lay in keys:
            raise ValueError(
                f"{what}: keys {keys[lay]!r} and {layer!r} both name layer {lay} (negative keys count from the end); "
                "give each layer once"
            )
        keys[lay] = layer
    return list(keys)


def _is_int(value: Any) -> bool:
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_list(value: Any, one: str, element: str, otherwise: str, accepted: str) -> list[int]:
    """One int (numpy / torch integer scalars included) or a sequence of them, as a list; a TypeError naming
    ``one`` (the whole value), ``element`` (prefix for a bad item) or ``otherwise`` (neither form)."""
    if _is_int(value) or isinstance(value, Tensor) and value.dim() == 0:
        return [_as_int(value, one, accepted)]
    if isinstance(value, (Sequence, Tensor)) and not isinstance(value, str):
        return [_as_int(v, f"{element} {v!r}", accepted) for v in value]
    raise TypeError(otherwise)


def _as_int(value: Any, what: str, accepted: str) -> int:
    """An int from an int / numpy or torch integer scalar; TypeError naming the type otherwise."""
    from ..model import as_index

    try:
        return as_index(value, "index")
    except TypeError:
        raise TypeError(f"{what} is a {type(value).__name__}: {accepted}; floats and bools are refused") from None


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Positions:
    """Which token positions an edit applies to, evaluated on each forward.

    Positions are *absolute padded* positions: prompts are left-padded to ``prompt_len`` tokens,
    so prompt tokens sit at ``0..prompt_len-1`` (the last one at ``prompt_len-1`` for every row)
    and generated tokens at ``prompt_len, prompt_len+1, ...``.

    Constructors: :meth:`all`, :meth:`prompt`, :meth:`generated`, :meth:`last`,
    :meth:`indices`, :meth:`mask`.

    Example:
        >>> from expertlens.interventions import Positions
        >>> Positions.last(2)
        Positions(kind='last', arg=2)
    """

    kind: str = "all"
    arg: Any = None

    def __repr__(self) -> str:
        return (
            f"Positions(kind={self.kind!r}, arg={self.arg!r})"
            if self.arg is not None
            else (f"Positions(kind={self.kind!r})")
        )

    @staticmethod
    def all() -> Positions:
        """Every token of every forward."""
        return Positions("all")

    @staticmethod
    def prompt() -> Positions:
        """Prompt tokens only (no generated token)."""
        return Positions("prompt")

    @staticmethod
    def generated() -> Positions:
        """Generated tokens only (nothing in a trace or the prefill)."""
        return Positions("generated")

    @staticmethod
    def last(n: int = 1) -> Positions:
        """The last ``n`` prompt tokens (positions ``prompt_len-n .. prompt_len-1``)."""
        if not _is_int(n) or n < 1:  # (a bool is an int to Python: last(True) would mean last(1))
            raise ValueError(f"Positions.last(n): n must be a positive int, got {n!r}")
        n = int(n)
        return Positions("last", n)

    @staticmethod
    def indices(idx: Sequence[int] | int) -> Positions:
        """Explicit absolute padded positions; negative ones count from the end of the prompt."""
        accepted = "accepted are ints (or numpy/torch integers)"
        idx = _int_list(idx, f"Positions.indices({idx!r})", "Positions.indices: element",
                        f"Positions.indices({idx!r}): {accepted}, or a list of them", accepted)  # fmt: skip
        return Positions("indices", tuple(idx))

    @staticmethod
    def mask(mask: Bool[Tensor, ...]) -> Positions:
        """A boolean mask over absolute positions: ``[total]`` or ``[b, total]`` (missing = False)."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() not in (1, 2):
            raise TypeError("Positions.mask expects a [total] or [batch, total] boolean tensor")
        return Positions("mask", mask)

    @staticmethod
    def coerce(value: Positions | str | Sequence[int] | Tensor | None) -> Positions:
        """Accept a :class:`Positions`, ``"all"``/``"prompt"``/``"generated"``, ints or a bool mask."""
        if value is None:
            return Positions.all()
        if isinstance(value, Positions):
            return value
        if isinstance(value, str):
            if value in ("all", "prompt", "generated"):
                return getattr(Positions, value)()
            raise ValueError(f"positions={value!r}: accepted strings are 'all', 'prompt', 'generated'")
        if isinstance(value, Tensor) and value.dtype == torch.bool:
            return Positions.mask(value)
        if isinstance(value, (int, Sequence, Tensor)):
            accepted = "accepted are ints (or numpy/torch integers), 'all'/'prompt'/'generated' or a boolean mask"
            if _is_int(value) or isinstance(value, Tensor) and value.dim() == 0:
                return Positions.indices(_as_int(value, f"positions={value!r}", accepted))
            return Positions.indices([_as_int(i, f"positions={value!r}: element {i!r}", accepted) for i in value])
        raise TypeError(
            f"positions={value!r}: accepted are a Positions, 'all'/'prompt'/'generated', "
            "a list of ints or a boolean mask"
        )

    def select(self, ctx: EditContext, p: int, device: torch.device) -> Tensor | None:
        """``[p]`` or ``[b, p]`` mask for this forward, or ``None`` meaning every position."""
        if self.kind == "all":
            return None
        pos = ctx.positions
        if pos is None or len(pos) != p:
            pos = torch.arange(p, device=device)
        pos = pos.to(device)
        plen = ctx.prompt_len if ctx.prompt_len else p
        if self.kind == "prompt":
            return pos < plen
        if self.kind == "generated":
            return pos >= plen
        if self.kind == "last":
            return (pos >= plen - self.arg) & (pos < plen)
        if self.kind == "indices":
            idx = [i + plen if i < 0 else i for i in self.arg]
            _check_indices(self.arg, idx, ctx, plen, pos)
            return torch.isin(pos, torch.tensor(idx, device=device))
        if self.kind == "mask":
            m = self.arg.to(device)
            total = m.shape[-1]
            inside = pos < total
            picked = m[..., pos.clamp(max=total - 1)]
            return picked & inside
        raise ValueError(f"unknown Positions kind {self.kind!r}")


def _check_indices(given: tuple[int, ...], idx: list[int], ctx: EditContext, plen: int, pos: Tensor) -> None:
    """Positions that no token of this forward can have: an error, not a silent no-op."""
    for i, j in zip(given, idx):
        if j < 0:
            raise ValueError(
                f"Positions.indices: position {i} is before the start of the {plen}-token (padded) prompt; "
                f"accepted are -{plen}..-1 (from the end of the prompt) and 0 or more"
            )
    # In a generation a later step may reach a position past the prompt; a single fresh forward (positions
    # 0..p-1, known without reading the device) never will.
    total = len(pos)
    if not ctx.generating and ctx.step == 0:
        for i, j in zip(given, idx):
            if j >= total:
                raise ValueError(
                    f"Positions.indices: position {i} is past the end of this {total}-token (padded) input; "
                    f"accepted are 0..{total - 1} or -{plen}..-1 (positions past the prompt exist only in generate)"
                )


_ROWS = "accepted are None (every row), a row number, a list of row numbers or a [batch] boolean tensor"


def rows_mask(rows: Any, b: int, device: torch.device) -> Tensor | None:
    """Batch-row selector -> ``[b]`` mask (``None``: all rows)."""
    if rows is None:
        return None
    if isinstance(rows, Tensor) and rows.dtype == torch.bool:
        if rows.shape != (b,):
            raise ValueError(f"rows mask has shape {tuple(rows.shape)}, the batch has {b} rows")
        return rows.to(device)
    if isinstance(rows, bool) or isinstance(rows, (list, tuple)) and any(isinstance(r, bool) for r in rows):
        # int(True) is 1: [True, False] would select rows 1 and 0, i.e. every row
        raise TypeError(f"rows={rows!r}: bools are not row numbers; for a mask pass torch.tensor({rows!r}). {_ROWS}")
    otherwise = f"rows={rows!r} ({type(rows).__name__}): {_ROWS}"
    idx = _int_list(rows, f"rows={rows!r}", f"rows={rows!r}: element", otherwise, _ROWS)
    for r in idx:
        if not -b <= r < b:
            raise ValueError(f"row {r} out of range for a batch of {b}")
    m = torch.zeros(b, dtype=torch.bool, device=device)
    m[torch.tensor(idx, dtype=torch.long, device=device)] = True
    return m


def token_selection(positions: Positions, rows: Any, ctx: EditContext, x: Tensor) -> Tensor | None:
    """Combined ``[b, p]`` mask of positions and rows for a ``[b, p, ...]`` value (``None``: all)."""
    b, p = x.shape[0], x.shape[1]
    pm = positions.select(ctx, p, x.device)
    rm = rows_mask(rows, b, x.device)
    if pm is None and rm is None:
        return None
    m = torch.ones(b, p, dtype=torch.bool, device=x.device)
    if pm is not None:
        if pm.dim() == 2 and pm.shape[0] != b:
            raise ValueError(
                f"Positions.mask has {pm.shape[0]} rows but the batch has {b}; accepted are a [total] mask "
                f"(every row) or a [{b}, total] one"
            )
        m = m & (pm if pm.dim() == 2 else pm.unsqueeze(0))
    if rm is not None:
        m = m & rm.unsqueeze(1)
    return m


def apply_masked(x: Tensor, new: Tensor, sel: Tensor | None) -> Tensor:
    """``new`` where ``sel`` ([b, p]) is True, ``x`` elsewhere (exactly ``new`` when ``sel`` is None)."""
    if sel is None:
        return new
    shape = sel.shape + (1,) * (x.dim() - 2)
    return torch.where(sel.view(shape), new, x)


# --------------------------------------------------------------------------------------------
# Points and vectors
# --------------------------------------------------------------------------------------------

def check_point(point: str, what: str) -> None:
    """A clear error unless ``point`` is a writable ``[b, p, ...]`` point of the table."""
    if point not in EDITABLE_POINTS:
        raise PointError(
            f"{what}: unknown or read-only point {point!r}; accepted points are {EDITABLE_POINTS}"
        )


def check_vector(
    model: ExpertModel,
    vector: Direction | Tensor,
    shape: tuple[int, ...],
    what: str,
    *,
    allow_last: bool = True,
    scale: float = 1.0,
    nonzero: bool = False,
) -> Tensor:
    """Validate a vector for a point: size (error), finiteness (error); dtype/device converted.

    ``shape`` is the point's trailing shape; a vector of the full trailing shape or (with
    ``allow_last``) of its last dimension (broadcast) is accepted. ``scale`` (a coefficient the
    vector will be multiplied by) must keep it finite in the model's dtype; ``nonzero`` refuses the zero
    vector (in the model's dtype). Within one ``attach_all`` the same values are checked once.
    """
    try:
        v = as_tensor(vector)
    except TypeError as exc:
        raise TypeError(f"{what}: {exc}") from None
    family = getattr(vector, "family", None) if isinstance(vector, Direction) else None
    if family is not None and family != model.family:
        raise ValueError(
            f"{what}: the Direction was computed on a {family!r} model; this model is {model.family!r}. Directions "
            "carry no meaning across models; to apply it anyway pass its tensor (direction.vector)"
        )
    if v.is_complex():  # the cast to the model's real dtype would drop the imaginary part
        raise TypeError(f"{what}: vector has complex dtype {v.dtype}; accepted are real (floating-point) vectors")
    if not v.is_floating_point():
        v = v.float()
    accepted = [tuple(shape)] + ([tuple(shape[-1:])] if allow_last and len(shape) > 1 else [])
    if tuple(v.shape) not in accepted:
        raise ValueError(
            f"{what}: vector has shape {tuple(v.shape)}; accepted shapes are "
            f"{' or '.join(str(s) for s in accepted)} for this {model.family} model"
        )
    src = v.detach()
    # The same values (a view taken again, as MeanAblate's per-layer table is) give the same key; the memo keeps
    # ``src`` alive, so its address cannot be reused by another tensor while the key is held.
    key = (src.data_ptr(), src.shape, src.stride(), src.dtype, src.device, src._version,
           model.dtype, model.device, float(scale), nonzero)
    return checked_once(key, src, lambda: _finite_cast(model, src, what, scale, nonzero))


def _finite_cast(model: ExpertModel, v: Tensor, what: str, scale: float, nonzero: bool) -> Tensor:
    """``v`` in the model's dtype on its device, refused unless finite there (also times ``scale``) and, with
    ``nonzero``, unless some entry is non-zero there.

    The cast and the check run where ``v`` lives, before the move: an intervention's vector is usually on the
    CPU, where reading the flag is no device sync; a vector on the device costs one read (the conditions are
    combined into one flag; the message is worked out only on failure).
    """
    cast = v.to(dtype=model.dtype)
    scaled = cast * scale if scale != 1.0 else cast
    ok = torch.isfinite(scaled).all()
    if nonzero:
        ok = ok & cast.ne(0).any()
    if (cast.numel() or nonzero) and not bool(ok):
        if nonzero and bool(torch.isfinite(scaled).all()):
            raise ValueError(f"{what}: the direction is the zero vector; a non-zero [d_model] vector is accepted")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{what}: vector contains NaN or inf values; only finite vectors are accepted")
        big = float(v.abs().max())
        if not bool(torch.isfinite(cast).all()):
            raise ValueError(
                f"{what}: vector is finite in {v.dtype} but overflows to inf in the model's {model.dtype} "
                f"(max |value| {big:.3g} > {torch.finfo(model.dtype).max:.3g}); rescale it"
            )
        raise ValueError(
            f"{what}: coeff {scale:g} × vector overflows the model's {model.dtype} (max |coeff·value| "
            f"{big * abs(scale):.3g} > {torch.finfo(model.dtype).max:.3g}): the edit would write inf; lower coeff or "
            "rescale the vector"
        )
    return cast.to(device=model.device)


def check_scalar(value: Any, what: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a real number, got {value!r}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return f
