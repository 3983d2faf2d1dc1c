"""Weight loading that writes lines, not progress-bar frames, into a log.

transformers draws a "Loading weights" bar that redraws itself with carriage returns: on a terminal
that is one updating line, but in a log file (stderr redirected, a batch job, CI) every frame lands as
text. :func:`quiet_loading` turns the bar off while one model loads, only when stderr is not a
terminal, and restores the setting afterwards (a user who turned bars off keeps them off).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("expertlens")


def stderr_is_tty() -> bool:
    """Whether stderr is a terminal (False for a file, a pipe or a capture without ``isatty``).

    Example:
        >>> from expertlens._loading import stderr_is_tty
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
        >>> from expertlens._loading import quiet_loading
        >>> with quiet_loading("a model"):  # doctest: +SKIP
        ...     hf = AutoModelForCausalLM.from_pretrained(path)
    """
    from transformers.utils import logging as hf_logging

    turn_off = not stderr_is_tty() and hf_logging.is_progress_bar_enabled()
    if turn_off:
        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    log.info("loading %s", what)
    try:
        yield
    finally:
        if turn_off:
            hf_logging.enable_progress_bar()
    log.info("loaded %s in %.1f s", what, time.perf_counter() - t0)
