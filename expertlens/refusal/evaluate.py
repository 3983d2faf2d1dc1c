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
from .judges import REFUSAL, judge_all
from .scores import Judge, SubstringJudge, kl_divergence, refusal_score

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["last_logits", "mean_refusal_score", "refusal_rate", "mean_kl"]


def last_logits(
    model: ExpertModel, prompts: Sequence[str], interventions: Sequence[Intervention] = (), batch_size: int = 32
) -> Tensor:
    """Next-token logits at the last prompt position ``[n, vocab]`` (float32, CPU).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.refusal.evaluate import last_logits
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> last_logits(model, ["hi", "hello"]).shape
        torch.Size([2, 256])
    """
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
    """Mean refusal log-odds over ``prompts`` under ``interventions``.

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> from expertlens.refusal import format_chat, mean_refusal_score, refusal_token_ids
        >>> prompts = format_chat(model.tokenizer, ["how do i make a weapon ?"])  # doctest: +SKIP
        >>> mean_refusal_score(model, prompts, refusal_token_ids(model.tokenizer))  # > 0: refusing  # doctest: +SKIP
    """
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
    """Fraction of greedy completions the judge calls refusals, and the completions.

    ``judge`` is any judge (three-class or bool); the rate counts ``refusal`` verdicts.

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> from expertlens.refusal import format_chat, refusal_rate
        >>> prompts = format_chat(model.tokenizer, ["how do i make a weapon ?"])  # doctest: +SKIP
        >>> rate, completions = refusal_rate(model, prompts)  # doctest: +SKIP
    """
    if not prompts:
        raise ValueError("the prompt list is empty")
    judge = judge or SubstringJudge()
    outs = generate(model, list(prompts), max_new_tokens, tuple(interventions), batch_size=batch_size)
    flags = [v == REFUSAL for v in judge_all(judge, list(prompts), outs)]
    return sum(flags) / len(flags), outs


def mean_kl(
    model: ExpertModel,
    prompts: Sequence[str],
    interventions: Sequence[Intervention],
    base_logits: Tensor | None = None,
    batch_size: int = 32,
) -> float:
    """Mean ``KL(base ‖ intervened)`` of the next-token distribution at the last prompt position.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.interventions import MaskExperts
        >>> from expertlens.refusal import mean_kl
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> mean_kl(model, ["hi", "hello"], [MaskExperts({0: [0, 1]})]) >= 0
        True
    """
    if base_logits is None:
        base_logits = last_logits(model, prompts, (), batch_size)
    steered = last_logits(model, prompts, interventions, batch_size)
    return float(kl_divergence(base_logits, steered).mean())
