"""Count the host syncs a piece of code would make on an accelerator, on CPU.

A host sync is any point where Python must wait for a device value: a scalar read (``.item()``, ``bool(t)``,
``int(t)``, ``.tolist()``), a data-dependent shape (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``), or a copy to the host (``.cpu()``, ``.numpy()``). On CPU nothing waits, so we count the calls that
would: the aten ops the profiler records (scalar reads go through ``aten::_local_scalar_dense``, boolean indexing
through ``aten::nonzero``) plus the Python-level host copies, patched for the duration.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

#: aten ops that make the host wait for the device on CUDA.
SYNC_OPS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::bincount",
)
PY_METHODS = ("cpu", "numpy", "tolist")


class SyncCount:
    def __init__(self) -> None:
        self.ops: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __repr__(self) -> str:
        return f"SyncCount({dict(self.ops)})"


@contextlib.contextmanager
def count_syncs():
    """``with count_syncs() as c: ...`` then ``c.total`` / ``c.ops``."""
    result = SyncCount()
    originals = {name: getattr(torch.Tensor, name) for name in PY_METHODS}

    def wrap(name):
        real = originals[name]

        def method(self, *args, **kwargs):
            result.ops[f"Tensor.{name}"] += 1
            return real(self, *args, **kwargs)

        return method

    for name in PY_METHODS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield result
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)
    for event in prof.events():
        if event.name in SYNC_OPS:
            result.ops[event.name] += 1
