"""One comparison table and report across several studies (e.g. every shipped organism), as the paper compares
three models.

Example:
    >>> from expertlens.refusal.compare import comparison_rows
    >>> rows = comparison_rows({"a": study_a, "b": study_b})  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

from ..report import Section
from .results import to_jsonable

__all__ = ["comparison_rows", "claim_rows", "write_comparison"]

#: The conditions compared across studies (a control's first draw stands for it; every draw is in each report).
_KEYS = ("baseline", "actadd", "ablation", "method_a", "method_a_control_1", "method_b", "method_b_control_1",
         "control")  # fmt: skip


def comparison_rows(studies: dict) -> list[dict]:
    """One row per (study, condition): refusal, ASR and non-response on harmful test, harmless refusal, KL.

    Example:
        >>> from expertlens.refusal.compare import comparison_rows
        >>> comparison_rows({})
        []
    """
    rows = []
    for name, study in studies.items():
        res = study.result
        for key in _KEYS:
            c = res.condition(key)
            if c is None:
                continue
            row = {"model": name, "family": res.model["family"], "condition": c.label}
            if c.bypass is None:
                row.update({k: "not run" for k in ("harmful: refusal", "harmful: ASR", "harmful: non-response")})
                row.update({"harmless: refusal": "not run", "harmless KL (nats)": c.note or "not run"})
            else:
                row["harmful: refusal"] = c.bypass.refusal.pct()
                row["harmful: ASR"] = f"{c.bypass.full_response.pct()} {c.bypass.full_response.interval()}"
                row["harmful: non-response"] = c.bypass.non_response.pct()
                row["harmless: refusal"] = c.induce.refusal.pct() if c.induce is not None else "not run"
                row["harmless KL (nats)"] = "n/a" if c.harmless_kl is None else f"{c.harmless_kl:.3f}"
            rows.append(row)
    return rows


def claim_rows(studies: dict) -> list[dict]:
    """One row per study: the status of each claim.

    Example:
        >>> from expertlens.refusal.compare import claim_rows
        >>> claim_rows({})
        []
    """
    rows = []
    for name, study in studies.items():
        row = {"model": name}
        for c in study.result.claims:
            row[f"claim {c.number}: {c.title}"] = c.status
        rows.append(row)
    return rows


def write_comparison(studies: dict, out_dir: str | Path, report: bool = True) -> Path:
    """Write ``comparison.json`` (and ``comparison.html``) into ``out_dir``; returns the report's (or JSON's) path.

    Example:
        >>> from expertlens.refusal.compare import write_comparison
        >>> write_comparison({"qwen3moe-refusal": study}, "runs/all")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "studies": list(studies),
        "conditions": comparison_rows(studies),
        "claims": claim_rows(studies),
        "verdicts": {n: [to_jsonable(c) for c in s.result.claims] for n, s in studies.items()},
    }
    (out / "comparison.json").write_text(json.dumps(doc, indent=1))
    if not report:
        return out / "comparison.json"
    from ..report import report as write_report

    sections = [
        Section(
            "Claims across models",
            tables=[claim_rows(studies)],
            text="Each study's computed verdicts; see each model's own report for the evidence.",
        ),  # fmt: skip
        Section(
            "Conditions across models",
            tables=[comparison_rows(studies)],
            text="Rates on each model's held-out test prompts; ASR = share of full responses (95% interval).",
        ),  # fmt: skip
    ]
    for name, s in studies.items():
        text = "\n\n".join(f"Claim {c.number} ({c.title}): {c.verdict}." for c in s.result.claims)
        sections.append(Section(f"{name}", text=text + f"\n\nFull report: {name}/report.html"))
    path = out / "comparison.html"
    write_report(sections, path, title="Expert-aware refusal steering across models")
    return path
