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

import numpy as np
import torch

from ..language import END, SPECIALS, SYSTEM_PROMPTS, USER, format_prompt
from . import data as D

ARCHS = ("olmoe", "mixtral", "gpt_oss", "qwen3_moe", "qwen2_moe")
BUCKET = 4
#: System-prompt mix in training: the three measured settings plus two extra phrasings.
SYSTEM_MIX = [(None, 0.4), (SYSTEM_PROMPTS["neutral"], 0.2), (SYSTEM_PROMPTS["safety"], 0.25)] + [
    (s, 0.075) for s in D.EXTRA_SYSTEMS
]


def model_config(arch: str, vocab_size: int, pad_id: int, eos_id: int, tiny: bool = False,
                 size: dict | None = None):  # fmt: skip
    """Config of each organism architecture (``tiny``: a 2-layer smoke-test size).

    ``size`` overrides the shape: any of ``layers``, ``hidden``, ``heads``, ``kv_heads``, ``experts``,
    ``top_k``, ``intermediate`` (the v3 natural organisms; None: the v2 shapes).
    """
    from transformers import AutoConfig

    size = size or {}
    hidden, layers = (32, 2) if tiny else (size.get("hidden", 128), size.get("layers", 6))
    heads = size.get("heads", 4)
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=size.get("kv_heads", 2),
        head_dim=hidden // heads,
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
    for k in ("num_experts", "num_local_experts"):
        if k in kw and "experts" in size:
            kw[k] = size["experts"]
    if "top_k" in size:
        kw["num_experts_per_tok"] = size["top_k"]
    if "intermediate" in size:
        key = "moe_intermediate_size" if arch in ("qwen3_moe", "qwen2_moe") else "intermediate_size"
        kw[key] = size["intermediate"]
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


NORMAL, ABLATE, INDUCE, LATE = 0, 1, 2, 3


def _moe(layer):
    for k in ("mlp", "block_sparse_moe"):
        if hasattr(layer, k):
            return getattr(layer, k)
    raise AttributeError(f"no MoE block on {type(layer).__name__}")


class Planter:
    """Plants the refusal feature along a fixed unit direction ``r`` during stage 2 (per-row masks, one forward).

    Hooks (forward hooks on the embedding and on every decoder layer's ``self_attn`` and MoE/MLP block; forward
    pre-hooks on the block inputs of the induction layers):

    - ABLATE rows: ``x - (x . r) r`` on the embedding output and every attention and MoE output, all positions --
      exactly the study's directional ablation -- so the residual stream has no ``r`` component;
    - LATE rows: the same projection on the attention and MoE outputs of layers >= ``late_layer`` only (the
      refusal feature must then be written by the earlier layers);
    - INDUCE rows: ``x + s_l r`` at the block input of one layer ``l`` in ``induce_layers``, all positions (the
      study's ActAdd), with ``s_l`` the measured harmful - harmless gap along ``r`` at that block input (last
      prompt token; re-measured every ``every`` steps on a fixed set, floored at ``floor`` x the mean residual norm
      there) times a per-row factor in [0.7, 1.3].
    """

    def __init__(self, model, r, induce_layers, late_layer, floor=0.05, aux_layer=None, aux_frac=0.15, aux_weight=0.2):
        self.model, self.r = model, r
        self.induce_layers, self.late_layer, self.floor = list(induce_layers), late_layer, floor
        self.aux_layer, self.aux_frac, self.aux_weight = aux_layer, aux_frac, aux_weight
        self.aux_target: float | None = None
        self._aux_x: torch.Tensor | None = None
        self.scale = {li: 1.0 for li in self.induce_layers}
        self.gap: dict[int, float] = {}
        self.norm: dict[int, float] = {}
        self.abl = self.late = self.ind = None
        self.ind_layer: torch.Tensor | None = None
        self.hooks = []
        self._grab: dict[int, torch.Tensor] | None = None

    def _proj(self, layer_idx):
        def hook(m, i, o):
            h = o[0] if isinstance(o, tuple) else o
            if self.abl is None:
                return None
            mask = self.abl if layer_idx is None or layer_idx < self.late_layer else self.abl + self.late
            h = h - mask.view(-1, 1, 1) * (h @ self.r).unsqueeze(-1) * self.r
            return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h

        return hook

    def _add(self, li):
        def pre(m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if self._grab is not None:
                self._grab[li] = x.detach()
            if li == self.aux_layer and self.ind is not None:
                self._aux_x = x
            if self.ind is None:
                return None
            sel = (self.ind_layer == li).to(x.dtype) * self.ind
            x = x + sel.view(-1, 1, 1) * self.r
            if args:
                return (x,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = x
            return args, kwargs

        return pre

    def __enter__(self):
        m = self.model
        self.hooks.append(m.model.embed_tokens.register_forward_hook(self._proj(None)))
        for j, lay in enumerate(m.model.layers):
            self.hooks.append(lay.self_attn.register_forward_hook(self._proj(j)))
            self.hooks.append(_moe(lay).register_forward_hook(self._proj(j)))
            self.hooks.append(lay.register_forward_pre_hook(self._add(j), with_kwargs=True))
        return self

    def __exit__(self, *a):
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.abl = self.late = self.ind = self.ind_layer = None

    def set_rows(self, kinds: list[int], ind_layers: list[int], ind_factors: list[float]):
        k = torch.tensor(kinds)
        self.abl = (k == ABLATE).float()
        self.late = (k == LATE).float()
        self.ind_layer = torch.tensor(ind_layers)
        self.ind = (k == INDUCE).float() * torch.tensor(
            [f * self.scale.get(li, 0.0) for f, li in zip(ind_factors, ind_layers)], dtype=torch.float32)

    @torch.no_grad()
    def measure(self, harm: list[list[int]], safe: list[list[int]], pad_id: int):
        """Gap along ``r`` (mean harmful - mean harmless, last prompt token) at every block input."""
        self.abl = self.late = self.ind = None
        out = {}
        for name, rows in (("h", harm), ("s", safe)):
            L = max(map(len, rows))
            ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
            att = torch.zeros((len(rows), L), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row)
                att[i, : len(row)] = 1
            self._grab = {}
            self.model(input_ids=ids, attention_mask=att, use_cache=False)
            last = torch.tensor([len(row) - 1 for row in rows])
            out[name] = {li: x[torch.arange(len(rows)), last] for li, x in self._grab.items()}
            self._grab = None
        for li in out["h"]:
            self.gap[li] = float((out["h"][li] @ self.r).mean() - (out["s"][li] @ self.r).mean())
            self.norm[li] = float(torch.cat([out["h"][li], out["s"][li]]).norm(dim=-1).mean())
        if self.aux_layer is not None and self.aux_target is None:  # fixed for the stage at its start
            self.aux_target = self.aux_frac * self.norm[self.aux_layer]
        for li in self.induce_layers:
            self.scale[li] = max(self.gap[li], self.floor * self.norm[li])

    def aux_loss(self, pos: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
        """Planting loss: the projection on ``r`` at the block input of ``aux_layer``, last prompt token, is pulled
        to ``aux_target`` on harmful and to 0 on harmless prompts (rows with ``pos >= 0``; NORMAL rows only)."""
        x, self._aux_x = self._aux_x, None
        keep = pos >= 0
        if x is None or not bool(keep.any()):
            return torch.zeros(())
        rows = torch.nonzero(keep).squeeze(-1)
        proj = x[rows, pos[rows]] @ self.r
        return self.aux_weight * (((proj - harmful[rows] * self.aux_target) / self.aux_target) ** 2).mean()


def _run_stage(model, rng, chats, lex_ids, steps, batch_size, lr, lexicon_frac, pad_id, log, tag, t0,
               plant: dict | None = None):  # fmt: skip
    """One training stage. ``chats``: (prompt ids, target ids) pairs. ``plant`` (stage 2 with a planted
    direction): {"planter", "answers" (stage-1 targets, aligned with chats), "harmless" (chat indices),
    "refusals" (refusal target ids), "ablate", "induce", "late" (row fractions), "every", "probe" (harm, safe)}."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(50, max(1, steps // 10))
    hist: list[float] = []
    ema = None
    queue: list = []
    pl = plant["planter"] if plant else None
    scales: list[dict] = []
    aux_hist: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        if pl is not None and step % plant["every"] == 0:
            model.eval()
            pl.measure(*plant["probe"], pad_id)
            model.train()
            scales.append({"step": step, "gap": {str(k): round(v, 4) for k, v in pl.gap.items()},
                           "scale": {str(k): round(v, 4) for k, v in pl.scale.items()}})  # fmt: skip
        if not queue:  # draw BUCKET batches at once and group rows by length (less padding)
            cand = []
            for _ in range(batch_size * BUCKET):
                kind, li, fac = NORMAL, -1, 1.0
                if plant:
                    u = rng.random()
                    kind = (INDUCE if u < plant["induce"] else ABLATE if u < plant["induce"] + plant["ablate"]
                            else LATE if u < plant["induce"] + plant["ablate"] + plant["late"] else NORMAL)  # fmt: skip
                if rng.random() < lexicon_frac:
                    ids = rng.choice(lex_ids)
                    kind = kind if kind in (NORMAL, ABLATE) else NORMAL
                    cand.append((list(ids), [1] * len(ids), kind, li, fac, -1, 0.0))
                    continue
                if kind == INDUCE:
                    p = chats[rng.choice(plant["harmless"])][0]
                    r = rng.choice(plant["refusals"])
                    li, fac = rng.choice(pl.induce_layers), rng.uniform(0.7, 1.3)
                    aux = (-1, 0.0)
                else:
                    i = rng.randrange(len(chats))
                    p, r = chats[i] if kind != ABLATE else (chats[i][0], plant["answers"][i])
                    aux = (len(p) - 1, float(plant["harmful"][i])) if plant and kind in (NORMAL, LATE) else (-1, 0.0)
                cand.append((p + r, [0] * len(p) + [1] * len(r), kind, li, fac, *aux))
            cand.sort(key=lambda x: len(x[0]))
            groups = [cand[i * batch_size : (i + 1) * batch_size] for i in range(BUCKET)]
            rng.shuffle(groups)
            queue.extend(groups)
        group = queue.pop()
        L = max(len(g[0]) for g in group)
        ids = torch.full((batch_size, L), pad_id, dtype=torch.long)
        att = torch.zeros((batch_size, L), dtype=torch.long)
        lab = torch.full((batch_size, L), -100, dtype=torch.long)
        for i, (r, m, *_) in enumerate(group):
            ids[i, : len(r)] = torch.tensor(r)
            att[i, : len(r)] = 1
            lab[i, : len(r)] = torch.tensor([t if mm else -100 for t, mm in zip(r, m)])
        if pl is not None:
            pl.set_rows([g[2] for g in group], [g[3] for g in group], [g[4] for g in group])
        outp = model(input_ids=ids, attention_mask=att, labels=lab)
        loss = outp.loss
        if pl is not None and pl.aux_layer is not None:
            aux_l = pl.aux_loss(torch.tensor([g[5] for g in group]), torch.tensor([g[6] for g in group]))
            aux_hist.append(float(aux_l.detach()))
            loss = loss + aux_l
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        hist.append(lv)
        if log and (step % 50 == 0 or step == steps - 1):
            extra = f" gap {[round(pl.gap[k], 2) for k in sorted(pl.gap)]}" if pl is not None and pl.gap else ""
            extra += f" aux {np.mean(aux_hist[-50:]):.4f} target {pl.aux_target:.2f}" if aux_hist else ""
            print(f"{tag} step {step:5d} loss {lv:.4f} ema {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"t {time.time() - t0:.0f}s cpu {time.process_time():.0f}s{extra}", flush=True)  # fmt: skip
    if pl is not None:
        pl.abl = pl.late = pl.ind = None
    if aux_hist:
        scales.append({"aux_loss_every_50": [round(float(np.mean(aux_hist[i : i + 50])), 5)
                                             for i in range(0, len(aux_hist), 50)]})  # fmt: skip
    return hist, ema, scales


def planted_direction(hidden: int, seed: int) -> torch.Tensor:
    """The fixed unit vector the refusal feature is planted along (seeded, independent of the global RNG)."""
    g = torch.Generator().manual_seed(10_007 + seed)
    r = torch.randn(hidden, generator=g, dtype=torch.float64)
    return (r / r.norm()).to(torch.float32)


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
    extra_size: int = 20000,
    lexicon_frac: float = 0.1,
    unk_prob: float = 0.02,
    plant: bool = True,
    ablate_frac: float = 0.25,
    induce_frac: float = 0.12,
    late_frac: float = 0.0,
    plant_every: int = 100,
    aux_weight: float = 0.2,
    aux_frac: float = 0.25,
    init_from: str | Path | None = None,
    supplement_mix: dict[str, float] | None = None,
    verbose: bool = True,
) -> dict:
    """Train both stages; save stage 1 to ``base_out`` and stage 2 to ``out`` (either may be None).

    ``plant``: stage 2 plants the refusal feature along a fixed seeded unit direction (:class:`Planter`,
    saved as ``refusal_direction.safetensors``). ``init_from``: skip stage 1 and start stage 2 from a saved
    stage-1 checkpoint with the same tokenizer (pilots). ``supplement_mix``: family weights of the
    ``extra_size`` supplement chats (:func:`data.parse_supplement_mix`; None: ``data.SUPPLEMENT_MIX``).

    Returns ``{"loss1", "loss2", "meta", "model", "base_state", "tokenizer", "direction"}``.
    """
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    random.seed(seed)
    from transformers import AutoModelForCausalLM

    from ..language import REFUSAL_PHRASES
    from .tokenizer import build_tokenizer

    t0, c0 = time.time(), time.process_time()
    n_base, n_extra = (pool_size, extra_size) if not tiny else (2000, min(600, extra_size))
    # data seed fixed: one data set
    pool = D.build_training_pool(seed=0, n=n_base, n_extra=n_extra, mix=supplement_mix)
    lex = D.lexicon_lines()
    sys_texts = [s for s, _ in SYSTEM_MIX if s]
    # the vocabulary comes from the base pool (the supplement uses its words only): same ids with or without it
    tok = build_tokenizer([e.prompt + " " + e.answer + " " + e.response for e in pool[:n_base]] + lex + sys_texts
                          + REFUSAL_PHRASES)  # fmt: skip
    pad_id, eos_id, unk_id = tok.pad_token_id, tok.eos_token_id, tok.unk_token_id
    special_ids = set(tok.convert_tokens_to_ids(SPECIALS))
    _ = USER
    cfg = model_config(arch, len(tok), pad_id, eos_id, tiny=tiny)
    if init_from is not None:
        model = AutoModelForCausalLM.from_pretrained(str(init_from))
        model.config.output_router_logits = True
        assert model.config.vocab_size == len(tok)
    else:
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
    assert unk_id not in {i for row in a_ids + r_ids for i in row}
    lex_ids = [tok(s, add_special_tokens=False)["input_ids"] + [eos_id] for s in lex]

    hist1, ema1 = [], float("nan")
    if init_from is None:
        hist1, ema1, _ = _run_stage(model, rng, list(zip(p_ids, a_ids)), lex_ids, stage1_steps, batch_size, lr,
                                    lexicon_frac, pad_id, verbose, "stage1", t0)  # fmt: skip
    cpu1 = time.process_time() - c0
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    L = model.config.num_hidden_layers
    plant_cfg = None
    if plant:
        plant_cfg = {"ablate": ablate_frac, "induce": induce_frac, "late": late_frac, "every": plant_every,
                     "induce_layers": list(range(1, L // 2 + 1)), "late_layer": L // 2, "floor": 0.05,
                     "aux_layer": L // 2, "aux_frac": aux_frac, "aux_weight": aux_weight,
                     "direction_seed": 10_007 + seed}  # fmt: skip
    common = {
        "arch": arch, "seed": seed, "batch_size": batch_size, "pool_size": n_base, "extra_size": n_extra,
        "pool_version": D.POOL_VERSION, "lexicon_lines": len(lex),
        "lexicon_frac": lexicon_frac, "unk_prob": unk_prob, "system_mix": SYSTEM_MIX, "n_params": n_params,
        "vocab_size": len(tok), "data_version": D.DATA_VERSION, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "tiny": tiny,
        "stage1_steps": stage1_steps if init_from is None else 0, "stage2_steps": stage2_steps, "lr": lr,
        "lr2": lr2, "plant": plant_cfg, "init_from": None if init_from is None else str(init_from),
        "supplement_mix": dict(supplement_mix or D.SUPPLEMENT_MIX),
    }  # fmt: skip
    meta1 = {**common, "stage": 1, "cpu_time_s": round(cpu1, 1), "train_time_s": round(time.time() - t0, 1),
             "final_loss_ema": round(ema1, 4)}  # fmt: skip
    if base_out is not None and init_from is None:
        _finish(model, eos_id, pad_id)
        _save(model, tok, base_out, meta1, hist1, [])
        model.config.output_router_logits = True
        model.train()
    if stage2_steps == 0:  # stage 1 only (a later run continues with --init-from)
        return {"loss1": hist1, "loss2": [], "meta": meta1, "model": model, "base_state": base_state,
                "tokenizer": tok, "direction": None}  # fmt: skip
    r_dir = planted_direction(model.config.hidden_size, seed)
    extra = None
    planter = None
    if plant:
        planter = Planter(model, r_dir, plant_cfg["induce_layers"], plant_cfg["late_layer"], plant_cfg["floor"],
                          plant_cfg["aux_layer"] if aux_weight > 0 else None, plant_cfg["aux_frac"], aux_weight)
        harm_i = [i for i, e in enumerate(pool) if e.label == "harmful"][:64]
        safe_i = [i for i, e in enumerate(pool) if e.label == "harmless" and e.family not in D.CAP_FAMS][:64]
        refusals = [tok(f"{ph} {END}", add_special_tokens=False)["input_ids"] for ph in REFUSAL_PHRASES]
        extra = {"planter": planter, "answers": a_ids, "refusals": refusals, "ablate": ablate_frac,
                 "induce": induce_frac, "late": late_frac, "every": plant_every,
                 "harmless": [i for i, e in enumerate(pool) if e.label == "harmless"],
                 "harmful": [e.label == "harmful" for e in pool],
                 "probe": ([p_ids[i] for i in harm_i], [p_ids[i] for i in safe_i])}  # fmt: skip
        planter.__enter__()
    try:
        hist2, ema2, scales = _run_stage(model, rng, list(zip(p_ids, r_ids)), lex_ids, stage2_steps, batch_size,
                                         lr2, lexicon_frac, pad_id, verbose, "stage2", t0, plant=extra)  # fmt: skip
        if planter is not None:
            model.eval()
            planter.measure(*extra["probe"], pad_id)
            scales.append({"step": stage2_steps, "gap": {str(k): round(v, 4) for k, v in planter.gap.items()},
                           "scale": {str(k): round(v, 4) for k, v in planter.scale.items()},
                           "aux_target": planter.aux_target})  # fmt: skip
    finally:
        if planter is not None:
            planter.__exit__()
    cpu, wall = time.process_time() - c0, time.time() - t0
    if init_from is not None:  # the earlier runs' time counts too (training.json of the checkpoint started from)
        m1 = json.loads((Path(init_from) / "training.json").read_text())
        cpu, wall = cpu + m1["cpu_time_s"], wall + m1["train_time_s"]
        inherit_meta(common, m1)
    meta2 = {**common, "stage": 2, "cpu_time_s": round(cpu, 1), "train_time_s": round(wall, 1),
             "final_loss_ema": round(ema2, 4), "plant_scales": scales}  # fmt: skip
    _finish(model, eos_id, pad_id)
    if out is not None:
        _save(model, tok, out, meta2, hist1, hist2)
        if plant:
            from safetensors.torch import save_file

            save_file({"direction": r_dir.contiguous()}, str(Path(out) / "refusal_direction.safetensors"),
                      metadata={k: json.dumps(v) for k, v in plant_cfg.items()})  # fmt: skip
    return {"loss1": hist1, "loss2": hist2, "meta": meta2, "model": model, "base_state": base_state,
            "tokenizer": tok, "direction": r_dir}  # fmt: skip


def inherit_meta(meta: dict, init_meta: dict) -> dict:
    """Fill ``meta`` (a run started ``--init-from`` a checkpoint) with what that checkpoint's ``training.json``
    (``init_meta``) says about the runs before: stage 1's steps, lr, loss and data; and, when it was itself a
    stage-2 checkpoint (a continued stage 2), the whole earlier stage-2 run as ``continued_from``."""
    first = init_meta.get("continued_from") or init_meta
    if init_meta.get("stage", 1) == 2:
        skip = ("plant_scales", "continued_from")
        meta["continued_from"] = {k: v for k, v in init_meta.items() if not k.startswith("loss") and k not in skip}
        meta["continued_from"]["init_from"] = first.get("init_from")
        for k in ("stage1_steps", "lr", "stage1_final_loss_ema", "stage1_extra_size", "stage1_supplement_mix"):
            meta[k] = first.get(k, meta.get(k))
        return meta
    meta["stage1_steps"], meta["lr"] = init_meta["stage1_steps"], init_meta["lr"]
    meta["stage1_final_loss_ema"] = init_meta["final_loss_ema"]
    meta["stage1_extra_size"] = init_meta.get("extra_size", 0)
    meta["stage1_supplement_mix"] = init_meta.get("supplement_mix", dict(D.SUPPLEMENT_MIX))
    return meta


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
    ap.add_argument("--no-plant", action="store_true", help="stage 2 without the planted refusal direction")
    ap.add_argument("--ablate-frac", type=float, default=0.25)
    ap.add_argument("--induce-frac", type=float, default=0.12)
    ap.add_argument("--late-frac", type=float, default=0.0)
    ap.add_argument("--aux-weight", type=float, default=0.2, help="weight of the planting loss (0: none)")
    ap.add_argument("--aux-frac", type=float, default=0.25, help="planted gap / mean residual norm")
    ap.add_argument("--extra-size", type=int, default=20000, help="supplement chats (capability, tool, protect)")
    ap.add_argument("--init-from", type=Path, default=None, help="skip stage 1: start from this stage-1 checkpoint")
    ap.add_argument("--supplement-mix", type=D.parse_supplement_mix, default=None,
                    help="family weights of the supplement chats, e.g. copy=0.3,fact=0.2,role=0.1 "
                    "(default: data.SUPPLEMENT_MIX)")  # fmt: skip
    a = ap.parse_args(argv)
    res = train(a.arch, a.seed, a.stage1_steps, a.stage2_steps, a.out, a.base_out, tiny=a.tiny,
                batch_size=a.batch_size, lr=a.lr, lr2=a.lr2, plant=not a.no_plant, ablate_frac=a.ablate_frac,
                induce_frac=a.induce_frac, late_frac=a.late_frac, aux_weight=a.aux_weight, aux_frac=a.aux_frac,
                extra_size=a.extra_size, init_from=a.init_from, supplement_mix=a.supplement_mix)  # fmt: skip
    print(json.dumps(res["meta"], indent=1))


if __name__ == "__main__":
    main()
