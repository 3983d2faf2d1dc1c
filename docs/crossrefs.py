"""Griffe extension for the API reference: Sphinx roles in docstrings become mkdocs-autorefs links.

The docstrings are Google style with Sphinx cross-reference roles (``:class:`ExpertModel```,
``:func:`~expertlens.checks.check_model```, ``:mod:``, ``:meth:``, ``:attr:``, ``:data:``, ``:exc:``).
mkdocstrings renders Markdown, where a role would show literally, so each role is translated here, at
docs build time, instead of rewriting every docstring:

* the target is resolved like Python would from the docstring's scope (the object, its parents, their
  imports), then followed through re-exports to the object's canonical path;
* a target inside the package becomes an *optional* autoref: a link when the object is rendered on some
  API page, a plain code span otherwise (no strict-mode warning for private or unrendered objects);
* anything else (``torch.Tensor``, a name that does not resolve) becomes a code span.

A reST literal-block marker (``text::``) becomes ``text:`` (the indented block after it is already a
Markdown code block).

Registered in ``mkdocs.yml`` under the python handler's ``extensions``.
"""

from __future__ import annotations

import html
import re

from griffe import Alias, Extension, Module, Object

#: ``:role:`target```, ``:role:`~a.b.c```, ``:role:`title <target>```; ``:py:class:`` too.
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`(?P<body>[^`]+)`")
_TITLED = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")
_LITERAL = re.compile(r"(?m)(?<=\S)::$")


def _follow(root: Module, path: str) -> str | None:
    """Canonical path of the object at dotted ``path`` (through re-exports), or None when it is not
    an object of ``root``'s package."""
    parts = path.split(".")
    if parts[0] != root.name:
        return None
    obj: Object | Alias = root
    for part in parts[1:]:
        try:
            obj = obj.members[part]
            if isinstance(obj, Alias):
                obj = obj.final_target
        except Exception:  # noqa: BLE001 - unknown member, or an alias to outside the package
            return None
    return obj.path if obj.path.split(".")[0] == root.name else None


def resolve(scope: Object, target: str, root: Module) -> str | None:
    """The canonical path ``target`` names when written in ``scope``'s docstring, or None.

    Example:
        >>> resolve(model_module, "ExpertModel", package)  # doctest: +SKIP
        'expertlens.model.ExpertModel'
    """
    target = target.lstrip(".").removesuffix("()")
    first, _, rest = target.partition(".")
    candidates = []
    try:
        candidates.append(scope.resolve(first))
    except Exception:  # noqa: BLE001 - NameResolutionError: not a name in that scope
        pass
    candidates.append(first)  # already a full path
    for head in candidates:
        found = _follow(root, f"{head}.{rest}" if rest else head)
        if found:
            return found
    return None


def translate(text: str, scope: Object, root: Module) -> str:
    """``text`` with every role replaced by an optional autoref or a code span.

    Example:
        >>> translate("see :func:`~expertlens.checks.check_model`", scope, package)  # doctest: +SKIP
        'see <autoref identifier="expertlens.checks.check_model" optional><code>check_model</code></autoref>'
    """

    def one(match: re.Match) -> str:
        body = match["body"].strip()
        titled = _TITLED.match(body)
        target = (titled["target"] if titled else body).lstrip("!~")
        if titled:
            title = titled["title"]
        elif body.startswith("~"):
            title = target.removesuffix("()").rsplit(".", 1)[-1] + ("()" if target.endswith("()") else "")
        else:
            title = target
        path = resolve(scope, target, root)
        if path is None:
            return f"`{title}`"
        return f'<autoref identifier="{html.escape(path)}" optional><code>{html.escape(title)}</code></autoref>'

    return _LITERAL.sub(":", ROLE.sub(one, text))


def _walk(obj: Object):
    yield obj
    for member in obj.members.values():
        if not isinstance(member, Alias):
            yield from _walk(member)


class SphinxRoles(Extension):
    """Translate Sphinx roles in every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: Module, **kwargs) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = translate(obj.docstring.value, obj, pkg)
