"""Short reprs (issue 25, item 3): interventions by settings not values, the model's and the study's HTML."""

from __future__ import annotations

import torch

from expertlens import ExpertModel
from expertlens.interventions import AddVector, Compose, MaskExperts, MeanAblate, Patch, Positions, ZeroAblate
from expertlens.refusal.results import Claim, StudyResults
from expertlens.refusal.study import RefusalStudy
from expertlens.testing import tiny_model, tiny_tokenizer


def test_intervention_repr_shows_settings_shape_and_norm_not_values():
    v = torch.full((128,), 0.123456)
    steer = AddVector("resid_pre", v, coeff=2.0, layers=[1, 2], positions=Positions.last(1))
    text = repr(steer)
    assert text == (
        "AddVector(point='resid_pre', vector=tensor[128] norm=1.397, coeff=2.0, layers=[1, 2], "
        "positions=Positions(kind='last', arg=1))"
    )
    assert "0.1234" not in text and len(text) < 160
    assert repr(ZeroAblate("attn.output", layers=0)) == "ZeroAblate(point='attn.output', layers=0)"
    src = {("resid_pre", 1): torch.randn(2, 5, 64)}
    assert repr(Patch("resid_pre", src, layers=1)).startswith(
        "Patch(point='resid_pre', source={('resid_pre', 1): tensor[2, 5, 64] norm="
    )
    many = MeanAblate("moe.output", {i: torch.zeros(64) for i in range(6)})
    assert "(6 entries)" in repr(many) and repr(many).count("tensor[64]") == 3


def test_compose_repr_puts_each_part_on_its_own_short_line():
    parts = [AddVector("resid_pre", torch.randn(128), layers=1), ZeroAblate("attn.output", layers=0),
             MaskExperts({1: [0, 3]})]  # fmt: skip
    lines = repr(Compose(parts)).splitlines()
    assert lines[0] == "Compose(" and lines[-1] == ")" and len(lines) == 5
    assert lines[2] == "  ZeroAblate(point='attn.output', layers=0),"
    assert all(len(line) < 100 for line in lines)
    assert repr(Compose()) == "Compose()"
    assert repr(parts[0] + parts[1]) == repr(Compose(parts[:2]))  # `a + b` flattens into one Compose


def test_intervention_and_compose_html():
    steer = AddVector("resid_pre", torch.ones(64), coeff=-1.5, layers=1)
    html = steer._repr_html_()
    assert html.startswith("<table>") and "AddVector" in html and "tensor[64] norm=8" in html and "-1.5" in html
    both = Compose([steer, ZeroAblate("moe.output", layers=1)])._repr_html_()
    assert both.count("<li>") == 2 and "2 parts" in both


def test_model_html_lists_layers_families_and_points():
    model = ExpertModel(tiny_model("deepseek_v3"), tiny_tokenizer())
    html = model._repr_html_()
    assert "deepseek_v3" in html and "0 (dense)" in html and "top-2" in html
    assert "<code>layers[i].moe.router_logits</code>" in html and "[b, p, E]" in html
    row = html.split("<code>moe.router_logits</code>")[1].split("</tr>")[0]
    assert "<td>1</td>" in row  # the MoE points sit on the MoE layer only
    assert "read-only" in html.split("<code>moe.experts.mask</code>")[1].split("</tr>")[0]


def _study(claims):
    return RefusalStudy(StudyResults(
        model={"family": "olmoe", "name": "/home/someone/expertlens/organism/checkpoints/olmoe-refusal"},
        config={}, preset="organism", data={}, judge={"name": "default"}, selected={}, selection={}, claims=claims,
    ))  # fmt: skip


def test_study_repr_names_the_organism_and_reads_claims_as_verdicts():
    claims = [Claim(1, "ActAdd transfers", "supported", "supported on this model: ..."),
              Claim(2, "Expert steering", "partly supported", "partly supported on this model: ..."),
              Claim(3, "Attention", "not supported", "not supported on this model: ...")]  # fmt: skip
    study = _study(claims)
    text = repr(study)
    assert text.startswith("RefusalStudy(olmoe-refusal, preset='organism'")
    assert "/home/someone" not in text
    assert text.endswith("claim 1: supported · claim 2: partly · claim 3: not supported)")
    html = study._repr_html_()
    assert "on olmoe-refusal" in html and "/home/someone" not in html
    assert "Claim 2: Expert steering" in html and "partly supported on this model" in html and "<table" in html
