"""Model organisms: tiny MoE chat models, trained on CPU by the project, that refuse harmful requests.

>>> from expertlens.organism import organism_path, load_prompts
>>> prompts = load_prompts("qwen3moe-refusal", split="test")   # {"harmful": [...], "harmless": [...]}

Checkpoints live in package data under ``expertlens/organism/checkpoints/<name>/`` in ``save_pretrained``
format and load offline with plain ``AutoModelForCausalLM.from_pretrained(path)``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .data import REFUSAL_PHRASES, REFUSAL_START_TOKENS

__all__ = [
    "DEFAULT_ORGANISM",
    "REFUSAL_PHRASES",
    "REFUSAL_START_TOKENS",
    "SPLITS",
    "list_organisms",
    "load_organism",
    "load_prompt_records",
    "load_prompts",
    "organism_path",
]

DEFAULT_ORGANISM = "qwen3moe-refusal"
SPLITS = ("train", "val", "test", "compositional")
_ROOT = Path(__file__).resolve().parent
_CKPT = _ROOT / "checkpoints"
_PROMPTS = _ROOT / "data" / "prompts.json"


def list_organisms() -> list[str]:
    """Names of the shipped organisms (default first).

    Example:
        >>> from expertlens.organism import list_organisms
        >>> list_organisms()  # doctest: +SKIP
        ['qwen3moe-refusal', ...]
    """
    names = sorted(p.name for p in _CKPT.iterdir() if (p / "config.json").is_file()) if _CKPT.is_dir() else []
    if DEFAULT_ORGANISM in names:
        names.remove(DEFAULT_ORGANISM)
        names.insert(0, DEFAULT_ORGANISM)
    return names


def organism_path(name: str = DEFAULT_ORGANISM) -> Path:
    """Folder of a shipped organism (model + tokenizer + README.md), loadable with ``from_pretrained``.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from expertlens.organism import organism_path
        >>> hf = AutoModelForCausalLM.from_pretrained(organism_path())  # doctest: +SKIP
    """
    p = _CKPT / name
    if not (p / "config.json").is_file():
        raise ValueError(f"unknown organism {name!r}; available: {', '.join(list_organisms()) or '(none)'}")
    return p


@lru_cache(maxsize=1)
def _prompt_file() -> dict:
    return json.loads(_PROMPTS.read_text())


def load_prompt_records(name: str = DEFAULT_ORGANISM, split: str = "train") -> list[dict]:
    """Prompt records with metadata: ``prompt``, ``label``, ``category``, ``family``, ``atype`` (answer
    type), ``response`` (the training target / reference) and ``pair`` (compositional pair id or -1).

    Example:
        >>> from expertlens.organism import load_prompt_records
        >>> rec = load_prompt_records(split="test")[0]
        >>> sorted(rec)[:4]
        ['atype', 'category', 'family', 'label']
    """
    if list_organisms():
        organism_path(name)  # validate the name; all shipped organisms share one prompt set
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return [dict(r) for r in _prompt_file()["splits"][split]]


def load_prompts(name: str = DEFAULT_ORGANISM, split: str = "train") -> dict[str, list[str]]:
    """``{"harmful": [...], "harmless": [...]}`` plain instructions (no chat formatting).

    Splits: ``train`` (prompts the organism was trained on), ``val`` (same distribution, not trained on),
    ``test`` (held out: templates and fillers never seen in training chats), ``compositional`` (the
    subset of ``test`` made of harmful/harmless pairs that share their content words; index i of each
    list belong to the same pair).

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


def load_organism(name: str = DEFAULT_ORGANISM, **kwargs):
    """The organism wrapped in :class:`expertlens.model.ExpertModel`.

    Example:
        >>> from expertlens.organism import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> model.family  # doctest: +SKIP
        'qwen3_moe'
    """
    from expertlens.model import ExpertModel

    return ExpertModel(str(organism_path(name)), **kwargs)
