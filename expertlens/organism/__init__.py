"""Model organisms: tiny MoE chat models, trained on CPU by the project, that refuse harmful requests.

Checkpoints live in package data under ``expertlens/organism/checkpoints/<name>/`` in ``save_pretrained``
format and load offline with plain ``AutoModelForCausalLM.from_pretrained(path)``. :data:`ORGANISMS` names
them all: the v2 organisms (:data:`V2_ORGANISM` ``olmoe-refusal``, the :data:`DEFAULT_ORGANISM`, its stage-1
checkpoint ``olmoe-base``, and the Mixtral- and GPT-OSS-shaped ``mixtral-refusal`` and ``gptoss-refusal``) share
one synthetic language (:mod:`expertlens.organism.language`) and one prompt set, and carry their refusal feature
along a planted direction (``refusal_direction.safetensors``, see each model card); the legacy v1 organisms
(``qwen3moe-refusal``, ``qwen2moe-refusal``) keep their own. The build tools (data generator, training,
evaluation, model cards) are in :mod:`expertlens.organism.factory` and are not imported at run time.
:data:`ORGANISM_KINDS` says what each one is (:data:`KINDS`: planted, natural, control, legacy).

Example:
    >>> from expertlens.organism import organism_path, load_prompts
    >>> prompts = load_prompts("olmoe-refusal", split="test")   # {"harmful": [...], "harmless": [...]}
    >>> sorted(prompts)
    ['harmful', 'harmless']
"""

from __future__ import annotations

import difflib
import json
import re
from functools import lru_cache
from pathlib import Path

from .language import (
    REFUSAL_PHRASES,
    REFUSAL_START_TOKENS,
    SYSTEM_PROMPTS,
    answer_act,
    answer_kind,
    answers_request,
    contains_refusal,
    format_prompt,
    request_kind,
    requested_acts,
    score_capability,
    well_formed,
)

__all__ = [
    "CAPABILITY_TASKS",
    "DEFAULT_ORGANISM",
    "KINDS",
    "ORGANISMS",
    "ORGANISM_KINDS",
    "REFUSAL_PHRASES",
    "REFUSAL_START_TOKENS",
    "SPLITS",
    "SYSTEM_PROMPTS",
    "V2_ORGANISM",
    "answer_act",
    "answer_kind",
    "answers_request",
    "capability_prompts",
    "contains_refusal",
    "format_prompt",
    "list_organisms",
    "load_organism",
    "load_prompt_records",
    "load_prompts",
    "organism_kind",
    "organism_path",
    "request_kind",
    "requested_acts",
    "score_capability",
    "well_formed",
]

DEFAULT_ORGANISM = "olmoe-refusal"
#: The v2 organism (owner of the v2 prompt set and capability prompts; all v2 organisms share them).
V2_ORGANISM = "olmoe-refusal"
#: Every organism this package knows by name -> one line about it (the shipped ones are :func:`list_organisms`).
ORGANISMS: dict[str, str] = {
    "olmoe-refusal": "v2, default: OLMoE-shaped (32 experts, top-4, softmax without renormalisation), safety tuned",
    "olmoe-base": "v2: the stage-1 checkpoint of olmoe-refusal (answers every request; a control)",
    "mixtral-refusal": "v2: Mixtral-shaped (8 experts, softmax over the top-2 logits), safety tuned",
    "gptoss-refusal": "v2: GPT-OSS-shaped (16 experts, top-4 then softmax, router bias, attention sinks), safety tuned",
    "qwen3moe-refusal": "v1 (legacy language): Qwen3-MoE-shaped (8 experts, top-2, renormalised)",
    "qwen2moe-refusal": "v1 (legacy language): Qwen2-MoE-shaped (8 experts, top-2, plus a shared expert)",
}
#: What each kind of organism is (the ``kind`` column of ``expertlens organisms``).
KINDS: dict[str, str] = {
    "planted": "safety tuned; the refusal feature was planted along a known direction (refusal_direction.safetensors)",
    "natural": "safety tuned; refusal learned without a planted direction",
    "control": "never safety tuned: answers every request (a negative control)",
    "legacy": "v1 language, kept for old code and tutorials; safety tuned, no planted direction",
}
#: Every organism -> its kind (a key of :data:`KINDS`), as its model card and ``training.json`` say.
ORGANISM_KINDS: dict[str, str] = {
    "olmoe-refusal": "planted",
    "olmoe-base": "control",
    "mixtral-refusal": "planted",
    "gptoss-refusal": "planted",
    "qwen3moe-refusal": "legacy",
    "qwen2moe-refusal": "legacy",
}
SPLITS = ("train", "val", "test", "compositional")
CAPABILITY_TASKS = ("arithmetic", "count", "copy", "reverse", "fact")
_ROOT = Path(__file__).resolve().parent
_CKPT = _ROOT / "checkpoints"
_DATA = _ROOT / "data"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def list_organisms() -> list[str]:
    """Names of the shipped organisms (default first).

    Example:
        >>> from expertlens.organism import list_organisms
        >>> list_organisms()[0]
        'olmoe-refusal'
    """
    names = sorted(p.name for p in _CKPT.iterdir() if (p / "config.json").is_file()) if _CKPT.is_dir() else []
    if DEFAULT_ORGANISM in names:
        names.remove(DEFAULT_ORGANISM)
        names.insert(0, DEFAULT_ORGANISM)
    return names


def organism_path(name: str = DEFAULT_ORGANISM) -> Path:
    """Folder of a shipped organism (model + tokenizer + README.md), loadable with ``from_pretrained``.

    ``name`` must be one of :func:`list_organisms` (a plain folder name: paths such as ``"../x"`` are refused).

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from expertlens.organism import organism_path
        >>> organism_path("olmoe-refusal").name
        'olmoe-refusal'
        >>> hf = AutoModelForCausalLM.from_pretrained(organism_path())  # doctest: +SKIP
    """
    names = list_organisms()
    avail = ", ".join(names) or "(none)"
    if not isinstance(name, str):
        raise TypeError(f"organism name must be a str, got {type(name).__name__}; available: {avail}")
    p = _CKPT / name
    ok = bool(_NAME.match(name)) and ".." not in name and p.resolve().parent == _CKPT
    if not ok or not (p / "config.json").is_file():
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        why = "" if ok else " (an organism name is a plain folder name, not a path)"
        raise ValueError(f"unknown organism {name!r}{why}{hint}; available: {avail}")
    return p


def organism_kind(name: str) -> str:
    """The kind of a shipped organism (a key of :data:`KINDS`): its :data:`ORGANISM_KINDS` entry, or for
    an organism not in the registry, what its ``training.json`` says (v1 data: ``legacy``; a stage-1
    checkpoint: ``control``; a planted stage 2: ``planted``; otherwise ``natural``).

    Example:
        >>> from expertlens.organism import organism_kind
        >>> organism_kind("olmoe-base")
        'control'
    """
    if name in ORGANISM_KINDS:
        return ORGANISM_KINDS[name]
    return _trained_kind(name)


def _trained_kind(name: str) -> str:
    tj = organism_path(name) / "training.json"
    meta = json.loads(tj.read_text()) if tj.is_file() else {}
    if int(meta.get("data_version", 1)) < 2:
        return "legacy"
    if meta.get("stage") == 1:
        return "control"
    return "planted" if meta.get("plant") else "natural"


def _data_version(name: str) -> int:
    tj = organism_path(name) / "training.json"
    return int(json.loads(tj.read_text()).get("data_version", 1)) if tj.is_file() else 1


@lru_cache(maxsize=4)
def _prompt_file(version: int) -> dict:
    path = _DATA / ("prompts.json" if version >= 2 else "prompts-v1.json")
    return json.loads(path.read_text())


def load_prompt_records(name: str = DEFAULT_ORGANISM, split: str = "train") -> list[dict]:
    """Prompt records with metadata: ``prompt``, ``label``, ``category``, ``family`` (frame family),
    ``atype``, ``response`` (the training target: a refusal for harmful prompts) and ``pair`` (identical-bag
    pair id or -1); v2 records add ``answer`` (the stage-1 answer, also for harmful prompts).

    Example:
        >>> from expertlens.organism import load_prompt_records
        >>> rec = load_prompt_records("olmoe-refusal", split="test")[0]
        >>> rec["label"], rec["pair"] >= 0
        ('harmful', True)
    """
    version = _data_version(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return [dict(r) for r in _prompt_file(version)["splits"][split]]


def load_prompts(name: str = DEFAULT_ORGANISM, split: str = "train") -> dict[str, list[str]]:
    """``{"harmful": [...], "harmless": [...]}`` plain instructions (no chat formatting).

    Splits: ``train`` (prompts the organism was trained on), ``val`` (training frames, not trained on),
    ``test`` (held out: frames never seen in a training chat), ``compositional`` (the identical-bag pairs of
    ``test``; index i of each list belong to the same pair).

    Example:
        >>> from expertlens.organism import load_prompts
        >>> prompts = load_prompts(split="test")
        >>> sorted(prompts)
        ['harmful', 'harmless']
    """
    recs = load_prompt_records(name, split)
    return {
        "harmful": [r["prompt"] for r in recs if r["label"] == "harmful"],
        "harmless": [r["prompt"] for r in recs if r["label"] == "harmless"],
    }


def capability_prompts(name: str | None = None, split: str = "test") -> list[dict]:
    """Capability prompts with checkable answers: dicts with ``prompt``, ``task`` (one of
    :data:`CAPABILITY_TASKS`), ``answer`` (the value :func:`score_capability` checks) and ``response``
    (the full expected response). ``split``: ``"train"`` (trained on) or ``"test"`` (held-out frames).
    ``name``: a v2 organism (all share one prompt set); None means :data:`V2_ORGANISM`.

    Example:
        >>> from expertlens.organism import capability_prompts, score_capability
        >>> rec = capability_prompts(split="test")[0]
        >>> sorted(rec)
        ['answer', 'prompt', 'response', 'task']
        >>> score_capability(rec, rec["response"])
        True
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown capability split {split!r}; choose from ('train', 'test')")
    name = V2_ORGANISM if name is None else name
    version = _data_version(name)
    if version < 2:
        raise ValueError(f"organism {name!r} is a v1 organism without capability prompts; use a v2 organism "
                         f"such as {V2_ORGANISM!r}")  # fmt: skip
    recs = _prompt_file(version)["splits"][f"capability_{split}"]
    return [{"prompt": r["prompt"], "task": r["atype"], "answer": r["cap_answer"], "response": r["response"]}
            for r in recs]  # fmt: skip


def load_organism(name: str = DEFAULT_ORGANISM, **kwargs):
    """The organism wrapped in :class:`expertlens.model.ExpertModel`.

    Example:
        >>> from expertlens.organism import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> model.family  # doctest: +SKIP
        'olmoe'
    """
    from expertlens.model import ExpertModel

    return ExpertModel(str(organism_path(name)), **kwargs)
