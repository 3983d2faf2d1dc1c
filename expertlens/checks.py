"""Checks run when a model is wrapped (``validate=True``) and reused by the tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import nnsight
import torch

if TYPE_CHECKING:
    from .model import ExpertModel

__all__ = ["ValidationError", "check_model", "capture_moe"]


class ValidationError(RuntimeError):
    """A wrapped model whose points do not reproduce its own computation.

    Example:
        >>> from expertlens.checks import ValidationError
        >>> issubclass(ValidationError, Exception)
        True
    """


def capture_moe(model: ExpertModel, input_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Every MoE point of every MoE layer on ``input_ids`` (one trace).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())
        >>> import torch
        >>> from expertlens.checks import capture_moe
        >>> rows = capture_moe(model, torch.tensor([[5, 6, 7]]))
        >>> sorted(rows[0])[:3]
        ['expert_out', 'output', 'router_logits']
    """
    rows = []
    with torch.no_grad(), model.trace(input_ids):
        for i in model.moe_layers:
            moe = model.layers[i].moe
            row = {
                "router_logits": moe.router_logits,
                "router_probs": moe.router_probs,
                "topk_indices": moe.topk_indices,
                "topk_weights": moe.topk_weights,
                "expert_out": moe.expert_out,
            }
            # a layer-level shared MLP (FamilySpec.shared_level) runs after the MoE block
            layer_shared = model.spec.shared_level == "layer"
            if moe.has_shared and not layer_shared:
                row["shared_out"] = moe.shared_out
            row["output"] = moe.output
            if moe.has_shared and layer_shared:
                row["shared_out"] = moe.shared_out
            rows.append(row)
        rows = nnsight.save(rows)
    return rows


def check_model(model: ExpertModel, n_tokens: int = 6, atol: float = 1e-4) -> None:
    """Reconstruction identity and routing re-computation on a short dummy input.

    Raises:
        ValidationError: naming the layer and the quantity that disagrees.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())
        >>> from expertlens.checks import check_model
        >>> check_model(model)   # raises ValidationError if a point does not reproduce the model
    """
    if not model.moe_layers:
        return
    vocab = min(model.vocab_size, 100)
    ids = (torch.arange(n_tokens).remainder(vocab - 4) + 4).unsqueeze(0).to(model.device)
    rows = capture_moe(model, ids)
    for layer, row in zip(model.moe_layers, rows):
        w, idx = row["topk_weights"], row["topk_indices"]
        recon = (row["expert_out"].float() * w.float().unsqueeze(-1)).sum(dim=-2)
        recon = recon * model.spec.routed_factor(model._module.get_submodule(model._layer_info[layer]["block"]))
        if "shared_out" in row and model.spec.shared_level == "block":
            recon = recon + row["shared_out"].float()
        err = (recon - row["output"].float()).abs().max().item()
        scale = row["output"].float().abs().max().item() + 1.0
        if err > atol * scale * (1 if model.dtype == torch.float32 else 100):
            raise ValidationError(
                f"layer {layer}: Σ_k topk_weights·expert_out (+ shared_out) differs from the MoE output by {err:.3g}; "
                f"the {model.family!r} address table does not match this model's MoE block"
            )
        router = model._module.get_submodule(model._layer_info[layer]["router"])
        logits = row["router_logits"].reshape(-1, row["router_logits"].shape[-1])
        w_ref, idx_ref = model.spec.rule.route(logits, router)
        same_sets = torch.equal(idx_ref.sort(-1).values, idx.reshape(-1, idx.shape[-1]).sort(-1).values)
        if not same_sets:
            raise ValidationError(
                f"layer {layer}: re-computing routing from router_logits with the {model.spec.rule.describe()!r} "
                f"rule selects different experts than the model's router"
            )
