"""The API reference renders: Sphinx roles become links (docs/crossrefs.py) and the built site has none left.

The role translation is checked on a small package loaded with griffe; the built-site check runs
``mkdocs build --strict`` into a temporary folder (slow: about 40 s).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
griffe = pytest.importorskip("griffe")


@pytest.fixture(scope="module")
def crossrefs():
    spec = importlib.util.spec_from_file_location("crossrefs", ROOT / "docs" / "crossrefs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "toypkg"
    root.mkdir()
    (root / "__init__.py").write_text('"""Toy."""\nfrom .core import Thing\n')
    (root / "core.py").write_text(
        '"""Core: see :class:`Thing`."""\nimport torch\n\n\nclass Thing:\n    """A thing."""\n\n'
        '    def go(self):\n        """Go; see :meth:`stop`."""\n\n    def stop(self):\n        """Stop."""\n'
    )
    return griffe.load("toypkg", search_paths=[str(root.parent)])


def _ref(identifier: str, title: str) -> str:
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


@pytest.mark.parametrize(
    ("text", "scope", "expected"),
    [
        (":class:`Thing`", "toypkg.core", _ref("toypkg.core.Thing", "Thing")),
        # a re-export is followed to the canonical path; ~ keeps the last name only
        (":class:`~toypkg.Thing`", "toypkg", _ref("toypkg.core.Thing", "Thing")),
        (":meth:`stop`", "toypkg.core.Thing.go", _ref("toypkg.core.Thing.stop", "stop")),
        (":py:func:`the go <toypkg.core.Thing.go>`", "toypkg", _ref("toypkg.core.Thing.go", "the go")),
        (":mod:`toypkg.core`", "toypkg", _ref("toypkg.core", "toypkg.core")),
        # outside the package, or unknown: a code span
        (":class:`torch.Tensor`", "toypkg.core", "`torch.Tensor`"),
        (":func:`~nowhere.f()`", "toypkg", "`f()`"),
        ("Inside a trace::", "toypkg", "Inside a trace:"),
    ],
)
def test_roles_translate(crossrefs, pkg, text, scope, expected):
    obj = pkg
    for part in scope.split(".")[1:]:
        obj = obj.members[part]
    assert crossrefs.translate(text, obj, pkg) == expected


RAW_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`?")


def _docs_files() -> dict:
    return {p: p.read_bytes() for p in (ROOT / "docs").rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None, reason="no mkdocs")
def test_built_site_has_no_raw_roles(tmp_path):
    site = tmp_path / "site"
    docs_before = _docs_files()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the build writes nothing into docs/ (the architectures page is a virtual file of the build)
    docs_after = _docs_files()
    assert docs_after == docs_before, sorted(set(docs_after) ^ set(docs_before)) or "a docs file changed"
    assert (site / "architectures" / "index.html").exists()
    raw = {}
    for page in site.rglob("*.html"):
        hits = RAW_ROLE.findall(page.read_text(errors="replace"))
        if hits:
            raw[str(page.relative_to(site))] = len(hits)
    assert not raw, f"raw Sphinx roles in the built site: {raw}"
    # a doctest outside an Example: section renders as nested block quotes (">>>")
    quoted = [str(p.relative_to(site)) for p in (site / "api").rglob("*.html") if "<blockquote>" in p.read_text()]
    assert not quoted, f"doctest lines outside an Example: section: {quoted}"
    model = (site / "api" / "model" / "index.html").read_text()
    # the module docstring's point table renders as a table, and roles became links
    assert "<th>point</th>" in model and "<code>model.logits</code>" in model
    assert 'class="autorefs autorefs-internal"' in model
