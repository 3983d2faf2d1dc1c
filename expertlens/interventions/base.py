"""The intervention protocol: values that attach edits to an ``ExpertModel`` and always detach.

An :class:`Intervention` is a frozen dataclass with one method, :meth:`Intervention.attach`, which
registers point edits (``model.add_edit``) and returns their handles. ``model.intervene(...)``
attaches a list of them for the duration of a ``with`` block — around ``model.trace``,
``model.generate`` or plain calls — and removes every edit on exit, also on exceptions, and
also when attaching fails halfway. ``a + b`` and :class:`Compose` apply interventions in order.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..edits import attach_all, intervene
from ..summary import summarize

if TYPE_CHECKING:
    from ..model import EditHandle, ExpertModel

__all__ = ["Intervention", "Compose", "intervene", "attach_all", "summarize"]



def _shown_fields(obj: Any) -> list[tuple[str, Any]]:
    """Fields without a default, and those set away from their default (in declaration order)."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default
        if default is not dataclasses.MISSING and not isinstance(value, Tensor):
            if value is default or (type(value) is type(default) and _same(value, default)):
                continue
        out.append((f.name, value))
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values whose == is not a bool (arrays): shown
        return False


@dataclass(frozen=True, repr=False)
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

    def __repr__(self) -> str:
        """Class and settings on one line: point, layers, coeff, and each tensor by shape and norm."""
        if not dataclasses.is_dataclass(self):
            return f"{type(self).__name__}()"
        body = ", ".join(f"{name}={summarize(value)}" for name, value in _shown_fields(self))
        return f"{type(self).__name__}({body})"

    def _repr_html_(self) -> str:
        """A two-column table (setting, value) for Jupyter; tensors by shape and norm."""
        rows = "".join(
            f"<tr><td><code>{html.escape(name)}</code></td><td><code>{html.escape(summarize(value))}</code></td></tr>"
            for name, value in (_shown_fields(self) if dataclasses.is_dataclass(self) else [])
        )
        return f"<table><caption><b>{html.escape(type(self).__name__)}</b></caption>{rows}</table>"


def _flatten(item: Intervention) -> tuple[Intervention, ...]:
    if isinstance(item, Compose):
        return tuple(item.items)
    if not isinstance(item, Intervention):
        raise TypeError(f"can only compose Intervention objects, got {type(item).__name__}")
    return (item,)


@dataclass(frozen=True, repr=False)
class Compose(Intervention):
    """Several interventions applied in order (at a shared point, earlier ones edit first).

    Example:
        >>> from expertlens.interventions import Compose, ZeroAblate
        >>> Compose()  # the empty composition changes nothing
        Compose()
        >>> Compose([ZeroAblate("attn.output", layers=0), ZeroAblate("moe.output", layers=1)])
        Compose(
          ZeroAblate(point='attn.output', layers=0),
          ZeroAblate(point='moe.output', layers=1),
        )
    """

    items: Sequence[Intervention] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(x for item in self.items for x in _flatten(item)))

    def validate(self, model: ExpertModel) -> None:
        for item in self.items:
            item.validate(model)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        return attach_all(model, self.items)

    def __repr__(self) -> str:
        if not self.items:
            return "Compose()"
        return "Compose(\n" + "".join(f"  {item!r},\n" for item in self.items) + ")"

    def _repr_html_(self) -> str:
        parts = "".join(f"<li><code>{html.escape(repr(item))}</code></li>" for item in self.items)
        return f"<div><b>Compose</b> ({len(self.items)} parts, applied in order)<ol>{parts}</ol></div>"
