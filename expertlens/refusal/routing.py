"""Routing statistics: how often each expert is chosen on harmful vs harmless prompts.

Example:
    >>> from expertlens import ExpertModel
    >>> from expertlens.testing import tiny_model, tiny_tokenizer
    >>> from expertlens.refusal.routing import routing_statistics
    >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
    >>> stats = routing_statistics(model, ["U:hurt him\\nA:"], ["U:hug him\\nA:"], last_n=3)
    >>> stats.freq_harmful.sum(-1).tolist()  # top-1 frequencies sum to 100% per layer
    [100.0, 100.0]
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import nnsight
import torch
from jaxtyping import Float
from torch import Tensor

from ..interventions.base import Intervention
from .directions import iter_batches
from .progress import progress

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["RoutingStats", "routing_counts", "routing_statistics"]


@dataclass
class RoutingStats:
    """Routing frequencies (percent of analysed tokens) per MoE layer × expert.

    Attributes:
        layers: MoE layer indices (rows).
        freq_harmful / freq_harmless: ``[L, E]`` percentages; each row sums to 100 (``top1``) or
            ``100·k`` (``topk``).
        delta: ``freq_harmful − freq_harmless`` in percentage points (the risk difference).

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> from expertlens.refusal import routing_statistics
        >>> stats = routing_statistics(model, harmful, harmless)  # chat-formatted prompts  # doctest: +SKIP
        >>> stats.delta.shape   # [moe layers, experts], percentage points  # doctest: +SKIP
        >>> stats.select(threshold=10.0)   # [(layer, expert, delta), ...] with |delta| >= 10 pp  # doctest: +SKIP
    """

    layers: list[int]
    count: str
    last_n: int | None
    freq_harmful: Float[Tensor, "layer expert"]
    freq_harmless: Float[Tensor, "layer expert"]
    n_tokens_harmful: int
    n_tokens_harmless: int
    delta: Float[Tensor, "layer expert"] = field(init=False)

    def __post_init__(self) -> None:
        self.delta = self.freq_harmful - self.freq_harmless

    def select(
        self,
        threshold: float | None = None,
        top_n: int | None = None,
        sign: Literal["both", "harmful", "harmless"] = "both",
    ) -> list[tuple[int, int, float]]:
        """Experts by |Δ|: all with ``|Δ| ≥ threshold`` and/or the ``top_n`` largest, as (layer, expert, Δ)."""
        rows = []
        for li, layer in enumerate(self.layers):
            for e in range(self.delta.shape[1]):
                d = float(self.delta[li, e])
                if sign == "harmful" and d <= 0 or sign == "harmless" and d >= 0:
                    continue
                rows.append((layer, e, d))
        rows.sort(key=lambda r: -abs(r[2]))
        if threshold is not None:
            rows = [r for r in rows if abs(r[2]) >= threshold]
        if top_n is not None:
            rows = rows[:top_n]
        return rows

    def below(self, threshold: float) -> list[tuple[int, int, float]]:
        """Experts with ``|Δ| < threshold`` (the random-control pool)."""
        return [r for r in self.select(sign="both") if abs(r[2]) < threshold]

    def sample_below(self, threshold: float, n: int, seed: int = 42) -> list[tuple[int, int, float]]:
        """``n`` below-threshold experts, stratified by layer (round-robin over layers), seeded."""
        rng = random.Random(seed)
        pools = {layer: [r for r in self.below(threshold) if r[0] == layer] for layer in self.layers}
        for pool in pools.values():
            rng.shuffle(pool)
        out: list[tuple[int, int, float]] = []
        while len(out) < n and any(pools.values()):
            for layer in self.layers:
                if pools[layer] and len(out) < n:
                    out.append(pools[layer].pop())
        return out

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "count": self.count,
            "last_n": self.last_n,
            "n_tokens_harmful": self.n_tokens_harmful,
            "n_tokens_harmless": self.n_tokens_harmless,
            "freq_harmful": self.freq_harmful.tolist(),
            "freq_harmless": self.freq_harmless.tolist(),
            "delta_pp": self.delta.tolist(),
        }


def routing_counts(
    model: ExpertModel,
    prompts: Sequence[str],
    last_n: int | None = 5,
    count: Literal["top1", "topk"] = "top1",
    batch_size: int = 32,
    interventions: Sequence[Intervention] = (),
) -> tuple[Tensor, int]:
    """``[L, E]`` selection counts over the analysed tokens, and the number of tokens analysed.

    ``top1`` counts the expert with the largest routing weight, ``topk`` every selected expert.
    Pad tokens are never counted; ``last_n=None`` analyses every real prompt token.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.refusal.routing import routing_counts
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> counts, n_tokens = routing_counts(model, ["hello there"], last_n=3)
        >>> counts.shape, n_tokens
        (torch.Size([2, 8]), 3)
    """
    if not prompts:
        raise ValueError("routing statistics need at least one prompt")
    if count not in ("top1", "topk"):
        raise ValueError(f"count must be 'top1' or 'topk', got {count!r}")
    if not model.moe_layers:
        raise ValueError(f"{model.family} model has no MoE layers: no routing statistics")
    # Counted where the model runs and read back once at the end: a read per MoE layer per batch (as .cpu()
    # calls, boolean masks and bincount make) would stall an accelerator after every batch.
    n_layers, n_experts = len(model.moe_layers), model.n_experts
    counts = torch.zeros(n_layers * n_experts, dtype=torch.long, device=model.device)
    n_tokens = torch.zeros((), dtype=torch.long, device=model.device)
    offsets = torch.arange(n_layers, device=model.device).view(n_layers, 1, 1, 1) * n_experts
    with model.intervene(*interventions):
        for batch in progress(list(iter_batches(prompts, batch_size)), desc="routing statistics"):
            enc = model.tokenize(batch)
            mask = enc["attention_mask"].bool()
            if last_n is not None:
                keep = torch.zeros_like(mask)
                keep[:, -last_n:] = True
                mask = mask & keep
            with torch.no_grad(), model.trace(enc["input_ids"], attention_mask=enc["attention_mask"]):
                rows = nnsight.save(
                    [(model.layers[i].moe.topk_indices, model.layers[i].moe.topk_weights) for i in model.moe_layers]
                )
            dev = counts.device  # a model split over devices gives each layer's ids where that layer ran
            idx = torch.stack([i.to(dev) for i, _ in rows])  # [L, b, p, k]
            if count == "top1":
                w = torch.stack([w.to(dev, torch.float32) for _, w in rows])
                idx = idx.gather(-1, w.argmax(-1, keepdim=True))  # [L, b, p, 1]
            mask = mask.to(dev)
            n_tokens += mask.sum()
            # pad (and not analysed) tokens add 0: a sized selection would need the host to know how many
            weight = mask.view(1, *mask.shape, 1).expand(idx.shape).long()
            counts.scatter_add_(0, (idx + offsets).reshape(-1), weight.reshape(-1))
    counts_cpu, n = torch.cat([counts, n_tokens.view(1)]).cpu().split([n_layers * n_experts, 1])
    return counts_cpu.view(n_layers, n_experts).double(), int(n)


def routing_statistics(
    model: ExpertModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    last_n: int | None = 5,
    count: Literal["top1", "topk"] = "top1",
    batch_size: int = 32,
    interventions: Sequence[Intervention] = (),
) -> RoutingStats:
    """Routing frequencies on harmful vs harmless prompts and their risk difference Δ (pp).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.refusal import routing_statistics
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> stats = routing_statistics(model, ["how do i hurt"], ["how do i help"], last_n=3)
        >>> stats.freq_harmful.sum(-1)   # top-1 counts: each layer sums to 100 %
        tensor([100., 100.])
    """
    ch, nh = routing_counts(model, harmful, last_n, count, batch_size, interventions)
    cl, nl = routing_counts(model, harmless, last_n, count, batch_size, interventions)
    return RoutingStats(
        list(model.moe_layers),
        count,
        last_n,
        (100 * ch / max(nh, 1)).float(),
        (100 * cl / max(nl, 1)).float(),
        nh,
        nl,
    )
