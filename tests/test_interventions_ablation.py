"""Directional ablation: orthogonality of every residual write, equivalence with weight
orthogonalisation, bit-identical restore, pathway restrictions."""

from __future__ import annotations

import functools

import nnsight
import pytest
import torch

from expertlens import Direction, ExpertModel
from expertlens.interventions import AblateDirection, OrthogonalizeWeights, run_logits
from expertlens.testing import tiny_model, tiny_tokenizer

torch.set_num_threads(1)
PROMPTS = ["hello there", "hi", "a b c d e f"]
# pre-norm MoE families covering: plain (mixtral, olmoe), shared experts + sigmoid gate (qwen2_moe),
# shared + dense layer 0 (deepseek_v3), o_proj bias + transposed experts with biases (gpt_oss),
# linear attention out_proj (qwen3_next), shared_mlp (hunyuan), scaled residual (granitemoe), dense.
EQUIV = [
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "deepseek_v3",
    "gpt_oss",
    "qwen3_next",
    "hunyuan_v1_moe",
    "granitemoe",
    "ernie4_5_moe",
    "llama",
]


@functools.cache
def get_model(family: str) -> ExpertModel:
    return ExpertModel(tiny_model(family), tiny_tokenizer())


def direction(seed: int = 0) -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 3


def writes(model: ExpertModel, prompts=PROMPTS):
    with torch.no_grad(), model.trace(prompts):
        embed = model.embed.save()
        rows = nnsight.save([])
        for i in range(model.n_layers):
            layer = model.layers[i]
            rows.append((layer.resid_pre, layer.attn_write, layer.mlp_write, layer.resid_post))
        logits = model.logits.save()
    return embed, rows, logits


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_every_residual_write_is_orthogonal(family):
    model = get_model(family)
    r = direction(1)
    rhat = r / r.norm()
    _, base_rows, _ = writes(model)
    assert float((base_rows[0][2] @ rhat).abs().max()) > 1e-2  # the check can fail
    with model.intervene(AblateDirection(Direction(r))):
        embed, rows, _ = writes(model)
    for i, row in enumerate(rows):
        for name, x in zip(("resid_pre", "attn_write", "mlp_write", "resid_post"), row):
            assert float((x @ rhat).abs().max()) < 1e-5, (i, name)
    assert float((embed @ rhat).abs().max()) > 1e-3  # "embed" not in the default writes: raw embedding
    with model.intervene(AblateDirection(r, writes=("embed", "attn", "mlp"))):
        embed, rows, _ = writes(model)
    assert float((embed @ rhat).abs().max()) < 1e-5
    assert all(float((x @ rhat).abs().max()) < 1e-5 for row in rows for x in row)
    assert model.n_edits() == 0


@pytest.mark.parametrize("family", EQUIV)
def test_ablation_equals_weight_orthogonalisation_and_restore_is_exact(family):
    model = get_model(family)
    r = direction(2)
    original = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    base = run_logits(model, PROMPTS, last_only=False)
    ablated = run_logits(model, PROMPTS, [AblateDirection(r)], last_only=False)
    embed_too = run_logits(model, PROMPTS, [AblateDirection(r, writes=("embed", "attn", "mlp"))], last_only=False)
    handle = OrthogonalizeWeights(r).apply(model)
    try:
        rhat = (r / r.norm()).float()
        emb = model.hf_model.get_input_embeddings().weight
        assert float((emb.detach() @ rhat).abs().max()) < 1e-5
        ortho = run_logits(model, PROMPTS, last_only=False)
    finally:
        handle.remove()
    for a, b, c, o in zip(base, ablated, embed_too, ortho):
        assert float((a - b).abs().max()) > 1e-3
        assert torch.allclose(b, o, atol=1e-4) and torch.allclose(c, o, atol=1e-4)
    state = model.hf_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    assert not handle.active
    handle.remove()  # idempotent
    assert all(torch.equal(state[k], v) for k, v in original.items())


def test_orthogonalize_in_intervene_restores_on_exit_and_on_error():
    model = get_model("gpt_oss")
    original = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    r = direction(3)
    with model.intervene(OrthogonalizeWeights(r)):
        changed = model.hf_model.state_dict()
        for name in (
            "model.layers.0.mlp.experts.down_proj",
            "model.layers.0.mlp.experts.down_proj_bias",
            "model.layers.1.self_attn.o_proj.bias",
            "model.embed_tokens.weight",
        ):
            assert not torch.equal(changed[name], original[name]), name
        down = changed["model.layers.0.mlp.experts.down_proj"]  # [E, I, d] (transposed layout)
        assert float((down @ (r / r.norm())).abs().max()) < 1e-5
    assert all(torch.equal(model.hf_model.state_dict()[k], v) for k, v in original.items())
    with pytest.raises(RuntimeError, match="boom"):
        with model.intervene(OrthogonalizeWeights(r)):
            raise RuntimeError("boom")
    assert all(torch.equal(model.hf_model.state_dict()[k], v) for k, v in original.items())


@pytest.mark.parametrize("family, why", [("flex_olmo", "post-norm"), ("minimax", "normed residual")])
def test_orthogonalize_refuses_families_where_it_is_not_equivalent(family, why):
    model = get_model(family)
    original = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    with pytest.raises(ValueError, match=why):
        OrthogonalizeWeights(direction()).apply(model)
    assert all(torch.equal(model.hf_model.state_dict()[k], v) for k, v in original.items())
    # the activation version still works there
    r = direction(4)
    with model.intervene(AblateDirection(r)):
        _, rows, _ = writes(model)
    assert all(float((x @ (r / r.norm())).abs().max()) < 1e-5 for row in rows for x in row[1:3])


def test_pathway_ablations():
    model = get_model("qwen2_moe")
    r = direction(5)
    rhat = r / r.norm()
    for only, zero, nonzero in (("attn", 1, 2), ("mlp", 2, 1)):
        with model.intervene(AblateDirection(r, writes=(only,))):
            _, rows, _ = writes(model)
        for row in rows:
            assert float((row[zero] @ rhat).abs().max()) < 1e-5
            assert float((row[nonzero] @ rhat).abs().max()) > 1e-3
    # layer-restricted ablation only touches the chosen layer
    _, base_rows, _ = writes(model)
    with model.intervene(AblateDirection(r, writes=("attn",), layers=1)):
        _, rows, _ = writes(model)
    assert torch.equal(rows[0][1], base_rows[0][1])
    assert float((rows[1][1] @ rhat).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="accepted are"):
        with model.intervene(AblateDirection(r, writes=("ffn",))):
            pass
    with pytest.raises(ValueError, match="zero vector"):
        with model.intervene(AblateDirection(torch.zeros(64))):
            pass
    assert model.n_edits() == 0
