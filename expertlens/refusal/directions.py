"""Difference-in-means refusal directions (Arditi et al. 2024) over layers × positions.

Example:
    >>> from expertlens import ExpertModel
    >>> from expertlens.testing import tiny_model, tiny_tokenizer
    >>> from expertlens.refusal.directions import candidate_directions
    >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
    >>> candidate_directions(model, ["U:hurt\\nA:"], ["U:help\\nA:"], positions=[-1]).shape
    torch.Size([1, 2, 64])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import nnsight
import torch
from jaxtyping import Float
from torch import Tensor

from ..interventions.base import Intervention
from ..prompts import batches as iter_batches
from .progress import progress

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["mean_activations", "candidate_directions", "iter_batches"]


def _check_positions(positions: Sequence[int]) -> list[int]:
    positions = [int(p) for p in positions]
    if not positions or any(p >= 0 for p in positions):
        raise ValueError(f"positions are counted from the end of the prompt and must be negative, got {positions}")
    return positions


def mean_activations(
    model: ExpertModel,
    prompts: Sequence[str],
    positions: Sequence[int] = (-5, -4, -3, -2, -1),
    layers: Sequence[int] | None = None,
    point: str = "resid_pre",
    batch_size: int = 32,
    interventions: Sequence[Intervention] = (),
    desc: str | None = None,
) -> Float[Tensor, "pos layer d_model"]:
    """Mean of a residual point over prompts at the last-n prompt positions, in float64.

    Prompts are left-padded, so position ``-1`` is every prompt's last token; a prompt shorter
    than ``|position|`` contributes nothing at that position (pads are masked out).

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> from expertlens.refusal import format_chat, mean_activations
        >>> prompts = format_chat(model.tokenizer, ["how do i bake bread ?"])  # doctest: +SKIP
        >>> mean_activations(model, prompts).shape  # [positions, layers, d_model]  # doctest: +SKIP
    """
    if not prompts:
        raise ValueError("mean_activations: the prompt list is empty")
    if point not in ("resid_pre", "resid_mid", "resid_post"):
        raise ValueError(f"point must be a residual point (resid_pre/resid_mid/resid_post), got {point!r}")
    positions = _check_positions(positions)
    layers = list(range(model.n_layers)) if layers is None else [int(layer) for layer in layers]
    total = torch.zeros(len(positions), len(layers), model.d_model, dtype=torch.float64)
    count = torch.zeros(len(positions), 1, 1, dtype=torch.float64)
    with model.intervene(*interventions):
        for batch in progress(list(iter_batches(prompts, batch_size)), desc=desc):
            enc = model.tokenize(batch)
            mask = enc["attention_mask"][:, positions].double()  # [b, P]
            with torch.no_grad(), model.trace(enc["input_ids"], attention_mask=enc["attention_mask"]):
                acts = nnsight.save(
                    torch.stack([getattr(model.layers[i], point)[:, positions] for i in layers], dim=2)
                )  # [b, P, L, d]
            # summed where the activations are, read back once at the end (not two copies per batch)
            total, count = total.to(acts.device), count.to(acts.device)
            acts = acts.double() * mask.to(acts.device)[..., None, None]
            total += acts.sum(0)
            count += mask.to(acts.device).sum(0)[:, None, None]
    return (total / count.clamp_min(1)).cpu()


def candidate_directions(
    model: ExpertModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    positions: Sequence[int] = (-5, -4, -3, -2, -1),
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    interventions: Sequence[Intervention] = (),
) -> Float[Tensor, "pos layer d_model"]:
    """``r[p, l] = mean_harmful(resid_pre[l][p]) − mean_harmless(resid_pre[l][p])`` (float64, unnormalised).

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> from expertlens.refusal import RefusalData, candidate_directions, format_chat
        >>> data = RefusalData.from_organism(n_train=32)
        >>> harmful = format_chat(model.tokenizer, data.harmful_train)  # doctest: +SKIP
        >>> harmless = format_chat(model.tokenizer, data.harmless_train)  # doctest: +SKIP
        >>> r = candidate_directions(model, harmful, harmless)  # [5, n_layers, d_model]  # doctest: +SKIP
    """
    mu = mean_activations(
        model,
        harmful,
        positions,
        layers,
        batch_size=batch_size,
        interventions=interventions,
        desc="directions: harmful",
    )
    nu = mean_activations(
        model,
        harmless,
        positions,
        layers,
        batch_size=batch_size,
        interventions=interventions,
        desc="directions: harmless",
    )
    return mu - nu
