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
    # the organism preset runs only the KL-matched random-expert control (the one the verdicts use), and says so
    assert "same_search_control" in settings and all(c["key"] != "control" for c in r["conditions"])
    if _cond(r, "method_b")["bypass"] is not None and _cond(r, "control_matched")["bypass"] is not None:
        assert {p["side"] for p in r["paired"]} >= {"bypass", "induce"}
    cm = r["causal_map"]
    assert len(cm["d_refusal"]["attention"]) == len(cm["d_refusal"]["moe"]) == r["model"]["n_layers"]
    assert set(r["pathways"]["shares"]) == {"attention", "moe", "both"}
    assert r["actadd_sweep"]["bypass_coeff"] in [p["coeff"] for p in r["actadd_sweep"]["points"]]
    for name in ("results.json", "directions.safetensors", "report.html"):
        assert (out / name).stat().st_size > 0


def test_control_is_matched_to_method_b_in_harmless_kl(results):
    """Claim 2 compares method B with a random below-threshold expert at method B's harmless KL (both KLs
    reported): within the stated tolerance, or the results and the verdict say loudly that no match was found."""
    _, r = results
    b, m = _cond(r, "method_b"), _cond(r, "control_matched")
    if b["bypass"] is None:
        assert m["note"]
        return
    cm = r["control_match"]
    assert cm["target_kl"] == b["harmless_kl"] and cm["kl"] == m["harmless_kl"]
    assert cm["tolerance"] == max(0.1 * b["harmless_kl"], 0.005)
    verdict = r["claims"][1]["verdict"] + " ".join(r["claims"][1]["controls"])
    if cm["matched"]:
        assert abs(m["harmless_kl"] - b["harmless_kl"]) <= cm["tolerance"]
        assert f"{m['harmless_kl']:.3f} nats vs method B's {b['harmless_kl']:.3f}" in verdict
    else:
        assert "KL could not be matched" in m["note"] and "could not be matched" in verdict
    tested = {(p["a"], p["b"], p["side"]) for p in r["paired"]}
    assert (b["label"], m["label"], "bypass") in tested and (b["label"], m["label"], "induce") in tested
