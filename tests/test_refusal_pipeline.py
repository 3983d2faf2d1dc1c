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
def test_routing_frequencies_equal_a_hand_count_and_pads_never_counted(qwen2, count):
    """Frequencies and Δ equal counts taken by hand from plain transformers' router logits, one unpadded
    prompt at a time, over the last 5 real tokens (the authors' slice would read pads here)."""
    model = qwen2
    harm, safe = _chat(model, HARM), _chat(model, SAFE)
    stats = routing_statistics(model, harm, safe, last_n=5, count=count, batch_size=4)
    k = 1 if count == "top1" else model.top_k

    def hand(prompts):
        counts = torch.zeros(len(model.moe_layers), model.n_experts, dtype=torch.float64)
        n_tok = 0
        for p in prompts:
            ids = torch.tensor([model.tokenizer.encode(p, add_special_tokens=False)])
            with torch.no_grad():
                out = model.hf_model(ids, output_router_logits=True)
            n_tok += min(5, ids.shape[1])
            for li, logits in enumerate(out.router_logits):
                last = logits.reshape(ids.shape[1], -1)[-5:]
                top = last.topk(k, dim=-1).indices
                for e in top.flatten().tolist():
                    counts[li, e] += 1
        return 100 * counts / n_tok, n_tok

    fh, nh = hand(harm)
    fs, _ = hand(safe)
    assert stats.n_tokens_harmful == nh
    torch.testing.assert_close(
        stats.freq_harmful.double(), fh, rtol=0, atol=1e-4
    )  # float32 frequencies; one count is ~3 pp
    torch.testing.assert_close(stats.delta.double(), fh - fs, rtol=0, atol=1e-4)
    assert float(stats.delta.abs().sum()) > 0  # a test that can fail: the two sets route differently


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


def test_pathway_both_is_the_full_ablation_and_known_rates_are_reused(qwen2):
    """The "both" pathway is directional ablation everywhere (what the study's ablation condition runs), so the
    study may hand that rate in; the other pathways are measured as before, and a bad pathway name is refused."""
    from expertlens.interventions import AblateDirection
    from expertlens.refusal.controls import pathway_ablation
    from expertlens.refusal.evaluate import refusal_rate

    model = qwen2
    harm = _chat(model, HARM)
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    ids = refusal_token_ids(model.tokenizer)

    def judge(prompt, completion):  # a verdict that depends on the text, so rates differ between edits
        return "refusal" if sum(map(ord, completion)) % 3 else "full_response"

    full = pathway_ablation(model, r, harm, ids, max_new_tokens=4, judge=judge, batch_size=4)
    both, _ = refusal_rate(model, harm, [AblateDirection(r)], 4, judge, 4)
    assert full.rates["both"] == both
    assert len(set(full.rates.values()) | {full.base_rate}) > 1  # the judge does tell the edits apart
    reused = pathway_ablation(model, r, harm, ids, max_new_tokens=4, judge=judge, batch_size=4,
                              known_rates={"both": both})  # fmt: skip
    assert reused.rates == full.rates and reused.scores == full.scores and reused.shares == full.shares
    with pytest.raises(ValueError, match="unknown pathways"):
        pathway_ablation(model, r, harm, ids, max_new_tokens=4, judge=judge, known_rates={"all": 0.0})


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
    study = run_refusal_study(model, RefusalData.from_lists(HARM, SAFE), cfg, log=messages.append)
    assert any("no MoE layers" in m for m in messages)
    for key in ("method_a", "method_b"):
        c = study.result.condition(key)
        assert c.bypass is None and c.note.startswith("skipped")
    assert study.result.controls == [] and study.result.selected["layer"] is not None
    assert [c.status for c in study.result.claims][1] == "not testable"


def _loose_config() -> RefusalConfig:
    return RefusalConfig.fast().with_(
        kl_threshold=float("inf"),
        induce_threshold=float("-inf"),
        max_layer_frac=1.0,
        filter_train=False,
        max_new_tokens=3,
        stage2_tokens=3,
        expert_threshold=1.0,
        n_positions=3,
        routing_last_n=3,
        actadd_sweep=(1.0, 2.0),
        n_causal=4,
    )


def test_study_round_trips_and_directions_reproduce_steering(qwen2, tmp_path):
    model = qwen2
    data = RefusalData.from_lists(HARM * 2, SAFE * 2)
    state = torch.random.get_rng_state()
    study = run_refusal_study(model, data, _loose_config(), log=lambda *a: None)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is never reseeded
    out = study.save(tmp_path / "run")
    raw = json.loads((out / "results.json").read_text())
    keys = [c["key"] for c in raw["conditions"]]
    assert keys[:4] == ["baseline", "actadd_unit", "actadd", "ablation"] and "method_b" in keys and "control" in keys
    assert "method_b_control_1" in keys and "method_a_control_1" in keys
    base = study.result.condition("baseline")
    for o in (base.bypass, base.induce):  # three classes, each with n and an interval around it
        assert o.refusal.k + o.full_response.k + o.non_response.k == o.n == len(data.harmful_test)
        for r in (o.refusal, o.full_response, o.non_response):
            assert r.lo <= r.value <= r.hi
    assert [c.number for c in study.result.claims] == [1, 2, 3]
    assert all(c.verdict.split(":")[0] in ("supported on this model", "partly supported on this model",
                                           "not supported on this model") or c.status == "not testable"
               for c in study.result.claims)  # fmt: skip
    assert {d.setting for d in study.result.deviations} >= {"routing positions", "max_new_tokens"}
    html = (out / "report.html").read_text()
    for text in ("Claim 1", "Claim 2", "Claim 3", "Deviations from the authors", "Samples", "full response"):
        assert text in html
    for bad in ("None", "nan", "NaN", "harmful_refusal", "{'", "full_response", "non_response", "stage2_asr"):
        assert bad not in _visible_text(html), bad
    loaded = RefusalStudy.load(out)
    assert loaded.results == raw == study.results
    r = loaded.directions["refusal"]
    assert torch.equal(r, study.directions["refusal"].float())
    layer = loaded.result.selected["layer"]
    prompts = _chat(model, SAFE[:3])
    a = run_logits(model, prompts, [AddVector("resid_pre", study.directions["refusal"], layers=layer)])
    b = run_logits(model, prompts, [AddVector("resid_pre", r, layers=layer)])
    assert torch.equal(a, b)
    assert model.n_edits() == 0
    assert "RefusalStudy(" in repr(study) and "claim 1: " in repr(study)
    assert "<table" in study._repr_html_()
    assert "ASR" in study.table()
    _check_matched_control(study.result)
    _check_probe_numbers(model, study)


def _check_matched_control(res):
    """The like-for-like control of method B: draws from method B's layer (never its searched experts), each draw's
    KL per edit (measured again as the condition ran) the one its match found, within tolerance of method B's on the
    same edit or marked as not matched; claim 2 tests method B against the draws."""
    b, ctrl = res.condition("method_b"), res.control("method_b")
    if b.bypass is None:
        assert ctrl is None
        return
    searched = {(x["layer"], x["expert"]) for x in res.routing["method_b_experts"]}
    assert ctrl.draws and ctrl.rule
    for d in ctrl.draws:
        c = res.condition(d.key)
        assert [lay for lay, _ in d.experts] == [b.params["layer"]] and not searched & {tuple(x) for x in d.experts}
        for match, kl, target in ((d.bypass, c.harmless_kl, b.harmless_kl), (d.induce, c.induce_kl, b.induce_kl)):
            assert match.target == target and match.kl == kl and match.coeff > 0
            assert (abs(kl - target) <= match.tolerance) == match.matched
        assert c.params["bypass_coefficient"] == d.bypass.coeff and c.params["induce_coefficient"] == d.induce.coeff
    vs = [t for t in res.claims[1].tests if t.a == b.label and "draws" in t.b]
    assert {t.side for t in vs} == {"bypass", "induce"} and all(t.n_draws == len(ctrl.draws) for t in vs)


def _check_probe_numbers(model, study):
    """A tiny random model is no organism: the bundled probe is its capability suite, and every number is exactly
    what the probe's scorer says about the completions."""
    from expertlens.interventions.run import generate
    from expertlens.refusal.capability import load_probe, probe_max_new_tokens, score_probe

    res = study.result
    probe = load_probe()[: res.config["n_capability"]]
    chats = _chat(model, [r["prompt"] for r in probe])
    base = res.condition("baseline").capability
    assert base.suite.startswith("expertlens capability probe") and base.score.n == len(probe)
    outs = generate(model, chats, probe_max_new_tokens(), (), batch_size=res.config["batch_size"])
    assert base.score.k == sum(score_probe(r, o) for r, o in zip(probe, outs))
    act = res.condition("actadd_unit")
    edits = [AddVector("resid_pre", study.directions["refusal"], coeff=-act.params["coefficient"],
                       layers=act.params["layer"])]  # fmt: skip
    outs = generate(model, chats, probe_max_new_tokens(), edits, batch_size=res.config["batch_size"])
    assert act.capability.score.k == sum(score_probe(r, o) for r, o in zip(probe, outs))
    draws = {k for ctrl in res.controls for k in ctrl.keys}  # control draws skip the suite (no cost limit applies)
    assert all((c.capability is None) == (c.key in draws) for c in res.conditions if c.bypass is not None)


def _visible_text(html: str) -> str:
    import re

    body = re.sub(r"<script.*?</script>", "", html, flags=re.S)
    body = re.sub(r"<style.*?</style>", "", body, flags=re.S)
    return re.sub(r"<[^>]+>", " ", body)


def test_study_is_deterministic_and_resumes_stage_by_stage(qwen2, tmp_path):
    data = RefusalData.from_lists(HARM * 2, SAFE * 2)
    cfg = _loose_config().with_(causal_map=False)
    first = run_refusal_study(qwen2, data, cfg, log=lambda *a: None, checkpoint=tmp_path / "stages")
    second = run_refusal_study(qwen2, data, cfg, log=lambda *a: None)
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert strip(first.results) == strip(second.results)
    done = sorted(p.name for p in (tmp_path / "stages").glob("*.json"))
    assert "condition_baseline.json" in done and "selection.json" in done
    # resume reads the finished stages back: same results, and a stage we delete is recomputed
    (tmp_path / "stages" / "condition_ablation.json").unlink()
    logs = []
    resumed = run_refusal_study(qwen2, data, cfg, log=logs.append, checkpoint=tmp_path / "stages", resume=True)
    assert strip(resumed.results) == strip(first.results)
    assert (tmp_path / "stages" / "condition_ablation.json").exists()
    with pytest.raises(ValueError, match="different run"):
        run_refusal_study(qwen2, data, cfg.with_(seed=1), log=lambda *a: None, checkpoint=tmp_path / "stages",
                          resume=True)  # fmt: skip


def test_paper_preset_is_the_authors_defaults_with_sources():
    from expertlens.refusal import PAPER_SOURCES
    from expertlens.refusal.data import LIGHTWEIGHT_SYSTEM

    paper = RefusalConfig.paper()
    assert paper.system_prompt == LIGHTWEIGHT_SYSTEM
    assert (paper.max_new_tokens, paper.stage2_tokens, paper.n_random_experts, paper.method_b_select) == (
        100, 25, 10, "threshold")  # fmt: skip
    assert (paper.routing_filtered, paper.routing_n_harmless, paper.keep_min, paper.n_prompts_stage2) == (
        False, 200, 15, 25)  # fmt: skip
    assert paper.resolved("olmoe").expert_threshold == 7.0 and paper.resolved("qwen3_moe").expert_threshold == 15.0
    assert paper.resolved("gpt_oss").kl_max == 1.0 and paper.resolved("mixtral").kl_max == 2.0
    assert all(".py" in PAPER_SOURCES[k] for k in PAPER_SOURCES)
    assert [d.setting for d in paper.deviations()] == ["routing positions", "direction selection: induce filter",
                                                       "judge", "harmless KL and capability"]  # fmt: skip
    org = {d.setting: d for d in RefusalConfig.organism().deviations()}
    assert org["max_new_tokens"].paper == "100" and org["max_new_tokens"].here == "24"
    with pytest.raises(TypeError, match="has no setting"):
        paper.with_(max_tokens=3)
    with pytest.raises(ValueError, match="method_b_select"):
        paper.with_(method_b_select="best").validate()


def test_refusal_data_refuses_what_would_silently_go_wrong(qwen2):
    with pytest.raises(TypeError, match="single string.*split into characters"):
        RefusalData.from_lists("bomb", "bread")
    with pytest.raises(TypeError, match="single string"):
        RefusalData("bomb", ["bread"])
    with pytest.raises(ValueError, match="cannot be split into train / val / test.*5 prompts per class"):
        RefusalData.from_lists(HARM[:4], SAFE[:4])
    with pytest.raises(ValueError, match="harmful_val is empty.*will not fall back to the training prompts"):
        run_refusal_study(qwen2, RefusalData(HARM, SAFE), _loose_config(), log=lambda *a: None)
    with pytest.raises(ValueError, match="shorter than the 40 last positions"):
        run_refusal_study(qwen2, RefusalData.from_lists(HARM, SAFE), _loose_config().with_(n_positions=40),
                          log=lambda *a: None)  # fmt: skip
    with pytest.raises(ValueError, match="identical.*difference-in-means direction is zero"):
        run_refusal_study(qwen2, RefusalData.from_lists(HARM, HARM), _loose_config(), log=lambda *a: None)
    assert qwen2.n_edits() == 0


def test_capability_hook_sees_every_condition_with_its_edits_active(qwen2):
    seen = []

    threads = []

    def suite(model, edits):
        seen.append(len(edits))
        threads.append(torch.get_num_threads())
        assert model.n_edits() >= len(edits)  # the edits are active while the suite runs
        return (5, 5) if not edits else (3, 5)

    cfg = _loose_config().with_(causal_map=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        study = run_refusal_study(qwen2, RefusalData.from_lists(HARM, SAFE), cfg, log=lambda *a: None,
                                  capability=suite)  # fmt: skip
        assert set(threads) == {1} and torch.get_num_threads() == 2  # a tiny CPU model: one thread, then restored
        with pytest.raises(ValueError, match="threads must be 'auto', None or a positive int"):
            run_refusal_study(qwen2, RefusalData.from_lists(HARM, SAFE), cfg, threads=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    base, act = study.result.condition("baseline"), study.result.condition("actadd")
    assert base.capability.retention == 1.0 and act.capability.retention == pytest.approx(0.6)
    assert act.capability.suite == "capability suite suite" and seen[0] == 0 and max(seen) >= 1
    assert qwen2.n_edits() == 0


def test_stage_files_are_written_atomically_and_a_corrupt_one_is_named(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from expertlens.refusal import study as study_module
    from expertlens.refusal.study import _Stages

    stages = _Stages(tmp_path, resume=False, fingerprint={"run": 1})
    stages.put("selection", {"layer": 3})
    stages.put_tensors("directions", {"refusal": torch.ones(4)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["directions.safetensors", "run.json", "selection.json"]
    # a write that dies mid-way leaves the finished file as it was, and no temporary file
    def dying_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_module, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        stages.put_tensors("directions", {"refusal": torch.zeros(4)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["directions.safetensors", "run.json", "selection.json"]
    resumed = _Stages(tmp_path, resume=True, fingerprint={"run": 1})
    assert resumed.get("selection", dict) == {"layer": 3}
    assert torch.equal(resumed.tensors("directions")["refusal"], torch.ones(4))
    # truncated files (written by an older version in place, or by hand) are named with what to do
    (tmp_path / "selection.json").write_text('{"layer": ')
    with pytest.raises(ValueError, match=r"stage file .*selection.json cannot be read .*delete it"):
        resumed.get("selection", dict)
    save_file({"refusal": torch.ones(4)}, str(tmp_path / "directions.safetensors"))
    (tmp_path / "directions.safetensors").write_bytes((tmp_path / "directions.safetensors").read_bytes()[:20])
    with pytest.raises(ValueError, match=r"stage file .*directions.safetensors cannot be read"):
        resumed.tensors("directions")


@pytest.mark.parametrize("name", __import__("expertlens.organism", fromlist=["list_organisms"]).list_organisms())
def test_organism_preset_generates_every_expected_answer_whole(name):
    """No correct answer is cut short: every response / answer an organism was trained or is tested on, plus
    its end token and a margin of 2, fits the organism preset's generation lengths."""
    from transformers import AutoTokenizer

    from expertlens.organism import SPLITS, load_prompt_records, organism_path

    tok = AutoTokenizer.from_pretrained(organism_path(name))
    longest = max(
        len(tok(rec[key], add_special_tokens=False)["input_ids"])
        for split in SPLITS
        for rec in load_prompt_records(name, split)
        for key in ("response", "answer")
        if rec.get(key)
    )
    cfg = RefusalConfig.organism()
    assert longest + 1 + 2 <= min(cfg.max_new_tokens, cfg.stage2_tokens), (name, longest)
