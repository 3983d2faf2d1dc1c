"""The intervention protocol: values that attach edits to an ``ExpertModel`` and always detach.

An :class:`Intervention` is a frozen dataclass with one method, :meth:`Intervention.attach`, which
registers point edits (``model.add_edit``) and returns their handles. ``model.intervene(...)``
attaches a list of them for the duration of a ``with`` block — around ``model.trace``,
``model.generate`` or plain calls — and removes every edit on exit, also on exceptions, and
also when attaching fails halfway. ``a + b`` and :class:`Compose` apply interventions in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..edits import attach_all, intervene

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
