"""mkdocs hooks.

* Add the supported-architectures page, generated from the address tables and the installed transformers, as a
  virtual file of the build (``architectures.md``): nothing is written into docs/.
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


def _gen_architectures():
    path = Path(__file__).resolve().parent / "gen_architectures.py"
    spec = importlib.util.spec_from_file_location("gen_architectures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    # a local docs/architectures.md (python docs/gen_architectures.py) is replaced by the page of this build
    stale = files.get_file_from_path("architectures.md")
    if stale is not None:
        files.remove(stale)
    files.append(File.generated(config, "architectures.md", content=_gen_architectures().render()))
    return files
