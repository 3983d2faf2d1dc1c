"""Plotly figures for expertlens results.

Every function takes plain values (torch tensors, numpy arrays or lists, plus labels) and returns a
:class:`plotly.graph_objects.Figure`; no function needs a model. Figures render in Jupyter and can be written
with ``fig.write_html(...)`` or collected into one HTML page with :func:`expertlens.report.report`.

Conventions:
    * Layer x something heatmaps put layer 0 at the top (matrix / ``imshow`` order).
    * Signed quantities use a diverging red/blue scale centred at 0 (red = positive).
    * Hover text shows the exact value of every cell.
    * Layout: no fixed width (figures fill their container: a notebook cell, a report page); one y axis per
      quantity, so quantities in different units get their own panel (small multiples sharing x) rather than a
      second y axis; a series with nothing to show (0 or missing everywhere) is not drawn, and the figure's
      subtitle says which and why, so no panel or legend entry is empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from plotly.subplots import make_subplots
from torch import Tensor

__all__ = [
    "routing_heatmap",
    "token_expert_strip",
    "head_attribution_heatmap",
    "expert_attribution_heatmap",
    "direction_selection_curves",
    "steering_sweep",
    "pathway_shares",
    "attribution_bar",
    "outcome_sweep",
    "causal_map",
]

ArrayLike = Tensor | np.ndarray

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"
_PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
_POS_COLOR = "#c0392b"
_NEG_COLOR = "#2c6fbb"
_TEMPLATE = "plotly_white"


# ----------------------------------------------------------------------------------------- helpers
def _np(x: Any, name: str, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
    """Convert a tensor / array / nested list to a float64 numpy array, checking its number of dims."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu").float().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else ndim
        if arr.ndim not in dims:
            raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {arr.shape}")
    return arr


def _labels(labels: Sequence[Any] | ArrayLike | None, n: int, name: str) -> list[str]:
    """String labels for an axis of length ``n`` (``0..n-1`` when not given)."""
    if labels is None:
        return [str(i) for i in range(n)]
    if isinstance(labels, Tensor):
        labels = labels.tolist()
    out = [str(v) for v in labels]
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} labels but the data has {n}")
    return out


def _sym_range(z: np.ndarray) -> float:
    """Half-width of a symmetric colour range around 0 covering every finite value of ``z``."""
    finite = np.abs(z[np.isfinite(z)])
    m = float(finite.max()) if finite.size else 1.0
    return m if m > 0 else 1.0


def _grid_layout(fig: go.Figure, n_x: int, n_y: int, *, min_w: int = 520, max_w: int = 1400) -> None:
    """Size a single-panel heatmap so cells stay readable."""
    fig.update_layout(
        width=int(np.clip(180 + 16 * n_x, min_w, max_w)),
        height=int(np.clip(160 + 18 * n_y, 360, 1100)),
    )


def _is_flat_zero(y: np.ndarray) -> bool:
    """True when a series would draw nothing a reader can see: every value is 0 or missing."""
    finite = y[np.isfinite(y)]
    return finite.size == 0 or not bool(np.any(finite))


def _subtitle(fig: go.Figure, notes: Sequence[str]) -> None:
    """Say under the title what the figure leaves out and why (one line per note)."""
    if notes:
        fig.update_layout(
            title={"subtitle": {"text": "<br>".join(notes), "font": {"size": 12, "color": "#555"}}},
            margin={"t": 90 + 18 * len(notes)},
        )


def _chosen_line(fig: go.Figure, x: float, color: str, dash: str = "dash") -> None:
    """A vertical line at ``x`` through every panel of a figure whose panels share the x axis."""
    fig.add_shape(type="line", xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1, layer="below",
                  line={"dash": dash, "color": color, "width": 1.5})  # fmt: skip


def _category_axis(n: int) -> dict[str, Any]:
    """Axis settings for a categorical axis; thin the tick labels when there are many categories."""
    out: dict[str, Any] = {"type": "category", "showgrid": False}
    if n > 40:
        out["nticks"] = 40
    return out


# ----------------------------------------------------------------------------------------- routing
def routing_heatmap(
    freq_harmful: Float[ArrayLike, "layer expert"],
    freq_harmless: Float[ArrayLike, "layer expert"] | None = None,
    *,
    layers: Sequence[int | str] | None = None,
    experts: Sequence[int | str] | None = None,
    title: str = "Routing frequency",
    names: tuple[str, str] = ("harmful", "harmless"),
    percent: bool = True,
) -> go.Figure:
    """Routing frequency heatmap (layer x expert): harmful, harmless and their difference.

    With two matrices the figure has three panels: ``harmful``, ``harmless`` (shared sequential colour
    scale) and ``Δ = harmful − harmless`` (diverging colour scale centred at 0). With one matrix it has a
    single panel; the scale is diverging when the matrix has negative entries (e.g. a precomputed Δ).

    Args:
        freq_harmful: ``[layer, expert]`` fraction of tokens routed to each expert (top-k selection rate)
            on the first prompt set, or any single matrix to show alone.
        freq_harmless: ``[layer, expert]`` the same on the second prompt set, or ``None``.
        layers: labels of the rows (default ``0..L-1``), e.g. the MoE layer indices.
        experts: labels of the columns (default ``0..E-1``).
        title: figure title.
        names: names of the two prompt sets.
        percent: the inputs are fractions in ``[0, 1]``; show them in percent and Δ in percentage points.
            With ``False`` the values are shown as given.

    Returns:
        The figure. With two inputs ``fig.data`` is ``[harmful, harmless, Δ]`` heatmaps whose ``z`` are the
        ``[L, E]`` matrices (Δ's ``z`` equals harmful's ``z`` minus harmless's ``z`` exactly).

    Example:
        >>> import torch
        >>> from expertlens.plot import routing_heatmap
        >>> fig = routing_heatmap(torch.rand(4, 8) / 4, torch.rand(4, 8) / 4, layers=[0, 1, 2, 3])
        >>> [t.name for t in fig.data]
        ['harmful', 'harmless', 'Δ harmful − harmless']
        >>> fig.write_html("routing.html")  # doctest: +SKIP
    """
    scale = 100.0 if percent else 1.0
    unit = "%" if percent else ""
    a = _np(freq_harmful, "freq_harmful", 2) * scale
    n_l, n_e = a.shape
    y = _labels(layers, n_l, "layers")
    x = _labels(experts, n_e, "experts")
    xaxis = {**_category_axis(n_e), "title": {"text": "expert"}}
    yaxis = {"type": "category", "autorange": "reversed", "title": {"text": "layer"}, "showgrid": False}

    if freq_harmless is None:
        diverging = bool(np.nanmin(a) < 0)
        r = _sym_range(a)
        label = "Δ" if diverging else "frequency"
        fig = go.Figure(
            go.Heatmap(
                z=a,
                x=x,
                y=y,
                name=label,
                colorscale=DIVERGING if diverging else SEQUENTIAL,
                zmid=0 if diverging else None,
                zmin=-r if diverging else None,
                zmax=r if diverging else None,
                colorbar={"title": {"text": label + (f" ({'pp' if diverging else '%'})" if percent else "")}},
                hovertemplate=f"layer %{{y}}<br>expert %{{x}}<br>{label} = %{{z:.6g}}{unit}<extra></extra>",
            )
        )
        fig.update_layout(title={"text": title}, template=_TEMPLATE, xaxis=xaxis, yaxis=yaxis)
        _grid_layout(fig, n_e, n_l)
        return fig

    b = _np(freq_harmless, "freq_harmless", 2) * scale
    if b.shape != a.shape:
        raise ValueError(f"freq_harmful {a.shape} and freq_harmless {b.shape} must have the same shape")
    d = a - b
    r = _sym_range(d)
    n1, n2 = names
    fig = make_subplots(
        rows=1,
        cols=3,
        shared_yaxes=True,
        horizontal_spacing=0.025,
        subplot_titles=(n1, n2, f"Δ {n1} − {n2}" + (" (pp)" if percent else "")),
    )
    both = np.stack([a, b], axis=-1)
    hover_ab = f"layer %{{y}}<br>expert %{{x}}<br>{{name}} = %{{z:.6g}}{unit}<extra></extra>"
    for col, (z, name) in enumerate([(a, n1), (b, n2)], start=1):
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=x,
                y=y,
                name=name,
                coloraxis="coloraxis",
                hovertemplate=hover_ab.replace("{name}", name),
            ),
            row=1,
            col=col,
        )
    fig.add_trace(
        go.Heatmap(
            z=d,
            x=x,
            y=y,
            name=f"Δ {n1} − {n2}",
            coloraxis="coloraxis2",
            customdata=both,
            hovertemplate=(
                f"layer %{{y}}<br>expert %{{x}}<br>Δ = %{{z:+.6g}}{' pp' if percent else ''}"
                f"<br>{n1} = %{{customdata[0]:.6g}}{unit}"
                f"<br>{n2} = %{{customdata[1]:.6g}}{unit}<extra></extra>"
            ),
        ),
        row=1,
        col=3,
    )
    vmax = float(np.nanmax(np.concatenate([a.ravel(), b.ravel()]))) if a.size else 1.0
    # both colour bars upright at the right, one above the other: below the panels their titles crowded the
    # panels' x axis titles
    bar = {"orientation": "v", "x": 1.01, "xanchor": "left", "len": 0.47, "thickness": 12}
    fig.update_layout(
        title={"text": title},
        template=_TEMPLATE,
        coloraxis={
            "colorscale": SEQUENTIAL,
            "cmin": 0,
            "cmax": vmax if vmax > 0 else 1,
            "colorbar": {**bar, "y": 1, "yanchor": "top",
                         "title": {"text": f"{n1}, {n2}" + (" (%)" if percent else ""), "side": "right"}},
        },
        coloraxis2={
            "colorscale": DIVERGING,
            "cmid": 0,
            "cmin": -r,
            "cmax": r,
            "colorbar": {**bar, "y": 0, "yanchor": "bottom", "title": {"text": "Δ (pp)" if percent else "Δ",
                                                                      "side": "right"}},
        },
        autosize=True,
        height=int(np.clip(260 + 18 * n_l, 420, 1100)),
        margin={"r": 90},
    )  # fmt: skip
    for col in (1, 2, 3):
        fig.update_xaxes(**xaxis, row=1, col=col)
    fig.update_yaxes(type="category", autorange="reversed", showgrid=False)
    fig.update_yaxes(title={"text": "layer"}, row=1, col=1)
    return fig


def token_expert_strip(
    tokens: Sequence[str],
    topk_indices: Int[ArrayLike, "pos k"],
    topk_weights: Float[ArrayLike, "pos k"],
    n_experts: int,
    *,
    title: str = "Top-k routing per token",
    layer: int | str | None = None,
) -> go.Figure:
    """Token x expert strip for one prompt: which experts each token is routed to, and with what weight.

    Args:
        tokens: the ``p`` token strings of the prompt (x axis labels; duplicates are fine).
        topk_indices: ``[p, k]`` selected expert indices per token.
        topk_weights: ``[p, k]`` routing weights of the selected experts.
        n_experts: number of routed experts ``E`` (rows of the strip).
        title: figure title.
        layer: optional layer label, appended to the title.

    Returns:
        A figure with one heatmap whose ``z`` is ``[E, p]``: the routing weight where expert ``e`` is
        selected for token ``t`` and 0 elsewhere.

    Example:
        >>> import torch
        >>> from expertlens.plot import token_expert_strip
        >>> w, i = torch.rand(3, 8).softmax(-1).topk(2, dim=-1)
        >>> fig = token_expert_strip(["Hello", " world", "!"], i, w, n_experts=8, layer=2)
        >>> fig.data[0].z.shape
        (8, 3)
    """
    idx = _np(topk_indices, "topk_indices", 2).astype(np.int64)
    w = _np(topk_weights, "topk_weights", 2)
    if idx.shape != w.shape:
        raise ValueError(f"topk_indices {idx.shape} and topk_weights {w.shape} must have the same shape")
    n_p, k = idx.shape
    if len(tokens) != n_p:
        raise ValueError(f"{len(tokens)} tokens but topk_indices has {n_p} positions")
    if idx.size and (idx.min() < 0 or idx.max() >= n_experts):
        raise ValueError(f"expert indices must lie in [0, {n_experts}), got [{idx.min()}, {idx.max()}]")
    z = np.zeros((n_experts, n_p))
    rank = np.full((n_experts, n_p), "", dtype=object)
    for p in range(n_p):
        for j in range(k):
            z[idx[p, j], p] += w[p, j]
            rank[idx[p, j], p] = f"top-{j + 1}"
    shown = [_show_token(t) for t in tokens]
    custom = np.stack([np.broadcast_to(np.array(shown, dtype=object), z.shape), rank], axis=-1)
    full_title = title if layer is None else f"{title} (layer {layer})"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_p)),
            y=list(range(n_experts)),
            customdata=custom,
            colorscale="Blues",
            zmin=0,
            zmax=max(float(z.max()), 1e-9) if z.size else 1,
            xgap=1,
            ygap=1,
            name="routing weight",
            colorbar={"title": {"text": "weight"}},
            hovertemplate=(
                "pos %{x}: %{customdata[0]}<br>expert %{y}<br>weight = %{z:.6g} %{customdata[1]}<extra></extra>"
            ),
        )
    )
    fig.update_layout(
        title={"text": full_title},
        template=_TEMPLATE,
        xaxis={
            "title": {"text": "token"},
            "tickmode": "array",
            "tickvals": list(range(n_p)),
            "ticktext": shown,
            "tickangle": -45 if n_p > 8 else 0,
            "showgrid": False,
        },
        yaxis={
            "title": {"text": "expert"},
            "autorange": "reversed",
            "showgrid": False,
            "dtick": 1 if n_experts <= 32 else None,
        },
        plot_bgcolor="#dddddd",
        width=int(np.clip(200 + 28 * n_p, 520, 1600)),
        height=int(np.clip(200 + 16 * n_experts, 380, 1100)),
    )
    return fig


def _show_token(t: str) -> str:
    """Make whitespace in a token visible in an axis label."""
    t = str(t).replace("\n", "⏎").replace("\t", "⇥")
    if t.startswith(" "):
        t = "␣" + t[1:]
    if t.strip() == "":
        t = t.replace(" ", "␣") or "∅"
    return t


# ----------------------------------------------------------------------------------------- attribution
def head_attribution_heatmap(
    values: Float[ArrayLike, "layer head"],
    *,
    layers: Sequence[int | str] | None = None,
    title: str = "Attention head attribution",
    value_label: str = "attribution",
) -> go.Figure:
    """Layer x head heatmap of a signed per-head quantity, diverging colour scale centred at 0.

    Args:
        values: ``[layer, head]`` attribution (e.g. direct effect on the refusal direction).
        layers: row labels (default ``0..L-1``).
        title: figure title.
        value_label: name of the quantity (colour bar and hover).

    Returns:
        A figure with one heatmap whose ``z`` equals ``values``.

    Example:
        >>> import torch
        >>> from expertlens.plot import head_attribution_heatmap
        >>> fig = head_attribution_heatmap(torch.randn(4, 8))
        >>> fig.data[0].z.shape
        (4, 8)
    """
    v = _np(values, "values", 2)
    n_l, n_h = v.shape
    r = _sym_range(v)
    fig = go.Figure(
        go.Heatmap(
            z=v,
            x=[str(h) for h in range(n_h)],
            y=_labels(layers, n_l, "layers"),
            name=value_label,
            colorscale=DIVERGING,
            zmid=0,
            zmin=-r,
            zmax=r,
            colorbar={"title": {"text": value_label}},
            hovertemplate=f"layer %{{y}}<br>head %{{x}}<br>{value_label} = %{{z:.6g}}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": title},
        template=_TEMPLATE,
        xaxis={**_category_axis(n_h), "title": {"text": "head"}},
        yaxis={"type": "category", "autorange": "reversed", "title": {"text": "layer"}, "showgrid": False},
    )
    _grid_layout(fig, n_h, n_l)
    return fig


def expert_attribution_heatmap(
    values: Float[ArrayLike, "layer expert"],
    *,
    shared: Float[ArrayLike, " layer"] | None = None,
    dense: Float[ArrayLike, " layer"] | Bool[ArrayLike, " layer"] | None = None,
    layers: Sequence[int | str] | None = None,
    title: str = "Expert attribution",
    value_label: str = "attribution",
) -> go.Figure:
    """Layer x expert heatmap of a signed per-expert quantity, with shared expert and dense layers.

    Args:
        values: ``[layer, expert]`` attribution of each routed expert. Rows of dense-MLP layers may be NaN
            (shown as grey: there are no experts there).
        shared: ``[layer]`` attribution of the shared expert, shown as an extra column ``"shared"``
            (NaN where a layer has none).
        dense: which layers are dense MLPs. A boolean ``[layer]`` mask marks the rows (label suffix
            ``"(dense)"``); a float ``[layer]`` array gives the dense MLP's attribution, shown in an extra
            column ``"dense MLP"`` (NaN for MoE layers), and marks the rows where it is finite.
        layers: row labels (default ``0..L-1``).
        title: figure title.
        value_label: name of the quantity (colour bar and hover).

    Returns:
        A figure with one heatmap whose ``z`` is ``[L, E (+1 shared) (+1 dense MLP)]``.

    Example:
        >>> import torch
        >>> from expertlens.plot import expert_attribution_heatmap
        >>> fig = expert_attribution_heatmap(torch.randn(4, 8), shared=torch.randn(4))
        >>> list(fig.data[0].x[-2:])
        ['7', 'shared']
    """
    v = _np(values, "values", 2)
    n_l, n_e = v.shape
    cols = [v]
    x = [str(e) for e in range(n_e)]
    if shared is not None:
        s = _np(shared, "shared", 1)
        if s.shape != (n_l,):
            raise ValueError(f"shared must have shape ({n_l},), got {s.shape}")
        cols.append(s[:, None])
        x.append("shared")
    dense_rows = np.zeros(n_l, dtype=bool)
    if dense is not None:
        is_mask = dense.dtype == torch.bool if isinstance(dense, Tensor) else np.asarray(dense).dtype == bool
        dn = _np(dense, "dense", 1)
        if dn.shape != (n_l,):
            raise ValueError(f"dense must have shape ({n_l},), got {dn.shape}")
        if is_mask:
            dense_rows = dn.astype(bool)
        else:
            dense_rows = np.isfinite(dn)
            cols.append(dn[:, None])
            x.append("dense MLP")
    z = np.concatenate(cols, axis=1)
    y = _labels(layers, n_l, "layers")
    y = [f"{lab} (dense)" if dense_rows[i] else lab for i, lab in enumerate(y)]
    r = _sym_range(z)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x,
            y=y,
            name=value_label,
            colorscale=DIVERGING,
            zmid=0,
            zmin=-r,
            zmax=r,
            hoverongaps=False,
            colorbar={"title": {"text": value_label}},
            hovertemplate=f"layer %{{y}}<br>expert %{{x}}<br>{value_label} = %{{z:.6g}}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": title},
        template=_TEMPLATE,
        plot_bgcolor="#e5e5e5",
        xaxis={**_category_axis(len(x)), "title": {"text": "expert"}},
        yaxis={"type": "category", "autorange": "reversed", "title": {"text": "layer"}, "showgrid": False},
    )
    if len(x) > n_e:  # separate the extra columns from the routed experts
        fig.add_vline(x=n_e - 0.5, line={"color": "black", "width": 2})
    for i in np.flatnonzero(dense_rows):  # outline dense rows
        fig.add_shape(
            type="rect",
            xref="x",
            yref="y",
            x0=-0.5,
            x1=len(x) - 0.5,
            y0=i - 0.5,
            y1=i + 0.5,
            line={"color": "#555555", "width": 1, "dash": "dot"},
            fillcolor="rgba(0,0,0,0)",
        )
    _grid_layout(fig, len(x), n_l)
    return fig


def attribution_bar(
    labels: Sequence[str] | Mapping[str, float],
    values: Float[ArrayLike, " n"] | Sequence[float] | None = None,
    *,
    top: int | None = 20,
    title: str = "Top components",
    value_label: str = "attribution",
    by_abs: bool = True,
) -> go.Figure:
    """Horizontal bar chart of the top components of an attribution table, largest at the top.

    Args:
        labels: component names (e.g. ``"L3.expert12"``, ``"L5.head2"``), or a mapping name → value.
        values: ``[n]`` values (omit when ``labels`` is a mapping).
        top: how many components to show (``None``: all).
        title: figure title.
        value_label: axis title for the values.
        by_abs: rank by absolute value (``True``) or by signed value (``False``).

    Returns:
        A figure with one horizontal bar trace (positive bars red, negative blue) of ``min(top, n)`` bars.

    Example:
        >>> from expertlens.plot import attribution_bar
        >>> fig = attribution_bar(["L1.e3", "L2.e0", "L0.h1"], [0.5, -0.8, 0.1], top=2)
        >>> list(fig.data[0].y)
        ['L2.e0', 'L1.e3']
    """
    if isinstance(labels, Mapping):
        if values is not None:
            raise ValueError("pass values either in the mapping or as `values`, not both")
        values = list(labels.values())
        labels = list(labels.keys())
    if values is None:
        raise ValueError("values are required")
    v = _np(values, "values", 1)
    names = [str(s) for s in labels]
    if len(names) != v.shape[0]:
        raise ValueError(f"{len(names)} labels but {v.shape[0]} values")
    key = np.abs(v) if by_abs else v
    order = np.argsort(-np.nan_to_num(key, nan=-np.inf), kind="stable")
    if top is not None:
        order = order[:top]
    vals = v[order]
    names_o = [names[i] for i in order]
    fig = go.Figure(
        go.Bar(
            x=vals,
            y=names_o,
            orientation="h",
            name=value_label,
            marker={"color": [_POS_COLOR if val >= 0 else _NEG_COLOR for val in vals]},
            text=[f"{val:.3g}" for val in vals],
            textposition="outside",
            cliponaxis=False,
            hovertemplate=f"%{{y}}<br>{value_label} = %{{x:.6g}}<extra></extra>",
        )
    )
    longest = max((len(n) for n in names_o), default=4)
    finite = vals[np.isfinite(vals)]
    lo, hi = (min(0.0, float(finite.min())), max(0.0, float(finite.max()))) if finite.size else (0.0, 1.0)
    pad = 0.18 * ((hi - lo) or 1.0)  # room for the value labels outside the bars
    fig.update_layout(
        title={"text": title},
        template=_TEMPLATE,
        xaxis={
            "title": {"text": value_label},
            "range": [lo - (pad if lo < 0 else 0), hi + (pad if hi > 0 else 0)],
            "zeroline": True,
            "zerolinecolor": "#444",
            "zerolinewidth": 1,
        },
        yaxis={"title": {"text": "component"}, "autorange": "reversed", "type": "category"},
        autosize=True,
        height=int(np.clip(140 + 24 * len(vals), 320, 1000)),
        margin={"l": int(np.clip(7 * longest + 40, 80, 320)), "r": 60},
        showlegend=False,
    )
    return fig


def pathway_shares(
    shares: Mapping[str, float],
    *,
    title: str = "Pathway shares of the bypass effect",
    value_label: str = "share of effect",
    percent: bool = True,
) -> go.Figure:
    """Bar chart of how much of an effect each pathway carries (e.g. attention vs MoE vs both).

    Args:
        shares: pathway name → share of the effect (fractions, e.g. ``{"attention": 0.3, "moe": 0.6}``).
            Shares may be negative or sum to more than 1 (interactions).
        title: figure title.
        value_label: y axis title.
        percent: show the y axis and bar labels in percent.

    Returns:
        A figure with one bar trace, one bar per pathway in the given order.

    Example:
        >>> from expertlens.plot import pathway_shares
        >>> fig = pathway_shares({"attention": 0.25, "moe": 0.6, "both": 0.95})
        >>> list(fig.data[0].x)
        ['attention', 'moe', 'both']
    """
    names = [str(k) for k in shares]
    vals = np.array([float(_np(v, "share", 0)) for v in shares.values()], dtype=np.float64)
    fmt = (lambda s: f"{100 * s:.1f}%") if percent else (lambda s: f"{s:.3g}")
    colors = [_PALETTE[i % len(_PALETTE)] for i in range(len(names))]
    fig = go.Figure(
        go.Bar(
            x=names,
            y=vals,
            name=value_label,
            marker={"color": colors},
            text=[fmt(s) for s in vals],
            textposition="outside",
            cliponaxis=False,
            hovertemplate="%{x}<br>share = %{y:.6g}<extra></extra>",
        )
    )
    hi = max(1.0, float(np.nanmax(vals)) if vals.size else 1.0) * 1.12
    lo = min(0.0, float(np.nanmin(vals)) * 1.15 if vals.size else 0.0)
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "#888", "width": 1})
    fig.update_layout(
        title={"text": title},
        template=_TEMPLATE,
        xaxis={"title": {"text": "pathway"}},
        yaxis={
            "title": {"text": value_label},
            "range": [lo, hi],
            "zeroline": True,
            "zerolinecolor": "#444",
            "tickformat": ".0%" if percent else None,
        },
        autosize=True,
        height=440,
        bargap=0.5 if len(names) < 5 else 0.2,  # a few bars across the page stay bars, not walls
        showlegend=False,
    )
    return fig


# ----------------------------------------------------------------------------------------- directions
def direction_selection_curves(
    layers: Sequence[int] | Int[ArrayLike, " layer"],
    bypass: Float[ArrayLike, "*pos layer"],
    induce: Float[ArrayLike, "*pos layer"],
    kl: Float[ArrayLike, "*pos layer"] | None = None,
    *,
    positions: Sequence[int | str] | None = None,
    selected: tuple[int, int | str | None] | int | None = None,
    thresholds: Mapping[str, float] | None = None,
    title: str = "Refusal direction selection",
    score_label: str = "refusal score",
) -> go.Figure:
    """Candidate-direction selection curves (Arditi et al., 2024): scores vs layer for each position.

    For each candidate direction (one per layer and position) the figure shows, in panels stacked over a shared
    layer axis, the refusal score on harmful prompts under directional ablation (``bypass``), on harmless prompts
    under activation addition (``induce``) and, given ``kl``, the KL divergence on harmless prompts under ablation.
    One colour per position when the arrays are ``[P, L]``; each quantity keeps its own y axis.

    Args:
        layers: ``[L]`` layer index of each candidate (x axis).
        bypass: ``[L]`` or ``[P, L]`` refusal score under ablation (lower = better bypass).
        induce: ``[L]`` or ``[P, L]`` refusal score under activation addition (higher = better induce).
        kl: ``[L]`` or ``[P, L]`` KL divergence under ablation, or ``None``.
        positions: ``P`` position labels (e.g. ``[-5, ..., -1]``); required names for ``[P, L]`` inputs
            (default ``0..P-1``).
        selected: the chosen candidate, ``(layer, position)`` (position a label from ``positions``, or
            ``None`` for 1-D inputs), or just the layer for 1-D inputs. Marked with a star in each panel and a
            vertical line.
        thresholds: filter thresholds drawn as dashed lines in their panel (named in the panel's title, not on
            the line): keys ``"bypass"``, ``"induce"``, ``"kl"``, and ``"layer"`` (maximum layer, vertical).
        title: figure title.
        score_label: y axis title of the bypass and induce panels.

    Returns:
        A figure with ``2 * P`` (``3 * P`` with ``kl``) line traces, ordered bypass, induce(, KL) per position,
        on y axes ``y``, ``y2`` (and ``y3``), plus one star trace per panel when ``selected`` is given. Lines are
        named by position (``"pos <label>"``; by quantity for 1-D inputs), stars ``"selected: layer ..."``.

    Example:
        >>> import torch
        >>> from expertlens.plot import direction_selection_curves
        >>> L = torch.arange(8)
        >>> fig = direction_selection_curves(L, torch.randn(2, 8), torch.randn(2, 8), torch.rand(2, 8),
        ...                                  positions=[-2, -1], selected=(4, -1), thresholds={"kl": 0.1})
        >>> len(fig.data), sorted({t.yaxis for t in fig.data})
        (9, ['y', 'y2', 'y3'])
    """
    lay = _np(layers, "layers", 1)
    n_l = lay.shape[0]
    one_d = _np(bypass, "bypass", (1, 2)).ndim == 1
    byp = np.atleast_2d(_np(bypass, "bypass", (1, 2)))
    ind = np.atleast_2d(_np(induce, "induce", (1, 2)))
    kls = None if kl is None else np.atleast_2d(_np(kl, "kl", (1, 2)))
    for name, arr in (("bypass", byp), ("induce", ind), ("kl", kls)):
        if arr is not None and (arr.shape[1] != n_l or arr.shape[0] != byp.shape[0]):
            raise ValueError(f"{name} has shape {arr.shape}, expected ({byp.shape[0]}, {n_l})")
    n_p = byp.shape[0]
    pos = _labels(positions, n_p, "positions") if not one_d else [""]
    x = [int(v) if float(v).is_integer() else float(v) for v in lay]
    panels = [("bypass", byp, f"bypass: {score_label} on harmful prompts, direction ablated (lower = stronger)"),
              ("induce", ind, f"induce: {score_label} on harmless prompts, direction added (higher = stronger)")]
    if kls is not None:
        panels.append(("KL", kls, "KL divergence on harmless prompts, direction ablated (lower = gentler)"))
    row_of = {name.lower(): r for r, (name, _, _) in enumerate(panels, start=1)}

    notes, titles, lines = [], [t for _, _, t in panels], []  # lines: (row or None for vertical, value)
    for key, val in (thresholds or {}).items():
        k = key.lower()
        if k == "layer":
            lines.append((None, float(val)))
            notes.append(f"Dashed vertical line: max layer {val:g} (later layers are filtered out).")
        elif k in row_of:
            titles[row_of[k] - 1] += f"; dashed: {'KL' if k == 'kl' else k} threshold {val:g}"
            lines.append((row_of[k], float(val)))
        elif k == "kl":
            raise ValueError("a 'kl' threshold needs kl values")
        else:
            raise ValueError(f"unknown threshold {key!r}; use 'bypass', 'induce', 'kl' or 'layer'")

    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.09, subplot_titles=titles)
    for p in range(n_p):
        color = _PALETTE[p % len(_PALETTE)]
        suffix = "" if one_d else f" pos {pos[p]}"
        for row, (name, arr, _) in enumerate(panels, start=1):
            fig.add_trace(
                go.Scatter(x=x, y=arr[p], mode="lines+markers", name=name if one_d else f"pos {pos[p]}",
                           line={"color": "#444" if one_d else color, "width": 2}, marker={"size": 5},
                           legendgroup=f"pos{p}", showlegend=not one_d and row == 1,
                           hovertemplate=f"{name}{suffix}<br>layer %{{x}}<br>%{{y:.4g}}<extra></extra>"),
                row=row, col=1,
            )  # fmt: skip

    for row, val in lines:
        if row is None:
            _chosen_line(fig, val, "#888")
        else:
            fig.add_hline(y=val, line={"dash": "dash", "color": "#555", "width": 1}, row=row, col=1)

    if selected is not None:
        sel_layer, sel_pos = (selected, None) if not isinstance(selected, tuple) else selected
        if one_d:
            p_idx = 0
        else:
            if sel_pos is None:
                raise ValueError("selected must be (layer, position) for [P, L] inputs")
            if str(sel_pos) not in pos:
                raise ValueError(f"selected position {sel_pos!r} not in positions {pos}")
            p_idx = pos.index(str(sel_pos))
        matches = np.flatnonzero(lay == float(sel_layer))
        if matches.size == 0:
            raise ValueError(f"selected layer {sel_layer} not in layers")
        li = int(matches[0])
        label = f"selected: layer {sel_layer}" + ("" if one_d else f", pos {pos[p_idx]}")
        star = {"symbol": "star", "size": 15, "color": "gold", "line": {"color": "#000", "width": 1}}
        for row, (name, arr, _) in enumerate(panels, start=1):
            fig.add_trace(
                go.Scatter(x=[x[li]], y=[arr[p_idx, li]], mode="markers", name=label, legendgroup="selected",
                           showlegend=row == 1, marker=star,
                           hovertemplate=f"{label}<br>{name} %{{y:.4g}}<extra></extra>"),
                row=row, col=1,
            )  # fmt: skip
        _chosen_line(fig, x[li], "goldenrod", dash="dot")

    fig.update_annotations(font={"size": 12}, x=0, xanchor="left")  # panel titles, left-aligned over their panel
    fig.update_layout(
        title={"text": title},
        template=_TEMPLATE,
        autosize=True,
        height=200 + 210 * len(panels),
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": -0.08, "yanchor": "top",
                "title": {"text": "" if one_d else "candidate position: "}},
        hovermode="closest",
        showlegend=not one_d or selected is not None,
    )  # fmt: skip
    fig.update_xaxes(title={"text": "layer"}, dtick=1 if n_l <= 40 else None, row=len(panels), col=1)
    for row, (name, _, _) in enumerate(panels, start=1):
        fig.update_yaxes(title={"text": "KL (nats)" if name == "KL" else score_label}, row=row, col=1)
        if name == "KL":
            fig.update_yaxes(rangemode="tozero", row=row, col=1)
    _subtitle(fig, notes)
    return fig


def steering_sweep(
    coeffs: Float[ArrayLike, " n"] | Sequence[float] | Mapping[str, Any],
    refusal_rate: Float[ArrayLike, " n"] | Sequence[float] | None = None,
    kl: Float[ArrayLike, " n"] | Sequence[float] | None = None,
    *,
    label: str = "refusal rate",
    title: str = "Steering sweep",
    x_label: str = "steering coefficient",
    y_label: str = "refusal rate",
) -> go.Figure:
    """Steering coefficient → refusal rate (and KL divergence in a panel below), one or several series.

    Args:
        coeffs: ``[n]`` steering coefficients, or a mapping ``label → series`` for several series, where a
            series is ``(coeffs, refusal_rate)``, ``(coeffs, refusal_rate, kl)`` or a mapping with keys
            ``"coeffs"``, ``"refusal_rate"`` and optionally ``"kl"``.
        refusal_rate: ``[n]`` refusal rate at each coefficient (single-series form).
        kl: ``[n]`` KL divergence at each coefficient (single-series form), or ``None``.
        label: name of the single series.
        title: figure title.
        x_label: x axis title.
        y_label: primary y axis title.

    Returns:
        A figure with one line per series (named by its label, y axis ``y``) and, for series with KL, one
        dotted line ``"<label> KL"`` in a second panel (y axis ``y2``) sharing the x axis.

    Example:
        >>> from expertlens.plot import steering_sweep
        >>> fig = steering_sweep([0, 1, 2, 4], [0.02, 0.3, 0.8, 0.97], kl=[0.0, 0.05, 0.2, 0.9])
        >>> [t.name for t in fig.data]
        ['refusal rate', 'refusal rate KL']
        >>> runs = {"layer 6": ([0, 1, 2], [0.1, 0.5, 0.9]), "layer 9": ([0, 1, 2], [0.1, 0.2, 0.4])}
        >>> fig = steering_sweep(runs)
        >>> len(fig.data)
        2
    """
    series: dict[str, tuple[Any, Any, Any]] = {}
    if isinstance(coeffs, Mapping):
        if refusal_rate is not None or kl is not None:
            raise ValueError("with a mapping of series, pass refusal_rate/kl inside each series")
        for name, s in coeffs.items():
            if isinstance(s, Mapping):
                series[str(name)] = (s["coeffs"], s["refusal_rate"], s.get("kl"))
            else:
                s = tuple(s)
                if len(s) not in (2, 3):
                    raise ValueError(f"series {name!r} must be (coeffs, refusal_rate[, kl])")
                series[str(name)] = (s[0], s[1], s[2] if len(s) == 3 else None)
    else:
        if refusal_rate is None:
            raise ValueError("refusal_rate is required")
        series[label] = (coeffs, refusal_rate, kl)

    has_kl = any(s[2] is not None for s in series.values())
    rows = 2 if has_kl else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.07,
                        row_heights=[0.64, 0.36] if has_kl else None)  # fmt: skip
    ys: list[np.ndarray] = []
    for i, (name, (c, r, k)) in enumerate(series.items()):
        cx = _np(c, f"{name} coeffs", 1)
        ry = _np(r, f"{name} refusal_rate", 1)
        if cx.shape != ry.shape:
            raise ValueError(f"series {name!r}: coeffs {cx.shape} and refusal_rate {ry.shape} differ")
        ys.append(ry)
        color = _PALETTE[i % len(_PALETTE)]
        fig.add_trace(
            go.Scatter(
                x=cx,
                y=ry,
                mode="lines+markers",
                name=name,
                legendgroup=name,
                line={"color": color, "width": 2.4},
                marker={"size": 7},
                hovertemplate=f"{name}<br>coeff %{{x:.4g}}<br>{y_label} = %{{y:.6g}}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        if k is not None:
            ky = _np(k, f"{name} kl", 1)
            if ky.shape != cx.shape:
                raise ValueError(f"series {name!r}: kl {ky.shape} and coeffs {cx.shape} differ")
            fig.add_trace(
                go.Scatter(
                    x=cx,
                    y=ky,
                    mode="lines+markers",
                    name=f"{name} KL",
                    legendgroup=name,
                    line={"color": color, "width": 1.5, "dash": "dot"},
                    marker={"size": 5, "symbol": "x"},
                    hovertemplate=f"{name}<br>coeff %{{x:.4g}}<br>KL = %{{y:.6g}}<extra></extra>",
                ),
                row=2,
                col=1,
            )
    all_y = np.concatenate(ys) if ys else np.zeros(1)
    yaxis: dict[str, Any] = {"title": {"text": y_label}}
    if np.nanmin(all_y) >= 0 and np.nanmax(all_y) <= 1:
        yaxis.update(range=[-0.03, 1.03], tickformat=".0%")
    fig.update_yaxes(**yaxis, row=1, col=1)
    if has_kl:
        fig.update_yaxes(title={"text": "KL divergence"}, rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title={"text": x_label}, row=rows, col=1)
    fig.update_layout(
        title={"text": title},
        template=_TEMPLATE,
        autosize=True,
        height=460 + 150 * (rows - 1),
        legend={"orientation": "h", "x": 0, "y": -0.22 / rows, "yanchor": "top"},
    )
    return fig


# ----------------------------------------------------------------------------------------- refusal study
_OUTCOME_COLORS = {"refusal": "#2c6fbb", "full response (ASR)": "#c0392b", "non-response": "#7f7f7f"}


def outcome_sweep(
    coeffs: Sequence[float],
    rates: Mapping[str, Sequence[float]],
    kl: Sequence[float] | None = None,
    *,
    chosen: float | None = None,
    title: str = "Steering sweep",
    x_label: str = "coefficient",
) -> go.Figure:
    """Coefficient → outcome rates (refusal / full response / non-response, in %), KL in a panel below.

    An outcome that is 0 at every coefficient is not drawn (a flat line on the axis hides the others' zeros);
    the subtitle names it. Likewise a KL that is 0 everywhere gets no panel.

    Args:
        coeffs: ``[n]`` coefficients (plotted on a log axis when they span more than a factor 10).
        rates: outcome name → ``[n]`` fractions in [0, 1].
        kl: ``[n]`` harmless KL (nats) per coefficient, or ``None``.
        chosen: the coefficient the study chose (a vertical marker through both panels).
        title: figure title.
        x_label: x axis title.

    Returns:
        One line per outcome in the top panel (y axis ``y``) and, with ``kl``, the KL line in a second panel
        (``y2``) sharing the x axis.

    Example:
        >>> from expertlens.plot import outcome_sweep
        >>> fig = outcome_sweep([1, 2, 4], {"refusal": [0.9, 0.4, 0.0], "full response (ASR)": [0.1, 0.5, 0.1],
        ...                                 "non-response": [0, 0, 0]}, kl=[0.01, 0.2, 1.5], chosen=2)
        >>> [t.name for t in fig.data]
        ['refusal', 'full response (ASR)', 'harmless KL (nats)']
        >>> fig.layout.title.subtitle.text
        'Not drawn: non-response (0% at every coefficient).'
    """
    x = _np(coeffs, "coeffs", 1)
    drawn, flat = {}, []
    for i, (name, ys) in enumerate(rates.items()):
        y = _np(ys, f"{name} rates", 1)
        if y.shape != x.shape:
            raise ValueError(f"{name}: {y.shape[0]} rates for {x.shape[0]} coefficients")
        if _is_flat_zero(y):
            flat.append(name)
        else:
            drawn[name] = (y, _OUTCOME_COLORS.get(name, _PALETTE[i % len(_PALETTE)]))
    k = None if kl is None else _np(kl, "kl", 1)
    notes = [f"Not drawn: {', '.join(flat)} (0% at every coefficient)."] if flat else []
    if k is not None and _is_flat_zero(k):
        notes.append("Harmless KL is 0 at every coefficient (no KL panel).")
        k = None
    rows = 1 if k is None else 2
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.07,
                        row_heights=[0.64, 0.36] if rows == 2 else None)  # fmt: skip
    for name, (y, color) in drawn.items():
        fig.add_trace(
            go.Scatter(x=x, y=y, name=name, mode="lines+markers", line={"color": color},
                       hovertemplate=f"{name}<br>c = %{{x}}<br>%{{y:.1%}}<extra></extra>"),
            row=1, col=1,
        )  # fmt: skip
    if k is not None:
        fig.add_trace(
            go.Scatter(x=x, y=k, name="harmless KL (nats)", mode="lines+markers",
                       line={"dash": "dot", "color": "#555"}, hovertemplate="c = %{x}<br>KL = %{y:.3g}<extra></extra>"),
            row=2, col=1,
        )  # fmt: skip
        fig.update_yaxes(title_text="harmless KL (nats)", rangemode="tozero", row=2, col=1)
    log_x = bool(x.size and x.min() > 0 and x.max() / x.min() > 10)
    if chosen is not None:
        at = float(np.log10(chosen)) if log_x and chosen > 0 else float(chosen)  # annotations on a log axis: log10
        _chosen_line(fig, float(chosen), "#2ca02c")
        fig.add_annotation(x=at, y=1.0, yref="paper", yanchor="bottom", text=f"chosen c = {chosen:g}",
                           showarrow=False, font={"color": "#2ca02c", "size": 11})  # fmt: skip
    fig.update_xaxes(type="log" if log_x else "linear")
    fig.update_xaxes(title_text=x_label, row=rows, col=1)
    fig.update_yaxes(title_text="share of prompts", tickformat=".0%", range=[-0.03, 1.03], row=1, col=1)
    fig.update_layout(title={"text": title}, template=_TEMPLATE, autosize=True, height=430 + 150 * (rows - 1),
                      legend={"orientation": "h", "y": -0.22 / rows, "yanchor": "top", "x": 0})  # fmt: skip
    _subtitle(fig, notes)
    return fig


def causal_map(
    layers: Sequence[int],
    d_refusal: Mapping[str, Sequence[float | None]],
    d_asr: Mapping[str, Sequence[float | None]],
    *,
    title: str = "Causal map: zero-ablate one component",
) -> go.Figure:
    """Per-layer change in refusal rate and ASR (percentage points) when one component's output is zeroed.

    A component whose change is 0 at every layer gets no bars in that panel, and a quantity that no component
    changes gets no panel; the subtitle says which, so every panel and legend entry shows something.

    Args:
        layers: layer indices.
        d_refusal: component (e.g. ``"attention"``, ``"moe"``) → ``[L]`` change in refusal rate (fractions).
        d_asr: component → ``[L]`` change in ASR (fractions).
        title: figure title.

    Returns:
        Up to two panels (refusal, ASR) of grouped bars, one bar group per layer; no traces at all when nothing
        changed anywhere (the subtitle then says so).

    Example:
        >>> from expertlens.plot import causal_map
        >>> fig = causal_map([0, 1], {"attention": [-0.5, 0.0], "moe": [-0.1, 0.0]},
        ...                  {"attention": [0.2, 0.0], "moe": [0.0, 0.0]})
        >>> [(t.name, t.xaxis) for t in fig.data]
        [('attention output', 'x'), ('MoE output', 'x'), ('attention output', 'x2')]
        >>> fig.layout.title.subtitle.text
        'Change in ASR: zeroing the MoE output changes it at no layer (no bars).'
    """
    names = [f"L{layer}" for layer in layers]
    comps = list(dict.fromkeys([*d_refusal, *d_asr]))  # one colour per component across both panels
    colors = {"attention": "#9467bd", "moe": "#ff7f0e"}
    label = {c: "MoE output" if c == "moe" else f"{c} output" for c in comps}
    panels, notes = [], []
    for quantity, table in (("refusal rate", d_refusal), ("ASR", d_asr)):
        drawn, flat = {}, []
        for comp, vals in table.items():
            y = np.array([float("nan") if v is None else 100 * float(v) for v in vals])
            if len(y) != len(names):
                raise ValueError(f"{comp}: {len(y)} values for {len(names)} layers")
            if _is_flat_zero(y):
                flat.append(label[comp])
            else:
                drawn[comp] = y
        if not drawn:
            notes.append(f"Change in {quantity}: 0 points for every component at every layer (panel omitted).")
            continue
        if flat:
            notes.append(f"Change in {quantity}: zeroing the {' or '.join(flat)} changes it at no layer (no bars).")
        panels.append((quantity, drawn))
    # each panel's quantity is its y axis title: a subplot title would sit on the bars that start at 0 on top
    fig = make_subplots(rows=1, cols=max(1, len(panels)), horizontal_spacing=0.08)
    shown: set[str] = set()
    for col, (quantity, drawn) in enumerate(panels, start=1):
        fig.update_yaxes(title_text=f"change in {quantity} (points)", row=1, col=col)
        for comp, y in drawn.items():
            fig.add_trace(
                go.Bar(x=names, y=y, name=label[comp], legendgroup=comp, showlegend=comp not in shown,
                       marker={"color": colors.get(comp, _PALETTE[comps.index(comp) % len(_PALETTE)])},
                       hovertemplate=f"{label[comp]} %{{x}}<br>%{{y:+.1f}} points<extra></extra>"),
                row=1, col=col,
            )  # fmt: skip
            shown.add(comp)
    fig.update_yaxes(zeroline=True, zerolinecolor="#444")
    fig.update_layout(title={"text": title}, template=_TEMPLATE, barmode="group", autosize=True, height=420,
                      showlegend=bool(shown), legend={"orientation": "h", "y": -0.18, "x": 0})  # fmt: skip
    _subtitle(fig, notes)
    return fig
