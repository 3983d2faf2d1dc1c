"""GPU benchmark: expertlens overhead at true width on one CUDA device (random weights, no downloads).

    python bench/gpu.py                          # on cuda:0, bench/results-gpu.json (< 8 min on one H200)
    python bench/gpu.py --device cpu --tiny      # smoke test: the same code on tiny configs (seconds)
    python bench/gpu.py --only olmoe --rounds 30

Configs (random weights, built on the device in bf16; shapes from the published configs, ``bench.points``):
  * ``olmoe-1b-7b``        OLMoE-1B-7B at full depth (16 layers, 64 experts, top-8, d 2048)
  * ``qwen3-30b-a3b``      Qwen3-30B-A3B shape (128 experts, top-8, d 2048), 4 layers
  * ``gpt-oss-20b``        GPT-OSS-20B shape (32 experts, top-4, d 2880, alternating sliding attention), 4 layers
  * ``deepseek-v3``        DeepSeek-V3 shape (MLA, 256 experts, top-8, d 7168, a shared expert), 2 layers

For each: the forward ratios of ``bench/run.py`` (ExpertModel trace with nothing saved / full capture of
router_logits + expert_out / one AddVector, each over the bare grouped_mm forward and over plain nnsight doing
the same saves or edit), the per-point groups of ``bench/points.py`` (``attn.head_out`` alone, all MoE points,
every point with and without ``head_out``, each ÷ bare and ÷ plain nnsight) and generation: bare ``generate``
vs expertlens ``generate`` under an AddVector vs the same-token reference (a plain torch pre-hook adding the
same vector inside bare ``generate``), as ratios and tokens/s. Prints the table, writes the JSON.

Timing: variants interleaved in one process, order rotated every round, ``torch.cuda.synchronize()``
before the clock stops (wall-time medians are the ratios on a GPU; host CPU time is stored too, it is what
expertlens' Python adds). The bare model shares its weights with the wrapped one (no second copy).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from bench.harness import REPO, load_average, machine_info  # noqa: E402
from bench.points import build_pair, nnsight_addvector, point_variants, ratios, table  # noqa: E402
from bench.sections import forward_variants  # noqa: E402

#: The configs and their depth here (shapes: ``bench.points.TRUE_WIDTH``, from the published config.json files).
CONFIGS: dict[str, dict] = {
    "olmoe-1b-7b": dict(layers=16),  # full depth
    "qwen3-30b-a3b": dict(layers=4),
    "gpt-oss-20b": dict(layers=4),  # alternating sliding / full attention
    "deepseek-v3": dict(layers=2),  # one dense layer, one MoE layer of 256 experts (~27 GB in bf16)
}


def build(name: str, device: torch.device, dtype: torch.dtype, tiny: bool, layers: int | None):
    """(bare model, ExpertModel, tokenizer, info) sharing one set of weights on ``device``."""
    return build_pair(name, device, dtype, tiny=tiny, layers=layers or CONFIGS[name]["layers"])


def timed(fns: dict, rounds: int, device: torch.device) -> dict[str, dict]:
    """Interleaved rounds, rotated order, a device sync before each clock read; medians."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(fns)
    for n in names:  # warm-up
        fns[n]()
    sync()
    samples = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            sync()
            samples[n]["wall"].append(time.perf_counter() - w0)
            samples[n]["cpu"].append(time.process_time() - c0)
    return {
        n: {"wall_s": statistics.median(s["wall"]), "cpu_s": statistics.median(s["cpu"]), "rounds": rounds}
        for n, s in samples.items()
    }


def hooked_generate(bare, enc, layer_module, vector, n, pad):
    """Reference steered generation: a plain pre-hook adds ``vector`` to the layer input, KV cache on."""

    def add(mod, args, kwargs):
        if args:
            return (args[0] + vector, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] + vector
        return args, kwargs

    handle = layer_module.register_forward_pre_hook(add, with_kwargs=True)
    try:
        return plain_generate(bare, enc, n, pad)
    finally:
        handle.remove()


def plain_generate(bare, enc, n, pad):
    ids = bare.generate(
        **enc, max_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=pad, num_beams=1,
        temperature=None, top_p=None, top_k=None,
    )
    return ids[:, enc["input_ids"].shape[1] :]


def bench_config(name: str, args, device: torch.device, log) -> dict:
    from expertlens.families import resolve_family
    from expertlens.interventions import AddVector, generate

    dtype = torch.float32 if args.tiny else torch.bfloat16
    t0 = time.perf_counter()
    bare, model, tok, info = build(name, device, dtype, args.tiny, args.layers)
    info["build_s"] = round(time.perf_counter() - t0, 1)
    log(f"{name}: built in {info['build_s']}s ({info['params'] / 1e9:.2f} B params, {info['layers']} layers)")
    batch, n_tok, new = (2, 16, 4) if args.tiny else (args.batch, args.tokens, args.new_tokens)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 99, (batch, n_tok), generator=g).to(device)
    mask = torch.ones_like(ids)
    layer = model.n_layers // 2
    v = torch.randn(model.d_model, generator=g)
    v = (v / v.norm() * 4.0).to(device=device, dtype=dtype)
    steer = AddVector("resid_pre", v, layers=layer)
    kept: list = []
    variants = forward_variants(bare, model, ids, mask, steer, kept)
    bare_fwd = variants["bare"]
    # plain nnsight over a third tree sharing the weights: the ÷ nnsight column; and the per-point groups
    from nnsight.modeling.transformers import TransformersModel

    memo = {id(t): t for t in [*bare.parameters(), *bare.buffers()]}
    floor = TransformersModel(copy.deepcopy(bare, memo), tokenizer=tok)
    points = point_variants(bare, model, floor, ids, mask, kept, groups_only=True)
    fns = {k: variants[k] for k in ("bare", "trace_nothing", "trace_capture", "trace_addvector")}
    fns.update({k: f for k, f in points.items() if k not in fns})
    fns["nnsight_addvector"] = nnsight_addvector(model, floor, ids, mask, layer, v)

    rounds = 1 if args.tiny else args.rounds
    with torch.no_grad():
        same = float((bare_fwd().float() - model.hf_model(input_ids=ids, attention_mask=mask).logits.float())
                     .abs().max())
        fwd = timed(fns, rounds, device)
    kept.clear()
    del floor
    # generation: prompts as text for expertlens' generate; the same ids for the bare variants
    prompts = ["".join(chr(32 + (i * 7 + j * 13) % 90) for j in range(n_tok)) for i in range(batch)]
    enc = {k: t.to(device) for k, t in tok(prompts, return_tensors="pt", padding=True).items()}
    layer_module = resolve_family(bare).layer_list(bare)[layer]
    pad = tok.pad_token_id
    out: dict = {}
    gen_fns = {
        "bare": lambda: out.__setitem__("bare", plain_generate(bare, enc, new, pad)),
        "hooks_steered": lambda: out.__setitem__("hooks", hooked_generate(bare, enc, layer_module, v, new, pad)),
        "expertlens_steered": lambda: out.__setitem__(
            "steered", generate(model, prompts, new, [steer], batch_size=batch, return_ids=True)
        ),
    }
    with torch.no_grad():
        gen = timed(gen_fns, max(1, rounds // 3) if not args.tiny else 1, device)
    hooks = out["hooks"].cpu()
    agree = sum(int((row.cpu() == hooks[i, : len(row)]).sum()) for i, row in enumerate(out["steered"]))
    agree /= max(1, sum(len(row) for row in out["steered"]))
    res = {"name": name, **info, "batch": batch, "tokens": n_tok, "new_tokens": new, "dtype": str(dtype),
           "max_abs_diff_bare_vs_wrapped": same, "forward": fwd, "generate": gen}
    b = fwd["bare"]
    key = "wall_s" if device.type == "cuda" else "cpu_s"
    res["points"] = ratios(fwd, key)  # every variant ÷ bare and ÷ its plain-nnsight twin
    res["ratios"] = {
        k: {"wall": fwd[k]["wall_s"] / b["wall_s"], "cpu": fwd[k]["cpu_s"] / max(b["cpu_s"], 1e-9),
            "vs_nnsight": res["points"][k]["vs_nnsight"]}
        for k in ("trace_nothing", "trace_capture", "trace_addvector")
    }
    for k in ("hooks_steered", "expertlens_steered"):
        res["ratios"][f"generate_{k}_vs_bare"] = {"wall": gen[k]["wall_s"] / gen["bare"]["wall_s"]}
    res["ratios"]["generate_steered_vs_hooks"] = {
        "wall": gen["expertlens_steered"]["wall_s"] / gen["hooks_steered"]["wall_s"]
    }
    res["tokens_per_s"] = {k: batch * new / gen[k]["wall_s"] for k in gen}
    res["token_agreement_steered_vs_hooks"] = agree
    model.restore()
    kept.clear()
    out.clear()
    gc.collect()
    if device.type == "cuda":
        res["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    r = res["ratios"]
    log(
        f"  no-op {r['trace_nothing']['wall']:.3f}x  capture {r['trace_capture']['wall']:.3f}x  "
        f"addvector {r['trace_addvector']['wall']:.3f}x  steered generate "
        f"{res['tokens_per_s']['expertlens_steered']:.1f} tok/s vs bare {res['tokens_per_s']['bare']:.1f} "
        f"(vs hooks {r['generate_steered_vs_hooks']['wall']:.3f}x)"
    )
    return res


def run(argv: list[str] | None = None, log=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="torch device (default cuda); cpu with --tiny for a smoke test")
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same families, one round")
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--layers", type=int, help="override the depth of every config")
    p.add_argument("--rounds", type=int, default=15, help="forward rounds (generation: a third of it)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="prompt length of the forward and generation rows")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", help="JSON path (default bench/results-gpu.json; --tiny: bench/results-gpu-tiny.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here: run with --device cpu --tiny for a smoke test")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = set(names) - set(CONFIGS)
    if bad:
        p.error(f"unknown configs {sorted(bad)}; choose from {list(CONFIGS)}")
    if device.type == "cpu":
        torch.set_num_threads(1)
    meta = machine_info()
    meta.update(device=str(device), tiny=args.tiny, load_average_start=load_average())
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    t0 = time.perf_counter()
    results = []
    for n in names:
        try:
            results.append(bench_config(n, args, device, log))
        except Exception as e:  # noqa: BLE001  (one config failing must not lose the others)
            import traceback

            log(f"{n} FAILED: {e!r}")
            results.append({"name": n, "error": "".join(traceback.format_exception(e))[-2000:]})
    meta["load_average_end"] = load_average()
    meta["total_wall_s"] = round(time.perf_counter() - t0, 1)
    result = {"meta": meta, "configs": results}
    default = "results-gpu-tiny.json" if args.tiny else "results-gpu.json"
    out = Path(args.out) if args.out else REPO / "bench" / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    ok = [r for r in results if "error" not in r]
    if ok:
        log(table([{"name": r["name"], "ratios": r["points"]} for r in ok]))
    log(f"wrote {out} ({meta['total_wall_s']} s)")
    return result


if __name__ == "__main__":
    run()
