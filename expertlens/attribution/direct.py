"""Direct attribution: how much each residual-stream writer contributes to a linear read-out.

A *target* is a linear read-out of the residual stream at some positions:

* a direction ``r`` at the input of layer ``L`` (``resid_pre``; ``L = n_layers`` is the final
  residual stream, the final norm's input): the read-out is ``resid · r̂`` (unit ``r̂`` by default);
* a :class:`LogitDiff` — mean logit of some tokens (e.g. refusal starts) minus the mean logit of the
  rest — read from the final residual stream through the final norm and the unembedding.

Every writer of the residual stream before the target is a *component* (see
:data:`~expertlens.attribution.COMPONENT_KINDS`): the embeddings, each attention head's ``head_out``,
the attention output bias, each routed expert's weighted output ``topk_weight · expert_out`` at the
tokens that chose it, the shared expert, dense MLPs. A component's score is the read-out of its write
at the target positions, so the scores sum to the measured read-out (completeness), up to float error.

Norm treatment (documented convention, TransformerLens-style "frozen LN"):

* Logit-difference targets: the final RMS norm is treated as linear by freezing its scale
  ``gain / rms(x)`` at the value of the run being attributed. Each component contributes
  ``(c · gain / rms(x)) · (W_U[pos].mean(0) - W_U[neg].mean(0))`` (a final LayerNorm also centres
  ``c``); the unembedding bias and a final-norm bias contribute one constant ``const`` row.
  Completeness holds against this frozen-norm logit difference, which equals the model's logit
  difference on that run (checked and stored as ``meta["frozen_norm_error"]``).
* Post-norm families (FlexOlmo): a sublayer writes ``norm(f(x))``; the norm's scale is frozen in the
  same way, so heads/experts are attributed through it exactly.
* Scaled residuals (GraniteMoE ``residual_multiplier``, MiniMax alpha/beta): writes are multiplied by
  the write factor and by every later residual factor.

Rows of kind ``other`` hold what no component wrote (edits from interventions on residual points such
as a steering vector; ~0 on an unedited model), so rows always sum to the measured total.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..edits import record
from ..families import get_module
from ..interventions.base import Intervention
from ..prompts import batches
from ._common import (
    TokenPositions,
    as_prompts,
    frozen_norm,
    layer_components,
    model_shape,
    norm_scale,
    pick,
    residual_coefficients,
    resolve_positions,
    write_norms,
)
from ._table import AttributionTable, Component

if TYPE_CHECKING:
    from ..model import EditHandle, ExpertModel

__all__ = ["LogitDiff", "DirectAttribution", "direct_attribution"]


@dataclass(frozen=True)
class LogitDiff:
    """Target: mean logit of ``positive`` tokens minus mean logit of ``negative`` ones.

    Args:
        positive: Token ids or token strings (each must be one token), e.g. refusal-start tokens.
        negative: Token ids/strings to contrast with; ``None`` (default) means every other token.

    Example:
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens import ExpertModel
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> LogitDiff(["I", "S"]).token_ids(model)[0]
        [45, 55]
    """

    positive: Sequence[int | str]
    negative: Sequence[int | str] | None = None

    def __post_init__(self) -> None:
        for name in ("positive", "negative"):
            toks = getattr(self, name)
            if toks is None:
                continue
            if isinstance(toks, (str, int)) or not isinstance(toks, Iterable):
                raise TypeError(f"LogitDiff: {name}={toks!r} must be a list of token ids or token strings, e.g. "
                                f"[{toks!r}]")
            toks = tuple(toks)
            for t in toks:
                # bool is an int to Python: [True] would be token id 1; a float would be truncated
                if isinstance(t, bool) or not isinstance(t, (str, numbers.Integral)):
                    raise TypeError(f"LogitDiff: {name} token {t!r} is a {type(t).__name__}; accepted are token "
                                    "ids (ints) and token strings")
            object.__setattr__(self, name, tuple(t if isinstance(t, str) else int(t) for t in toks))
        if not self.positive:
            raise ValueError("LogitDiff needs at least one positive token")

    @staticmethod
    def _ids(model: ExpertModel, toks: Sequence[int | str]) -> list[int]:
        out = []
        for t in toks:
            if isinstance(t, int):
                tid = t
            else:
                tid = model.tokenizer.convert_tokens_to_ids(t)
                unk = getattr(model.tokenizer, "unk_token_id", None)
                if tid is None or (unk is not None and tid == unk and t != model.tokenizer.unk_token):
                    enc = model.tokenizer.encode(t, add_special_tokens=False)
                    if len(enc) != 1:
                        raise ValueError(f"{t!r} is not a single token (encodes to {enc})")
                    tid = enc[0]
            if not 0 <= tid < model.vocab_size:
                raise ValueError(f"token id {tid} out of range for vocab of {model.vocab_size}")
            out.append(int(tid))
        return out

    def token_ids(self, model: ExpertModel) -> tuple[list[int], list[int]]:
        """``(positive_ids, negative_ids)`` resolved on ``model``'s tokenizer."""
        pos = self._ids(model, self.positive)
        if self.negative is None:
            pset = set(pos)
            neg = [i for i in range(model.vocab_size) if i not in pset]
        else:
            neg = self._ids(model, self.negative)
        if not neg:
            raise ValueError("LogitDiff has no negative tokens")
        return pos, neg

    def from_logits(self, model: ExpertModel, logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "*batch"]:
        """The logit difference computed from logits (differentiable)."""
        pos, neg = self.token_ids(model)
        return logits[..., pos].mean(-1) - logits[..., neg].mean(-1)

    def unembed(self, model: ExpertModel) -> tuple[Float[Tensor, " d_model"], float]:
        """``(u, c)``: the logit difference is ``normed_resid · u + c``."""
        pos, neg = self.token_ids(model)
        head = get_module(model.hf_model, model.spec.lm_head)
        w = head.weight.detach()  # only the tokens' rows leave the weight's device, not the whole unembedding
        u = (w[pos].float().mean(0) - w[neg].float().mean(0)).cpu()
        b = getattr(head, "bias", None)
        c = float(b[pos].detach().float().mean() - b[neg].detach().float().mean()) if b is not None else 0.0
        scale = model.logits_scale  # the family's scaling after the unembedding (Granite-MoE: 1/logits_scaling)
        return u * scale, c * scale

    def describe(self) -> dict[str, Any]:
        return {"type": "logit_diff", "positive": list(self.positive),
                "negative": None if self.negative is None else list(self.negative)}


class _Recorder:
    """Mutable store the frozen :class:`DirectAttribution` writes into during forwards."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.model: ExpertModel | None = None

    def reset(self) -> None:
        self.records, self.current = [], None


@dataclass(frozen=True, eq=False)
class DirectAttribution(Intervention):
    """An intervention that records, on each forward, what every component writes toward a target.

    It registers identity edits only, so it changes nothing; compose it with other interventions
    (attach it *last*, so it sees their edits) and read :meth:`result` after the forwards. Each
    prompt forward (not generation decode steps) adds its rows; :meth:`reset` clears them.

    Args:
        target: A direction ``[d_model]`` in the residual stream, or a :class:`LogitDiff`.
        layer: The direction is read at ``resid_pre`` of this layer; ``None`` or ``n_layers`` means the
            final residual stream. Must be ``None``/``n_layers`` for a :class:`LogitDiff`.
        positions: Padded positions to attribute (left padding: ``-1`` is every prompt's last token);
            ``None``: every real (non-pad) token. Scores are averaged over positions, then prompts.
        normalize: Project on the unit vector ``r / |r|`` (default) rather than ``r``.

    Example:
        >>> import torch
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen2_moe"), tiny_tokenizer())
        >>> attr = DirectAttribution(torch.randn(model.d_model), layer=1)
        >>> with model.intervene(attr):
        ...     with model.trace("hello"):
        ...         pass
        >>> table = attr.result()
        >>> abs(table.sum() - table.total) < 1e-4
        True
    """

    target: Any
    layer: int | None = None
    positions: TokenPositions = -1
    normalize: bool = True
    recorder: _Recorder = field(default_factory=_Recorder, compare=False, repr=False)

    # ---- intervention protocol ---------------------------------------------------------------
    def _layer(self, model: ExpertModel) -> int:
        if self.layer is None:
            return model.n_layers
        return self.layer if self.layer >= 0 else model.n_layers + 1 + self.layer

    def validate(self, model: ExpertModel) -> None:
        if isinstance(self.target, LogitDiff):
            if self.layer not in (None, model.n_layers):
                raise ValueError("a LogitDiff target is read at the final residual stream; leave layer=None")
            if model.logits_softcap is not None:
                raise ValueError(
                    f"this {model.family} model soft-caps its logits (c·tanh(x/c), c = {model.logits_softcap}), "
                    "so a logit difference is not linear in the residual stream and direct attribution to it "
                    "would not add up; attribute a direction instead (target=<[d_model] tensor>)"
                )
            self.target.token_ids(model)
        elif isinstance(self.target, Tensor):
            if self.target.shape != (model.d_model,):
                raise ValueError(
                    f"target direction must have shape ({model.d_model},), got {tuple(self.target.shape)}"
                )
            if not 0 <= self._layer(model) <= model.n_layers:
                raise ValueError(f"layer {self.layer} out of range 0..{model.n_layers}")
        else:
            raise TypeError(
                f"target must be a direction tensor or a LogitDiff, got {type(self.target).__name__}"
            )

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        rec = self.recorder
        rec.model = model
        positions = self.positions
        L = self._layer(model)
        need_logits = isinstance(self.target, LogitDiff)
        short = {"resid_pre": "resid_pre", "attn.z": "z", "attn.output": "attn_out", "moe.topk_indices": "topk_i",
                 "moe.topk_weights": "topk_w", "moe.expert_out": "expert_out", "moe.shared_out": "shared_out",
                 "mlp.output": "mlp_out"}
        wanted: list[tuple[str, int | None]] = [("resid_pre", 0)]
        for li in range(min(L, model.n_layers)):
            info = model.layout[li]
            if li > 0:
                wanted.append(("resid_pre", li))
            if info.o_proj is not None:
                wanted.append(("attn.z", li))
            wanted.append(("attn.output", li))
            if info.is_moe:
                wanted += [("moe.topk_indices", li), ("moe.topk_weights", li), ("moe.expert_out", li)]
                if model.spec.shared is not None:
                    wanted.append(("moe.shared_out", li))
            wanted.append(("mlp.output", li))
        final = ("resid_pre", L) if L < model.n_layers else ("resid_post", model.n_layers - 1)
        if final not in wanted:
            wanted.append(final)
        if need_logits:
            wanted.append(("logits", None))

        def keep(key, x, ctx):
            name, layer = key
            if key == ("resid_pre", 0):
                idx = resolve_positions(positions, x.shape[1])
                mask = ctx.token_mask()
                if mask is None:
                    mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
                rec.current = {"idx": idx, "mask": pick(mask, idx), "p": x.shape[1]}
                rec.records.append(rec.current)
            if rec.current is None:
                return
            slot = {"resid_post": "final", "logits": "logits"}.get(name, (short.get(name), layer))
            rec.current[slot] = pick(x, rec.current["idx"])

        return record(model, wanted, prefill_only=True, on_value=keep, keep=False).handles

    # ---- results -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget recorded forwards."""
        self.recorder.reset()

    def result(self, model: ExpertModel | None = None) -> AttributionTable:
        """The attribution table over every recorded prompt (needs ``model`` only if never attached)."""
        model = model if model is not None else self._model_ref()
        recs = [r for r in self.recorder.records if "final" in r or ("resid_pre", self._layer(model)) in r]
        if not recs:
            raise RuntimeError(
                "DirectAttribution recorded no complete forward; run the model inside intervene()"
            )
        parts = [_attribute_record(model, self, r) for r in recs]
        comps = parts[0][0]
        per_prompt = torch.cat([p[1] for p in parts])
        totals = torch.cat([p[2] for p in parts])
        meta: dict[str, Any] = {
            "target": self.target.describe() if isinstance(self.target, LogitDiff)
            else {"type": "direction", "norm": float(self.target.detach().norm()), "normalize": self.normalize},
            "layer": self._layer(model), "positions": self.positions, "family": model.family,
            "n_prompts": int(per_prompt.shape[0]),
        }
        if isinstance(self.target, LogitDiff):
            meta["frozen_norm_error"] = max(p[3] for p in parts)
            meta["norm_treatment"] = "final norm frozen at the clean run's scale (TransformerLens-style)"
        return AttributionTable(comps, per_prompt.mean(0), per_prompt, float(totals.mean()), totals,
                                "direct", model_shape(model), meta)

    def _model_ref(self) -> ExpertModel:
        ref = getattr(self.recorder, "model", None)
        if ref is None:
            raise ValueError("pass the model: DirectAttribution.result(model)")
        return ref


def _attribute_record(model: ExpertModel, attr: DirectAttribution, rec: dict[str, Any]):
    """Scores ``[b, n_components]`` and totals ``[b]`` for one recorded forward."""
    L = attr._layer(model)
    final = rec["final"] if "final" in rec else rec[("resid_pre", L)]
    final = final.float()
    b, n, d = final.shape
    mask = rec["mask"].float()  # [b, n]
    denom = mask.sum(1).clamp_min(1.0)
    const = torch.zeros(b, n)
    frozen_err = 0.0
    if isinstance(attr.target, LogitDiff):
        u, c = attr.target.unembed(model)
        norm_mod = get_module(model.hf_model, model.spec.final_norm)
        scale, center, nbias = frozen_norm(norm_mod, final.to(model.dtype))
        D = scale.float() * u  # [b, n, d]: the logit difference per unit of residual, frozen norm
        if center:  # a LayerNorm subtracts the mean: project on the centred direction instead
            D = D - D.mean(-1, keepdim=True)
        const = const + c + (float(nbias @ u) if nbias is not None else 0.0)
        measured = attr.target.from_logits(model, rec["logits"].float())
        frozen_err = float(((final * D).sum(-1) + const - measured).abs().max())
    else:
        r = attr.target.detach().float().cpu()
        if attr.normalize:
            r = r / r.norm().clamp_min(1e-12)
        D = r.expand(b, n, d)
        measured = (final * D).sum(-1)

    def proj(v: Tensor) -> Tensor:  # [b, n, d] -> [b, n]
        return (v.float() * D).sum(-1)

    # factor[li]: product of the residual alpha factors of layers li..L-1
    coefs = [residual_coefficients(model, li) for li in range(L)]
    after = [1.0] * (L + 1)
    for li in range(L - 1, -1, -1):
        a_a, _, a_f, _ = coefs[li]
        after[li] = after[li + 1] * a_a * a_f

    comps: list[Component] = [Component(-1, "embed", 0)]
    cols: list[Tensor] = [proj(rec[("resid_pre", 0)]) * after[0]]
    for li in range(L):
        info = model.layout[li]
        a_a, b_a, a_f, b_f = coefs[li]
        attn_norm, ffn_norm = write_norms(model, li)
        attn_out = rec[("attn_out", li)].float()
        s_a = norm_scale(attn_norm, attn_out.to(model.dtype)).float() if attn_norm is not None else None
        k_attn = b_a * a_f * after[li + 1]
        k_ffn = b_f * after[li + 1]
        Da = D * s_a if s_a is not None else D
        layer_comps = layer_components(model, li, other=True)
        layer_cols: list[Tensor] = []
        # attention
        if info.o_proj is not None:
            z = rec[("z", li)].float()  # [b, n, h, dh]
            w_o = model.layers[li].attn.o_weight.detach()  # [d, h, dh], used where it lives (no copy of W_O)
            heads = torch.einsum("bnhk,dhk->bnhd", z.to(w_o.device), w_o.float())
            layer_cols += list((heads * Da.to(w_o.device)[:, :, None, :]).sum(-1).cpu().unbind(-1))
            write_a = heads.sum(2).cpu()
            bias = model.layers[li].attn.o_bias
            if bias is not None:
                bias = bias.detach().float().cpu()
                layer_cols.append((bias * Da).sum(-1))
                write_a = write_a + bias
        else:
            write_a = attn_out
            layer_cols.append((attn_out * Da).sum(-1))
        layer_cols = [c * k_attn for c in layer_cols]
        # feed-forward
        mlp_out = rec[("mlp_out", li)].float()
        s_f = norm_scale(ffn_norm, mlp_out.to(model.dtype)).float() if ffn_norm is not None else None
        Df = D * s_f if s_f is not None else D
        ffn_cols: list[Tensor] = []
        if info.block is not None:
            w = rec[("topk_w", li)].float()
            idx = rec[("topk_i", li)].long()
            eo = rec[("expert_out", li)].float()  # [b, n, k, d]
            per_slot = w * (eo * Df[:, :, None, :]).sum(-1)  # [b, n, k]
            per_expert = torch.zeros(b, n, info.n_experts).scatter_add_(-1, idx, per_slot)
            ffn_cols += list(per_expert.unbind(-1))
            write_f = (w[..., None] * eo).sum(2)
            if model.spec.shared is not None:
                sh = rec[("shared_out", li)].float()
                ffn_cols.append((sh * Df).sum(-1))
                write_f = write_f + sh
        else:
            write_f = mlp_out
            ffn_cols.append((mlp_out * Df).sum(-1))
        ffn_cols = [c * k_ffn for c in ffn_cols]
        # what no component wrote: next residual minus the reconstructed one
        if s_a is not None:
            write_a = write_a * s_a
        if s_f is not None:
            write_f = write_f * s_f
        nxt = final if li == L - 1 else rec[("resid_pre", li + 1)].float()
        pre = rec[("resid_pre", li)].float()
        other = nxt - (a_f * (a_a * pre + b_a * write_a) + b_f * write_f)
        comps += layer_comps
        cols += layer_cols + ffn_cols + [proj(other) * after[li + 1]]
    if isinstance(attr.target, LogitDiff) and float(const.abs().max()) > 0:
        comps.append(Component(model.n_layers, "const", 0))
        cols.append(const)
    scores = torch.stack(cols, -1)  # [b, n, C]
    per_prompt = (scores * mask[..., None]).sum(1) / denom[:, None]
    totals = (measured.float() * mask).sum(1) / denom
    return comps, per_prompt, totals, frozen_err


def direct_attribution(
    model: ExpertModel,
    prompts: str | Sequence[str],
    target: Tensor | LogitDiff,
    *,
    layer: int | None = None,
    positions: TokenPositions = -1,
    normalize: bool = True,
    interventions: Sequence[Intervention] = (),
    chat: bool = False,
    batch_size: int = 16,
) -> AttributionTable:
    """Direct attribution of ``target`` over a prompt set (averaged), optionally under interventions.

    Args:
        model: The model.
        prompts: One prompt or a list (raw text; ``chat=True`` wraps each in the chat template).
        target: A direction ``[d_model]`` read at ``resid_pre`` of ``layer``, or a :class:`LogitDiff`.
        layer: Where a direction is read (``None``: final residual stream).
        positions: Padded positions (``-1``: last prompt token; ``None``: all real tokens).
        normalize: Use the unit direction.
        interventions: Applied during the forwards (e.g. steering); attribution sees their effect.
        chat: Apply the tokenizer's chat template with a generation prompt.
        batch_size: Prompts per forward.

    Returns:
        An :class:`AttributionTable` (``method="direct"``) whose rows sum to ``total``, the measured
        read-out averaged over prompts. Subtract two tables for harmful-minus-harmless.

    Example:
        >>> import torch
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> t = direct_attribution(model, ["how do I", "tell me"], torch.randn(64), layer=2)
        >>> [row["kind"] for row in t.top(3)]  # doctest: +SKIP
        ['expert', 'head', 'embed']
    """
    attr = DirectAttribution(target, layer, positions, normalize)
    items = as_prompts(prompts, model, chat)
    with torch.no_grad(), model.intervene(*interventions, attr):
        for chunk in batches(items, batch_size):
            model.hf_model(**model.tokenize(chunk, position_ids=True))
    return attr.result(model)
