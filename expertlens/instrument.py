"""The instrumentation expertlens installs into a transformers MoE model.

Three pieces, all undone by :func:`restore`:

* **Hook points**: parameter-free identity modules (:class:`HookPoint`) that values are passed
  through, so nnsight serves them at ``.output``, readable and writable. They are shaped
  ``[batch, pos, ...]`` (never the flattened ``[batch*pos, ...]`` layout transformers uses inside
  MoE blocks), so nnsight's per-invoke batch narrowing applies and edits never leak between
  prompts. ``state_dict`` is unchanged: hook points own no parameters or buffers.
* **The experts implementation** ``"expertlens"``, registered in transformers'
  ``ALL_EXPERTS_FUNCTIONS``. It is the grouped-GEMM computation of ``grouped_mm`` with one
  difference of order: per-slot outputs are restored to token order *before* the routing weights
  multiply them, and pass through a hook point on the way. The products and the sum over slots
  are the same floating-point operations, so results are bit-identical to ``grouped_mm``.
* **Router and block wrappers**: the router's own forward runs unchanged, except that the
  linear call producing its pre-softmax logits is intercepted and its result passed through a
  hook point. Editing ``router_logits`` therefore changes selection and weights exactly as the
  family's own router would. The MoE block runs a generic forward driven by the family spec so
  every family calls its points in the same order: router -> experts -> shared expert -> output.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from .families import FamilySpec, get_module

__all__ = [
    "HookPoint",
    "plain_calls",
    "EXPERTS_IMPLEMENTATION",
    "expertlens_experts_forward",
    "expertlens_fp8_experts_forward",
    "expert_forward",
    "all_experts_forward",
    "global_num_experts",
    "tp_sharded",
    "register_experts_implementation",
    "Instrumentation",
    "install",
    "restore",
    "is_installed",
]

EXPERTS_IMPLEMENTATION = "expertlens"

#: Names of the hook-point submodules, by owner.
ROUTER_POINTS = ("el_router_logits", "el_router_probs", "el_topk_indices", "el_topk_weights")
EXPERTS_POINTS = ("el_expert_view", "el_expert_out", "el_expert_contrib")
BLOCK_POINTS = ("el_shared_out", "el_output")


class HookPoint(nn.Module):
    """An identity module: a value passed through it is served by nnsight at ``.output``.

    Registered edits (``model.add_edit``) run inside it, so nnsight reads the edited value.

    Example:
        >>> import torch
        >>> from expertlens.instrument import HookPoint
        >>> hp = HookPoint()
        >>> hp.edits.append(lambda x: x * 2)
        >>> hp(torch.ones(2)).tolist()
        [2.0, 2.0]
    """

    def __init__(self) -> None:
        super().__init__()
        self.edits: list = []

    def forward(self, x):
        for edit in self.edits:
            x = edit(x)
        return x


_NNSIGHT_STATE = "__nnsight__"  # where nnsight 0.8 keeps a wrapped module's controller state


def _quiet(point: nn.Module) -> bool:
    """True when nothing can see or change a value passed through ``point`` in this call: no registered edit,
    no torch hook, and no nnsight trace with workers watching the module (no trace, or one with nothing in it)."""
    d = point.__dict__
    if (d["edits"] or d["_forward_hooks"] or d["_forward_pre_hooks"] or _torch_module._global_forward_hooks
            or _torch_module._global_forward_pre_hooks):  # global torch hooks (inlined: asked on every visit)
        return False
    state = d.get(_NNSIGHT_STATE)
    return state is None or "_el_plain" in d or state.active()[0] is None


def _idle(point: nn.Module, count: bool = True) -> bool:
    """True when ``point`` can be skipped: :func:`_quiet`, or a trace is running but no worker waits on this visit
    of the point and no cache records it. A skipped visit inside a trace is still counted, as nnsight would count
    it, so occurrence numbers (generation steps, ``tracer.iter``) stay right (``count=False``: only ask)."""
    d = point.__dict__
    if (d["edits"] or d["_forward_hooks"] or d["_forward_pre_hooks"] or _torch_module._global_forward_hooks
            or _torch_module._global_forward_pre_hooks):  # global torch hooks (inlined: asked on every visit)
        return False
    state = d.get(_NNSIGHT_STATE)
    if state is None or "_el_plain" in d:  # no nnsight, or inside `plain_calls` (no trace runs)
        return True
    interleaver, _, locations = state.active()
    if interleaver is None:
        return True
    try:
        parked, observers, counts = interleaver.parked, interleaver.observers, interleaver.counts
    except AttributeError:  # an nnsight whose internals differ: always run the point
        return False
    # With no worker parked and no cache observing, nnsight's `Interleaver.handle` only counts the visit (a
    # tensor-parallel model's fragments are made whole only for a consumer), which is what a skip does.
    for loc in locations:
        if loc in parked or loc in observers:
            return False
    if count:
        for loc in locations:
            counts[loc] = counts.get(loc, 0) + 1
    return True


def _through(point: nn.Module, x):
    """``x`` through the hook point, skipping the module call when the point is idle."""
    return x if _idle(point) else point(x)


@contextlib.contextmanager
def plain_calls(model: nn.Module):
    """Run ordinary (untraced) calls of an nnsight-wrapped model without nnsight's per-module controllers.

    Outside a trace a controller only forwards to the module's body, but it costs a Python call per module per
    forward; :func:`expertlens.interventions.generate` drops them for its duration (registered edits live in the
    modules' own forwards and still apply). Modules whose controller runs something other than their class's
    forward (accelerate's device hooks, transformers' expert-parallel wrapper, ``.source``) keep it. Not for use
    while a trace of the model runs.

    Example:
        >>> import torch
        >>> from expertlens import ExpertModel
        >>> from expertlens.instrument import plain_calls
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> with plain_calls(model.hf_model), torch.no_grad():
        ...     logits = model.hf_model(torch.tensor([[5, 6, 7]])).logits
    """
    try:
        from nnsight.intervention.source import Controller
    except ImportError:  # another nnsight: leave everything as it is
        yield
        return
    removed = []
    for module in model.modules():
        d = module.__dict__
        controller = d.get("forward")
        if not isinstance(controller, Controller) or "_hf_hook" in d:
            continue
        state = d.get(_NNSIGHT_STATE)
        if state is None or getattr(state, "sourced", True) or getattr(state, "body", None) is not type(module).forward:
            continue
        del d["forward"]
        if isinstance(module, HookPoint):
            d["_el_plain"] = True  # no trace can reach it: `_idle` / `_quiet` skip asking nnsight
        removed.append((module, controller))
    try:
        yield
    finally:
        for module, controller in removed:
            module.__dict__["forward"] = controller
            module.__dict__.pop("_el_plain", None)


def _editable_forward(self: nn.Module, *args, **kwargs):
    """Forward of a module whose output expertlens may edit (only when edits are registered).

    Output edits run *inside* the forward nnsight wraps, so a point read in a trace shows the
    edited value, exactly as the next module receives it.
    """
    st = self.__dict__["_el_edit_state"]
    out = st.original_class.forward(self, *args, **kwargs)
    for edit in st.edits:
        out = edit(out, args, kwargs)
    return out


@dataclass
class _EditState:
    original_class: type
    edits: list = field(default_factory=list)


def make_editable(module: nn.Module) -> None:
    """Swap ``module`` to a subclass whose forward applies registered output edits."""
    if "_el_state" in module.__dict__:
        raise ValueError(f"{type(module).__name__} is already wrapped by expertlens")
    st = module.__dict__.get("_el_edit_state")
    if st is None:
        module.__dict__["_el_edit_state"] = st = _EditState(type(module))
    if type(module) is st.original_class:
        _swap_class(module, "editable", _editable_forward)


def undo_editable(module: nn.Module) -> None:
    # The state stays: nnsight may hold _editable_forward as the module's body, and with no
    # edits it is the original forward.
    st = module.__dict__.get("_el_edit_state")
    if st is not None:
        st.edits.clear()
        module.__class__ = st.original_class


def _bp(shape: tuple[int, int] | None, n_tokens: int) -> tuple[int, int]:
    """(batch, pos) for a flattened token count, from the shape the block recorded."""
    if shape is not None and shape[0] * shape[1] == n_tokens:
        return shape
    return 1, n_tokens


# --------------------------------------------------------------------------------------------
# Experts implementation
# --------------------------------------------------------------------------------------------


def expertlens_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """Grouped experts forward exposing per-slot outputs before their routing weights.

    Registered as experts implementation ``"expertlens"``. Same arguments and result as
    transformers' ``grouped_mm`` implementation (and bit-identical to it).

    Example:
        >>> import transformers.integrations.moe as moe
        >>> from expertlens.instrument import register_experts_implementation
        >>> register_experts_implementation()
        >>> "expertlens" in moe.ALL_EXPERTS_FUNCTIONS  # doctest: +SKIP
        True
    """
    per_slot = _grouped_per_slot(self, hidden_states, top_k_index)
    if self.__dict__.get("_el_ep"):
        # Under expert parallelism this runs on the rows other ranks sent to this rank's experts, under tensor
        # parallelism on this rank's slice of every expert; the points are applied by the MoE block on the whole
        # per-slot outputs transformers' wrapper hands back (`_ep_per_slot`).
        return (per_slot * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)
    return _weigh_through_points(self, per_slot, top_k_index, top_k_weights).to(hidden_states.dtype)


def _grouped_per_slot(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor) -> Tensor:
    """Each (token, slot)'s expert output ``[n, k, d]`` before its routing weight, grouped as ``grouped_mm`` is."""
    from transformers.integrations.moe import _grouped_linear

    device = hidden_states.device
    n_tokens, hidden_dim = hidden_states.shape
    k = top_k_index.size(-1)
    n_experts = self.num_experts

    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden_states[perm // k]
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=n_experts, min=0, max=n_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)

    # Slots pointing past the last expert (expert-parallel sentinels) produce nothing: grouped_mm
    # skips rows beyond offsets[-1]; we zero them explicitly.
    # Only expert-parallel shards route to sentinel ids (as in grouped_mm); checking a flag, not the
    # tensor, avoids a device sync on every call.
    has_sentinel = bool(getattr(self, "_is_expert_parallel", False))
    if has_sentinel:
        sentinel = (expert_ids_g >= n_experts).unsqueeze(-1)
        expert_ids_g = expert_ids_g.clamp(max=n_experts - 1)
        selected = selected.masked_fill(sentinel, 0.0)

    if self.has_gate:
        w_up = self.gate_up_proj
        b_up = self.gate_up_proj_bias[expert_ids_g] if self.has_bias else None
    else:
        w_up = self.up_proj
        b_up = self.up_proj_bias[expert_ids_g] if self.has_bias else None
    h = _grouped_linear(selected, w_up, offsets, bias=b_up, is_transposed=self.is_transposed)
    if has_sentinel:
        h = h.masked_fill(sentinel, 0.0)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    b_down = self.down_proj_bias[expert_ids_g] if self.has_bias else None
    out = _grouped_linear(h, self.down_proj, offsets, bias=b_down, is_transposed=self.is_transposed)
    if has_sentinel:
        out = out.masked_fill(sentinel, 0.0)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)

    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    return out[inv_perm].view(n_tokens, k, hidden_dim)


def slot_norm(experts: nn.Module) -> nn.Module | None:
    """The per-expert norm a fused experts module applies to each slot's output *outside* its experts
    implementation, called as ``norm(out, expert_ids)`` (Ergo: ``ErgoExperts`` runs the decorated projections on
    top-1 rows, then ``post_expert_norm`` with per-expert weights); ``None`` for every other module (a norm the
    decorator applies, ``has_post_expert_norm``, runs inside the implementation).

    Example:
        >>> from expertlens.instrument import slot_norm
        >>> from expertlens.testing import tiny_model
        >>> slot_norm(tiny_model("olmoe").model.layers[0].mlp.experts) is None
        True
    """
    if not hasattr(experts, "has_gate") or experts.has_post_expert_norm:
        return None
    return experts._modules.get("post_expert_norm")


def _slot_normed(experts: nn.Module, norm: nn.Module, flat: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """The MoE sum of experts with a :func:`slot_norm`: per-slot outputs grouped as ``grouped_mm`` computes the
    module's top-1 rows, normalised with their expert ids, passed through the expert points, weighted and summed."""
    n, k = indices.shape
    per_slot = _grouped_per_slot(experts, flat, indices).reshape(n * k, -1)
    per_slot = norm(per_slot, indices.reshape(-1).clamp_max(int(experts.num_experts) - 1)).view(n, k, -1)
    return _weigh_through_points(experts, per_slot, indices, weights)


def _weigh_through_points(experts: nn.Module, per_slot: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """Pass per-slot outputs ``[n, k, d]`` through the experts' hook points, then weight and sum over slots."""
    n_tokens, k, hidden_dim = per_slot.shape
    point = experts._modules.get("el_expert_out")
    if point is not None:
        b, p = _bp(experts.__dict__.get("_el_shape"), n_tokens)
        per_slot = per_slot.view(b, p, k, hidden_dim)
        view = experts._modules["el_expert_view"]
        if not _idle(view):
            # (indices, outputs) together, for single-expert reads: one value nnsight may re-read.
            view((top_k_index.view(b, p, k), per_slot))
        if not _idle(point):
            per_slot = point(per_slot)
        per_slot = per_slot.reshape(n_tokens, k, hidden_dim)

    weighted = per_slot * top_k_weights.unsqueeze(-1)
    contrib_point = experts._modules.get("el_expert_contrib")
    if contrib_point is None or _idle(contrib_point):
        return weighted.sum(dim=1)
    return _through_contributions(experts, contrib_point, weighted)


def _through_contributions(experts: nn.Module, point: nn.Module, weighted: Tensor) -> Tensor:
    """The weighted slots through the ``expert_contrib`` point ``[b, p, k, d]``, summed over slots.

    A family that scales the routed sum outside the router (``FamilySpec.routed_scale``) gets the factor inside each
    contribution, so ``Σ_k expert_contrib`` is the routed part of ``moe.output``. The block multiplies the *sum*
    (as transformers does), and ``(Σ_k w·x)·s`` and ``Σ_k (w·x·s)`` differ in the last bits: a value only read keeps
    the block's order (reading never changes the model's result); an edited one is summed as given and the block
    is told not to scale it again (``_el_prescaled``).
    """
    n_tokens, k, hidden_dim = weighted.shape
    b, p = _bp(experts.__dict__.get("_el_shape"), n_tokens)
    owner = experts.__dict__.get("_el_scale_owner")
    if owner is None:
        return point(weighted.view(b, p, k, hidden_dim)).reshape(n_tokens, k, hidden_dim).sum(dim=1)
    block, attr = owner
    contrib = weighted * getattr(block, attr)
    version = contrib._version
    served = point(contrib.view(b, p, k, hidden_dim))
    if served._base is contrib and served._version == version:  # read, not edited: the block's own order
        return weighted.sum(dim=1)
    experts.__dict__["_el_prescaled"] = True
    return served.reshape(n_tokens, k, hidden_dim).sum(dim=1)


def global_num_experts(experts: nn.Module) -> int:
    """Routed experts of an experts module across all ranks (expert parallelism sets ``num_experts`` to this rank's).

    Example:
        >>> from expertlens.instrument import global_num_experts
        >>> from expertlens.testing import tiny_model
        >>> global_num_experts(tiny_model("olmoe").model.layers[0].mlp.experts)
        8
    """
    if getattr(experts, "_is_expert_parallel", False):
        weight = experts.gate_up_proj if getattr(experts, "has_gate", True) else experts.up_proj
        return int(weight.shape[0])  # a DTensor's shape is the global one
    return int(experts.num_experts)


def tp_sharded(module: nn.Module) -> str | None:
    """The tensor-parallel wrapper transformers put around ``module``'s forward (its qualified name), or ``None``.

    A module so wrapped runs its class forward on this rank's shard (or partial sum) of its input or output.
    transformers' expert-parallel dispatch is not counted: its outputs are whole.

    Example:
        >>> from torch import nn
        >>> from expertlens.instrument import tp_sharded
        >>> tp_sharded(nn.Linear(2, 2)) is None
        True
    """
    qualname = getattr(module.__dict__.get("forward"), "__qualname__", "")
    if ".install_forward.<locals>." not in qualname or qualname.startswith("EpDispatchExpertsParallel."):
        return None
    return qualname


def _experts_parallelism(experts: nn.Module) -> str | None:
    """How transformers' distributed inference wraps this experts module: ``"ep"`` (``ep_dispatch_experts``: each
    rank runs its own experts on tokens sent to it), ``"tp"`` (``moe_tp_experts``: each rank runs its slice of every
    expert's intermediate dimension, the output is all-reduced) or ``None`` (not wrapped).

    Both wrappers take ``(hidden, top_k_index, top_k_weights)`` and return the whole combined output on every rank,
    which is what :func:`_ep_per_slot` needs. Any other style wrapping the experts is refused by name: expertlens
    cannot say what its per-slot values are.
    """
    mark = experts.__dict__.get("_el_ep")
    if mark:
        return mark
    forward = experts.__dict__.get("forward")
    name = getattr(forward, "__qualname__", "")
    if name.startswith("EpDispatchExpertsParallel.install_forward."):
        return "ep"
    if ".install_forward.<locals>." not in name:
        return None
    cells = dict(zip(forward.__code__.co_freevars, forward.__closure__ or (), strict=False))
    style = cells["self"].cell_contents if "self" in cells else None
    if type(style).__name__ == "MoeExpertsParallel":
        return "tp"
    from .families import UnsupportedModelError

    raise UnsupportedModelError(
        f"{type(experts).__name__} is wrapped by transformers' distributed style {type(style).__name__} "
        f"({name}); expertlens exposes per-expert points under ep_dispatch_experts (expert parallel) and "
        "moe_tp_experts (tensor parallel) only"
    )


def _ep_per_slot(experts: nn.Module, flat: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Per-slot expert outputs ``[n, k, d]`` (before routing weights) from a distributed experts module.

    Every (token, slot) pair goes through transformers' own wrapper as a top-1 row with weight 1. Under expert
    parallelism the all-to-all moves exactly the rows it moves for top-k (``n·k``) and hands back each slot's
    unweighted output on the rank that holds the token. Under tensor parallelism each rank computes its partial
    sum of every slot (the same ``n·k`` rows through the grouped GEMMs as top-k) and the wrapper's all-reduce makes
    each slot whole (``k``× the bytes of the top-k all-reduce). Either way every point exists on every rank, as in
    one process.
    """
    n, k = indices.shape
    rows = flat.repeat_interleave(k, dim=0)
    ones = torch.ones(n * k, 1, dtype=weights.dtype, device=weights.device)
    out = experts(rows, indices.reshape(n * k, 1), ones)
    return out.view(n, k, -1)


def expertlens_fp8_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The ``"expertlens"`` implementation for transformers' FP8 experts (``FP8Experts``, fine-grained FP8).

    Each hit expert runs through the module's own ``linear`` (the FP8 block-scaled GEMM of its eager path,
    or ``F.linear`` for dequantised weights); per-slot outputs pass the same hook points as the fused
    implementation before the routing weights multiply them. Cost: one FP8 GEMM pair per hit expert (the
    eager path's loop) instead of one grouped call, so it is slower than FP8 ``grouped_mm`` on many
    experts; no weight is dequantised. Results equal the FP8 eager implementation up to accumulation
    order (it sums the k slots per token instead of ``index_add_`` over experts).

    Example:
        >>> from expertlens.instrument import register_experts_implementation
        >>> register_experts_implementation()   # registers this one in the FP8 registry too
    """
    n_tokens, hidden_dim = hidden_states.shape
    k = top_k_index.size(-1)
    per_slot = hidden_states.new_zeros(n_tokens, k, hidden_dim)
    static = getattr(self, "activation_scheme", "dynamic") == "static"
    # One host read per layer (the slot count of every expert, which sizes the per-expert GEMMs), not one
    # ``unique`` plus one ``where`` per hit expert: a stable sort groups the flat (token, slot) rows by expert in
    # the order ``where`` gave. Sentinel / expert-parallel ids (>= num_experts) sort last and produce nothing.
    flat = top_k_index.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    ids = flat.clamp(max=self.num_experts)
    counts = torch.zeros(self.num_experts + 1, dtype=torch.long, device=flat.device)
    counts = counts.scatter_add_(0, ids, torch.ones_like(ids)).tolist()[: self.num_experts]
    per_row = per_slot.view(n_tokens * k, hidden_dim)
    start = 0
    for expert, count in enumerate(counts):
        rows, start = order[start : start + count], start + count
        if not count:
            continue
        tok = rows // k
        if self.has_gate:
            w_up, s_up = self.gate_up_proj[expert], self.gate_up_proj_scale_inv[expert]
        else:
            w_up, s_up = self.up_proj[expert], self.up_proj_scale_inv[expert]
        act = self.gate_up_proj_activation_scale[expert] if static else None
        h = self.linear(hidden_states[tok], w_up, s_up, activation_scale=act)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        act = self.down_proj_activation_scale[expert] if static else None
        per_row[rows] = self.linear(h, self.down_proj[expert], self.down_proj_scale_inv[expert],
                                    activation_scale=act).to(per_slot.dtype)
    weights = top_k_weights.to(per_slot.dtype)
    return _weigh_through_points(self, per_slot, top_k_index, weights).to(hidden_states.dtype)


def _refuse_meta_experts(experts: nn.Module, caller: str) -> None:
    """Offloaded (meta) expert weights hold no numbers: computing with them returns finite garbage."""
    weights = experts.gate_up_proj if getattr(experts, "has_gate", True) else experts.up_proj
    if weights.is_meta or experts.down_proj.is_meta:
        raise ValueError(
            f"{caller}: the expert weights of {type(experts).__name__} are on the meta device (offloaded), "
            "so they cannot be read directly; load the model without offloading (or run it through a trace, "
            "which onloads them)"
        )


def all_experts_forward(experts: nn.Module, x: Tensor, chunk: int | None = None) -> Tensor:
    """Every routed expert applied to every row of ``x`` [n, d]: ``[E, n, d]``, in one grouped pass on ``x``'s device.

    The grouped GEMM of the experts implementation with each row sent to every expert (what forcing the routing
    to each expert in turn computes), so no Python loop over experts and no host copies. ``chunk`` bounds how
    many experts run per pass (memory ``chunk·n·d_ff``); default all. Under tensor parallelism (``moe_tp_experts``)
    each rank runs its slice of every expert and the result is all-reduced over the tensor-parallel group (a
    collective: every rank must call it, on the same ``x``); under expert parallelism it refuses (each rank holds
    only its own experts).

    Example:
        >>> import torch
        >>> from expertlens.instrument import all_experts_forward, expert_forward
        >>> from expertlens.testing import tiny_model
        >>> experts = tiny_model("olmoe").model.layers[0].mlp.experts
        >>> x = torch.randn(3, 64)
        >>> out = all_experts_forward(experts, x)
        >>> out.shape, bool(torch.allclose(out[5], expert_forward(experts, x, 5), atol=1e-5))
        (torch.Size([8, 3, 64]), True)
    """
    from transformers.integrations.moe import _grouped_linear

    _refuse_meta_experts(experts, "all_experts_forward")
    parallel, group = experts.__dict__.get("_el_ep"), None
    if parallel == "ep":
        raise ValueError(
            "all_experts_forward: under expert parallelism each rank holds only its own experts, so every expert "
            "cannot run on this rank's rows; run it on one process or under tensor parallelism (tp_size)"
        )
    if parallel == "tp":
        if experts.has_bias or experts.has_post_expert_norm or slot_norm(experts) is not None:
            raise ValueError(
                "all_experts_forward: under tensor parallelism each rank's result is a partial sum; experts with "
                "biases or a post-expert norm are not supported there (run on one process)"
            )
        mesh = experts.down_proj.device_mesh
        group = mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")

    def local(w: Tensor) -> Tensor:  # a DTensor's shard on this rank (tensor parallel), else the tensor
        return w.to_local() if hasattr(w, "to_local") else w

    n_experts, n = int(experts.num_experts), x.shape[0]
    chunk = n_experts if chunk is None else max(1, int(chunk))
    outs = []
    for start in range(0, n_experts, chunk):
        ids = torch.arange(start, min(start + chunk, n_experts), device=x.device)
        e = ids.numel()
        ids_g = ids.repeat_interleave(n, output_size=e * n)  # sorted by expert, as the grouped GEMM needs
        rows = x.repeat(e, 1)
        offsets = torch.zeros(n_experts, dtype=torch.int32, device=x.device)
        offsets[ids] = n
        offsets = torch.cumsum(offsets, dim=0, dtype=torch.int32)
        if experts.has_gate:
            w_up, b_up = local(experts.gate_up_proj), experts.gate_up_proj_bias[ids_g] if experts.has_bias else None
        else:
            w_up, b_up = local(experts.up_proj), experts.up_proj_bias[ids_g] if experts.has_bias else None
        h = _grouped_linear(rows, w_up, offsets, bias=b_up, is_transposed=experts.is_transposed)
        h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        b_down = experts.down_proj_bias[ids_g] if experts.has_bias else None
        out = _grouped_linear(h, local(experts.down_proj), offsets, bias=b_down, is_transposed=experts.is_transposed)
        if group is not None:
            torch.distributed.all_reduce(out, group=group)  # this rank's partial sums -> every expert's output
        if experts.has_post_expert_norm:
            out = experts.post_expert_norm(out)
        elif (norm := slot_norm(experts)) is not None:
            out = norm(out, ids_g)
        outs.append(out.view(e, n, -1))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def register_experts_implementation() -> None:
    """Register ``"expertlens"`` in transformers' experts registry (idempotent), and in its FP8 one.

    Example:
        >>> from expertlens.instrument import register_experts_implementation
        >>> register_experts_implementation()  # idempotent; ExpertModel calls it for you
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, expertlens_experts_forward)
    try:
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8ExpertsInterface
    except ImportError:  # pragma: no cover - older transformers
        return
    if EXPERTS_IMPLEMENTATION not in ALL_FP8_EXPERTS_FUNCTIONS:
        FP8ExpertsInterface.register(EXPERTS_IMPLEMENTATION, expertlens_fp8_experts_forward)


def expert_forward(experts: torch.nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """One routed expert applied to ``x`` [n, d] straight from the fused weights (a reference).

    Follows the experts module's own layout flags (``has_gate``, ``has_bias``, ``is_transposed``,
    ``_apply_gate``), so it is an independent hand computation of what the experts function does.

    Example:
        >>> import torch
        >>> from expertlens.instrument import expert_forward
        >>> from expertlens.testing import tiny_model
        >>> experts = tiny_model("olmoe").model.layers[0].mlp.experts
        >>> expert_forward(experts, torch.randn(3, 64), expert=5).shape
        torch.Size([3, 64])
    """
    _refuse_meta_experts(experts, "expert_forward")

    if not hasattr(experts, "has_gate"):  # Llama-4's dense experts: gate_up [E, d, 2I], down [E, I, d]
        gate, up = (x @ experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return (up * experts.act_fn(gate)) @ experts.down_proj[expert]

    def lin(inp, w, b):
        out = inp @ w if experts.is_transposed else F.linear(inp, w)
        return out + b if b is not None else out

    if experts.has_gate:
        w_up = experts.gate_up_proj[expert]
        b_up = experts.gate_up_proj_bias[expert] if experts.has_bias else None
    else:
        w_up = experts.up_proj[expert]
        b_up = experts.up_proj_bias[expert] if experts.has_bias else None
    h = lin(x, w_up, b_up)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    b_down = experts.down_proj_bias[expert] if experts.has_bias else None
    out = lin(h, experts.down_proj[expert], b_down)
    if experts.has_post_expert_norm:
        out = experts.post_expert_norm(out)
    elif (norm := slot_norm(experts)) is not None:
        out = norm(out, torch.full(out.shape[:1], expert, device=out.device))
    return out


# --------------------------------------------------------------------------------------------
# Router and block wrappers
# --------------------------------------------------------------------------------------------


class _LinearTap:
    """Stands in for ``torch.nn.functional.linear`` during one router call and takes its first result (the
    router's pre-softmax logits), then puts the real function back at once, so nothing else in the router (or
    anywhere) runs through it. Cheaper than a ``TorchFunctionMode``, which dispatches every torch call."""

    __slots__ = ("real", "on_logits", "done")

    def __init__(self, real, on_logits):
        self.real, self.on_logits, self.done = real, on_logits, False

    def __call__(self, *args, **kwargs):
        F.linear = self.real
        self.done = True
        return self.on_logits(self.real(*args, **kwargs))


@dataclass
class _State:
    """Per-module record of what was installed, so it can be undone."""

    original_class: type
    spec: FamilySpec
    layer: int
    active: bool = True
    shape: tuple[int, int] | None = None
    router: nn.Module | None = None
    experts: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _state(module: nn.Module) -> _State:
    return module.__dict__["_el_state"]


def _router_forward(self: nn.Module, hidden_states: Tensor, *args, **kwargs):
    st = _state(self)
    original = st.original_class.forward
    if not st.active:
        return original(self, hidden_states, *args, **kwargs)
    points = self._modules
    logits_point, probs_point = points["el_router_logits"], points["el_router_probs"]
    logits_idle = probs_idle = None  # decided now (simple routers) or when the value exists
    if _quiet(logits_point) and _quiet(probs_point):
        logits_idle = probs_idle = True
    elif _is_simple_router(self):
        # Nothing inside this router's forward can send a worker to its logits point, so whoever wants it this
        # visit is waiting already: decide (and count a skipped visit) before the router runs. The probs point
        # can be decided now only if nobody waits on the logits (a worker served the logits may want it next).
        logits_idle = _idle(logits_point)
        if logits_idle:
            probs_idle = _idle(probs_point)
    if logits_idle and probs_idle:
        # Nothing reads or edits the logits: run the router untouched (no interception at all).
        first, weights, indices = _topk_triple(st, self, original(self, hidden_states, *args, **kwargs))
        logits = None
    else:
        captured: dict[str, Any] = {}

        def on_logits(logits: Tensor) -> Tensor:
            flat_shape = logits.shape
            n_experts = flat_shape[-1]
            b, p = _bp(st.shape, logits.numel() // n_experts)
            if logits_idle is False or (logits_idle is None and not _idle(logits_point)):
                logits = logits_point(logits.reshape(b, p, n_experts)).reshape(flat_shape)
            captured["logits"] = logits
            return logits

        real = F.linear
        tap = F.linear = _LinearTap(real, on_logits)
        try:
            first, weights, indices = _topk_triple(st, self, original(self, hidden_states, *args, **kwargs))
        finally:
            F.linear = real
        if not tap.done:
            raise RuntimeError(
                f"expertlens: the router of layer {st.layer} ({type(self).__name__}) made no linear call, so its "
                "pre-softmax logits could not be intercepted; register a FamilySpec with the right router path"
            )
        logits = captured["logits"]
    k = indices.shape[-1]
    b, p = _bp(st.shape, indices.numel() // k)
    if logits is not None and (probs_idle is False or (probs_idle is None and not _idle(probs_point))):
        # A derived read-out, computed only when something reads it.
        probs_point(st.spec.rule.probs(logits, self).reshape(b, p, logits.shape[-1]))
    ip, wp = points["el_topk_indices"], points["el_topk_weights"]
    if not _idle(ip):
        indices = ip(indices.reshape(b, p, k)).reshape(-1, k)
    if not _idle(wp):
        weights = wp(weights.reshape(b, p, k)).reshape(-1, k)
    return first, weights, indices


def _topk_triple(st: _State, router: nn.Module, out) -> tuple[Tensor, Tensor, Tensor]:
    """The router's result as ``(logits, topk_weights, topk_indices)`` (``FamilySpec.router_returns``)."""
    if st.spec.router_returns == "dense_scores":
        scores, logits = out
        indices = torch.topk(logits, int(router.top_k), dim=-1)[1]  # the router's own top-k of these logits
        return logits, scores.gather(-1, indices), indices
    return out


def _dense_input_scaled(experts: nn.Module, flat: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Llama-4's experts (``experts_kind="dense_input_scaled"``): every expert runs on every token's input scaled
    by its routing weight (zero off the top-k, so those rows are exact zeros); per-slot outputs are the chosen
    experts' rows, passed through the expert points and summed (the weights are already inside)."""
    n_experts, (n_tokens, d) = int(experts.num_experts), flat.shape
    scores = torch.zeros(n_tokens, n_experts, dtype=weights.dtype, device=weights.device)
    scores = scores.scatter(1, indices, weights)
    routed_in = flat.repeat(n_experts, 1) * scores.transpose(0, 1).reshape(-1, 1)
    routed_out = experts(routed_in).view(n_experts, n_tokens, d)
    per_slot = routed_out.permute(1, 0, 2).gather(1, indices.unsqueeze(-1).expand(-1, -1, d))
    return _weigh_through_points(experts, per_slot, indices, torch.ones_like(weights, dtype=per_slot.dtype))


def _is_simple_router(router: nn.Module) -> bool:
    """A router with no submodules but expertlens' hook points and no nnsight ``.source`` instrumentation."""
    state = router.__dict__.get(_NNSIGHT_STATE)
    if state is not None and getattr(state, "sourced", True):
        return False
    return all(name in ROUTER_POINTS for name in router._modules)


def _block_forward(self: nn.Module, hidden_states: Tensor, *args, **kwargs):
    st = _state(self)
    if not st.active:
        return st.original_class.forward(self, hidden_states, *args, **kwargs)
    spec = st.spec
    b, p, d = hidden_states.shape
    router, experts = st.router, st.experts
    _state(router).shape = (b, p)
    experts.__dict__["_el_shape"] = (b, p)
    experts.__dict__.pop("_el_prescaled", None)  # a forward stopped mid-block must not leave it for the next
    flat = hidden_states.reshape(-1, d)
    extra = [get_module(self, name) for name in spec.router_extra]
    _, weights, indices = router(hidden_states if spec.router_input == "3d" else flat, *extra)
    norm = slot_norm(experts) if spec.experts_kind == "fused" else None
    if spec.experts_kind == "dense_input_scaled":
        out = _dense_input_scaled(experts, flat, indices, weights).to(hidden_states.dtype).reshape(b, p, d)
    elif norm is not None:
        out = _slot_normed(experts, norm, flat, indices, weights).to(hidden_states.dtype).reshape(b, p, d)
    elif experts.__dict__.get("_el_ep") == "tp" and all(
        _idle(experts._modules[name], count=False) for name in EXPERTS_POINTS
    ):
        # Tensor parallel with no one reading or editing per-slot values: transformers' own top-k call (one
        # all-reduce of the weighted sum), bit-identical to the model without expertlens. The skipped points'
        # visits are counted, as on one process.
        for name in EXPERTS_POINTS:
            _idle(experts._modules[name])
        out = experts(flat, indices, weights).reshape(b, p, d)
    elif experts.__dict__.get("_el_ep"):
        per_slot = _ep_per_slot(experts, flat, indices, weights)
        out = _weigh_through_points(experts, per_slot, indices, weights).to(hidden_states.dtype).reshape(b, p, d)
    else:
        out = experts(flat, indices, weights).reshape(b, p, d)
    # the routed scale, unless edited expert contributions already hold it (`_through_contributions`)
    if spec.routed_scale is not None and not experts.__dict__.pop("_el_prescaled", False):
        out = out * getattr(self, spec.routed_scale)
    shared_mod = get_module(self, spec.shared) if spec.shared is not None and spec.shared_level == "block" else None
    if shared_mod is not None:
        shared = shared_mod(hidden_states if spec.shared_input == "3d" else flat)
        if spec.shared_gate is not None:
            shared = F.sigmoid(get_module(self, spec.shared_gate)(flat)) * shared
        out = out + _through(self._modules["el_shared_out"], shared.reshape(b, p, d))
    out = _through(self._modules["el_output"], out.to(hidden_states.dtype))
    if spec.block_norm is not None:
        out = get_module(self, spec.block_norm)(out)
    if spec.flat_output:
        out = out.reshape(-1, d)
    if spec.returns_tuple:
        return out, weights
    return out


def _shared_forward(self: nn.Module, *args, **kwargs):
    """A layer-level shared MLP (``FamilySpec.shared_level == "layer"``): its output passes a hook point."""
    st = _state(self)
    out = st.original_class.forward(self, *args, **kwargs)
    if not st.active:
        return out
    return _through(self._modules["el_shared_out"], out)


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _swap_class(module: nn.Module, kind: str, forward) -> None:
    cls = type(module)
    key = (cls, kind)
    if key not in _SUBCLASSES:
        # A whole model (made editable for its returned logits) keeps its class name: transformers
        # looks models up by class name (e.g. the text-generation support check).
        name = cls.__name__ if hasattr(cls, "config_class") else f"ExpertLens{cls.__name__}"
        _SUBCLASSES[key] = type(name, (cls,), {"forward": forward, "__module__": cls.__module__})
    module.__class__ = _SUBCLASSES[key]


# --------------------------------------------------------------------------------------------
# install / restore
# --------------------------------------------------------------------------------------------


@dataclass
class Instrumentation:
    """What :func:`install` did to one model; pass it to :func:`restore` to undo it.

    Example:
        >>> from expertlens import resolve_family
        >>> from expertlens.instrument import install, restore
        >>> from expertlens.testing import tiny_model
        >>> hf = tiny_model("olmoe")
        >>> inst = install(hf, resolve_family(hf))
        >>> sorted(inst.routers)
        [0, 1]
        >>> restore(hf)
    """

    spec: FamilySpec
    previous_experts_implementation: str | None
    blocks: dict[int, nn.Module]
    routers: dict[int, nn.Module]
    experts: dict[int, nn.Module]
    shared: dict[int, nn.Module] = field(default_factory=dict)
    editable: list[nn.Module] = field(default_factory=list)
    active: bool = True


def _check_experts(layer: int, experts: nn.Module, block: nn.Module, spec: FamilySpec) -> None:
    """Refuse, naming the structural reason, experts whose per-expert outputs cannot be exposed exactly."""
    from .families import UnsupportedModelError

    cls = type(experts).__name__
    if "Mxfp4" in cls or (not hasattr(experts, "has_gate") and spec.experts_kind == "fused"):
        raise UnsupportedModelError(_unfused_message(layer, experts))
    has_shared = spec.shared is not None and get_module(block, spec.shared) is not None
    for name, expected in spec.block_requires if has_shared else ():
        value = getattr(block, name, expected)
        if value != expected:
            raise UnsupportedModelError(
                f"layer {layer}: {type(block).__name__}.{name} is {value!r}; the {spec.name!r} address table is exact "
                f"only for {name}={expected!r}"
            )
    for name in spec.identity_wraps:
        wrap = get_module(block, name)
        if wrap is not None and not isinstance(wrap, nn.Identity):
            raise UnsupportedModelError(
                f"layer {layer}: {type(block).__name__}.{name} is a {type(wrap).__name__}, applied to the weighted "
                "sum of expert outputs: per-expert outputs in d_model cannot be exposed exactly (supported when it "
                "is nn.Identity, i.e. without a latent MoE projection)"
            )


def is_installed(model: nn.Module) -> bool:
    """Whether :func:`install` instrumented ``model`` (and :func:`restore` has not undone it).

    Example:
        >>> from expertlens.instrument import is_installed
        >>> from expertlens.testing import tiny_model
        >>> is_installed(tiny_model("olmoe"))
        False
    """
    return getattr(model, "_el_instrumentation", None) is not None


def _unfused_message(layer: int, experts: nn.Module) -> str:
    """Why an experts module cannot be instrumented, and what to do instead."""
    name = type(experts).__name__
    if "Mxfp4" in name:
        return (
            f"layer {layer}: {name} holds MXFP4-quantised experts computed by a fused kernel expertlens cannot "
            "instrument; load the checkpoint dequantised: from_pretrained(..., quantization_config="
            "Mxfp4Config(dequantize=True)) (or ExpertModel(name, quantization_config=Mxfp4Config(dequantize=True)))"
        )
    if "FP8" in name or "Fp8" in name:
        return (
            f"layer {layer}: {name} holds FP8-quantised experts computed by a fused kernel expertlens cannot "
            "instrument; load the checkpoint dequantised: from_pretrained(..., quantization_config="
            "FineGrainedFP8Config(dequantize=True)), or in bf16 from an unquantised checkpoint"
        )
    if isinstance(experts, nn.ModuleList):
        return (
            f"layer {layer}: the experts are an nn.ModuleList of per-expert modules ({name}); expertlens needs a "
            "transformers>=5 fused experts module (decorated with @use_experts_implementation). Use a built-in "
            "transformers family (not remote code)"
        )
    return (
        f"layer {layer}: {name} is not a fused experts module decorated with @use_experts_implementation; "
        "expertlens needs transformers>=5 fused experts (pip install 'transformers>=5'; remote-code models are "
        "not supported)"
    )


def install(model: nn.Module, spec: FamilySpec, editable: list[nn.Module] = ()) -> Instrumentation:
    """Add hook points, wrap routers and MoE blocks, switch to the expertlens experts function.

    Safe on failure: anything done before an error is undone before it propagates.

    Example:
        >>> from expertlens import resolve_family
        >>> from expertlens.instrument import install, is_installed, restore
        >>> from expertlens.testing import tiny_model
        >>> hf = tiny_model("olmoe")
        >>> _ = install(hf, resolve_family(hf))   # ExpertModel does this when wrapping
        >>> is_installed(hf)
        True
        >>> restore(hf)
    """
    if is_installed(model):
        return model._el_instrumentation
    inst = Instrumentation(
        spec=spec,
        previous_experts_implementation=getattr(model.config, "_experts_implementation", None),
        blocks={},
        routers={},
        experts={},
    )
    try:
        if getattr(model, "_device_mesh", None) is not None:  # loaded across ranks (a distributed_config)
            from .compat import nnsight_tp_plan_lookup

            nnsight_tp_plan_lookup()
        if spec.is_moe:
            register_experts_implementation()
            for i, layer in enumerate(spec.layer_list(model)):
                block = spec.moe_block(layer)
                if block is None:
                    continue
                router = get_module(block, spec.router)
                experts = get_module(block, spec.experts)
                _check_experts(i, experts, block, spec)
                parallel = _experts_parallelism(experts)
                if parallel is not None and slot_norm(experts) is not None:
                    from .families import UnsupportedModelError

                    raise UnsupportedModelError(
                        f"layer {i}: {type(experts).__name__} normalises each slot's output with its expert's weights "
                        f"outside the experts implementation; expertlens computes that on one process, not under "
                        f"{'expert' if parallel == 'ep' else 'tensor'} parallelism (load the model without a "
                        "distributed_config)"
                    )
                if parallel == "ep":
                    # Keep transformers' expert-parallel wrapper as the body nnsight runs (nnsight keeps it only
                    # when a tensor-parallel mesh is present), and let the block apply the expert points.
                    from nnsight.intervention.source import BODY_FORWARD

                    experts.__dict__[BODY_FORWARD] = True
                if parallel is not None:
                    # The block applies the expert points on whole per-slot outputs (`_ep_per_slot`). Under tensor
                    # parallelism nnsight itself puts transformers' wrapper back around its controller.
                    experts.__dict__["_el_ep"] = parallel
                for name in ROUTER_POINTS:
                    router.add_module(name, HookPoint())
                for name in EXPERTS_POINTS:
                    experts.add_module(name, HookPoint())
                for name in BLOCK_POINTS:
                    block.add_module(name, HookPoint())
                router.__dict__["_el_state"] = _State(type(router), spec, i)
                if spec.router_extra:
                    router.__dict__["_el_owner"] = block
                if spec.shared is not None and spec.shared_level == "layer":
                    shared_mod = get_module(layer, spec.shared)
                    if shared_mod is not None:
                        shared_mod.add_module("el_shared_out", HookPoint())
                        shared_mod.__dict__["_el_state"] = _State(type(shared_mod), spec, i)
                        _swap_class(shared_mod, "shared", _shared_forward)
                        inst.shared[i] = shared_mod
                block.__dict__["_el_state"] = _State(type(block), spec, i, router=router, experts=experts)
                if spec.routed_scale is not None:  # the factor `expert_contrib` carries (read on every call)
                    experts.__dict__["_el_scale_owner"] = (block, spec.routed_scale)
                _swap_class(router, "router", _router_forward)
                _swap_class(block, "block", _block_forward)
                inst.blocks[i], inst.routers[i], inst.experts[i] = block, router, experts
            if any(hasattr(e, "has_gate") for e in inst.experts.values()):  # decorated experts only
                model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        for module in editable:
            if "_el_state" not in module.__dict__:
                make_editable(module)
                inst.editable.append(module)
    except Exception:
        _undo(model, inst)
        raise
    model.__dict__["_el_instrumentation"] = inst
    return inst


def _undo(model: nn.Module, inst: Instrumentation) -> None:
    for module in inst.editable:
        undo_editable(module)
    for module in inst.routers.values():
        module.__dict__.pop("_el_owner", None)
    for group, names in ((inst.routers, ROUTER_POINTS), (inst.blocks, BLOCK_POINTS), (inst.shared, BLOCK_POINTS)):
        for module in group.values():
            st = module.__dict__.get("_el_state")
            if st is not None:
                st.active = False
                module.__class__ = st.original_class
            for name in names:
                module._modules.pop(name, None)
    for module in inst.experts.values():
        for name in EXPERTS_POINTS:
            module._modules.pop(name, None)
        module.__dict__.pop("_el_shape", None)
        module.__dict__.pop("_el_ep", None)
        module.__dict__.pop("_el_scale_owner", None)
        module.__dict__.pop("_el_prescaled", None)
    # Modules that got hook points but no state yet (an error mid-layer) are cleaned too.
    for module in model.modules():
        for name in ROUTER_POINTS + EXPERTS_POINTS + BLOCK_POINTS:
            module._modules.pop(name, None)
    prev = inst.previous_experts_implementation
    if prev is not None and getattr(model.config, "_experts_implementation", None) != prev:
        try:
            model.set_experts_implementation(prev)
        except Exception:  # an implementation that no longer validates: set it back verbatim
            model.config._experts_implementation = prev
    inst.active = False


def restore(model: nn.Module) -> None:
    """Undo :func:`install`: original classes, no hook points, original experts implementation.

    Example:
        >>> from expertlens import resolve_family
        >>> from expertlens.instrument import install, is_installed, restore
        >>> from expertlens.testing import tiny_model
        >>> hf = tiny_model("olmoe")
        >>> _ = install(hf, resolve_family(hf))
        >>> restore(hf)   # same as ExpertModel.restore()
        >>> is_installed(hf)
        False
    """
    inst = model.__dict__.pop("_el_instrumentation", None)
    if inst is not None:
        _undo(model, inst)
