"""``ExpertModel``: an nnsight model whose MoE internals are named, shaped, writable points.

Inside ``model.trace(...)`` or ``model.generate(...)``::

    model.layers[i].resid_pre / .resid_mid / .resid_post        [b, p, d]
    model.layers[i].attn.output [b, p, d]   .z [b, p, h, d_head]   .head_out [b, p, h, d]
    model.layers[i].moe.router_logits / .router_probs            [b, p, E]
    model.layers[i].moe.topk_indices / .topk_weights             [b, p, k]
    model.layers[i].moe.expert_out                               [b, p, k, d]
    model.layers[i].moe.experts[e].output                        [n_routed, d]
    model.layers[i].moe.shared_out / .output                     [b, p, d]
    model.layers[i].mlp.output                                   [b, p, d]  (dense or MoE)
    model.embed [b, p, d]    model.logits [b, p, vocab]

Each point reads like an nnsight value (``.save()`` it to keep it) and is assigned to write it.
Within one invoke, read points in the order the model computes them (nnsight's rule); within a
layer that order is the one listed above.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from nnsight import TransformersModel
from torch import Tensor, nn

from . import experts as _experts
from .families import FamilySpec, UnsupportedModelError, get_module, resolve_family

__all__ = [
    "ExpertModel",
    "LayerPoints",
    "AttentionPoints",
    "MLPPoints",
    "MoEPoints",
    "ExpertPoint",
    "PointError",
]


class PointError(ValueError):
    """A point that does not exist: layer/expert out of range, MoE point on a dense layer, ..."""


def _envoy(root: Any, path: str) -> Any:
    """Walk an nnsight Envoy tree by dotted path (numeric parts index ModuleLists)."""
    env = root
    for part in path.split("."):
        if not part:
            continue
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _module_path(root: nn.Module, module: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is module:
            return name
    raise KeyError(type(module).__name__)


# --------------------------------------------------------------------------------------------
# Point groups
# --------------------------------------------------------------------------------------------


class AttentionPoints:
    """Attention points of one layer: ``output``, ``z`` and ``head_out``.

    ``head_out[..., h, :]`` is head ``h``'s write through the output projection,
    ``z[..., h, :] @ W_O[:, h]ᵀ``; it excludes the projection bias, so
    ``head_out.sum(-2) + bias == output`` (``bias`` is :attr:`o_bias`, zero for most families).
    For post-norm families (``flex_olmo``) ``output`` is the attention module's output, before the
    norm that precedes the residual add.
    """

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer
        info = model._layer_info[layer]
        self._attn_path = info["attn"]
        self._o_path = info["o_proj"]
        self.n_heads: int = info["n_heads"]
        self.d_head: int = info["d_head"]

    @property
    def _attn(self):
        return _envoy(self._model, self._attn_path)

    @property
    def _o(self):
        if self._o_path is None:
            raise PointError(f"layer {self.layer}: attention has no linear output projection to split by head")
        return _envoy(self._model, self._o_path)

    @property
    def o_weight(self) -> Float[Tensor, "d_model heads d_head"]:
        """The output projection as ``[d_model, heads, d_head]`` (a view of the real weight)."""
        w = get_module(self._model._module, self._o_path).weight
        return w.view(w.shape[0], self.n_heads, self.d_head)

    @property
    def o_bias(self) -> Float[Tensor, " d_model"] | None:
        return get_module(self._model._module, self._o_path).bias

    @property
    def output(self) -> Float[Tensor, "batch pos d_model"]:
        out = self._attn.output
        return out[0] if isinstance(out, tuple) else out

    @output.setter
    def output(self, value: Tensor) -> None:
        out = self._attn.output
        if isinstance(out, tuple):
            self._attn.output = (value, *out[1:])
        else:
            self._attn.output = value

    @property
    def z(self) -> Float[Tensor, "batch pos heads d_head"]:
        x = self._o.input
        return x.view(*x.shape[:-1], self.n_heads, self.d_head)

    @z.setter
    def z(self, value: Tensor) -> None:
        self._o.input = value.reshape(*value.shape[:-2], self.n_heads * self.d_head)

    @property
    def head_out(self) -> Float[Tensor, "batch pos heads d_model"]:
        z = self.z
        return torch.einsum("bphk,dhk->bphd", z, self.o_weight.to(z.dtype))

    @head_out.setter
    def head_out(self, value: Tensor) -> None:
        total = value.sum(dim=-2)
        if self.o_bias is not None:
            total = total + self.o_bias
        self._o.output = total


class MLPPoints:
    """The feed-forward sublayer of a layer, dense or MoE: ``output`` ``[b, p, d]``."""

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer
        self.is_moe = layer in model.moe_layers

    @property
    def output(self) -> Float[Tensor, "batch pos d_model"]:
        if self.is_moe:
            return self._model.layers[self.layer].moe.output
        out = _envoy(self._model, self._model._layer_info[self.layer]["mlp"]).output
        return out[0] if isinstance(out, tuple) else out

    @output.setter
    def output(self, value: Tensor) -> None:
        if self.is_moe:
            self._model.layers[self.layer].moe.output = value
        else:
            _envoy(self._model, self._model._layer_info[self.layer]["mlp"]).output = value


class ExpertPoint:
    """One routed expert of one layer: its outputs where it was selected.

    ``output`` is ``[n, d]`` — the expert's outputs (before routing weights) at every
    (batch, pos, slot) where it was in the top-k, in that order; ``[0, d]`` where it never
    fired. Reading it reads ``topk_indices`` then ``expert_out``.
    """

    def __init__(self, moe: MoEPoints, expert: int):
        self._moe, self.expert = moe, expert

    @property
    def slot_mask(self) -> Bool[Tensor, "batch pos k"]:
        return self._moe.topk_indices == self.expert

    @property
    def output(self) -> Float[Tensor, "n d_model"]:
        mask = self.slot_mask
        return self._moe.expert_out[mask]

    @output.setter
    def output(self, value: Tensor) -> None:
        mask = self.slot_mask
        out = self._moe.expert_out
        out[mask] = value.to(out.dtype)


class MoEPoints:
    """MoE points of one layer (see the module docstring for shapes)."""

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer
        info = model._layer_info[layer]
        self._router_path = info["router"]
        self._experts_path = info["experts"]
        self._block_path = info["block"]
        self.n_experts: int = info["n_experts"]
        self.top_k: int = info["top_k"]
        self.has_shared: bool = model.spec.shared is not None

    def _get(self, path: str):
        return _envoy(self._model, path)

    # router ---------------------------------------------------------------------------------
    @property
    def router_logits(self) -> Float[Tensor, "batch pos n_experts"]:
        """Pre-softmax router logits; edits change selection and weights through the family's router."""
        return self._get(f"{self._router_path}.el_router_logits").output

    @router_logits.setter
    def router_logits(self, value: Tensor) -> None:
        self._get(f"{self._router_path}.el_router_logits").output = value

    @property
    def router_probs(self) -> Float[Tensor, "batch pos n_experts"]:
        """The family's scores from the (possibly edited) logits: softmax, or sigmoid for DeepSeek-V3.

        A derived read-out: writing it does not change routing (edit ``router_logits`` or ``topk_*``).
        """
        return self._get(f"{self._router_path}.el_router_probs").output

    @property
    def topk_indices(self) -> Int[Tensor, "batch pos k"]:
        return self._get(f"{self._router_path}.el_topk_indices").output

    @topk_indices.setter
    def topk_indices(self, value: Tensor) -> None:
        self._get(f"{self._router_path}.el_topk_indices").output = value

    @property
    def topk_weights(self) -> Float[Tensor, "batch pos k"]:
        return self._get(f"{self._router_path}.el_topk_weights").output

    @topk_weights.setter
    def topk_weights(self, value: Tensor) -> None:
        self._get(f"{self._router_path}.el_topk_weights").output = value

    # experts --------------------------------------------------------------------------------
    @property
    def expert_out(self) -> Float[Tensor, "batch pos k d_model"]:
        """Each selected expert's output before its routing weight, slot by slot."""
        return self._get(f"{self._experts_path}.el_expert_out").output

    @expert_out.setter
    def expert_out(self, value: Tensor) -> None:
        self._get(f"{self._experts_path}.el_expert_out").output = value

    @property
    def experts(self) -> _ExpertList:
        """``experts[e]`` addresses one routed expert (:class:`ExpertPoint`)."""
        return _ExpertList(self)

    @property
    def shared_out(self) -> Float[Tensor, "batch pos d_model"] | None:
        """The shared expert's contribution (after its gate), or ``None`` for families without one."""
        if not self.has_shared:
            return None
        return self._get(f"{self._block_path}.el_shared_out").output

    @shared_out.setter
    def shared_out(self, value: Tensor) -> None:
        if not self.has_shared:
            raise PointError(f"family {self._model.family!r} has no shared expert to write")
        self._get(f"{self._block_path}.el_shared_out").output = value

    @property
    def output(self) -> Float[Tensor, "batch pos d_model"]:
        """The MoE block's output: ``Σ_k topk_weights·expert_out (+ shared_out)``."""
        return self._get(f"{self._block_path}.el_output").output

    @output.setter
    def output(self, value: Tensor) -> None:
        self._get(f"{self._block_path}.el_output").output = value


class _ExpertList:
    def __init__(self, moe: MoEPoints):
        self._moe = moe

    def __len__(self) -> int:
        return self._moe.n_experts

    def __getitem__(self, expert: int) -> ExpertPoint:
        n = self._moe.n_experts
        if not isinstance(expert, int) or not -n <= expert < n:
            raise PointError(
                f"expert {expert!r} out of range: layer {self._moe.layer} has {n} routed experts (0..{n - 1})"
            )
        return ExpertPoint(self._moe, expert % n)


class LayerPoints:
    """Points of one decoder layer: residual stream, ``attn``, ``mlp`` and (MoE layers) ``moe``."""

    def __init__(self, model: ExpertModel, layer: int):
        self._model, self.layer = model, layer
        self._info = model._layer_info[layer]

    def __repr__(self) -> str:
        kind = "moe" if self.is_moe else "dense"
        return f"<LayerPoints {self.layer} ({kind}) of {self._model.family}>"

    @property
    def is_moe(self) -> bool:
        return self.layer in self._model.moe_layers

    @property
    def envoy(self):
        """The raw nnsight Envoy of the decoder layer."""
        return _envoy(self._model, self._info["path"])

    @property
    def resid_pre(self) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream entering the layer."""
        return self.envoy.input

    @resid_pre.setter
    def resid_pre(self, value: Tensor) -> None:
        self.envoy.input = value

    @property
    def resid_mid(self) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream after attention (``resid_pre + attn.output`` for pre-norm families).

        Assigning writes *in place*: the layer keeps this tensor as its residual, so an in-place
        write is what reaches both the feed-forward input and the residual add.
        """
        return _envoy(self._model, self._info["mid"]).input

    @resid_mid.setter
    def resid_mid(self, value: Tensor) -> None:
        current = _envoy(self._model, self._info["mid"]).input
        current[...] = value.to(current.dtype)

    @property
    def resid_post(self) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream leaving the layer."""
        out = self.envoy.output
        return out[0] if isinstance(out, tuple) else out

    @resid_post.setter
    def resid_post(self, value: Tensor) -> None:
        self.envoy.output = value

    @cached_property
    def attn(self) -> AttentionPoints:
        return AttentionPoints(self._model, self.layer)

    @cached_property
    def mlp(self) -> MLPPoints:
        return MLPPoints(self._model, self.layer)

    @property
    def moe(self) -> MoEPoints:
        if not self.is_moe:
            spec = self._model.spec
            why = "a dense family" if not spec.is_moe else "a dense layer"
            raise PointError(
                f"layer {self.layer} of this {self._model.family} model is {why}: it has no MoE points. "
                f"MoE layers are {self._model.moe_layers}"
            )
        return self._model._moe_points(self.layer)

    # The writes into the residual stream (what directional ablation edits).
    @property
    def attn_write(self) -> Float[Tensor, "batch pos d_model"]:
        path = self._info.get("attn_write")
        if path is None:
            return self.attn.output
        return _envoy(self._model, path).output

    @attn_write.setter
    def attn_write(self, value: Tensor) -> None:
        path = self._info.get("attn_write")
        if path is None:
            self.attn.output = value
        else:
            _envoy(self._model, path).output = value

    @property
    def mlp_write(self) -> Float[Tensor, "batch pos d_model"]:
        path = self._info.get("ffn_write")
        if path is None:
            return self.mlp.output
        return _envoy(self._model, path).output

    @mlp_write.setter
    def mlp_write(self, value: Tensor) -> None:
        path = self._info.get("ffn_write")
        if path is None:
            self.mlp.output = value
        else:
            _envoy(self._model, path).output = value


class _LayerList:
    def __init__(self, model: ExpertModel):
        self._model = model

    def __len__(self) -> int:
        return self._model.n_layers

    def __iter__(self) -> Iterator[LayerPoints]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, layer: int) -> LayerPoints:
        n = self._model.n_layers
        if not isinstance(layer, int) or isinstance(layer, bool) or not -n <= layer < n:
            raise PointError(f"layer {layer!r} out of range: the model has {n} layers (0..{n - 1})")
        return self._model._layer_points(layer % n)


# --------------------------------------------------------------------------------------------
# ExpertModel
# --------------------------------------------------------------------------------------------

_NNSIGHT_KWARGS = ("dispatch", "rename", "envoys", "revision")


class ExpertModel(TransformersModel):
    """An nnsight ``TransformersModel`` with MoE internals as named points.

    Args:
        model: A hub name or local folder (loaded with ``AutoModelForCausalLM.from_pretrained``;
            ``dtype``, ``device_map``, ``attn_implementation``, ... are passed through), or an
            already-built ``PreTrainedModel``.
        tokenizer: Tokenizer to use. It is copied, never mutated (nnsight sets left padding on the
            copy). Loaded from ``model`` when omitted.
        family: Force an address table by name instead of resolving it from ``config.model_type``.
        validate: Run the reconstruction and routing checks on a short dummy input when wrapping.
            Default: on for models under 1B parameters.
        trust_remote_code: Off unless asked.
        **kwargs: ``from_pretrained`` keyword arguments, and nnsight's (``dispatch``, ``rename``).

    Attributes:
        family: The family name (e.g. ``"qwen3_moe"``); ``spec`` is its :class:`FamilySpec`.
        n_layers, moe_layers, n_experts, top_k, d_model, n_heads, d_head, vocab_size.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())
        >>> with model.trace("hello"):
        ...     logits = model.layers[1].moe.router_logits.save()
        >>> logits.shape[-1] == model.n_experts
        True
    """

    def __init__(
        self,
        model: str | Path | nn.Module,
        tokenizer: Any = None,
        *,
        family: str | None = None,
        validate: bool | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:
        nnsight_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _NNSIGHT_KWARGS}
        if isinstance(model, (str, Path)):
            hf_model, tokenizer = _load_pretrained(str(model), tokenizer, trust_remote_code, kwargs)
        elif isinstance(model, nn.Module):
            if kwargs:
                raise TypeError(
                    f"loading keyword arguments {sorted(kwargs)} only apply when `model` is a name or path"
                )
            hf_model = model
            if tokenizer is None:
                tokenizer = _load_tokenizer(getattr(model.config, "_name_or_path", ""), trust_remote_code)
            else:
                tokenizer = copy.deepcopy(tokenizer)
        else:
            raise TypeError(f"`model` must be a hub name, a local folder or a torch module, got {type(model)}")

        spec = resolve_family(family if family is not None else hf_model)
        info = _layer_table(hf_model, spec)
        hf_model.eval()
        if hasattr(hf_model.config, "output_router_logits"):
            # HF's auxiliary-loss path breaks generate() with a KV cache; analysis never needs it.
            hf_model.config.output_router_logits = False
        _experts.install(hf_model, spec)
        try:
            super().__init__(hf_model, tokenizer=tokenizer, **nnsight_kwargs)
        except Exception:
            _experts.restore(hf_model)
            raise
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "_layer_info", info)
        object.__setattr__(self, "_point_cache", {})
        if validate is None:
            validate = sum(p.numel() for p in hf_model.parameters()) < 1_000_000_000
        if validate:
            from .checks import check_model

            check_model(self)

    # ---- identity ---------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.spec.name

    @property
    def hf_model(self) -> nn.Module:
        """The underlying transformers model."""
        return self._module

    @property
    def config(self):
        return self._module.config

    @property
    def n_layers(self) -> int:
        return len(self._layer_info)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, row in enumerate(self._layer_info) if row["block"] is not None]

    @property
    def n_experts(self) -> int:
        """Routed experts per MoE layer (0 for dense models)."""
        rows = [r for r in self._layer_info if r["block"] is not None]
        return rows[0]["n_experts"] if rows else 0

    @property
    def top_k(self) -> int:
        rows = [r for r in self._layer_info if r["block"] is not None]
        return rows[0]["top_k"] if rows else 0

    @property
    def d_model(self) -> int:
        return int(self._module.config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self._layer_info[-1]["n_heads"])

    @property
    def d_head(self) -> int:
        return int(self._layer_info[-1]["d_head"])

    @property
    def vocab_size(self) -> int:
        return int(self._module.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self._module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._module.parameters()).dtype

    def __repr__(self) -> str:
        return (
            f"ExpertModel(family={self.family!r}, n_layers={self.n_layers}, moe_layers={self.moe_layers}, "
            f"n_experts={self.n_experts}, top_k={self.top_k}, d_model={self.d_model})"
        )

    # ---- points -------------------------------------------------------------------------------
    @property
    def layers(self) -> _LayerList:
        """``layers[i]`` gives layer ``i``'s points (:class:`LayerPoints`)."""
        return _LayerList(self)

    def _layer_points(self, layer: int) -> LayerPoints:
        key = ("layer", layer)
        if key not in self._point_cache:
            self._point_cache[key] = LayerPoints(self, layer)
        return self._point_cache[key]

    def _moe_points(self, layer: int) -> MoEPoints:
        key = ("moe", layer)
        if key not in self._point_cache:
            self._point_cache[key] = MoEPoints(self, layer)
        return self._point_cache[key]

    @property
    def embed(self) -> Float[Tensor, "batch pos d_model"]:
        """The token embeddings (the residual stream before layer 0)."""
        return _envoy(self, self.spec.embed).output

    @embed.setter
    def embed(self, value: Tensor) -> None:
        _envoy(self, self.spec.embed).output = value

    @property
    def logits(self) -> Float[Tensor, "batch pos vocab"]:
        """The unembedding's output."""
        return _envoy(self, self.spec.lm_head).output

    @logits.setter
    def logits(self, value: Tensor) -> None:
        _envoy(self, self.spec.lm_head).output = value

    @property
    def final_norm(self):
        """The Envoy of the final norm (its ``.input`` is the last residual stream)."""
        return _envoy(self, self.spec.final_norm)

    # ---- lifecycle ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Undo the instrumentation: original router/block classes, no hook points, and the
        original experts implementation. MoE points are unavailable afterwards."""
        _experts.restore(self._module)

    def __enter__(self) -> ExpertModel:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def tokenize(self, prompts: str | list[str], **kwargs) -> dict[str, Tensor]:
        """Tokenize with the model's (left-padding) tokenizer, on the model's device."""
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, **kwargs)
        return {k: v.to(self.device) for k, v in enc.items()}


# --------------------------------------------------------------------------------------------
# loading and the layer table
# --------------------------------------------------------------------------------------------


def _load_tokenizer(name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not name:
        raise ValueError("no tokenizer given and the model has no name_or_path to load one from; pass tokenizer=")
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"could not load a tokenizer for {name!r} ({exc}); pass tokenizer=") from exc


def _load_pretrained(name: str, tokenizer: Any, trust_remote_code: bool, kwargs: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    if tokenizer is None:
        tokenizer = _load_tokenizer(name, trust_remote_code)
    else:
        tokenizer = copy.deepcopy(tokenizer)
    return model, tokenizer


def _heads(attn: nn.Module, in_features: int, config) -> tuple[int, int]:
    candidates = [
        getattr(attn, "num_heads", None),
        getattr(attn, "num_attention_heads", None),
        getattr(attn, "num_v_heads", None),
        getattr(config, "num_attention_heads", None),
    ]
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "v_head_dim", None)
    if head_dim and in_features % head_dim == 0:
        return in_features // head_dim, head_dim
    for n in candidates:
        if isinstance(n, int) and n > 0 and in_features % n == 0:
            return n, in_features // n
    return 1, in_features


def _layer_table(model: nn.Module, spec: FamilySpec) -> list[dict[str, Any]]:
    """Resolve every point's module path for every layer, failing loudly with the inventory."""
    layers = spec.layer_list(model)
    base = _module_path(model, layers)
    rows: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        path = f"{base}.{i}"
        attn_name, attn = spec.attn_module(layer)
        o = spec.o_proj_module(attn)
        n_heads, d_head = _heads(attn, o[1].in_features, model.config) if o else (0, 0)
        mid = get_module(layer, spec.mid)
        if mid is None:
            raise UnsupportedModelError(
                f"family {spec.name!r}: layer {i} has no {spec.mid!r} module (needed for resid_mid); "
                f"children are {[n for n, _ in layer.named_children()]}"
            )
        block = spec.moe_block(layer)
        row: dict[str, Any] = {
            "path": path,
            "attn": f"{path}.{attn_name}",
            "o_proj": f"{path}.{attn_name}.{o[0]}" if o else None,
            "n_heads": n_heads,
            "d_head": d_head,
            "mid": f"{path}.{spec.mid}",
            "mlp": f"{path}.{spec.moe}",
            "attn_write": f"{path}.{spec.attn_write}" if spec.attn_write else None,
            "ffn_write": f"{path}.{spec.ffn_write}" if spec.ffn_write else None,
            "block": None,
        }
        if block is not None:
            router = get_module(block, spec.router)
            experts = get_module(block, spec.experts)
            row.update(
                block=f"{path}.{spec.moe}",
                router=f"{path}.{spec.moe}.{spec.router}",
                experts=f"{path}.{spec.moe}.{spec.experts}",
                n_experts=int(experts.num_experts),
                top_k=int(router.top_k),
            )
        rows.append(row)
    if spec.is_moe and not any(r["block"] for r in rows):
        raise UnsupportedModelError(
            f"family {spec.name!r}: no layer has an MoE block at {spec.moe!r} with {spec.router!r} and "
            f"{spec.experts!r}; layer 0 children are {[n for n, _ in layers[0].named_children()]}"
        )
    return rows
