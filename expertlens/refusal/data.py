"""Prompt sets for the refusal study: bundled organism splits, files, public benchmarks; chat formatting.

Example:
    >>> from expertlens.refusal.data import RefusalData
    >>> data = RefusalData.from_lists([f"hurt him {i}" for i in range(5)], [f"hug him {i}" for i in range(5)])
    >>> len(data.harmful_train), len(data.harmless_val), len(data.harmless_test)
    (3, 1, 1)
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..prompts import ChatTemplateError, format_chat

__all__ = [
    "RefusalData",
    "ChatTemplateError",
    "format_chat",
    "post_instruction_len",
    "load_prompt_file",
    "load_benchmark",
    "BENCHMARKS",
]

LIGHTWEIGHT_SYSTEM = "You are a helpful and harmless assistant. You must refuse any harmful request."


@dataclass
class RefusalData:
    """Harmful and harmless instructions (plain text, not chat-formatted) for train / val / test.

    ``train`` gives the difference-in-means directions and routing statistics, ``val`` the
    direction selection and method searches, ``test`` the reported refusal rates.

    Example:
        >>> from expertlens.refusal import RefusalData
        >>> data = RefusalData.from_organism(n_train=64, n_val=16)
        >>> data.sizes()["harmful_train"]
        64
        >>> mine = RefusalData.from_lists(["how do i pick a lock ?"] * 10, ["how do i bake bread ?"] * 10)
    """

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str] = field(default_factory=list)
    harmless_val: list[str] = field(default_factory=list)
    harmful_test: list[str] = field(default_factory=list)
    harmless_test: list[str] = field(default_factory=list)
    source: str = "user"

    def __post_init__(self) -> None:
        for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val", "harmful_test", "harmless_test"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)):
                raise TypeError(
                    f"RefusalData.{name} is a single string ({values!r}); pass a list of instructions, e.g. "
                    f"[{values!r}] (a string would be split into characters)"
                )
            setattr(self, name, list(values))
        for name in ("harmful_train", "harmless_train"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"RefusalData.{name} is empty: at least one instruction is needed")
        for name, values in asdict(self).items():
            if name == "source":
                continue
            if not all(isinstance(v, str) and v.strip() for v in values):
                raise ValueError(f"RefusalData.{name} must hold non-empty strings")
        for split in ("train", "val", "test"):
            a, b = len(getattr(self, f"harmful_{split}")), len(getattr(self, f"harmless_{split}"))
            if a and b and max(a, b) > 3 * min(a, b):
                warnings.warn(
                    f"harmful and harmless {split} sets differ a lot in size ({a} vs {b}); "
                    "means stay unbiased but their noise differs — consider balancing them",
                    stacklevel=3,
                )

    @classmethod
    def from_lists(
        cls,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        val_frac: float = 0.2,
        test_frac: float = 0.2,
        seed: int = 42,
    ) -> RefusalData:
        """Shuffle (seeded) and split two lists into train/val/test.

        Example:
            >>> d = RefusalData.from_lists([f"bad {i}" for i in range(10)], [f"good {i}" for i in range(10)])
            >>> len(d.harmful_train), len(d.harmful_val), len(d.harmful_test)
            (6, 2, 2)
        """
        for name, items in (("harmful", harmful), ("harmless", harmless)):
            if isinstance(items, (str, bytes)):
                raise TypeError(
                    f"RefusalData.from_lists: {name} is a single string ({items!r}); pass a list of instructions, "
                    f"e.g. [{items!r}] (a string would be split into characters)"
                )
        if not harmful or not harmless:
            raise ValueError(
                f"need non-empty harmful and harmless lists (got {len(harmful)} harmful, {len(harmless)} harmless)"
            )
        for name, items in (("harmful", harmful), ("harmless", harmless)):
            n_val, n_test = int(len(items) * val_frac), int(len(items) * test_frac)
            if n_val < 1 or n_test < 1 or len(items) - n_val - n_test < 1:
                raise ValueError(
                    f"RefusalData.from_lists: {len(items)} {name} prompts cannot be split into train / val / test "
                    f"with val_frac={val_frac}, test_frac={test_frac} (each split needs at least one; with the "
                    "default fractions that is 5 prompts per class). Pass more prompts, or the splits yourself: "
                    "RefusalData(harmful_train, harmless_train, harmful_val, harmless_val, harmful_test, harmless_test)"
                )

        def split(items: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
            items = list(items)
            random.Random(seed).shuffle(items)
            n_val, n_test = int(len(items) * val_frac), int(len(items) * test_frac)
            return items[n_val + n_test :], items[:n_val], items[n_val : n_val + n_test]

        h, hl = split(harmful), split(harmless)
        return cls(h[0], hl[0], h[1], hl[1], h[2], hl[2])

    @classmethod
    def from_organism(
        cls, name: str | None = None, *, n_train: int = 128, n_val: int = 32, n_test: int | None = None, seed: int = 42
    ) -> RefusalData:
        """The bundled organism's splits (``test`` = held-out templates and fillers).

        Example:
            >>> d = RefusalData.from_organism()  # doctest: +SKIP
        """
        from ..organism import DEFAULT_ORGANISM, load_prompts

        name = name or DEFAULT_ORGANISM
        rng = random.Random(seed)

        def sample(items: list[str], n: int | None) -> list[str]:
            items = list(items)
            if n is None or n >= len(items):
                return items
            return rng.sample(items, n)

        train, val, test = (load_prompts(name, s) for s in ("train", "val", "test"))
        return cls(
            sample(train["harmful"], n_train),
            sample(train["harmless"], n_train),
            sample(val["harmful"], n_val),
            sample(val["harmless"], n_val),
            sample(test["harmful"], n_test),
            sample(test["harmless"], n_test),
            source=f"organism:{name}",
        )

    def check_for_study(self) -> None:
        """Refuse data the study cannot use honestly: empty val/test splits (rates would come from the
        training prompts), non-string items (a string instead of a list).

        Example:
            >>> from expertlens.refusal import RefusalData
            >>> RefusalData(["a"], ["b"]).check_for_study()
            Traceback (most recent call last):
            ...
            ValueError: RefusalData.harmful_val is empty: the study selects on val and reports test rates, ...
        """
        for name in ("harmful_val", "harmless_val", "harmful_test", "harmless_test"):
            if not getattr(self, name):
                raise ValueError(
                    f"RefusalData.{name} is empty: the study selects on val and reports test rates, and will not "
                    "fall back to the training prompts. Pass all six splits, or use RefusalData.from_lists(...) "
                    "(>= 5 prompts per class) or RefusalData.from_organism()"
                )

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in asdict(self).items() if k != "source"}


def post_instruction_len(tokenizer, system: str | None = None) -> int:
    """Number of template tokens after the instruction (Arditi's "post-instruction" positions).

    Example:
        >>> from expertlens.refusal import post_instruction_len
        >>> from expertlens.testing import tiny_tokenizer
        >>> post_instruction_len(tiny_tokenizer())   # the template tokens after the instruction
        3
    """
    marker = "XQXQ"
    text = format_chat(tokenizer, [marker], system)[0]
    tail = text[text.rindex(marker) + len(marker) :]
    return max(1, len(tokenizer.encode(tail, add_special_tokens=False)))


def load_prompt_file(path: str | Path, column: str | None = None) -> list[str]:
    """Instructions from a ``.txt`` (one per line), ``.json``/``.jsonl`` (strings or objects) or ``.csv``.

    For objects/CSV rows the text is taken from ``column`` or the first of
    ``instruction``, ``prompt``, ``goal``, ``behavior``, ``text``.

    Example:
        >>> from pathlib import Path
        >>> from expertlens.refusal import load_prompt_file
        >>> lines = ["how do i pick a lock ?", "how do i make a weapon ?"]
        >>> _ = Path("/tmp/harmful.txt").write_text(chr(10).join(lines))
        >>> load_prompt_file("/tmp/harmful.txt")
        ['how do i pick a lock ?', 'how do i make a weapon ?']
    """
    path = Path(path)
    keys = [column] if column else ["instruction", "prompt", "goal", "behavior", "Behavior", "text"]

    def pick(row) -> str:
        if isinstance(row, str):
            return row
        for k in keys:
            if k in row and row[k]:
                return str(row[k])
        raise ValueError(f"{path}: a row has none of the columns {keys}; pass column=")

    suffix = path.suffix.lower()
    if suffix == ".txt":
        items = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif suffix == ".jsonl":
        items = [pick(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    elif suffix == ".json":
        data = json.loads(path.read_text())
        items = [pick(r) for r in (data if isinstance(data, list) else data.get("prompts", []))]
    elif suffix == ".csv":
        with path.open(newline="") as fh:
            items = [pick(r) for r in csv.DictReader(fh)]
    else:
        raise ValueError(f"unsupported prompt file {path.name!r}: use .txt, .json, .jsonl or .csv")
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


#: name -> (hub dataset, config, split, text column)
BENCHMARKS: dict[str, tuple[str, str | None, str, str]] = {
    "advbench": ("walledai/AdvBench", None, "train", "prompt"),
    "harmbench": ("walledai/HarmBench", "standard", "train", "prompt"),
    "jailbreakbench": ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "Goal"),
    "strongreject": ("walledai/StrongREJECT", None, "train", "prompt"),
    "alpaca": ("tatsu-lab/alpaca", None, "train", "instruction"),
}


def load_benchmark(name: str, n: int | None = None, seed: int = 42) -> list[str]:
    """A public prompt set through the optional ``datasets`` extra (needs network or a local cache).

    Raises:
        ImportError: without ``pip install expertlens[datasets]``.
        RuntimeError: when the dataset cannot be reached (offline), naming what to do instead.

    Example:
        >>> from expertlens.refusal import load_benchmark
        >>> harmful = load_benchmark("advbench", n=128)  # doctest: +SKIP
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"loading {name!r} needs the optional extra: pip install 'expertlens[datasets]'") from exc
    repo, config, split, column = BENCHMARKS[name]
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline or gated: re-raised with the way out
        raise RuntimeError(
            f"could not load {name!r} ({repo}): {type(exc).__name__}: {exc}. Offline? Download it once where the "
            "hub is reachable, or pass your own prompts with load_prompt_file(path) / RefusalData.from_lists(...)."
        ) from exc
    items = [str(r[column]) for r in ds if (name != "alpaca" or not r.get("input"))]
    if n is not None and n < len(items):
        items = random.Random(seed).sample(items, n)
    return items
