"""The study report in a real browser: headless Chromium renders it without console errors.

Skips (saying why) where Chromium is not installed; CI installs it with ``apt-get install -y chromium``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from expertlens import ExpertModel
from expertlens.refusal import RefusalConfig, RefusalData, run_refusal_study
from expertlens.testing import tiny_model, tiny_tokenizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]  # fmt: skip


def _render(page: Path, shot: Path) -> list[str]:
    """Console lines (messages and uncaught errors) the page produced, after writing a screenshot."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,3000",
             page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


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
