"""Refusal pipeline pieces on tiny models: hand computations, invariants, round trips, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from expertlens import ExpertModel
from expertlens.interventions import AddVector, run_logits
from expertlens.refusal import (
    ChatTemplateError,
    RefusalConfig,
    RefusalData,
    RefusalStudy,
    SubstringJudge,
    candidate_directions,
    format_chat,
    is_refusal,
    kl_divergence,
    refusal_score,
    refusal_token_ids,
    routing_statistics,
    run_refusal_study,
)
from expertlens.refusal.controls import pathway_shares
from expertlens.refusal.methods import expert_output_means, routing_edit_experts
from expertlens.testing import expert_forward, tiny_model, tiny_tokenizer

HARM = [f"hurt my friend {i}, now!" for i in range(6)] + ["hurt"]
SAFE = [f"hug my friend {i} please" for i in range(6)] + ["a hug for you, my dear old friend"]


@pytest.fixture(scope="module")
def qwen2():
    return ExpertModel(tiny_model("qwen2_moe"), tiny_tokenizer())


def _chat(model, xs):
    return format_chat(model.tokenizer, xs)


def test_difference_in_means_matches_hand_computation(qwen2):
    model = qwen2
    harm, safe = _chat(model, HARM), _chat(model, SAFE)
    positions = [-3, -2, -1]
    got = candidate_directions(model, harm, safe, positions, batch_size=3)

    def hand_mean(prompts):
        # the same left-padded batches through plain transformers, float64 sums by hand
        total = torch.zeros(len(positions), model.n_layers, model.d_model, dtype=torch.float64)
        count = torch.zeros(len(positions), dtype=torch.float64)
        for i in range(0, len(prompts), 3):
            enc = model.tokenize(prompts[i : i + 3])
            with torch.no_grad():
                hidden = model.hf_model(**enc, output_hidden_states=True).hidden_states
            mask = enc["attention_mask"][:, positions].double()
            batch = torch.zeros_like(total)
            for li in range(model.n_layers):
                batch[:, li] = (hidden[li][:, positions].double() * mask[..., None]).sum(0)
            total += batch
            count += mask.sum(0)
        return total / count[:, None, None]

    expected = hand_mean(harm) - hand_mean(safe)
    assert got.dtype == torch.float64 and got.shape == (3, model.n_layers, model.d_model)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("count", ["top1", "topk"])
def test_routing_frequencies_sum_and_pads_never_counted(qwen2, count):
    model = qwen2
    harm, safe = _chat(model, HARM), _chat(model, SAFE)
    stats = routing_statistics(model, harm, safe, last_n=None, count=count, batch_size=4)
    k = 1 if count == "top1" else model.top_k
    for freq in (stats.freq_harmful, stats.freq_harmless):
        torch.testing.assert_close(freq.sum(-1), torch.full((len(model.moe_layers),), 100.0 * k))
    real = sum(len(model.tokenizer(p)["input_ids"]) for p in harm)
    assert stats.n_tokens_harmful == real  # every real token once, no pad
    # counts equal one-prompt-at-a-time runs (no padding): pads were excluded, not averaged in
    single = routing_statistics(model, harm, safe, last_n=None, count=count, batch_size=1)
    torch.testing.assert_close(stats.freq_harmful, single.freq_harmful)
    torch.testing.assert_close(stats.delta, stats.freq_harmful - stats.freq_harmless)


def test_routing_last_n_counts_only_last_tokens(qwen2):
    stats = routing_statistics(qwen2, _chat(qwen2, HARM), _chat(qwen2, SAFE), last_n=5)
    assert stats.n_tokens_harmful == 5 * len(HARM)


def test_expert_selection_by_threshold_and_top_n(qwen2):
    stats = routing_statistics(qwen2, _chat(qwen2, HARM), _chat(qwen2, SAFE), last_n=None)
    top = stats.select(top_n=3)
    assert len(top) == 3 and abs(top[0][2]) >= abs(top[1][2]) >= abs(top[2][2])
    thr = abs(top[1][2])
    assert all(abs(d) >= thr for _, _, d in stats.select(threshold=thr))
    assert all(abs(d) < thr for _, _, d in stats.below(thr))
    assert all(d > 0 for _, _, d in stats.select(sign="harmful"))


def test_forced_expert_means_equal_hand_computation(qwen2):
    model = qwen2
    prompts = _chat(model, HARM[:3])
    layer, positions = 1, [-2, -1]
    means, counts = expert_output_means(model, prompts, layer, positions, mode="forced")
    experts = model.hf_model.get_submodule(model.layout[layer].experts)
    acc = torch.zeros(len(positions), model.n_experts, model.d_model, dtype=torch.float64)
    for p in prompts:
        with torch.no_grad(), model.trace(p):
            x = model.layers[layer].moe.input.save()
        for e in range(model.n_experts):
            acc[:, e] += expert_forward(experts, x[0, positions], e).double()
    torch.testing.assert_close(means, acc / len(prompts), atol=1e-6, rtol=1e-6)
    assert torch.equal(counts, torch.full_like(counts, len(prompts)))
    routed, rcounts = expert_output_means(model, prompts, layer, positions, mode="routed")
    assert int(rcounts.sum()) == len(prompts) * len(positions) * model.top_k


def test_refusal_score_and_kl_hand_computations():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    p = torch.softmax(logits.double(), -1)[0, [0, 3]].sum()
    expected = math.log(p + 1e-8) - math.log(1 - p + 1e-8)
    assert refusal_score(logits, [0, 3]).item() == pytest.approx(expected, abs=1e-12)
    pt = torch.softmax(logits.double() / 0.7, -1)[0, [0, 3]].sum()
    assert refusal_score(logits, [0, 3], 0.7).item() == pytest.approx(
        math.log(pt + 1e-8) - math.log(1 - pt + 1e-8), abs=1e-12
    )
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    lp, lq = torch.log_softmax(logits.double(), -1), torch.log_softmax(q.double(), -1)
    assert kl_divergence(logits, q).item() == pytest.approx(float((lp.exp() * (lp - lq)).sum()), abs=1e-12)
    assert kl_divergence(logits, logits).item() == 0.0


def test_substring_judge_and_token_ids():
    assert is_refusal("i cannot help with that .") and is_refusal("As an AI, no.")
    assert not is_refusal("sure . here is a poem about the sea .")
    assert SubstringJudge(["nope"])("p", "NOPE!")
    ids = refusal_token_ids(tiny_tokenizer(), ["I", "As"])
    assert tiny_tokenizer().convert_ids_to_tokens(ids[0]) == "I"
    with pytest.raises(ValueError, match="none of the refusal starts"):
        refusal_token_ids(tiny_tokenizer(), ["\u4e2d"])


def test_pathway_shares_and_method_a_experts():
    assert pathway_shares(2.0, {"attention": 1.0, "moe": 2.0, "both": 0.0}) == {
        "attention": 0.5,
        "moe": 0.0,
        "both": 1.0,
    }
    force, suppress = routing_edit_experts([(0, 1, 20.0), (0, 2, -15.0), (1, 3, 11.0)], "bypass")
    assert force == {0: [2]} and suppress == {0: [1], 1: [3]}
    force, suppress = routing_edit_experts([(0, 1, 20.0), (0, 2, -15.0)], "induce")
    assert force == {0: [1]} and suppress == {0: [2]}


# ---- bad input ------------------------------------------------------------------------------


def test_bad_input_errors_and_warnings():
    with pytest.raises(ValueError, match="harmful_train is empty"):
        RefusalData([], ["x"])
    with pytest.raises(ValueError, match="need non-empty harmful and harmless lists"):
        RefusalData.from_lists([], ["x"])
    with pytest.warns(UserWarning, match="differ a lot in size"):
        RefusalData(["a"] * 40, ["b"] * 4)
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template.*chat_template"):
        format_chat(tok, ["hi"])


def test_dense_model_skips_methods_with_a_message():
    model = ExpertModel(tiny_model("llama"), tiny_tokenizer())
    cfg = _loose_config()
    messages = []
    study = run_refusal_study(model, RefusalData(HARM, SAFE), cfg, log=messages.append)
    assert any("no MoE layers" in m for m in messages)
    assert study["method_a"]["note"].startswith("skipped") and study["method_b"]["note"].startswith("skipped")
    assert study["selected"]["layer"] is not None


def _loose_config() -> RefusalConfig:
    cfg = RefusalConfig.fast()
    cfg.kl_threshold, cfg.induce_threshold, cfg.max_layer_frac = float("inf"), float("-inf"), 1.0
    cfg.filter_train, cfg.max_new_tokens, cfg.stage2_tokens, cfg.expert_threshold = False, 3, 3, 1.0
    return cfg


def test_study_round_trips_and_directions_reproduce_steering(qwen2, tmp_path):
    model = qwen2
    study = run_refusal_study(model, RefusalData.from_lists(HARM * 2, SAFE * 2), _loose_config(), log=lambda *a: None)
    out = study.save(tmp_path / "run")
    raw = json.loads((out / "results.json").read_text())
    for key in ("baseline", "selected", "actadd", "ablation", "method_a", "method_b", "control", "pathways"):
        assert key in raw
    for key in ("harmful_refusal", "harmless_refusal"):
        assert 0.0 <= raw["baseline"][key] <= 1.0
    assert set(raw["pathways"]["shares"]) == {"attention", "moe", "both"}
    html = (out / "report.html").read_text()
    assert "Summary" in html and "Routing statistics" in html
    loaded = RefusalStudy.load(out)
    assert loaded.results == raw
    r = loaded.directions["refusal"]
    assert torch.equal(r, study.directions["refusal"].float())
    layer = loaded["selected"]["layer"]
    prompts = _chat(model, SAFE[:3])
    a = run_logits(model, prompts, [AddVector("resid_pre", study.directions["refusal"], layers=layer)])
    b = run_logits(model, prompts, [AddVector("resid_pre", r, layers=layer)])
    assert torch.equal(a, b)
    assert model.n_edits() == 0
