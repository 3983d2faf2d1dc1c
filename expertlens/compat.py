"""Compatibility: old module paths that still import, and one narrow shim between nnsight and transformers.

A module that moved whole keeps its old dotted name through :func:`alias_module` (registered
in the package ``__init__``), so no stub file sits at the old path.

:func:`nnsight_tp_plan_lookup` lets nnsight 0.8.1 wrap a tensor-parallel model of a transformers
(5.24) that moved ``_get_parameter_plan`` from ``transformers.distributed.tensor_parallel`` to
``transformers.distributed.parallel_utils``; it is applied only while wrapping a model that was loaded
across ranks, and only when the name is missing.

:data:`TESTED_VERSIONS` is the one place that names the releases of transformers and nnsight this version of
expertlens was tested on; :func:`check_versions` warns once, in one line, when another is installed (the truth
test that runs on every wrap stays the guard of each model's numbers).

:func:`tensor_parallel_config` builds the ``DistributedConfig`` that splits a model tensor-parallel with its
experts: transformers 5.25 dropped the experts' rules from most MoE models' tensor-parallel plan (they kept
only the expert-parallel one), so ``DistributedConfig(tp_size=N)`` alone copies every expert to every rank.

:func:`quiet_loading` keeps transformers' "Loading weights" progress bar (carriage-return frames) out of logs:
it turns the bar off while one model loads, only when stderr is not a terminal, and restores the setting.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import sys
import time
import types
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig
    from transformers.distributed import DistributedConfig

__all__ = [
    "TESTED_VERSIONS",
    "alias_module",
    "cache_kwarg",
    "check_versions",
    "nnsight_tp_plan_lookup",
    "output_cache",
    "quiet_loading",
    "stderr_is_tty",
    "tensor_parallel_config",
]


#: ``package -> (lowest tested, first untested)`` release: the bounds pyproject.toml pins and README explains.
#: Widen a bound only after the suite has passed on the new release.
TESTED_VERSIONS: dict[str, tuple[str, str]] = {
    "transformers": ("5.25", "5.26"),
    "nnsight": ("0.8.1", "0.9"),
}

_VERSIONS_CHECKED = False


def _release(version: str) -> tuple[int, ...]:
    """``"5.25.0.dev0" -> (5, 25, 0)``: the leading numeric release, pre-release tags dropped."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in match.group().split(".")) if match else ()


def untested_versions(installed: dict[str, str] | None = None) -> list[str]:
    """The installed packages outside :data:`TESTED_VERSIONS`, each as one phrase (empty when all are tested).

    Args:
        installed: ``package -> version``; default: the versions importlib.metadata reports.

    Example:
        >>> from expertlens.compat import untested_versions
        >>> untested_versions({"transformers": "5.25.0", "nnsight": "0.8.1"})
        []
        >>> untested_versions({"transformers": "5.31.0", "nnsight": "0.8.1"})
        ['transformers 5.31.0 (tested: >=5.25, <5.26)']
    """
    if installed is None:
        from importlib.metadata import PackageNotFoundError, version

        installed = {}
        for name in TESTED_VERSIONS:
            try:
                installed[name] = version(name)
            except PackageNotFoundError:
                continue
    out = []
    for name, (low, high) in TESTED_VERSIONS.items():
        got = installed.get(name)
        if got is not None and not _release(low) <= _release(got) < _release(high):
            out.append(f"{name} {got} (tested: >={low}, <{high})")
    return out


def check_versions() -> list[str]:
    """Warn once per process, in one line, when transformers or nnsight is outside the tested releases.

    Called on every wrap. Each model is still checked by the truth test (its logits through expertlens equal
    the model's own), so an untested release can only fail loudly, not silently; the warning says why that
    might happen.

    Returns:
        The phrases warned about (empty when every version is tested, or after the first call).

    Example:
        >>> from expertlens.compat import check_versions
        >>> isinstance(check_versions(), list)
        True
    """
    global _VERSIONS_CHECKED
    if _VERSIONS_CHECKED:
        return []
    _VERSIONS_CHECKED = True
    found = untested_versions()
    if found:
        warnings.warn(
            f"expertlens was tested with other releases than the installed {'; '.join(found)}: the truth test "
            "still checks every model, but a wrap may be refused; pip install -e . restores the tested versions",
            UserWarning,
            stacklevel=3,
        )
    return found


def cache_kwarg(model) -> str:
    """The name a model's ``forward`` takes its KV cache under: ``"cache"`` (transformers 5.25 renamed it and
    deprecates ``past_key_values``, to be removed in 5.40), else ``"past_key_values"``.

    Example:
        >>> from expertlens.compat import cache_kwarg
        >>> from expertlens.testing import tiny_model
        >>> cache_kwarg(tiny_model("qwen3_moe")) in ("cache", "past_key_values")
        True
    """
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned (``None`` when it returned none), read without transformers' deprecation
    warning: a ``ModelOutput`` through dict lookup under the new name then the old, anything else by attribute.

    Example:
        >>> from expertlens.compat import output_cache
        >>> output_cache({"cache": 1}), output_cache({"past_key_values": 2}), output_cache(object())
        (1, 2, None)
    """
    if isinstance(output, dict):
        return dict.get(output, "cache", dict.get(output, "past_key_values"))
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class _MovedModule(types.ModuleType):
    """A stand-in module at an old path: attribute reads forward to the new modules and warn."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Deprecated alias of {', '.join(targets)}.")
        self._targets = targets

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                warnings.warn(
                    f"{self.__name__}.{attr} moved to {target}.{attr}; import it from there",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._targets)}) has no {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for t in self._targets for n in dir(importlib.import_module(t))})


def alias_module(old: str, *targets: str) -> types.ModuleType:
    """Make the dotted module name ``old`` importable again, forwarding to ``targets``.

    ``import old`` and ``from old import name`` keep working; each name read warns with a
    ``DeprecationWarning`` that names the module it now lives in.

    Args:
        old: the old dotted module name (its parent package must be importable).
        targets: the new modules, searched in order for each attribute.

    Returns:
        The alias module (also placed in ``sys.modules`` and on the parent package).

    Example:
        >>> import warnings
        >>> from expertlens.compat import alias_module
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     from expertlens.experts import HookPoint
        >>> from expertlens.instrument import HookPoint as NewHookPoint
        >>> HookPoint is NewHookPoint
        True
    """
    if not targets:
        raise ValueError(f"alias_module({old!r}): name at least one target module")
    module = _MovedModule(old, tuple(targets))
    sys.modules[old] = module
    parent, _, child = old.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, module)
    return module


def nnsight_tp_plan_lookup() -> str:
    """Make ``transformers.distributed.tensor_parallel._get_parameter_plan`` importable where it moved.

    nnsight 0.8.1 resolves each module of a tensor-parallel model against transformers' plan with
    ``from transformers.distributed.tensor_parallel import _get_parameter_plan`` (its
    ``TPFragments._style_of``). transformers 5.24 defines that function in
    ``transformers.distributed.parallel_utils`` (``tensor_parallel`` imports the names around it, not it), so
    wrapping any tensor-parallel model fails inside nnsight. When the name is missing this binds transformers'
    own function under the old name, nothing else; the function is transformers', unchanged. It is assumed to
    keep the signature ``(name, plan, is_weight=True) -> style | None`` (``tests/test_distributed.py`` checks it
    on a hand-made plan, so a transformers that changes it fails there first).

    ``ExpertModel`` calls this while wrapping a model loaded with a ``distributed_config`` (one with a device
    mesh); a model on one process never triggers it.

    Returns:
        ``"present"`` (transformers has the name: nothing done), ``"bound"`` (bound now, or by an earlier call)
        or ``"unavailable"`` (no transformers distributed module, or no function to bind: nothing done).

    Example:
        >>> from expertlens.compat import nnsight_tp_plan_lookup
        >>> nnsight_tp_plan_lookup() in ("present", "bound", "unavailable")
        True
    """
    try:
        from transformers.distributed import tensor_parallel
    except ImportError:
        return "unavailable"
    if getattr(tensor_parallel, "_el_bound_parameter_plan", False):
        return "bound"
    if "_get_parameter_plan" in vars(tensor_parallel):
        return "present"
    try:
        from transformers.distributed.parallel_utils import _get_parameter_plan
    except ImportError:
        return "unavailable"
    tensor_parallel._get_parameter_plan = _get_parameter_plan
    tensor_parallel._el_bound_parameter_plan = True
    return "bound"


# The rules transformers 5.24 shipped for a fused-gate experts module (``gate_up_proj [E, 2I, H]``, ``down_proj
# [E, H, I]``, no biases): 64 of the 69 MoE configs with that expert-parallel plan had exactly these. The others
# (aria's transposed layout, inkling's own experts class) had their own; they are not restored, only refused.
_EXPERTS_TP_RULES = {".gate_up_proj": "packed_colwise", ".down_proj": "rowwise", "": "moe_tp_experts"}


def _fused_gate_layout(experts: nn.Module) -> bool:
    """Whether ``experts`` is transformers' fused-gate layout that :data:`_EXPERTS_TP_RULES` shards correctly."""
    params = dict(experts.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"}:
        return False  # biases, an ungated up_proj or a class of its own
    if not getattr(experts, "has_gate", False) or getattr(experts, "is_transposed", True):
        return False
    gate_up, down = params["gate_up_proj"].shape, params["down_proj"].shape
    # packed_colwise splits dim 1 as [gate; up] halves, rowwise the last dim of down_proj: both the intermediate
    return len(gate_up) == len(down) == 3 and gate_up[1] == 2 * down[2] and gate_up[2] == down[1]


def tensor_parallel_config(
    model: str | PretrainedConfig, world_size: int, *, trust_remote_code: bool = False
) -> DistributedConfig:
    """A ``DistributedConfig`` splitting ``model`` tensor-parallel over ``world_size`` ranks, its experts included.

    transformers 5.25 removed the experts' rules (``packed_colwise`` / ``rowwise`` / ``moe_tp_experts``) from
    most MoE models' ``base_model_tp_plan`` and kept the experts only in the expert-parallel plan, so
    ``DistributedConfig(tp_size=N)`` loads every expert whole on every rank. expertlens's own study needs every
    expert on every rank's tokens (method B's all-experts pass), which expert parallelism cannot give, so this
    keeps tensor parallelism and adds back the rules transformers 5.24 shipped for every experts module the
    installed plan leaves out (as ``DistributedConfig.tp_plan`` overrides; where the installed plan already
    covers the experts, as on 5.24, nothing is added). The plans and layouts are read from the model built on
    the meta device (no weights are read).

    Args:
        model: a checkpoint folder or hub id (its ``config.json`` is read) or a loaded ``PretrainedConfig``.
        world_size: the ranks to split across (``WORLD_SIZE`` under torchrun).
        trust_remote_code: passed to ``AutoConfig`` / ``from_config`` for a checkpoint with its own code.

    Returns:
        ``DistributedConfig(tp_size=world_size)``, with ``tp_plan`` overrides for the experts where needed.

    Raises:
        ValueError: the experts would be copied to every rank and cannot be split tensor-parallel here: their
            layout is not the fused-gate one whose rules are known, or this transformers no longer offers the
            ``moe_tp_experts`` style. The message names the experts and what to run instead.

    Example:
        >>> from expertlens.compat import tensor_parallel_config
        >>> from expertlens.testing import tiny_config
        >>> config = tensor_parallel_config(tiny_config("qwen3_moe"), 2)
        >>> config.tp_size, config.ep_size
        (2, 1)
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code) if isinstance(model, str) else model
    with torch.device("meta"):  # the plans and the experts' layout only: no memory, no weights
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    tp_plan, ep_plan = dict(skeleton.tp_plan), dict(skeleton.ep_plan)
    modules = dict(skeleton.named_modules())
    overrides: dict[str, str] = {}
    for pattern, style in ep_plan.items():
        if style != "ep_dispatch_experts" or any(k == pattern or k.startswith(pattern + ".") for k in tp_plan):
            continue  # not an experts module, or the installed tensor-parallel plan already shards it
        matches = re.compile(re.escape(pattern).replace(r"\*", r"\d+")).fullmatch
        experts = next((m for name, m in modules.items() if matches(name)), None)
        why = None
        if experts is None or not _fused_gate_layout(experts):
            why = f"their layout ({type(experts).__name__}) is not the fused gate-up one expertlens has rules for"
        elif not _has_style("moe_tp_experts"):
            why = "this transformers no longer offers the 'moe_tp_experts' style"
        if why is not None:
            raise ValueError(
                f"{type(skeleton).__name__}: transformers' tensor-parallel plan leaves the experts ({pattern}) out, "
                f"so every rank would hold all of them, and {why}; run on one process, or trace with expert "
                f"parallelism (DistributedConfig(tp_size=1, fsdp_size={world_size}, ep_size={world_size}))"
            )
        overrides.update({pattern + suffix: rule for suffix, rule in _EXPERTS_TP_RULES.items()})
    return DistributedConfig(tp_size=world_size, tp_plan=overrides or None)


def _has_style(name: str) -> bool:
    """Whether transformers registers the tensor-parallel style ``name`` (its styles come and go by release)."""
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    return name in ALL_PARALLEL_STYLES


_log = logging.getLogger("expertlens")


def stderr_is_tty() -> bool:
    """Whether stderr is a terminal (False for a file, a pipe or a capture without ``isatty``).

    Example:
        >>> from expertlens.compat import stderr_is_tty
        >>> isinstance(stderr_is_tty(), bool)
        True
    """
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


@contextlib.contextmanager
def quiet_loading(what: str) -> Iterator[None]:
    """Load ``what`` without transformers' progress bar when stderr is not a TTY; log a line before and after.

    Example:
        >>> from expertlens.compat import quiet_loading
        >>> with quiet_loading("a model"):  # doctest: +SKIP
        ...     hf = AutoModelForCausalLM.from_pretrained(path)
    """
    from transformers.utils import logging as hf_logging

    turn_off = not stderr_is_tty() and hf_logging.is_progress_bar_enabled()
    if turn_off:
        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    _log.info("loading %s", what)
    try:
        yield
    finally:
        if turn_off:
            hf_logging.enable_progress_bar()
    _log.info("loaded %s in %.1f s", what, time.perf_counter() - t0)
