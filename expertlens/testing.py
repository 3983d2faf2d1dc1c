"""Tiny random models and an offline tokenizer, for tests, docs and quick experiments.

Every family in the address table has a tiny config (hidden 64, 2 layers, 8 experts, top-2,
vocab 256) that builds with ``from_config`` and runs on a CPU in milliseconds. Nothing is
downloaded.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "TINY_CONFIGS", "tiny_config", "tiny_model", "tiny_tokenizer", "expert_forward", "MOE_FAMILIES", "DENSE_FAMILIES",
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
MOE_FAMILIES = tuple(f for f in TINY_CONFIGS if f not in DENSE_FAMILIES)


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
