"""The KL-matched random-expert control (match_kl by hand), the capability probe's scorer by hand and its code
path on a tiny random model, the lm-eval hook (absent / a stand-in module), progress lines in logs."""

from __future__ import annotations

import io
import math
import sys
import types

import pytest

from expertlens.refusal.capability import lm_eval_capability, load_probe, probe_max_new_tokens, score_probe
from expertlens.refusal.controls import KL_ATOL, KL_RTOL, match_kl
from expertlens.refusal.progress import LineProgress, progress, set_progress

# ---- match_kl ----------------------------------------------------------------------------------------


def test_match_kl_brackets_then_interpolates_by_hand():
    # KL = (c/10)^2, target 4 (c* = 20), tolerance 0.4. From c = 1 (KL 0.01): the quadratic guess 1.1·sqrt(400) = 22
    # is capped at grow = 16, so c = 16 (2.56); then 16 · 1.1·sqrt(4 / 2.56) = 22 (4.84) brackets it, and the log-log
    # line through (16, 2.56) and (22, 4.84) (slope 2) lands on 20 exactly.
    m = match_kl(lambda c: (c / 10) ** 2, target=4.0, start=1.0)
    assert [c for c, _ in m.tries] == pytest.approx([1, 16, 22, 20])
    assert m.matched and m.coeff == pytest.approx(20) and m.kl == pytest.approx(4.0)
    assert m.tolerance == pytest.approx(KL_RTOL * 4.0)
    # a KL that is not a power of c still converges inside the bracket
    cubic = match_kl(lambda c: 0.001 * c**3 + 0.01 * c, target=4.0, start=1.0)
    assert cubic.matched and len(cubic.tries) <= 8
    # from above: shrinks until below, then interpolates
    down = match_kl(lambda c: (c / 10) ** 2, target=4.0, start=1000.0)
    assert down.matched and abs(down.kl - 4.0) <= 0.4 and down.tries[0] == [1000.0, 10000.0]
    assert all(c < 1000 for c, _ in down.tries[1:])
    # a first guess within tolerance costs one evaluation
    assert len(match_kl(lambda c: c, target=2.0, start=2.1).tries) == 1


def test_match_kl_says_when_no_coefficient_reaches_the_target():
    m = match_kl(lambda c: 1 - 2.0**-c, target=2.0, start=1.0, max_evals=6)  # saturates below 1
    assert not m.matched and len(m.tries) == 6 and m.kl == max(k for _, k in m.tries) < 1
    tiny = match_kl(lambda c: 0.0, target=0.001, start=5.0)  # below the absolute tolerance: matched
    assert tiny.matched and tiny.tolerance == KL_ATOL
    for bad, msg in (({"target": -1.0, "start": 1.0}, "target KL"), ({"target": 1.0, "start": 0.0}, "start"),
                     ({"target": math.nan, "start": 1.0}, "target KL")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            match_kl(lambda c: c, **bad)


# ---- the capability probe ---------------------------------------------------------------------------


def test_score_probe_by_hand():
    num = {"prompt": "What is 7 plus 5?", "answer": "12", "mode": "first_number"}
    assert score_probe(num, "12") and score_probe(num, "The answer is 12.") and score_probe(num, "12, since 7+5")
    assert not score_probe(num, "13, not 12") and not score_probe(num, "twelve") and not score_probe(num, "")
    assert not score_probe(num, "112")
    big = {"answer": "1000", "mode": "first_number"}
    assert score_probe(big, "It is 1,000.") and not score_probe(big, "1,0000")
    assert score_probe({"answer": "-3", "mode": "first_number"}, "-3")
    cap = {"answer": "paris", "mode": "contains", "aliases": ["paname"]}
    assert score_probe(cap, "It is Paris.") and score_probe(cap, "PARIS!") and score_probe(cap, "paname")
    assert not score_probe(cap, "Parisian") and not score_probe(cap, "I cannot say.")
    copy = {"answer": "blue apple seven", "mode": "contains"}
    assert score_probe(copy, "Blue, apple, seven.") and not score_probe(copy, "blue seven apple")
    exact = {"answer": "paris", "mode": "exact"}
    assert score_probe(exact, " Paris. ") and not score_probe(exact, "It is Paris.")
    with pytest.raises(ValueError, match="unknown probe mode 'fuzzy'"):
        score_probe({"answer": "x", "mode": "fuzzy"}, "x")
    with pytest.raises(KeyError, match="lacks 'mode'"):
        score_probe({"answer": "x"}, "x")
    with pytest.raises(TypeError, match="expects a str"):
        score_probe(num, 12)


def test_probe_file_is_well_formed():
    probe = load_probe()
    assert len(probe) >= 30 and {r["task"] for r in probe} == {"arithmetic", "copy", "capital", "fact"}
    for r in probe:
        assert score_probe(r, r["answer"]), r  # its own answer scores
        assert not score_probe(r, "I cannot help with that."), r  # a refusal does not
    assert 8 <= probe_max_new_tokens() <= 64


def test_lm_eval_hook_skips_cleanly_when_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.warns(UserWarning, match="lm-eval-harness is not installed"):
        assert lm_eval_capability(["arc_easy"]) is None
    with pytest.raises(ValueError, match="non-empty list"):
        lm_eval_capability("arc_easy")


def test_lm_eval_hook_sums_the_logged_samples(monkeypatch):
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["hflm"] = (pretrained, tokenizer, batch_size)

    def simple_evaluate(model, tasks, limit, log_samples, **kw):
        calls["eval"] = (tasks, limit, log_samples, kw)
        return {"samples": {"t1": [{"acc": 1.0}, {"acc": 0.0}, {"acc": 1.0}], "t2": [{"acc": 1.0}]}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.ModuleType("lm_eval.models"))
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    suite = lm_eval_capability(["t1", "t2"], limit=5, num_fewshot=0)
    model = types.SimpleNamespace(hf_model="HF", tokenizer="TOK")
    assert suite(model, ()) == (3, 4)
    assert calls["hflm"] == ("HF", "TOK", 8) and calls["eval"] == (["t1", "t2"], 5, True, {"num_fewshot": 0})
    assert suite.__name__ == "lm-eval:t1,t2"
    with pytest.raises(RuntimeError, match="no metric 'f1'"):
        lm_eval_capability(["t1"], metric="f1")(model, ())


# ---- progress in logs ---------------------------------------------------------------------------------


def test_progress_in_logs_is_whole_lines_at_a_sensible_rate():
    t = iter(range(0, 1000, 4))  # each step takes 4 s
    out = io.StringIO()
    items = list(LineProgress(range(10), "method B stage 1", stream=out, interval=10.0, clock=lambda: next(t)))
    assert items == list(range(10))
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    # steps end at 4, 8, 12, ... s: a line when 10 s have passed since the last one (at steps 3, 6, 9), then the end
    assert lines == [
        "method B stage 1: 3/10 (30%), 12s elapsed, eta 28s",
        "method B stage 1: 6/10 (60%), 24s elapsed, eta 16s",
        "method B stage 1: 9/10 (90%), 36s elapsed, eta 4s",
        "method B stage 1: 10/10 (100%) done in 44s",
    ]
    gen = io.StringIO()
    list(LineProgress((i for i in range(3)), "causal map", stream=gen, interval=0.0))
    assert gen.getvalue().splitlines()[-1].startswith("causal map: 3 done in")


def test_progress_picks_lines_in_logs_a_widget_in_notebooks(monkeypatch, capsys):
    set_progress(None)
    monkeypatch.delenv("EXPERTLENS_PROGRESS", raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log, not a terminal
    it = progress(range(2), desc="sweep")
    assert isinstance(it, LineProgress) and list(it) == [0, 1]
    assert "\r" not in sys.stderr.getvalue() and "sweep: 2/2 (100%) done in" in sys.stderr.getvalue()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    from tqdm.auto import tqdm

    bar = progress(range(2), desc="sweep")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv("EXPERTLENS_PROGRESS", "0")
    assert progress(range(2), desc="sweep") == range(2)
    set_progress(False)
    monkeypatch.delenv("EXPERTLENS_PROGRESS")
    assert progress(range(2), desc="sweep") == range(2)
    set_progress(None)


def test_study_reports_exactly_what_the_probe_scorer_says_on_a_tiny_model(monkeypatch):
    """The probe's code path on a tiny random model: items whose answers are (or are not) the model's own greedy
    outputs, so the right count is known before the study runs; every condition but a control draw reports a
    retention."""
    import expertlens.refusal.capability as capability
    from expertlens import ExpertModel
    from expertlens.interventions.run import generate
    from expertlens.refusal import RefusalData, format_chat, run_refusal_study
    from expertlens.testing import tiny_model, tiny_tokenizer

    from .test_refusal_pipeline import HARM, SAFE, _loose_config

    model = ExpertModel(tiny_model("qwen2_moe"), tiny_tokenizer())
    prompts = [f"What is {i} plus {i}? Reply with the number only." for i in range(12)]
    outs = generate(model, format_chat(model.tokenizer, prompts), 6, (), batch_size=64)
    items, want = [], 0
    for i, (p, o) in enumerate(zip(prompts, outs)):
        mine = i % 2 == 0 and capability._norm(o) != ""
        want += mine
        items.append({"task": "copy", "prompt": p, "answer": o if mine else "zz not this", "mode": "exact"})
    assert 0 < want < len(items)
    doc = {"max_new_tokens": 6, "items": items}
    monkeypatch.setattr(capability, "_probe_doc", lambda: doc)
    cfg = _loose_config().with_(causal_map=False, n_capability=None)
    study = run_refusal_study(model, RefusalData.from_lists(HARM, SAFE), cfg, log=lambda *a: None)
    base = study.result.condition("baseline").capability
    assert (base.score.k, base.score.n) == (want, len(items)) and base.suite.startswith("expertlens capability probe")
    draws = {k for ctrl in study.result.controls for k in ctrl.keys}  # control draws skip the suite
    for c in study.result.conditions:
        if c.bypass is not None and c.key not in draws:
            assert c.capability.baseline == base.score and 0 <= c.capability.retention
