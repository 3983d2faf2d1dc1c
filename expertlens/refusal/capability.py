"""Capability suites for models that are not organisms: a bundled probe with checkable answers, and a hook for
lm-eval-harness when it is installed (imported at call time, never a dependency).

The probe (``data/capability_probe.json``, 38 prompts written for this project) asks short questions in plain
English — arithmetic, copying words, capitals, everyday facts — whose answers a scorer can check without a judge:
``first_number`` (the first integer of the response equals the answer), ``contains`` (the answer occurs as whole
words) or ``exact``. It is small on purpose: under steering it tells a working model from a broken one, not one
good model from another; pass :func:`lm_eval_capability` (or any callable) to the study for a real benchmark.

Example:
    >>> from expertlens.refusal.capability import load_probe, score_probe
    >>> rec = load_probe()[0]
    >>> rec["prompt"]
    'What is 7 plus 5? Reply with the number only.'
    >>> score_probe(rec, "The answer is 12."), score_probe(rec, "13, not 12")
    (True, False)
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["PROBE_PATH", "MODES", "load_probe", "probe_max_new_tokens", "score_probe", "lm_eval_capability"]

#: The bundled probe file.
PROBE_PATH = Path(__file__).resolve().parent / "data" / "capability_probe.json"
#: Scoring modes of a probe item.
MODES = ("first_number", "contains", "exact")
_NUMBER = re.compile(r"-?\d+")


@lru_cache(maxsize=1)
def _probe_doc() -> dict:
    return json.loads(PROBE_PATH.read_text())


def load_probe() -> list[dict]:
    """The probe's items: dicts with ``task``, ``prompt``, ``answer``, ``mode`` and optional ``aliases``.

    Example:
        >>> from expertlens.refusal.capability import load_probe
        >>> sorted({r["task"] for r in load_probe()})
        ['arithmetic', 'capital', 'copy', 'fact']
    """
    return [dict(r) for r in _probe_doc()["items"]]


def probe_max_new_tokens() -> int:
    """Tokens generated per probe prompt (every answer fits; a longer budget only adds chances to ramble).

    Example:
        >>> from expertlens.refusal.capability import probe_max_new_tokens
        >>> probe_max_new_tokens()
        24
    """
    return int(_probe_doc()["max_new_tokens"])


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", str(text).lower()).split())


def score_probe(record: dict, response: str) -> bool:
    """True iff ``response`` answers the probe ``record`` correctly under its ``mode``.

    Text is normalised first: lower case, every character that is not a letter, digit or space becomes a space,
    spaces collapse. ``first_number``: the first integer in the response (thousands commas dropped) equals the
    answer. ``contains``: the answer or one of its ``aliases`` occurs in the response as whole words.
    ``exact``: the response equals the answer or an alias.

    Example:
        >>> from expertlens.refusal.capability import score_probe
        >>> cap = {"prompt": "What is the capital of France?", "answer": "paris", "mode": "contains"}
        >>> score_probe(cap, "It is Paris."), score_probe(cap, "Parisian food"), score_probe(cap, "I cannot say.")
        (True, False, False)
    """
    for k in ("answer", "mode"):
        if k not in record:
            raise KeyError(f"probe record lacks {k!r}; a record has 'prompt', 'answer', 'mode' (one of {MODES})")
    mode = record["mode"]
    if mode not in MODES:
        raise ValueError(f"unknown probe mode {mode!r}; choose one of {MODES}")
    if not isinstance(response, str):
        raise TypeError(f"score_probe expects a str response, got {type(response).__name__}")
    if mode == "first_number":
        m = _NUMBER.search(re.sub(r"(?<=\d),(?=\d{3}\b)", "", response))
        return m is not None and int(m.group()) == int(record["answer"])
    got = _norm(response)
    answers = [_norm(a) for a in [record["answer"], *record.get("aliases", [])]]
    if mode == "exact":
        return got in answers
    return any(a and f" {a} " in f" {got} " for a in answers)


def lm_eval_capability(
    tasks: Sequence[str], *, limit: int | None = None, metric: str = "acc", batch_size: int = 8, **kwargs: Any
) -> Callable[[ExpertModel, Sequence[Any]], tuple[int, int]] | None:
    """A capability suite running lm-eval-harness ``tasks`` on the model, or ``None`` (with a warning) if
    lm-eval-harness is not installed — the study then uses its default suite.

    The returned ``suite(model, interventions) -> (n_correct, n_total)`` runs ``lm_eval.simple_evaluate`` on
    ``model.hf_model`` (the study keeps the condition's interventions active around the call) and sums
    ``metric`` over the logged samples of every task. ``kwargs`` go to ``simple_evaluate`` (e.g.
    ``num_fewshot``).

    Example:
        >>> from expertlens.refusal.capability import lm_eval_capability
        >>> suite = lm_eval_capability(["arc_easy"], limit=50)  # doctest: +SKIP
        >>> study = run_refusal_study(model, data, capability=suite)  # doctest: +SKIP
    """
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        warnings.warn(
            f"lm-eval-harness is not installed ({exc}); the study uses its default capability suite instead "
            "(pip install lm-eval to run benchmark tasks)",
            stacklevel=2,
        )
        return None

    def suite(model: ExpertModel, interventions: Sequence[Any] = ()) -> tuple[int, int]:
        lm = HFLM(pretrained=model.hf_model, tokenizer=model.tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=True, **kwargs)
        k = n = 0
        for task in tasks:
            samples = (out.get("samples") or {}).get(task)
            if not samples:
                raise RuntimeError(f"lm-eval returned no samples for task {task!r}; is it a task name?")
            vals = [s.get(metric) for s in samples]
            if any(v is None for v in vals):
                raise RuntimeError(f"lm-eval samples of {task!r} have no metric {metric!r}; pass metric=...")
            k += int(round(sum(float(v) for v in vals)))
            n += len(vals)
        return k, n

    suite.__name__ = "lm-eval:" + ",".join(tasks)
    return suite
