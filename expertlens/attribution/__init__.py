"""Attribution: which heads, experts and routing decisions write a target, and how routing changes.

* :func:`direct_attribution` / :class:`DirectAttribution` — decompose a linear read-out (a direction
  in the residual stream, or a :class:`LogitDiff`) into the writes of every component before it.
* :func:`attribution_patching` — gradient × activation difference (clean vs corrupted) over heads,
  experts, shared experts, dense MLPs and router logits; :func:`activation_patching` is the real
  (one forward per component) counterpart it is checked against.
* :func:`routing_change` — per layer, how an intervention changes routing (top-k set changes, KL).
* :class:`ComponentAblation` — zero-ablate labelled components (e.g. the top attributed ones).

Every method returns an :class:`AttributionTable` (or :class:`RoutingChange`): plain values with
``.to_dict()``, ``.top(n)`` and ``.to_matrix(kind)``.
"""

from ._table import COMPONENT_KINDS, AttributionTable, Component
from .direct import DirectAttribution, LogitDiff, direct_attribution
from .patching import PATCH_KINDS, ComponentAblation, activation_patching, attribution_patching
from .routing import RoutingChange, routing_change

__all__ = [
    "AttributionTable",
    "Component",
    "COMPONENT_KINDS",
    "DirectAttribution",
    "LogitDiff",
    "direct_attribution",
    "PATCH_KINDS",
    "attribution_patching",
    "activation_patching",
    "ComponentAblation",
    "RoutingChange",
    "routing_change",
]
