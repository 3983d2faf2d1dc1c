"""Worker for tests/test_distributed.py, launched by ``torchrun --nproc-per-node 2`` (gloo, CPU).

Every rank loads the checkpoint twice: once with transformers' native distributed inference
(``DistributedConfig``; tensor parallel: :func:`expertlens.compat.tensor_parallel_config`, as the command line
loads) and once as one plain process. Both are wrapped with ExpertModel and traced on this
rank's own prompts (different on each rank, so the expert-parallel all-to-all really mixes ranks' tokens);
every point of every MoE layer and the logits under AddVector / MaskExperts / ExpertSteer / an expert write
are compared. Each rank writes ``rank{N}.json`` with the largest differences; nothing is asserted here.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)


def tp_ok_head_out(model) -> bool:
    """attn.head_out exists unless tensor parallelism shards W_O (then reading it raises a PointError up front)."""
    from expertlens.instrument import tp_sharded

    return tp_sharded(model._module.get_submodule(model.layout[0].o_proj)) is None


def points(model, prompts):
    """Every MoE point of every MoE layer (and per-expert outputs / masks) plus the logits."""
    saved = {}
    with torch.no_grad(), model.trace(prompts):
        # attention points whose modules tensor parallelism shards (o_proj: input split by feature, W_O sharded)
        attn = model.layers[0].attn
        saved["0.attn.z"] = attn.z.save()
        if tp_ok_head_out(model):
            saved["0.attn.head_out"] = attn.head_out.save()
        saved["0.attn.output"] = attn.output.save()
        for i in model.moe_layers:
            moe = model.layers[i].moe
            saved[f"{i}.router_logits"] = moe.router_logits.save()
            saved[f"{i}.router_probs"] = moe.router_probs.save()
            saved[f"{i}.topk_indices"] = moe.topk_indices.save()
            saved[f"{i}.topk_weights"] = moe.topk_weights.save()
            for e in range(model.n_experts):
                saved[f"{i}.experts[{e}].output"] = moe.experts[e].output.save()
                saved[f"{i}.experts[{e}].mask"] = moe.experts[e].mask.save()
            saved[f"{i}.expert_out"] = moe.expert_out.save()
            if moe.has_shared:
                saved[f"{i}.shared_out"] = moe.shared_out.save()
            saved[f"{i}.output"] = moe.output.save()
            saved[f"{i}.resid_post"] = model.layers[i].resid_post.save()
        saved["logits"] = model.output.logits.save()
    return saved


def edited_logits(model, prompts):
    from expertlens.interventions import AddVector, ExpertSteer, MaskExperts

    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.d_model, generator=g)
    layer = model.moe_layers[-1]
    edits = {
        "AddVector": AddVector("resid_pre", v, coeff=2.0, layers=layer),
        "MaskExperts": MaskExperts({i: [0, 3, 5] for i in model.moe_layers}),
        "ExpertSteer": ExpertSteer(layer=layer, expert=2, direction=v, coeff=4.0),
    }
    out = {}
    for name, iv in edits.items():
        with torch.no_grad(), model.intervene(iv), model.trace(prompts):
            out[name] = model.output.logits.save()
    # a direct per-expert write and an expert_out write inside a trace
    with torch.no_grad(), model.trace(prompts):
        moe = model.layers[layer].moe
        moe.experts[1].output = moe.experts[1].output * 0 + 1.0
        out["expert_write"] = model.output.logits.save()
    with torch.no_grad(), model.trace(prompts):
        moe = model.layers[layer].moe
        moe.expert_out = moe.expert_out * 2.0
        out["expert_out_write"] = model.output.logits.save()
    return out


def main(checkpoint: str, out_dir: str, mode: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from expertlens import ExpertModel
    from expertlens.compat import tensor_parallel_config
    from expertlens.testing import tiny_tokenizer

    rank = int(os.environ["RANK"])
    report: dict = {"rank": rank, "mode": mode}
    try:
        if mode == "ep":
            config = DistributedConfig(tp_size=1, fsdp_size=2, ep_size=2)
        else:  # what `expertlens refusal --parallel tp` loads with: the experts split too, on any transformers
            config = tensor_parallel_config(checkpoint, 2)
        dist = AutoModelForCausalLM.from_pretrained(checkpoint, distributed_config=config, dtype=torch.float32)
        single = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        report["experts_class"] = type(dist.model.layers[0].mlp.experts).__name__
        experts = dist.model.layers[0].mlp.experts
        report["expert_parallel"] = bool(getattr(experts, "_is_expert_parallel", False))
        # tensor parallel: the experts' weights are DTensors sharded across the ranks
        report["tensor_parallel"] = type(experts.down_proj).__name__ == "DTensor" and not report["expert_parallel"]
        tok = tiny_tokenizer()
        m_dist, m_single = ExpertModel(dist, tok), ExpertModel(single, tok)
        # expert parallel: each rank has its own batch; tensor parallel: the ranks of a group share one batch
        prompts = [["hello there, expert", "moe"], ["a different batch on rank one", "xyz"]][rank % 2 if mode == "ep"
                                                                                             else 0]
        a, b = points(m_dist, prompts), points(m_single, prompts)
        diffs = {}
        for key, ref in b.items():
            got = a.get(key)
            if got is None:
                diffs[key] = "missing"
                continue
            if hasattr(got, "full_tensor"):
                got = got.full_tensor()
            if tuple(got.shape) != tuple(ref.shape):
                diffs[key] = f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
                continue
            diffs[key] = float((got.double() - ref.double()).abs().max()) if got.numel() else 0.0
        report["points"] = diffs
        report["n_routed_slots"] = {k: int(v.shape[0]) for k, v in b.items() if k.endswith("].output")}
        try:  # a persistent edit at a sharded module would see one rank's slice: refused (nothing attached)
            m_dist.add_edit("attn.z", lambda x, ctx: x, layer=0).remove()
            report["sharded_edit"] = "attached"
        except Exception as e:  # noqa: BLE001
            report["sharded_edit"] = f"{type(e).__name__}: {e}"
        report["n_edits_after"] = m_dist.n_edits()
        if not tp_ok_head_out(m_dist):
            try:
                with m_dist.trace(prompts):
                    m_dist.layers[0].attn.head_out.save()
                report["head_out"] = "read"
            except Exception as e:  # noqa: BLE001
                report["head_out"] = f"{type(e).__name__}: {e}"
        ea, eb = edited_logits(m_dist, prompts), edited_logits(m_single, prompts)
        report["interventions"] = {k: float((ea[k] - eb[k]).abs().max()) for k in eb}
        # an edit must change something, or the comparison proves nothing
        report["intervention_effect"] = {k: float((eb[k] - b["logits"]).abs().max()) for k in eb}
    except Exception as e:  # noqa: BLE001  (reported to the test, which prints it)
        report["error"] = "".join(traceback.format_exception(e))[-4000:]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(*sys.argv[1:4])
