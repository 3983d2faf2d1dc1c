"""Render every ``expertlens.plot`` figure from synthetic but realistic data into ``docs/images/*.png``.

Usage::

    python docs/make_figures.py              # PNGs (needs kaleido + a Chrome/Chromium) and a demo report
    python docs/make_figures.py --html-only  # only the demo HTML report

PNG export uses kaleido (``pip install kaleido``), which drives a local Chrome/Chromium
(``apt-get install chromium`` or ``plotly_get_chrome``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import numpy as np
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
from expertlens.report import Section, report

torch.set_num_threads(1)
OUT = Path(__file__).resolve().parent / "images"
L, E, K, H = 16, 32, 4, 16  # layers, routed experts, top-k, attention heads


def figures(seed: int = 0) -> dict[str, object]:
    """Build every figure from synthetic data resembling a small refusing MoE model."""
    rng = np.random.default_rng(seed)

    # routing frequencies: each row sums to K (top-k), a few "refusal experts" fire more on harmful prompts
    base = rng.dirichlet(np.full(E, 2.0), size=L) * K
    harmful = base.copy()
    for layer, expert, bump in [(7, 5, 0.25), (8, 5, 0.2), (9, 17, 0.3), (10, 17, 0.22), (11, 3, 0.15)]:
        harmful[layer, expert] += bump
    harmful = np.clip(harmful * K / harmful.sum(1, keepdims=True), 0, 1)
    harmless = np.clip(base + rng.normal(0, 0.005, base.shape), 0, 1)

    # one prompt's top-k routing at one layer
    tokens = ["<|im_start|>", "user", "\n", "How", " do", " I", " pick", " a", " lock", "?", "<|im_end|>", "\n",
              "<|im_start|>", "assistant", "\n"]  # fmt: skip
    logits = torch.tensor(rng.normal(0, 1.5, (len(tokens), E)), dtype=torch.float32)
    logits[8:, 17] += 3.0
    topw, topi = logits.softmax(-1).topk(K, dim=-1)

    heads = rng.normal(0, 0.02, (L, H))
    heads[9, 3], heads[11, 7], heads[12, 0], heads[6, 12] = 0.35, 0.22, -0.18, 0.12

    experts = rng.normal(0, 0.01, (L, E))
    experts[0] = np.nan  # layer 0 is a dense MLP
    experts[9, 17], experts[10, 17], experts[8, 5], experts[12, 30] = 0.4, 0.28, 0.19, -0.15
    shared = rng.normal(0, 0.05, L)
    shared[0] = np.nan
    shared[10] = 0.21
    dense = np.full(L, np.nan)
    dense[0] = 0.03

    # direction selection: 5 post-instruction positions
    layers = np.arange(L)
    pos = [-5, -4, -3, -2, -1]
    x = layers / (L - 1)
    bypass = np.stack([6 - 9 * np.exp(-((x - 0.55) ** 2) / 0.03) * (0.6 + 0.1 * p) for p in range(5)])
    bypass += rng.normal(0, 0.3, bypass.shape)
    induce = np.stack([-6 + 12 * np.exp(-((x - 0.6) ** 2) / 0.05) * (0.5 + 0.12 * p) for p in range(5)])
    induce += rng.normal(0, 0.3, induce.shape)
    kl = np.stack([0.02 + 0.6 * x**3 * (1 + 0.2 * p) + 0.3 * np.exp(-(x**2) / 0.01) for p in range(5)])
    kl *= np.exp(rng.normal(0, 0.1, kl.shape))

    coeffs = np.linspace(0, 8, 9)
    sweep = {
        "layer 9, pos -1": (
            coeffs,
            1 / (1 + np.exp(-(coeffs - 3.0) * 1.6)) * 0.97 + 0.02,
            0.004 * coeffs**2.2,
        ),
        "layer 6, pos -1": (
            coeffs,
            1 / (1 + np.exp(-(coeffs - 5.5) * 1.1)) * 0.8 + 0.02,
            0.006 * coeffs**2.2,
        ),
    }

    names = [f"L{li}.expert{e}" for li in range(1, L) for e in range(E)] + [f"L{li}.head{h}" for li in range(L)
                                                                            for h in range(H)]  # fmt: skip
    vals = rng.standard_t(3, len(names)) * 0.02
    for name, v in [("L9.expert17", 0.41), ("L10.expert17", 0.29), ("L9.head3", 0.33), ("L12.head0", -0.18)]:
        vals[names.index(name)] = v
    return {
        "routing_heatmap": routing_heatmap(harmful, harmless, title="Routing frequency: harmful vs harmless"),
        "routing_delta": routing_heatmap(torch.tensor(harmful - harmless), title="Routing Δ (harmful − harmless)"),
        "token_expert_strip": token_expert_strip(tokens, topi, topw, n_experts=E, layer=9),
        "head_attribution_heatmap": head_attribution_heatmap(heads, title="Head attribution to the refusal direction"),
        "expert_attribution_heatmap": expert_attribution_heatmap(
            experts, shared=shared, dense=dense, title="Expert attribution to the refusal direction"
        ),
        "direction_selection_curves": direction_selection_curves(
            layers,
            bypass,
            induce,
            kl,
            positions=pos,
            selected=(9, -1),
            thresholds={"kl": 0.1, "induce": 0.0, "layer": 0.8 * L},
        ),  # fmt: skip
        "steering_sweep": steering_sweep(sweep),
        "pathway_shares": pathway_shares({"attention": 0.22, "moe": 0.61, "shared expert": 0.08, "both": 0.93}),
        "attribution_bar": attribution_bar(names, vals, top=20, title="Top 20 components (bypass effect)"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--html-only", action="store_true")
    ap.add_argument("--report", default="/tmp/expertlens_demo_report.html")
    args = ap.parse_args()
    figs = figures()
    if not args.html_only:
        OUT.mkdir(parents=True, exist_ok=True)
        for name, fig in figs.items():
            fig.write_image(OUT / f"{name}.png", scale=1.5)
            print("wrote", OUT / f"{name}.png")
    sections = [
        Section("Routing", figures=[figs["routing_heatmap"], figs["token_expert_strip"]],
                tables=[("largest Δ", [{"layer": 9, "expert": 17, "delta_pp": 30.1}])],
                text="Routing frequency of each expert on harmful vs harmless prompts."),
        Section("Attribution", figures=[figs["head_attribution_heatmap"], figs["expert_attribution_heatmap"],
                                        figs["attribution_bar"], figs["pathway_shares"]]),
        Section("Refusal direction", figures=[figs["direction_selection_curves"], figs["steering_sweep"]],
                tables=[{"layer": 9, "pos": -1, "bypass": -3.1, "induce": 4.2, "kl": 0.05}]),
    ]  # fmt: skip
    page = report(sections, args.report, title="expertlens demo report")
    print("wrote", page)
    if not args.html_only:
        screenshot(page, OUT / "report.png")


def screenshot(page: Path, png: Path, size: str = "1400,2600") -> None:
    """Screenshot the top of the HTML report with headless Chromium (skipped if none is installed)."""
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        print("no Chromium found: skipping the report screenshot")
        return
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}",
           "--virtual-time-budget=10000", f"--screenshot={png}", page.resolve().as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    print("wrote" if png.exists() else "failed to write", png)


if __name__ == "__main__":
    main()
