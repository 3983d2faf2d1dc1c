"""Train a tiny refusing MoE chat model on CPU.

    python -m expertlens.organism.train --arch qwen3_moe --seed 0 --out DIR

Deterministic: fixed seeds, one torch thread, and a schedule by step count (not wall time), so the same
command gives the same weights on the same software stack.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from . import data as D
from .tokenizer import END, SPECIALS, USER, format_prompt

ARCHS = ("qwen3_moe", "qwen2_moe", "olmoe")
BUCKET = 4


def model_config(arch: str, vocab_size: int, pad_id: int, eos_id: int, tiny: bool = False):
    from transformers import AutoConfig

    hidden, layers, moe_i = (32, 2, 32) if tiny else (128, 6, 160)
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        intermediate_size=2 * moe_i,
        moe_intermediate_size=moe_i,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        use_cache=True,
    )
    if arch == "qwen3_moe":
        kw.update(decoder_sparse_step=1, mlp_only_layers=[])
    elif arch == "qwen2_moe":
        kw.update(decoder_sparse_step=1, mlp_only_layers=[], shared_expert_intermediate_size=moe_i)
    elif arch == "olmoe":
        kw.pop("moe_intermediate_size")
        kw["intermediate_size"] = moe_i
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    cfg = AutoConfig.for_model(arch, **kw)
    cfg._experts_implementation = "eager"
    return cfg


def encode_chat(tok, prompt: str, response: str, system: str | None) -> tuple[list[int], list[int]]:
    p = tok(format_prompt(prompt, system), add_special_tokens=False)["input_ids"]
    r = tok(f"{response} {END}", add_special_tokens=False)["input_ids"]
    return p, r


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


def train(
    arch: str = "qwen3_moe",
    seed: int = 0,
    steps: int = 1400,
    out: str | Path | None = None,
    tiny: bool = False,
    batch_size: int = 64,
    lr: float = 3e-3,
    pool_size: int = 40000,
    lexicon_frac: float = 0.15,
    unk_prob: float = 0.06,
    unk_span_prob: float = 0.25,
    system_prob: float = 0.25,
    log_every: int = 50,
    evaluate: bool = True,
    verbose: bool = True,
) -> dict:
    """Train and (optionally) save + evaluate. Returns a dict with the loss history and metadata."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    random.seed(seed)
    from transformers import AutoModelForCausalLM, GenerationConfig

    from .tokenizer import build_tokenizer

    t0, c0 = time.time(), time.process_time()
    pool = D.build_training_pool(seed=0, n=pool_size if not tiny else 2000)  # data seed fixed: one data set
    lex = D.lexicon_lines()
    tok = build_tokenizer([e.prompt + " " + e.response for e in pool] + lex + D.SYSTEM_PROMPTS + D.REFUSAL_PHRASES)
    pad_id, eos_id, unk_id = tok.pad_token_id, tok.eos_token_id, tok.unk_token_id
    user_id = tok.convert_tokens_to_ids(USER)
    special_ids = set(tok.convert_tokens_to_ids(SPECIALS))
    cfg = model_config(arch, len(tok), pad_id, eos_id, tiny=tiny)
    model = AutoModelForCausalLM.from_config(cfg)
    model.config._experts_implementation = "eager"
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    rng = random.Random(seed + 1)
    sysms = [rng.choice(D.SYSTEM_PROMPTS) if rng.random() < system_prob else None for _ in pool]
    p_ids = tok([format_prompt(e.prompt, s) for e, s in zip(pool, sysms)], add_special_tokens=False)["input_ids"]
    r_ids = tok([f"{e.response} {END}" for e in pool], add_special_tokens=False)["input_ids"]
    chats = list(zip(p_ids, r_ids))
    lex_ids = [tok(s, add_special_tokens=False)["input_ids"] + [eos_id] for s in lex]

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(50, max(1, steps // 10))
    hist = []
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
                    p = [unk_id if (i not in special_ids and rng.random() < unk_prob) else i for i in p]
                    if rng.random() < unk_span_prob:  # unknown words around the instruction
                        lo = p.index(user_id) + 1
                        at = rng.choice([lo, len(p) - 2, rng.randint(lo, len(p) - 2)])
                        p = p[:at] + [unk_id] * rng.randint(1, 3) + p[at:]
                    cand.append((p + r, [0] * len(p) + [1] * len(r)))
            cand.sort(key=lambda x: len(x[0]))
            groups = [cand[i * batch_size : (i + 1) * batch_size] for i in range(BUCKET)]
            rng.shuffle(groups)
            queue.extend(groups)
        group = queue.pop()
        rows, masks = [g[0] for g in group], [g[1] for g in group]
        L = max(len(r) for r in rows)
        ids = torch.full((batch_size, L), pad_id, dtype=torch.long)
        att = torch.zeros((batch_size, L), dtype=torch.long)
        lab = torch.full((batch_size, L), -100, dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, masks)):
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
        if verbose and (step % log_every == 0 or step == steps - 1):
            aux = float(outp.aux_loss.detach()) if getattr(outp, "aux_loss", None) is not None else float("nan")
            print(
                f"step {step:5d} loss {lv:.4f} ema {ema:.4f} aux {aux:.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} t {time.time() - t0:.0f}s",
                flush=True,
            )
    train_time, cpu_time = time.time() - t0, time.process_time() - c0

    model.eval()
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=24, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None
    )
    meta = {
        "arch": arch,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "pool_size": len(pool),
        "lexicon_lines": len(lex),
        "lexicon_frac": lexicon_frac,
        "unk_prob": unk_prob,
        "unk_span_prob": unk_span_prob,
        "system_prob": system_prob,
        "n_params": n_params,
        "vocab_size": len(tok),
        "train_time_s": round(train_time, 1),
        "cpu_time_s": round(cpu_time, 1),
        "final_loss_ema": round(ema, 4),
        "data_version": D.DATA_VERSION,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "tiny": tiny,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "training.json").write_text(json.dumps({**meta, "loss_every_50": hist[::50]}, indent=1))
        if evaluate and not tiny:
            from .evaluate import evaluate_checkpoint, write_model_card

            res = evaluate_checkpoint(out)
            write_model_card(out, meta, res)
    return {"loss": hist, "meta": meta, "model": model, "tokenizer": tok}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCHS, default="qwen3_moe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny config for smoke tests")
    ap.add_argument("--no-eval", action="store_true", help="skip evaluation / model card")
    ap.add_argument("--log-every", type=int, default=50)
    a = ap.parse_args(argv)
    res = train(
        a.arch,
        a.seed,
        a.steps,
        a.out,
        tiny=a.tiny,
        batch_size=a.batch_size,
        lr=a.lr,
        evaluate=not a.no_eval,
        log_every=a.log_every,
    )
    print(json.dumps(res["meta"], indent=1))


if __name__ == "__main__":
    main()
