"""mkdocs hooks.

* Regenerate the supported-architectures page from the address tables on every build.
* Parse ``Example:`` docstring sections (the project's convention) as examples, like ``Examples:``,
  so doctest lines render as code in the API reference.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

log = logging.getLogger("mkdocs.hooks")


def on_config(config, **kwargs):
    import importlib

    from griffe import DocstringSectionKind

    for name in ("griffe._internal.docstrings.google", "_griffe.docstrings.google", "griffe.docstrings.google"):
        try:
            google = importlib.import_module(name)
        except ImportError:
            continue
        if isinstance(getattr(google, "_section_kind", None), dict):
            google._section_kind.setdefault("example", DocstringSectionKind.examples)
            return config
    log.warning("docs/hooks.py: could not register 'Example:' as an examples section for this griffe version")
    return config


def on_pre_build(config, **kwargs) -> None:
    path = Path(__file__).resolve().parent / "gen_architectures.py"
    spec = importlib.util.spec_from_file_location("gen_architectures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write()
