"""Loops over generation steps (issue 25, item 5): open loops that ask nothing of the model are stopped with an
error instead of hanging, and "was never reached" is only said when it is true."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import nnsight
import pytest
import torch

from expertlens import ExpertModel
from expertlens.loops import IDLE_LIMIT, OpenLoopError
from expertlens.testing import tiny_model, tiny_tokenizer

# Run in a child process with a timeout: before the guard, each of these spun forever (nnsight 0.8.1's open
# loop ends only when a request in its body outruns the run).
_HANGS = textwrap.dedent('''
    import json, time, warnings
    warnings.simplefilter("ignore")
    from expertlens import ExpertModel
    from expertlens.testing import tiny_model, tiny_tokenizer
    model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
    out = {}
    def case(name, fn):
        t = time.perf_counter()
        try:
            fn()
            out[name] = "ok"
        except Exception as err:
            out[name] = type(err).__name__ + ": " + str(err)
        out[name + ".s"] = time.perf_counter() - t
    def with_block():
        with model.generate("hi", max_new_tokens=3) as tracer:
            with tracer.all():
                pass
    def for_loop():
        with model.generate("hi", max_new_tokens=3) as tracer:
            for step in tracer.iter[:]:
                pass
    def reads_early_steps_only():
        with model.generate("hi", max_new_tokens=3) as tracer:
            for step in tracer.all():
                if step < 2:
                    model.logits.save()
    case("with_block", with_block)
    case("for_loop", for_loop)
    case("reads_early_steps_only", reads_early_steps_only)
    case("after", lambda: model.generate("hi", max_new_tokens=2).__enter__)  # the model still works
    with model.trace("hi"):
        x = model.logits.save()
    out["trace_after"] = list(x.shape)
    print("RESULT" + json.dumps(out))
''')


def test_open_loops_that_ask_nothing_are_refused_not_hung():
    proc = subprocess.run([sys.executable, "-c", _HANGS], capture_output=True, text=True, timeout=240)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, proc.stderr[-3000:]
    out = json.loads(line[len("RESULT"):])
    for name in ("with_block", "for_loop", "reads_early_steps_only"):
        assert out[name].startswith("OpenLoopError: tracer.all() / tracer.iter[:] handed out"), out[name]
        assert "tracer.iter[:N]" in out[name] and out[name + ".s"] < 30
    assert out["trace_after"][0] == 1


@pytest.fixture(scope="module")
def model():
    return ExpertModel(tiny_model("olmoe"), tiny_tokenizer())


def _never_reached(record) -> list[str]:
    return [str(w.message) for w in record if "never reached" in str(w.message) or "tracer.result" in str(w.message)]


def test_bounded_loop_reads_every_step_and_warns_nothing(model):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with model.generate(["hello", "hi"], max_new_tokens=3) as tracer:
            outs = nnsight.save([])
            for _step in tracer.iter[:3]:
                outs.append(model.layers[1].resid_pre)
            ids = tracer.result.save()
    assert [tuple(o.shape) for o in outs] == [(2, 5, 64), (2, 1, 64), (2, 1, 64)]
    assert ids.shape[1] == 5 + 3 and not _never_reached(record)


def test_open_loop_that_reads_ends_with_a_true_warning_naming_the_point(model):
    with pytest.warns(UserWarning, match=r"layers\[1\].resid_pre at step 3 was never reached: .*the run made 3 "
                                         r"forwards \(steps 0..2\)"):  # fmt: skip
        with model.generate("hi", max_new_tokens=3) as tracer:
            outs = nnsight.save([])
            for _step in tracer.all():
                outs.append(model.layers[1].resid_pre)
    assert len(outs) == 3


def test_a_loop_longer_than_the_run_is_told_so(model):
    with pytest.warns(UserWarning, match=r"logits at step 2 was never reached: the loop asked for step 2 and the "
                                         r"run made 2 forwards"):  # fmt: skip
        with model.generate("hi", max_new_tokens=2) as tracer:
            outs = nnsight.save([])
            for _step in tracer.iter[:5]:
                outs.append(model.logits)
    assert len(outs) == 2


def test_result_read_inside_a_loop_is_explained_not_called_an_unmade_step(model):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with model.generate("hi", max_new_tokens=3) as tracer:
            for _step in tracer.iter[:3]:
                ids = tracer.result.save()
    (text,) = _never_reached(record)
    assert text.startswith("tracer.result was read inside a tracer.iter loop: a run has one result")
    assert "the run made 3 forwards" in text and "did not make" not in text
    assert ids.shape[1] >= 3  # step 0's read was served


def test_open_loop_whose_body_reads_on_a_later_step_still_runs(model):
    with model.generate("hi", max_new_tokens=3) as tracer:
        got = nnsight.save([])
        for step in tracer.all():
            if step == 2:
                got.append(model.logits)
            if step == 3:
                break
    assert [tuple(g.shape) for g in got] == [(1, 1, 256)] and IDLE_LIMIT > 1000
    assert issubclass(OpenLoopError, RuntimeError) and torch.is_tensor(got[0])
