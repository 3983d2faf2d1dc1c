"""A name assigned inside ``model.trace(...)`` without ``.save()`` is dropped by nnsight; using it afterwards
gives Python's bare ``NameError`` / ``UnboundLocalError``. ``ExpertModel.trace`` binds such a name (only one
that did not exist before the block) to an :class:`Unsaved` placeholder instead: its repr says what happened,
and any use raises :class:`NotSavedError` (a ``NameError``) with the fix.
"""

from __future__ import annotations

import ast
from types import FrameType
from typing import Any

__all__ = ["NotSavedError", "Unsaved", "assigned_names"]


class NotSavedError(NameError):
    """A value read inside a trace without ``.save()``, used after the trace.

    Example:
        >>> from expertlens.unsaved import NotSavedError
        >>> issubclass(NotSavedError, NameError)
        True
    """


def _message(name: str) -> str:
    return (
        f"{name!r} was assigned inside model.trace(...) / model.generate(...) without .save(), so nnsight dropped "
        f"it when the block ended; write `{name} = ....save()` (a list or dict of values: "
        f"`{name} = nnsight.save([...])`, since `[x.save() for ...]` saves the items, not the list)"
    )


class Unsaved:
    """What an unsaved name holds after its trace: printing it explains; using it raises :class:`NotSavedError`.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> with model.trace("hello"):
        ...     logits = model.logits         # forgot .save()
        >>> logits.shape  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        expertlens.unsaved.NotSavedError: 'logits' was assigned inside model.trace(...) ... without .save(), ...
    """

    __slots__ = ("_name",)

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __repr__(self) -> str:
        return f"<unsaved: {_message(object.__getattribute__(self, '_name'))}>"

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise NotSavedError(_message(object.__getattribute__(self, "_name")))

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # protocol probes (copy, pickle, IPython's _repr_html_) see nothing
            raise AttributeError(attr)
        return self._refuse()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        for arg in (*args, *(kwargs or {}).values()):
            if isinstance(arg, Unsaved):
                arg._refuse()
        return NotImplemented

    __setattr__ = __getitem__ = __setitem__ = __call__ = __iter__ = __len__ = __bool__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __matmul__ = __rmatmul__ = __neg__ = __float__ = __int__ = __index__ = __array__ = _refuse


def assigned_names(body: list[ast.stmt]) -> list[str]:
    """Names a block's statements bind (assignments, ``for`` and ``with ... as`` targets), nested blocks
    included, not inside functions, classes or comprehensions.

    Example:
        >>> import ast
        >>> assigned_names(ast.parse("a = 1\\nfor i in x:\\n    b, c = y\\nd = [j for j in z]").body)
        ['a', 'i', 'b', 'c', 'd']
    """
    out: list[str] = []

    def targets(node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            out.append(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                targets(elt)
        elif isinstance(node, ast.Starred):
            targets(node.value)

    def visit(stmts: list[ast.stmt]) -> None:
        for stmt in stmts:
            if isinstance(stmt, ast.Assign):
                for t in stmt.targets:
                    targets(t)
            elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)):
                targets(stmt.target)
            elif isinstance(stmt, (ast.For, ast.AsyncFor)):
                targets(stmt.target)
            elif isinstance(stmt, (ast.With, ast.AsyncWith)):
                for item in stmt.items:
                    if item.optional_vars is not None:
                        targets(item.optional_vars)
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for field in ("body", "orelse", "finalbody"):
                visit(getattr(stmt, field, []) or [])
            for handler in getattr(stmt, "handlers", []) or []:
                visit(handler.body)

    visit(body)
    return list(dict.fromkeys(out))


def bind_unsaved(frame: FrameType, names: list[str], before: set[str]) -> None:
    """Bind each of ``names`` missing from ``frame`` after its trace (and absent before it) to :class:`Unsaved`."""
    from nnsight.tracing.util import push

    missing = {n: Unsaved(n) for n in names if n not in before and n not in frame.f_locals}
    if missing:
        push(frame, missing)
