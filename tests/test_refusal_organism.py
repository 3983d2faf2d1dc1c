"""The main job on the bundled organism: `expertlens refusal` end to end, checked for what any refusing organism
must show and for a complete, honest results.json (no organism's numbers are hard-coded)."""

from __future__ import annotations

import json

import pytest

from expertlens.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("refusal")
    assert main(["refusal", "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def _cond(r, key):
    return next(c for c in r["conditions"] if c["key"] == key)


def test_three_class_rates_with_intervals_on_every_condition(results):
    _, r = results
    base = _cond(r, "baseline")
    # what makes it a refusal organism, whichever organism is the default
    assert base["bypass"]["refusal"]["k"] / base["bypass"]["refusal"]["n"] >= 0.9
    assert base["induce"]["refusal"]["k"] / base["induce"]["refusal"]["n"] <= 0.1
    for c in r["conditions"]:
        if c["bypass"] is None:
            assert c["note"], c["key"]
            continue
        for side in ("bypass", "induce"):
            o = c[side]
            ks = [o[k]["k"] for k in ("refusal", "full_response", "non_response")]
            assert sum(ks) == o["refusal"]["n"] == len(o["verdicts"]) > 0
            for k in ("refusal", "full_response", "non_response"):
                rate = o[k]["k"] / o[k]["n"]
                assert o[k]["lo"] <= rate <= o[k]["hi"]
            assert o["samples"]
        assert c["harmless_kl"] is not None and c["harmless_kl"] >= 0
        if "_control_" not in c["key"]:  # control draws skip the capability suite (no cost limit applies to them)
            assert c["capability"]["baseline"]["n"] > 0
    assert r["selected"]["layer"] < 0.8 * r["model"]["n_layers"]
    assert r["judge"]["calibration"]["uses_model_logprobs"] is True


def test_deviations_claims_controls_and_files(results):
    out, r = results
    settings = [d["setting"] for d in r["deviations"]]
    assert settings[0] == "routing positions" and "max_new_tokens" in settings
    assert [c["number"] for c in r["claims"]] == [1, 2, 3]
    for c in r["claims"]:
        assert c["status"] in ("supported", "partly supported", "not supported", "not testable")
        assert c["verdict"].startswith(("supported", "partly supported", "not supported", "not testable"))
    # the organism preset runs only the like-for-like random-expert controls (the ones the verdicts use), says so
    assert "same_search_control" in settings and all(c["key"] != "control" for c in r["conditions"])
    for c in r["claims"]:
        assert c["rule"] and {t["side"] for t in c["tests"]} <= {"bypass", "induce"}
    cm = r["causal_map"]
    assert len(cm["d_refusal"]["attention"]) == len(cm["d_refusal"]["moe"]) == r["model"]["n_layers"]
    assert set(r["pathways"]["shares"]) == {"attention", "moe", "both"}
    assert r["actadd_sweep"]["bypass_coeff"] in [p["coeff"] for p in r["actadd_sweep"]["points"]]
    for name in ("results.json", "directions.safetensors", "report.html"):
        assert (out / name).stat().st_size > 0


def test_controls_are_like_for_like_and_kl_matched_per_edit(results):
    """Method B's control draws come from method B's own layer, method A's from method A's layers in the same
    count; each draw's KL on each edit is the one its match found, within tolerance of the method's on that edit or
    marked as not matched; claim 2 tests method B against the draws on both sides."""
    _, r = results
    for method in ("method_a", "method_b"):
        m = _cond(r, method)
        ctrl = next((c for c in r["controls"] if c["method"] == method), None)
        if m["bypass"] is None:
            assert ctrl is None
            continue
        assert ctrl is not None and len(ctrl["draws"]) == r["config"]["n_control_draws"], ctrl["note"]
        own = sorted(lay for lay, _ in [(x["layer"], x["expert"]) for x in r["routing"]["selected"]])
        for d in ctrl["draws"]:
            c = _cond(r, d["key"])
            layers = sorted(lay for lay, _ in d["experts"])
            assert layers == ([m["params"]["layer"]] if method == "method_b" else own)
            for side, kl in (("bypass", c["harmless_kl"]), ("induce", c["induce_kl"])):
                match, target = d[side], m["harmless_kl"] if side == "bypass" else m["induce_kl"]
                assert match["target"] == target and match["kl"] == kl
                assert (abs(kl - target) <= match["tolerance"]) == match["matched"]
    c2 = r["claims"][1]
    if _cond(r, "method_b")["bypass"] is not None:
        vs = [t for t in c2["tests"] if t["a"] == _cond(r, "method_b")["label"] and "draws" in t["b"]]
        assert {t["side"] for t in vs} == {"bypass", "induce"} and all(len(t["b_rates"]) > 1 for t in vs)
