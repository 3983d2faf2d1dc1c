"""Prompt handling shared by every layer: batching and chat formatting (one of each)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

__all__ = ["batches", "format_chat", "ChatTemplateError"]

T = TypeVar("T")


def batches(items: Sequence[T], batch_size: int) -> Iterator[list[T]]:
    """Consecutive slices of ``items`` of at most ``batch_size`` elements.

    Raises:
        ValueError: if ``batch_size`` is not a positive int.

    Example:
        >>> from expertlens.prompts import batches
        >>> [b for b in batches(["a", "b", "c"], 2)]
        [['a', 'b'], ['c']]
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for i in range(0, len(items), batch_size):
        yield list(items[i : i + batch_size])


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template.

    Example:
        >>> from expertlens.refusal import ChatTemplateError, format_chat
        >>> from expertlens.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> tok.chat_template = None
        >>> try:
        ...     format_chat(tok, ["hi"])
        ... except ChatTemplateError:
        ...     print("no chat template")
        no chat template
    """


def format_chat(tokenizer: Any, instructions: Sequence[str], system: str | None = None) -> list[str]:
    """Instructions as chat prompts ending with the assistant turn header (``add_generation_prompt``).

    Raises:
        ChatTemplateError: if the tokenizer has no chat template, saying how to pass one.

    Example:
        >>> from expertlens.testing import tiny_tokenizer
        >>> format_chat(tiny_tokenizer(), ["hi"])
        ['U:hi\\nA:']
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{type(tokenizer).__name__} has no chat template, so prompts cannot be formatted as chats. Set one "
            "(`tokenizer.chat_template = '<jinja template>'`, e.g. copied from the model's instruct version) or "
            "pass a tokenizer that has one: ExpertModel(model, tokenizer=...)."
        )
    out = []
    for text in instructions:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out
