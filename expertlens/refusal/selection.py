"""Arditi et al.'s direction selection: bypass, induce and KL scores for every candidate.

Example:
    >>> from expertlens.refusal.selection import Candidate
    >>> Candidate(position=-1, layer=2, bypass=-3.0, induce=1.0, kl=0.01).passed
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..interventions import AblateDirection, AddVector
from .evaluate import last_logits, mean_refusal_score
from .progress import progress
from .scores import kl_divergence, refusal_score

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["Candidate", "DirectionSelection", "select_direction"]


@dataclass
class Candidate:
    """Scores of one candidate direction ``r[position, layer]``.

    Example:
        >>> from expertlens.refusal import Candidate
        >>> c = Candidate(position=-1, layer=2, bypass=-3.2, induce=4.1, kl=0.05)
        >>> c.layer, c.kl
        (2, 0.05)
    """

    position: int
    layer: int
    bypass: float
    induce: float
    kl: float
    reason: str = ""

    @property
    def passed(self) -> bool:
        return not self.reason

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@dataclass
class DirectionSelection:
    """All candidates with their scores and the selected one (``None`` if every candidate was filtered).

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> sel = select_direction(model, candidates, positions, harmful_val, harmless_val, ids)  # doctest: +SKIP
        >>> sel.selected.layer, sel.selected.position   # doctest: +SKIP
        >>> sel.matrix("bypass").shape   # [positions, layers]  # doctest: +SKIP
    """

    candidates: list[Candidate]
    positions: list[int]
    layers: list[int]
    selected: Candidate | None
    direction: Tensor | None = field(default=None, repr=False)
    filters: dict = field(default_factory=dict)
    baseline_bypass: float = float("nan")
    relaxed: str = ""

    def matrix(self, key: str) -> Float[Tensor, "pos layer"]:
        """``[P, L]`` table of one score (``bypass``, ``induce`` or ``kl``)."""
        out = torch.full((len(self.positions), len(self.layers)), float("nan"))
        for c in self.candidates:
            out[self.positions.index(c.position), self.layers.index(c.layer)] = getattr(c, key)
        return out

    def to_dict(self) -> dict:
        return {
            "selected": self.selected.to_dict() if self.selected else None,
            "filters": self.filters,
            "baseline_bypass": self.baseline_bypass,
            "relaxed": self.relaxed,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def select_direction(
    model: ExpertModel,
    candidates: Float[Tensor, "pos layer d_model"],
    positions: Sequence[int],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    kl_threshold: float = 0.1,
    induce_threshold: float = 0.0,
    max_layer_frac: float = 0.8,
    temperature: float | None = None,
    batch_size: int = 32,
    relax_induce: bool = True,
) -> DirectionSelection:
    """Score every candidate and pick the one with the lowest bypass score that passes the filters.

    bypass: mean refusal score on ``harmful_val`` with ``r̂`` ablated from every residual write;
    induce: mean refusal score on ``harmless_val`` with ``+r`` added at layer ``l``'s input (all
    positions); kl: mean KL(base ‖ ablated) on ``harmless_val``. Filters: NaN, ``l ≥ max_layer_frac·L``,
    ``kl > kl_threshold``, ``induce < induce_threshold``. Ties: higher induce, then lower KL. With
    ``relax_induce`` (default), if no candidate passes, the induce filter alone is dropped and
    ``DirectionSelection.relaxed`` says so.

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> from expertlens.refusal import candidate_directions, refusal_token_ids, select_direction
        >>> positions = [-5, -4, -3, -2, -1]
        >>> cands = candidate_directions(model, harmful, harmless, positions)  # doctest: +SKIP
        >>> sel = select_direction(model, cands, positions, harmful_val, harmless_val,
        ...                        refusal_token_ids(model.tokenizer))  # doctest: +SKIP
        >>> r = sel.direction   # the selected candidate, unnormalised  # doctest: +SKIP
    """
    positions = list(positions)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    if candidates.shape[:2] != (len(positions), len(layers)):
        raise ValueError(
            f"candidates have shape {tuple(candidates.shape)}; expected [{len(positions)}, {len(layers)}, d]"
        )
    both, n_harmful = list(harmful_val) + list(harmless_val), len(harmful_val)
    base_harmless = last_logits(model, both, (), batch_size)[n_harmful:]
    base_bypass = float(refusal_score(last_logits(model, harmful_val, (), batch_size), refusal_ids, temperature).mean())
    max_layer = int(max_layer_frac * model.n_layers)
    scored: list[Candidate] = []
    grid = [(pi, li) for pi in range(len(positions)) for li in range(len(layers))]
    for pi, li in progress(grid, desc="selecting direction"):
        r = candidates[pi, li].float()
        layer = layers[li]
        if not torch.isfinite(r).all() or r.norm() == 0:
            scored.append(Candidate(positions[pi], layer, math.nan, math.nan, math.nan, "nan or zero direction"))
            continue
        # one pass over harmful + harmless under ablation gives both the bypass score and the KL
        ablated = last_logits(model, both, [AblateDirection(r)], batch_size)
        bypass = float(refusal_score(ablated[:n_harmful], refusal_ids, temperature).mean())
        kl = float(kl_divergence(base_harmless, ablated[n_harmful:]).mean())
        induce = mean_refusal_score(
            model, harmless_val, refusal_ids, [AddVector("resid_pre", r, layers=layer)], temperature, batch_size
        )
        reason = ""
        if any(math.isnan(v) for v in (bypass, induce, kl)):
            reason = "nan score"
        elif layer >= max_layer:
            reason = f"layer >= {max_layer_frac}·L"
        elif kl > kl_threshold:
            reason = f"kl > {kl_threshold}"
        elif induce < induce_threshold:
            reason = f"induce < {induce_threshold}"
        scored.append(Candidate(positions[pi], layer, bypass, induce, kl, reason))
    passed = [c for c in scored if c.passed]
    relaxed = ""
    if not passed and relax_induce:
        # Arditi's filter asks +r at coefficient 1 to raise the refusal score above 0. Where no candidate
        # manages that (a direction that needs a larger coefficient), keep the other filters, drop this one
        # and say so: the ActAdd coefficient is then calibrated on validation prompts.
        passed = [c for c in scored if c.reason.startswith("induce")]
        relaxed = "induce filter relaxed: no candidate reached the induce threshold at coefficient 1"
    best = min(passed, key=lambda c: (c.bypass, -c.induce, c.kl)) if passed else None
    direction = None
    if best is not None:
        direction = candidates[positions.index(best.position), layers.index(best.layer)].float()
    return DirectionSelection(
        scored,
        positions,
        layers,
        best,
        direction,
        dict(kl_threshold=kl_threshold, induce_threshold=induce_threshold, max_layer_frac=max_layer_frac),
        base_bypass,
        relaxed,
    )
