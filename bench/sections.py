"""The timed benchmark sections: forward, generation, direction extraction.

Every function takes a built (bare, wrapped, tokenizer) triple and a :class:`Setting` and returns
rows (dicts) for the results table. Rows carry ``id``, ``section``, ``setting``, ``name``, the
wall/cpu medians and, where the issue sets one, ``target`` and ``met``.
"""

from __future__ import annotations

from typing import Any

import torch

from expertlens.families import resolve_family
from expertlens.interventions import AddVector, generate
from expertlens.refusal.directions import candidate_directions

from .harness import Setting, interleaved, ratio


def _row(section: str, setting: str, key: str, name: str, timing: dict, **extra: Any) -> dict:
    return {
        "id": f"{section}/{setting}/{key}",
        "section": section,
        "setting": setting,
        "name": name,
        **{k: timing[k] for k in ("wall_s", "cpu_s", "rounds", "wall_samples", "cpu_samples")},
        **extra,
    }


def _ratios(row: dict, base: dict, *, invert: bool = False) -> None:
    """``ratio`` = row/base on CPU time (``invert``: base/row); ``ratio_wall`` likewise on wall time."""
    if invert:
        row["ratio"], row["ratio_wall"] = ratio(base["cpu_s"], row["cpu_s"]), ratio(base["wall_s"], row["wall_s"])
    else:
        row["ratio"], row["ratio_wall"] = ratio(row["cpu_s"], base["cpu_s"]), ratio(row["wall_s"], base["wall_s"])


def _target(row: dict, op: str, value: float, what: str) -> None:
    r = row["ratio"]
    row["target"] = f"{what} {op} {value:g}"
    row["met"] = bool(r <= value) if op == "<=" else bool(r >= value)


def steering_vector(model, seed: int = 0) -> torch.Tensor:
    """A random direction with the norm of a typical residual-stream vector (timing only)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.d_model, generator=g)
    return v / v.norm() * 4.0


# --------------------------------------------------------------------------------------------
# 1. forward
# --------------------------------------------------------------------------------------------


#: Overhead targets (issue 15): ratio of CPU-time medians to the bare forward / the same-token reference.
TARGETS = {
    "organism": {"trace_nothing": 1.05, "trace_capture": 1.15, "steered_vs_hooks": 1.10},
    "medium": {"trace_nothing": 1.03, "trace_capture": 1.10},
    "olmoe": {"trace_nothing": 1.03, "trace_capture": 1.10},
    "tiny": {"trace_nothing": 1.05, "trace_capture": 1.15, "steered_vs_hooks": 1.10},
}


def forward_variants(bare, model, ids, mask, steer, kept: list) -> dict[str, Any]:
    """The timed forward variants (also used by ``bench/gpu.py``): bare HF forward, the wrapped model's plain call,
    a trace saving nothing, one saving ``router_logits`` + ``expert_out`` of every MoE layer (kept alive in
    ``kept`` until the next call, as a user's would), and a trace under one ``steer`` intervention."""
    moe_layers = model.moe_layers

    def bare_fwd():
        return bare(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def wrapped_call():
        return model.hf_model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def trace_nothing():
        with model.trace(ids, attention_mask=mask, use_cache=False):
            pass

    def trace_capture():
        kept.clear()
        saved = []
        with model.trace(ids, attention_mask=mask, use_cache=False):
            for i in moe_layers:
                saved.append(model.layers[i].moe.router_logits.save())
                saved.append(model.layers[i].moe.expert_out.save())
        kept.extend(saved)

    def trace_addvector():
        with model.intervene(steer), model.trace(ids, attention_mask=mask, use_cache=False):
            pass

    return {"bare": bare_fwd, "wrapped_call": wrapped_call, "trace_nothing": trace_nothing,
            "trace_capture": trace_capture, "trace_addvector": trace_addvector}  # fmt: skip


def forward_rows(bare, model, tok, s: Setting) -> list[dict]:
    from nnsight.modeling.transformers import TransformersModel

    from .harness import shared_copy

    # nnsight's own floor: a plain nnsight wrapper around a third tree over the same weights
    floor = TransformersModel(shared_copy(bare), tokenizer=tok)
    enc = tok(s.forward_prompts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    layers = list(range(model.n_layers))
    moe_layers = model.moe_layers
    v = steering_vector(model)
    steer = AddVector("resid_pre", v, layers=model.n_layers // 2)
    kept: list = []
    variants = forward_variants(bare, model, ids, mask, steer, kept)
    bare_fwd, wrapped_call, trace_capture = variants["bare"], variants["wrapped_call"], variants["trace_capture"]

    from .points import nnsight_addvector, nnsight_variants

    # plain nnsight doing the same saves / the same edit: the ÷ nnsight column of every trace variant
    plain = nnsight_variants(model, floor, ids, mask, kept)
    fns = {
        **variants,
        "nnsight_nothing": plain["nnsight_nothing"],
        "nnsight_capture": plain["nnsight_capture"],
        "nnsight_addvector": nnsight_addvector(model, floor, ids, mask, model.n_layers // 2, v),
    }
    with torch.no_grad():
        # Sanity: the two copies compute the same logits, and capture has the documented shapes.
        same = float((bare_fwd() - wrapped_call()).abs().max())
        trace_capture()
        k, d = model.top_k, model.d_model
        assert tuple(kept[1].shape) == (*ids.shape, k, d), kept[1].shape
        timing = interleaved(fns, s.rounds)
    kept.clear()
    names = {
        "bare": "bare HF forward (grouped_mm)",
        "wrapped_call": "ExpertModel plain call, no trace (instrumentation only)",
        "trace_nothing": "ExpertModel trace, nothing saved",
        "trace_capture": f"trace saving router_logits + expert_out, {len(moe_layers)} layers",
        "trace_addvector": "trace with one AddVector (resid_pre)",
        "nnsight_nothing": "nnsight's floor: plain nnsight trace, nothing saved",
        "nnsight_capture": "nnsight's floor: plain nnsight trace saving router + experts outputs",
        "nnsight_addvector": "nnsight's floor: plain nnsight trace adding the vector to the layer input",
    }
    rows = [_row("forward", s.name, k, names[k], timing[k]) for k in fns]
    by = {r["id"].rsplit("/", 1)[1]: r for r in rows}
    base = rows[0]
    for r in rows:
        _ratios(r, base)
    rows[0]["max_abs_diff_vs_wrapped"] = same
    goals = TARGETS.get(s.name, TARGETS["organism"])
    for key, floor_key in (("trace_nothing", "nnsight_nothing"), ("trace_capture", "nnsight_capture"),
                           ("trace_addvector", "nnsight_addvector")):
        if key in goals:
            _target(by[key], "<=", goals[key], "time / bare")
        # what expertlens adds on top of nnsight itself, and nnsight's own ratio (the floor)
        by[key]["ratio_vs_nnsight"] = ratio(by[key]["cpu_s"], by[floor_key]["cpu_s"])
        by[key]["nnsight_floor"] = by[floor_key]["ratio"]
    rows[0]["shape"] = list(ids.shape)
    del layers
    return rows


# --------------------------------------------------------------------------------------------
# 2. generation
# --------------------------------------------------------------------------------------------


def add_vector_hook(bare, layer: int, vector: torch.Tensor):
    """A plain torch forward pre-hook adding ``vector`` to decoder layer ``layer``'s input; returns the handle."""
    layer_mod = resolve_family(bare).layer_list(bare)[layer]
    vec = vector.to(next(bare.parameters()).dtype)

    def add(mod, args, kwargs):
        if args:
            return (args[0] + vec, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] + vec
        return args, kwargs

    return layer_mod.register_forward_pre_hook(add, with_kwargs=True)


def hooks_nocache_generate(bare, tok, prompts: list[str], layer: int, vector: torch.Tensor, n: int) -> torch.Tensor:
    """The reference way: a plain torch forward pre-hook adds the vector to the layer's input, and
    every step re-runs the whole sequence (``use_cache=False``), greedy, token by token."""
    handle = add_vector_hook(bare, layer, vector)
    try:
        enc = tok(prompts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        start = ids.shape[1]
        for _ in range(n):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = bare(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    finally:
        handle.remove()
    new = ids[:, start:]
    [tok.decode(row, skip_special_tokens=True) for row in new]
    return new


def hooks_cached_generate(bare, tok, prompts: list[str], layer: int, vector: torch.Tensor, n: int) -> torch.Tensor:
    """The same-token reference for steered generation: a plain torch pre-hook adds the vector to the layer's
    input inside bare HF ``generate`` (KV cache on) — what expertlens' AddVector does, without expertlens."""
    handle = add_vector_hook(bare, layer, vector)
    try:
        return bare_generate(bare, tok, prompts, n)
    finally:
        handle.remove()


def bare_generate(bare, tok, prompts: list[str], n: int) -> torch.Tensor:
    """Plain HF greedy generation, KV cache on, exactly the arguments expertlens' ``generate`` uses."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = bare.generate(
        **enc, max_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=pad, num_beams=1,
        temperature=None, top_p=None, top_k=None,
    )
    new = ids[:, enc["input_ids"].shape[1] :]
    [tok.decode(row, skip_special_tokens=True) for row in new]
    return new


def generation_rows(bare, model, tok, s: Setting) -> list[dict]:
    prompts, n = s.gen_prompts, s.new_tokens
    layer = model.n_layers // 2
    v = steering_vector(model)
    steer = AddVector("resid_pre", v, layers=layer)
    bs = len(prompts)
    out: dict[str, Any] = {}

    fns = {
        "bare": lambda: out.__setitem__("bare", bare_generate(bare, tok, prompts, n)),
        "expertlens_plain": lambda: out.__setitem__(
            "plain", generate(model, prompts, n, batch_size=bs, return_ids=True)
        ),
        "expertlens_steered": lambda: out.__setitem__(
            "steered", generate(model, prompts, n, [steer], batch_size=bs, return_ids=True)
        ),
        "hooks_nocache": lambda: out.__setitem__(
            "hooks", hooks_nocache_generate(bare, tok, prompts, layer, v, n)
        ),
        "hooks_cached": lambda: out.__setitem__(
            "hooks_cached", hooks_cached_generate(bare, tok, prompts, layer, v, n)
        ),
    }
    with torch.no_grad():
        timing = interleaved(fns, s.gen_rounds, warmup=1, no_warmup=("hooks_nocache",))
    # expertlens' return_ids cuts each row after the tokenizer's EOS: compare on those lengths.
    hooks, bare_ids = out["hooks"], out["bare"]
    n_same = sum(int((row == hooks[i, : len(row)]).sum()) for i, row in enumerate(out["steered"]))
    agree = n_same / max(1, sum(len(row) for row in out["steered"]))
    plain_same = all(torch.equal(row, bare_ids[i, : len(row)]) for i, row in enumerate(out["plain"]))
    cached = out["hooks_cached"]
    n_same_cached = sum(int((row == cached[i, : len(row)]).sum()) for i, row in enumerate(out["steered"]))
    agree_cached = n_same_cached / max(1, sum(len(row) for row in out["steered"]))
    names = {
        "bare": f"bare HF generate ({n} new tokens, KV cache)",
        "expertlens_plain": "expertlens generate, no intervention",
        "expertlens_steered": "expertlens generate, AddVector every step (KV cache)",
        "hooks_nocache": "reference: torch hook, no KV cache, full re-run per token",
        "hooks_cached": "same-token reference: torch pre-hook inside bare generate (KV cache)",
    }
    rows = [_row("generate", s.name, k, names[k], timing[k]) for k in fns]
    base = rows[0]
    for r in rows[:3]:
        _ratios(r, base)
    # steered expertlens vs the same-token plain-hook reference (routing changes from the steering cancel out)
    rows[2]["ratio_vs_bare"], rows[2]["ratio_vs_bare_wall"] = rows[2]["ratio"], rows[2]["ratio_wall"]
    _ratios(rows[2], rows[4])
    rows[2]["ratio_of"] = "time / same-token hook reference"
    goal = TARGETS.get(s.name, TARGETS["organism"]).get("steered_vs_hooks")
    if goal is not None:
        _target(rows[2], "<=", goal, "time / same-token hook reference")
    _ratios(rows[4], base)
    rows[4]["token_agreement_with_expertlens_steered"] = agree_cached
    # speed-up of expertlens steered over the reference: reference time / steered time
    _ratios(rows[3], rows[2])
    rows[3]["ratio_of"] = "time / expertlens steered"
    _target(rows[3], ">=", 5.0, "time / expertlens steered")
    rows[0]["new_tokens"] = int(out["bare"].shape[1])
    rows[0]["batch"] = bs
    rows[1]["tokens_identical_to_bare"] = plain_same
    rows[3]["token_agreement_with_expertlens_steered"] = agree
    return rows


# --------------------------------------------------------------------------------------------
# 3. direction extraction
# --------------------------------------------------------------------------------------------


def plain_mean_activations(bare, tok, prompts, positions, batch_size) -> torch.Tensor:
    """Difference-in-means input the way a plain torch script does it: pre-hooks on every decoder
    layer grab ``hidden_states[:, positions]``; float64 accumulation with pads masked, as expertlens."""
    layers = resolve_family(bare).layer_list(bare)
    d = bare.config.hidden_size
    grabbed: dict[int, torch.Tensor] = {}

    def grab(i):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            grabbed[i] = x[:, positions]

        return hook

    handles = [m.register_forward_pre_hook(grab(i), with_kwargs=True) for i, m in enumerate(layers)]
    total = torch.zeros(len(positions), len(layers), d, dtype=torch.float64)
    count = torch.zeros(len(positions), 1, 1, dtype=torch.float64)
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True)
            mask = enc["attention_mask"][:, positions].double()
            with torch.no_grad():
                bare(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            acts = torch.stack([grabbed[j] for j in range(len(layers))], dim=2).double()
            acts = acts * mask[..., None, None]
            total += acts.sum(0)
            count += mask.sum(0)[:, None, None]
            grabbed.clear()
    finally:
        for h in handles:
            h.remove()
    return total / count.clamp_min(1)


def extraction_rows(bare, model, tok, s: Setting) -> list[dict]:
    positions = [-5, -4, -3, -2, -1]
    bs = s.batch_size_extract
    out: dict[str, torch.Tensor] = {}

    def plain():
        out["plain"] = plain_mean_activations(bare, tok, s.harmful, positions, bs) - plain_mean_activations(
            bare, tok, s.harmless, positions, bs
        )

    def ours():
        out["expertlens"] = candidate_directions(model, s.harmful, s.harmless, positions, None, batch_size=bs)

    # No warm-up round: each call is many batches, and the forward section warmed both models.
    timing = interleaved({"plain_hooks": plain, "expertlens": ours}, s.extract_rounds, warmup=0)
    diff = float((out["plain"] - out["expertlens"]).abs().max())
    n = len(s.harmful) + len(s.harmless)
    rows = [
        _row("extract", s.name, "plain_hooks", f"plain torch pre-hooks, {n} prompts, all layers",
             timing["plain_hooks"]),
        _row("extract", s.name, "expertlens", "expertlens candidate_directions (nnsight traces)", timing["expertlens"]),
    ]
    for r in rows:
        r["prompts"] = n
        r["prompts_per_s"] = n / r["cpu_s"]
        r["prompts_per_s_wall"] = n / r["wall_s"]
    # throughput ratio: expertlens prompts/s over plain prompts/s = plain time / expertlens time
    _ratios(rows[0], rows[0])
    _ratios(rows[1], rows[0], invert=True)
    rows[1]["ratio_of"] = "throughput / plain-hook throughput"
    _target(rows[1], ">=", 0.9, "throughput / plain")
    rows[1]["max_abs_diff_vs_plain"] = diff
    return rows


# --------------------------------------------------------------------------------------------
# 5. organism end to end
# --------------------------------------------------------------------------------------------


def refusal_cli_row(organism: str, out_dir: str, timeout: float = 1800, path: str | None = None) -> dict:
    """Wall time of ``expertlens refusal --organism NAME --out DIR --threads 1`` in a fresh process
    (imports, loading, the whole study, results + report written). With ``path`` (a checkpoint
    folder, not shipped): ``--model PATH`` with the organism's train prompts as the two files."""
    import os
    import subprocess
    import sys
    import time

    from .harness import REPO

    cmd = [sys.executable, "-m", "expertlens.cli", "refusal", "--out", out_dir, "--threads", "1", "--quiet"]
    if path is None:
        cmd += ["--organism", organism]
    else:
        import json
        from pathlib import Path

        from expertlens.organism import load_prompts

        prompts = load_prompts(organism, "train")
        files = []
        for kind in ("harmful", "harmless"):
            f = Path(out_dir) / f"{kind}.json"
            f.write_text(json.dumps(prompts[kind]))
            files.append(str(f))
        cmd += ["--model", str(path), "--harmful", files[0], "--harmless", files[1]]
    import resource

    env = dict(os.environ, OMP_NUM_THREADS="1")
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, f"timed out after {timeout}s"
    wall = time.perf_counter() - w0
    # CPU time of the finished child (RUSAGE_CHILDREN is cumulative: take the difference).
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    row = {
        "id": "e2e/organism/refusal_cli",
        "section": "e2e",
        "setting": "organism",
        "name": "`expertlens refusal` end to end (1 thread)",
        "command": " ".join(["expertlens", *cmd[3:]]),
        "wall_s": wall,
        "cpu_s": cpu,
        "rounds": 1,
        "returncode": rc,
    }
    if rc != 0:
        row["error"] = tail
    else:
        row["output_tail"] = tail[-400:]
    return row


# --------------------------------------------------------------------------------------------
# 6. start-up
# --------------------------------------------------------------------------------------------

#: Start-up targets (issue 25), as ratios to ``import torch`` in the same run: the help text and
#: argument errors must not pay for torch, and ``import expertlens`` only a little more than nothing.
STARTUP_TARGETS = {"cli_help": 0.5, "expertlens_import": 1.3}
STARTUP_KEYS = ("torch_import", "expertlens_import", "cli_help")


def startup_commands() -> dict[str, list[str]]:
    """Fresh-interpreter commands: ``import torch`` (the reference), ``import expertlens``, ``expertlens --help``
    (the installed console script when there is one, else the same entry point through ``python -c``)."""
    import shutil
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("expertlens")
    script = str(script) if script.is_file() else shutil.which("expertlens")
    cli = [script, "--help"] if script else [sys.executable, "-c", "from expertlens.cli import main; main(['--help'])"]
    return {
        "torch_import": [sys.executable, "-c", "import torch"],
        "expertlens_import": [sys.executable, "-c", "import expertlens"],
        "cli_help": cli,
    }


def startup_rows(quick: bool = False) -> list[dict]:
    """Wall and CPU time (the child's, from ``RUSAGE_CHILDREN``) of each start-up command in a fresh process,
    interleaved rounds, medians; ratios and targets against ``import torch`` of the same rounds."""
    import os
    import resource
    import statistics
    import subprocess
    import time

    from .harness import REPO

    cmds = startup_commands()
    # the checkout's code, not whatever an editable install points at
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    rounds, warmup = (1, 0) if quick else (5, 1)
    samples: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in cmds}
    for r in range(warmup + rounds):
        order = list(cmds)[r % len(cmds) :] + list(cmds)[: r % len(cmds)]
        for key in order:
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            w0 = time.perf_counter()
            proc = subprocess.run(cmds[key], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            wall = time.perf_counter() - w0
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmds[key])} failed ({proc.returncode}): {proc.stderr[-500:]}")
            if r >= warmup:  # the warm-up round fills the file cache
                samples[key]["wall"].append(wall)
                samples[key]["cpu"].append((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime))
    names = {"torch_import": "`import torch` (reference)", "expertlens_import": "`import expertlens`",
             "cli_help": "`expertlens --help`"}  # fmt: skip
    rows = []
    for key in STARTUP_KEYS:
        s = samples[key]
        timing = {
            "wall_s": statistics.median(s["wall"]),
            "cpu_s": statistics.median(s["cpu"]),
            "rounds": rounds,
            "wall_samples": [round(x, 4) for x in s["wall"]],
            "cpu_samples": [round(x, 4) for x in s["cpu"]],
        }
        rows.append(_row("startup", "python", key, names[key], timing, command=" ".join(cmds[key][-2:])))
    base = rows[0]
    for row in rows[1:]:
        _ratios(row, base)
        key = row["id"].rsplit("/", 1)[-1]
        _target(row, "<=", STARTUP_TARGETS[key], "CPU time / import torch")
    return rows
