"""What each point costs to save, at true width: a trace saving one point (at every layer that has it) over the
bare forward, and over plain nnsight saving the same values.

Configs are 2-layer builds of the published configs (random weights, bf16), so every matrix has its real
width; on a CPU the routed-expert count is capped (``max_experts``) to fit memory — a token's cost does not
depend on how many experts it was not routed to, only the router's ``[b, p, E]`` outputs shrink.

Variants (all in one interleaved run, medians of CPU time on a CPU, wall time with a device sync on a GPU):

* ``bare``: the HF forward (grouped_mm experts); ``trace_nothing``; ``nnsight_nothing``: plain nnsight, no save.
* ``point:NAME``: an expertlens trace saving ``NAME`` at every layer that has it (per-expert points: expert 0).
* ``all_moe``: every ``moe.*`` point of every MoE layer; ``every``: every point of every layer (``attn.head_out``
  included); ``every_but_heads``: the same without ``attn.head_out``.
* ``nnsight_moe`` / ``nnsight_every``: plain nnsight saving the module values the same expertlens saves read
  (router, experts, MoE block in and out / every module input and output along the stream, and ``head_out``
  computed from the output projection's input the way a user would). Fused experts give plain nnsight no
  per-slot values: its ``nnsight_moe`` saves less than ``all_moe`` does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

#: True-width shapes from the published config.json files (2 layers here; bench/gpu.py sets its own depth).
TRUE_WIDTH: dict[str, dict] = {
    "olmoe-1b-7b": dict(
        family="olmoe",
        kw=dict(
            hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
            max_position_embeddings=4096, norm_topk_prob=False,
        ),
    ),
    "qwen3-30b-a3b": dict(
        family="qwen3_moe",
        kw=dict(
            hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
            vocab_size=151936, max_position_embeddings=4096, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
    "gpt-oss-20b": dict(
        family="gpt_oss",
        kw=dict(
            hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
            num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088,
            sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 12,
            max_position_embeddings=4096,
        ),
    ),
    "deepseek-v3": dict(
        family="deepseek_v3",
        kw=dict(
            hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
            first_k_dense_replace=1, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
            topk_group=4, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280,
            routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=4096,
        ),
    ),
}
TINY_FAMILY = {"olmoe-1b-7b": "olmoe", "qwen3-30b-a3b": "qwen3_moe", "gpt-oss-20b": "gpt_oss",
               "deepseek-v3": "deepseek_v3"}  # fmt: skip
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def true_width_config(name: str, layers: int, max_experts: int | None = None):
    """The ``transformers`` config of ``name`` at ``layers`` layers (``max_experts``: cap the routed experts)."""
    from transformers import AutoConfig

    spec = TRUE_WIDTH[name]
    kw = dict(spec["kw"], num_hidden_layers=layers)
    if "layer_types" in kw:
        kw["layer_types"] = (kw["layer_types"] * layers)[:layers]
    if max_experts is not None:
        for key in EXPERT_KEYS:
            if key in kw and kw[key] > max_experts:
                kw[key] = max_experts
    return AutoConfig.for_model(spec["family"], **kw)


def build_pair(name: str, device: torch.device, dtype: torch.dtype, *, tiny: bool, layers: int,
               max_experts: int | None = None):
    """(bare model, ExpertModel, tokenizer, info) sharing one set of weights on ``device``."""
    from transformers import AutoModelForCausalLM

    from expertlens import ExpertModel
    from expertlens.testing import tiny_config, tiny_tokenizer

    if tiny:
        cfg = tiny_config(TINY_FAMILY[name], max_position_embeddings=512)
    else:
        cfg = true_width_config(name, layers, max_experts)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    hf.eval()
    # Router weights with a larger scale so routing is not near-uniform (as expertlens.testing does).
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "router" in pname or pname.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.2)
    # The bare model shares every parameter and buffer with `hf` (deepcopy with them pre-memoised).
    memo = {id(t): t for t in [*hf.parameters(), *hf.buffers()]}
    bare = copy.deepcopy(hf, memo)
    bare.set_experts_implementation("grouped_mm")
    tok = tiny_tokenizer()
    wrapped = ExpertModel(hf, tok)
    for m in (bare, wrapped.hf_model):
        m.generation_config.eos_token_id = None
    experts = next((getattr(cfg, k) for k in EXPERT_KEYS if hasattr(cfg, k)), None)
    info = {"family": cfg.model_type, "layers": cfg.num_hidden_layers, "d_model": cfg.hidden_size,
            "experts": experts, "params": sum(p.numel() for p in hf.parameters())}  # fmt: skip
    return bare, wrapped, tok, info


# --------------------------------------------------------------------------------------------
# the variants
# --------------------------------------------------------------------------------------------


def _available(model, name: str) -> list[int | None]:
    """The layers (``[None]`` for a model-level point) where ``model`` has point ``name``."""
    from expertlens.points import POINTS, PointError

    p = POINTS[name]
    if p.level == "model":
        return [None]
    out = []
    for layer in range(model.n_layers):
        try:
            p.site(model, layer)
        except PointError:
            continue
        out.append(layer)
    return out


def _reads(model, names: list[str]) -> list[tuple[str, int | None]]:
    """``(point, layer)`` pairs in computation order (a trace reads them in the order the model makes them)."""
    from expertlens.points import POINTS

    order = list(POINTS)
    pairs = [(n, layer) for n in names for layer in _available(model, n)]

    def when(pair):
        n, layer = pair
        at = (-1 if n == "embed" else model.n_layers) if layer is None else layer
        return at, order.index(n)

    return sorted(pairs, key=when)


def _save(model, name: str, layer: int | None):
    from expertlens.points import POINTS

    p = POINTS[name]
    if p.level == "expert":
        return getattr(model.layers[layer].moe.experts[0], name.rsplit(".", 1)[1]).save()
    return p.read(model, layer).save()


#: The single points timed with ``groups_only`` (the costliest one; every other alone is within noise of none).
GROUP_POINTS = ("attn.head_out",)


def point_variants(bare, model, floor, ids, mask, kept: list, *, groups_only: bool = False
                   ) -> dict[str, Callable[[], Any]]:
    """``{variant: fn}``: see the module docstring. ``floor``: plain nnsight over a copy sharing the weights.
    ``groups_only``: of the single points only :data:`GROUP_POINTS` (fewer variants for slow machines)."""
    from expertlens.points import POINTS

    names = [n for n in POINTS if _available(model, n)]
    moe = [n for n in names if n.startswith("moe.") and POINTS[n].level == "moe"]
    single = [n for n in names if not groups_only or n in GROUP_POINTS]
    groups = {
        **{f"point:{n}": _reads(model, [n]) for n in single},
        "all_moe": _reads(model, moe),
        "every_but_heads": _reads(model, [n for n in names if n != "attn.head_out"]),
        "every": _reads(model, names),
    }

    def bare_fwd():
        return bare(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def trace(reads):
        def fn():
            kept.clear()  # the previous call's saves stay alive until now, as a user's would
            saved = []
            with model.trace(ids, attention_mask=mask, use_cache=False):
                for n, layer in reads:
                    saved.append(_save(model, n, layer))
            kept.extend(saved)

        return fn

    fns: dict[str, Callable[[], Any]] = {"bare": bare_fwd, "trace_nothing": trace([])}
    fns.update({k: trace(v) for k, v in groups.items()})
    fns.update(nnsight_variants(model, floor, ids, mask, kept))
    return fns


def _walk(envoy, path: str):
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def nnsight_variants(model, floor, ids, mask, kept: list) -> dict[str, Callable[[], Any]]:
    """Plain nnsight saving, by module path, what ``all_moe`` / ``every`` read (see the module docstring)."""
    lays = [model.layout[i] for i in range(model.n_layers)]
    moe_layers = [lay for lay in lays if lay.is_moe]

    def run(body):
        def fn():
            kept.clear()
            saved: list = []
            with floor.trace(ids, attention_mask=mask, use_cache=False):
                body(saved)
            kept.extend(saved)

        return fn

    def moe_layer(saved, lay):
        block = _walk(floor, lay.block)
        saved.append(block.input.save())
        saved.append(_walk(floor, lay.router).output.save())
        saved.append(_walk(floor, lay.experts).output.save())
        saved.append(block.output.save())

    def moe_saves(saved):  # layer by layer, in computation order
        for lay in moe_layers:
            moe_layer(saved, lay)

    def every_saves(saved):
        for lay in lays:
            saved.append(_walk(floor, lay.path).input.save())
            if lay.o_proj is not None:
                o = _walk(floor, lay.o_proj)
                z = o.input
                w = o.weight.view(o.weight.shape[0], lay.n_heads, lay.d_head)
                saved.append(z.save())
                zh = z.view(*z.shape[:-1], lay.n_heads, lay.d_head)
                saved.append(torch.einsum("bphk,dhk->bphd", zh, w.to(zh.dtype)).save())
                saved.append(o.output.save())
            if lay.mid is not None:
                saved.append(_walk(floor, lay.mid).input.save())
            if lay.is_moe:
                moe_layer(saved, lay)
            else:
                saved.append(_walk(floor, lay.mlp).output.save())
            saved.append(_walk(floor, lay.path).output.save())
        saved.append(floor.output.logits.save())

    def capture_saves(saved):  # what trace_capture saves, as plain nnsight can: router and experts outputs
        for lay in moe_layers:
            saved.append(_walk(floor, lay.router).output.save())
            saved.append(_walk(floor, lay.experts).output.save())

    return {"nnsight_nothing": run(lambda saved: None), "nnsight_capture": run(capture_saves),
            "nnsight_moe": run(moe_saves), "nnsight_every": run(every_saves)}  # fmt: skip


def nnsight_addvector(model, floor, ids, mask, layer: int, vector: torch.Tensor) -> Callable[[], Any]:
    """Plain nnsight adding ``vector`` to decoder layer ``layer``'s input (what ``trace_addvector`` does)."""
    path = model.layout[layer].path

    def fn():
        with floor.trace(ids, attention_mask=mask, use_cache=False):
            env = _walk(floor, path)
            env.input = env.input + vector.to(env.input.dtype)

    return fn


#: expertlens variant -> the plain nnsight variant doing the same saves (the ÷ nnsight column).
NNSIGHT_TWIN = {"trace_nothing": "nnsight_nothing", "trace_capture": "nnsight_capture",
                "trace_addvector": "nnsight_addvector", "all_moe": "nnsight_moe", "every": "nnsight_every",
                "every_but_heads": "nnsight_every"}  # fmt: skip


def ratios(timing: dict[str, dict], key: str = "cpu_s") -> dict[str, dict]:
    """``{variant: {"vs_bare": x, "vs_nnsight": y | None}}`` from the medians of one run."""
    base = timing["bare"][key]
    out = {}
    for name, t in timing.items():
        if name == "bare":
            continue
        twin = NNSIGHT_TWIN.get(name)  # one point alone has no plain-nnsight twin (most are not module values)
        out[name] = {
            "vs_bare": t[key] / base if base else float("nan"),
            "vs_nnsight": t[key] / timing[twin][key] if twin in timing and timing[twin][key] else None,
            "nnsight_twin": twin if twin in timing else None,
            # what saving it adds to a trace that saves nothing, in ms
            "added_ms": 1e3 * (t[key] - timing["trace_nothing"][key]) if "trace_nothing" in timing else None,
        }
    return out


def table(rows: list[dict]) -> str:
    """A markdown table of one or more configs' ratios: ``rows`` are ``{"name", "ratios"}`` dicts."""
    variants = list(dict.fromkeys(v for r in rows for v in r["ratios"]))  # families lack different points
    head = "| variant | " + " | ".join(f"{r['name']} ÷ bare | ÷ nnsight" for r in rows) + " |"
    sep = "|---|" + "---:|---:|" * len(rows)
    lines = [head, sep]
    for v in variants:
        cells = []
        for r in rows:
            x = r["ratios"].get(v)
            if x is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{x['vs_bare']:.2f}")
            cells.append(f"{x['vs_nnsight']:.2f}" if x["vs_nnsight"] is not None else "–")
        lines.append(f"| `{v}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def measure(fns: dict, rounds: int, device: torch.device) -> dict[str, dict]:
    """Interleaved rounds (``bench.harness.interleaved`` on a CPU, ``bench.gpu.timed`` with device syncs)."""
    if device.type == "cpu":
        from .harness import interleaved

        return interleaved(fns, rounds, warmup=1)
    from .gpu import timed

    return timed(fns, rounds, device)


def bench_points(name: str, device: torch.device, *, tiny: bool, layers: int = 2, batch: int = 1,
                 tokens: int = 16, rounds: int = 3, max_experts: int | None = None, groups_only: bool = False,
                 log=print) -> dict:
    """One config's per-point rows: timings, ratios (÷ bare, ÷ nnsight's twin) and the saved bytes."""
    import time

    from nnsight.modeling.transformers import TransformersModel

    dtype = torch.float32 if tiny else torch.bfloat16
    t0 = time.perf_counter()
    bare, model, tok, info = build_pair(name, device, dtype, tiny=tiny, layers=layers, max_experts=max_experts)
    memo = {id(t): t for t in [*bare.parameters(), *bare.buffers()]}
    floor = TransformersModel(copy.deepcopy(bare, memo), tokenizer=tok)
    info["build_s"] = round(time.perf_counter() - t0, 1)
    b, p = (2, 8) if tiny else (batch, tokens)
    ids = torch.randint(4, 99, (b, p), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    kept: list = []
    fns = point_variants(bare, model, floor, ids, mask, kept, groups_only=groups_only)
    saved_bytes = {}
    with torch.no_grad():
        for k in ("all_moe", "every", "nnsight_moe", "nnsight_every"):
            fns[k]()
            saved_bytes[k] = sum(t.numel() * t.element_size() for t in _tensors(kept))
        kept.clear()
        timing = measure(fns, 1 if tiny else rounds, device)
    kept.clear()
    model.restore()
    key = "cpu_s" if device.type == "cpu" else "wall_s"
    res = {"name": name, **info, "batch": b, "tokens": p, "dtype": str(dtype), "timing_key": key,
           "saved_bytes": saved_bytes, "timing": timing, "ratios": ratios(timing, key)}  # fmt: skip
    r = res["ratios"]
    log(f"{name}: all MoE points {r['all_moe']['vs_bare']:.2f}x bare ({r['all_moe']['vs_nnsight']:.2f}x nnsight), "
        f"every point {r['every']['vs_bare']:.2f}x ({r['every']['vs_nnsight']:.2f}x nnsight), "
        f"head_out alone {r['point:attn.head_out']['vs_bare']:.2f}x")
    return res


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensors(v)
        elif hasattr(v, "logits"):  # a model output
            yield v.logits


def run(argv: list[str] | None = None, log=print) -> dict:
    """``python -m bench.points [--tiny] [--only NAME,...] [--out JSON]``: the per-point table of every config."""
    import argparse
    import json
    import time
    from pathlib import Path

    from .harness import REPO, load_average, machine_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny configs of the same families, one round (seconds)")
    ap.add_argument("--only", default=",".join(TRUE_WIDTH))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-experts", type=int, default=None,
                    help="cap the routed experts (CPU memory); default: 32 on a CPU, none on a GPU")
    ap.add_argument("--groups-only", action="store_true", help=f"single points: only {', '.join(GROUP_POINTS)}")
    ap.add_argument("--out", help="JSON path (default bench/results-points[-tiny].json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    cap = args.max_experts if args.max_experts is not None else (32 if device.type == "cpu" else None)
    meta = machine_info()
    meta.update(device=str(device), tiny=args.tiny, max_experts=cap, load_average_start=load_average())
    t0 = time.perf_counter()
    out = Path(args.out) if args.out else REPO / "bench" / ("results-points-tiny.json" if args.tiny
                                                           else "results-points.json")
    results: list[dict] = []
    result = {"meta": meta, "configs": results}
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        results.append(bench_points(name, device, tiny=args.tiny, layers=args.layers, batch=args.batch,
                                    tokens=args.tokens, rounds=args.rounds, max_experts=cap,
                                    groups_only=args.groups_only, log=log))
        meta["load_average_end"] = load_average()
        meta["total_wall_s"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every config: a slow run keeps what it did
    log(table(results))
    log(f"wrote {out} ({meta['total_wall_s']} s)")
    return result


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    run()
