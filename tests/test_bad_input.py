"""Bad input: every case raises a clear error and leaves the model exactly as it was.

Each case asserts the exception type, that the message names the offending value and what is
accepted, and that the model afterwards is bit-identical to before: module classes, hooks, hook
points, experts implementation, parameters, edit count and the logits of a no-op forward.

The table in docs/errors.md ("Every bad input and its message") is generated from these cases
(``python -m tests.test_bad_input`` rewrites it) and :func:`test_errors_doc_matches_the_cases`
fails when the two drift apart.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from expertlens import Direction, ExpertModel, PointError, UnsupportedModelError, resolve_family
from expertlens.attribution import LogitDiff
from expertlens.checks import ValidationError, check_truth
from expertlens.interventions import (
    AblateDirection,
    AddVector,
    ForceExperts,
    MaskExperts,
    OrthogonalizeWeights,
    Patch,
    Positions,
    RouterBias,
    SteerMoE,
    generate,
    run_logits,
)
from expertlens.testing import tiny_config, tiny_model, tiny_tokenizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
START, END = "<!-- bad-input-table:start -->", "<!-- bad-input-table:end -->"
IDS = torch.tensor([[5, 9, 11, 40]])  # [1, 4]


# ---- the state a bad input must not change ---------------------------------------------------


def fingerprint(hf) -> dict:
    try:
        with torch.no_grad():
            logits = hf(input_ids=IDS, use_cache=False).logits.clone()
    except Exception as err:  # noqa: BLE001 - a model that cannot run (meta weights, a corrupted case setup)
        logits = type(err).__name__
    return {
        "classes": [type(m) for m in hf.modules()],
        "modules": sorted(n for n, _ in hf.named_modules()),
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in hf.modules()],
        "edits": [len(getattr(m, "edits", ())) for m in hf.modules()]
        + [len(m.__dict__["_el_edit_state"].edits) for m in hf.modules() if "_el_edit_state" in m.__dict__]
        + [len(hf.__dict__.get("_el_weight_edits", ()))],
        "impl": hf.config._experts_implementation,
        "params": {n: p.detach().clone() for n, p in hf.named_parameters()},
        "logits": logits,
    }


def assert_same(before: dict, after: dict) -> None:
    for key in ("classes", "modules", "hooks", "edits", "impl"):
        assert before[key] == after[key], key
    assert before["params"].keys() == after["params"].keys()
    for n, p in before["params"].items():
        q = after["params"][n]
        assert (p.shape, p.dtype) == (q.shape, q.dtype) if p.is_meta else torch.equal(p, q), n
    if isinstance(before["logits"], str):
        assert before["logits"] == after["logits"]
    else:
        assert torch.equal(before["logits"], after["logits"])


_MODELS: dict[str, ExpertModel] = {}


def wrapped(family: str) -> ExpertModel:
    if family not in _MODELS:
        _MODELS[family] = ExpertModel(tiny_model(family), tiny_tokenizer())
    return _MODELS[family]


# ---- cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    given: str  # what the user did, for the docs table
    exc: type[BaseException]
    names: tuple[str, ...]  # the message names the offending value ...
    accepts: tuple[str, ...]  # ... and what is accepted
    run: Callable  # run(model, tmp) raises; model is the wrapped model of `family`
    family: str = "olmoe"
    fresh: Callable | None = None  # builds the HF model the case wraps itself (loading cases)
    wrap_fresh: bool = False  # wrap the fresh model before the case (run gets the ExpertModel)
    setup: Callable | None = None  # setup(model) before the bad call; teardown(model, token) after
    teardown: Callable | None = None


def _trace(fn):
    def run(model, tmp):
        with model.trace(IDS):
            fn(model)

    return run


def _intervene(*ivs):
    def run(model, tmp):
        with model.intervene(*ivs), model.trace(IDS):
            model.logits.save()

    return run


def _moe(model, layer=1):
    return model.layers[layer].moe


def _custom_code_folder(tmp: Path) -> Path:
    folder = tmp / "custom"
    folder.mkdir(exist_ok=True)
    cfg = {**tiny_config("olmoe").to_dict(), "model_type": "my_custom_moe",
           "auto_map": {"AutoConfig": "custom.MyConfig", "AutoModelForCausalLM": "custom.MyModel"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "custom.py").write_text("raise SystemExit('custom code ran')\n")
    return folder


def _direction_file(tmp: Path, name: str, tensors: dict, meta: str | None) -> Path:
    from safetensors.torch import save_file

    path = tmp / name
    save_file(tensors, str(path), metadata={"expertlens_direction": meta} if meta is not None else None)
    return path


def _pickle_file(tmp: Path) -> Path:
    path = tmp / "renamed.safetensors"
    torch.save({"vector": torch.ones(4)}, path)
    return path


def _edit(point, fn, layer=1):
    def run(model, tmp):
        h = model.add_edit(point, fn, layer=layer)
        try:
            with model.trace(IDS):
                model.logits.save()
        finally:
            h.remove()

    return run


def _weight_edits_setup(model):
    return [OrthogonalizeWeights(torch.randn(64, generator=torch.Generator().manual_seed(s))).apply(model)
            for s in (1, 2)]


def _weight_edits_teardown(model, handles):
    for h in reversed(handles):
        h.remove()


def _busy_setup(model):
    release = threading.Event()
    other = threading.Thread(target=release.wait, name="worker-1", daemon=True)
    other.start()
    model._module.__dict__["_el_trace_thread"] = other
    return release, other


def _busy_teardown(model, token):
    release, other = token
    model._module.__dict__.pop("_el_trace_thread", None)
    release.set()
    other.join()


def _offloaded_olmoe():
    from accelerate import cpu_offload

    hf = tiny_model("olmoe")
    cpu_offload(hf.get_input_embeddings(), execution_device="cpu")
    hf.hf_device_map = {"model.embed_tokens": "cpu", "": "cpu"}
    return hf


def _meta_olmoe():
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(tiny_config("olmoe"))


def _quantised(model):
    experts = model.hf_model.model.layers[1].mlp.experts
    original = experts.down_proj
    experts.down_proj = torch.nn.Parameter(torch.zeros(8, 64, 16, dtype=torch.uint8), requires_grad=False)
    return original


def _unquantise(model, original):
    model.hf_model.model.layers[1].mlp.experts.down_proj = original


V = torch.ones(64)
NAN = torch.full((64,), float("nan"))

CASES: list[Case] = [
    # ---- loading and wrapping ----
    Case("missing-folder", 'ExpertModel("/no/such/dir")', FileNotFoundError, ("/no/such/dir",), ("hub id",),
         lambda m, t: ExpertModel("/no/such/dir")),
    Case("file-not-folder", "ExpertModel(<a file>)", ValueError, ("is a file",), ("folder holding config.json",),
         lambda m, t: ExpertModel(str(_pickle_file(t)))),
    Case("custom-code", "ExpertModel(<folder whose config.json has auto_map>)", ValueError,
         ("own Python code",), ("built-in family", "trust_remote_code=True"),
         lambda m, t: ExpertModel(str(_custom_code_folder(t)))),
    Case("model-type", "ExpertModel(123)", TypeError, ("<class 'int'>",), ("hub name", "torch module"),
         lambda m, t: ExpertModel(123)),
    Case("loading-kwargs", "ExpertModel(hf_model, tok, dtype=torch.bfloat16)", TypeError, ("['dtype']",),
         ("name or path",), lambda m, t: ExpertModel(m, tiny_tokenizer(), dtype=torch.bfloat16),
         fresh=lambda: tiny_model("olmoe")),
    Case("unknown-family", 'ExpertModel(hf_model, tok, family="gpt2")', UnsupportedModelError, ("'gpt2'",),
         ("Supported families", "register_family"), lambda m, t: ExpertModel(m, tiny_tokenizer(), family="gpt2"),
         fresh=lambda: tiny_model("olmoe")),
    Case("forced-family", 'ExpertModel(olmoe_model, tok, family="qwen2_moe")', UnsupportedModelError,
         ("'qwen2_moe'", "no shared expert at 'shared_expert'"), ("resolves to family 'olmoe'", "drop family="),
         lambda m, t: ExpertModel(m, tiny_tokenizer(), family="qwen2_moe"), fresh=lambda: tiny_model("olmoe")),
    Case("wrong-table", "a qwen2_moe table without shared_expert_gate", ValidationError,
         ("layer 0", "MoE block output", "max|Δ|"), ("fp32 requires bit-identity", "shared expert, its gate"),
         lambda m, t: ExpertModel(m, tiny_tokenizer(), family=resolve_family("qwen2_moe").with_(shared_gate=None)),
         fresh=lambda: tiny_model("qwen2_moe")),
    Case("wrap-twice", "ExpertModel(model.hf_model, tok)", ValueError, ("already wrapped",),
         ("use the existing wrapper", ".restore()"), lambda m, t: ExpertModel(m.hf_model, tiny_tokenizer())),
    Case("validate-meta", "ExpertModel(<meta-device model>, tok, validate=True)", ValueError, ("meta device",),
         ("validate=False",), lambda m, t: ExpertModel(m, tiny_tokenizer(), validate=True), fresh=_meta_olmoe),
    # ---- addressing points ----
    Case("layer-range", "model.layers[99]", PointError, ("layer 99",), ("2 layers (0..1)",),
         lambda m, t: m.layers[99]),
    Case("layer-float", "model.layers[1.7]", TypeError, ("float 1.7",), ("must be an int", "numpy/torch integer"),
         lambda m, t: m.layers[1.7]),
    Case("layer-bool", "model.layers[True]", TypeError, ("bool True",), ("must be an int",),
         lambda m, t: m.layers[True]),
    Case("layer-str", 'model.layers["1"]', TypeError, ("str '1'",), ("must be an int",),
         lambda m, t: m.layers["1"]),
    Case("layer-tensor", "model.layers[torch.tensor([0, 1])]", TypeError, ("shape (2,)",), ("integer scalar",),
         lambda m, t: m.layers[torch.tensor([0, 1])]),
    Case("expert-range", "model.layers[1].moe.experts[9]", PointError, ("expert 9",), ("8 routed experts (0..7)",),
         lambda m, t: _moe(m).experts[9]),
    Case("expert-float", "model.layers[1].moe.experts[2.0]", TypeError, ("float 2.0",), ("must be an int",),
         lambda m, t: _moe(m).experts[2.0]),
    Case("dense-layer", "model.layers[0].moe on deepseek_v3", PointError, ("layer 0", "dense layer"),
         ("MoE layers are [1]",), lambda m, t: m.layers[0].moe, family="deepseek_v3"),
    Case("moe-typo", "model.layers[1].moe.router_logit", AttributeError, ("'router_logit'",),
         ("points are", "router_logits"), lambda m, t: _moe(m).router_logit),
    Case("layer-typo", "model.layers[1].resid", AttributeError, ("'resid'",), ("resid_pre", "resid_post"),
         lambda m, t: m.layers[1].resid),
    Case("attn-typo", "model.layers[1].attn.heads", AttributeError, ("'heads'",), ("head_out", "z"),
         lambda m, t: m.layers[1].attn.heads),
    Case("no-shared", "model.layers[1].moe.shared_out = x on olmoe", PointError, ("'olmoe'",), ("no shared expert",),
         _trace(lambda m: setattr(_moe(m), "shared_out", torch.zeros(1, 4, 64)))),
    Case("edit-read-only", 'model.add_edit("moe.experts.mask", fn, layer=1)', PointError, ("'moe.experts.mask'",),
         ("editable points are", "moe.topk_indices"), lambda m, t: m.add_edit("moe.experts.mask", lambda x, c: x, 1)),
    Case("edit-unknown", 'model.add_edit("moe.router_prob", fn, layer=1)', PointError, ("'moe.router_prob'",),
         ("editable points are", "moe.router_probs"), lambda m, t: m.add_edit("moe.router_prob", lambda x, c: x, 1)),
    Case("edit-model-point-layer", 'model.add_edit("logits", fn, layer=1)', PointError, ("'logits'",),
         ("model-level", "do not pass a layer"), lambda m, t: m.add_edit("logits", lambda x, c: x, layer=1)),
    Case("edit-no-layer", 'model.add_edit("resid_pre", fn)', PointError, ("'resid_pre'",), ("needs a layer (0..1)",),
         lambda m, t: m.add_edit("resid_pre", lambda x, c: x)),
    Case("out-of-order", "reading moe.output, then moe.router_logits of one layer", Exception,
         ("layers[1].moe.router_logits",), ("computation order", "separate invoke"),
         _trace(lambda m: (_moe(m).output.save(), _moe(m).router_logits.save()))),
    Case("two-threads", "model.trace(...) while another thread traces the model", RuntimeError,
         ("'worker-1'",), ("Trace from one thread",), lambda m, t: m.trace(IDS), setup=_busy_setup,
         teardown=_busy_teardown),
    # ---- writes ----
    Case("indices-range", "moe.topk_indices = 8 (8 experts)", PointError, ("[8]", "layers[1].moe.topk_indices"),
         ("expert ids must be in 0..7",), _trace(lambda m: setattr(_moe(m), "topk_indices", torch.full((1, 4, 2), 8)))),
    Case("indices-negative", "moe.topk_indices = -1", PointError, ("[-1]",), ("0..7",),
         _trace(lambda m: setattr(_moe(m), "topk_indices", torch.full((1, 4, 2), -1)))),
    Case("indices-float", "moe.topk_indices = <float tensor>", TypeError, ("torch.float32",), ("integer tensor",),
         _trace(lambda m: setattr(_moe(m), "topk_indices", torch.zeros(1, 4, 2)))),
    Case("indices-shape", "moe.topk_indices = <[1, 4] tensor>", PointError, ("(1, 4)",), ("(1, 4, 2)", "top_k"),
         _trace(lambda m: setattr(_moe(m), "topk_indices", torch.zeros(1, 4, dtype=torch.long)))),
    Case("weights-nan", "moe.topk_weights = NaN", PointError, ("NaN or inf",), ("only finite values",),
         _trace(lambda m: setattr(_moe(m), "topk_weights", torch.full((1, 4, 2), float("nan"))))),
    Case("weights-shape", "moe.topk_weights = <[1, 4, 3] tensor>", PointError, ("(1, 4, 3)",), ("(1, 4, 2)",),
         _trace(lambda m: setattr(_moe(m), "topk_weights", torch.zeros(1, 4, 3)))),
    Case("logits-shape", "moe.router_logits = <[1, 4, 7] tensor>", PointError, ("(1, 4, 7)",),
         ("(1, 4, 8)", "n_experts"), _trace(lambda m: setattr(_moe(m), "router_logits", torch.zeros(1, 4, 7)))),
    Case("logits-dtype", "moe.router_logits = <int tensor>", TypeError, ("torch.int64",), ("floating-point",),
         _trace(lambda m: setattr(_moe(m), "router_logits", torch.zeros(1, 4, 8, dtype=torch.long)))),
    Case("expert-out-shape", "moe.expert_out = <[1, 4, 64] tensor>", PointError, ("(1, 4, 64)",),
         ("(1, 4, 2, 64)", "every axis"), _trace(lambda m: setattr(_moe(m), "expert_out", torch.zeros(1, 4, 64)))),
    Case("head-out-shape", "attn.head_out = <[b, p, d] tensor>", PointError, ("(1, 4, 64)",),
         ("(1, 4, 4, 64)", "heads"), _trace(lambda m: setattr(m.layers[1].attn, "head_out", torch.zeros(1, 4, 64)))),
    Case("z-shape", "attn.z = <[b, p, d] tensor>", PointError, ("(1, 4, 64)",), ("(1, 4, 4, 16)", "d_head"),
         _trace(lambda m: setattr(m.layers[1].attn, "z", torch.zeros(1, 4, 64)))),
    Case("resid-inf", "resid_post = inf", PointError, ("NaN or inf",), ("only finite",),
         _trace(lambda m: setattr(m.layers[0], "resid_post", torch.full((1, 4, 64), float("inf"))))),
    Case("resid-list", "resid_pre = [0.0] * 64", TypeError, ("list",), ("must be a tensor", "(1, 4, 64)"),
         _trace(lambda m: setattr(m.layers[1], "resid_pre", [0.0] * 64))),
    Case("resid-width", "resid_pre = <[1, 4, 32] tensor>", PointError, ("(1, 4, 32)",),
         ("(1, 4, 64)", "broadcasts"), _trace(lambda m: setattr(m.layers[1], "resid_pre", torch.zeros(1, 4, 32)))),
    Case("output-overflow", "moe.output = 1e300 (float64) in a float32 model", PointError,
         ("overflows", "torch.float32"), ("rescale",),
         _trace(lambda m: setattr(_moe(m), "output", torch.full((1, 4, 64), 1e300, dtype=torch.float64)))),
    Case("logits-point-shape", "model.logits = <[1, 4, 100] tensor>", PointError, ("(1, 4, 100)",), ("(1, 4, 256)",),
         _trace(lambda m: setattr(m, "logits", torch.zeros(1, 4, 100)))),
    Case("embed-nan", "model.embed = NaN", PointError, ("embed", "NaN"), ("only finite",),
         _trace(lambda m: setattr(m, "embed", torch.full((1, 4, 64), float("nan"))))),
    Case("one-expert-shape", "moe.experts[3].output = <[5, 64] tensor>", PointError, ("(5, 64)",), ("n_routed",),
         _trace(lambda m: setattr(_moe(m).experts[3], "output", torch.zeros(5, 64)))),
    Case("mlp-nan", "mlp.output = NaN on a dense layer", PointError, ("layers[0].mlp.output", "NaN"),
         ("only finite",), _trace(lambda m: setattr(m.layers[0].mlp, "output", torch.full((1, 4, 64), float("nan")))),
         family="deepseek_v3"),
    Case("attn-dtype", "attn.output = <bool tensor>", TypeError, ("torch.bool",), ("floating-point",),
         _trace(lambda m: setattr(m.layers[0].attn, "output", torch.zeros(1, 4, 64, dtype=torch.bool)))),
    Case("shared-shape", "moe.shared_out = <[1, 4, 32] tensor> on qwen2_moe", PointError, ("(1, 4, 32)",),
         ("(1, 4, 64)",), _trace(lambda m: setattr(_moe(m), "shared_out", torch.zeros(1, 4, 32))), family="qwen2_moe"),
    Case("resid-mid-nan", "resid_mid = NaN", PointError, ("resid_mid", "NaN"), ("only finite",),
         _trace(lambda m: setattr(m.layers[1], "resid_mid", torch.full((1, 4, 64), float("nan"))))),
    # ---- edit functions ----
    Case("edit-shape", "an edit returning x[..., :32]", PointError, ("(1, 4, 32)",),
         ("(1, 4, 64)", "shape it was given"), _edit("moe.output", lambda x, c: x[..., :32])),
    Case("edit-none", "an edit returning None", TypeError, ("NoneType",), ("must return a tensor",),
         _edit("resid_pre", lambda x, c: None)),
    Case("edit-index-float", "a topk_indices edit returning floats", TypeError, ("torch.float32",),
         ("integer tensor",), _edit("moe.topk_indices", lambda x, c: x.float())),
    # ---- selectors ----
    Case("layers-float", "AddVector(..., layers=[1.7])", TypeError, ("1.7", "float"), ("int (or numpy/torch",),
         _intervene(AddVector("resid_pre", V, layers=[1.7]))),
    Case("layers-bool", "AddVector(..., layers=[True])", TypeError, ("True", "bool"), ("floats and bools are refused",),
         _intervene(AddVector("resid_pre", V, layers=[True]))),
    Case("layers-str", 'AddVector(..., layers="first")', ValueError, ("'first'",), ("'all'",),
         _intervene(AddVector("resid_pre", V, layers="first"))),
    Case("layers-range", "AddVector(..., layers=99)", PointError, ("layer 99",), ("(0..1)",),
         _intervene(AddVector("resid_pre", V, layers=99))),
    Case("layers-set", "AddVector(..., layers={0, 1})", TypeError, ("set",), ("a list of them", "slice"),
         _intervene(AddVector("resid_pre", V, layers={0, 1}))),
    Case("aliased-keys", "MaskExperts({1: [2], -1: [3]})", ValueError, ("1 and -1", "layer 1"), ("each layer once",),
         _intervene(MaskExperts({1: [2], -1: [3]}))),
    Case("float-key", "MaskExperts({1.0: [2]})", TypeError, ("1.0", "float"), ("ints (or numpy/torch integers)",),
         _intervene(MaskExperts({1.0: [2]}))),
    Case("expert-out-of-range", "MaskExperts({1: [9]})", PointError, ("expert 9",), ("0..7",),
         _intervene(MaskExperts({1: [9]}))),
    Case("expert-float-id", "MaskExperts({1: [2.0]})", TypeError, ("2.0", "float"), ("ints",),
         _intervene(MaskExperts({1: [2.0]}))),
    Case("expert-str", 'MaskExperts({1: "2"})', TypeError, ("'2'",), ("or a list of them",),
         _intervene(MaskExperts({1: "2"}))),
    Case("mask-too-many", "MaskExperts({1: range(7)})", ValueError, ("masking 7 of 8",), ("at most 6",),
         _intervene(MaskExperts({1: list(range(7))}))),
    Case("mask-dense", "MaskExperts({0: [1]}) on deepseek_v3", PointError, ("layer 0", "dense"), ("MoE layers are",),
         _intervene(MaskExperts({0: [1]})), family="deepseek_v3"),
    Case("mask-force-conflict", "MaskExperts({1: [3]}) + ForceExperts({1: [3]})", ValueError,
         ("expert 3 at layer 1", "MaskExperts (#1)", "ForceExperts (#2)"), ("Drop one of them",),
         _intervene(MaskExperts({1: [3]}), ForceExperts({1: [3]}))),
    Case("steer-mask-conflict", "SteerMoE(activate={1: [2]}) + MaskExperts({1: [2]})", ValueError,
         ("expert 2 at layer 1", "SteerMoE (#1)"), ("Drop one of them",),
         _intervene(SteerMoE({1: [2]}), MaskExperts({1: [2]}))),
    Case("force-too-many", "ForceExperts({1: [0, 1, 2]}) with top_k=2", ValueError, ("3 experts",),
         ("force at most 2",), _intervene(ForceExperts({1: [0, 1, 2]}))),
    Case("force-margin", "ForceExperts({1: [0]}, margin=-1)", ValueError, ("-1",), ("> 0",),
         _intervene(ForceExperts({1: [0]}, margin=-1))),
    Case("force-margin-type", 'ForceExperts({1: [0]}, margin="big")', TypeError, ("'big'",), ("real number",),
         _intervene(ForceExperts({1: [0]}, margin="big"))),
    Case("mask-not-dict", 'MaskExperts([1, 2])', TypeError, ("list",), ("dict {layer: [experts]}",),
         _intervene(MaskExperts([1, 2]))),
    Case("positions-str", 'AddVector(..., positions="middle")', ValueError, ("'middle'",),
         ("'all', 'prompt', 'generated'",), _intervene(AddVector("resid_pre", V, positions="middle"))),
    Case("positions-float", "AddVector(..., positions=[1.5])", TypeError, ("1.5", "float"), ("ints",),
         _intervene(AddVector("resid_pre", V, positions=[1.5]))),
    Case("positions-last", "Positions.last(0)", ValueError, ("0",), ("positive int",),
         lambda m, t: Positions.last(0)),
    # ---- vectors and interventions ----
    Case("vector-shape", "AddVector(..., vector=<[32] tensor>)", ValueError, ("(32,)",), ("(64,)",),
         _intervene(AddVector("resid_pre", torch.ones(32), layers=1))),
    Case("vector-nan", "AddVector(..., vector=NaN)", ValueError, ("NaN or inf",), ("only finite",),
         _intervene(AddVector("resid_pre", NAN, layers=1))),
    Case("vector-overflow", "AddVector(..., vector=1e300 float64) in a float32 model", ValueError,
         ("overflows", "1e+300"), ("rescale",),
         _intervene(AddVector("resid_pre", torch.full((64,), 1e300, dtype=torch.float64), layers=1))),
    Case("vector-type", 'AddVector(..., vector="up")', TypeError, ("str",), ("torch.Tensor or expertlens.Direction",),
         _intervene(AddVector("resid_pre", "up", layers=1))),
    Case("zero-direction", "AblateDirection(torch.zeros(64))", ValueError, ("zero vector",), ("non-zero [d_model]",),
         _intervene(AblateDirection(torch.zeros(64)))),
    Case("ablate-writes", 'AblateDirection(v, writes=("ffn",))', ValueError, ("'ffn'",), ("'resid_pre', 'attn'",),
         _intervene(AblateDirection(V, writes=("ffn",)))),
    Case("ortho-post-norm", "OrthogonalizeWeights(v) on flex_olmo", ValueError, ("post-norm",), ("AblateDirection",),
         lambda m, t: OrthogonalizeWeights(V).apply(m), family="flex_olmo"),
    Case("ortho-meta", "OrthogonalizeWeights(v) on an offloaded model", ValueError,
         ("model.embed_tokens.weight", "meta device"), ("without offloading", "AblateDirection"),
         lambda m, t: OrthogonalizeWeights(V).apply(m), fresh=_offloaded_olmoe, wrap_fresh=True),
    Case("ortho-quantised", "OrthogonalizeWeights(v) on uint8-packed expert weights", ValueError,
         ("down_proj", "torch.uint8"), ("unquantised",), lambda m, t: OrthogonalizeWeights(V).apply(m),
         setup=_quantised, teardown=_unquantise),
    Case("ortho-order", "removing the first of two weight edits first", RuntimeError, ("#1 of 2",),
         ("reverse order", "clear_edits()"), lambda m, t: m._bad_handles[0].remove(),
         setup=lambda m: setattr_return(m, "_bad_handles", _weight_edits_setup(m)),
         teardown=lambda m, h: (_weight_edits_teardown(m, h), object.__delattr__(m, "_bad_handles"))),
    Case("patch-nan", "Patch(point, source=NaN)", ValueError, ("NaN/inf",), ("only finite sources",),
         _intervene(Patch("resid_pre", torch.full((1, 4, 64), float("nan")), layers=1))),
    Case("patch-shape", "Patch(point, source=<[1, 4, 32] tensor>)", ValueError, ("(1, 4, 32)",),
         ("[batch, pos, 64]",), _intervene(Patch("resid_pre", torch.zeros(1, 4, 32), layers=1))),
    Case("bias-shape", "RouterBias({1: <[7] tensor>})", ValueError, ("(7,)",), ("(8,)",),
         _intervene(RouterBias({1: torch.zeros(7)}))),
    Case("bias-nan", "RouterBias({1: NaN})", ValueError, ("NaN/inf",), ("only finite",),
         _intervene(RouterBias({1: torch.full((8,), float("nan"))}))),
    Case("generate-tokens", "generate(model, prompts, max_new_tokens=0)", ValueError, ("0",), ("positive int",),
         lambda m, t: generate(m, ["hi"], 0)),
    Case("batch-size", "run_logits(model, prompts, batch_size=0)", ValueError, ("batch_size",), ("positive",),
         lambda m, t: run_logits(m, ["hi"], batch_size=0)),
    # ---- files ----
    Case("load-directory", "Direction.load(<a directory>)", IsADirectoryError, ("is a directory",),
         ("a .safetensors file written by Direction.save",), lambda m, t: Direction.load(t)),
    Case("load-missing", 'Direction.load("nope.safetensors")', FileNotFoundError, ("nope.safetensors",),
         ("written by Direction.save",), lambda m, t: Direction.load(t / "nope.safetensors")),
    Case("load-pickle", "Direction.load(<torch.save file renamed .safetensors>)", ValueError,
         ("renamed.safetensors", "pickle"), ("Direction(v).save(path)",), lambda m, t: Direction.load(_pickle_file(t))),
    Case("load-garbage", "Direction.load(<random bytes>)", ValueError, ("garbage.safetensors", "not a readable"),
         ("safetensors",), lambda m, t: Direction.load(_write(t / "garbage.safetensors", b"\x05" * 64))),
    Case("load-two-tensors", "Direction.load(<file with tensors a, b>)", ValueError, ("['a', 'b']",),
         ("exactly one, named 'vector'",),
         lambda m, t: Direction.load(_direction_file(t, "two.safetensors", {"a": V.clone(), "b": V.clone()}, None))),
    Case("load-int-vector", "Direction.load(<file with an int64 vector>)", ValueError, ("torch.int64",),
         ("floating-point",), lambda m, t: Direction.load(
             _direction_file(t, "int.safetensors", {"vector": torch.ones(4, dtype=torch.long)}, None))),
    Case("load-nan-vector", "Direction.load(<file with NaN>)", ValueError, ("NaN or inf",), ("only finite",),
         lambda m, t: Direction.load(_direction_file(t, "nan.safetensors", {"vector": NAN}, None))),
    Case("load-empty-vector", "Direction.load(<file with a [0] vector>)", ValueError, ("(0,)",), ("non-empty",),
         lambda m, t: Direction.load(_direction_file(t, "empty.safetensors", {"vector": torch.ones(0)}, None))),
    Case("load-meta-type", 'Direction.load(<metadata layer="x">)', ValueError, ("'layer'", "'x'"),
         ("int or null",), lambda m, t: Direction.load(
             _direction_file(t, "meta.safetensors", {"vector": V}, json.dumps({"layer": "x"})))),
    Case("load-meta-json", "Direction.load(<metadata that is not JSON>)", ValueError, ("not valid JSON",),
         ("expertlens_direction",),
         lambda m, t: Direction.load(_direction_file(t, "json.safetensors", {"vector": V}, "{not json"))),
    Case("load-meta-list", "Direction.load(<metadata that is a JSON list>)", ValueError, ("list",),
         ("JSON object",), lambda m, t: Direction.load(_direction_file(t, "list.safetensors", {"vector": V}, "[1]"))),
    Case("unit-zero", "Direction(torch.zeros(4)).unit()", ValueError, ("zero direction",), ("normalise",),
         lambda m, t: Direction(torch.zeros(4)).unit()),
    # ---- checks ----
    Case("truth-edits", "check_truth(model) with an edit registered", ValueError, ("1 edit(s)",), ("clear_edits()",),
         lambda m, t: check_truth(m), setup=lambda m: m.add_edit("resid_pre", lambda x, c: x, layer=1),
         teardown=lambda m, h: h.remove()),
    Case("truth-ids", "check_truth(model, torch.ones(2, 3))", ValueError, ("tensor(",),
         ("[batch, pos] integer tensor",), lambda m, t: check_truth(m, torch.ones(2, 3))),
    Case("logit-diff-softcap", "direct_attribution(LogitDiff) on a soft-capped model", ValueError, ("c = 30.0",),
         ("attribute a direction instead",), lambda m, t: _softcap_attribution(m), fresh=lambda: _softcapped()),
    # ---- silent until issue 24 (tests/test_silent_cases.py checks the values) ----
    Case("inplace-nan-logits", "moe.router_logits[..., 0] = NaN (in place)", PointError,
         ("layers[1].moe.router_logits", "NaN or +inf"), ("-inf for experts a token must never use",),
         _trace(lambda m: _moe(m).router_logits.__setitem__((..., 0), float("nan")))),
    Case("inplace-ids", "moe.topk_indices[..., 0] = 99 (in place)", PointError, ("[99]",),
         ("expert ids must be in 0..7",), _trace(lambda m: _moe(m).topk_indices.__setitem__((..., 0), 99))),
    Case("inplace-shape", "resid_post[..., 0] = <[7] tensor> (in place)", PointError,
         ("model.layers[1].resid_post, shape (1, 4, 64)",), ("broadcasts to the indexed part",),
         _trace(lambda m: m.layers[1].resid_post.__setitem__((..., 0), torch.zeros(7)))),
    Case("read-outside-trace", "model.layers[1].moe.router_logits outside a trace", PointError,
         ("model.layers[1].moe.router_logits",), ("inside `with model.trace(...)`",),
         lambda m, t: m.layers[1].moe.router_logits),
    Case("write-complex", "resid_post = <complex tensor>", TypeError, ("complex dtype torch.complex64",),
         ("real floating-point",),
         _trace(lambda m: setattr(m.layers[1], "resid_post", torch.ones(1, 4, 64, dtype=torch.complex64)))),
    Case("trace-empty", 'model.trace("")', ValueError, ("the prompt is empty",), ("at least one token",),
         lambda m, t: m.trace("")),
    Case("run-logits-empty", 'run_logits(model, ["hi", ""])', ValueError, ("prompt 1 ('')",), ("at least one token",),
         lambda m, t: run_logits(m, ["hi", ""])),
    Case("rows-bools", "AddVector(..., rows=[True, False])", TypeError, ("rows=[True, False]",),
         ("torch.tensor([True, False])",), lambda m, t: run_logits(m, ["hi", "hello"],
                                                                   AddVector("resid_pre", V, layers=1,
                                                                             rows=[True, False]))),
    Case("rows-float", "AddVector(..., rows=[0.9])", TypeError, ("element 0.9",), ("a list of row numbers",),
         _intervene(AddVector("resid_pre", V, layers=1, rows=[0.9]))),
    Case("indices-float-pos", "Positions.indices([1.7])", TypeError, ("element 1.7",), ("accepted are ints",),
         lambda m, t: Positions.indices([1.7])),
    Case("last-bool", "Positions.last(True)", ValueError, ("got True",), ("positive int",),
         lambda m, t: Positions.last(True)),
    Case("position-past-end", "AddVector(..., positions=[50]) on a 4-token prompt", ValueError,
         ("position 50", "4-token"), ("accepted are 0..3 or -4..-1",),
         _intervene(AddVector("resid_pre", V, layers=1, positions=[50]))),
    Case("position-before-start", "AddVector(..., positions=[-100]) on a 4-token prompt", ValueError,
         ("position -100",), ("accepted are -4..-1",),
         _intervene(AddVector("resid_pre", V, layers=1, positions=[-100]))),
    Case("mask-rows", "Positions.mask(<[3, 4] mask>) on a batch of 2", ValueError, ("3 rows", "batch has 2"),
         ("[2, total]",), lambda m, t: run_logits(m, ["hiya", "hola"], AddVector(
             "resid_pre", V, layers=1, positions=Positions.mask(torch.ones(3, 4, dtype=torch.bool))))),
    Case("layers-empty-slice", "AddVector(..., layers=slice(5, 9)) on 2 layers", PointError,
         ("layers=slice(5, 9, None) selects no layer",), ("2 layers (0..1)",),
         _intervene(AddVector("resid_pre", V, layers=slice(5, 9)))),
    Case("bias-keys", "RouterBias({1: b, -1: b})", ValueError, ("keys 1 and -1",), ("give each layer once",),
         _intervene(RouterBias({1: torch.zeros(8), -1: torch.zeros(8)}))),
    Case("nested-mask-force", "intervene(MaskExperts({1: [3]})) around intervene(ForceExperts({1: [3]}))",
         ValueError, ("expert 3 at layer 1", "attached earlier"), ("Drop one",),
         lambda m, t: _nested_conflict(m)),
    Case("vector-complex", "AddVector(..., vector=<complex>)", TypeError, ("complex dtype",), ("accepted are real",),
         _intervene(AddVector("resid_pre", V.to(torch.complex64), layers=1))),
    Case("coeff-overflow", "AddVector(coeff=1e5) on an fp16 model", ValueError, ("coeff 100000", "torch.float16"),
         ("lower coeff",), lambda m, t: _intervene(AddVector("resid_pre", V, coeff=1e5, layers=1))(m, t),
         fresh=lambda: tiny_model("olmoe").half(), wrap_fresh=True),
    Case("direction-family", "AddVector(Direction(..., family='qwen3_moe')) on olmoe", ValueError,
         ("'qwen3_moe'", "'olmoe'"), ("direction.vector",),
         _intervene(AddVector("resid_pre", Direction(V, family="qwen3_moe"), layers=1))),
    Case("save-nan-direction", "Direction(NaN).save(path)", ValueError, ("NaN or inf",), ("only finite",),
         lambda m, t: Direction(NAN).save(t / "nan.safetensors")),
    Case("logit-diff-bools", "LogitDiff([True], [False])", TypeError, ("True is a bool",),
         ("token ids (ints) and token strings",), lambda m, t: LogitDiff([True], [False])),
]


def _nested_conflict(model):
    with model.intervene(MaskExperts({1: [3]})), model.intervene(ForceExperts({1: [3]})):
        pass


def setattr_return(obj, name, value):
    object.__setattr__(obj, name, value)
    return value


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _softcapped():
    hf = tiny_model("olmoe")
    hf.config.final_logit_softcapping = 30.0
    return hf


def _softcap_attribution(hf):
    from expertlens.attribution import LogitDiff, direct_attribution

    model = ExpertModel(hf, tiny_tokenizer())
    try:
        direct_attribution(model, ["hi"], LogitDiff(["I"]))
    finally:
        model.restore()


# ---- running a case ----------------------------------------------------------------------------


def run_case(case: Case, tmp: Path) -> BaseException:
    """Run ``case``; return the exception after checking the model did not change."""
    if case.fresh:
        hf = case.fresh()
        model = ExpertModel(hf, tiny_tokenizer()) if case.wrap_fresh else hf
    else:
        model = wrapped(case.family)
        hf = model.hf_model
    token = case.setup(model) if case.setup else None
    try:
        before = fingerprint(hf)
        with pytest.raises(case.exc) as info:
            case.run(model, tmp)
        assert_same(before, fingerprint(hf))
    finally:
        if case.teardown:
            case.teardown(model, token)
    if isinstance(model, ExpertModel):
        assert model.n_edits() == 0
        if case.wrap_fresh:
            model.restore()
    return info.value


def _message(err: BaseException, tmp: Path) -> str:
    text = str(err).replace(str(tmp), "<tmp>")
    return re.sub(r"0x[0-9a-f]+", "0x…", text)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(case, tmp_path):
    err = run_case(case, tmp_path)
    msg = str(err)
    for part in case.names + case.accepts:
        assert part in msg, f"{case.id}: {part!r} not in {msg!r}"


def test_numpy_and_torch_integer_scalars_are_accepted_where_ints_are():
    model = wrapped("olmoe")
    assert model.layers[np.int64(1)].layer == 1 and model.layers[torch.tensor(-1)].layer == 1
    assert model.layers[1].moe.experts[np.int32(3)].expert == 3
    with model.intervene(MaskExperts({np.int64(1): [np.int64(2), torch.tensor(3)]}),
                         AddVector("resid_pre", V, layers=np.int64(1), positions=[np.int64(-1)])):
        with model.trace(IDS):
            idx = model.layers[1].moe.topk_indices.save()
    assert not bool(((idx == 2) | (idx == 3)).any())
    with model.trace(IDS):  # a [d] vector broadcasts over batch and positions of a residual point
        model.layers[1].resid_pre = torch.zeros(64)
        pre = model.layers[1].resid_pre.save()
    assert pre.abs().max() == 0
    assert model.n_edits() == 0


def test_there_are_at_least_80_cases_with_unique_ids():
    assert len(CASES) >= 80
    assert len({c.id for c in CASES}) == len(CASES)


# ---- the docs table ----------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    """Text as one Markdown table cell: pipes and newlines would end the cell, and ``[a][b]`` / ``[a]`` read as
    (cross-)references by mkdocs-autorefs, so square brackets are escaped."""
    for ch in "|[]":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", " ")


def errors_table(tmp: Path) -> str:
    rows = ["| case | input | exception | message |", "|---|---|---|---|"]
    for case in CASES:
        sub = tmp / case.id
        sub.mkdir()
        err = run_case(case, sub)
        message = _md_cell(_message(err, sub))
        rows.append(f"| `{case.id}` | {_md_cell(case.given)} | `{type(err).__name__}` | {message} |")
    return "\n".join(rows)


def _doc_section(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip()


def test_errors_doc_matches_the_cases(tmp_path):
    """docs/errors.md lists every case with the message it really gives (regenerate with
    ``python -m tests.test_bad_input``)."""
    assert _doc_section(DOC.read_text()) == errors_table(tmp_path), (
        "docs/errors.md is out of date: run `python -m tests.test_bad_input`"
    )


if __name__ == "__main__":  # rewrite the table in docs/errors.md
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        table = errors_table(Path(tmp))
    text = DOC.read_text()
    if START not in text:
        text = text.rstrip() + (
            "\n\n## Every bad input and its message\n\nGenerated from `tests/test_bad_input.py` (each case also checks "
            "that the model is unchanged afterwards); a test fails when this table and the cases drift apart. "
            "`<tmp>` stands for a temporary folder.\n\n" + START + "\n" + END + "\n"
        )
    head, rest = text.split(START, 1)
    text = head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1]
    DOC.write_text(text)
    print(f"wrote {len(CASES)} cases to {DOC}")
