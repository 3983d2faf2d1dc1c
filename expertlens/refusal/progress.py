"""Progress of long loops: a bar on a terminal, a live widget in a notebook, whole lines in logs.

Where stderr is not a terminal (a log file, CI, a pipe) a bar's carriage returns pile up into one unreadable
line, so there progress is written as whole lines at most every :data:`LINE_INTERVAL` seconds, plus one line
when the loop ends. In a Jupyter kernel ``tqdm.auto`` draws a live widget.

Example:
    >>> import io
    >>> from expertlens.refusal.progress import LineProgress
    >>> out = io.StringIO()
    >>> _ = list(LineProgress(range(3), "layers", stream=out))
    >>> out.getvalue().splitlines()[-1].startswith("layers: 3/3 (100%) done in")
    True
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

__all__ = ["progress", "set_progress", "LineProgress", "LINE_INTERVAL"]

_ENABLED: bool | None = None
#: Seconds between two progress lines in logs.
LINE_INTERVAL = 10.0


def set_progress(enabled: bool | None) -> None:
    """Force progress on/off (``None``: automatic — on unless ``EXPERTLENS_PROGRESS=0``).

    Example:
        >>> from expertlens.refusal.progress import set_progress
        >>> set_progress(False)   # silence progress (e.g. in tests)
        >>> set_progress(None)    # back to automatic
    """
    global _ENABLED
    _ENABLED = enabled


def _enabled() -> bool:
    if _ENABLED is not None:
        return _ENABLED
    if "EXPERTLENS_PROGRESS" in os.environ:
        return os.environ["EXPERTLENS_PROGRESS"] not in ("0", "false", "")
    return True


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class LineProgress:
    """Iterate ``items``, writing ``desc: i/n (p%), elapsed, eta`` as whole lines (no ``\\r``) to ``stream``.

    A line is written when at least ``interval`` seconds passed since the last one, and once at the end.

    Example:
        >>> import io
        >>> from expertlens.refusal.progress import LineProgress
        >>> out = io.StringIO()
        >>> for _ in LineProgress(range(4), "sweep", stream=out, interval=0.0):
        ...     pass
        >>> out.getvalue().splitlines()[0].startswith("sweep: 1/4 (25%)")
        True
    """

    def __init__(
        self,
        items: Iterable[Any],
        desc: str,
        *,
        stream: TextIO | None = None,
        interval: float = LINE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.items, self.desc, self.interval, self.clock = items, desc, interval, clock
        self.stream = stream
        try:
            self.total: int | None = len(items)  # type: ignore[arg-type]
        except TypeError:
            self.total = None

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def _line(self, i: int, t0: float, now: float, done: bool) -> str:
        el = now - t0
        if self.total:
            head = f"{self.desc}: {i}/{self.total} ({100 * i / self.total:.0f}%)"
        else:
            head = f"{self.desc}: {i}"
        if done:
            return f"{head} done in {_fmt(el)}"
        eta = f", eta {_fmt(el / i * (self.total - i))}" if self.total and i else ""
        return f"{head}, {_fmt(el)} elapsed{eta}"

    def __iter__(self) -> Iterator[Any]:
        t0 = last = self.clock()
        i = 0
        for item in self.items:
            yield item
            i += 1
            now = self.clock()
            if now - last >= self.interval and (self.total is None or i < self.total):
                self._write(self._line(i, t0, now, False))
                last = now
        self._write(self._line(i, t0, self.clock(), True))

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("this progress has no length")
        return self.total


def progress(items, desc: str | None = None, **kwargs):
    """Progress over ``items``: a tqdm bar on a terminal, a widget in a notebook, whole lines in logs.

    Returns ``items`` unchanged when progress is off (:func:`set_progress`) or ``desc`` is None.

    Example:
        >>> from expertlens.refusal.progress import progress, set_progress
        >>> set_progress(False)
        >>> list(progress(range(3), desc="layers"))
        [0, 1, 2]
        >>> set_progress(None)
    """
    if not _enabled() or desc is None:
        return items
    if _in_notebook() or sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, leave=False, **kwargs)
    return LineProgress(items, desc)
