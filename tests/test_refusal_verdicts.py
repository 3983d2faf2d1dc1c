"""Every verdict rule of docs/refusal-verdicts.md on hand-built results (no model is run)."""

from __future__ import annotations

import pytest

from expertlens.refusal.claims import MIN_BASELINE_REFUSAL, claim_verdicts, no_better, wins
from expertlens.refusal.results import (
    Capability,
    CausalMap,
    Condition,
    ControlDraw,
    ExpertControl,
    KLMatch,
    Margin,
    Outcome,
    Rate,
    StudyResults,
)

N = 40
REFUSE, ANSWER, BROKEN = ["refusal"] * N, ["full_response"] * N, ["non_response"] * N


def mix(k: int, cls: str, rest: str = "refusal") -> list[str]:
    """``k`` prompts of class ``cls``, the rest ``rest``."""
    return [cls] * k + [rest] * (N - k)


def cond(key, harmful, harmless, kl=0.1, **params) -> Condition:
    cap = Capability("s", Rate.of(9, 10), Rate.of(10, 10))
    params = {"layer": 1, "expert": 2, "coefficient": 5.0, **params}
    return Condition(key, key, params, Outcome.from_verdicts("harmful test", harmful),
                     Outcome.from_verdicts("harmless test", harmless), kl, cap, induce_kl=kl)  # fmt: skip


def control(method: str, draws: list[tuple[list[str], list[str]]]) -> tuple[ExpertControl, list[Condition]]:
    """A like-for-like control of ``method`` with one condition per draw (its harmful / harmless verdicts)."""
    m = KLMatch(5.0, 0.1, 0.1, True, 0.01)
    keys = [f"{method}_control_{i + 1}" for i in range(len(draws))]
    ctrl = ExpertControl(method, "rule", [ControlDraw(k, [[1, 3 + i]], -1, m, m) for i, k in enumerate(keys)])
    return ctrl, [cond(k, h, s) for k, (h, s) in zip(keys, draws)]


def pathways(attention=(0.6, 0.5, 0.7), moe=(0.4, 0.3, 0.5), drop=(1.0, 2.0)) -> dict:
    return {"base_score": 3.0, "refusal_score": {"attention": 2.0, "moe": 2.5, "both": 0.0},
            "shares": {"attention": attention[0], "moe": moe[0], "both": 1.0},
            "share_intervals": {"attention": list(attention[1:]), "moe": list(moe[1:]), "both": [1.0, 1.0]},
            "drop_interval": list(drop)}  # fmt: skip


def results(conditions, controls=(), pw=None, asr_gain=0.0, positive_control=False) -> StudyResults:
    """Results with a two-layer causal map in which zeroing layer 0's attention raises ASR by ``asr_gain``."""
    cmap = CausalMap([0, 1], N, 1.0, 0.0, {"attention": [-0.98, 0.0], "moe": [-0.5, 0.0]},
                     {"attention": [asr_gain, 0.0], "moe": [0.0, 0.0]})  # fmt: skip
    return StudyResults(model={"family": "x"}, config={"kl_max": 2.0, "min_capability": 0.5, "seed": 0},
                        preset="p", data={}, judge={}, selected={}, selection={}, conditions=list(conditions),
                        controls=list(controls), causal_map=cmap, pathways=pw,
                        positive_control=positive_control)  # fmt: skip


def study(b_harmful, b_harmless, draws, act=(ANSWER, REFUSE), **kw) -> StudyResults:
    ctrl, ctrl_conds = control("method_b", draws)
    conds = [cond("baseline", REFUSE, ANSWER), cond("actadd", *act), cond("ablation", ANSWER, ANSWER),
             cond("method_b", b_harmful, b_harmless), *ctrl_conds]  # fmt: skip
    return results(conds, [ctrl], **kw)


def test_a_win_needs_the_margin_its_interval_and_the_paired_test():
    base = Outcome.from_verdicts("t", REFUSE)
    assert wins(Margin.compare("a", Outcome.from_verdicts("t", mix(30, "full_response")), "b", base,
                               "full_response", "bypass"))  # fmt: skip
    small = Margin.compare("a", Outcome.from_verdicts("t", mix(3, "full_response")), "b", base, "full_response", "")
    assert not wins(small) and small.value < 0.1  # 7.5 points: below the 10-point margin, whatever p says
    # several draws: the control's rate is the mean over draws, the test a sign flip over prompts
    draws = [Outcome.from_verdicts("t", mix(k, "full_response")) for k in (28, 30, 32)]
    m = Margin.compare("a", Outcome.from_verdicts("t", mix(30, "full_response")), "c", draws, "full_response", "")
    assert m.n_draws == 3 and m.b_rate == pytest.approx(0.75) and not wins(m) and m.lo < 0 < m.hi
    assert "sign-flip" in m.test and no_better(m)


def test_claim1_supported_partly_and_not_supported():
    c1 = claim_verdicts(study(BROKEN, ANSWER, [(BROKEN, ANSWER)]))[0]
    assert c1.status == "supported" and "+100.0 points" in c1.verdict and c1.rule
    c1 = claim_verdicts(study(BROKEN, ANSWER, [(BROKEN, ANSWER)], act=(BROKEN, REFUSE)))[0]
    assert c1.status == "partly supported" and "breakage" in c1.verdict  # refusal fell into non-responses
    res = study(BROKEN, ANSWER, [(BROKEN, ANSWER)])
    res.conditions[1].harmless_kl = 5.0  # over kl_max: the bypass side fails on its cost
    c1 = claim_verdicts(res)[0]
    assert c1.status == "partly supported" and "costs the model" in c1.verdict
    c1 = claim_verdicts(study(BROKEN, ANSWER, [(BROKEN, ANSWER)], act=(REFUSE, ANSWER)))[0]
    assert c1.status == "not supported" and "neither side" in c1.verdict


def test_claim2_needs_a_win_over_the_baseline_and_the_like_for_like_control():
    # method B bypasses and induces; random experts of its layer do neither: supported, the margins named
    c2 = claim_verdicts(study(ANSWER, REFUSE, [(REFUSE, ANSWER)] * 3))[1]
    assert c2.status == "supported" and "3 draws" in c2.verdict and "points [" in c2.verdict
    assert {(t.side, t.n_draws) for t in c2.tests if "draws" in t.b} == {("bypass", 3), ("induce", 3)}
    assert any("ActAdd" in x or "actadd" in x for x in c2.controls) and any("ablation" in x for x in c2.controls)
    # the control bypasses as well as method B: that side is no win; induce still is: partly supported
    c2 = claim_verdicts(study(ANSWER, REFUSE, [(ANSWER, ANSWER)] * 3))[1]
    assert c2.status == "partly supported" and "no more than random experts" in c2.verdict
    # method B breaks the model (non-responses): not supported, said as breakage
    c2 = claim_verdicts(study(BROKEN, ANSWER, [(BROKEN, ANSWER)] * 3))[1]
    assert c2.status == "not supported" and "breakage" in c2.verdict
    # no control draw ran: not testable, never support
    res = study(ANSWER, REFUSE, [])
    res.controls[0].note = "no experts to draw from"
    c2 = claim_verdicts(res)[1]
    assert c2.status == "not testable" and "no experts to draw from" in c2.verdict


def test_claim3_both_arms_failing_is_not_testable_never_support():
    # the mixtral case: method B all non-responses, the control mostly too; the pathway ablation missing
    res = study(BROKEN, ANSWER, [(mix(32, "non_response"), ANSWER)] * 3)
    c3 = claim_verdicts(res)[2]
    assert c3.status == "not testable" and "two failures say nothing" in c3.verdict
    # with the pathway ablation the attention half alone decides: partly supported, the routing half still untested
    res.pathways = pathways()
    c3 = claim_verdicts(res)[2]
    assert c3.status == "partly supported" and "not testable" in c3.verdict and "attention writes alone" in c3.verdict


def test_claim3_routing_half_and_attention_half():
    # both arms steer, method B no better than chance (interval below 10 points) and attention ≥ 25%: supported
    c3 = claim_verdicts(study(ANSWER, REFUSE, [(ANSWER, REFUSE)] * 3, pw=pathways()))[2]
    assert c3.status == "supported" and "did not pick a better steering expert" in c3.verdict
    assert "60.0% [50.0%–70.0%]" in c3.verdict  # the share with its interval, not a bare number
    # method B beats the control: the routing half is not supported; attention supported: partly supported
    c3 = claim_verdicts(study(ANSWER, REFUSE, [(REFUSE, ANSWER)] * 3, pw=pathways()))[2]
    assert c3.status == "partly supported" and "beats random ones" in c3.verdict
    # attention share interval below 25%: not supported; straddling: undecided (not testable)
    c3 = claim_verdicts(study(ANSWER, REFUSE, [(REFUSE, ANSWER)] * 3, pw=pathways(attention=(0.1, 0.05, 0.2))))[2]
    assert c3.status == "not supported"
    c3 = claim_verdicts(study(ANSWER, REFUSE, [(REFUSE, ANSWER)] * 3, pw=pathways(attention=(0.3, 0.1, 0.5))))[2]
    assert c3.status == "not supported" and "undecided" in c3.verdict
    # the full ablation does not lower the refusal score: the shares mean nothing
    c3 = claim_verdicts(study(ANSWER, REFUSE, [(ANSWER, REFUSE)] * 3, pw=pathways(drop=(-0.5, 0.2))))[2]
    assert c3.status == "partly supported" and "does not lower the refusal score" in c3.verdict


def test_causal_map_enters_the_verdict_only_where_it_separates_bypass_from_breakage():
    c3 = claim_verdicts(study(ANSWER, REFUSE, [(ANSWER, REFUSE)] * 3, pw=pathways()))[2]
    assert "causal map" not in c3.verdict.lower() and any("breakage only" in e for e in c3.evidence)
    c3 = claim_verdicts(study(ANSWER, REFUSE, [(ANSWER, REFUSE)] * 3, pw=pathways(), asr_gain=0.3))[2]
    assert "zeroing layer 0's attention output releases answers (ASR +30.0 points" in c3.verdict


def test_positive_control_reads_recovered_and_a_model_that_does_not_refuse_is_not_testable():
    claims = claim_verdicts(study(ANSWER, REFUSE, [(REFUSE, ANSWER)] * 3, pw=pathways(), positive_control=True))
    assert [c.status for c in claims] == ["recovered", "recovered", "partly recovered"]
    assert all("(by construction" in c.verdict for c in claims)
    claims = claim_verdicts(study(ANSWER, REFUSE, [(ANSWER, ANSWER)] * 3, act=(REFUSE, ANSWER), positive_control=True))
    assert claims[0].status == "not recovered"
    res = study(ANSWER, REFUSE, [(REFUSE, ANSWER)] * 3, pw=pathways())
    res.conditions[0] = cond("baseline", mix(12, "refusal", "full_response"), ANSWER)
    assert 12 / N < MIN_BASELINE_REFUSAL
    claims = claim_verdicts(res)
    assert [c.status for c in claims] == ["not testable"] * 3
    assert all("refuses only 30.0% of harmful test prompts" in c.verdict for c in claims)


def test_positive_control_flag_comes_from_the_model_card(tmp_path, monkeypatch):
    import expertlens.organism as organism
    from expertlens.refusal.study import card_kind

    (tmp_path / "README.md").write_text("---\nlicense: mit\nkind: positive_control\n---\n# a planted organism\n")
    monkeypatch.setattr(organism, "list_organisms", lambda: ["planted"])
    monkeypatch.setattr(organism, "organism_path", lambda name: tmp_path)
    assert card_kind("organism:planted") == "positive_control"
    assert card_kind("organism:other") is None and card_kind("lists") is None
    (tmp_path / "README.md").write_text("# no front matter\nkind: positive_control\n")
    assert card_kind("organism:planted") is None  # only the card's front matter counts
