"""Progress bars that stay quiet in tests and pipes unless asked."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

__all__ = ["progress", "set_progress"]

_ENABLED: bool | None = None


def set_progress(enabled: bool | None) -> None:
    """Force progress bars on/off (``None``: on in a terminal or a Jupyter kernel, or with EXPERTLENS_PROGRESS=1).

    Example:
        >>> from expertlens.refusal.progress import set_progress
        >>> set_progress(False)   # silence progress bars (e.g. in notebooks or CI)
        >>> set_progress(None)    # back to automatic
    """
    global _ENABLED
    _ENABLED = enabled


def _enabled() -> bool:
    if _ENABLED is not None:
        return _ENABLED
    if os.environ.get("EXPERTLENS_PROGRESS"):
        return os.environ["EXPERTLENS_PROGRESS"] not in ("0", "false", "")
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress(items, desc: str | None = None, **kwargs):
    """``tqdm(items)`` when progress is enabled, else ``items`` unchanged.

    Example:
        >>> from expertlens.refusal.progress import progress, set_progress
        >>> set_progress(False)
        >>> list(progress(range(3), desc="layers"))
        [0, 1, 2]
        >>> set_progress(None)
    """
    if not _enabled() or desc is None:
        return items
    return tqdm(items, desc=desc, leave=False, **kwargs)
