"""mkdocs hooks.

* Regenerate the supported-architectures page from the address tables on every build.
* Parse ``Example:`` docstring sections (the project's convention) as examples, like ``Examples:``,
  so doctest lines render as code in the API reference.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def on_config(config, **kwargs):
    try:
        from griffe._internal.docstrings import google
        from griffe._internal.enumerations import DocstringSectionKind

        google._section_kind.setdefault("example", DocstringSectionKind.examples)
    except (ImportError, AttributeError):  # another griffe layout: Example sections render as admonitions
        pass
    return config


def on_pre_build(config, **kwargs) -> None:
    path = Path(__file__).resolve().parent / "gen_architectures.py"
    spec = importlib.util.spec_from_file_location("gen_architectures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write()
