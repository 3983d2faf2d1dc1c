"""ExpertModel points: exact identities on tiny models of every family."""

from __future__ import annotations

import nnsight
import pytest
import torch

from expertlens import ExpertModel, PointError
from expertlens.testing import MOE_FAMILIES, expert_forward, tiny_model, tiny_tokenizer

from .conftest import ALL_FAMILIES, PRE_NORM_MOE, make_ids


def _moe_rows(model: ExpertModel, ids: torch.Tensor) -> list[dict]:
    with torch.no_grad(), model.trace(ids):
        rows = []
        for i in model.moe_layers:
            moe = model.layers[i].moe
            row = dict(
                x=moe.input,
                logits=moe.router_logits,
                probs=moe.router_probs,
                idx=moe.topk_indices,
                w=moe.topk_weights,
                eo=moe.expert_out,
            )
            row["shared"] = moe.shared_out
            row["out"] = moe.output
            rows.append(row)
        rows = nnsight.save(rows)
    return rows


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_no_edit_trace_is_bit_identical_to_unwrapped_model(family):
    hf = tiny_model(family)
    ids = make_ids()
    with torch.no_grad():
        reference = hf(ids).logits
    implementation = hf.config._experts_implementation
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    model = ExpertModel(hf, tiny_tokenizer())
    with torch.no_grad(), model.trace(ids):
        logits = model.logits.save()
    assert torch.equal(logits, reference)
    # wrapping changed no parameter, no buffer and no state_dict key
    after = hf.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    if model.moe_layers:
        assert hf.config._experts_implementation == "expertlens"
    model.restore()
    assert hf.config._experts_implementation == implementation
    assert not any("el_" in name for name, _ in hf.named_modules())
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, reference)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_bf16_matches_grouped_mm_bit_for_bit(family):
    hf = tiny_model(family, dtype=torch.bfloat16)
    ids = make_ids()
    with torch.no_grad():
        reference = hf(ids).logits
    model = ExpertModel(hf, tiny_tokenizer())
    with torch.no_grad(), model.trace(ids):
        w = model.layers[-1].moe.topk_weights.save()
        eo = model.layers[-1].moe.expert_out.save()
        out = model.layers[-1].moe.output.save()
        logits = model.logits.save()
    assert torch.equal(logits, reference)
    recon = (eo.float() * w.float().unsqueeze(-1)).sum(-2)
    if model.spec.shared is None:
        torch.testing.assert_close(recon, out.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_weighted_expert_outputs_plus_shared_equal_moe_output(family, wrapped):
    model = wrapped(family)
    for row in _moe_rows(model, make_ids()):
        b, p = row["x"].shape[:2]
        assert row["logits"].shape == (b, p, model.n_experts)
        assert row["idx"].shape == row["w"].shape == (b, p, model.top_k)
        assert row["eo"].shape == (b, p, model.top_k, model.d_model)
        recon = (row["eo"] * row["w"].unsqueeze(-1).to(row["eo"].dtype)).sum(-2)
        if model.spec.shared is not None:
            assert row["shared"].shape == (b, p, model.d_model)
            recon = recon + row["shared"]
        else:
            assert row["shared"] is None
        torch.testing.assert_close(recon, row["out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routing_recomputed_from_logits_by_family_rule(family, wrapped):
    model = wrapped(family)
    for layer, row in zip(model.moe_layers, _moe_rows(model, make_ids())):
        router = model.hf_model.get_submodule(model.layout[layer].router)
        flat = row["logits"].reshape(-1, model.n_experts)
        w_ref, idx_ref = model.spec.rule.route(flat, router)
        idx = row["idx"].reshape(-1, model.top_k)
        w = row["w"].reshape(-1, model.top_k)
        order, order_ref = idx.argsort(-1), idx_ref.argsort(-1)
        assert torch.equal(idx.gather(-1, order), idx_ref.gather(-1, order_ref))
        torch.testing.assert_close(w.gather(-1, order).float(), w_ref.gather(-1, order_ref).float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(row["probs"], model.spec.rule.probs(row["logits"], router))


def _expected_output(model, layer, x, logits, shared):
    """Hand computation of the MoE output from (edited) logits: rule routing + reference experts."""
    router = model.hf_model.get_submodule(model.layout[layer].router)
    experts = model.hf_model.get_submodule(model.layout[layer].experts)
    flat_x = x.reshape(-1, model.d_model)
    w, idx = model.spec.rule.route(logits.reshape(-1, model.n_experts), router)
    out = torch.zeros_like(flat_x)
    for t in range(flat_x.shape[0]):
        for s in range(idx.shape[1]):
            out[t] += w[t, s].to(out.dtype) * expert_forward(experts, flat_x[t : t + 1], int(idx[t, s]))[0]
    out = out.reshape(x.shape)
    return out + shared if shared is not None else out, idx


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("edit", ["force", "mask"])
def test_router_logit_edits_change_selection_and_output_as_predicted(family, edit, wrapped):
    model = wrapped(family)
    layer, expert = model.moe_layers[-1], 3
    ids = make_ids(1, 6)
    shared = None
    with torch.no_grad(), model.trace(ids):
        moe = model.layers[layer].moe
        x = moe.input.save()
        if edit == "force":
            moe.router_logits[..., expert] += 100.0
        else:
            moe.router_logits[..., expert] = float("-inf")
        logits = moe.router_logits.save()
        idx = moe.topk_indices.save()
        if moe.has_shared:
            shared = moe.shared_out.save()
        out = moe.output.save()
    selected = (idx == expert).any(-1)
    router = model.hf_model.get_submodule(model.layout[layer].router)
    group_limited = getattr(router, "topk_group", None) not in (None, getattr(router, "num_group", None))
    if edit == "force" and not group_limited:
        assert selected.all()
    elif edit == "force":
        # DeepSeek-V3-style group routing keeps only the best groups (sum of each group's top-2
        # scores), so a huge logit selects e only where its group survives: the hand
        # computation below checks exactly that.
        assert selected.any()
    else:
        assert not selected.any()
    expected, expected_idx = _expected_output(model, layer, x, logits, shared)
    assert torch.equal(expected_idx.sort(-1).values, idx.reshape(-1, model.top_k).sort(-1).values)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "glm4_moe"])
def test_plus_100_selects_everywhere_without_a_group_limit(family):
    """With every group allowed (topk_group == n_group) +100 puts the expert in every token's top-k."""
    n_group = 2 if family != "glm4_moe" else 1
    model = ExpertModel(tiny_model(family, n_group=n_group, topk_group=n_group), tiny_tokenizer())
    layer = model.moe_layers[-1]
    with torch.no_grad(), model.trace(make_ids()):
        model.layers[layer].moe.router_logits[..., 6] += 100.0
        idx = model.layers[layer].moe.topk_indices.save()
    assert (idx == 6).any(-1).all()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_heads_sum_to_attention_output(family, wrapped):
    model = wrapped(family)
    layer = model.n_layers - 1
    with torch.no_grad(), model.trace(make_ids()):
        z = model.layers[layer].attn.z.save()
        heads = model.layers[layer].attn.head_out.save()
        out = model.layers[layer].attn.output.save()
    attn = model.layers[layer].attn
    assert z.shape[-2:] == (attn.n_heads, attn.d_head)
    assert heads.shape[-2:] == (attn.n_heads, model.d_model)
    total = heads.sum(-2)
    if attn.o_bias is not None:
        total = total + attn.o_bias
    torch.testing.assert_close(total, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", PRE_NORM_MOE + ("llama", "qwen2"))
def test_residual_identities(family, wrapped):
    model = wrapped(family)
    with torch.no_grad(), model.trace(make_ids()):
        rows = []
        for layer in model.layers:
            rows.append((layer.resid_pre, layer.attn.output, layer.resid_mid, layer.mlp.output, layer.resid_post))
        rows = nnsight.save(rows)
    for pre, attn, mid, mlp, post in rows:
        assert torch.equal(pre + attn, mid)
        assert torch.equal(mid + mlp, post)


def test_resid_mid_write_reaches_the_residual_stream(wrapped):
    model = wrapped("olmoe")
    ids = make_ids()
    with torch.no_grad(), model.trace(ids):
        model.layers[0].resid_mid = torch.zeros(model.d_model)
        mid = model.layers[0].resid_mid.save()
        mlp = model.layers[0].mlp.output.save()
        post = model.layers[0].resid_post.save()
    assert torch.count_nonzero(mid) == 0
    assert torch.equal(post, mlp)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_edit_in_one_invoke_leaves_the_other_bit_identical(family, wrapped):
    model = wrapped(family)
    a, b = "hello there, friend", "hi"
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(a):
            clean_a = model.logits.save()
        with tracer.invoke(b):
            clean_b = model.logits.save()
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(a):
            edited_a = model.logits.save()
        with tracer.invoke(b):
            model.layers[0].moe.router_logits[..., 1] += 50
            model.layers[0].moe.expert_out[:] = 0
            edited_b = model.logits.save()
    # A routing edit in B changes how many tokens each expert's grouped GEMM handles, and the
    # GEMM kernel's blocking depends on that count: A's values may move in the last bits.
    torch.testing.assert_close(clean_a, edited_a, atol=1e-6, rtol=0)
    assert not torch.equal(clean_b, edited_b)
    # Edits that leave every expert's token count alone leave the other invoke bit-identical.
    last = model.n_layers - 1
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(a):
            edited_a = model.logits.save()
        with tracer.invoke(b):
            model.layers[last].moe.expert_out[:] = 0
            model.layers[last].resid_post[:] += 1
            model.logits[:] = 0
            edited_b = model.logits.save()
    assert torch.equal(clean_a, edited_a)
    assert not torch.equal(clean_b, edited_b)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_points_exist_at_every_generation_step(family, wrapped):
    model = wrapped(family)
    layer, steps = model.moe_layers[-1], 4
    with torch.no_grad(), model.generate(["hello", "hi there"], max_new_tokens=steps, do_sample=False) as tracer:
        shapes = nnsight.save([])
        for _ in tracer.iter[:steps]:
            moe = model.layers[layer].moe
            shapes.append((tuple(moe.router_logits.shape), tuple(moe.expert_out.shape)))
    assert len(shapes) == steps
    prompt_len = shapes[0][0][1]
    assert prompt_len > 1
    assert all(s[0] == (2, 1, model.n_experts) and s[1] == (2, 1, model.top_k, model.d_model) for s in shapes[1:])


def test_single_expert_point(wrapped):
    model = wrapped("qwen3_moe")
    ids = make_ids(2, 9)
    with torch.no_grad(), model.trace(ids):
        idx = model.layers[0].moe.topk_indices.save()
        eo = model.layers[0].moe.expert_out.save()
    with torch.no_grad(), model.trace(ids):
        rows = nnsight.save([model.layers[0].moe.experts[e].output for e in range(model.n_experts)])
    assert sum(r.shape[0] for r in rows) == idx.numel()
    for e, r in enumerate(rows):
        assert torch.equal(r, eo[idx == e])
    # an expert that never fired gives an explicit empty [0, d] result, not an nnsight error
    with torch.no_grad(), model.trace(ids):
        model.layers[0].moe.router_logits[..., 5] = float("-inf")
        never = model.layers[0].moe.experts[5].output.save()
    assert never.shape == (0, model.d_model)


def test_single_expert_write(wrapped):
    model = wrapped("olmoe")
    ids = make_ids(1, 8)
    with torch.no_grad(), model.trace(ids):
        idx = model.layers[1].moe.topk_indices.save()
        w = model.layers[1].moe.topk_weights.save()
        eo = model.layers[1].moe.expert_out.save()
        base = model.layers[1].moe.output.save()
    e = int(idx[0, 0, 0])
    with torch.no_grad(), model.trace(ids):
        point = model.layers[1].moe.experts[e]
        point.output = point.output * 0
        out = model.layers[1].moe.output.save()
    mask = (idx == e).unsqueeze(-1)
    expected = base - (eo * w.unsqueeze(-1) * mask).sum(-2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_attributes(wrapped):
    model = wrapped("deepseek_v3")
    assert (model.n_layers, model.moe_layers, model.n_experts, model.top_k) == (2, [1], 8, 2)
    assert (model.d_model, model.family) == (64, "deepseek_v3")
    assert model.n_heads * model.d_head == model.hf_model.model.layers[0].self_attn.o_proj.in_features
    assert "deepseek_v3" in repr(model)


# ---- errors ---------------------------------------------------------------------------------


def _assert_clean(model: ExpertModel, implementation: str = "expertlens"):
    assert model.n_edits() == 0
    assert model.hf_model.config._experts_implementation == implementation
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf_model.modules())
    assert hooks == 2  # the step tracker (pre- and post-hook) on the top module, nothing else


def test_layer_and_expert_out_of_range_and_dense_layer(wrapped):
    model = wrapped("deepseek_v3")
    with pytest.raises(PointError, match=r"layer 5 out of range: the model has 2 layers \(0..1\)"):
        model.layers[5]
    with pytest.raises(PointError, match=r"expert 8 out of range: layer 1 has 8 routed experts \(0..7\)"):
        model.layers[1].moe.experts[8]
    with pytest.raises(PointError, match=r"layer 0 of this deepseek_v3 model is a dense layer.*MoE layers are \[1\]"):
        model.layers[0].moe
    with pytest.raises(PointError, match="unknown or read-only point 'moe.router_prob'"):
        model.add_edit("moe.router_prob", lambda x, c: x, layer=1)
    with pytest.raises(PointError, match="read-only point 'moe.experts.mask' .derived from topk_indices"):
        model.add_edit("moe.experts.mask", lambda x, c: x, layer=1, expert=0)
    with pytest.raises(PointError, match="per expert: pass expert="):
        model.add_edit("moe.experts.output", lambda x, c: x, layer=1)
    with pytest.raises(PointError, match="dense layer"):
        model.add_edit("moe.router_logits", lambda x, c: x, layer=0)
    _assert_clean(model)
    with torch.no_grad(), model.trace(make_ids()):
        out = model.logits.save()
    assert out.shape[-1] == model.vocab_size


def test_dense_family_has_no_moe_points(wrapped):
    model = wrapped("llama")
    assert model.moe_layers == [] and model.n_experts == 0
    with pytest.raises(PointError, match="dense family"):
        model.layers[0].moe


def test_unknown_family_error_lists_supported_and_how_to_register():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    hf = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"no address table for model family 'gpt2'.*mixtral.*register_family"):
        ExpertModel(hf, tiny_tokenizer())
    assert not any(n.startswith("el_") for n, _ in hf.named_modules())


def test_register_family_from_user_code():
    from expertlens import register_family, supported_families

    spec = supported_families()["olmoe"].with_(name="my_olmoe_variant", model_types=("my_olmoe_variant",))
    register_family(spec)
    try:
        hf = tiny_model("olmoe")
        hf.config.model_type = "my_olmoe_variant"
        model = ExpertModel(hf, tiny_tokenizer())
        assert model.family == "my_olmoe_variant"
        with torch.no_grad(), model.trace(make_ids()):
            logits = model.layers[0].moe.router_logits.save()
        assert logits.shape[-1] == 8
        with pytest.raises(ValueError, match="already registered"):
            register_family(spec)
    finally:
        from expertlens.families import _REGISTRY

        _REGISTRY.pop("my_olmoe_variant", None)


def test_tokenizer_is_not_mutated():
    tok = tiny_tokenizer()
    tok.padding_side = "right"
    ExpertModel(tiny_model("olmoe"), tok)
    assert tok.padding_side == "right"


def test_validation_failure_restores_the_model():
    from expertlens import checks, families

    class Broken(families.SoftmaxTopK):
        def route(self, logits, router):
            w, idx = super().route(logits, router)
            return w, (idx + 1) % router.num_experts

    spec = families.supported_families()["qwen3_moe"].with_(name="broken_rule", model_types=("broken_rule",),
                                                            rule=Broken())
    families.register_family(spec)
    try:
        hf = tiny_model("qwen3_moe")
        ids = make_ids()
        with torch.no_grad():
            reference = hf(ids).logits
        implementation = hf.config._experts_implementation
        with pytest.raises(checks.ValidationError, match="layer 0: re-computing routing .* selects different experts"):
            ExpertModel(hf, tiny_tokenizer(), family="broken_rule")
        assert hf.config._experts_implementation == implementation
        assert not any(".el_" in n or n.startswith("el_") for n, _ in hf.named_modules())
        assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in hf.modules()) == 0
        with torch.no_grad():
            assert torch.equal(hf(ids).logits, reference)
    finally:
        families._REGISTRY.pop("broken_rule", None)


def test_generation_steps_are_tracked_for_a_single_unpadded_prompt():
    """generate() passes no attention mask for one unpadded prompt: the KV cache decides prefill vs decode."""
    model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
    seen = []
    handle = model.add_edit(
        "resid_pre", lambda x, ctx: seen.append((ctx.step, ctx.prompt_len, ctx.positions.tolist())) or x, layer=0
    )
    ids = make_ids(1, 5)
    with torch.no_grad():
        model.hf_model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    handle.remove()
    assert seen == [(0, 5, [0, 1, 2, 3, 4]), (1, 5, [5]), (2, 5, [6])]


def test_moe_points_after_restore_raise_a_clear_error():
    model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
    model.restore()
    with pytest.raises(PointError, match="instrumentation was removed"):
        with model.trace(make_ids()):
            model.layers[0].moe.router_logits.save()
