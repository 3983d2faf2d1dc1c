"""outcome_sweep marks the chosen coefficient where it is, on linear and on log coefficient axes."""

import math

from expertlens.plot import outcome_sweep

RATES = {"refusal": [0.9, 0.5, 0.1, 0.0], "full response (ASR)": [0.1, 0.3, 0.2, 0.0]}


def _marker(fig):
    (shape,) = fig.layout.shapes
    (note,) = fig.layout.annotations
    return fig.layout.xaxis.type, shape.x0, shape.x1, note.x


def test_chosen_label_on_a_log_axis_is_in_log10_units():
    # on a log axis plotly places annotations by log10 of the value (c = 100 at 2; at 100 the axis ran to 1e100),
    # while the line shape takes the value itself (checked in a PNG export)
    fig = outcome_sweep([10, 50, 100, 400], RATES, kl=[0.1, 0.5, 1.0, 2.0], chosen=100)
    kind, x0, x1, at = _marker(fig)
    assert kind == "log"
    assert x0 == x1 == 100.0
    assert at == math.log10(100)


def test_chosen_marker_on_a_linear_axis_is_the_value():
    fig = outcome_sweep([1, 2, 3, 4], RATES, chosen=3)
    kind, x0, x1, at = _marker(fig)
    assert kind == "linear"
    assert x0 == x1 == at == 3.0
