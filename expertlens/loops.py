"""Generation loops inside ``model.trace`` / ``model.generate``: a guard for open loops that never end, and
"was never reached" warnings that say what really happened.

nnsight 0.8.1 ends an open-ended ``tracer.all()`` / ``tracer.iter[:]`` loop only when a request in its body
outruns the run (the request parks, and the interleaver unwinds it once the model has finished). A body that
reads and writes nothing never parks, so the loop hands out steps forever: ``with tracer.all(): pass`` (the
deprecated block form re-runs the body per step) and ``for step in tracer.all(): pass`` both hang, on any
nnsight model. :class:`GuardedIterations` stops such a loop with an error after :data:`IDLE_LIMIT` steps in a
row that asked nothing of the model.

nnsight's warning for a parked request (``'...i3' was never reached: the loop asked for a step the run did not
make``) is right when the step is past the run's last forward, and misleading otherwise: ``tracer.result``
read inside a loop exists once, so its second step is what never comes. :func:`explain_never_reached` rewrites
it with the point's name and the number of forwards the run made.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from greenlet import getcurrent
from nnsight.intervention.iterator import Iterations

if TYPE_CHECKING:
    from .model import ExpertModel

__all__ = ["GuardedIterations", "IDLE_LIMIT", "OpenLoopError", "explain_never_reached"]

#: Consecutive steps of an open loop whose body made no request before it is stopped. No generation is this
#: long on the models expertlens studies, and 10,000 empty steps take milliseconds, so the refusal is
#: immediate while a body that reads only on some steps (``if step == 5: ...``) still works.
IDLE_LIMIT = 10_000


class OpenLoopError(RuntimeError):
    """An open-ended ``tracer.all()`` / ``tracer.iter[:]`` loop whose body asks nothing of the model.

    Example:
        >>> from expertlens.loops import OpenLoopError
        >>> issubclass(OpenLoopError, RuntimeError)
        True
    """


class GuardedIterations(Iterations):
    """nnsight's ``Iterations`` (what ``tracer.iter`` / ``tracer.all()`` return), with open-ended loops stopped by
    :class:`OpenLoopError` once :data:`IDLE_LIMIT` steps in a row made no request of the model.

    Bounded selections (``iter[:3]``, ``iter[2]``, ``iter[[0, 2]]``) are nnsight's unchanged.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> with model.generate("hi", max_new_tokens=3) as tracer:  # doctest: +ELLIPSIS
        ...     for step in tracer.all():
        ...         pass
        Traceback (most recent call last):
        ...
        expertlens.loops.OpenLoopError: tracer.all() / tracer.iter[:] handed out 10000 steps in a row ...
    """

    def __getitem__(self, key: slice | int | list[int]) -> GuardedIterations:
        picked = super().__getitem__(key)
        return GuardedIterations(picked.start, picked.stop, picked.steps)

    def _indices(self):
        steps = super()._indices()
        if self.steps is not None or self.stop is not None:
            yield from steps
            return
        mediator = getcurrent().mediator()
        idle = 0
        for step in steps:
            # The worker's `pending` is replaced each time it parks on a request (a read, a write, a swap
            # flushed), so an unchanged object means this step's body asked nothing of the model.
            before = mediator.pending
            yield step
            idle = idle + 1 if mediator.pending is before else 0
            if idle >= IDLE_LIMIT:
                raise OpenLoopError(
                    f"tracer.all() / tracer.iter[:] handed out {IDLE_LIMIT} steps in a row whose body read or wrote "
                    "nothing of the model, so the loop would never end (an open loop ends only when a request in "
                    "its body outruns the run; nnsight 0.8.1 spins forever otherwise). Read or write a point "
                    "inside the loop, or bound it: `for step in tracer.iter[:N]:` with N = max_new_tokens (the "
                    "number of forwards: the prefill, then one per generated token after the first)"
                )


_NEVER = re.compile(r"'(?P<loc>[^']+)\.i(?P<i>\d+)' was never reached")
_TAIL = (
    "Values saved inside the loop are kept; the statements after the loop did not run (put them in a separate "
    "`tracer.invoke()`, or bound the loop: `for step in tracer.iter[:N]:`)."
)


def explain_never_reached(model: ExpertModel, message: str, point_names: dict[str, str]) -> str | None:
    """A truthful rewrite of nnsight's "'<location>.i<n>' was never reached" warning, or ``None`` to keep it.

    ``n`` is the occurrence (step) the parked request asked for. Compared with the forwards the run made:
    past the last forward, the warning is true and is reworded with the point's name; ``tracer.result`` (one
    occurrence per run) read inside a loop gets its own explanation; other locations, which may occur more than
    once per forward (``.source`` operations, per-expert views), keep nnsight's text.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> print(explain_never_reached(model, "'result.i1' was never reached: ...", {}))  # doctest: +ELLIPSIS
        tracer.result was read inside a tracer.iter loop: a run has one result, ...
    """
    match = _NEVER.search(message)
    if match is None:
        return None
    location, step = match.group("loc"), int(match.group("i"))
    forwards = model.edit_context.step + 1
    made = f"the run made {forwards} forward{'s' if forwards != 1 else ''} (steps 0..{forwards - 1})"
    if location == "result":
        return (
            f"tracer.result was read inside a tracer.iter loop: a run has one result, after its last forward, so "
            f"the loop's step {step} waited for a second one ({made}). Read it after a bounded loop: "
            f"`for step in tracer.iter[:N]: ...`, then `ids = tracer.result.save()`. {_TAIL}"
        )
    name = point_names.get(re.sub(r"^model\.", "", location))
    if name is None or "experts[e]" in name:
        return None
    if step >= forwards:
        return (
            f"{name} at step {step} was never reached: the loop asked for step {step} and {made}; generation makes "
            f"max_new_tokens forwards, fewer when every row stops at EOS (pass min_new_tokens= to hold it to the "
            f"loop's count). {_TAIL}"
        )
    return (
        f"{name} at step {step} was never reached although {made}: that forward did not compute it (read points "
        f"in computation order within a step). {_TAIL}"
    )
