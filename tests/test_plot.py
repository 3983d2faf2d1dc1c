"""Tests for expertlens.plot and expertlens.report (no model needed: figures take values)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from expertlens.plot import (
    attribution_bar,
    direction_selection_curves,
    expert_attribution_heatmap,
    head_attribution_heatmap,
    pathway_shares,
    routing_heatmap,
    steering_sweep,
    token_expert_strip,
)
from expertlens.report import Section, figure_div_id, render_html, report, table_html

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


def _axis_title(fig: go.Figure, name: str) -> str | None:
    return fig.layout[name].title.text


def _types(fig: go.Figure) -> list[str]:
    return [t.type for t in fig.data]


# ------------------------------------------------------------------------------------------ routing heatmap
def test_routing_heatmap_three_panels():
    harmful = torch.rand(6, 10) / 3
    harmless = torch.rand(6, 10) / 3
    fig = routing_heatmap(harmful, harmless, layers=[1, 3, 5, 7, 9, 11], title="Routing")
    assert isinstance(fig, go.Figure)
    assert _types(fig) == ["heatmap"] * 3
    h, hl, d = fig.data
    for t in fig.data:
        assert np.asarray(t.z).shape == (6, 10)
        assert list(t.y) == ["1", "3", "5", "7", "9", "11"]
        assert list(t.x) == [str(e) for e in range(10)]
    np.testing.assert_allclose(np.asarray(h.z), 100 * harmful.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(hl.z), 100 * harmless.double().numpy(), rtol=1e-6)
    # the Δ panel is exactly harmful − harmless (in percentage points)
    assert np.array_equal(np.asarray(d.z), np.asarray(h.z) - np.asarray(hl.z))
    # shared sequential scale for the two frequency panels, diverging scale centred at 0 for Δ
    assert h.coloraxis == hl.coloraxis == "coloraxis" and d.coloraxis == "coloraxis2"
    ca2 = fig.layout.coloraxis2
    assert ca2.cmid == 0 and ca2.cmin == -ca2.cmax
    assert ca2.cmax == pytest.approx(np.abs(np.asarray(d.z)).max())
    # titles and axis labels
    assert fig.layout.title.text == "Routing"
    subtitles = [a.text for a in fig.layout.annotations]
    assert subtitles[:2] == ["harmful", "harmless"] and subtitles[2].startswith("Δ harmful − harmless")
    assert _axis_title(fig, "yaxis") == "layer"
    assert [_axis_title(fig, f"xaxis{s}") for s in ("", "2", "3")] == ["expert"] * 3
    # hover carries exact values; Δ hover shows both frequencies
    assert "%{z:.6g}" in h.hovertemplate
    assert np.asarray(d.customdata).shape == (6, 10, 2)
    assert "customdata[0]" in d.hovertemplate and "customdata[1]" in d.hovertemplate


def test_routing_heatmap_single_matrix_numpy():
    delta = RNG.normal(0, 0.05, (4, 8))
    fig = routing_heatmap(delta, percent=False, title="Δ")
    assert _types(fig) == ["heatmap"]
    z = np.asarray(fig.data[0].z)
    assert z.shape == (4, 8) and np.array_equal(z, delta)
    assert fig.data[0].zmid == 0 and fig.data[0].zmin == -fig.data[0].zmax  # diverging for signed input
    assert _axis_title(fig, "xaxis") == "expert" and _axis_title(fig, "yaxis") == "layer"
    pos = routing_heatmap(np.abs(delta))
    assert pos.data[0].zmid is None  # sequential for non-negative frequencies


def test_routing_heatmap_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        routing_heatmap(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="labels"):
        routing_heatmap(np.zeros((3, 4)), layers=[0, 1])


# ------------------------------------------------------------------------------------------ token strip
def test_token_expert_strip():
    tokens = ["<s>", " How", " do", " I", " pick", " a", " lock", "?", " How"]  # duplicate token is fine
    w, i = torch.randn(len(tokens), 8).softmax(-1).topk(2, dim=-1)
    fig = token_expert_strip(tokens, i, w, n_experts=8, layer=3)
    assert _types(fig) == ["heatmap"]
    z = np.asarray(fig.data[0].z)
    assert z.shape == (8, len(tokens))
    for p in range(len(tokens)):
        expected = np.zeros(8)
        expected[i[p].numpy()] = w[p].double().numpy()
        np.testing.assert_allclose(z[:, p], expected, rtol=1e-6)
    assert (z > 0).sum() == 2 * len(tokens)  # exactly the top-k cells are coloured
    assert list(fig.layout.xaxis.ticktext) == ["<s>", "␣How", "␣do", "␣I", "␣pick", "␣a", "␣lock", "?", "␣How"]
    assert list(fig.layout.xaxis.tickvals) == list(range(len(tokens)))
    assert _axis_title(fig, "xaxis") == "token" and _axis_title(fig, "yaxis") == "expert"
    assert "layer 3" in fig.layout.title.text


def test_token_expert_strip_validation():
    with pytest.raises(ValueError, match="tokens"):
        token_expert_strip(["a"], np.zeros((2, 1)), np.ones((2, 1)), 4)
    with pytest.raises(ValueError, match="expert indices"):
        token_expert_strip(["a"], np.array([[4]]), np.ones((1, 1)), 4)


# ------------------------------------------------------------------------------------------ attribution
def test_head_attribution_heatmap():
    v = torch.randn(5, 12)
    fig = head_attribution_heatmap(v, title="Heads")
    assert _types(fig) == ["heatmap"]
    t = fig.data[0]
    np.testing.assert_allclose(np.asarray(t.z), v.double().numpy(), rtol=1e-6)
    assert t.zmid == 0 and t.zmin == -t.zmax and t.zmax == pytest.approx(v.abs().max().item(), rel=1e-6)
    assert _axis_title(fig, "xaxis") == "head" and _axis_title(fig, "yaxis") == "layer"
    assert fig.layout.title.text == "Heads"
    assert fig.layout.yaxis.autorange == "reversed"  # layer 0 on top


def test_expert_attribution_heatmap_shared_and_dense():
    v = RNG.normal(size=(4, 6))
    v[0] = np.nan  # layer 0 is dense
    shared = RNG.normal(size=4)
    dense = np.array([0.5, np.nan, np.nan, np.nan])
    fig = expert_attribution_heatmap(v, shared=shared, dense=dense, title="Experts")
    assert _types(fig) == ["heatmap"]
    t = fig.data[0]
    z = np.asarray(t.z, dtype=float)
    assert z.shape == (4, 6 + 2)
    assert list(t.x) == [str(e) for e in range(6)] + ["shared", "dense MLP"]
    np.testing.assert_array_equal(z[:, :6], v)
    np.testing.assert_array_equal(z[:, 6], shared)
    np.testing.assert_array_equal(z[:, 7], dense)
    assert list(t.y) == ["0 (dense)", "1", "2", "3"]
    assert t.zmid == 0
    assert _axis_title(fig, "xaxis") == "expert" and _axis_title(fig, "yaxis") == "layer"
    shapes = fig.layout.shapes
    assert any(s.type == "line" and s.x0 == 5.5 for s in shapes)  # separator before the extra columns
    assert sum(s.type == "rect" for s in shapes) == 1  # one dense row outlined


def test_expert_attribution_heatmap_mask_and_plain():
    v = torch.randn(3, 4)
    fig = expert_attribution_heatmap(v, dense=torch.tensor([True, False, False]))
    assert np.asarray(fig.data[0].z).shape == (3, 4)  # a mask adds no column
    assert list(fig.data[0].y) == ["0 (dense)", "1", "2"]
    plain = expert_attribution_heatmap(v)
    assert list(plain.data[0].x) == ["0", "1", "2", "3"] and len(plain.layout.shapes) == 0
    with pytest.raises(ValueError, match="shared"):
        expert_attribution_heatmap(v, shared=torch.zeros(2))


def test_attribution_bar_top_and_order():
    labels = [f"c{i}" for i in range(30)]
    values = np.linspace(-0.2, 0.2, 30)
    values[[0, 29, 1, 28, 2]] = [-1.0, 0.9, -0.8, 0.7, 0.6]
    fig = attribution_bar(labels, values, top=5, title="Top")
    assert _types(fig) == ["bar"]
    b = fig.data[0]
    assert b.orientation == "h" and len(b.x) == len(b.y) == 5
    assert list(b.y) == ["c0", "c29", "c1", "c28", "c2"]  # ranked by |value|
    np.testing.assert_array_equal(np.asarray(b.x), [-1.0, 0.9, -0.8, 0.7, 0.6])
    assert np.all(np.diff(np.abs(np.asarray(b.x))) <= 0)
    assert list(b.marker.color[:2]) == ["#2c6fbb", "#c0392b"]  # negative blue, positive red
    assert fig.layout.yaxis.autorange == "reversed"  # largest at the top
    assert _axis_title(fig, "xaxis") == "attribution" and _axis_title(fig, "yaxis") == "component"
    signed = attribution_bar(dict(zip(labels, values)), top=None, by_abs=False)
    assert len(signed.data[0].y) == 30 and list(signed.data[0].y[:3]) == ["c29", "c28", "c2"]


def test_pathway_shares():
    shares = {"attention": 0.25, "moe": 0.6, "both": torch.tensor(0.95)}
    fig = pathway_shares(shares)
    assert _types(fig) == ["bar"]
    b = fig.data[0]
    assert list(b.x) == ["attention", "moe", "both"]
    np.testing.assert_allclose(np.asarray(b.y), [0.25, 0.6, 0.95], rtol=1e-6)
    assert list(b.text) == ["25.0%", "60.0%", "95.0%"]
    assert _axis_title(fig, "xaxis") == "pathway" and _axis_title(fig, "yaxis") == "share of effect"
    assert "bypass" in fig.layout.title.text


# ------------------------------------------------------------------------------------------ direction selection
def test_direction_selection_curves_2d():
    n_p, n_l = 3, 10
    layers = np.arange(n_l)
    bypass, induce, kl = RNG.normal(size=(n_p, n_l)), RNG.normal(size=(n_p, n_l)), RNG.random((n_p, n_l))
    fig = direction_selection_curves(
        layers, bypass, torch.tensor(induce), kl, positions=[-3, -2, -1], selected=(4, -1),
        thresholds={"kl": 0.1, "induce": 0.0, "layer": 8},
    )  # fmt: skip
    assert _types(fig) == ["scatter"] * (3 * n_p + 3)
    names = [t.name for t in fig.data]
    assert names[:3] == ["pos -3"] * 3
    assert names[-3:] == ["selected: layer 4, pos -1"] * 3
    for p in range(n_p):
        byp, ind, k = fig.data[3 * p : 3 * p + 3]
        assert list(byp.x) == list(range(n_l))
        np.testing.assert_allclose(np.asarray(byp.y), bypass[p])
        np.testing.assert_allclose(np.asarray(ind.y), induce[p])
        np.testing.assert_allclose(np.asarray(k.y), kl[p])
        # one panel (y axis) per quantity, one colour per position, one legend entry per position
        assert (byp.yaxis, ind.yaxis, k.yaxis) == ("y", "y2", "y3")
        assert byp.line.color == ind.line.color == k.line.color
        assert [byp.showlegend, ind.showlegend, k.showlegend] == [True, False, False]
    stars = fig.data[-3:]
    assert [list(s.x) for s in stars] == [[4]] * 3 and [s.yaxis for s in stars] == ["y", "y2", "y3"]
    np.testing.assert_allclose([s.y[0] for s in stars], [bypass[2, 4], induce[2, 4], kl[2, 4]], rtol=1e-6)
    assert stars[0].marker.symbol == "star"
    # thresholds: dashed horizontal lines in their own panels, named in the panel titles (not on the lines)
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    dashed = [s for s in lines if s.line.dash == "dash"]
    assert {(s.yref, s.y0) for s in dashed if s.y0 == s.y1 and s.yref != "paper"} == {("y3", 0.1), ("y2", 0.0)}
    assert any(s.x0 == s.x1 == 8 for s in dashed)
    assert any(s.x0 == s.x1 == 4 for s in lines)
    texts = [a.text for a in fig.layout.annotations]
    assert texts[1].endswith("dashed: induce threshold 0") and texts[2].endswith("dashed: KL threshold 0.1")
    assert "max layer 8" in fig.layout.title.subtitle.text
    assert _axis_title(fig, "xaxis3") == "layer"
    assert _axis_title(fig, "yaxis") == _axis_title(fig, "yaxis2") == "refusal score"
    assert _axis_title(fig, "yaxis3") == "KL (nats)"


def test_direction_selection_curves_1d():
    fig = direction_selection_curves([0, 2, 4, 6], [3.0, 1.0, -2.0, 0.5], [-1.0, 2.0, 4.0, 1.0], selected=4)
    assert _types(fig) == ["scatter"] * 4
    assert [t.name for t in fig.data] == ["bypass", "induce", "selected: layer 4", "selected: layer 4"]
    assert [t.y[0] for t in fig.data[2:]] == [-2.0, 4.0]
    assert "yaxis3" not in fig.layout.to_plotly_json()  # no KL, no third panel
    with pytest.raises(ValueError, match="kl"):
        direction_selection_curves([0, 1], [0, 1], [0, 1], thresholds={"kl": 0.1})
    with pytest.raises(ValueError, match="position"):
        direction_selection_curves([0, 1], np.zeros((2, 2)), np.zeros((2, 2)), positions=[-2, -1], selected=(1, 7))


# ------------------------------------------------------------------------------------------ steering sweep
def test_steering_sweep_single_and_multi():
    c = [0.0, 1.0, 2.0, 4.0]
    fig = steering_sweep(c, [0.0, 0.3, 0.8, 1.0], kl=[0.0, 0.05, 0.2, 0.9], label="L9")
    assert _types(fig) == ["scatter", "scatter"]
    assert [t.name for t in fig.data] == ["L9", "L9 KL"]
    assert [t.yaxis for t in fig.data] == ["y", "y2"]
    assert list(fig.data[0].x) == c and list(fig.data[1].y) == [0.0, 0.05, 0.2, 0.9]
    assert _axis_title(fig, "xaxis2") == "steering coefficient"  # the bottom panel's (KL's) x axis
    assert _axis_title(fig, "yaxis") == "refusal rate" and _axis_title(fig, "yaxis2") == "KL divergence"
    assert fig.layout.yaxis2.overlaying is None  # KL has a panel of its own, not a second axis over the rates
    assert fig.layout.yaxis.tickformat == ".0%"

    multi = steering_sweep(
        {
            "a": (c, [0.1, 0.2, 0.3, 0.4]),
            "b": {"coeffs": torch.tensor(c), "refusal_rate": torch.tensor([0.2, 0.4, 0.6, 0.8]), "kl": c},
        }
    )
    assert [t.name for t in multi.data] == ["a", "b", "b KL"]
    assert multi.data[0].line.color != multi.data[1].line.color
    with pytest.raises(ValueError, match="differ"):
        steering_sweep([0, 1], [0.5])


# ------------------------------------------------------------------------------------------ report
def _all_figures() -> dict[str, go.Figure]:
    return {
        "routing": routing_heatmap(np.full((2, 3), 0.5), np.full((2, 3), 0.25), title="Routing freq"),
        "strip": token_expert_strip(["a", "b"], [[0], [1]], [[1.0], [0.5]], 3, title="Strip"),
        "heads": head_attribution_heatmap(np.eye(2), title="Head attr"),
        "experts": expert_attribution_heatmap(np.eye(2), shared=[1, 2], title="Expert attr"),
        "dirs": direction_selection_curves([0, 1], [1, 0], [0, 1], [0.1, 0.2], title="Dir select"),
        "sweep": steering_sweep([0, 1], [0.0, 1.0], title="Sweep"),
        "shares": pathway_shares({"attention": 0.3, "moe": 0.7}, title="Shares"),
        "bar": attribution_bar(["x", "y"], [1.0, -2.0], title="Top comps"),
    }


class _Study:
    """Stand-in for a study object: anything with .sections()."""

    def __init__(self, figs: dict[str, go.Figure]):
        self.figs = figs

    def sections(self) -> list[Section]:
        f = self.figs
        return [
            Section(
                "Routing & <experts>",
                figures=[f["routing"], f["strip"]],
                tables=[("top experts", [{"layer": 3, "expert": 7, "delta_pp": 12.5}, {"layer": 4, "note": "x"}])],
                text="First paragraph.\n\nSecond <b>paragraph</b>.",
            ),
            Section("Attribution", figures=[f["heads"], f["experts"], f["bar"], f["shares"]]),
            Section(
                "Direction",
                figures=[f["dirs"], f["sweep"]],
                tables=[{"layer": 9, "kl": np.float32(0.0123), "score": torch.tensor(-3.25)}],
            ),
        ]


def test_report_contains_every_figure_and_table(tmp_path: Path):
    figs = _all_figures()
    out = report(_Study(figs), tmp_path / "sub" / "report.html", title="Refusal study")
    assert out.exists()
    page = out.read_text(encoding="utf-8")
    # plotly.js embedded exactly once, inline (gzip + base64, the cartesian bundle for these traces); no CDN
    assert page.count('id="el-plotly-gz"') == 1
    assert len(re.findall(r"plotly\.js \(cartesian\) v\d", page)) == 1
    assert "<script src=" not in page and 'src="https://cdn' not in page
    # every figure div, its JSON and its title are there
    ids = [figure_div_id(0, 0), figure_div_id(0, 1)] + [figure_div_id(1, j) for j in range(4)]
    ids += [figure_div_id(2, 0), figure_div_id(2, 1)]
    for div_id in ids:
        assert f'<div id="{div_id}" class="el-plot"' in page
        assert f'<script type="application/json" id="{div_id}-json">' in page
    for fig in figs.values():
        assert fig.layout.title.text in page
    # sections, escaped text, tables
    assert "<h1>Refusal study</h1>" in page
    assert "<h2>Routing &amp; &lt;experts&gt;</h2>" in page
    assert "<p>First paragraph.</p>" in page and "Second &lt;b&gt;paragraph&lt;/b&gt;." in page
    assert page.count('<table class="el-table">') == 2
    assert "<caption>top experts</caption>" in page
    assert "<th>layer</th><th>expert</th><th>delta_pp</th><th>note</th>" in page
    assert "<td class=num>0.0123</td>" in page and "<td class=num>-3.25</td>" in page
    assert '<a href="#routing-experts">' in page


def test_report_accepts_sections_list_and_figures(tmp_path: Path):
    fig = pathway_shares({"a": 0.5}, title="Only fig")
    page = render_html([Section("S", tables=[{"a": [1, 2], "b": [3, 4]}]), fig])
    assert 'id="el-fig-1-0"' in page and "Only fig" in page
    assert "<th>a</th><th>b</th>" in page and "<td class=num>4</td>" in page  # columnar dict
    assert "<th>key</th><th>value</th>" in table_html({"x": 1, "y": "z"})  # key/value dict
    with pytest.raises(TypeError):
        render_html(42)


def test_report_screenshot(tmp_path: Path):
    """Optional: render the report in headless Chromium and check the figures were drawn (non-blank PNG)."""
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium/Chrome installed (optional: apt-get install -y chromium)")
    figs = _all_figures()
    path = report([Section("Shares", figures=[figs["shares"]])], tmp_path / "r.html")
    png = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--screenshot={png}", "--window-size=1000,800", "--virtual-time-budget=5000", path.as_uri()]  # fmt: skip
    try:
        subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("headless Chromium did not finish within 60 s")
    if not png.exists():
        pytest.skip("headless Chromium produced no screenshot in this environment")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # a drawn bar chart compresses far worse than a blank page
    assert len(data) > 15_000


def test_every_figure_writes_html(tmp_path: Path):
    """Every figure serialises (as Jupyter rendering does) and ``fig.write_html`` works."""
    for name, fig in _all_figures().items():
        assert isinstance(fig, go.Figure)
        fig.to_plotly_json()
        out = tmp_path / f"{name}.html"
        fig.write_html(out, include_plotlyjs=False)
        assert fig.layout.title.text in out.read_text(encoding="utf-8")
