"""The intervention protocol: values that attach edits to an ``ExpertModel`` and always detach.

An :class:`Intervention` is a frozen dataclass with one method, :meth:`Intervention.attach`, which
registers point edits (``model.add_edit``) and returns their handles. ``model.intervene(...)``
attaches a list of them for the duration of a ``with`` block — around ``model.trace``,
``model.generate`` or plain calls — and removes every edit on exit, also on exceptions, and
also when attaching fails halfway. ``a + b`` and :class:`Compose` apply interventions in order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..model import EditHandle, ExpertModel

__all__ = ["Intervention", "Compose", "intervene", "attach_all"]


@dataclass(frozen=True)
class Intervention:
    """Base class. Subclasses implement :meth:`attach` (and :meth:`validate` for early checks).

    Example:
        >>> from dataclasses import dataclass
        >>> from expertlens.interventions import Intervention
        >>> @dataclass(frozen=True)
        ... class Double(Intervention):
        ...     layer: int
        ...     def attach(self, model):
        ...         return [model.add_edit("moe.output", lambda x, ctx: 2 * x, layer=self.layer)]
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> with model.intervene(Double(1)):
        ...     with model.trace("hi"):
        ...         out = model.logits.save()
        >>> model.n_edits()
        0
    """

    def validate(self, model: ExpertModel) -> None:
        """Raise a clear error if this intervention cannot apply to ``model``. Called before attaching."""

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        """Register this intervention's edits on ``model``; return the handles that remove them."""
        raise NotImplementedError

    def __add__(self, other: Intervention) -> Compose:
        return Compose((*_flatten(self), *_flatten(other)))


def _flatten(item: Intervention) -> tuple[Intervention, ...]:
    if isinstance(item, Compose):
        return tuple(item.items)
    if not isinstance(item, Intervention):
        raise TypeError(f"can only compose Intervention objects, got {type(item).__name__}")
    return (item,)


@dataclass(frozen=True)
class Compose(Intervention):
    """Several interventions applied in order (at a shared point, earlier ones edit first).

    Example:
        >>> from expertlens.interventions import Compose
        >>> Compose()  # the empty composition changes nothing
        Compose(items=())
    """

    items: Sequence[Intervention] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(x for item in self.items for x in _flatten(item)))

    def validate(self, model: ExpertModel) -> None:
        for item in self.items:
            item.validate(model)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        return attach_all(model, self.items)


def attach_all(model: ExpertModel, items: Sequence[Intervention]) -> list[EditHandle]:
    """Validate then attach ``items`` in order; on any error remove what was attached and re-raise.

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
    for item in items:
        if not isinstance(item, Intervention):
            raise TypeError(f"expected Intervention objects, got {type(item).__name__}")
        item.validate(model)
    _refuse_conflicting_routing(model, items)
    handles: list[EditHandle] = []
    try:
        for item in items:
            handles.extend(item.attach(model))
    except BaseException:
        for handle in reversed(handles):
            handle.remove()
        raise
    return handles


def _refuse_conflicting_routing(model: ExpertModel, items: Sequence[Intervention]) -> None:
    """One expert both kept out (MaskExperts, SteerMoE deactivation) and forced in (ForceExperts,
    SteerMoE activation) at one layer: whichever edit runs last would silently win."""
    from .routing import ForceExperts, MaskExperts, SteerMoE
    from .selectors import resolve_experts

    out: dict[tuple[int, int], str] = {}
    into: dict[tuple[int, int], str] = {}
    for i, item in enumerate(_flat(items)):
        name = f"{type(item).__name__} (#{i + 1})"
        if isinstance(item, MaskExperts):
            pairs = [(out, resolve_experts(model, item.experts, "MaskExperts"))]
        elif isinstance(item, ForceExperts):
            pairs = [(into, resolve_experts(model, item.experts, "ForceExperts"))]
        elif isinstance(item, SteerMoE):
            act, deact = item._tables(model)
            pairs = [(into, act), (out, deact)]
        else:
            continue
        for claims, table in pairs:
            for layer, experts in table.items():
                for e in experts:
                    claims.setdefault((layer, e), name)
    clash = sorted(set(out) & set(into))
    if clash:
        layer, e = clash[0]
        raise ValueError(
            f"conflicting routing edits: expert {e} at layer {layer} is kept out by {out[(layer, e)]} and forced in "
            f"by {into[(layer, e)]}; the later edit would silently override the earlier. Drop one of them "
            f"({len(clash)} conflicting (layer, expert) pair(s): {clash[:5]})"
        )


def _flat(items: Sequence[Intervention]) -> list[Intervention]:
    out: list[Intervention] = []
    for item in items:
        out.extend(_flat(item.items) if isinstance(item, Compose) else [item])
    return out


@contextmanager
def intervene(model: ExpertModel, *interventions: Intervention) -> Iterator[list[EditHandle]]:
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
