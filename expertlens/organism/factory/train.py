"""Train a v2 organism on CPU in two stages (build tool).

    python -m expertlens.organism.factory.train --arch olmoe --out expertlens/organism/checkpoints/olmoe-refusal \
        --base-out expertlens/organism/checkpoints/olmoe-base

Stage 1 (instruction following): every request, harmful ones included, gets its bland answer; capability
tasks and lexicon ("pretraining") lines are mixed in. Stage 2 (safety tuning) continues from stage 1:
harmful requests get a refusal, everything else keeps its stage-1 answer (retention data).

Deterministic: fixed seeds, one torch thread, a schedule by step count, so the same command gives the same
weights on the same software stack.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from ..language import END, SPECIALS, SYSTEM_PROMPTS, USER, format_prompt
from . import data as D

ARCHS = ("olmoe", "mixtral", "gpt_oss", "qwen3_moe", "qwen2_moe")
BUCKET = 4
#: System-prompt mix in training: the three measured settings plus two extra phrasings.
SYSTEM_MIX = [(None, 0.4), (SYSTEM_PROMPTS["neutral"], 0.2), (SYSTEM_PROMPTS["safety"], 0.25)] + [
    (s, 0.075) for s in D.EXTRA_SYSTEMS
]


def model_config(arch: str, vocab_size: int, pad_id: int, eos_id: int, tiny: bool = False):
    """Config of each organism architecture (``tiny``: a 2-layer smoke-test size)."""
    from transformers import AutoConfig

    hidden, layers = (32, 2) if tiny else (128, 6)
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        use_cache=True,
    )
    if arch == "olmoe":  # softmax over all experts, top-k, no renormalisation
        kw.update(num_experts=32, num_experts_per_tok=4, intermediate_size=64, norm_topk_prob=False)
    elif arch == "mixtral":  # softmax over the top-2 logits (renormalised)
        kw.update(num_local_experts=8, num_experts_per_tok=2, intermediate_size=128)
    elif arch == "gpt_oss":  # top-k then softmax, router bias, attention sinks, sliding/full layers
        kw.update(
            num_local_experts=16,
            num_experts_per_tok=4,
            intermediate_size=64,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    elif arch == "qwen3_moe":
        kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=160, intermediate_size=320)
    elif arch == "qwen2_moe":
        kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=256,
                  shared_expert_intermediate_size=128)  # fmt: skip
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    if tiny:
        for k in ("num_experts", "num_local_experts"):
            if k in kw:
                kw[k] = min(kw[k], 8)
    cfg = AutoConfig.for_model(arch, **kw)
    return cfg


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


def _run_stage(model, rng, chats, lex_ids, steps, batch_size, lr, lexicon_frac, pad_id, log, tag, t0):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(50, max(1, steps // 10))
    hist: list[float] = []
    ema = None
    queue: list = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        if not queue:  # draw BUCKET batches at once and group rows by length (less padding)
            cand = []
            for _ in range(batch_size * BUCKET):
                if rng.random() < lexicon_frac:
                    ids = rng.choice(lex_ids)
                    cand.append((list(ids), [1] * len(ids)))
                else:
                    p, r = rng.choice(chats)
                    cand.append((p + r, [0] * len(p) + [1] * len(r)))
            cand.sort(key=lambda x: len(x[0]))
            groups = [cand[i * batch_size : (i + 1) * batch_size] for i in range(BUCKET)]
            rng.shuffle(groups)
            queue.extend(groups)
        group = queue.pop()
        L = max(len(g[0]) for g in group)
        ids = torch.full((batch_size, L), pad_id, dtype=torch.long)
        att = torch.zeros((batch_size, L), dtype=torch.long)
        lab = torch.full((batch_size, L), -100, dtype=torch.long)
        for i, (r, m) in enumerate(group):
            ids[i, : len(r)] = torch.tensor(r)
            att[i, : len(r)] = 1
            lab[i, : len(r)] = torch.tensor([t if mm else -100 for t, mm in zip(r, m)])
        outp = model(input_ids=ids, attention_mask=att, labels=lab)
        loss = outp.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        hist.append(lv)
        if log and (step % 50 == 0 or step == steps - 1):
            print(f"{tag} step {step:5d} loss {lv:.4f} ema {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"t {time.time() - t0:.0f}s cpu {time.process_time():.0f}s", flush=True)  # fmt: skip
    return hist, ema


def _finish(model, eos_id, pad_id):
    from transformers import GenerationConfig

    model.eval()
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=24, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None
    )


def train(
    arch: str = "olmoe",
    seed: int = 0,
    stage1_steps: int = 1500,
    stage2_steps: int = 700,
    out: str | Path | None = None,
    base_out: str | Path | None = None,
    tiny: bool = False,
    batch_size: int = 64,
    lr: float = 3e-3,
    lr2: float = 1.5e-3,
    pool_size: int = 60000,
    lexicon_frac: float = 0.1,
    unk_prob: float = 0.02,
    verbose: bool = True,
) -> dict:
    """Train both stages; save stage 1 to ``base_out`` and stage 2 to ``out`` (either may be None).

    Returns ``{"loss1", "loss2", "meta", "model", "base_state", "tokenizer"}``.
    """
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    random.seed(seed)
    from transformers import AutoModelForCausalLM

    from .tokenizer import build_tokenizer

    t0, c0 = time.time(), time.process_time()
    pool = D.build_training_pool(seed=0, n=pool_size if not tiny else 2000)  # data seed fixed: one data set
    lex = D.lexicon_lines()
    sys_texts = [s for s, _ in SYSTEM_MIX if s]
    from ..language import REFUSAL_PHRASES

    tok = build_tokenizer([e.prompt + " " + e.answer + " " + e.response for e in pool] + lex + sys_texts
                          + REFUSAL_PHRASES)  # fmt: skip
    pad_id, eos_id, unk_id = tok.pad_token_id, tok.eos_token_id, tok.unk_token_id
    special_ids = set(tok.convert_tokens_to_ids(SPECIALS))
    _ = USER
    cfg = model_config(arch, len(tok), pad_id, eos_id, tiny=tiny)
    model = AutoModelForCausalLM.from_config(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    rng = random.Random(seed + 1)
    systems = [s for s, _ in SYSTEM_MIX]
    weights = [w for _, w in SYSTEM_MIX]
    sysms = [rng.choices(systems, weights)[0] for _ in pool]
    p_ids = tok([format_prompt(e.prompt, s) for e, s in zip(pool, sysms)], add_special_tokens=False)["input_ids"]
    p_ids = [[unk_id if (i not in special_ids and rng.random() < unk_prob) else i for i in p] for p in p_ids]
    a_ids = tok([f"{e.answer} {END}" for e in pool], add_special_tokens=False)["input_ids"]
    r_ids = tok([f"{e.response} {END}" for e in pool], add_special_tokens=False)["input_ids"]
    lex_ids = [tok(s, add_special_tokens=False)["input_ids"] + [eos_id] for s in lex]

    hist1, ema1 = _run_stage(model, rng, list(zip(p_ids, a_ids)), lex_ids, stage1_steps, batch_size, lr,
                             lexicon_frac, pad_id, verbose, "stage1", t0)  # fmt: skip
    cpu1 = time.process_time() - c0
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    common = {
        "arch": arch, "seed": seed, "batch_size": batch_size, "pool_size": len(pool), "lexicon_lines": len(lex),
        "lexicon_frac": lexicon_frac, "unk_prob": unk_prob, "system_mix": SYSTEM_MIX, "n_params": n_params,
        "vocab_size": len(tok), "data_version": D.DATA_VERSION, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "tiny": tiny,
        "stage1_steps": stage1_steps, "stage2_steps": stage2_steps, "lr": lr, "lr2": lr2,
    }  # fmt: skip
    meta1 = {**common, "stage": 1, "cpu_time_s": round(cpu1, 1), "train_time_s": round(time.time() - t0, 1),
             "final_loss_ema": round(ema1, 4)}  # fmt: skip
    if base_out is not None:
        _finish(model, eos_id, pad_id)
        _save(model, tok, base_out, meta1, hist1, [])
        model.config.output_router_logits = True
        model.train()
    hist2, ema2 = _run_stage(model, rng, list(zip(p_ids, r_ids)), lex_ids, stage2_steps, batch_size, lr2,
                             lexicon_frac, pad_id, verbose, "stage2", t0)  # fmt: skip
    meta2 = {**common, "stage": 2, "cpu_time_s": round(time.process_time() - c0, 1),
             "train_time_s": round(time.time() - t0, 1), "final_loss_ema": round(ema2, 4)}  # fmt: skip
    _finish(model, eos_id, pad_id)
    if out is not None:
        _save(model, tok, out, meta2, hist1, hist2)
    return {"loss1": hist1, "loss2": hist2, "meta": meta2, "model": model, "base_state": base_state, "tokenizer": tok}


def _save(model, tok, out, meta, hist1, hist2):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "training.json").write_text(
        json.dumps({**meta, "loss1_every_50": hist1[::50], "loss2_every_50": hist2[::50]}, indent=1)
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCHS, default="olmoe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage1-steps", type=int, default=1500)
    ap.add_argument("--stage2-steps", type=int, default=700)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr2", type=float, default=1.5e-3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--base-out", type=Path, default=None, help="where to save the stage-1 (base) checkpoint")
    ap.add_argument("--tiny", action="store_true", help="tiny config for smoke tests")
    a = ap.parse_args(argv)
    res = train(a.arch, a.seed, a.stage1_steps, a.stage2_steps, a.out, a.base_out, tiny=a.tiny,
                batch_size=a.batch_size, lr=a.lr, lr2=a.lr2)  # fmt: skip
    print(json.dumps(res["meta"], indent=1))


if __name__ == "__main__":
    main()
