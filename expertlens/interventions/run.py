"""Batch helpers that run a model under interventions: logits and greedy generation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..prompts import batches
from .base import Intervention

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["run_logits", "generate"]


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a list of strings")
    return prompts


def run_logits(
    model: ExpertModel,
    prompts: str | Sequence[str],
    interventions: Sequence[Intervention] | Intervention = (),
    batch_size: int = 8,
    *,
    last_only: bool = True,
) -> Float[Tensor, "n vocab"] | list[Float[Tensor, "pos vocab"]]:
    """Logits of ``prompts`` (left-padded batches) with ``interventions`` attached.

    Returns the last-position logits ``[n, vocab]`` (``last_only=True``), or a list with each
    prompt's ``[len_i, vocab]`` logits over its real tokens.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.interventions import ZeroAblate, run_logits
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> run_logits(model, ["hi", "hello"], [ZeroAblate("moe.output", layers=0)]).shape
        torch.Size([2, 256])
    """
    chunks = list(batches(_as_list(prompts), batch_size))
    if isinstance(interventions, Intervention):
        interventions = (interventions,)
    out: list[Tensor] = []
    with model.intervene(*interventions), torch.no_grad():
        for chunk in chunks:
            enc = model.tokenize(chunk, position_ids=True)
            logits = model.hf_model(**enc, use_cache=False).logits
            if last_only:
                out.append(logits[:, -1])
            else:
                mask = enc["attention_mask"].bool()
                out.extend(logits[j][mask[j]] for j in range(logits.shape[0]))
    return torch.cat(out) if last_only else out


def generate(
    model: ExpertModel,
    prompts: str | Sequence[str],
    max_new_tokens: int,
    interventions: Sequence[Intervention] | Intervention = (),
    batch_size: int = 8,
    *,
    return_ids: bool = False,
) -> list[str] | list[Tensor]:
    """Greedy generation with ``interventions`` applied at every step (left padding, KV cache on).

    Returns the generated continuations (special tokens skipped), or with ``return_ids`` the
    generated token ids of each prompt (up to and including EOS).

    Example:
        >>> import torch
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.interventions import AddVector, generate
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> outs = generate(model, ["hi", "hello"], 4, [AddVector("resid_pre", torch.ones(64), layers=1)])
        >>> len(outs)
        2
    """
    chunks = list(batches(_as_list(prompts), batch_size))
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(interventions, Intervention):
        interventions = (interventions,)
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    results: list = []
    from ..instrument import plain_calls

    with model.intervene(*interventions), torch.no_grad(), plain_calls(model.hf_model):
        for chunk in chunks:
            enc = model.tokenize(chunk)
            ids = model.hf_model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            # One host read per batch (each row's length, or its tokens to decode), not one per row.
            if not return_ids:
                results.extend(tok.decode(row, skip_special_tokens=True) for row in new.tolist())
                continue
            eos = tok.eos_token_id
            if eos is None:
                results.extend(new.unbind(0))
                continue
            hit = new == eos
            ends = torch.where(hit.any(1), hit.int().argmax(1) + 1, new.shape[1]).tolist()  # up to the first EOS
            results.extend(row[:end] for row, end in zip(new.unbind(0), ends, strict=True))
    return results
