"""Checks run when a model is wrapped (``validate=True``) and reused by the tests."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import nnsight
import torch
from torch import Tensor

if TYPE_CHECKING:
    from .model import ExpertModel

__all__ = ["ValidationError", "check_model", "check_truth", "capture_moe", "BF16_TOLERANCE"]


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
        ['expert_contrib', 'expert_out', 'output']
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
                "expert_contrib": moe.expert_contrib,
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
        block = model._module.get_submodule(model.layout[layer].block)
        shared = row["shared_out"].float() if "shared_out" in row else None
        # the family's identity, and the one every family has: the routed part is Σ_k expert_contrib
        routed = row["expert_contrib"].float().sum(-2)
        with_shared = routed + shared if shared is not None and model.spec.shared_level == "block" else routed
        for what, recon in ((model.spec.output_identity, model.spec.moe_output_from(row["expert_out"].float(), w,
                                                                                     shared, block)),
                            ("Σ_k expert_contrib (+ block-level shared_out)", with_shared)):
            err = (recon - row["output"].float()).abs().max().item()
            scale = row["output"].float().abs().max().item() + 1.0
            # the MoE output's precision, not the model's first parameter's (Ergo keeps its embedding in fp32)
            if err > atol * scale * (1 if row["output"].dtype == torch.float32 else 100):
                raise ValidationError(
                    f"layer {layer}: {what} differs from the MoE output by {err:.3g}; "
                    f"the {model.family!r} address table does not match this model's MoE block"
                )
        router = model._module.get_submodule(model.layout[layer].router)
        logits = row["router_logits"].reshape(-1, row["router_logits"].shape[-1])
        w_ref, idx_ref = model.spec.rule.route(logits, router)
        same_sets = torch.equal(idx_ref.sort(-1).values, idx.reshape(-1, idx.shape[-1]).sort(-1).values)
        if not same_sets:
            raise ValidationError(
                f"layer {layer}: re-computing routing from router_logits with the {model.spec.rule.describe()!r} "
                f"rule selects different experts than the model's router"
            )


#: Tolerance of :func:`check_truth` for half-precision models: ``max|Δ| <= BF16_TOLERANCE * (1 + max|reference|)``.
#: fp32 (and fp64) models must match bit for bit.
BF16_TOLERANCE = 2**-7


def _dummy_ids(model: ExpertModel, n_tokens: int, batch: int = 1) -> Tensor:
    vocab = min(model.vocab_size, 100)
    ids = (torch.arange(batch * n_tokens).remainder(vocab - 4) + 4).view(batch, n_tokens)
    return ids.to(model.device)


@contextmanager
def _uninstrumented(model: ExpertModel):
    """Run the wrapped HF model as transformers ships it: original router/block forwards and the
    ``grouped_mm`` experts implementation (which the ``"expertlens"`` implementation reproduces
    operation for operation). Restored on exit, also on error."""
    from . import instrument as _instrument

    hf = model._module
    inst = getattr(hf, "_el_instrumentation", None)
    states = []
    if inst is not None:
        for module in (*inst.routers.values(), *inst.blocks.values()):
            st = module.__dict__.get("_el_state")
            if st is not None:
                states.append((st, st.active))
                st.active = False
    impl = getattr(hf.config, "_experts_implementation", None)
    switched = inst is not None and bool(inst.blocks) and impl == _instrument.EXPERTS_IMPLEMENTATION
    # FP8 experts: expertlens's FP8 implementation follows the FP8 eager loop (FP8 grouped_mm needs `kernels`)
    fp8 = inst is not None and any(type(e).__name__ == "FP8Experts" for e in inst.experts.values())
    try:
        if switched:
            hf.set_experts_implementation("eager" if fp8 else "grouped_mm")
        yield
    finally:
        if switched:
            hf.set_experts_implementation(impl)
        for st, active in states:
            st.active = active


def _run(hf, ids: Tensor, blocks: dict[int, torch.nn.Module]) -> tuple[Tensor, dict[int, Tensor]]:
    outs: dict[int, Tensor] = {}
    handles = []
    for i, block in blocks.items():
        def hook(module, args, output, i=i):
            outs[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        handles.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids, use_cache=False).logits.detach().clone()
    finally:
        for h in handles:
            h.remove()
    return logits, outs


def _compare(name: str, got: Tensor, ref: Tensor, exact: bool, tol: float) -> str | None:
    if got.shape != ref.shape:
        return f"{name} has shape {tuple(got.shape)}, the uninstrumented model's has {tuple(ref.shape)}"
    if exact:
        if torch.equal(got, ref):
            return None
        err = (got.double() - ref.double()).abs().max().item()
        return f"{name} differs from the uninstrumented model's by max|Δ| = {err:.3g} (fp32 requires bit-identity)"
    err = (got.double() - ref.double()).abs().max().item()
    bound = tol * (1.0 + ref.double().abs().max().item())
    if not err <= bound:  # also catches NaN
        return f"{name} differs from the uninstrumented model's by max|Δ| = {err:.3g} (tolerance {bound:.3g})"
    return None


def check_truth(
    model: ExpertModel,
    input_ids: Tensor | None = None,
    *,
    n_tokens: int = 6,
    tolerance: float | None = None,
) -> None:
    """The truth test: the instrumented model computes what the uninstrumented model computes.

    On a short dummy input (or ``input_ids``), runs the wrapped model twice — instrumented
    (expertlens router/block forwards, the ``"expertlens"`` experts implementation) and as
    transformers ships it (original forwards, ``grouped_mm``) — and compares the final logits,
    the ``model.logits`` point read in a trace, and every MoE block's output. fp32/fp64 models
    must agree bit for bit; half-precision models within ``tolerance`` (default
    :data:`BF16_TOLERANCE`, relative to ``1 + max|reference|``). Unlike :func:`check_model`
    (points against each other), this catches an address table that drops a shared expert, its
    gate, or a scaling the original block applies. ``ExpertModel`` runs it when wrapping unless
    ``validate=False``.

    Args:
        model: A wrapped model with no edits registered.
        input_ids: ``[b, p]`` token ids; default ``n_tokens`` ids below 100.
        n_tokens: Length of the default input.
        tolerance: Relative tolerance for non-fp32 models.

    Raises:
        ValidationError: naming the layer and the quantity that differs, and by how much.
        ValueError: the model has edits registered, or is not instrumented.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.checks import check_truth
        >>> model = ExpertModel(tiny_model("qwen2_moe"), tiny_tokenizer())
        >>> check_truth(model)   # passes: the table reproduces the model exactly
        >>> bad = ExpertModel(tiny_model("qwen2_moe"), tiny_tokenizer(),
        ...                   family=model.spec.with_(shared_gate=None), validate=False)
        >>> try:
        ...     check_truth(bad)
        ... except Exception as err:
        ...     print(type(err).__name__, str(err)[:36])
        ValidationError layer 0: the MoE block output differ
    """
    from . import instrument as _instrument

    hf = model._module
    if not _instrument.is_installed(hf):
        raise ValueError("check_truth needs an instrumented model; this one was restored (model.restore())")
    n = model.n_edits()
    if n:
        raise ValueError(
            f"check_truth compares the model without edits, but {n} edit(s) are registered; "
            "remove them (model.clear_edits()) first"
        )
    if input_ids is None:
        input_ids = _dummy_ids(model, n_tokens)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be a [batch, pos] integer tensor, got {input_ids!r}")
    dtype = model.dtype
    exact = dtype in (torch.float32, torch.float64)
    tol = BF16_TOLERANCE if tolerance is None else float(tolerance)
    blocks = dict(hf._el_instrumentation.blocks)
    was_training = hf.training
    hf.eval()
    try:
        got_logits, got_blocks = _run(hf, input_ids, blocks)
        with _uninstrumented(model):
            ref_logits, ref_blocks = _run(hf, input_ids, blocks)
        with torch.no_grad(), model.trace(input_ids):
            point = model.logits.save()
    finally:
        hf.train(was_training)
    # Per-layer first: the earliest layer that differs is the one whose table is wrong.
    for i in sorted(ref_blocks):
        if i not in got_blocks:
            raise ValidationError(f"layer {i}: the instrumented model never ran this layer's MoE block")
        msg = _compare("the MoE block output", got_blocks[i], ref_blocks[i], exact, tol)
        if msg:
            raise ValidationError(
                f"layer {i}: {msg}; the {model.family!r} address table does not reproduce this model's MoE block "
                "(a shared expert, its gate or a scaling the original block applies is missing or wrong)"
            )
    msg = _compare("the model's logits", got_logits, ref_logits, exact, tol)
    if msg:
        raise ValidationError(f"model output: {msg}; the {model.family!r} address table does not reproduce this model")
    msg = _compare("the `logits` point", point.detach(), ref_logits, exact, tol)
    if msg:
        raise ValidationError(
            f"model output: {msg}; the family applies a transform after the unembedding "
            "(logit scaling or soft-capping) that the `logits` point does not include"
        )
