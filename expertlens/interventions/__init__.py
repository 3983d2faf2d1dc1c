"""Composable interventions: steering, ablation, routing edits, expert steering, patching.

Every intervention is a frozen dataclass whose ``attach(model)`` registers point edits
(``model.add_edit``). Use them with ``model.intervene(...)`` around ``model.trace``,
``model.generate`` or plain calls, or pass them to :func:`run_logits` / :func:`generate`.
``a + b`` (or :class:`Compose`) applies interventions in order.
"""

from .ablation import AblateDirection, OrthogonalizeWeights, WeightEditHandle
from .base import Compose, Intervention, attach_all, intervene
from .expert_steer import AllExpertsSteer, ExpertSteer
from .routing import ForceExperts, MaskExperts, RouterBias, SteerMoE, calibrate_router_bias
from .run import generate, run_logits
from .selectors import Positions
from .steering import AddVector, MeanAblate, Patch, ScaleExpert, ZeroAblate, cache_points

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
