"""Capture memory: peak RSS of saving ``expert_out`` on every MoE layer, one fresh process per config.

The parent (:func:`memory_rows`) starts ``python -m bench.memory '<json>'`` per configuration, so
peaks never mix (``--quick`` forks the already-imported parent instead, to skip the import time;
same measurement: the peak mark is reset in the child before anything is measured). In the child:

1. build the model and wrap it; run a trace with nothing saved (warm-up); reset the peak-RSS mark
   (``/proc/self/clear_refs``), run it again: ``P0 = ru_maxrss``, the peak of a plain trace;
2. reset the mark, run a trace saving ``moe.expert_out`` on every MoE layer and keep the saved
   tensors: ``P1``;
3. report ``P1 - P0`` (the extra peak the capture costs) next to the estimate
   ``tokens × k × d × 4 bytes × MoE layers`` and the size a dense ``[tokens, E, d]`` capture would have.

Children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves every tensor-sized allocation with
its own mapping and returns it on free, and ``malloc_trim(0)`` runs before each reset: RSS then
follows live memory, and freed memory from step 1 cannot hide (or inflate) what step 2 needs.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def _rss() -> int:
    """Current resident set size in bytes (from /proc, no psutil needed)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _trim() -> None:
    """``malloc_trim(0)``: hand free heap pages back to the kernel, so memory freed earlier (by the
    model build, or by the parent before a fork) is not resident and a reuse shows up in RSS."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (``/proc/self/clear_refs``, Linux >= 4.0),
    so ``ru_maxrss`` measures from here and the model build's transient peak cannot mask the trace."""
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from expertlens import ExpertModel

    if spec["kind"] == "organism":
        model = ExpertModel(spec["path"], dtype=torch.float32)
    else:
        from expertlens.testing import tiny_model, tiny_tokenizer

        from .harness import MEDIUM, TINY, synthetic_config

        base = MEDIUM if spec["base"] == "medium" else TINY
        kw = synthetic_config(base, spec["E"], spec["k"])
        model = ExpertModel(tiny_model("qwen3_moe", **kw), tiny_tokenizer())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, min(100, model.vocab_size), (spec["batch"], spec["tokens"]), generator=g)
    mask = torch.ones_like(ids)
    layers = model.moe_layers
    with torch.no_grad():
        with model.trace(ids, attention_mask=mask, use_cache=False):  # warm-up
            pass
        reset = _reset_peak()
        with model.trace(ids, attention_mask=mask, use_cache=False):
            pass
        p0 = _maxrss()
        _reset_peak()
        live0 = _rss()
        saved = []
        with model.trace(ids, attention_mask=mask, use_cache=False):
            for i in layers:
                saved.append(model.layers[i].moe.expert_out.save())
        p1 = _maxrss()
        _trim()
        live1 = _rss()  # resident after the capture, free pages handed back: what the saved values hold
    n_tok = ids.numel()
    k, d, E = model.top_k, model.d_model, model.n_experts
    item = torch.empty((), dtype=model.dtype).element_size()
    return {
        "E": E,
        "k": k,
        "d_model": d,
        "moe_layers": len(layers),
        "tokens": n_tok,
        "estimate_bytes": n_tok * k * d * item * len(layers),
        "dense_estimate_bytes": n_tok * E * d * item * len(layers),
        "saved_bytes": sum(t.numel() * t.element_size() for t in saved),
        "saved_shape": list(saved[0].shape),
        "peak_before_bytes": p0,
        "peak_after_bytes": p1,
        "peak_delta_bytes": p1 - p0,
        "live_delta_bytes": live1 - live0,
        "peak_reset": reset,
    }


def _run_child(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", json.dumps(spec)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _set_mmap_threshold(nbytes: int = 65536) -> None:
    """``mallopt(M_MMAP_THRESHOLD, n)`` in a forked child (a fresh process gets it from the env var)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def fork_child(spec: dict) -> tuple[int, int]:
    """Fork a child that runs :func:`child` and writes its JSON to a pipe; returns (pid, read fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            _set_mmap_threshold()
            payload = json.dumps(child(spec))
        except BaseException as e:  # noqa: BLE001
            payload, code = json.dumps({"error": repr(e)}), 1
        try:
            os.write(w, payload.encode())
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def collect_fork(pid: int, fd: int, timeout: float) -> dict:
    import select
    import signal
    import time

    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"error": f"memory child timed out after {timeout}s"}
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
    os.waitpid(pid, 0)
    try:
        return json.loads(b"".join(chunks).decode())
    except ValueError:
        return {"error": "memory child exited without a result"}


class MemoryRun:
    """Memory children: fresh interpreters, ``parallel`` at a time (full run), or forked all at once
    from the warm parent (``--quick``), collected by :meth:`rows`."""

    def __init__(self, quick: bool, organism: str | None, parallel: int = 2, timeout: float = 300):
        self.quick, self.timeout = quick, timeout
        self.specs = memory_specs(quick, organism)
        if quick:
            self.forks = [fork_child(spec) for _, spec in self.specs]
            self.results = None
        else:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                self.results = list(pool.map(lambda s: _run_child(s[1], timeout), self.specs))

    def rows(self) -> list[dict]:
        if self.results is None:
            self.results = [collect_fork(pid, fd, self.timeout) for pid, fd in self.forks]
        return _rows(self.specs, self.results)


def memory_specs(quick: bool, organism: str | None) -> list[tuple[str, dict]]:
    """(row id, child spec) for each configuration; ``organism`` is a checkpoint folder."""
    if quick:
        base, setting, batch, tokens = "tiny", "tiny", 32, 128
        grid = [(8, 2), (32, 2), (8, 4)]
    else:
        base, setting, batch, tokens = "medium", "medium", 16, 64
        grid = [(16, 2), (64, 2), (16, 4), (64, 4)]
    specs = [
        (
            f"memory/{setting}/E{E}_k{k}",
            {"kind": "synthetic", "base": base, "E": E, "k": k, "batch": batch, "tokens": tokens},
        )
        for E, k in grid
    ]
    if organism is not None:
        spec = {"kind": "organism", "path": organism, "batch": batch, "tokens": tokens}
        specs.append(("memory/organism/capture", spec))
    return specs


def _div(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def memory_rows(quick: bool, organism: str | None, parallel: int = 2, timeout: float = 300) -> list[dict]:
    return MemoryRun(quick, organism, parallel, timeout).rows()


def _rows(specs: list[tuple[str, dict]], results: list[dict]) -> list[dict]:
    rows = []
    for (rid, spec), res in zip(specs, results):
        _, setting, _ = rid.split("/")
        row = {"id": rid, "section": "memory", "setting": setting, "spec": spec}
        if "error" in res:
            row.update(name=f"expert_out capture ({rid})", error=res["error"], met=False)
            rows.append(row)
            continue
        row.update(res)
        row["name"] = (
            f"expert_out capture, E={res['E']} k={res['k']}, {res['tokens']} tokens x {res['moe_layers']} layers"
        )
        row["estimate_mb"] = res["estimate_bytes"] / MB
        row["dense_estimate_mb"] = res["dense_estimate_bytes"] / MB
        row["peak_delta_mb"] = res["peak_delta_bytes"] / MB
        row["live_delta_mb"] = res["live_delta_bytes"] / MB
        row["ratio"] = res["peak_delta_bytes"] / res["estimate_bytes"]
        row["ratio_of"] = "peak RSS increase / ([tokens, k, d] x layers)"
        row["target"] = "peak increase / estimate <= 1.5"
        row["live_ratio"] = res["live_delta_bytes"] / res["estimate_bytes"]
        row["met"] = bool(0 < row["ratio"] <= 1.5)
        rows.append(row)
    # Scaling checks: E x4 at fixed k should leave the cost flat; k x2 should double it.
    by = {(r.get("E"), r.get("k")): r for r in rows if "peak_delta_bytes" in r and r["setting"] != "organism"}
    Es = sorted({e for e, _ in by})
    ks = sorted({k for _, k in by})
    if len(Es) >= 2 and (Es[0], ks[0]) in by and (Es[-1], ks[0]) in by:
        a, b = by[(Es[0], ks[0])], by[(Es[-1], ks[0])]
        b["scaling_vs_E"] = {
            "from": f"E={Es[0]}", "to": f"E={Es[-1]}",
            "peak_ratio": _div(b["peak_delta_bytes"], a["peak_delta_bytes"]),
            "live_ratio": _div(b["live_delta_bytes"], a["live_delta_bytes"]),
        }
    if len(ks) >= 2 and (Es[0], ks[0]) in by and (Es[0], ks[-1]) in by:
        a, b = by[(Es[0], ks[0])], by[(Es[0], ks[-1])]
        b["scaling_vs_k"] = {
            "from": f"k={ks[0]}", "to": f"k={ks[-1]}",
            "peak_ratio": _div(b["peak_delta_bytes"], a["peak_delta_bytes"]),
            "live_ratio": _div(b["live_delta_bytes"], a["live_delta_bytes"]),
        }
    return rows


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
