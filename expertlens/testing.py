"""Tiny random models and an offline tokenizer, for tests, docs and quick experiments.

Every family in the address table has a tiny config (hidden 64, 2 layers, 8 experts, top-2,
vocab 256) that builds with ``from_config`` and runs on a CPU in milliseconds. Nothing is
downloaded.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from . import _tiny_configs

__all__ = [
    "TINY_CONFIGS", "tiny_config", "tiny_model", "tiny_tokenizer", "expert_forward", "MOE_FAMILIES", "DENSE_FAMILIES",
    "ALL_MOE_TYPES", "EXTRA_MOE_CONFIGS", "coverage_families",
]

_COMMON = dict(
    bos_token_id=1, eos_token_id=2, pad_token_id=0, vocab_size=256, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=256, tie_word_embeddings=False,
)
_MOE = dict(num_experts=8, num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
_MLA = dict(
    head_dim=8, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, num_key_value_heads=4, first_k_dense_replace=1,
)

#: Keyword arguments for ``AutoConfig.for_model(family, **kwargs)``, per family.
TINY_CONFIGS: dict[str, dict] = {
    "mixtral": {**_COMMON, **_MOE},
    "minimax": {**_COMMON, **_MOE, "block_size": 16, "layer_types": ["linear_attention", "full_attention"]},
    "olmoe": {**_COMMON, **_MOE, "norm_topk_prob": True},
    "qwen3_moe": {**_COMMON, **_MOE, "norm_topk_prob": True},
    "qwen2_moe": {**_COMMON, **_MOE, "norm_topk_prob": True, "shared_expert_intermediate_size": 64},
    "qwen3_next": {
        **_COMMON, **_MOE, "norm_topk_prob": True, "shared_expert_intermediate_size": 64,
        "layer_types": ["linear_attention", "full_attention"], "linear_key_head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_value_head_dim": 16,
    },
    "flex_olmo": {**_COMMON, **_MOE, "norm_topk_prob": True},
    "deepseek_v2": {
        **_COMMON, **_MOE, **_MLA, "n_group": 2, "topk_group": 1, "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 1.0,
    },
    "deepseek_v3": {
        **_COMMON, **_MOE, **_MLA, "n_group": 2, "topk_group": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    },
    "glm4_moe": {
        **_COMMON, **_MOE, **_MLA, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
    },
    "gpt_oss": {
        **_COMMON, **_MOE, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "granitemoe": {**_COMMON, **_MOE},
    "phimoe": {**_COMMON, **_MOE},
    "ernie4_5_moe": {
        **_COMMON, "moe_intermediate_size": 32, "moe_k": 2, "moe_num_experts": 8, "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1, "moe_layer_end_index": 1,
    },
    "hunyuan_v1_moe": {**_COMMON, "num_experts": 8, "moe_topk": 2, "moe_intermediate_size": 32},
    "llama": dict(_COMMON),
    "qwen2": dict(_COMMON),
}

DENSE_FAMILIES = ("llama", "qwen2")
#: The families most tests run on (the original address tables).
MOE_FAMILIES = tuple(f for f in TINY_CONFIGS if f not in DENSE_FAMILIES)

# Every other text MoE causal-LM type of transformers 5.24 (tests/test_coverage.py): the same tiny shape.
# Scaling factors are set away from 1 so the tests see them.
_SCALES = dict(routed_scaling_factor=2.5)
_COVERAGE_OVERRIDES: dict[str, dict] = {
    "beam": {**_SCALES, "norm_topk_prob": True},
    "laguna": {**_SCALES, "router_logit_softcapping": 3.0},
    "minimax_m3_vl_text": _SCALES,
    "hy_v3": {"router_scaling_factor": 2.5},
    "afmoe": {"route_scale": 2.5},
    "lfm2_moe": {**_SCALES, "norm_topk_prob": True, "use_expert_bias": True},
    # inkling2's defaults carry a 200k unpadded vocabulary and 48 sliding-window heads of 128
    **{
        name: {**_SCALES, "unpadded_vocab_size": 256, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
               "swa_head_dim": 16}
        for name in ("inkling2_text", "inkling2_loop_text")
    },
    # MLA attention generates only with as many key/value heads as query heads
    **{name: {"num_key_value_heads": 4} for name in ("axk1", "bailing_hybrid", "glm4_moe_lite", "kimi_linear")},
    # dots3_note_text's sparse-attention indexer defaults to 64 heads of 128
    # and its sliding-window layers to 64 MLA heads of 256 (per_layer_config)
    "dots3_note_text": {
        "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4, "shared_experts_intermediate_size": 64,
        "per_layer_config": {"1": {"num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32,
                                   "kv_lora_rank": 16, "head_dim": 16, "qk_nope_head_dim": 8, "v_head_dim": 16,
                                   "qk_rope_head_dim": 8}},
    },
    # longcat_flash counts layers in num_layers (28 by default) and adds 256 zero-computation experts
    "longcat_flash": {"num_layers": 2, "zero_expert_num": 2},
    # kimi_linear's defaults give its KDA layers 32 heads of 128 (2 s a forward on a CPU)
    "kimi_linear": {"num_key_value_heads": 4, "linear_num_heads": 4, "linear_head_dim": 16},
    **{name: {"residual_multiplier": 0.5} for name in ("granitemoeshared", "granitemoe_swa")},
    "kolibri1": {"norm_topk_prob": True},
    "flint": {"norm_topk_prob": True},
    "cohere2_moe": {"norm_topk_prob": True},
}
for _name, _cfg in _tiny_configs.COVERAGE_CONFIGS.items():
    if _name not in TINY_CONFIGS:
        TINY_CONFIGS[_name] = {**_cfg, **_COVERAGE_OVERRIDES.get(_name, {})}

#: Every text MoE causal-LM type with a tiny config, supported or refused (``REFUSED``).
ALL_MOE_TYPES = tuple(sorted(_tiny_configs.COVERAGE_CONFIGS))

#: MoE types outside those 54 whose tiny configs needed care (hybrid Mamba state sizes, DSA indexer, DBRX's
#: nested configs and its broken defaults in 5.24).
EXTRA_MOE_CONFIGS: dict[str, dict] = {
    "granitemoehybrid": {
        **_COMMON, **_MOE, "residual_multiplier": 0.5, "shared_intermediate_size": 64,
        "layer_types": ["mamba", "attention"], "mamba_d_state": 16, "mamba_n_heads": 4, "mamba_d_head": 32,
        "mamba_n_groups": 1, "mamba_expand": 2,
    },
    "deepseek_v32": {**TINY_CONFIGS["deepseek_v3"], "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4},
    "dbrx": {
        "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256, "vocab_size": 256,
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
        "attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0, "kv_n_heads": 2},
    },
}
TINY_CONFIGS.update(EXTRA_MOE_CONFIGS)


def coverage_families() -> tuple[str, ...]:
    """Every text MoE ``model_type`` with a tiny config that an address table supports (sorted).

    Example:
        >>> from expertlens.testing import coverage_families
        >>> "qwen3_5_moe_text" in coverage_families() and "jetmoe" not in coverage_families()
        True
    """
    from .families import REFUSED, resolve_family

    out = []
    for name in sorted((*ALL_MOE_TYPES, *EXTRA_MOE_CONFIGS)):
        if name in REFUSED:
            continue
        try:
            resolve_family(name)
        except ValueError:
            continue
        out.append(name)
    return tuple(out)


def tiny_config(family: str, **overrides):
    """The tiny config of a family (``AutoConfig.for_model``), with optional overrides.

    Example:
        >>> from expertlens.testing import tiny_config
        >>> tiny_config("mixtral", num_hidden_layers=3).num_hidden_layers
        3
    """
    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; known: {sorted(TINY_CONFIGS)}")
    return AutoConfig.for_model(family, **{**copy.deepcopy(TINY_CONFIGS[family]), **overrides})


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A tiny randomly initialised model of ``family`` in eval mode.

    Router and expert weights are re-drawn with a larger scale so routing is not uniform and
    expert outputs are not vanishingly small (default HF init makes both degenerate).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("deepseek_v3"), tiny_tokenizer())
        >>> model.moe_layers   # deepseek_v3's tiny config has one dense prefix layer
        [1]
    """
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and any(k in name for k in ("gate_up_proj", "down_proj", "up_proj", "gate")):
                param.copy_((torch.randn(param.shape, generator=gen) * 0.2).to(param.dtype))
            if "bias" in name and param.dim() <= 2:
                param.copy_((torch.randn(param.shape, generator=gen) * 0.1).to(param.dtype))
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (ids < 100) that needs no files, with a chat template.

    Example:
        >>> from expertlens.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> chat = [{"role": "user", "content": "hi"}]
        >>> text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        >>> text.split()
        ['U:hi', 'A:']
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(i) for i in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'][0] | upper }}:{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    return tok


from .instrument import expert_forward  # noqa: E402,F401  (re-exported for tests)
