"""expertlens: mechanistic interpretability for Mixture-of-Experts language models, on nnsight."""

from .compat import alias_module as _alias_module
from .direction import Direction
from .families import FamilySpec, UnsupportedModelError, register_family, resolve_family, supported_families
from .model import ExpertModel, PointError

__version__ = "0.1.0"

# moved modules (deprecated paths)
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


def load_organism(name: str = "qwen3moe-refusal", **kwargs) -> ExpertModel:
    """Load a bundled model organism (a tiny refusing MoE chat model) as an :class:`ExpertModel`.

    Example:
        >>> import expertlens
        >>> model = expertlens.load_organism()  # doctest: +SKIP
    """
    from .organism import load_organism as _load

    return _load(name, **kwargs)
