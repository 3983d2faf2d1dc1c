"""Tiny random models and an offline tokenizer, for tests, docs and quick experiments.

Every family in the address table has a tiny config (hidden 64, 2 layers, 8 experts, top-2,
vocab 256) that builds with ``from_config`` and runs on a CPU in milliseconds. Nothing is
downloaded. :func:`moe_census` lists the MoE causal-LM types of the installed transformers, which
``tests/test_coverage.py`` requires to be exact or refused, one case per type.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import cache

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from . import _tiny_configs

__all__ = [
    "TINY_CONFIGS", "tiny_config", "tiny_model", "tiny_tokenizer", "expert_forward", "MOE_FAMILIES", "DENSE_FAMILIES",
    "EXTRA_MOE_CONFIGS", "coverage_families", "CensusEntry", "moe_census", "census_status",
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

# Every other MoE causal-LM type of the census (tests/test_coverage.py): the same tiny shape.
# Scaling factors are set away from 1 so the tests see them.
_SCALES = dict(routed_scaling_factor=2.5)
_COVERAGE_OVERRIDES: dict[str, dict] = {
    "beam": {**_SCALES, "norm_topk_prob": True},
    # laguna's config calls it moe_routed_scaling_factor (routed_scaling_factor left the block's factor at 1.0)
    "laguna": {"moe_routed_scaling_factor": 2.5, "router_logit_softcapping": 3.0},
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

#: MoE types whose tiny configs needed care (hybrid Mamba state sizes, DSA indexers, DBRX's nested configs and
#: its broken defaults in 5.24, Gemma-4's multimodal wrapper without vision and audio towers), or that share
#: another family's tiny shape.
EXTRA_MOE_CONFIGS: dict[str, dict] = {
    "granitemoehybrid": {
        **_COMMON, **_MOE, "residual_multiplier": 0.5, "shared_intermediate_size": 64,
        "layer_types": ["mamba", "attention"], "mamba_d_state": 16, "mamba_n_heads": 4, "mamba_d_head": 32,
        "mamba_n_groups": 1, "mamba_expand": 2,
    },
    # MLA models of DeepSeek-V3's tiny shape; the DSA indexers (2 heads of 16) keep 4 keys, so 6-token prompts are
    # sparse
    "sarvam_mla": TINY_CONFIGS["deepseek_v3"],
    # DeepSeek-V3 routing with grouped attention (GLM-4-MoE's modeling, MiniCPM5-MoE)
    **{name: {**_COMMON, **_MOE, "n_routed_experts": 8, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
              "routed_scaling_factor": 2.5, "norm_topk_prob": True, "first_k_dense_replace": 1}
       for name in ("param2moe", "sarvam_moe", "minicpm5_moe")},
    **{name: {**TINY_CONFIGS["deepseek_v3"], "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4}
       for name in ("deepseek_v32", "glm_moe_dsa", "axk2")},
    "gemma4": {"text_config": TINY_CONFIGS["gemma4_text"], "vision_config": None, "audio_config": None},
    "dbrx": {
        "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256, "vocab_size": 256,
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
        "attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0, "kv_n_heads": 2},
    },
}
TINY_CONFIGS.update(EXTRA_MOE_CONFIGS)


# Config keys that only MoE configs carry (also inside nested configs: DBRX's ffn_config, text towers).
_MOE_KEY = re.compile(r"num_experts|n_routed_experts|num_local_experts|moe_num_experts|num_experts_per_tok|"
                      r"experts_per_token|moe_intermediate")


@dataclass(frozen=True)
class CensusEntry:
    """One MoE causal-LM type of the installed transformers (see :func:`moe_census`).

    Attributes:
        model_type: The ``config.model_type``.
        causal_lm: The class ``AutoModelForCausalLM`` builds for it.
        text_tower: For a multimodal config, the ``model_type`` of its text config (``None`` otherwise).
        builds_tower: ``AutoModelForCausalLM`` builds the text tower's own model for this config (the class's
            ``config_class`` is the tower's), so the tower's table or refusal is this type's too.

    Example:
        >>> from expertlens.testing import moe_census
        >>> entry = next(e for e in moe_census() if e.model_type == "llama4")
        >>> entry.text_tower, entry.builds_tower
        ('llama4_text', True)
    """

    model_type: str
    causal_lm: str
    text_tower: str | None = None
    builds_tower: bool = False


def _has_moe_keys(obj) -> bool:
    if isinstance(obj, dict):
        return any(_MOE_KEY.search(str(k)) or _has_moe_keys(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_moe_keys(v) for v in obj)
    return False


def _class_fields(cls) -> dict:
    """Field names of a config class and of its concrete sub-config classes (no instance needed)."""
    fields = dict.fromkeys(getattr(cls, "__dataclass_fields__", {}))
    for sub in (getattr(cls, "sub_configs", None) or {}).values():
        fields.update(dict.fromkeys(getattr(sub, "__dataclass_fields__", {})))
    return fields


@cache
def moe_census() -> tuple[CensusEntry, ...]:
    """Every MoE causal-LM type of the installed transformers, sorted by ``model_type``.

    A type is one of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` whose default config (nested configs included) has
    an MoE key (``num_experts``, ``n_routed_experts``, ``num_local_experts``, ``moe_num_experts``,
    ``num_experts_per_tok``, ``experts_per_token``, ``moe_intermediate*``). MoE-capable types whose defaults
    are dense (``gemma4_text``'s ``enable_moe_block``, ``doge``'s ``is_moe``) count: a checkpoint can turn
    experts on. Where the default config does not validate (``gemma4_assistant``), its class's fields decide.
    Multimodal-only types (image-text-to-text, not in the causal-LM mapping) are outside the census.

    Example:
        >>> from expertlens.testing import moe_census
        >>> types = {e.model_type for e in moe_census()}
        >>> {"mixtral", "deepseek_v3", "qwen3_moe"} <= types and "llama" not in types
        True
    """
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found: dict[str, object] = {}
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if model_type not in CONFIG_MAPPING:
            continue
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:  # noqa: BLE001 (a default that fails validation: judge the class's fields)
            if _has_moe_keys(_class_fields(CONFIG_MAPPING[model_type])):
                found[model_type] = None
            continue
        if _has_moe_keys(config.to_dict()):
            found[model_type] = config
    entries = []
    for model_type, config in sorted(found.items()):
        cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        text = config.get_text_config() if config is not None else None
        tower = text.model_type if text is not None and text is not config else None
        cls = getattr(transformers, cls_name, None)
        builds = tower is not None and getattr(getattr(cls, "config_class", None), "model_type", None) == tower
        entries.append(CensusEntry(model_type, cls_name, tower, builds))
    return tuple(entries)


def census_status(model_type: str) -> tuple[str, str]:
    """How expertlens handles one census type: ``(status, detail)``.

    ``("exact", family)``: an address table; ``("refused", reason)``: ``REFUSED``'s structural reason;
    ``("text tower", tower)``: the causal LM built for it is its text tower's model (the tower's status
    applies); ``("unknown", message)``: neither, which ``tests/test_coverage.py`` fails on.

    Example:
        >>> from expertlens.testing import census_status
        >>> census_status("mixtral"), census_status("qwen3_5_moe")
        (('exact', 'mixtral'), ('text tower', 'qwen3_5_moe_text'))
        >>> census_status("jetmoe")[0]
        'refused'
    """
    from .families import _REGISTRY, REFUSED

    spec = next((s for s in _REGISTRY.values() if s.matches(model_type)), None)
    if spec is not None and spec.is_moe:
        return "exact", spec.name
    if model_type in REFUSED:
        return "refused", REFUSED[model_type]
    entry = next((e for e in moe_census() if e.model_type == model_type), None)
    if entry is not None and entry.builds_tower:
        return "text tower", entry.text_tower
    return "unknown", (
        f"MoE causal-LM type {model_type!r} has neither an address table nor a structural reason: add its tiny "
        "config to expertlens/_tiny_configs.py and a FamilySpec (or a REFUSED reason) to expertlens/families.py"
    )


def coverage_families() -> tuple[str, ...]:
    """Every census type with a tiny config and an address table (sorted).

    Example:
        >>> from expertlens.testing import coverage_families
        >>> "qwen3_5_moe_text" in coverage_families() and "jetmoe" not in coverage_families()
        True
    """
    types = sorted(e.model_type for e in moe_census())
    return tuple(t for t in types if t in TINY_CONFIGS and census_status(t)[0] == "exact")


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
