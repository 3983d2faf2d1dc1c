"""The per-layer layout: where each layer's modules sit, resolved once from the family spec.

``model.layout[i]`` is a frozen :class:`LayerLayout`: module paths (relative to the
transformers model, dotted), head counts, and for MoE layers the router / experts paths with
``n_experts`` and ``top_k``. Everything that needs a module of a layer reads it here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from . import instrument as _instrument
from .families import FamilySpec, UnsupportedModelError, get_module

__all__ = ["LayerLayout", "resolve_layout", "editable_paths"]


@dataclass(frozen=True)
class LayerLayout:
    """Where one decoder layer's modules sit (dotted paths from the transformers model).

    Attributes:
        index: The layer number.
        path: The decoder layer (``resid_pre`` is its input, ``resid_post`` its output).
        attn: The attention module (hybrid families: the one present in this layer; ``None`` on a layer
            without attention).
        o_proj: Its linear output projection, or ``None`` (no per-head points then).
        n_heads, d_head: How ``o_proj``'s input splits into heads.
        mid: The module whose input is ``resid_mid`` (``None`` where the wiring has no such stream).
        mlp: The feed-forward sublayer (dense MLP or MoE block).
        attn_write, ffn_write: Post-norm families: the modules whose outputs are the sublayer
            writes into the residual stream (``None``: the sublayer output itself).
        block, router, experts: The MoE block and its router / fused experts (``None`` on dense
            layers).
        n_experts, top_k: Routed experts and slots per token (0 on dense layers).
        layer_type: The decoder layer's class name (hybrid stacks mix several).
        has_shared: Whether this layer has a shared expert; ``shared_point`` is the hook point its
            contribution passes through (``None`` without one).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> lay = model.layout[1]
        >>> lay.router, lay.n_experts, lay.is_moe
        ('model.layers.1.mlp.gate', 8, True)
    """

    index: int
    path: str
    attn: str | None
    o_proj: str | None
    n_heads: int
    d_head: int
    mid: str | None
    mlp: str
    attn_write: str | None = None
    ffn_write: str | None = None
    block: str | None = None
    router: str | None = None
    experts: str | None = None
    n_experts: int = 0
    top_k: int = 0
    layer_type: str = ""
    has_shared: bool = False
    shared_point: str | None = None

    @property
    def is_moe(self) -> bool:
        """Whether the layer has an MoE block."""
        return self.block is not None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (the shape of the deprecated ``_layer_info`` rows)."""
        row = asdict(self)
        row.pop("index")
        if not self.is_moe:
            for key in ("router", "experts", "n_experts", "top_k", "has_shared", "shared_point"):
                row.pop(key)
        return row


def _module_path(root: nn.Module, module: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is module:
            return name
    raise KeyError(type(module).__name__)


def _heads(attn: nn.Module, in_features: int, config) -> tuple[int, int]:
    try:
        config_heads = getattr(config, "num_attention_heads", None)
    except Exception:  # per-layer configs (dots3_note_text) refuse global reads; the module knows its own
        config_heads = None
    candidates = [
        getattr(attn, "num_heads", None),
        getattr(attn, "num_attention_heads", None),
        getattr(attn, "num_v_heads", None),
        config_heads,
    ]
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "v_head_dim", None)
    if head_dim and in_features % head_dim == 0:
        return in_features // head_dim, head_dim
    for n in candidates:
        if isinstance(n, int) and n > 0 and in_features % n == 0:
            return n, in_features // n
    return 1, in_features


def _write_path(layer: nn.Module, path: str, rel: str | None) -> str | None:
    return f"{path}.{rel}" if rel is not None and get_module(layer, rel) is not None else None


def resolve_layout(model: nn.Module, spec: FamilySpec) -> tuple[LayerLayout, ...]:
    """Resolve every layer's module paths, failing loudly with the inventory.

    Example:
        >>> from expertlens import resolve_family
        >>> from expertlens.layout import resolve_layout
        >>> from expertlens.testing import tiny_model
        >>> hf = tiny_model("olmoe")
        >>> [lay.is_moe for lay in resolve_layout(hf, resolve_family(hf))]
        [True, True]
    """
    layers = spec.layer_list(model)
    base = _module_path(model, layers)
    rows: list[LayerLayout] = []
    for i, layer in enumerate(layers):
        path = f"{base}.{i}"
        found = spec.attn_module(layer)
        attn_name, attn = found if found is not None else (None, None)
        o = spec.o_proj_module(attn) if attn is not None else None
        n_heads, d_head = _heads(attn, o[1].in_features, model.config) if o else (0, 0)
        if spec.mid is not None and get_module(layer, spec.mid) is None:
            raise UnsupportedModelError(
                f"family {spec.name!r}: layer {i} has no {spec.mid!r} module (needed for resid_mid); "
                f"children are {[n for n, _ in layer.named_children()]}"
            )
        moe: dict[str, Any] = {}
        block = spec.moe_block(layer)
        if block is not None:
            for what, sub in (("shared expert", spec.shared), ("shared-expert gate", spec.shared_gate)):
                if sub is not None and spec.shared_level == "block" and not spec.shared_optional \
                        and get_module(block, sub) is None:
                    raise UnsupportedModelError(
                        f"family {spec.name!r}: layer {i}'s MoE block ({type(block).__name__}) has no {what} at "
                        f"{sub!r}; its children are {[n for n, _ in block.named_children()]}"
                    )
            layer_shared = spec.shared is not None and spec.shared_level == "layer"
            owner = f"{path}.{spec.shared}" if layer_shared else f"{path}.{spec.moe}"
            moe = dict(
                shared_point=f"{owner}.el_shared_out",
                has_shared=spec.shared is not None
                and get_module(layer if layer_shared else block, spec.shared) is not None,
                block=f"{path}.{spec.moe}",
                router=f"{path}.{spec.moe}.{spec.router}",
                experts=f"{path}.{spec.moe}.{spec.experts}",
                n_experts=_instrument.global_num_experts(get_module(block, spec.experts)),
                top_k=int(get_module(block, spec.router).top_k),
            )
        rows.append(
            LayerLayout(
                index=i,
                path=path,
                attn=f"{path}.{attn_name}" if attn_name else None,
                o_proj=f"{path}.{attn_name}.{o[0]}" if o else None,
                n_heads=n_heads,
                d_head=d_head,
                mid=f"{path}.{spec.mid}" if spec.mid is not None else None,
                mlp=f"{path}.{spec.moe}",
                # a write module missing on this layer (a dense layer of a family whose MoE block owns it): none
                attn_write=_write_path(layer, path, spec.attn_write),
                ffn_write=_write_path(layer, path, spec.ffn_write),
                layer_type=type(layer).__name__,
                **moe,
            )
        )
    if spec.is_moe and not any(r.is_moe for r in rows):
        raise UnsupportedModelError(
            f"family {spec.name!r}: no layer has an MoE block at {spec.moe!r} with {spec.router!r} and "
            f"{spec.experts!r}; layer 0 children are {[n for n, _ in layers[0].named_children()]}"
        )
    return tuple(rows)


def editable_paths(spec: FamilySpec, layout: tuple[LayerLayout, ...]) -> list[str]:
    """Paths of the modules whose outputs edits may change: ends, layers, attention, o_proj,
    dense MLPs and post-norm writes (MoE values are edited at hook points instead).

    Example:
        >>> from expertlens import resolve_family
        >>> from expertlens.layout import editable_paths, resolve_layout
        >>> from expertlens.testing import tiny_model
        >>> hf = tiny_model("olmoe")
        >>> spec = resolve_family(hf)
        >>> editable_paths(spec, resolve_layout(hf, spec))[:2]
        ['model.embed_tokens', 'lm_head']
    """
    paths = [spec.embed, spec.lm_head]
    for lay in layout:
        paths += [lay.path, lay.attn, lay.o_proj, lay.attn_write, lay.ffn_write]
        if not lay.is_moe:
            paths.append(lay.mlp)
    out: list[str] = []
    for path in paths:
        if path is not None and path not in out:
            out.append(path)
    return out
