"""Every MoE causal-LM type of the installed transformers: exact points on each supported one, a reason for the rest.

The types come from a census of the installed transformers (``expertlens.testing.moe_census``), so a release's new
types each appear as a failing case of ``test_every_census_type_is_exact_or_refused`` until they get a table or a
structural reason. The identity tests are parametrised over ``coverage_families()`` (every census type an address
table supports), one tiny model per family shared by the tests of this module.
"""

from __future__ import annotations

import warnings

import nnsight
import pytest
import torch
import transformers

from expertlens import ExpertModel, PointError, UnsupportedModelError, resolve_family
from expertlens.families import REFUSED
from expertlens.testing import (
    TINY_CONFIGS,
    census_status,
    coverage_families,
    expert_forward,
    moe_census,
    tiny_model,
    tiny_tokenizer,
)

from .conftest import make_ids

FAMILIES = coverage_families()
CENSUS = {entry.model_type: entry for entry in moe_census()}


@pytest.fixture(scope="module")
def cov():
    cache: dict[str, ExpertModel] = {}

    def get(family: str) -> ExpertModel:
        if family not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[family] = ExpertModel(tiny_model(family), tiny_tokenizer())
        return cache[family]

    return get


def _reference_logits(family: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tiny_model(family)(ids).logits


@pytest.mark.parametrize("model_type", sorted(CENSUS))
def test_every_census_type_is_exact_or_refused(model_type):
    """Exact: a registered table (never an inferred one) and a tiny config, so the identity tests below run on it.
    Refused: a structural reason in REFUSED and a tiny config for the refusal test. A multimodal type whose causal
    LM is its text tower's model takes the tower's status."""
    status, detail = census_status(model_type)
    where = f"transformers {transformers.__version__}: {CENSUS[model_type].causal_lm}"
    assert status != "unknown", f"{where}: {detail}"
    if status == "text tower":
        assert detail in CENSUS and census_status(detail)[0] in ("exact", "refused"), f"{where}: tower {detail}"
        return
    assert model_type in TINY_CONFIGS, f"{where}: {model_type!r} has no tiny config in expertlens/_tiny_configs.py"
    if status == "exact":
        assert model_type in FAMILIES and resolve_family(model_type).inference is None
    else:
        assert model_type in REFUSED and not set(FAMILIES) & {model_type}


def test_the_census_finds_moe_types_and_only_them():
    assert len(CENSUS) >= 70  # transformers 5.25 (5.24: 66)
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "jetmoe"} <= set(CENSUS)
    assert not {"llama", "qwen2", "gemma2", "mistral"} & set(CENSUS)
    towers = {t: e.text_tower for t, e in CENSUS.items() if e.builds_tower}
    assert towers.get("llama4") == "llama4_text" and towers.get("qwen3_5_moe") == "qwen3_5_moe_text"
    assert not CENSUS["gemma4"].builds_tower  # AutoModelForCausalLM builds the multimodal model: refused itself


@pytest.mark.parametrize("family", FAMILIES)
def test_no_op_trace_is_bit_identical_and_restore_leaves_no_trace(family):
    ids = make_ids()
    reference = _reference_logits(family, ids)
    hf = tiny_model(family)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    implementation = hf.config._experts_implementation
    model = ExpertModel(hf, tiny_tokenizer())
    with torch.no_grad(), model.trace(ids):
        logits = model.logits.save()
    assert torch.equal(logits, reference)
    after = hf.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    model.restore()
    assert hf.config._experts_implementation == implementation
    assert not any(".el_" in n or n.startswith("el_") for n, _ in hf.named_modules())
    assert not any("_el_owner" in m.__dict__ for m in hf.modules())


def _moe_rows(model: ExpertModel, ids: torch.Tensor) -> list[dict]:
    layer_shared = model.spec.shared_level == "layer"
    with torch.no_grad(), model.trace(ids):
        rows = []
        for i in model.moe_layers:
            moe = model.layers[i].moe
            row = dict(x=moe.input, logits=moe.router_logits, probs=moe.router_probs, idx=moe.topk_indices,
                       w=moe.topk_weights, eo=moe.expert_out, contrib=moe.expert_contrib)
            if moe.has_shared and not layer_shared:
                row["shared"] = moe.shared_out
            row["out"] = moe.output
            if moe.has_shared and layer_shared:
                row["shared"] = moe.shared_out
            rows.append(row)
        rows = nnsight.save(rows)
    return rows


def _module(model: ExpertModel, layer: int, what: str):
    return model.hf_model.get_submodule(getattr(model.layout[layer], what))


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_and_routing_recomputation(family, cov):
    model = cov(family)
    assert model.moe_layers
    for layer, row in zip(model.moe_layers, _moe_rows(model, make_ids())):
        b, p = row["x"].shape[:2]
        k, e = model.layout[layer].top_k, model.layout[layer].n_experts
        assert row["idx"].shape == row["w"].shape == (b, p, k)
        assert row["eo"].shape == (b, p, k, model.d_model)
        assert row["contrib"].shape == row["eo"].shape
        # the family's identity, as the family table states it (FamilySpec.output_identity)
        recon = model.spec.moe_output_from(row["eo"], row["w"], row.get("shared"), _module(model, layer, "block"))
        torch.testing.assert_close(recon, row["out"], atol=1e-5, rtol=0, msg=model.spec.output_identity)
        # every family's: Σ_k expert_contrib is the routed part of moe.output
        block_shared = row["shared"] if "shared" in row and model.spec.shared_level == "block" else 0
        torch.testing.assert_close(row["contrib"].sum(-2) + block_shared, row["out"], atol=1e-5, rtol=0)
        if model.spec.routed_scale is None:  # the block sums these very tensors
            assert torch.equal(row["contrib"].sum(-2) + block_shared, row["out"])
        router = _module(model, layer, "router")
        w_ref, idx_ref = model.spec.rule.route(row["logits"].reshape(-1, e), router)
        idx, w = row["idx"].reshape(-1, k), row["w"].reshape(-1, k)
        order, order_ref = idx.argsort(-1), idx_ref.argsort(-1)
        assert torch.equal(idx.gather(-1, order), idx_ref.gather(-1, order_ref))
        torch.testing.assert_close(w.gather(-1, order).float(), w_ref.gather(-1, order_ref).float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(row["probs"], model.spec.rule.probs(row["logits"], router))


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_contrib_reads_change_nothing_and_writes_replace_the_routed_part(family, cov):
    """Reading expert_contrib leaves the logits bit-identical (scaled families keep the block's order of the
    routed scale); a write is summed as given (the weights and the scale are not applied again)."""
    model = cov(family)
    layer, ids = model.moe_layers[0], make_ids(2, 5)
    read_shared = model.spec.shared_level == "block" and model.layers[layer].moe.has_shared
    with torch.no_grad(), model.trace(ids):
        plain = model.logits.save()
    with torch.no_grad(), model.trace(ids):
        contrib = model.layers[layer].moe.expert_contrib.save()
        read = model.logits.save()
    assert torch.equal(read, plain)
    new = contrib.flip(-2) * torch.linspace(-1.0, 2.0, contrib.shape[-2]).view(-1, 1)
    shared = None
    with torch.no_grad(), model.trace(ids):
        moe = model.layers[layer].moe
        moe.expert_contrib = new
        if read_shared:
            shared = moe.shared_out.save()
        out = moe.output.save()
    torch.testing.assert_close(out, new.sum(-2) + (0 if shared is None else shared), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("edit", ["force", "mask"])
def test_router_logit_edits_select_and_move_the_output_as_computed_by_hand(family, edit, cov):
    model = cov(family)
    layer, expert = model.moe_layers[-1], 3
    read_shared = model.spec.shared_level == "block" and model.layers[layer].moe.has_shared
    shared = None
    with torch.no_grad(), model.trace(make_ids(1, 6)):
        moe = model.layers[layer].moe
        x = moe.input.save()
        if edit == "force":
            moe.router_logits[..., expert] += 100.0
        else:
            moe.router_logits[..., expert] = float("-inf")
        logits = moe.router_logits.save()
        idx = moe.topk_indices.save()
        if read_shared:
            shared = moe.shared_out.save()
        out = moe.output.save()
    selected = (idx == expert).any(-1)
    router = _module(model, layer, "router")
    groups = model.spec.rule.groups(router)
    group_limited = groups is not None and groups[0] != groups[1]
    if edit == "mask":
        assert not selected.any()
    elif group_limited:
        assert selected.any()
    else:
        assert selected.all()
    # hand computation: the family's rule on the edited logits, experts straight from the fused weights
    experts = _module(model, layer, "experts")
    k, e = model.layout[layer].top_k, model.layout[layer].n_experts
    w, idx_ref = model.spec.rule.route(logits.reshape(-1, e), router)
    flat = x.reshape(-1, model.d_model)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for s in range(k):
            ws = w[t, s].to(flat.dtype)
            if model.spec.weights_on_input:  # llama4: the weight scales the expert's input
                expected[t] += expert_forward(experts, flat[t : t + 1] * ws, int(idx_ref[t, s]))[0]
            else:
                expected[t] += ws * expert_forward(experts, flat[t : t + 1], int(idx_ref[t, s]))[0]
    expected = expected.reshape(x.shape) * model.spec.routed_factor(_module(model, layer, "block"))
    if shared is not None:
        expected = expected + shared
    assert torch.equal(idx_ref.sort(-1).values, idx.reshape(-1, k).sort(-1).values)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_sum_to_the_attention_output_on_every_attention_layer(family, cov):
    model = cov(family)
    layers = [i for i, row in enumerate(model.layout) if row.o_proj is not None]
    assert layers
    with torch.no_grad(), model.trace(make_ids()):
        rows = nnsight.save([(model.layers[i].attn.head_out, model.layers[i].attn.output) for i in layers])
    for i, (heads, out) in zip(layers, rows):
        attn = model.layers[i].attn
        assert heads.shape[-2:] == (attn.n_heads, model.d_model)
        total = heads.sum(-2) + (attn.o_bias if attn.o_bias is not None else 0)
        torch.testing.assert_close(total, out, atol=1e-5, rtol=1e-5)


def _attn_or_zero(model, i):
    return model.layers[i].attn.output if model.layout[i].attn is not None else None


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("flex_olmo",)])
def test_residual_identities_where_the_wiring_is_additive(family, cov):
    model = cov(family)
    kind = model.spec.residual
    if kind in ("scaled", "hyper", "other"):
        pytest.skip(f"{kind} residual: sublayer writes are scaled or mixed; no additive identity to check")
    with torch.no_grad(), model.trace(make_ids()):
        rows = []
        for i, layer in enumerate(model.layers):
            has_attn = model.layout[i].attn is not None
            row = dict(pre=layer.resid_pre)
            if has_attn:
                row["attn"] = layer.attn_write
            if kind in ("pre_norm", "post_norm"):
                row["mid"] = layer.resid_mid
            if kind != "single" or model.layout[i].block is not None:
                row["mlp"] = layer.mlp_write
            row["post"] = layer.resid_post
            rows.append(row)
        rows = nnsight.save(rows)
    for row in rows:
        if kind == "parallel":
            assert torch.equal(row["pre"] + row["attn"] + row["mlp"], row["post"])
        elif kind == "single":
            write = row["attn"] if "attn" in row else row.get("mlp")
            if write is not None:
                assert torch.equal(row["pre"] + write, row["post"])
        else:
            if "attn" in row:  # hybrid stacks: recurrent mixers have no attention write to add
                assert torch.equal(row["pre"] + row["attn"], row["mid"])
            assert torch.equal(row["mid"] + row["mlp"], row["post"])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_decode_steps_have_one_position(family, cov):
    model = cov(family)
    layer, steps = model.moe_layers[-1], 3
    with torch.no_grad(), model.generate(["hello", "hi there"], max_new_tokens=steps, do_sample=False) as tracer:
        shapes = nnsight.save([])
        for _ in tracer.iter[:steps]:
            moe = model.layers[layer].moe
            shapes.append((tuple(moe.router_logits.shape), tuple(moe.expert_out.shape)))
    assert len(shapes) == steps and shapes[0][0][1] > 1
    k = model.layout[layer].top_k
    assert all(s[0] == (2, 1, model.n_experts) and s[1] == (2, 1, k, model.d_model) for s in shapes[1:])


@pytest.mark.parametrize("family", ["jamba", "lfm2_moe", "nemotron_h", "granitemoehybrid"])
def test_hybrid_layers_without_attention_have_no_attention_points(family, cov):
    model = cov(family)
    no_attn = [i for i, row in enumerate(model.layout) if row.attn is None]
    assert no_attn
    layer_type = model._layer_info[no_attn[0]]["layer_type"]
    with pytest.raises(PointError, match=rf"layer {no_attn[0]} is a {layer_type} with no attention"):
        model.layers[no_attn[0]].attn.output
    with pytest.raises(PointError, match="no attention"):
        model.layers[no_attn[0]].attn.head_out


@pytest.mark.parametrize("family", ["cohere2_moe", "nemotron_h", "inkling2_text"])
def test_layers_without_a_mid_stream_refuse_resid_mid(family, cov):
    model = cov(family)
    with pytest.raises(PointError, match=rf"no resid_mid: its residual wiring is '{model.spec.residual}'"):
        model.layers[0].resid_mid


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_types_name_the_structural_reason_and_leave_the_model_alone(family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = tiny_model(family)
    names = {n for n, _ in hf.named_modules()}
    with pytest.raises(UnsupportedModelError, match="cannot address model family") as err:
        ExpertModel(hf, tiny_tokenizer())
    assert REFUSED[family][:40] in str(err.value)
    assert {n for n, _ in hf.named_modules()} == names


def test_layer_level_shared_mlp_is_a_point_the_layer_adds(cov):
    """granitemoeshared: the decoder layer adds shared_mlp(h) to the MoE block's output (both scaled)."""
    model = cov("granitemoeshared")
    layer = model.moe_layers[0]
    with torch.no_grad(), model.trace(make_ids()):
        mid = model.layers[layer].resid_mid.save()
        out = model.layers[layer].moe.output.save()
        shared = model.layers[layer].moe.shared_out.save()
        post = model.layers[layer].resid_post.save()
    m = model.hf_model.config.residual_multiplier
    assert m != 1.0
    torch.testing.assert_close(post, mid + (out + shared) * m, atol=1e-6, rtol=0)
    with torch.no_grad(), model.trace(make_ids()):
        model.layers[layer].moe.shared_out[:] = 0
        zeroed = model.layers[layer].resid_post.save()
    torch.testing.assert_close(zeroed, mid + out * m, atol=1e-6, rtol=0)


def test_latent_moe_projection_is_refused_with_the_module_named():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = tiny_model("nemotron_h", moe_latent_size=32)
    with pytest.raises(UnsupportedModelError, match=r"fc1_latent_proj is a Linear.*nn.Identity"):
        ExpertModel(hf, tiny_tokenizer())
    assert not any(".el_" in n for n, _ in hf.named_modules())


# ---- families with no table: inferred from structure, accepted only if the truth test passes ------------------


def test_a_family_left_out_of_the_table_is_inferred_verified_and_wrapped_with_a_warning(monkeypatch):
    from expertlens import families
    from expertlens.checks import check_model
    from expertlens.infer import InferredFamilyWarning

    # a registry without mellum for this test (a copy: the real one keeps its order for the docs page)
    monkeypatch.setattr(families, "_REGISTRY", {k: v for k, v in families._REGISTRY.items() if k != "mellum"})
    hf = tiny_model("mellum")
    ids = make_ids()
    with torch.no_grad():
        reference = hf(ids).logits
    with pytest.warns(InferredFamilyWarning, match=r"no address table for 'mellum'.*passed the truth test: "
                      r"FamilySpec\(name='mellum'.*register_family"):
        model = ExpertModel(hf, tiny_tokenizer())
    spec = model.spec
    assert (spec.moe, spec.router, spec.experts, spec.mid, spec.residual) == (
        "mlp", "gate", "experts", "post_attention_layernorm", "pre_norm"
    )
    assert type(spec.rule).__name__ == "SoftmaxTopK"
    with torch.no_grad(), model.trace(ids):
        logits = model.logits.save()
    assert torch.equal(logits, reference)
    check_model(model)
    # registering the inferred table (as the warning says) makes it explicit and silent
    families.register_family(spec.with_(inference=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error", InferredFamilyWarning)
        ExpertModel(tiny_model("mellum"), tiny_tokenizer())


@pytest.mark.parametrize("family", ["minimax_m3_vl_text", "gpt_oss"])
def test_an_inferred_table_that_fails_the_truth_test_is_refused_and_the_model_left_alone(family):
    """minimax_m3_vl_text scales its routed output outside the router, and gpt_oss's block returns a tuple: the
    inferred tables miss both, and the truth test says so."""
    hf = tiny_model(family)
    hf.config.model_type = f"unknown_{family}"
    ids = make_ids()
    with torch.no_grad():
        reference = hf(ids).logits
    with pytest.raises(UnsupportedModelError, match=r"inferred from its structure failed the truth test .*"
                       r"the inferred table was FamilySpec\(name='unknown_"):
        ExpertModel(hf, tiny_tokenizer())
    assert not any(".el_" in n or n.startswith("el_") for n, _ in hf.named_modules())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules()) == 0
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, reference)


def test_a_router_no_known_rule_reproduces_is_refused_before_wrapping():
    hf = tiny_model("phimoe")
    hf.config.model_type = "unknown_phimoe"
    with pytest.raises(UnsupportedModelError, match="no known routing rule reproduces PhimoeTopKRouter"):
        ExpertModel(hf, tiny_tokenizer())


def test_a_block_norm_after_the_expert_sum_keeps_the_sum_as_moe_output_and_the_norm_as_the_write(cov):
    """axk1 normalises the summed expert outputs inside its MoE block (post_mlp_layernorm)."""
    model = cov("axk1")
    layer = model.moe_layers[0]
    norm = model.hf_model.get_submodule(model.layout[layer].block).post_mlp_layernorm
    with torch.no_grad(), model.trace(make_ids()):
        out = model.layers[layer].moe.output.save()
        write = model.layers[layer].mlp_write.save()
    assert torch.equal(norm(out), write)
    assert not torch.allclose(out, write)
