"""Layout rules of the report's figures, checked without a browser on the default study's saved results.

tests/data/organism_study_results.json is ``expertlens refusal`` on the default organism (results.json as saved).
The rules: every figure fills the page (no fixed width), no trace or panel draws nothing, one y axis per
quantity (no overlaid second axis), readable tick steps where a figure sets them, one plotly bundle per page
and the default study's report at most 1.5 MB.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from expertlens.plot import causal_map, outcome_sweep
from expertlens.refusal import RefusalStudy
from expertlens.refusal.results import StudyResults
from expertlens.report import Section, render_html

RESULTS = Path(__file__).parent / "data" / "organism_study_results.json"
MAX_REPORT_BYTES = 1_500_000


@pytest.fixture(scope="module")
def page() -> str:
    study = RefusalStudy(StudyResults.from_dict(json.loads(RESULTS.read_text())))
    return render_html(study, title="Expert-aware refusal steering")


def _figures(page: str) -> dict[str, dict]:
    """Figure id → the figure JSON the page draws."""
    found = re.findall(r'<script type="application/json" id="(el-fig-\d+-\d+)-json">(.*?)</script>', page, re.S)
    return {div_id: json.loads(spec) for div_id, spec in found}


def _values(trace: dict) -> np.ndarray:
    key = "x" if trace.get("orientation") == "h" else "z" if "z" in trace else "y"
    raw = trace.get(key, [])
    if isinstance(raw, dict):  # plotly's typed-array encoding of numpy data
        return np.frombuffer(base64.b64decode(raw["bdata"]), dtype=raw["dtype"]).astype(float)
    return np.asarray([np.nan if v is None else v for v in np.ravel(raw)], dtype=float)


def _nice(step: float) -> bool:
    """Whether a tick step is 1, 2, 2.5 or 5 times a power of ten."""
    mant = step / 10 ** math.floor(math.log10(step))
    return any(math.isclose(mant, m, rel_tol=1e-6) for m in (1, 2, 2.5, 5, 10))


def test_default_study_report_is_small_with_one_plotly_bundle(page):
    assert len(page.encode()) <= MAX_REPORT_BYTES
    assert page.count('id="el-plotly-gz"') == 1  # one bundle, inline
    assert len(re.findall(r"plotly\.js[^,]* v\d", page)) == 1
    assert "<script src=" not in page
    assert len(_figures(page)) >= 6  # the study's figures are all there


def test_every_report_figure_fills_the_page_width(page):
    for div_id, fig in _figures(page).items():
        assert "width" not in fig["layout"], div_id
        assert fig["layout"].get("autosize") is True, div_id


def test_no_report_figure_has_an_empty_trace_or_panel(page):
    for div_id, fig in _figures(page).items():
        assert fig["data"], div_id
        for trace in fig["data"]:
            v = _values(trace)
            finite = v[np.isfinite(v)]
            assert finite.size and np.any(finite), f"{div_id}: {trace.get('name')} draws nothing"
        axes = {k for k in fig["layout"] if re.fullmatch(r"yaxis\d*", k)} or {"yaxis"}
        used = {"yaxis" + t.get("yaxis", "y")[1:] for t in fig["data"]}
        assert axes <= used, f"{div_id}: panels {sorted(axes - used)} have no trace"


def test_one_y_axis_per_quantity_and_round_tick_steps(page):
    for div_id, fig in _figures(page).items():
        for name, axis in fig["layout"].items():
            if not re.fullmatch(r"[xy]axis\d*", name):
                continue
            assert "overlaying" not in axis, f"{div_id}: {name} is a second axis over another"
            assert axis.get("tickmode") != "sync", div_id
            if isinstance(axis.get("dtick"), (int, float)):
                assert _nice(axis["dtick"]), f"{div_id}: {name} ticks every {axis['dtick']}"


def test_causal_map_leaves_out_flat_panels_and_bar_less_components():
    # the default organism's causal map: only attention at layer 0 changes refusal; ASR never changes
    cm = StudyResults.from_dict(json.loads(RESULTS.read_text())).causal_map
    fig = causal_map(cm.layers, cm.d_refusal, cm.d_asr)
    assert [(t.name, t.xaxis) for t in fig.data] == [("attention output", "x")]
    assert "xaxis2" not in fig.layout.to_plotly_json()  # no ASR panel
    note = fig.layout.title.subtitle.text
    assert "zeroing the MoE output changes it at no layer" in note and "ASR" in note and "omitted" in note
    nothing = causal_map([0, 1], {"moe": [0.0, None]}, {"moe": [0.0, 0.0]})
    assert not nothing.data and nothing.layout.showlegend is False
    assert nothing.layout.title.subtitle.text.count("panel omitted") == 2


def test_outcome_sweep_names_the_series_it_leaves_out():
    fig = outcome_sweep([1, 2], {"refusal": [0.5, 1.0], "non-response": [0.0, 0.0]}, kl=[0.0, 0.0])
    assert [t.name for t in fig.data] == ["refusal"]
    assert fig.layout.title.subtitle.text.split("<br>")[0] == "Not drawn: non-response (0% at every coefficient)."
    assert "no KL panel" in fig.layout.title.subtitle.text
    assert "width" not in fig.layout.to_plotly_json() and fig.layout.autosize is True


def test_a_page_with_other_trace_types_carries_the_full_bundle():
    page = render_html([Section("3-D", figures=[go.Figure(go.Scatter3d(x=[0], y=[0], z=[0]))])])
    assert page.count('id="el-plotly-gz"') == 1
    assert re.search(r"<!-- plotly\.js v\d", page)  # the full bundle, not the cartesian one
