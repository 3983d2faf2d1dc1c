"""The study as report sections, a text table and a notebook summary; all read the typed results.

Example:
    >>> from expertlens.refusal.report_sections import study_sections
    >>> from expertlens.refusal import RefusalStudy
    >>> sections = study_sections(RefusalStudy.load("runs/organism").result)  # doctest: +SKIP
    >>> [s.title for s in sections][:2]  # doctest: +SKIP
    ['Summary', 'Claim 1: ActAdd transfers to MoE models']
"""

from __future__ import annotations

import html
import math

import numpy as np

from .. import plot
from ..report import Section, table_html
from .results import Condition, StudyResults

__all__ = ["study_sections", "text_table", "summary_html", "condition_rows"]

_CLASS_LABEL = {"refusal": "refusal", "full_response": "full response", "non_response": "non-response"}


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _params(c: Condition) -> str:
    names = {"layer": "layer", "position": "position", "coefficient": "c", "bypass_coefficient": "bypass c",
             "induce_coefficient": "induce c", "expert": "expert", "kind": "edit", "experts": "experts",
             "direction": "direction", "stage2_asr": "stage-2 ASR", "searched": "searched",
             "kl_target": "method B's KL (nats)", "kl_matched": "KL matched"}  # fmt: skip
    bits = []
    for k, v in c.params.items():
        if k == "stage2_asr":
            v = _pct(v)
        elif isinstance(v, float):
            v = f"{v:g}"
        bits.append(f"{names.get(k, k.replace('_', ' '))} {v}")
    return "; ".join(bits + ([c.note] if c.note else []))


def condition_rows(res: StudyResults) -> list[dict]:
    """One row per condition with every rate as ``x% [lo–hi%]`` and ``n`` (no empty cells).

    Example:
        >>> from expertlens.refusal.report_sections import condition_rows
        >>> condition_rows(study.result)[0]["condition"]  # doctest: +SKIP
        'baseline (no intervention)'
    """
    rows = []
    for c in res.conditions:
        row = {"condition": c.label}
        if c.bypass is None:
            row.update({"harmful: refusal": "not run", "harmful: full response (ASR)": "not run",
                        "harmful: non-response": "not run", "harmless: refusal": "not run",
                        "harmless KL (nats)": "not run", "capability retained": "not run"})  # fmt: skip
        else:
            b = c.bypass
            row["harmful: refusal"] = f"{b.refusal.pct()} {b.refusal.interval()}"
            row["harmful: full response (ASR)"] = f"{b.full_response.pct()} {b.full_response.interval()}"
            row["harmful: non-response"] = f"{b.non_response.pct()} {b.non_response.interval()}"
            row["n harmful"] = b.n
            row["harmless: refusal"] = (
                f"{c.induce.refusal.pct()} {c.induce.refusal.interval()}" if c.induce is not None else "not run"
            )
            row["harmless KL (nats)"] = "n/a" if c.harmless_kl is None else f"{c.harmless_kl:.3f}"
            row["capability retained"] = _pct(c.capability.retention) if c.capability else "n/a"
        row["settings"] = _params(c) if c.bypass is not None else (c.note or "not run")
        rows.append(row)
    return rows


def text_table(res: StudyResults) -> str:
    """The headline numbers as plain text: one line per condition, then the claim verdicts.

    Example:
        >>> from expertlens.refusal.report_sections import text_table
        >>> print(text_table(study.result))  # doctest: +SKIP
    """
    head = f"{'condition':52s} {'refusal':>8s} {'ASR':>7s} {'non-resp':>9s} {'harmless':>9s} {'KL':>7s} {'capab.':>7s}"
    lines = [head, "-" * len(head)]
    for c in res.conditions:
        if c.bypass is None:
            lines.append(f"{c.label[:52]:52s} {c.note}")
            continue
        b = c.bypass
        ind = c.induce.refusal.pct() if c.induce is not None else "n/a"
        kl = "n/a" if c.harmless_kl is None else f"{c.harmless_kl:.3f}"
        cap = _pct(c.capability.retention) if c.capability else "n/a"
        lines.append(
            f"{c.label[:52]:52s} {b.refusal.pct():>8s} {b.full_response.pct():>7s} {b.non_response.pct():>9s} "
            f"{ind:>9s} {kl:>7s} {cap:>7s}"
        )
        if c.note:  # e.g. a control whose KL could not be matched to method B's
            lines.append(f"  note: {c.note}")
    base = res.condition("baseline")
    n = f"n = {base.bypass.n} harmful / {base.induce.n} harmless test prompts" if base and base.bypass else ""
    lines.append(f"refusal / ASR / non-response on harmful test prompts; harmless: refusal on harmless test; {n}")
    for claim in res.claims:
        lines.append(f"claim {claim.number} ({claim.title}): {claim.verdict}")
    return "\n".join(lines)


def summary_html(res: StudyResults, name: str | None = None) -> str:
    """A compact HTML summary (claims and the condition table) for Jupyter.

    Example:
        >>> from expertlens.refusal.report_sections import summary_html
        >>> summary_html(study.result)[:4]  # doctest: +SKIP
        '<div'
    """
    claims = "".join(
        f"<li><b>Claim {c.number}: {html.escape(c.title)}</b> — {html.escape(c.verdict)}</li>" for c in res.claims
    )
    name = html.escape(name or str(res.model.get("name") or res.model.get("family")))
    return (
        f"<div><p><b>Refusal study</b> on {name} (preset {html.escape(res.preset)}, "
        f"{html.escape(str(res.judge.get('name')))} judge)</p><ul>{claims}</ul>"
        + table_html(condition_rows(res), caption="conditions (95% bootstrap intervals)")
        + "</div>"
    )


def _claim_section(claim, figures, notes=()) -> Section:
    text = [f"Verdict: {claim.verdict}."]
    if claim.evidence:
        text.append("Evidence. " + " ".join(claim.evidence))
    if claim.controls:
        text.append("Controls. " + " ".join(claim.controls))
    if claim.caveats:
        text.append("Caveats. " + " ".join(claim.caveats))
    text.extend(notes)  # what a figure would have shown, where it had nothing to draw
    return Section(f"Claim {claim.number}: {claim.title}", figures=figures, text="\n\n".join(text))


def study_sections(res: StudyResults) -> list[Section]:
    """Sections of the report: summary, one per claim, direction, routing, deviations, judge, samples, run.

    Example:
        >>> from expertlens.refusal.report_sections import study_sections
        >>> titles = [s.title for s in study_sections(study.result)]  # doctest: +SKIP
    """
    out: list[Section] = []
    verdicts = "\n\n".join(f"Claim {c.number} ({c.title}): {c.verdict}." for c in res.claims)
    base = res.condition("baseline")
    n = f" ({base.bypass.n} harmful and {base.induce.n} harmless test prompts)" if base and base.bypass else ""
    out.append(
        Section(
            "Summary",
            tables=[("conditions: rates on held-out test prompts, 95% bootstrap intervals", condition_rows(res))],
            text=verdicts + "\n\n"
            f"Every rate is the share of greedy completions the judge puts in that class{n}. Full response is the "
            "attack success rate (ASR); the harmful columns are under the bypass edit, the harmless refusal under "
            "the induce edit; harmless KL and capability are measured under the bypass edit.",
        )
    )
    # claims
    figs1 = []
    if res.actadd_sweep is not None and res.actadd_sweep.points:
        pts = res.actadd_sweep.points
        figs1.append(
            plot.outcome_sweep(
                [p.coeff for p in pts],
                {
                    "refusal": [p.bypass.refusal.value for p in pts],
                    "full response (ASR)": [p.bypass.full_response.value for p in pts],
                    "non-response": [p.bypass.non_response.value for p in pts],
                },
                kl=[p.harmless_kl for p in pts],
                chosen=res.actadd_sweep.bypass_coeff,
                title="ActAdd sweep on harmful validation prompts (−c·r)",
            )
        )
        figs1.append(
            plot.outcome_sweep(
                [p.coeff for p in pts],
                {
                    "refusal": [p.induce.refusal.value for p in pts],
                    "full response (ASR)": [p.induce.full_response.value for p in pts],
                    "non-response": [p.induce.non_response.value for p in pts],
                },
                chosen=res.actadd_sweep.induce_coeff,
                title="ActAdd sweep on harmless validation prompts (+c·r)",
            )  # fmt: skip
        )
    figs3, notes3 = [], []
    if res.causal_map is not None:
        cm = res.causal_map
        title = f"Causal map: zero one component ({cm.n_prompts} harmful test prompts)"
        fig = plot.causal_map(cm.layers, cm.d_refusal, cm.d_asr, title=title)
        if fig.data:
            figs3.append(fig)
        else:  # no component changed anything: a sentence instead of an empty chart
            notes3.append(f"{title}: {fig.layout.title.subtitle.text}")
    if res.pathways and res.pathways.get("shares") and all(v is not None for v in res.pathways["shares"].values()):
        shares = {{"moe": "MoE writes", "attention": "attention writes", "both": "every write"}.get(k, k): v
                  for k, v in res.pathways["shares"].items()}  # fmt: skip
        figs3.append(plot.pathway_shares(shares, title="Share of the ablation's drop in refusal score"))
    figures = {1: figs1, 3: figs3}  # by claim number: a claim without figures still gets its section
    notes = {3: notes3}
    for claim in res.claims:
        out.append(_claim_section(claim, figures.get(claim.number, []), notes.get(claim.number, ())))
    # direction
    sel, chosen = res.selection, res.selected
    cands = sel.get("candidates", [])
    if cands:
        positions = sorted({c["position"] for c in cands})
        layers = sorted({c["layer"] for c in cands})

        def grid(key):
            z = np.full((len(positions), len(layers)), np.nan)
            for c in cands:
                if c[key] is not None:
                    z[positions.index(c["position"]), layers.index(c["layer"])] = c[key]
            return z

        thresholds = {k: v for k, v in (("kl", sel["filters"]["kl_threshold"]),
                                         ("induce", sel["filters"]["induce_threshold"])) if v is not None}  # fmt: skip
        fig = plot.direction_selection_curves(
            layers, grid("bypass"), grid("induce"), grid("kl"), positions=positions,
            selected=(chosen["layer"], chosen["position"]), thresholds=thresholds,
        )  # fmt: skip
        text = (
            f"Selected: layer {chosen['layer']}, position {chosen['position']} (norm {chosen['norm']:.3g}); bypass "
            f"score {chosen['bypass']:.3g}, induce score {chosen['induce']:.3g}, KL {chosen['kl']:.3g} on harmless val."
            " Bypass: refusal score on harmful val with the direction ablated; induce: on harmless val with the "
            "direction added at that layer; KL on harmless val under ablation."
        )
        if sel.get("relaxed"):
            text += f" Note: {sel['relaxed']}."
        out.append(Section("Refusal direction (difference in means)", figures=[fig], text=text))
    # routing
    rt = res.routing
    if rt and "freq_harmful" in rt:
        fig = plot.routing_heatmap(
            np.array(rt["freq_harmful"]) / 100, np.array(rt["freq_harmless"]) / 100, layers=rt["layers"],
            title=f"Routing frequency ({'top-1' if rt['count'] == 'top1' else 'top-k'}, last {rt['last_n']} tokens)",
        )  # fmt: skip
        sel_rows = [
            {"layer": x["layer"], "expert": x["expert"], "Δ (pp)": f"{x['delta']:+.1f}"} for x in rt["selected"]
        ]
        rand_rows = [{"layer": x["layer"], "expert": x["expert"], "Δ (pp)": f"{x['delta']:+.1f}"}
                     for x in rt.get("random_experts", [])]  # fmt: skip
        tables = [(f"experts with |Δ| ≥ {rt['threshold']:g} pp (method A)",
                   sel_rows or [{"note": f"no expert reaches {rt['threshold']:g} pp"}])]  # fmt: skip
        if rand_rows:
            tables.append(("random below-threshold experts (control)", rand_rows))
        out.append(Section("Routing statistics", figures=[fig], tables=tables,
                           text=f"Routing counted on {rt['n_prompts'][0]} harmful and {rt['n_prompts'][1]} harmless "
                           "train prompts; Δ = harmful minus harmless frequency in percentage points."))  # fmt: skip
    # deviations
    dev = [{"setting": d.setting, "authors' code": d.paper, "this run": d.here, "why": d.why} for d in res.deviations]
    out.append(Section("Deviations from the authors' code", tables=[dev],
                       text=f"Preset: {res.preset}. RefusalConfig.paper() reproduces the authors' defaults; the first "
                       "rows are deliberate in every preset."))  # fmt: skip
    # judge
    cal = res.judge.get("calibration") or {}
    cal_rows = [{"limit": k.replace("_", " "), "value": f"{v:.3g}" if isinstance(v, float) else str(v)}
                for k, v in cal.items()]  # fmt: skip
    out.append(Section("Judge", tables=[cal_rows] if cal_rows else [],
                       text=f"{res.judge.get('description')}. Classes: refusal, full response, non-response (the "
                       "authors' three classes; ASR = full response)."))  # fmt: skip
    # samples
    samples = []
    for c in res.conditions:
        for side, o in (("harmful", c.bypass), ("harmless", c.induce)):
            if o is None:
                continue
            for s in o.samples:
                samples.append({"condition": c.label, "prompts": side, "verdict": _CLASS_LABEL[s["verdict"]],
                                "prompt": s["prompt"], "completion": s["completion"]})  # fmt: skip
    out.append(Section("Samples", tables=[samples] if samples else [], text="Greedy completions per condition."))
    # run
    m = res.model
    model_rows = [{"model": m.get("name") or "(in memory)", "family": m["family"], "layers": m["n_layers"],
                   "MoE layers": len(m["moe_layers"]), "experts": m["n_experts"], "top-k": m["top_k"],
                   "d_model": m["d_model"]}]  # fmt: skip
    data_rows = [{"split": k.replace("_", " "), "prompts": v} for k, v in res.data.items() if isinstance(v, int)]
    timing = [{"stage": k.replace("_", " "), "seconds": v} for k, v in res.timing.items()]
    out.append(Section("Run", tables=[("model", model_rows), ("data", data_rows), ("time (s)", timing)]))
    return out
