"""The whole study of "Expert-Aware Refusal Steering" as one function and one result object.

prompts → chat format → directions → selection → ActAdd / ablation → routing statistics →
method A → method B → controls and pathways → :class:`RefusalStudy` → JSON, safetensors, report.

Example:
    >>> from expertlens import load_organism
    >>> from expertlens.refusal import RefusalConfig, RefusalData, run_refusal_study
    >>> model = load_organism()  # doctest: +SKIP
    >>> study = run_refusal_study(model, RefusalData.from_organism(), RefusalConfig.fast())  # doctest: +SKIP
    >>> study.results["actadd"]["harmful_refusal"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..interventions import AblateDirection, AddVector
from . import methods
from .actadd import actadd_sweep
from .controls import pathway_ablation
from .data import RefusalData, format_chat, post_instruction_len
from .directions import candidate_directions
from .evaluate import last_logits, mean_kl, refusal_rate
from .progress import progress
from .routing import routing_statistics
from .scores import DEFAULT_REFUSAL_STARTS, Judge, SubstringJudge, refusal_score, refusal_token_ids
from .selection import select_direction

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["RefusalConfig", "RefusalStudy", "run_refusal_study", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


@dataclass
class RefusalConfig:
    """Every knob of the study; defaults follow the paper's code (see docs/refusal.md).

    Attributes:
        system_prompt: Optional system message for the chat template.
        n_positions: Candidate positions are the last ``n_positions`` prompt tokens; ``"eoi"`` uses
            the post-instruction template tokens (Arditi).
        temperature: Refusal-score temperature (the paper's code: 0.7; Arditi: None).
        refusal_starts: Words whose first tokens make the refusal-score token set.
        filter_train: Keep harmful train prompts with refusal score > 0 and harmless < 0 (Arditi).
        kl_threshold / induce_threshold / max_layer_frac: Direction-selection filters.
        actadd_coeff: ActAdd coefficient of the paper's row ``actadd_unit`` (−c bypasses on harmful, +c
            induces on harmless).
        actadd_sweep: Coefficients tried on validation prompts; the smallest reaching 10% harmful refusal
            (bypass) / 90% harmless refusal (induce) is used for the ``actadd`` row. Empty: use ``actadd_coeff``.
        max_new_tokens: Tokens generated when measuring refusal rates.
        routing_last_n / routing_count: Routing statistics over the last-n prompt tokens, top-1 or top-k.
        expert_threshold: |Δ| threshold (percentage points) selecting routing-linked experts.
        method_a_kind: ``"router_bias"`` (paper) or ``"steermoe"``.
        method_b_experts: How many of the largest-|Δ| experts method B searches.
        method_b_mode: ``"forced"`` (paper) or ``"routed"`` expert directions.
        coeffs / kl_max / keep_min / n_prompts_stage2 / stage2_tokens: Method B search sizes.
        n_random_experts: Below-threshold experts in the random control.
        n_samples: Sample generations stored per condition.

    Example:
        >>> from expertlens.refusal import RefusalConfig
        >>> cfg = RefusalConfig(expert_threshold=5.0, method_a_kind="steermoe")
        >>> RefusalConfig.fast().method_b_experts
        2
    """

    system_prompt: str | None = None
    n_positions: int | str = 5
    temperature: float | None = 0.7
    refusal_starts: tuple[str, ...] = DEFAULT_REFUSAL_STARTS
    filter_train: bool = True
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    max_layer_frac: float = 0.8
    actadd_coeff: float = 1.0
    actadd_sweep: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    max_new_tokens: int = 16
    routing_last_n: int | None = 5
    routing_count: str = "top1"
    expert_threshold: float = 10.0
    method_a_kind: str = "router_bias"
    method_b_experts: int = 4
    method_b_mode: str = "forced"
    coeffs: tuple[float, ...] = methods.DEFAULT_COEFFS
    kl_max: float = 2.0
    keep_min: int = 15
    n_prompts_stage2: int = 25
    stage2_tokens: int = 16
    n_random_experts: int = 4
    n_samples: int = 3
    batch_size: int = 64
    seed: int = 42

    @classmethod
    def paper(cls) -> RefusalConfig:
        """The paper's code defaults (the class defaults)."""
        return cls()

    @classmethod
    def organism(cls) -> RefusalConfig:
        """Sized for the bundled organisms: the paper's steps with smaller method-B grids (about a minute on CPU)."""
        return cls(
            method_b_experts=2, coeffs=(25, 50, 100, 200, 300, 400), keep_min=8, n_prompts_stage2=16, n_random_experts=2
        )

    @classmethod
    def fast(cls) -> RefusalConfig:
        """Smaller searches for tests and quick looks."""
        return cls(method_b_experts=2, coeffs=(1, 5, 25, 100), keep_min=4, n_prompts_stage2=8, n_random_experts=2)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class RefusalStudy:
    """The study's results: plain JSON-able tables in ``results`` plus tensors in ``directions``.

    ``results`` keys (stable schema, rates are fractions in [0, 1]): ``baseline``, ``selected``,
    ``selection``, ``actadd``, ``ablation``, ``routing``, ``method_a``, ``method_b``,
    ``method_b_all_experts``, ``control``, ``pathways``, ``samples``, ``timing``, ``model``, ``config``,
    ``data``. ``directions`` holds ``refusal`` (the selected r), ``candidates`` [P, L, d] and
    ``method_b`` (the best expert's direction), saved as safetensors.

    Example:
        >>> from expertlens.refusal import RefusalStudy
        >>> study = RefusalStudy.load("runs/organism")  # doctest: +SKIP
        >>> study["actadd"]["harmful_refusal"], study.directions["refusal"].shape  # doctest: +SKIP
        >>> print(study.table())  # doctest: +SKIP
    """

    results: dict[str, Any]
    directions: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.results[key]

    def save(self, out_dir: str | Path, report: bool = True) -> Path:
        """Write ``results.json``, ``directions.safetensors`` and (``report=True``) ``report.html``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.results, indent=2, default=_json_default))
        tensors = {k: v.detach().cpu().contiguous().float() for k, v in self.directions.items() if v is not None}
        save_file(tensors, str(out / "directions.safetensors"), metadata={"schema_version": str(SCHEMA_VERSION)})
        if report:
            from ..report import report as write_report

            write_report(self, out / "report.html", title="Expert-aware refusal steering")
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> RefusalStudy:
        """Read a study back from ``save``'s folder."""
        out = Path(out_dir)
        results = json.loads((out / "results.json").read_text())
        path = out / "directions.safetensors"
        directions = load_file(str(path)) if path.exists() else {}
        return cls(results, directions)

    def table(self) -> str:
        """The headline numbers as a plain-text table."""
        r = self.results

        def pct(x):
            return "   —" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"

        rows = [
            ("baseline", r["baseline"]["harmful_refusal"], r["baseline"]["harmless_refusal"], ""),
            (
                "ActAdd ∓r, coefficient 1",
                r["actadd_unit"]["harmful_refusal"],
                r["actadd_unit"]["harmless_refusal"],
                f"layer {r['selected'].get('layer')}, pos {r['selected'].get('position')}",
            ),
            (
                "ActAdd ∓c·r, c from val",
                r["actadd"]["harmful_refusal"],
                r["actadd"]["harmless_refusal"],
                f"c = -{r['actadd'].get('coeff_bypass')} / +{r['actadd'].get('coeff_induce')}",
            ),
            (
                "directional ablation",
                r["ablation"]["harmful_refusal"],
                None,
                f"harmless KL {r['ablation']['harmless_kl']:.4f}",
            ),
            (
                "method A (routing)",
                r["method_a"].get("harmful_refusal"),
                r["method_a"].get("harmless_refusal"),
                r["method_a"].get("note", f"{len(r['method_a'].get('experts', []))} experts"),
            ),
            (
                "method B (one expert)",
                r["method_b"].get("harmful_refusal"),
                r["method_b"].get("harmless_refusal"),
                r["method_b"].get(
                    "note",
                    f"L{r['method_b'].get('layer')} E{r['method_b'].get('expert')} c={r['method_b'].get('coeff')}",
                ),
            ),
            (
                "control: random experts",
                r["control"]["random_experts"].get("harmful_refusal"),
                None,
                r["control"]["random_experts"].get("note", ""),
            ),
        ]
        lines = [f"{'condition':26s} {'harmful':>8s} {'harmless':>9s}  notes", "-" * 72]
        for name, h, hl, note in rows:
            lines.append(f"{name:26s} {pct(h):>8s} {pct(hl):>9s}  {note}")
        pw = r["pathways"]
        if pw.get("shares"):
            shares = ", ".join(f"{k} {v:.2f}" for k, v in pw["shares"].items())
            lines.append(f"pathway shares of the ablation effect (refusal score): {shares}")
        return "\n".join(lines)

    def sections(self):
        """Report sections (tables and figures) for :func:`expertlens.report.report`."""
        from .report_sections import study_sections

        return study_sections(self)


def _json_default(obj):
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _nan_to_none(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _samples(prompts, outs, n):
    return [{"prompt": p, "completion": o} for p, o in list(zip(prompts, outs))[:n]]


def run_refusal_study(
    model: ExpertModel,
    data: RefusalData,
    config: RefusalConfig | None = None,
    judge: Judge | None = None,
    log=print,
) -> RefusalStudy:
    """Run every step of the study on ``model`` and return a :class:`RefusalStudy`.

    Args:
        model: The wrapped chat model (needs a chat template).
        data: Harmful/harmless instructions for train, val and test.
        config: Defaults follow the paper; see :class:`RefusalConfig`.
        judge: Refusal judge for generations (default: the paper's substring list).
        log: Where progress lines go (``print``, or ``lambda *a: None`` to silence).

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> from expertlens.refusal import RefusalConfig, RefusalData, run_refusal_study
        >>> study = run_refusal_study(model, RefusalData.from_organism(), RefusalConfig.fast())  # doctest: +SKIP
        >>> study.save("runs/organism")   # results.json, directions.safetensors, report.html  # doctest: +SKIP
    """
    cfg = config or RefusalConfig()
    judge = judge or SubstringJudge()
    t0, timing = time.time(), {}
    torch.manual_seed(cfg.seed)

    def tick(name):
        timing[name] = round(time.time() - t0 - sum(timing.values()), 2)

    chat = lambda xs: format_chat(model.tokenizer, xs, cfg.system_prompt)  # noqa: E731
    harmful_train, harmless_train = chat(data.harmful_train), chat(data.harmless_train)
    harmful_val = chat(data.harmful_val or data.harmful_train)
    harmless_val = chat(data.harmless_val or data.harmless_train)
    harmful_test = chat(data.harmful_test or data.harmful_val or data.harmful_train)
    harmless_test = chat(data.harmless_test or data.harmless_val or data.harmless_train)
    ids = refusal_token_ids(model.tokenizer, cfg.refusal_starts)
    bs, new, T = cfg.batch_size, cfg.max_new_tokens, cfg.temperature
    res: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "config": cfg.to_dict(), "data": data.sizes()}
    res["model"] = dict(
        family=model.family,
        n_layers=model.n_layers,
        moe_layers=model.moe_layers,
        n_experts=model.n_experts,
        top_k=model.top_k,
        d_model=model.d_model,
        name=str(getattr(model.config, "_name_or_path", "")),
    )

    # 1. baseline
    log("[1/8] baseline refusal")
    h_rate, h_out = refusal_rate(model, harmful_test, (), new, judge, bs)
    hl_rate, hl_out = refusal_rate(model, harmless_test, (), new, judge, bs)
    res["baseline"] = dict(harmful_refusal=h_rate, harmless_refusal=hl_rate)
    samples = {
        "baseline_harmful": _samples(data.harmful_test, h_out, cfg.n_samples),
        "baseline_harmless": _samples(data.harmless_test, hl_out, cfg.n_samples),
    }
    if cfg.filter_train:
        keep_h = refusal_score(last_logits(model, harmful_train, (), bs), ids, T) > 0
        keep_hl = refusal_score(last_logits(model, harmless_train, (), bs), ids, T) < 0
        filtered_h = [p for p, k in zip(harmful_train, keep_h) if k]
        filtered_hl = [p for p, k in zip(harmless_train, keep_hl) if k]
        if filtered_h and filtered_hl:
            harmful_train, harmless_train = filtered_h, filtered_hl
        res["data"]["after_filter"] = dict(harmful_train=len(harmful_train), harmless_train=len(harmless_train))
    tick("baseline")

    # 2. candidate directions and 3. selection
    log("[2/8] candidate directions (difference in means)")
    n_pos = (
        post_instruction_len(model.tokenizer, cfg.system_prompt) if cfg.n_positions == "eoi" else int(cfg.n_positions)
    )
    positions = list(range(-n_pos, 0))
    cands = candidate_directions(model, harmful_train, harmless_train, positions, batch_size=bs)
    tick("directions")
    log("[3/8] direction selection (bypass / induce / KL)")
    sel = select_direction(
        model,
        cands,
        positions,
        harmful_val,
        harmless_val,
        ids,
        kl_threshold=cfg.kl_threshold,
        induce_threshold=cfg.induce_threshold,
        max_layer_frac=cfg.max_layer_frac,
        temperature=T,
        batch_size=bs,
    )
    res["selection"] = sel.to_dict()
    if sel.selected is None:
        raise RuntimeError(
            "no candidate direction passed the selection filters "
            f"(KL ≤ {cfg.kl_threshold}, induce ≥ {cfg.induce_threshold}, layer < {cfg.max_layer_frac}·L); "
            "loosen them in RefusalConfig"
        )
    r, layer = sel.direction, sel.selected.layer
    res["selected"] = dict(
        layer=layer,
        position=sel.selected.position,
        bypass=sel.selected.bypass,
        induce=sel.selected.induce,
        kl=sel.selected.kl,
        norm=float(r.norm()),
    )
    tick("selection")

    # 4. ActAdd (coefficient 1 as the paper, then a coefficient chosen on val) and ablation
    log("[4/8] ActAdd bypass/induce and directional ablation")

    def actadd_rates(c_bypass: float, c_induce: float):
        h = refusal_rate(
            model, harmful_test, [AddVector("resid_pre", r, coeff=-c_bypass, layers=layer)], new, judge, bs
        )
        s = refusal_rate(
            model, harmless_test, [AddVector("resid_pre", r, coeff=c_induce, layers=layer)], new, judge, bs
        )
        return h, s

    (u_h, _), (u_hl, _) = actadd_rates(cfg.actadd_coeff, cfg.actadd_coeff)
    res["actadd_unit"] = dict(harmful_refusal=u_h, harmless_refusal=u_hl, coeff=cfg.actadd_coeff, layer=layer)
    if cfg.actadd_sweep:
        sweep = actadd_sweep(
            model, r, layer, harmful_val, harmless_val, cfg.actadd_sweep, max_new_tokens=new, judge=judge, batch_size=bs
        )
        c_bypass, c_induce = sweep.bypass_coeff, sweep.induce_coeff
        res["actadd_sweep"] = sweep.to_dict()
        (a_h, a_h_out), (a_hl, a_hl_out) = actadd_rates(c_bypass, c_induce)
    else:
        c_bypass = c_induce = cfg.actadd_coeff
        (a_h, a_h_out), (a_hl, a_hl_out) = actadd_rates(c_bypass, c_induce)
    res["actadd"] = dict(
        harmful_refusal=a_h,
        harmless_refusal=a_hl,
        coeff_bypass=c_bypass,
        coeff_induce=c_induce,
        layer=layer,
        calibrated=bool(cfg.actadd_sweep),
    )
    samples["actadd_harmful"] = _samples(data.harmful_test, a_h_out, cfg.n_samples)
    samples["actadd_harmless"] = _samples(data.harmless_test, a_hl_out, cfg.n_samples)
    ablate = [AblateDirection(r)]
    ab_h, _ = refusal_rate(model, harmful_test, ablate, new, judge, bs)
    ab_hl, _ = refusal_rate(model, harmless_test, ablate, new, judge, bs)
    res["ablation"] = dict(
        harmful_refusal=ab_h, harmless_refusal=ab_hl, harmless_kl=mean_kl(model, harmless_test, ablate, None, bs)
    )
    tick("actadd")

    # 5. routing statistics
    directions: dict[str, Tensor] = {"refusal": r, "candidates": cands.float()}
    if not model.moe_layers:
        log("model has no MoE layers: routing statistics, methods A/B and the expert control are skipped")
        skipped = {"note": "skipped: no MoE layers"}
        res.update(
            routing=skipped,
            method_a=dict(skipped),
            method_b=dict(skipped),
            method_b_all_experts=skipped,
            control={"random_experts": dict(skipped)},
        )
    else:
        log("[5/8] routing statistics (harmful vs harmless)")
        stats = routing_statistics(model, harmful_train, harmless_train, cfg.routing_last_n, cfg.routing_count, bs)
        selected = stats.select(threshold=cfg.expert_threshold)
        res["routing"] = {
            **stats.to_dict(),
            "threshold": cfg.expert_threshold,
            "selected": [dict(layer=a, expert=b, delta=c) for a, b, c in selected],
        }
        tick("routing")

        # 6. method A
        log(f"[6/8] method A: routing edits on {len(selected)} experts")
        if selected:
            bypass = methods.method_a_intervention(model, selected, "bypass", cfg.method_a_kind)
            induce = methods.method_a_intervention(model, selected, "induce", cfg.method_a_kind)
            ma_h, ma_out = refusal_rate(model, harmful_test, [bypass], new, judge, bs)
            ma_hl, _ = refusal_rate(model, harmless_test, [induce], new, judge, bs)
            res["method_a"] = dict(
                harmful_refusal=ma_h, harmless_refusal=ma_hl, kind=cfg.method_a_kind, experts=res["routing"]["selected"]
            )
            alt = "steermoe" if cfg.method_a_kind == "router_bias" else "router_bias"
            alt_h, _ = refusal_rate(
                model, harmful_test, [methods.method_a_intervention(model, selected, "bypass", alt)], new, judge, bs
            )
            res["method_a"][f"{alt}_harmful_refusal"] = alt_h
            samples["method_a_harmful"] = _samples(data.harmful_test, ma_out, cfg.n_samples)
        else:
            res["method_a"] = dict(
                harmful_refusal=None,
                harmless_refusal=None,
                experts=[],
                note=f"no expert with |Δ| ≥ {cfg.expert_threshold} pp",
            )
        tick("method_a")

        # 7. method B, its all-experts variant, and the random-expert control
        log("[7/8] method B: single-expert steering search")
        search_experts = [(a, b) for a, b, _ in stats.select(top_n=cfg.method_b_experts)]
        layer_dirs = {}
        for lay in progress(sorted({a for a, _ in search_experts}), desc="expert directions"):
            layer_dirs[lay] = methods.expert_directions(
                model, harmful_train, harmless_train, lay, positions, cfg.method_b_mode, bs
            )
        dirs = {(a, b): layer_dirs[a][:, b] for a, b in search_experts}
        search_kwargs = dict(
            coeffs=cfg.coeffs,
            kl_max=cfg.kl_max,
            keep_min=cfg.keep_min,
            n_prompts_stage2=cfg.n_prompts_stage2,
            max_new_tokens=cfg.stage2_tokens,
            judge=judge,
            temperature=T,
            batch_size=bs,
        )
        search = methods.expert_search(
            model, search_experts, dirs, positions, harmful_val, harmless_val, ids, **search_kwargs
        )
        res["method_b"] = _final_expert_eval(
            model, search, harmful_test, harmless_test, new, judge, bs, cfg.method_b_mode
        )
        if search.best is not None:
            b = search.best
            directions["method_b"] = dirs[(b.layer, b.expert)][positions.index(b.position)].float()
            all_dirs = layer_dirs[b.layer][positions.index(b.position)]
            all_steer = methods.all_experts_intervention(all_dirs, b.layer, -b.coeff)
            ae_h, _ = refusal_rate(model, harmful_test, [all_steer], new, judge, bs)
            res["method_b_all_experts"] = dict(harmful_refusal=ae_h, layer=b.layer, position=b.position, coeff=b.coeff)
        else:
            res["method_b_all_experts"] = {"note": "no method B combination passed the KL filter"}
        tick("method_b")

        rand = stats.sample_below(cfg.expert_threshold, cfg.n_random_experts, cfg.seed)
        ctrl_dirs = {}
        for lay in sorted({a for a, _, _ in rand}):
            ld = layer_dirs.get(lay)
            if ld is None:
                ld = layer_dirs[lay] = methods.expert_directions(
                    model, harmful_train, harmless_train, lay, positions, cfg.method_b_mode, bs
                )
            ctrl_dirs.update({(lay, e): ld[:, e] for a, e, _ in rand if a == lay})
        ctrl = (
            methods.expert_search(
                model,
                [(a, b) for a, b, _ in rand],
                ctrl_dirs,
                positions,
                harmful_val,
                harmless_val,
                ids,
                **search_kwargs,
            )
            if rand
            else None
        )
        res["control"] = {
            "random_experts": {
                **(
                    _final_expert_eval(model, ctrl, harmful_test, harmless_test, new, judge, bs, cfg.method_b_mode)
                    if ctrl
                    else {"harmful_refusal": None, "note": "no below-threshold expert"}
                ),
                "experts": [dict(layer=a, expert=b, delta=c) for a, b, c in rand],
            }
        }
        tick("control")

    # 8. pathways: attention vs MoE writes
    log("[8/8] pathway ablations (attention / MoE / both)")
    pw = pathway_ablation(
        model, r, harmful_test, ids, base_rate=h_rate, max_new_tokens=new, judge=judge, temperature=T, batch_size=bs
    )
    res["pathways"] = pw.to_dict()
    tick("pathways")
    res["samples"] = samples
    timing["total"] = round(time.time() - t0, 2)
    res["timing"] = timing
    return RefusalStudy(_nan_to_none(res), directions)


def _final_expert_eval(model, search, harmful_test, harmless_test, new, judge, bs, mode) -> dict:
    """Evaluate a search's best combination on the test sets (−c on harmful, +c on harmless)."""
    out = {"search": search.to_dict(), "mode": mode}
    if search.best is None:
        out.update(harmful_refusal=None, harmless_refusal=None, note="no combination passed the KL filter")
        return out
    b = search.best
    h, _ = refusal_rate(model, harmful_test, [search.intervention(-1.0)], new, judge, bs)
    hl, _ = refusal_rate(model, harmless_test, [search.intervention(+1.0)], new, judge, bs)
    out.update(
        harmful_refusal=h,
        harmless_refusal=hl,
        layer=b.layer,
        expert=b.expert,
        position=b.position,
        coeff=b.coeff,
        stage1_refusal_score=b.refusal_score,
        kl=b.kl,
        stage2_asr=b.asr,
    )
    return out
