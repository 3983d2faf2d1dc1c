"""Worker for tests/test_distributed.py: ``expertlens refusal`` under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Runs the command line on every rank. An audit hook records every file or folder a rank creates or opens for
writing under ``--out``; each rank reports them in ``audit/rank{N}.json`` (outside ``--out``), so the test can
check that only rank 0 writes the study's outputs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(audit_dir: str, argv: list[str]) -> int:
    out = str(Path(argv[argv.index("--out") + 1]).resolve())
    writes: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and os.path.abspath(os.fsdecode(args[0])).startswith(out):
                writes.append(os.fsdecode(args[0]))
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove") and isinstance(args[0], (str, os.PathLike)):
            if os.path.abspath(os.fsdecode(args[0])).startswith(out):
                # a rename is a write of its destination (files are written to a temporary name, then renamed)
                dst = f" -> {os.fsdecode(args[1])}" if event in ("os.rename", "os.replace") else ""
                writes.append(f"{event} {os.fsdecode(args[0])}{dst}")

    sys.addaudithook(hook)
    from expertlens.cli import main as cli

    code = cli(argv)
    rank = int(os.environ["RANK"])
    Path(audit_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "code": code, "writes": writes}))
    return code


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    raise SystemExit(main(sys.argv[1], sys.argv[2:]))
