"""Measure refusal under interventions: scores (one forward), rates (generation + judge), KL.

Example:
    >>> from expertlens import ExpertModel
    >>> from expertlens.testing import tiny_model, tiny_tokenizer
    >>> from expertlens.refusal.evaluate import refusal_rate
    >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
    >>> rate, outs = refusal_rate(model, ["U:hi\\nA:"], max_new_tokens=2)
    >>> 0.0 <= rate <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from ..interventions.base import Intervention
from ..interventions.run import generate, run_logits
from .scores import Judge, SubstringJudge, kl_divergence, refusal_score

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["last_logits", "mean_refusal_score", "refusal_rate", "mean_kl"]


def last_logits(
    model: ExpertModel, prompts: Sequence[str], interventions: Sequence[Intervention] = (), batch_size: int = 32
) -> Tensor:
    """Next-token logits at the last prompt position ``[n, vocab]`` (float32, CPU)."""
    if not prompts:
        raise ValueError("the prompt list is empty")
    return run_logits(model, list(prompts), tuple(interventions), batch_size=batch_size).float().cpu()


def mean_refusal_score(
    model: ExpertModel,
    prompts: Sequence[str],
    refusal_ids: Sequence[int],
    interventions: Sequence[Intervention] = (),
    temperature: float | None = None,
    batch_size: int = 32,
) -> float:
    """Mean refusal log-odds over ``prompts`` under ``interventions``."""
    logits = last_logits(model, prompts, interventions, batch_size)
    return float(refusal_score(logits, refusal_ids, temperature).mean())


def refusal_rate(
    model: ExpertModel,
    prompts: Sequence[str],
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 16,
    judge: Judge | None = None,
    batch_size: int = 32,
) -> tuple[float, list[str]]:
    """Fraction of greedy completions the judge calls refusals, and the completions."""
    if not prompts:
        raise ValueError("the prompt list is empty")
    judge = judge or SubstringJudge()
    outs = generate(model, list(prompts), max_new_tokens, tuple(interventions), batch_size=batch_size)
    flags = [bool(judge(p, o)) for p, o in zip(prompts, outs)]
    return sum(flags) / len(flags), outs


def mean_kl(
    model: ExpertModel,
    prompts: Sequence[str],
    interventions: Sequence[Intervention],
    base_logits: Tensor | None = None,
    batch_size: int = 32,
) -> float:
    """Mean ``KL(base ‖ intervened)`` of the next-token distribution at the last prompt position."""
    if base_logits is None:
        base_logits = last_logits(model, prompts, (), batch_size)
    steered = last_logits(model, prompts, interventions, batch_size)
    return float(kl_divergence(base_logits, steered).mean())
