"""Execute the tutorials in place (nbclient, kernel ``python3``), failing on the first error.

Usage::

    python docs/run_notebooks.py                   # every tutorials/*.ipynb
    python docs/run_notebooks.py tutorials/01_tracing_moe_internals.ipynb
    python docs/run_notebooks.py --check           # execute only, write nothing back (CI)

Run it to refresh the committed outputs after changing a tutorial (figures are embedded as PNG when
kaleido and Chromium are available). CI runs it with ``CI=true``, where the tutorials skip the PNG
export and show interactive figures instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]


def run(path: Path, timeout: int, kernel: str, write: bool = True) -> float:
    # The kernel starts in the notebook's folder; put this checkout first on its path so the tutorials import
    # the expertlens next to them (a git worktree), not another installed copy.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": "Python 3", "language": "python"}
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    if write:
        nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    parser.add_argument("--kernel", default="python3")
    parser.add_argument("--check", action="store_true",
                        help="execute only (fail on any cell error); leave the committed notebooks as they are (CI)")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "tutorials").glob("*.ipynb"))
    if not paths:
        print("no notebooks found", file=sys.stderr)
        return 1
    total = 0.0
    for path in paths:
        try:
            seconds = run(path, args.timeout, args.kernel, write=not args.check)
        except CellExecutionError as err:
            print(f"FAILED {path}:\n{err}", file=sys.stderr)
            return 1
        total += seconds
        shown = path.relative_to(ROOT) if path.is_absolute() and path.is_relative_to(ROOT) else path
        print(f"executed {shown} in {seconds:.1f}s", flush=True)
    print(f"{len(paths)} notebooks executed in {total:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
