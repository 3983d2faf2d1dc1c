"""The result value of every attribution method: labelled components with their scores."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["Component", "AttributionTable", "COMPONENT_KINDS", "LAYERED_KINDS"]

#: Component kinds, in the order they write the residual stream within a layer.
#:
#: ``embed`` (layer -1): the residual stream entering layer 0 (token embeddings, after any
#: embedding multiplier). ``head`` (index = head): one attention head's write through the output
#: projection. ``attn_bias``: the attention output-projection bias. ``attn``: a whole attention
#: sublayer that has no linear output projection to split by head. ``expert`` (index = expert):
#: one routed expert's weighted output ``topk_weight · expert_out`` at the tokens that chose it.
#: ``shared``: the shared expert (after its gate). ``mlp``: a dense feed-forward layer.
#: ``router`` (index = expert): router logits (attribution patching only). ``other``: writes no
#: model component made (interventions that edit residual points, or numerical error; ~0 on an
#: unedited model). ``const`` (layer = n_layers): logit-difference constant from the unembedding bias
#: and a final-norm bias.
COMPONENT_KINDS = (
    "embed", "head", "attn_bias", "attn", "expert", "shared", "mlp", "router", "other", "const",
)
#: Kinds that ``AttributionTable.to_matrix`` can lay out as ``[n_layers, n]`` or ``[n_layers]``.
LAYERED_KINDS = ("head", "expert", "router", "attn_bias", "attn", "shared", "mlp", "other")


class Component(NamedTuple):
    """A label: ``(layer, kind, index)``; ``index`` is the head or expert, else 0.

    Example:
        >>> from expertlens.attribution import Component
        >>> c = Component(3, "expert", 5)
        >>> c.layer, c.kind, c.index
        (3, 'expert', 5)
    """

    layer: int
    kind: str
    index: int = 0

    @property
    def name(self) -> str:
        """Short readable name, e.g. ``"L1.head3"``, ``"L0.expert5"``, ``"embed"``."""
        if self.kind in ("embed", "const"):
            return self.kind
        if self.kind in ("head", "expert", "router"):
            return f"L{self.layer}.{self.kind}{self.index}"
        return f"L{self.layer}.{self.kind}"


@dataclass
class AttributionTable:
    """Scores for labelled components: one row per component, optionally per prompt.

    A plain value: it holds CPU tensors, compares by content, and round-trips through JSON with
    :meth:`to_dict` / :meth:`from_dict`.

    Attributes:
        components: One :class:`Component` label per score.
        values: ``[n_components]`` scores averaged over prompts (and target positions).
        per_prompt: ``[n_prompts, n_components]`` scores per prompt (``None`` when not kept).
        total: The quantity the scores decompose (e.g. the measured projection, or the metric
            change for patching), averaged over prompts; ``None`` when there is none.
        per_prompt_total: ``[n_prompts]`` the same per prompt, or ``None``.
        method: ``"direct"``, ``"attribution_patching"``, ``"activation_patching"``, ...
        shape: ``{"n_layers", "n_heads", "n_experts"}`` for :meth:`to_matrix`.
        meta: Free-form JSON-able description of the target / metric / settings.

    Example:
        >>> import torch
        >>> shape = {"n_layers": 2, "n_heads": 4, "n_experts": 8}
        >>> t = AttributionTable([Component(0, "head", 1), Component(1, "expert", 3)],
        ...                      torch.tensor([0.5, -2.0]), shape=shape)
        >>> t.top(1)[0]["name"]
        'L1.expert3'
        >>> t.to_matrix("head").shape
        torch.Size([2, 4])
    """

    components: list[Component]
    values: Float[Tensor, " n_components"]
    per_prompt: Float[Tensor, "n_prompts n_components"] | None = None
    total: float | None = None
    per_prompt_total: Float[Tensor, " n_prompts"] | None = None
    method: str = ""
    shape: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.components = [Component(*c) for c in self.components]
        self.values = torch.as_tensor(self.values, dtype=torch.float32).detach().cpu()
        if self.values.shape != (len(self.components),):
            raise ValueError(
                f"values has shape {tuple(self.values.shape)}, expected ({len(self.components)},)"
            )
        if self.per_prompt is not None:
            self.per_prompt = torch.as_tensor(self.per_prompt, dtype=torch.float32).detach().cpu()
        if self.per_prompt_total is not None:
            self.per_prompt_total = torch.as_tensor(self.per_prompt_total, dtype=torch.float32).detach().cpu()
        if self.total is not None:
            self.total = float(self.total)

    # ---- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.components)

    def index(self, component: Component | tuple | str) -> int:
        """Row of a component label, given as a tuple or its name (``"L1.expert3"``, ``"embed"``)."""
        if isinstance(component, str):
            for i, c in enumerate(self.components):
                if c.name == component:
                    return i
            raise KeyError(component)
        return self.components.index(Component(*component))

    def __getitem__(self, component: Component | tuple | str) -> float:
        return float(self.values[self.index(component)])

    def select(self, kinds: str | Sequence[str] | None = None, layers: Sequence[int] | None = None
               ) -> AttributionTable:
        """The sub-table of some kinds and/or layers."""
        kinds = (kinds,) if isinstance(kinds, str) else kinds
        keep = [
            i for i, c in enumerate(self.components)
            if (kinds is None or c.kind in kinds) and (layers is None or c.layer in layers)
        ]
        return AttributionTable(
            [self.components[i] for i in keep], self.values[keep],
            None if self.per_prompt is None else self.per_prompt[:, keep],
            self.total, self.per_prompt_total, self.method, dict(self.shape), dict(self.meta),
        )

    def sum(self, kinds: str | Sequence[str] | None = None) -> float:
        """Sum of the scores (of some kinds). For direct attribution, all kinds sum to ``total``."""
        return float(self.select(kinds).values.sum()) if kinds is not None else float(self.values.sum())

    def top(self, n: int = 10, *, by: str = "abs", kinds: str | Sequence[str] | None = None,
            exclude: Sequence[str] = ("other",)) -> list[dict[str, Any]]:
        """The ``n`` largest components as rows ``{"layer", "kind", "index", "name", "value"}``.

        Args:
            n: How many rows.
            by: ``"abs"`` (largest magnitude), ``"pos"`` (most positive) or ``"neg"`` (most negative).
            kinds: Only these kinds.
            exclude: Kinds left out (default: the ``other`` bookkeeping rows).
        """
        table = self.select(kinds) if kinds is not None else self
        rows = [
            (c, float(v)) for c, v in zip(table.components, table.values.tolist()) if c.kind not in exclude
        ]
        key = {"abs": lambda r: -abs(r[1]), "pos": lambda r: -r[1], "neg": lambda r: r[1]}[by]
        rows.sort(key=key)
        return [
            {"layer": c.layer, "kind": c.kind, "index": c.index, "name": c.name, "value": v}
            for c, v in rows[:n]
        ]

    def to_matrix(self, kind: str = "head") -> Float[Tensor, "n_layers ..."]:
        """Lay one kind out by layer: ``head`` → ``[n_layers, n_heads]``, ``expert``/``router`` →
        ``[n_layers, n_experts]``, the per-layer kinds (``shared``, ``mlp``, ``attn_bias``, ``attn``,
        ``other``) → ``[n_layers]``. Layers without such a component hold 0.

        Example:
            >>> import torch
            >>> t = AttributionTable([Component(1, "shared")], torch.tensor([3.0]), shape={"n_layers": 2})
            >>> t.to_matrix("shared").tolist()
            [0.0, 3.0]
        """
        if kind not in LAYERED_KINDS:
            raise ValueError(f"to_matrix takes one of {LAYERED_KINDS}, got {kind!r}")
        n_layers = self.shape.get("n_layers")
        if n_layers is None:
            n_layers = 1 + max((c.layer for c in self.components if c.kind in LAYERED_KINDS), default=-1)
        width = {"head": self.shape.get("n_heads"), "expert": self.shape.get("n_experts"),
                 "router": self.shape.get("n_experts")}.get(kind, 0)
        rows = [(c, v) for c, v in zip(self.components, self.values.tolist()) if c.kind == kind]
        if kind in ("head", "expert", "router"):
            if width is None:
                width = 1 + max((c.index for c, _ in rows), default=-1)
            out = torch.zeros(n_layers, width)
            for c, v in rows:
                out[c.layer, c.index] = v
            return out
        out = torch.zeros(n_layers)
        for c, v in rows:
            out[c.layer] += v
        return out

    # ---- arithmetic -------------------------------------------------------------------------------
    def __sub__(self, other: AttributionTable) -> AttributionTable:
        """Component-wise difference of mean scores (e.g. harmful minus harmless)."""
        if self.components != other.components:
            raise ValueError("tables have different components; cannot subtract")
        total = None if self.total is None or other.total is None else self.total - other.total
        return AttributionTable(
            list(self.components), self.values - other.values, None, total, None,
            f"{self.method} (difference)", dict(self.shape), {"a": self.meta, "b": other.meta},
        )

    # ---- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``json.dumps(table.to_dict())`` works)."""
        return {
            "method": self.method,
            "components": [{"layer": c.layer, "kind": c.kind, "index": c.index} for c in self.components],
            "values": self.values.tolist(),
            "per_prompt": None if self.per_prompt is None else self.per_prompt.tolist(),
            "total": self.total,
            "per_prompt_total": None if self.per_prompt_total is None else self.per_prompt_total.tolist(),
            "shape": dict(self.shape),
            "meta": _jsonable(self.meta),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttributionTable:
        """Inverse of :meth:`to_dict`."""
        return cls(
            [Component(c["layer"], c["kind"], c["index"]) for c in data["components"]],
            torch.tensor(data["values"], dtype=torch.float32),
            None if data.get("per_prompt") is None else torch.tensor(data["per_prompt"]),
            data.get("total"),
            None if data.get("per_prompt_total") is None else torch.tensor(data["per_prompt_total"]),
            data.get("method", ""), dict(data.get("shape", {})), dict(data.get("meta", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AttributionTable):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        tot = "" if self.total is None else f", total={self.total:.4g}"
        return f"AttributionTable(method={self.method!r}, n_components={len(self)}{tot})"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return repr(obj)
