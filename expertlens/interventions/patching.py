"""Activation patching: cache points from one run, write them into another."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..edits import ActivationCache, record_run
from ..points import MODEL_POINTS
from .activation import point_layers
from .base import Intervention
from .selectors import LayerSpec, Positions, apply_masked, point_shape, rows_mask, token_selection

if TYPE_CHECKING:
    from ..edits import EditContext
    from ..model import EditHandle, ExpertModel

__all__ = ["Patch", "cache_points", "run_with_cache", "ActivationCache"]


def _wanted(model: ExpertModel, points: Sequence[str] | str, layers: LayerSpec, what: str) -> list:
    points = [points] if isinstance(points, str) else list(points)
    wanted = []
    for point in points:
        lays = point_layers(model, point, None if point in MODEL_POINTS else layers, what)
        wanted += [(point, lay) for lay in lays]
    return wanted


def run_with_cache(
    model: ExpertModel,
    prompts: str | list[str],
    points: Sequence[str] | str = ("resid_pre", "attn.output", "mlp.output", "resid_post"),
    layers: LayerSpec = None,
    interventions: Sequence[Intervention] = (),
) -> tuple[Float[Tensor, "batch pos vocab"], ActivationCache]:
    """One forward of ``prompts`` (left-padded batch): ``(logits, cache)``, TransformerLens's spelling.

    ``cache`` is an :class:`ActivationCache` keyed ``(point, layer)``; ``points`` are point names
    (``"moe.router_logits"``, ``"attn.z"``, ...), at every layer that has them unless ``layers`` says.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> logits, cache = run_with_cache(model, "hello", points=["moe.router_logits"])
        >>> logits.shape, cache.stack("moe.router_logits").shape
        (torch.Size([1, 5, 256]), torch.Size([2, 1, 5, 8]))
    """
    return record_run(model, prompts, _wanted(model, points, layers, "run_with_cache"), interventions)


def cache_points(
    model: ExpertModel,
    prompts: str | list[str],
    points: Sequence[str] = ("resid_pre",),
    layers: LayerSpec = None,
    interventions: Sequence[Intervention] = (),
) -> ActivationCache:
    """Run ``prompts`` once (left-padded batch) and return ``{(point, layer): value}`` for patching.

    Values are ``[b, p, ...]`` clones (model-level points have layer ``None``), in an
    :class:`ActivationCache` (a dict that also keeps the run's ``attention_mask``).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> cache = cache_points(model, ["hello", "hi"], points=["resid_pre", "moe.output"], layers=1)
        >>> sorted(cache)
        [('moe.output', 1), ('resid_pre', 1)]
    """
    return run_with_cache(model, prompts, points, layers, interventions)[1]


@dataclass(frozen=True, eq=False, repr=False)
class Patch(Intervention):
    """Activation patching: ``x ← x_source`` at a point on selected layers / positions / rows.

    ``source`` is a dict from :func:`cache_points` (keys ``(point, layer)``) or, for one layer,
    a ``[b, p, ...]`` tensor. Row ``i`` of the run takes row ``i`` of the source.

    ``positions_relative_to`` says how positions line up:

    * ``"batch"`` (default): absolute padded positions, so the patched run must use prompts tokenized to
      the same padded length (position ``j`` of the run takes position ``j`` of the source).
    * ``"prompt"``: each prompt's own tokens, counted from its first real token (left padding skipped on
      both sides), so clean and corrupted prompts may differ in length and padding: token ``j`` of run
      row ``i`` takes token ``j`` of source row ``i``; ``positions=[0, 2]`` are each prompt's tokens 0 and 2
      (negative: from its end). Tokens the source row does not have, and the run's padding, are left
      alone. The source's padding is read from the cache's ``attention_mask`` (a plain tensor source is
      taken as unpadded).

    In generation, positions beyond the source are left alone. Shape mismatches are errors naming
    both shapes.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.interventions import Patch, cache_points
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> clean = cache_points(model, ["abcd"], points=["resid_pre"], layers=1)
        >>> with model.intervene(Patch("resid_pre", clean, layers=1)), model.trace("abce"):
        ...     x = model.layers[1].resid_pre.save()
        >>> clean = cache_points(model, ["abcd", "ab"], points=["resid_pre"], layers=1)
        >>> own = Patch("resid_pre", clean, layers=1, positions=[0], positions_relative_to="prompt")
        >>> with model.intervene(own), model.trace(["xbcd", "xbc"]):  # each prompt's first token
        ...     y = model.layers[1].resid_pre.save()
        >>> bool((y[1, 1] == clean["resid_pre", 1][1, 2]).all())  # row 1: one pad here, two in the source
        True
    """

    point: str
    source: dict[tuple[str, int | None], Tensor] | Float[Tensor, "batch pos ..."]
    layers: LayerSpec = None
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None
    positions_relative_to: Literal["batch", "prompt"] = "batch"

    def _sources(self, model: ExpertModel) -> dict[int | None, Tensor]:
        layers = self.layers
        if isinstance(self.source, dict) and layers is None and self.point not in MODEL_POINTS:
            layers = sorted(k[1] for k in self.source if k[0] == self.point)
            if not layers:
                raise ValueError(
                    f"Patch: the source has no entry for point {self.point!r}; keys are "
                    f"{sorted(self.source, key=str)}"
                )
        out = {}
        for layer in point_layers(model, self.point, layers, "Patch"):
            if isinstance(self.source, dict):
                if (self.point, layer) not in self.source:
                    raise ValueError(
                        f"Patch: the source has no ({self.point!r}, {layer}) entry; keys are "
                        f"{sorted(self.source, key=str)}"
                    )
                src = self.source[(self.point, layer)]
            elif isinstance(self.source, Tensor):
                src = self.source
            else:
                raise TypeError("Patch: source must be a dict from cache_points or a [b, p, ...] tensor")
            shape = point_shape(model, self.point, layer)
            if src.dim() != 2 + len(shape) or tuple(src.shape[2:]) != shape:
                raise ValueError(
                    f"Patch: source for {self.point!r} layer {layer} has shape {tuple(src.shape)}; accepted "
                    f"is [batch, pos, {', '.join(map(str, shape))}]"
                )
            if src.is_floating_point() and not bool(torch.isfinite(src).all()):
                bad = int((~torch.isfinite(src)).sum())
                raise ValueError(
                    f"Patch: source for {self.point!r} layer {layer} contains {bad} NaN/inf value(s); only finite "
                    "sources are accepted (was the source run itself broken?)"
                )
            out[layer] = src.detach().to(model.device)
        return out

    def validate(self, model: ExpertModel) -> None:
        if self.positions_relative_to not in ("batch", "prompt"):
            raise ValueError(
                f"Patch: positions_relative_to={self.positions_relative_to!r}; accepted are 'batch' (absolute "
                "padded positions) and 'prompt' (each prompt's own tokens, padding skipped)"
            )
        Positions.coerce(self.positions)
        self._sources(model)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        pos, rows = Positions.coerce(self.positions), self.rows
        if self.positions_relative_to == "prompt":
            return self._attach_per_prompt(model, pos, rows)
        handles = []
        for layer, src in self._sources(model).items():

            def edit(x, ctx, src=src, layer=layer):
                b, p = x.shape[:2]
                if src.shape[0] != b or (ctx.step == 0 and src.shape[1] != p):
                    raise ValueError(
                        f"Patch at {self.point!r} layer {layer}: source shape {tuple(src.shape)} "
                        "does not match "
                        f"the run's {tuple(x.shape)}; the batch and padded length must be the same"
                    )
                absolute = ctx.positions if ctx.positions is not None else torch.arange(p)
                absolute = absolute.to(src.device)
                inside = absolute < src.shape[1]  # past the source (generated tokens): kept as they are
                gathered = src[:, absolute.clamp(max=src.shape[1] - 1)].to(x)
                sel = token_selection(pos, rows, ctx, x)
                keep = inside.unsqueeze(0).expand(b, p)
                sel = keep if sel is None else sel & keep
                return apply_masked(x, gathered, sel)

            handles.append(model.add_edit(self.point, edit, layer=layer))
        return handles

    def _attach_per_prompt(self, model: ExpertModel, pos: Positions, rows: Any) -> list[EditHandle]:
        mask = getattr(self.source, "attention_mask", None)
        handles = []
        for layer, src in self._sources(model).items():
            # source row i's real tokens start after its left padding and run to the end of the row
            src_pad = (
                torch.zeros(src.shape[0], dtype=torch.long, device=src.device)
                if mask is None else (src.shape[1] - mask.to(src.device).sum(-1)).long()
            )
            if mask is not None and tuple(mask.shape) != tuple(src.shape[:2]):
                raise ValueError(
                    f"Patch: the cache's attention_mask has shape {tuple(mask.shape)} but its ({self.point!r}, {layer})"
                    f" entry is {tuple(src.shape)}; they come from different runs"
                )

            def edit(x, ctx, src=src, src_pad=src_pad, layer=layer):
                b, p = x.shape[:2]
                if src.shape[0] != b:
                    raise ValueError(
                        f"Patch at {self.point!r} layer {layer}: source has {src.shape[0]} rows, the run {b}; "
                        "row i of the run takes row i of the source, so the batches must be the same size"
                    )
                rel, length = _prompt_positions(ctx, b, p, x.device)
                src_rel_len = (src.shape[1] - src_pad).to(x.device)
                inside = (rel >= 0) & (rel < src_rel_len.unsqueeze(1))  # a token the source row has
                at = (rel + src_pad.to(x.device).unsqueeze(1)).clamp(0, src.shape[1] - 1)
                gathered = torch.gather(
                    src.to(x), 1, at.view(b, p, *(1,) * (x.dim() - 2)).expand(b, p, *src.shape[2:])
                )
                sel = inside & _relative_selection(pos, rel, length, ctx, p, x.device)
                picked = rows_mask(rows, b, x.device)
                if picked is not None:
                    sel = sel & picked.unsqueeze(1)
                return apply_masked(x, gathered, sel)

            handles.append(model.add_edit(self.point, edit, layer=layer))
        return handles


def _prompt_positions(ctx: EditContext, b: int, p: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``([b, p] position of each token counted from its row's first real token, [b] real prompt lengths)``.

    The row's left padding is read from the attention mask over the prompt (``ctx.prompt_len`` columns);
    without a mask the rows are taken as unpadded.
    """
    absolute = (ctx.positions if ctx.positions is not None and len(ctx.positions) == p else torch.arange(p)).to(device)
    plen = ctx.prompt_len or p
    if ctx.attention_mask is not None:
        pad = (plen - ctx.attention_mask[:, :plen].to(device).sum(-1)).long()
    else:
        pad = torch.zeros(b, dtype=torch.long, device=device)
    return absolute.unsqueeze(0) - pad.unsqueeze(1), plen - pad


def _relative_selection(
    pos: Positions, rel: Int[Tensor, "batch pos"], length: Int[Tensor, " batch"], ctx: EditContext, p: int,
    device: torch.device,
) -> Bool[Tensor, "batch pos"]:
    """``pos`` over each prompt's own positions ``rel`` (index and mask selectors count from the prompt's
    first real token); the other selectors are end-aligned under left padding and mean the same either way."""
    if pos.kind == "indices":
        wanted = torch.zeros_like(rel, dtype=torch.bool)
        for i in pos.arg:
            wanted |= rel == (length + i if i < 0 else torch.full_like(length, i)).unsqueeze(1)
        return wanted
    if pos.kind == "mask":
        m = pos.arg.to(device)
        m = m.unsqueeze(0).expand(rel.shape[0], -1) if m.dim() == 1 else m
        total = m.shape[-1]
        return torch.gather(m, 1, rel.clamp(0, total - 1)) & (rel >= 0) & (rel < total)
    got = pos.select(ctx, p, device)
    if got is None:
        return torch.ones_like(rel, dtype=torch.bool)
    return got.expand_as(rel) if got.dim() == 2 else got.unsqueeze(0).expand_as(rel)
