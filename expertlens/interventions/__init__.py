"""Composable interventions: steering, ablation, routing edits, expert steering, patching.

Every intervention is a frozen dataclass whose ``attach(model)`` registers point edits
(``model.add_edit``). Use them with ``model.intervene(...)`` around ``model.trace``,
``model.generate`` or plain calls, or pass them to :func:`run_logits` / :func:`generate`.
``a + b`` (or :class:`Compose`) applies interventions in order.
"""

from ..compat import alias_module as _alias_module
from .ablation import AblateDirection, OrthogonalizeWeights, WeightEditHandle
from .activation import AddVector, MeanAblate, ZeroAblate
from .base import Compose, Intervention, attach_all, intervene
from .patching import ActivationCache, Patch, cache_points, run_with_cache
from .per_expert import AllExpertsSteer, ExpertSteer, ScaleExpert
from .routing import ForceExperts, MaskExperts, RouterBias, SteerMoE, calibrate_router_bias
from .run import generate, run_logits
from .selectors import Positions

# moved modules (deprecated paths)
_alias_module(__name__ + ".steering", __name__ + ".activation", __name__ + ".patching", __name__ + ".per_expert")
_alias_module(__name__ + ".expert_steer", __name__ + ".per_expert")

__all__ = [
    "Intervention",
    "Compose",
    "intervene",
    "attach_all",
    "Positions",
    "AddVector",
    "ZeroAblate",
    "MeanAblate",
    "ScaleExpert",
    "Patch",
    "cache_points",
    "run_with_cache",
    "ActivationCache",
    "AblateDirection",
    "OrthogonalizeWeights",
    "WeightEditHandle",
    "MaskExperts",
    "ForceExperts",
    "RouterBias",
    "SteerMoE",
    "calibrate_router_bias",
    "ExpertSteer",
    "AllExpertsSteer",
    "run_logits",
    "generate",
]
