"""The study report in a real browser: headless Chromium renders it without console errors, every figure drawn
at the page's width with round tick steps, and full-page screenshots (1400 px wide) are saved.

Skips (saying why) where Chromium is not installed; CI installs it with ``apt-get install -y chromium``. The
screenshots go to the test's temporary folder, and also to ``$EXPERTLENS_SCREENSHOTS`` where that is set.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from expertlens import ExpertModel
from expertlens.refusal import RefusalConfig, RefusalData, RefusalStudy, run_refusal_study
from expertlens.refusal.results import StudyResults
from expertlens.report import report
from expertlens.testing import tiny_model, tiny_tokenizer

RESULTS = Path(__file__).parent / "data" / "organism_study_results.json"  # the default study, as saved
WIDTH = 1400

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]  # fmt: skip


def _chromium(page: Path, *args: str, height: int = 3000) -> subprocess.CompletedProcess:
    # the virtual-time budget lets the page unpack plotly.js and draw every figure before the shot or dump
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
             f"--window-size={WIDTH},{height}", *args, page.resolve().as_uri()],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip


def _render(page: Path, shot: Path, height: int = 3000) -> list[str]:
    """Console lines (messages and uncaught errors) the page produced, after writing a screenshot."""
    proc = _chromium(page, f"--screenshot={shot}", height=height)
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


# Appended to a copy of the page: once the report has drawn its figures, write what plotly laid out (page height,
# each figure's width against its container's, each axis' type and tick step) into the DOM for --dump-dom.
_PROBE = """<script>
(function wait() {
  if (!document.body.dataset.elPlotted) return setTimeout(wait, 50);
  const figs = [...document.querySelectorAll("div.el-plot")].map((gd) => {
    const full = gd._fullLayout;
    const axes = Object.keys(full).filter((k) => /^[xy]axis[0-9]*$/.test(k))
      .map((k) => ({name: k, type: full[k].type, dtick: full[k].dtick, ticks: (full[k]._vals || []).map((t) => t.x)}));
    return {id: gd.id, width: full.width, container: gd.clientWidth, axes};
  });
  const out = document.createElement("pre");
  out.id = "el-probe";
  out.textContent = JSON.stringify({plotted: +document.body.dataset.elPlotted,
                                    height: document.documentElement.scrollHeight, figs});
  document.body.appendChild(out);
})();
</script>"""


def _probe(page: Path, tmp: Path) -> dict:
    probed = tmp / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(probed, "--dump-dom").stdout
    found = re.search(r'<pre id="el-probe">(.*?)</pre>', dom, re.S)
    assert found, "the report drew no figures (el-plotted never set)"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<"))


def _nice(step: float) -> bool:
    mant = step / 10 ** math.floor(math.log10(step))
    return any(math.isclose(mant, m, rel_tol=1e-6) for m in (1, 2, 2.5, 5, 10))


def _save(shot: Path) -> None:
    where = os.environ.get("EXPERTLENS_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(where) / shot.name)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_chromium_without_console_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); notDefined();</script></body></html>")
    assert len(_render(bad, tmp_path / "bad.png")) == 2  # the check can fail

    harm = [f"hurt my friend {i}, now!" for i in range(10)]
    safe = [f"hug my friend {i} please" for i in range(10)]
    model = ExpertModel(tiny_model("qwen2_moe"), tiny_tokenizer())
    cfg = RefusalConfig.fast().with_(
        kl_threshold=float("inf"), induce_threshold=float("-inf"), max_layer_frac=1.0, filter_train=False,
        max_new_tokens=3, stage2_tokens=3, expert_threshold=1.0, n_positions=3, routing_last_n=3,
        actadd_sweep=(1.0, 2.0), n_causal=4,
    )  # fmt: skip
    study = run_refusal_study(model, RefusalData.from_lists(harm, safe), cfg, log=lambda *a: None)
    out = study.save(tmp_path / "run")
    shot = tmp_path / "report.png"
    console = _render(out / "report.html", shot)
    assert console == [], console
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_default_study_report_draws_full_width_figures_with_round_ticks(tmp_path):
    study = RefusalStudy(StudyResults.from_dict(json.loads(RESULTS.read_text())))
    page = report(study, tmp_path / "report.html", title="Expert-aware refusal steering")
    n_figs = page.read_text(encoding="utf-8").count('class="el-plot"')
    facts = _probe(page, tmp_path)
    assert facts["plotted"] == n_figs == len(facts["figs"]) >= 6
    widths = {f["container"] for f in facts["figs"]}
    assert len(widths) == 1 and widths.pop() > 0.9 * (WIDTH - 100)  # one width: the page's, less its padding
    for fig in facts["figs"]:
        assert abs(fig["width"] - fig["container"]) <= 2, fig["id"]  # the figure fills its container
        for axis in fig["axes"]:
            if axis["type"] == "linear" and len(axis["ticks"]) > 1:
                assert _nice(float(axis["dtick"])), f"{fig['id']} {axis['name']}: ticks {axis['ticks']}"
    shot = tmp_path / "default_study_report.png"  # the whole page, 1400 px wide
    console = _render(page, shot, height=facts["height"])
    assert console == [], console
    assert shot.stat().st_size > 100_000
    _save(shot)
