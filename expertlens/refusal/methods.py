"""The paper's expert-aware methods.

* Method A (routing): suppress experts whose routing frequency rises on harmful prompts and force
  those that rise on harmless prompts, with a calibrated router bias (or SteerMoE's rewrite);
  the reverse induces refusal.
* Method B (single expert): the difference in means of one expert's output, steered with
  :class:`~expertlens.interventions.ExpertSteer`, chosen by the paper's two-stage search.

Example:
    >>> from expertlens.refusal.methods import routing_edit_experts
    >>> routing_edit_experts([(1, 2, 30.0), (1, 5, -12.0)], mode="bypass")
    ({1: [5]}, {1: [2]})
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import nnsight
import torch
from jaxtyping import Float
from torch import Tensor

from ..instrument import all_experts_forward
from ..interventions import AllExpertsSteer, ExpertSteer, RouterBias, SteerMoE, calibrate_router_bias
from ..interventions.base import Intervention
from .directions import iter_batches
from .evaluate import last_logits
from .judges import FULL_RESPONSE, judge_all
from .progress import progress
from .scores import Judge, SubstringJudge, kl_divergence, refusal_score

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = [
    "routing_edit_experts",
    "method_a_intervention",
    "expert_output_means",
    "expert_directions",
    "SearchRow",
    "ExpertSearch",
    "expert_search",
    "DEFAULT_COEFFS",
]

DEFAULT_COEFFS = (1, 5, 10, 25, 50, 75, 100, 150, 200, 250, 300, 400)


# ---- method A ---------------------------------------------------------------------------------


def routing_edit_experts(
    selected: Sequence[tuple[int, int, float]], mode: Literal["bypass", "induce"] = "bypass"
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """``(force, suppress)`` expert lists per layer from selected (layer, expert, Δ).

    ``bypass`` (response induction) suppresses harmful-preferred (Δ > 0) experts and forces
    harmless-preferred (Δ < 0) ones; ``induce`` does the reverse.

    Example:
        >>> from expertlens.refusal import routing_edit_experts
        >>> selected = [(1, 3, 25.0), (1, 6, -12.0)]   # (layer, expert, Δ pp): 3 fires more on harmful
        >>> routing_edit_experts(selected, "bypass")     # (force, suppress)
        ({1: [6]}, {1: [3]})
    """
    if mode not in ("bypass", "induce"):
        raise ValueError(f"mode must be 'bypass' or 'induce', got {mode!r}")
    force: dict[int, list[int]] = {}
    suppress: dict[int, list[int]] = {}
    for layer, expert, delta in selected:
        harmful_pref = delta > 0
        target = suppress if (harmful_pref == (mode == "bypass")) else force
        target.setdefault(int(layer), []).append(int(expert))
    return force, suppress


def method_a_intervention(
    model: ExpertModel,
    selected: Sequence[tuple[int, int, float]],
    mode: Literal["bypass", "induce"] = "bypass",
    kind: Literal["router_bias", "steermoe"] = "router_bias",
    eps: float = 0.01,
    magnitudes: dict[int, float] | None = None,
) -> Intervention:
    """The routing intervention of method A: calibrated router bias (paper) or SteerMoE's rewrite.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.refusal import method_a_intervention
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> bypass = method_a_intervention(model, [(1, 3, 25.0)], "bypass")
        >>> with model.intervene(bypass):
        ...     with model.trace("hello"):
        ...         idx = model.layers[1].moe.topk_indices.save()
        >>> bool((idx != 3).all())
        True
    """
    force, suppress = routing_edit_experts(selected, mode)
    if kind == "steermoe":
        # SteerMoE activates at most top_k experts per layer: keep the largest |Δ| (lists are in |Δ| order).
        return SteerMoE(activate={k: v[: model.top_k] for k, v in force.items()}, deactivate=suppress)
    if kind != "router_bias":
        raise ValueError(f"kind must be 'router_bias' or 'steermoe', got {kind!r}")
    magnitudes = magnitudes or calibrate_router_bias(model, eps=eps)
    table: dict[int, Tensor] = {}
    for layer in set(force) | set(suppress):
        b = torch.zeros(model.n_experts)
        b[force.get(layer, [])] = magnitudes[layer]
        b[suppress.get(layer, [])] = -magnitudes[layer]
        table[layer] = b
    return RouterBias(table)


# ---- method B: directions -------------------------------------------------------------------


def expert_output_means(
    model: ExpertModel,
    prompts: Sequence[str],
    layer: int,
    positions: Sequence[int] = (-5, -4, -3, -2, -1),
    mode: Literal["forced", "routed"] = "forced",
    batch_size: int = 32,
) -> tuple[Float[Tensor, "pos expert d_model"], Float[Tensor, "pos expert"]]:
    """Mean output of every expert of ``layer`` at the last-n prompt positions (float64), and counts.

    ``forced``: each expert applied to the MoE input at every analysed token — what the paper gets
    by forcing routing to that expert (computed directly from the expert weights, so exact and one
    pass for all experts). ``routed``: only tokens really routed to the expert (its ``expert_out``
    slot); counts are 0 where it never fired (the mean is then NaN).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.refusal import expert_output_means
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> means, counts = expert_output_means(model, ["hello there"], layer=1, positions=[-2, -1])
        >>> means.shape   # [positions, experts, d_model]
        torch.Size([2, 8, 64])
    """
    if mode not in ("forced", "routed"):
        raise ValueError(f"mode must be 'forced' or 'routed', got {mode!r}")
    moe = model.layers[layer].moe  # raises for dense layers
    positions = [int(p) for p in positions]
    experts_mod = model.hf_model.get_submodule(model.layout[layer].experts)
    E, d = model.n_experts, model.d_model
    # Accumulated on the experts' device (float64), one batched pass over all experts; one copy at the end.
    device = experts_mod.down_proj.device
    acc = torch.float64 if device.type != "mps" else torch.float32
    total = torch.zeros(len(positions), E, d, dtype=acc, device=device)
    count = torch.zeros(len(positions), E, dtype=acc, device=device)
    for batch in iter_batches(prompts, batch_size):
        enc = model.tokenize(batch)
        mask = enc["attention_mask"][:, positions].bool().to(device)  # [b, P]
        with torch.no_grad(), model.trace(enc["input_ids"], attention_mask=enc["attention_mask"]):
            if mode == "forced":
                x = nnsight.save(moe.input[:, positions])
            else:
                view = nnsight.save([moe.topk_indices, moe.expert_out])
        if mode == "forced":
            with torch.no_grad():
                out = all_experts_forward(experts_mod, x.reshape(-1, d).to(device))  # [E, b*P, d]
            out = out.view(E, *x.shape[:2], d).to(acc) * mask[None, ..., None]
            total += out.sum(1).transpose(0, 1)  # [P, E, d]
            count += mask.sum(0).to(acc)[:, None]
        else:
            idx, eo = view[0][:, positions].to(device), view[1][:, positions].to(device, acc)  # [b,P,k], [b,P,k,d]
            sel = torch.nn.functional.one_hot(idx.long(), E).to(acc) * mask[..., None, None]  # [b, P, k, E]
            total += torch.einsum("bpke,bpkd->ped", sel, eo)
            count += sel.sum((0, 2))
    return (total / count[..., None]).cpu().double(), count.cpu().double()


def expert_directions(
    model: ExpertModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    layer: int,
    positions: Sequence[int] = (-5, -4, -3, -2, -1),
    mode: Literal["forced", "routed"] = "forced",
    batch_size: int = 32,
) -> Float[Tensor, "pos expert d_model"]:
    """``d[p, e] = mean_harmful(expert_e out) − mean_harmless(expert_e out)`` for every expert of ``layer``.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.refusal import expert_directions
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> d = expert_directions(model, ["how do i hurt"], ["how do i help"], layer=1, positions=[-1])
        >>> d.shape   # [positions, experts, d_model]
        torch.Size([1, 8, 64])
    """
    mu, _ = expert_output_means(model, harmful, layer, positions, mode, batch_size)
    nu, _ = expert_output_means(model, harmless, layer, positions, mode, batch_size)
    return mu - nu


# ---- method B: the two-stage search -----------------------------------------------------------


@dataclass
class SearchRow:
    """One (expert, position, coefficient) combination of the search.

    Example:
        >>> from expertlens.refusal.methods import SearchRow
        >>> row = SearchRow(layer=1, expert=3, position=-1, coeff=50.0, refusal_score=-2.1, kl=0.4)
        >>> row.to_dict()["coeff"]
        50.0
    """

    layer: int
    expert: int
    position: int
    coeff: float
    refusal_score: float
    kl: float
    asr: float = float("nan")
    stage2: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExpertSearch:
    """Stage-1 rows (all combinations), stage-2 survivors and the best combination.

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> search = expert_search(model, [(1, 3)], {(1, 3): d}, [-1], harmful_val, harmless_val, ids)  # doctest: +SKIP
        >>> search.best   # the SearchRow with the lowest refusal score after stage 2  # doctest: +SKIP
        >>> bypass = search.intervention(-1.0)   # an ExpertSteer  # doctest: +SKIP
    """

    rows: list[SearchRow]
    best: SearchRow | None
    kl_max: float
    n_stage2: int
    directions: dict[tuple[int, int], Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {
            "kl_max": self.kl_max,
            "n_stage2": self.n_stage2,
            "best": self.best.to_dict() if self.best else None,
            "stage2": [r.to_dict() for r in self.rows if r.stage2],
            "n_combinations": len(self.rows),
        }

    def intervention(self, sign: float = -1.0, weighting: str = "router_prob") -> ExpertSteer | None:
        """The best combination as an ``ExpertSteer`` (``sign=-1`` bypasses, ``+1`` induces)."""
        if self.best is None:
            return None
        b = self.best
        d = self.directions[(b.layer, b.expert)][b.position]
        return ExpertSteer(b.layer, b.expert, d, coeff=sign * b.coeff, weighting=weighting)


def expert_search(
    model: ExpertModel,
    experts: Sequence[tuple[int, int]],
    directions: dict[tuple[int, int], Float[Tensor, "pos d_model"]],
    positions: Sequence[int],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    *,
    coeffs: Sequence[float] = DEFAULT_COEFFS,
    kl_max: float = 2.0,
    keep_frac: float = 0.025,
    keep_min: int = 15,
    n_prompts_stage2: int = 25,
    max_new_tokens: int = 25,
    judge: Judge | None = None,
    weighting: str = "router_prob",
    temperature: float | None = None,
    batch_size: int = 32,
    judge_prompts: Sequence[str] | None = None,
) -> ExpertSearch:
    """The paper's two-stage search over experts × positions × coefficients (bypass direction).

    Stage 1: refusal score on ``harmful_val`` with ``ExpertSteer(coeff=−c)`` and KL on
    ``harmless_val``; combinations with KL > ``kl_max`` are dropped, the rest ranked by refusal
    score, the best ``max(⌈keep_frac·N⌉, keep_min)`` kept. Stage 2: greedy generations on the first
    ``n_prompts_stage2`` harmful prompts, judged (``judge_prompts``: the plain instructions the judge reads,
    default ``harmful_val``); the best attack success rate (fraction ``full_response``) wins, ties going to
    the lower refusal score.

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> from expertlens.refusal import expert_directions, expert_search, refusal_token_ids
        >>> d = expert_directions(model, harmful, harmless, layer=1, positions=[-1])  # doctest: +SKIP
        >>> search = expert_search(model, [(1, 3)], {(1, 3): d[:, 3]}, [-1], harmful_val, harmless_val,
        ...                        refusal_token_ids(model.tokenizer), coeffs=(5, 25))  # doctest: +SKIP
    """
    judge = judge or SubstringJudge()
    judge_prompts = list(judge_prompts) if judge_prompts is not None else list(harmful_val)
    positions = list(positions)
    both, n_harmful = list(harmful_val) + list(harmless_val), len(harmful_val)
    base_harmless = last_logits(model, both, (), batch_size)[n_harmful:]
    rows: list[SearchRow] = []
    grid = [(le, pi, c) for le in experts for pi in range(len(positions)) for c in coeffs]
    for (layer, expert), pi, c in progress(grid, desc="method B stage 1"):
        d = directions[(layer, expert)][pi]
        if not torch.isfinite(d).all():
            continue
        steer = ExpertSteer(layer, expert, d.float(), coeff=-float(c), weighting=weighting)
        # one pass over harmful + harmless: refusal score on the first, KL on the second
        steered = last_logits(model, both, [steer], batch_size)
        score = float(refusal_score(steered[:n_harmful], refusal_ids, temperature).mean())
        kl = float(kl_divergence(base_harmless, steered[n_harmful:]).mean())
        rows.append(SearchRow(layer, expert, positions[pi], float(c), score, kl))
    ok = sorted((r for r in rows if r.kl <= kl_max and not math.isnan(r.refusal_score)), key=lambda r: r.refusal_score)
    n_keep = max(math.ceil(keep_frac * len(rows)), keep_min)
    survivors = ok[:n_keep]
    from ..interventions.run import generate

    prompts = list(harmful_val[:n_prompts_stage2])
    for r in progress(survivors, desc="method B stage 2"):
        d = directions[(r.layer, r.expert)][positions.index(r.position)].float()
        steer = ExpertSteer(r.layer, r.expert, d, coeff=-r.coeff, weighting=weighting)
        outs = generate(model, prompts, max_new_tokens, [steer], batch_size=batch_size)
        verdicts = judge_all(judge, list(judge_prompts[: len(prompts)]), outs)
        r.asr = sum(v == FULL_RESPONSE for v in verdicts) / max(len(prompts), 1)  # ASR = full_response
        r.stage2 = True
    best = max(survivors, key=lambda r: (r.asr, -r.refusal_score)) if survivors else None
    return ExpertSearch(rows, best, kl_max, len(survivors), dict(directions))


def all_experts_intervention(directions: Float[Tensor, "expert d_model"], layer: int, coeff: float) -> AllExpertsSteer:
    """The all-experts variant: ``coeff · Σ_e π_e(t) d_e`` at ``layer``'s MoE output."""
    return AllExpertsSteer(layer, directions.float(), coeff=coeff)
