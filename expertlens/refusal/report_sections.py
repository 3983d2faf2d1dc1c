"""Turn a RefusalStudy into report sections (tables + plotly figures). Plots take results, never models."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import plot
from ..report import Section

if TYPE_CHECKING:
    from .study import RefusalStudy

__all__ = ["study_sections"]


def _rate(x):
    return None if x is None else round(100 * x, 1)


def study_sections(study: RefusalStudy) -> list[Section]:
    """Sections of the study report: headline table, selection, routing, methods, pathways, samples.

    Example:
        >>> from expertlens.refusal import RefusalStudy
        >>> from expertlens.refusal.report_sections import study_sections
        >>> sections = study_sections(RefusalStudy.load("runs/organism"))  # doctest: +SKIP
        >>> [s.title for s in sections]  # doctest: +SKIP
    """
    r = study.results
    out: list[Section] = []
    headline = [
        {
            "condition": "baseline",
            "harmful refusal %": _rate(r["baseline"]["harmful_refusal"]),
            "harmless refusal %": _rate(r["baseline"]["harmless_refusal"]),
        },
        {
            "condition": "ActAdd, coefficient 1 (−r / +r)",
            "harmful refusal %": _rate(r["actadd_unit"]["harmful_refusal"]),
            "harmless refusal %": _rate(r["actadd_unit"]["harmless_refusal"]),
        },
        {
            "condition": "ActAdd, coefficient from val (−c·r / +c·r)",
            "harmful refusal %": _rate(r["actadd"]["harmful_refusal"]),
            "harmless refusal %": _rate(r["actadd"]["harmless_refusal"]),
        },
        {
            "condition": "directional ablation",
            "harmful refusal %": _rate(r["ablation"]["harmful_refusal"]),
            "harmless refusal %": _rate(r["ablation"]["harmless_refusal"]),
        },
        {
            "condition": "method A (routing)",
            "harmful refusal %": _rate(r["method_a"].get("harmful_refusal")),
            "harmless refusal %": _rate(r["method_a"].get("harmless_refusal")),
        },
        {
            "condition": "method B (single expert)",
            "harmful refusal %": _rate(r["method_b"].get("harmful_refusal")),
            "harmless refusal %": _rate(r["method_b"].get("harmless_refusal")),
        },
        {
            "condition": "control: random experts",
            "harmful refusal %": _rate(r["control"]["random_experts"].get("harmful_refusal")),
            "harmless refusal %": None,
        },
    ]
    out.append(
        Section(
            "Summary",
            tables=[headline, ("model", r["model"]), ("timing (s)", r["timing"])],
            text="Refusal rates: fraction of greedy completions judged refusals, on held-out test prompts.",
        )
    )

    sel = r["selection"]
    cands = sel["candidates"]
    positions = sorted({c["position"] for c in cands})
    layers = sorted({c["layer"] for c in cands})

    def grid(key):
        z = np.full((len(positions), len(layers)), np.nan)
        for c in cands:
            if c[key] is not None:
                z[positions.index(c["position"]), layers.index(c["layer"])] = c[key]
        return z

    fig = plot.direction_selection_curves(
        layers,
        grid("bypass"),
        grid("induce"),
        grid("kl"),
        positions=positions,
        selected=(r["selected"]["layer"], r["selected"]["position"]),
        thresholds={
            k: v
            for k, v in (("kl", sel["filters"]["kl_threshold"]), ("induce", sel["filters"]["induce_threshold"]))
            if v is not None
        },
    )
    out.append(
        Section(
            "Refusal direction (difference in means)",
            figures=[fig],
            tables=[("selected", r["selected"])],
            text="Bypass: refusal score on harmful prompts with the direction ablated; induce: on harmless "
            "prompts with the direction added at that layer; KL on harmless prompts under ablation.",
        )
    )

    if "freq_harmful" in r["routing"]:
        rt = r["routing"]
        fig = plot.routing_heatmap(
            np.array(rt["freq_harmful"]) / 100,
            np.array(rt["freq_harmless"]) / 100,
            layers=rt["layers"],
            title=f"Routing frequency ({rt['count']}, last {rt['last_n']} tokens)",
        )
        out.append(
            Section(
                "Routing statistics",
                figures=[fig],
                tables=[("selected experts", rt["selected"] or [{"note": "none above threshold"}])],
            )
        )
        out.append(
            Section(
                "Method A: routing edits",
                tables=[("method A", {k: v for k, v in r["method_a"].items() if k != "experts"})],
            )
        )
        mb = r["method_b"]
        figs = []
        search = mb.get("search", {})
        if mb.get("layer") is not None and search.get("stage2"):
            rows = [
                x
                for x in search["stage2"]
                if x["layer"] == mb["layer"] and x["expert"] == mb["expert"] and x["position"] == mb["position"]
            ]
            rows.sort(key=lambda x: x["coeff"])
            if rows:
                figs.append(
                    plot.steering_sweep(
                        [x["coeff"] for x in rows],
                        [1 - x["asr"] for x in rows],
                        [x["kl"] for x in rows],
                        label=f"L{mb['layer']} E{mb['expert']}",
                        title="Method B: refusal rate vs coefficient (stage 2 survivors)",
                    )
                )
        out.append(
            Section(
                "Method B: single-expert steering",
                figures=figs,
                tables=[
                    ("best", {k: v for k, v in mb.items() if k != "search"}),
                    ("stage 2", search.get("stage2", [])),
                    ("all-experts variant", r["method_b_all_experts"]),
                    (
                        "random below-threshold experts",
                        {k: v for k, v in r["control"]["random_experts"].items() if k != "search"},
                    ),
                ],
            )
        )
    pw = r["pathways"]
    figs = (
        [plot.pathway_shares(pw["shares"])]
        if pw.get("shares") and all(v is not None for v in pw["shares"].values())
        else []
    )
    out.append(
        Section(
            "Pathways: attention vs MoE writes",
            figures=figs,
            tables=[("refusal score", pw["refusal_score"]), ("harmful refusal", pw["harmful_refusal"])],
            text="The refusal direction is ablated from attention writes only, MoE/MLP writes only, or "
            "every residual write; shares are each pathway's fraction of the full drop in refusal score.",
        )
    )
    samples = [{"condition": k, **s} for k, rows in r["samples"].items() for s in rows]
    out.append(Section("Sample generations", tables=[samples]))
    return out
