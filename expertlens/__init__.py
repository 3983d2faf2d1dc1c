"""expertlens: mechanistic interpretability for Mixture-of-Experts language models, on nnsight.

The package is lazy (PEP 562): ``import expertlens`` loads no torch, transformers or nnsight; each name
below is imported from its module on first use, so ``expertlens --help`` and ``import expertlens`` stay fast.

Example:
    >>> import expertlens
    >>> from expertlens import ExpertModel
    >>> ExpertModel.__module__
    'expertlens.model'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .compat import alias_module as _alias_module

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .direction import Direction
    from .families import FamilySpec, UnsupportedModelError, register_family, resolve_family, supported_families
    from .model import ExpertModel, PointError

__version__ = "0.1.0"

# moved modules (deprecated paths); the alias imports its target only when an attribute is read
_alias_module("expertlens.experts", "expertlens.instrument")

__all__ = [
    "Direction",
    "ExpertModel",
    "FamilySpec",
    "PointError",
    "UnsupportedModelError",
    "register_family",
    "resolve_family",
    "supported_families",
    "load_organism",
]

#: public name -> the module that defines it (imported on first use)
_LAZY = {
    "Direction": "direction",
    "FamilySpec": "families",
    "UnsupportedModelError": "families",
    "register_family": "families",
    "resolve_family": "families",
    "supported_families": "families",
    "ExpertModel": "model",
    "PointError": "model",
}


def __getattr__(name: str):
    if name.startswith("__"):  # probes such as __wrapped__ or __file__ lookups by tools
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later reads skip this function
        return value
    try:  # a submodule read as an attribute (``expertlens.refusal``) without importing it first
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise  # the submodule exists but one of its imports is missing: say so
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_organism(name: str | None = None, **kwargs) -> ExpertModel:
    """Load a bundled model organism (a tiny refusing MoE chat model) as an :class:`ExpertModel`.

    Example:
        >>> import expertlens
        >>> model = expertlens.load_organism()  # doctest: +SKIP
    """
    from .organism import DEFAULT_ORGANISM
    from .organism import load_organism as _load

    return _load(name or DEFAULT_ORGANISM, **kwargs)
