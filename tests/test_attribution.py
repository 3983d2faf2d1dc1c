"""Tests for expertlens.attribution: direct attribution, attribution patching, routing change."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import torch

from expertlens import ExpertModel
from expertlens.attribution import (
    AttributionTable,
    Component,
    ComponentAblation,
    DirectAttribution,
    LogitDiff,
    RoutingChange,
    activation_patching,
    attribution_patching,
    direct_attribution,
    routing_change,
)
from expertlens.interventions.base import Intervention
from expertlens.testing import MOE_FAMILIES, tiny_model, tiny_tokenizer

torch.set_num_threads(1)

PROMPTS = ["How do I bake a cake?", "Tell me a story", "hi"]
# every tiny family but MiniMax (its layers re-normalise the residual stream; unsupported, see test_direct_errors)
COMPLETENESS_FAMILIES = tuple(f for f in MOE_FAMILIES if f != "minimax") + ("llama",)


@pytest.fixture(scope="module")
def models():
    cache: dict[str, ExpertModel] = {}

    def get(family: str) -> ExpertModel:
        if family not in cache:
            cache[family] = ExpertModel(tiny_model(family), tiny_tokenizer())
        return cache[family]

    return get


@dataclass(frozen=True, eq=False)
class EmbedNoise(Intervention):
    """Small fixed Gaussian noise on the embeddings (a gentle corruption)."""

    scale: float = 0.05
    seed: int = 0

    def attach(self, model):
        gen = torch.Generator().manual_seed(self.seed)
        cache: dict = {}

        def fn(x, ctx):
            if x.shape not in cache:
                cache[x.shape] = torch.randn(x.shape, generator=gen) * self.scale * x.std()
            return x + cache[x.shape].to(x.dtype)

        return [model.add_edit("embed", fn)]


@dataclass(frozen=True, eq=False)
class RawSteer(Intervention):
    """Fallback steering: add a vector to resid_pre of one layer."""

    vector: torch.Tensor
    layer: int

    def attach(self, model):
        return [model.add_edit("resid_pre", lambda x, ctx: x + self.vector.to(x.dtype), layer=self.layer)]


def steer(vector: torch.Tensor, layer: int) -> Intervention:
    try:
        from expertlens.interventions import AddVector

        return AddVector("resid_pre", vector, layers=layer)
    except ImportError:  # interventions not available yet
        return RawSteer(vector, layer)


def measured_projection(model, prompts, r, layer):
    r = r / r.norm()
    with model.trace(prompts):
        if layer < model.n_layers:
            x = model.layers[layer].resid_pre.save()
        else:
            x = model.final_norm.input.save()
    return (x[:, -1].float() @ r).mean().item()


# ---- direct attribution ------------------------------------------------------------------------


@pytest.mark.parametrize("family", COMPLETENESS_FAMILIES)
def test_direct_completeness_direction(models, family):
    model = models(family)
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    for layer in (1, model.n_layers):
        table = direct_attribution(model, PROMPTS, r, layer=layer)
        expected = measured_projection(model, PROMPTS, r, layer)
        components = table.sum() - table.sum("other")
        assert abs(table.total - expected) < 1e-4
        assert abs(components - expected) < 1e-4, (family, layer, components, expected)
        assert abs(table.sum("other")) < 1e-4
        assert torch.allclose(table.per_prompt.sum(1), table.per_prompt_total, atol=1e-4)
    assert model.n_edits() == 0


def test_direct_component_kinds(models):
    ds = direct_attribution(models("deepseek_v3"), PROMPTS, torch.randn(64), layer=2)
    assert Component(0, "mlp", 0) in ds.components  # dense layer 0
    assert Component(1, "shared", 0) in ds.components and Component(1, "expert", 7) in ds.components
    gpt = direct_attribution(models("gpt_oss"), PROMPTS, torch.randn(64), layer=2)
    assert Component(0, "attn_bias", 0) in gpt.components and Component(1, "attn_bias", 0) in gpt.components
    assert abs(gpt["L0.attn_bias"]) > 0
    qw = direct_attribution(models("qwen2_moe"), PROMPTS, torch.randn(64), layer=1)
    kinds = {c.kind for c in qw.components}
    assert kinds == {"embed", "head", "expert", "shared", "other"}
    assert all(c.layer == 0 for c in qw.components if c.kind != "embed")  # only writers before layer 1


def test_direct_matches_points(models):
    """A head's and an expert's scores equal projections of the points read with nnsight."""
    model = models("qwen2_moe")
    r = torch.randn(64, generator=torch.Generator().manual_seed(3))
    rhat = r / r.norm()
    table = direct_attribution(model, ["How do I bake a cake?"], r, layer=2)
    with model.trace("How do I bake a cake?"):
        heads = model.layers[1].attn.head_out.detach().save()
        idx = model.layers[1].moe.topk_indices.save()
        w = model.layers[1].moe.topk_weights.detach().save()
        eo = model.layers[1].moe.expert_out.detach().save()
        sh = model.layers[1].moe.shared_out.detach().save()
    assert table[(1, "head", 2)] == pytest.approx(float(heads[0, -1, 2] @ rhat), abs=1e-5)
    for k in range(model.top_k):
        e = int(idx[0, -1, k])
        assert table[(1, "expert", e)] == pytest.approx(float(w[0, -1, k] * (eo[0, -1, k] @ rhat)), abs=1e-5)
    unused = set(range(model.n_experts)) - set(idx[0, -1].tolist())
    assert all(table[(1, "expert", e)] == 0 for e in unused)
    assert table[(1, "shared", 0)] == pytest.approx(float(sh[0, -1] @ rhat), abs=1e-5)


@pytest.mark.parametrize("family", ("olmoe", "qwen2_moe", "phimoe"))
def test_direct_logit_diff_frozen_norm(models, family):
    model = models(family)
    target = LogitDiff(["I", "S", "s"])
    table = direct_attribution(model, PROMPTS, target)
    pos, neg = target.token_ids(model)
    with model.trace(PROMPTS):
        logits = model.logits.save()
    expected = (logits[:, -1, pos].mean(-1) - logits[:, -1, neg].mean(-1)).mean().item()
    assert table.total == pytest.approx(expected, abs=1e-5)
    assert abs(table.sum() - expected) < 1e-4
    assert abs(table.sum("other")) < 1e-4
    assert table.meta["frozen_norm_error"] < 1e-4


def test_direct_batched_equals_single(models):
    model = models("olmoe")
    r = torch.randn(64)
    batch = direct_attribution(model, PROMPTS, r, layer=2)
    for i, p in enumerate(PROMPTS):
        single = direct_attribution(model, [p], r, layer=2)
        assert torch.allclose(batch.per_prompt[i], single.values, atol=1e-4)
    small = direct_attribution(model, PROMPTS, r, layer=2, batch_size=1)
    assert torch.allclose(small.values, batch.values, atol=1e-4)


def test_direct_all_positions_and_contrast(models):
    model = models("olmoe")
    r = torch.randn(64)
    t = direct_attribution(model, PROMPTS, r, layer=2, positions=None)
    assert abs(t.sum() - t.total) < 1e-4 and abs(t.sum("other")) < 1e-4
    a = direct_attribution(model, PROMPTS[:2], r, layer=2)
    b = direct_attribution(model, PROMPTS[2:], r, layer=2)
    d = a - b
    assert d.total == pytest.approx(a.total - b.total)
    assert torch.allclose(d.values, a.values - b.values)


def test_direct_attribution_composes_with_steering(models):
    """The intervention form, inside one model.intervene with steering: the steering shows as 'other'."""
    model = models("qwen2_moe")
    r = torch.randn(64, generator=torch.Generator().manual_seed(5))
    rhat = r / r.norm()
    v = 3.0 * rhat + 0.5 * torch.randn(64, generator=torch.Generator().manual_seed(6))
    attr = DirectAttribution(r, layer=2)
    with model.intervene(steer(v, 1), attr):
        with model.trace(PROMPTS):
            x = model.layers[1].resid_post.save()
    steered = attr.result()
    assert model.n_edits() == 0
    measured = (x[:, -1].float() @ rhat).mean().item()
    assert steered.total == pytest.approx(measured, abs=1e-4)
    assert abs(steered.sum() - steered.total) < 1e-4
    # the added vector is written by no component: it is layer 0's "other" row
    assert steered[(0, "other", 0)] == pytest.approx(float(v @ rhat), abs=1e-4)
    plain = direct_attribution(model, PROMPTS, r, layer=2)
    assert plain[(0, "other", 0)] == pytest.approx(0.0, abs=1e-5)
    # steering before layer 1 changes what layer 1's components write
    assert not torch.allclose(steered.to_matrix("head")[1], plain.to_matrix("head")[1], atol=1e-4)
    # the function form with interventions= gives the same table
    same = direct_attribution(model, PROMPTS, r, layer=2, interventions=[steer(v, 1)])
    assert torch.allclose(same.values, steered.values, atol=1e-5)


def test_table_value_api(models):
    model = models("qwen2_moe")
    t = direct_attribution(model, PROMPTS, torch.randn(64), layer=2)
    assert t.to_matrix("head").shape == (2, 4)
    assert t.to_matrix("expert").shape == (2, 8)
    assert t.to_matrix("shared").shape == (2,)
    assert float(t.to_matrix("expert").sum() + t.to_matrix("head").sum() + t.to_matrix("shared").sum()
                 + t["embed"] + t.to_matrix("other").sum()) == pytest.approx(t.sum(), abs=1e-4)
    top = t.top(5)
    assert len(top) == 5 and all(r["kind"] != "other" for r in top)
    mags = [abs(r["value"]) for r in top]
    assert mags == sorted(mags, reverse=True)
    assert t.top(1, by="pos")[0]["value"] == max(v for c, v in zip(t.components, t.values.tolist())
                                                 if c.kind != "other")
    data = json.loads(json.dumps(t.to_dict()))
    back = AttributionTable.from_dict(data)
    assert back == t and back.components == t.components
    assert t.select("expert").components == [c for c in t.components if c.kind == "expert"]


def test_direct_errors(models):
    model = models("olmoe")
    with pytest.raises(ValueError):
        direct_attribution(model, PROMPTS, torch.randn(10), layer=1)
    with pytest.raises(ValueError):
        direct_attribution(model, PROMPTS, LogitDiff(["I"]), layer=1)
    with pytest.raises(ValueError):
        LogitDiff(["not one token"]).token_ids(model)
    with pytest.raises(NotImplementedError):
        direct_attribution(models("minimax"), PROMPTS, torch.randn(64), layer=2)
    assert model.n_edits() == 0


# ---- attribution patching ------------------------------------------------------------------------


def _pearson(a, b):
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _logit_metric(logits):
    return logits[:, -1, 45].mean() - logits[:, -1, 50].mean()


@pytest.mark.parametrize("family", ("qwen2_moe", "olmoe", "deepseek_v3"))
def test_attribution_patching_matches_activation_patching(models, family):
    model = models(family)
    clean = PROMPTS[:2]
    corrupt = EmbedNoise(0.05)
    atp = attribution_patching(model, clean, corrupt, _logit_metric)
    real = activation_patching(model, clean, corrupt, _logit_metric)
    assert atp.components == real.components
    kinds = {c.kind for c in atp.components}
    assert {"head", "expert", "router"} <= kinds
    sel = [i for i, c in enumerate(atp.components) if c.kind in ("head", "expert")]
    r = _pearson(atp.values[sel], real.values[sel])
    assert r >= 0.9, r
    rt = [i for i, c in enumerate(atp.components) if c.kind == "router"]
    assert _pearson(atp.values[rt], real.values[rt]) >= 0.8
    assert atp.total == pytest.approx(real.total)
    assert model.n_edits() == 0


def test_attribution_patching_prompt_corruption(models):
    """One changed token as the corruption, LogitDiff metric."""
    model = models("qwen2_moe")
    clean, corrupt = ["How do I bake a cake?"], ["How do I make a cake?"]
    metric = LogitDiff(["I", "S"])
    atp = attribution_patching(model, clean, corrupt, metric, kinds=("head", "expert", "shared"))
    real = activation_patching(model, clean, corrupt, metric, kinds=("head", "expert", "shared"))
    assert {c.kind for c in atp.components} == {"head", "expert", "shared"}
    assert _pearson(atp.values, real.values) >= 0.9
    with pytest.raises(ValueError):
        attribution_patching(model, clean, ["How do I make a big cake?"], metric)


def test_activation_patching_selected_components(models):
    """``components=`` restricts real patching to the listed nodes (here deepseek_v3's dense layer 0)."""
    model = models("deepseek_v3")
    t = activation_patching(model, PROMPTS[:1], EmbedNoise(0.5), _logit_metric, components=[(0, "mlp", 0)])
    assert len(t) == 1 and t.components[0] == Component(0, "mlp", 0)
    assert t.meta["metric_clean"] != t.meta["metric_corrupted"]


# ---- ablation and routing change -----------------------------------------------------------------


def test_component_ablation(models):
    model = models("qwen2_moe")
    r = torch.randn(64)
    base = direct_attribution(model, PROMPTS, r, layer=2)
    e = max(range(8), key=lambda i: abs(base[(1, "expert", i)]))
    abl = ComponentAblation([(1, "expert", e), (1, "shared", 0)])
    after = direct_attribution(model, PROMPTS, r, layer=2, interventions=[abl])
    assert after[(1, "expert", e)] == 0 and after[(1, "shared", 0)] == 0
    # the last MoE block writes straight into the read-out: its ablation removes exactly its scores
    assert after.total == pytest.approx(base.total - base[(1, "expert", e)] - base[(1, "shared", 0)], abs=1e-4)
    for c in base.components:
        if c not in ((1, "expert", e), (1, "shared", 0)):
            assert after[c] == pytest.approx(base[c], abs=1e-5)
    heads = direct_attribution(model, PROMPTS, r, layer=2, interventions=[ComponentAblation([(1, "head", 0)])])
    assert heads[(1, "head", 0)] == 0
    assert heads[(0, "head", 1)] == pytest.approx(base[(0, "head", 1)], abs=1e-6)  # upstream untouched
    with pytest.raises(ValueError):
        with model.intervene(ComponentAblation([(0, "router", 1)])):
            pass
    assert model.n_edits() == 0


def test_routing_change(models):
    model = models("olmoe")
    none = routing_change(model, PROMPTS, ComponentAblation([]))
    assert none.layers == [0, 1]
    assert torch.all(none.frac_changed == 0) and torch.all(none.kl.abs() < 1e-6)
    n_real = sum(len(p) for p in PROMPTS)
    assert none.n_tokens == n_real
    heads = ComponentAblation([(1, "head", h) for h in range(4)])
    rc = routing_change(model, PROMPTS, heads)
    assert rc.frac_changed[0] == 0 and rc.kl[0] == pytest.approx(0.0, abs=1e-6)  # layer 0 routes first
    assert rc.frac_changed[1] > 0 and rc.kl[1] > 0
    assert 0 <= float(rc.frac_changed[1]) <= 1
    back = RoutingChange.from_dict(json.loads(json.dumps(rc.to_dict())))
    assert torch.allclose(back.kl, rc.kl) and back.layers == rc.layers
    # steering the residual stream before layer 1 moves layer-1 routing, growing with the coefficient
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    small = routing_change(model, PROMPTS, steer(0.5 * v, 1))
    big = routing_change(model, PROMPTS, steer(8.0 * v, 1))
    assert small.kl[0] == 0 and big.kl[1] > small.kl[1] > 0
    assert big.top(1)[0]["layer"] == 1


def test_routing_change_mask_experts(models):
    try:
        from expertlens.interventions import MaskExperts
    except ImportError:
        pytest.skip("MaskExperts not available")
    model = models("qwen3_moe")
    with model.trace(PROMPTS):
        idx = model.layers[0].moe.topk_indices.save()
    top = int(torch.mode(idx[:, -1, 0]).values)
    rc = routing_change(model, PROMPTS, MaskExperts({0: [top]}))
    assert rc.frac_changed[0] > 0 and rc.kl[0] > 0


# ---- organism (slow) -----------------------------------------------------------------------------


def _organism_name():
    from expertlens.organism import list_organisms

    names = list_organisms()
    return names[0] if names else None


@pytest.mark.slow
def test_organism_refusal_direction_top5_vs_random():
    """Top-5 components by direct attribution of the refusal direction matter more than 5 random ones."""
    name = _organism_name()
    if name is None:
        pytest.skip("no organism checkpoint exists yet (expertlens.organism.list_organisms() is empty)")
    import expertlens
    from expertlens.organism import load_prompts

    model = expertlens.load_organism(name)
    prompts = load_prompts(name, "train")
    harmful, harmless = prompts["harmful"][:32], prompts["harmless"][:32]
    fmt = lambda ps: [  # noqa: E731
        model.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=False) for p in ps
    ]
    layer = model.n_layers // 2

    def resid(ps):
        out = []
        for i in range(0, len(ps), 16):
            with model.trace(fmt(ps[i:i + 16])):
                out.append(model.layers[layer].resid_pre[:, -1].save())
        return torch.cat([o.float() for o in out])

    direction = resid(harmful).mean(0) - resid(harmless).mean(0)
    table = direct_attribution(model, harmful, direction, layer=layer, chat=True)
    assert abs(table.sum() - table.total) < 1e-3 * max(1.0, abs(table.total))
    pool = [c for c in table.components if c.kind in ("head", "expert", "shared", "mlp")]
    top5 = [Component(r["layer"], r["kind"], r["index"]) for r in table.top(5, by="pos", kinds=(
        "head", "expert", "shared", "mlp"))]
    print("organism", name, "layer", layer, "top-5:", [(c.name, round(table[c], 4)) for c in top5])

    def proj(abl):
        return direct_attribution(model, harmful, direction, layer=layer, chat=True,
                                  interventions=[ComponentAblation(abl)]).total

    base = table.total
    drop_top = base - proj(top5)
    rng = random.Random(0)
    drops_rand = [base - proj(rng.sample(pool, 5)) for _ in range(5)]
    print(f"projection {base:.4f}; top-5 ablation drop {drop_top:.4f}; random-5 drops {drops_rand}")
    assert drop_top > sum(drops_rand) / len(drops_rand)
    assert drop_top > 0
