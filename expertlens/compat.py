"""Old module paths that still import, with a ``DeprecationWarning`` naming the new home.

A module that moved whole keeps its old dotted name through :func:`alias_module` (registered
in the package ``__init__``), so no stub file sits at the old path.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

__all__ = ["alias_module"]


class _MovedModule(types.ModuleType):
    """A stand-in module at an old path: attribute reads forward to the new modules and warn."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Deprecated alias of {', '.join(targets)}.")
        self._targets = targets

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                warnings.warn(
                    f"{self.__name__}.{attr} moved to {target}.{attr}; import it from there",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._targets)}) has no {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for t in self._targets for n in dir(importlib.import_module(t))})


def alias_module(old: str, *targets: str) -> types.ModuleType:
    """Make the dotted module name ``old`` importable again, forwarding to ``targets``.

    ``import old`` and ``from old import name`` keep working; each name read warns with a
    ``DeprecationWarning`` that names the module it now lives in.

    Args:
        old: the old dotted module name (its parent package must be importable).
        targets: the new modules, searched in order for each attribute.

    Returns:
        The alias module (also placed in ``sys.modules`` and on the parent package).

    Example:
        >>> import warnings
        >>> from expertlens.compat import alias_module
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     from expertlens.experts import HookPoint
        >>> from expertlens.instrument import HookPoint as NewHookPoint
        >>> HookPoint is NewHookPoint
        True
    """
    if not targets:
        raise ValueError(f"alias_module({old!r}): name at least one target module")
    module = _MovedModule(old, tuple(targets))
    sys.modules[old] = module
    parent, _, child = old.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, module)
    return module
