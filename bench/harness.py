"""Timing, settings and models shared by the benchmark sections.

Timing rule: every variant of a section runs in the same process, one call per variant per round,
in an order rotated each round (so no variant always runs first or right after a heavy one);
``gc.collect()`` runs before each call, outside the timed region (objects that existed before the
section are frozen with ``gc.freeze()`` so these collections are cheap). We record wall time
(``perf_counter``) and this process's CPU time (``process_time``, all threads) and report medians.
Ratios use CPU time: the machine is shared, and a descheduled process loses wall time that says
nothing about the code; with one torch thread and no waiting, CPU time and wall time agree on an
idle machine. Wall-time ratios are stored next to them.
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class Setting:
    """One model + workload the sections run on."""

    name: str  # "medium", "tiny" (--quick) or "organism"
    describe: str
    build: Callable[[], tuple[Any, Any, Any]]  # -> (bare hf model, ExpertModel, tokenizer)
    forward_prompts: list[str]
    gen_prompts: list[str]
    harmful: list[str]
    harmless: list[str]
    new_tokens: int
    rounds: int
    gen_rounds: int
    extract_rounds: int
    batch_size_extract: int = 32
    extra: dict = field(default_factory=dict)


MEDIUM = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_experts=16,
    num_local_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=192,
    intermediate_size=1024,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=1024,
    max_position_embeddings=512,
)
TINY: dict = dict(max_position_embeddings=512)  # the tiny qwen3_moe test config (hidden 64, 2 layers, 8 experts)
#: OLMoE's routing shape (64 experts, top-8, expert width d/2, no shared expert) at a CPU-sized width and depth.
OLMOE_SHAPED = {
    **{k: MEDIUM[k] for k in ("hidden_size", "vocab_size", "max_position_embeddings", "num_attention_heads")},
    "head_dim": MEDIUM["head_dim"],
    "intermediate_size": 256, "num_hidden_layers": 4, "num_experts": 64, "num_local_experts": 64,
    "num_experts_per_tok": 8, "num_key_value_heads": 8,
}


def synthetic_config(base: dict, n_experts: int | None = None, top_k: int | None = None) -> dict:
    kw = dict(base)
    if n_experts is not None:
        kw["num_experts"] = kw["num_local_experts"] = n_experts
    if top_k is not None:
        kw["num_experts_per_tok"] = top_k
    return kw


def random_text(rng: random.Random, n_chars: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz      .,?"
    return "".join(rng.choice(alphabet) for _ in range(n_chars))


def shared_copy(model):
    """A second module tree over the same parameters and buffers (no copy of the weights)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _pair_from(hf, tokenizer):
    """(bare copy with grouped_mm, ExpertModel around the original): two models, same weights."""
    from expertlens import ExpertModel

    bare = shared_copy(hf)
    bare.set_experts_implementation("grouped_mm")
    bare.eval()
    wrapped = ExpertModel(hf, tokenizer)
    for m in (bare, wrapped.hf_model):
        # A fixed number of new tokens: no early stop on EOS (the organism stops on its own).
        m.generation_config.eos_token_id = None
    return bare, wrapped, wrapped.tokenizer


def synthetic_setting(name: str, quick: bool) -> Setting:
    """``medium`` / ``tiny`` (qwen3_moe) or ``olmoe`` (OLMoE-shaped routing; forward rows only)."""
    from expertlens.testing import tiny_model, tiny_tokenizer

    family = "olmoe" if name == "olmoe" else "qwen3_moe"
    kw = OLMOE_SHAPED if name == "olmoe" else TINY if quick else MEDIUM
    n_tok = 16 if quick else 64
    batch = 2 if quick else 8
    n_extract = 16 if quick else 256
    rng = random.Random(0)

    def build():
        return _pair_from(tiny_model(family, **kw), tiny_tokenizer())

    prompts = [random_text(rng, n_tok) for _ in range(batch)]
    extract = [random_text(rng, rng.randint(16, 32)) for _ in range(n_extract)]
    cfg = {k: v for k, v in kw.items() if k != "num_local_experts"}
    return Setting(
        name=name,
        describe=f"{family} {cfg or '(tiny test config)'}; batch {batch} x {n_tok} tokens",
        build=build,
        forward_prompts=prompts,
        gen_prompts=prompts,
        harmful=extract[: n_extract // 2],
        harmless=extract[n_extract // 2 :],
        new_tokens=4 if quick else 32,
        rounds=1 if quick else 15,
        gen_rounds=1 if quick else 5,  # no generation target on the synthetic configs
        extract_rounds=1 if quick else 5,
        extra={"config": cfg, "family": family},
    )


def organism_setting(quick: bool, path: str | None = None) -> Setting | None:
    """The shipped default organism (``DEFAULT_ORGANISM``, else the first of ``list_organisms()``), or a
    checkpoint folder ``path`` with the organism's tokenizer (e.g. one still training); ``None`` when neither
    exists."""
    from expertlens.organism import DEFAULT_ORGANISM, list_organisms, load_prompts, organism_path

    if path is None:
        names = list_organisms()
        if not names:
            return None
        name = DEFAULT_ORGANISM if DEFAULT_ORGANISM in names else names[0]
        folder = str(organism_path(name))
    else:
        name, folder = DEFAULT_ORGANISM, str(path)

    def build():
        from transformers import AutoModelForCausalLM

        from expertlens import ExpertModel

        bare = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        bare.set_experts_implementation("grouped_mm")
        bare.eval()
        wrapped = ExpertModel(folder, dtype=torch.float32)
        for m in (bare, wrapped.hf_model):
            m.generation_config.eos_token_id = None
        return bare, wrapped, wrapped.tokenizer

    from transformers import AutoTokenizer

    from expertlens.refusal.data import format_chat

    p = load_prompts(name, "train")
    n_half = 8 if quick else 128
    harmful = (p["harmful"] * (n_half // max(1, len(p["harmful"])) + 1))[:n_half]
    harmless = (p["harmless"] * (n_half // max(1, len(p["harmless"])) + 1))[:n_half]
    batch = 2 if quick else 8
    # Chat-formatted with the organism's template, as the study does; half harmful, half harmless.
    tok = AutoTokenizer.from_pretrained(folder)
    fwd = format_chat(tok, harmful[: batch // 2] + harmless[: batch // 2])
    return Setting(
        name="organism",
        describe=f"organism {name!r} ({folder if path else 'shipped'}); batch {batch} chat prompts (left-padded)",
        build=build,
        forward_prompts=fwd,
        gen_prompts=fwd,
        harmful=format_chat(tok, harmful),
        harmless=format_chat(tok, harmless),
        new_tokens=4 if quick else 32,
        rounds=1 if quick else 21,
        gen_rounds=1 if quick else 15,
        extract_rounds=1 if quick else 7,
        extra={"organism": name, "path": folder},
    )


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, no_warmup: tuple[str, ...] = ()
) -> dict[str, dict]:
    """Run every function once per round, rotating the order; return wall/cpu samples and medians.

    ``warmup`` untimed calls of each function come first, except for those in ``no_warmup`` (slow
    ones whose code paths the others already warmed)."""
    names = list(fns)
    # Freeze what exists now (models, modules: ~400k objects) so the per-call collections below
    # take milliseconds instead of ~1 s each; objects made from here on are still collected.
    gc.collect()
    gc.freeze()
    try:
        return _interleaved(fns, names, rounds, warmup, no_warmup)
    finally:
        gc.unfreeze()


def _interleaved(fns, names, rounds, warmup, no_warmup) -> dict[str, dict]:
    for _ in range(warmup):
        for n in names:
            if n not in no_warmup:
                fns[n]()
    samples: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            c1, w1 = time.process_time(), time.perf_counter()
            samples[n]["wall"].append(w1 - w0)
            samples[n]["cpu"].append(c1 - c0)
    out = {}
    for n, s in samples.items():
        out[n] = {
            "wall_s": statistics.median(s["wall"]),
            "cpu_s": statistics.median(s["cpu"]),
            "wall_samples": [round(x, 5) for x in s["wall"]],
            "cpu_samples": [round(x, 5) for x in s["cpu"]],
            "rounds": rounds,
        }
    return out


def ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import nnsight
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = ""
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nnsight": nnsight.__version__,
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
