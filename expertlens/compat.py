"""Compatibility: old module paths that still import, and one narrow shim between nnsight and transformers.

A module that moved whole keeps its old dotted name through :func:`alias_module` (registered
in the package ``__init__``), so no stub file sits at the old path.

:func:`nnsight_tp_plan_lookup` lets nnsight 0.8.1 wrap a tensor-parallel model of a transformers
(5.24) that moved ``_get_parameter_plan`` from ``transformers.distributed.tensor_parallel`` to
``transformers.distributed.parallel_utils``; it is applied only while wrapping a model that was loaded
across ranks, and only when the name is missing.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

__all__ = ["alias_module", "nnsight_tp_plan_lookup"]


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


def nnsight_tp_plan_lookup() -> str:
    """Make ``transformers.distributed.tensor_parallel._get_parameter_plan`` importable where it moved.

    nnsight 0.8.1 resolves each module of a tensor-parallel model against transformers' plan with
    ``from transformers.distributed.tensor_parallel import _get_parameter_plan`` (its
    ``TPFragments._style_of``). transformers 5.24 defines that function in
    ``transformers.distributed.parallel_utils`` (``tensor_parallel`` imports the names around it, not it), so
    wrapping any tensor-parallel model fails inside nnsight. When the name is missing this binds transformers'
    own function under the old name, nothing else; the function is transformers', unchanged. It is assumed to
    keep the signature ``(name, plan, is_weight=True) -> style | None`` (``tests/test_distributed.py`` checks it
    on a hand-made plan, so a transformers that changes it fails there first).

    ``ExpertModel`` calls this while wrapping a model loaded with a ``distributed_config`` (one with a device
    mesh); a model on one process never triggers it.

    Returns:
        ``"present"`` (transformers has the name: nothing done), ``"bound"`` (bound now, or by an earlier call)
        or ``"unavailable"`` (no transformers distributed module, or no function to bind: nothing done).

    Example:
        >>> from expertlens.compat import nnsight_tp_plan_lookup
        >>> nnsight_tp_plan_lookup() in ("present", "bound", "unavailable")
        True
    """
    try:
        from transformers.distributed import tensor_parallel
    except ImportError:
        return "unavailable"
    if getattr(tensor_parallel, "_el_bound_parameter_plan", False):
        return "bound"
    if "_get_parameter_plan" in vars(tensor_parallel):
        return "present"
    try:
        from transformers.distributed.parallel_utils import _get_parameter_plan
    except ImportError:
        return "unavailable"
    tensor_parallel._get_parameter_plan = _get_parameter_plan
    tensor_parallel._el_bound_parameter_plan = True
    return "bound"
