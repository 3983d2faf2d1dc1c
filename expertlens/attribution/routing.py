"""Routing attribution: how an intervention (steering, ablation, ...) changes routing, per MoE layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..edits import record
from ..families import get_module
from ..interventions.base import Intervention
from ..prompts import batches
from ._common import as_prompts

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["RoutingChange", "routing_change"]


@dataclass
class RoutingChange:
    """Per MoE layer: how often the top-k *set* changed, and the KL between routing distributions.

    Attributes:
        layers: The MoE layers, in order.
        frac_changed: ``[n_moe_layers]`` fraction of real (non-pad) tokens whose top-k expert set
            differs with the intervention.
        kl: ``[n_moe_layers]`` mean over real tokens of ``KL(p_base || p_intervened)`` where ``p`` is
            the router's distribution over experts (``router_probs`` renormalised to sum to 1, so
            sigmoid routers such as DeepSeek-V3 are compared as distributions too).
        n_tokens: Real tokens compared.
        meta: Description of the intervention and prompts.

    Example:
        >>> import torch
        >>> rc = RoutingChange([1], torch.tensor([0.25]), torch.tensor([0.1]), 8)
        >>> rc.to_dict()["layers"][0]["frac_changed"]
        0.25
    """

    layers: list[int]
    frac_changed: Float[Tensor, " n_moe_layers"]
    kl: Float[Tensor, " n_moe_layers"]
    n_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: ``{"layers": [{"layer", "frac_changed", "kl"}, ...], "n_tokens", "meta"}``."""
        return {
            "layers": [
                {"layer": layer, "frac_changed": float(f), "kl": float(k)}
                for layer, f, k in zip(self.layers, self.frac_changed.tolist(), self.kl.tolist())
            ],
            "n_tokens": self.n_tokens,
            "meta": {k: (v if isinstance(v, (int, float, str, bool, list)) or v is None else repr(v))
                     for k, v in self.meta.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingChange:
        rows = data["layers"]
        return cls([r["layer"] for r in rows], torch.tensor([r["frac_changed"] for r in rows]),
                   torch.tensor([r["kl"] for r in rows]), int(data["n_tokens"]), dict(data.get("meta", {})))

    def top(self, n: int = 5, by: str = "kl") -> list[dict[str, Any]]:
        """The ``n`` layers with the largest change (``by="kl"`` or ``"frac_changed"``)."""
        rows = self.to_dict()["layers"]
        return sorted(rows, key=lambda r: -r[by])[:n]


def _record(model: ExpertModel, items: list[str], interventions: Sequence[Intervention], batch_size: int):
    """Per forward: the real-token mask, and each MoE layer's router logits and selected experts."""
    store: list[dict] = []
    first = model.moe_layers[0]

    def keep(key, x, ctx):
        name, layer = key
        if name == "moe.router_logits":
            if layer == first:
                mask = ctx.token_mask()
                store.append({"mask": torch.ones(x.shape[:2], dtype=torch.bool)
                              if mask is None else mask.detach().cpu().bool()})
            store[-1][("logits", layer)] = x.detach().float().cpu()
        else:
            store[-1][("idx", layer)] = x.detach().cpu()

    wanted = [(name, layer) for layer in model.moe_layers for name in ("moe.router_logits", "moe.topk_indices")]
    with torch.no_grad(), model.intervene(*interventions):
        with record(model, wanted, prefill_only=True, on_value=keep):
            for chunk in batches(items, batch_size):
                model.hf_model(**model.tokenize(chunk, position_ids=True))
    return store


def routing_change(
    model: ExpertModel,
    prompts: str | Sequence[str],
    intervention: Intervention | Sequence[Intervention],
    *,
    baseline: Sequence[Intervention] = (),
    chat: bool = False,
    batch_size: int = 16,
) -> RoutingChange:
    """Compare routing on the same prompts without and with an intervention.

    Args:
        model: An MoE model.
        prompts: Prompt(s) (``chat=True`` wraps them in the chat template).
        intervention: The intervention(s) whose routing effect to measure.
        baseline: Interventions active in both runs (e.g. another steering being compared against).
        chat: Apply the chat template.
        batch_size: Prompts per forward.

    Example:
        >>> import torch
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.attribution import ComponentAblation
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> rc = routing_change(model, ["hello", "hi there"], ComponentAblation([(0, "expert", 1)]))
        >>> float(rc.frac_changed[0])  # layer-0 routing is computed before its experts run
        0.0
        >>> [row["layer"] for row in rc.to_dict()["layers"]]
        [0, 1]
    """
    if not model.moe_layers:
        raise ValueError(f"{model.family} has no MoE layers")
    items = as_prompts(prompts, model, chat)
    extra = (intervention,) if isinstance(intervention, Intervention) else tuple(intervention)
    base = _record(model, items, tuple(baseline), batch_size)
    new = _record(model, items, (*baseline, *extra), batch_size)
    fracs, kls = [], []
    n_tokens = 0
    for layer in model.moe_layers:
        router = get_module(model.hf_model, model.layout[layer].router)
        changed, kl_sum, count = 0.0, 0.0, 0
        for a, b in zip(base, new):
            mask = a["mask"]
            ia, ib = a[("idx", layer)].sort(-1).values, b[("idx", layer)].sort(-1).values
            diff = (ia != ib).any(-1)
            pa = model.spec.rule.probs(a[("logits", layer)], router).float()
            pb = model.spec.rule.probs(b[("logits", layer)], router).float()
            pa = pa / pa.sum(-1, keepdim=True)
            pb = pb / pb.sum(-1, keepdim=True)
            kl = (pa * (pa.clamp_min(1e-12).log() - pb.clamp_min(1e-12).log())).sum(-1)
            changed += float(diff[mask].float().sum())
            kl_sum += float(kl[mask].sum())
            count += int(mask.sum())
        fracs.append(changed / max(count, 1))
        kls.append(kl_sum / max(count, 1))
        n_tokens = count
    meta = {"intervention": repr(extra), "baseline": repr(tuple(baseline)), "n_prompts": len(items),
            "family": model.family}
    return RoutingChange(list(model.moe_layers), torch.tensor(fracs), torch.tensor(kls), n_tokens, meta)
