"""Documentation checks: docstrings with examples, the generated architectures page, the tutorials."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import pkgutil
from pathlib import Path

import pytest

import expertlens

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
EXPECTED_TUTORIALS = [
    "01_tracing_moe_internals.ipynb",
    "02_composing_interventions.ipynb",
    "03_refusal_direction_on_moe.ipynb",
    "04_expert_aware_steering.ipynb",
    "05_attribution_and_plots.ipynb",
]


def public_modules() -> list[str]:
    """``expertlens`` and every module below it whose dotted name has no ``_``-prefixed part."""
    names = ["expertlens"]
    for info in pkgutil.walk_packages(expertlens.__path__, "expertlens."):
        if not any(part.startswith("_") for part in info.name.split(".")) and not info.name.endswith("__main__"):
            names.append(info.name)
    return names


def test_public_functions_and_classes_have_examples():
    offenders = []
    for name in public_modules():
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr, None)
            if obj is None:
                offenders.append(f"{name}.{attr} (listed in __all__ but missing)")
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue  # constants
            doc = inspect.getdoc(obj) or ""
            if "Example" not in doc:
                offenders.append(f"{name}.{attr}" + ("" if doc else " (no docstring)"))
    offenders = sorted(set(offenders))
    assert not offenders, (
        f"{len(offenders)} public functions/classes lack a docstring with an 'Example:' section:\n  "
        + "\n  ".join(offenders)
    )


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_architectures", ROOT / "docs" / "gen_architectures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_architectures_page_lists_every_census_type_and_family_with_its_status():
    """The page names the installed transformers version, so it is generated, never committed: check its text."""
    import transformers

    from expertlens.testing import census_status, moe_census

    page = _gen_module().render()
    assert f"transformers {transformers.__version__}" in page
    for entry in moe_census():
        status, detail = census_status(entry.model_type)
        assert status != "unknown", detail
        label = {"exact": f"exact: `{detail}` table", "refused": "refused", "text tower": f"text tower `{detail}`"}
        assert f"| `{entry.model_type}` | `{entry.causal_lm}` | {label[status]}" in page, entry.model_type
    for name, spec in expertlens.supported_families().items():
        assert f"| `{name}` |" in page
        if spec.is_moe:  # the identity column, from the family table
            assert f"`{spec.output_identity}`" in page, name


def test_the_docs_build_adds_the_architectures_page_without_writing_into_docs(tmp_path):
    from mkdocs.config import load_config
    from mkdocs.structure.files import get_files

    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path))
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "docs").rglob("*") if p.is_file()}
    files = config.plugins.on_files(get_files(config), config=config)  # the build's files event, hooks.py included
    page = files.get_file_from_path("architectures.md")
    assert page is not None and page.generated_by and "# Supported architectures" in page.content_string
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "docs").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", EXPECTED_TUTORIALS)
def test_tutorial_is_executed_and_ends_with_real_model_section(name):
    path = ROOT / "tutorials" / name
    assert path.exists(), f"missing tutorial {name}"
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, "tutorial has no code cells"
    assert all(c.get("execution_count") for c in code), "some code cells were not executed (commit outputs)"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"committed outputs contain errors: {[e.get('ename') for e in errors]}"
    last = cells[-1]
    text = "".join(last["source"])
    assert last["cell_type"] == "markdown" and "real model" in text.lower()
    assert 'ExpertModel("allenai/OLMoE-1B-7B-0924-Instruct"' in text
    assert "torch.set_num_threads(1)" in "".join("".join(c["source"]) for c in code)


def test_docs_nav_pages_exist():
    import re

    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    for page in re.findall(r":\s+(\S+\.(?:md|ipynb))", nav):
        if page == "performance.md":
            continue  # owned by the benchmarks page; mkdocs --strict catches it if missing
        if page == "architectures.md":
            continue  # generated by docs/hooks.py into the build, not a file of docs/
        assert (ROOT / "docs" / page).exists(), page


def test_every_page_and_tutorial_is_in_the_nav():
    import re

    nav = set(re.findall(r":\s+(\S+\.(?:md|ipynb))", (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md") if "tutorials" not in p.parts}
    pages |= {f"tutorials/{p.name}" for p in TUTORIALS}
    missing = sorted(pages - nav)
    assert not missing, f"pages not reachable from the mkdocs nav: {missing}"


def test_errors_page_names_every_error_type():
    page = (ROOT / "docs" / "errors.md").read_text()
    for name in ("PointError", "UnsupportedModelError", "ChatTemplateError", "ValidationError"):
        assert name in page
