"""``Direction``: a vector in activation space together with where it came from.

A :class:`Direction` wraps a 1-D (or small N-D) tensor with metadata — model family, layer,
position, point and how it was made — and saves to / loads from a single ``.safetensors`` file
whose header carries the metadata as JSON (never pickle). ``+ - * /`` give new directions.
Interventions accept a ``Direction`` wherever they accept a tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["Direction", "as_tensor"]

_META_KEY = "expertlens_direction"
_FIELDS = ("family", "layer", "position", "point", "method")


@dataclass(frozen=True, eq=False)
class Direction:
    """A steering / ablation vector with provenance.

    Args:
        vector: The direction, usually ``[d_model]``.
        family: Model family it was computed on (``model.family``).
        layer: Layer it was read at (``None`` for model-level points).
        position: Token position (an int, or a description such as ``"last"``).
        point: The point it was read at (``"resid_pre"``, ``"moe.output"``, ...).
        method: How it was made (``"diff-in-means"``, ``"probe"``, ...).
        meta: Any further JSON-serialisable metadata.

    Arithmetic: ``a + b`` and ``a - b`` (with a ``Direction`` or tensor) and ``a * s``, ``a / s``
    (scalars) return new directions; provenance fields are kept where both sides agree.

    Example:
        >>> import torch
        >>> from expertlens import Direction
        >>> d = Direction(torch.ones(4), family="olmoe", layer=1, point="resid_pre", method="demo")
        >>> (2 * d - d).vector.tolist()
        [1.0, 1.0, 1.0, 1.0]
        >>> float(d.unit().norm())
        1.0
    """

    vector: Float[Tensor, ...]
    family: str | None = None
    layer: int | None = None
    position: int | str | None = None
    point: str | None = None
    method: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.vector, Tensor):
            object.__setattr__(self, "vector", torch.as_tensor(self.vector))
        if not self.vector.is_floating_point():
            object.__setattr__(self, "vector", self.vector.float())

    # ---- tensor-ish -------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.vector.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.vector.dtype

    def norm(self) -> Tensor:
        """The Euclidean norm of the vector."""
        return self.vector.norm()

    def unit(self) -> Direction:
        """The direction scaled to unit norm (error for a zero vector)."""
        v = self.vector.double()  # float64: a tiny but non-zero vector's norm does not underflow
        if not bool(v.ne(0).any()):
            raise ValueError("cannot normalise a zero direction")
        return replace(self, vector=(v / v.norm()).to(self.vector.dtype))

    def to(self, *args, **kwargs) -> Direction:
        """``Tensor.to`` on the vector (dtype / device)."""
        return replace(self, vector=self.vector.to(*args, **kwargs))

    def __len__(self) -> int:
        return len(self.vector)

    def __repr__(self) -> str:
        where = ", ".join(f"{k}={getattr(self, k)!r}" for k in _FIELDS if getattr(self, k) is not None)
        return f"Direction(shape={tuple(self.vector.shape)}{', ' + where if where else ''})"

    # ---- algebra ----------------------------------------------------------------------------
    def _combine(self, other: Direction | Tensor, op, sym: str) -> Direction:
        if isinstance(other, Direction):
            kw = {k: getattr(self, k) if getattr(self, k) == getattr(other, k) else None for k in _FIELDS}
            kw["method"] = (
                self.method if self.method == other.method else f"({self.method}) {sym} ({other.method})"
            )
            return Direction(op(self.vector, other.vector), meta={}, **kw)
        if isinstance(other, Tensor):
            return replace(self, vector=op(self.vector, other.to(self.vector.dtype)))
        return NotImplemented

    def __add__(self, other):
        return self._combine(other, torch.add, "+")

    def __radd__(self, other):
        return self.__add__(other)

    def __sub__(self, other):
        return self._combine(other, torch.sub, "-")

    def __rsub__(self, other):
        if isinstance(other, Tensor):
            return replace(self, vector=other.to(self.vector.dtype) - self.vector)
        return NotImplemented

    def __neg__(self) -> Direction:
        return replace(self, vector=-self.vector)

    def __mul__(self, scalar):
        if isinstance(scalar, (int, float)) or (isinstance(scalar, Tensor) and scalar.dim() == 0):
            return replace(self, vector=self.vector * scalar)
        return NotImplemented

    def __rmul__(self, scalar):
        return self.__mul__(scalar)

    def __truediv__(self, scalar):
        if isinstance(scalar, (int, float)) or (isinstance(scalar, Tensor) and scalar.dim() == 0):
            return replace(self, vector=self.vector / scalar)
        return NotImplemented

    # ---- io ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the vector and its metadata (as JSON in the header) to a ``.safetensors`` file.

        Example:
            >>> import tempfile, torch
            >>> d = Direction(torch.arange(3.0), layer=2, method="demo")
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     back = Direction.load(d.save(tmp + "/d.safetensors"))
            >>> back.layer, back.vector.tolist()
            (2, [0.0, 1.0, 2.0])
        """
        from safetensors.torch import save_file

        path = Path(path)
        _check_saved_vector(self.vector, f"Direction.save({str(path)!r})")  # what load refuses is never written
        meta = {k: getattr(self, k) for k in _FIELDS}
        meta["meta"] = self.meta
        try:
            header = json.dumps(meta)
        except TypeError as exc:
            raise TypeError(f"Direction metadata must be JSON-serialisable: {exc}") from exc
        save_file(
            {"vector": self.vector.detach().cpu().contiguous()}, str(path), metadata={_META_KEY: header}
        )
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Direction:
        """Read a direction written by :meth:`save`.

        Example:
            >>> Direction.load("refusal.safetensors")  # doctest: +SKIP
        """
        from safetensors import safe_open

        path = Path(path)
        where = f"Direction.load({str(path)!r})"
        if not path.exists():
            raise FileNotFoundError(f"{where}: no such file; pass a .safetensors file written by Direction.save")
        if path.is_dir():
            raise IsADirectoryError(
                f"{where}: is a directory; pass a .safetensors file written by Direction.save"
            )
        with open(path, "rb") as fh:
            head = fh.read(16)
        is_safetensors = len(head) > 8 and head[8:9] == b"{"  # u64 header length, then the JSON header
        is_pickle = head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                                          b"\x05"))
        if is_pickle and not is_safetensors:  # a torch.save zip archive, or a raw pickle (protocol 2+)
            raise ValueError(
                f"{where}: the file is a pickle (torch.save) archive, not safetensors; expertlens never unpickles "
                "(it can run arbitrary code). Re-save the tensor with Direction(v).save(path)"
            )
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                header = (f.metadata() or {}).get(_META_KEY)
                keys = list(f.keys())
                if keys != ["vector"]:
                    raise ValueError(
                        f"{where}: the file holds tensors {keys}; a direction file holds exactly one, named 'vector'"
                    )
                vector = f.get_tensor("vector")
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{where}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        _check_saved_vector(vector, where)
        try:
            meta = json.loads(header) if header else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: the {_META_KEY!r} header is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: the {_META_KEY!r} header is a {type(meta).__name__}; a JSON object is accepted")
        types = {"family": (str,), "layer": (int,), "position": (int, str), "point": (str,), "method": (str,)}
        for key, accepted in types.items():
            value = meta.get(key)
            if value is not None and (not isinstance(value, accepted) or isinstance(value, bool)):
                names = " or ".join(t.__name__ for t in accepted)
                raise ValueError(
                    f"{where}: metadata field {key!r} is {value!r} ({type(value).__name__}); "
                    f"{names} or null is accepted"
                )
        extra = meta.get("meta") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"{where}: metadata field 'meta' is a {type(extra).__name__}; a JSON object is accepted")
        return cls(vector, **{k: meta.get(k) for k in _FIELDS}, meta=extra)


def _check_saved_vector(vector: Tensor, where: str) -> None:
    """What a direction file may hold (``save`` and ``load`` share it, so a saved file always loads)."""
    if not vector.is_floating_point():
        raise ValueError(f"{where}: 'vector' has dtype {vector.dtype}; a floating-point tensor is accepted")
    if vector.dim() == 0 or vector.numel() == 0:
        raise ValueError(f"{where}: 'vector' has shape {tuple(vector.shape)}; a non-empty 1-D (or N-D) tensor "
                         "is accepted")
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{where}: 'vector' contains NaN or inf; only finite values are accepted")


def as_tensor(value: Direction | Tensor) -> Tensor:
    """The tensor of a ``Direction`` or a tensor (error for anything else).

    Example:
        >>> import torch
        >>> as_tensor(Direction(torch.ones(2))).tolist()
        [1.0, 1.0]
    """
    if isinstance(value, Direction):
        return value.vector
    if isinstance(value, Tensor):
        return value
    raise TypeError(f"expected a torch.Tensor or expertlens.Direction, got {type(value).__name__}")
