"""The core house: one point table, one edit registry, a typed layout, and the package's import rules."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import re
import warnings
from pathlib import Path

import nnsight
import pytest
import torch

import expertlens
from expertlens import ExpertModel, PointError
from expertlens.edits import EditHandle, record
from expertlens.interventions import ExpertSteer, OrthogonalizeWeights, ScaleExpert
from expertlens.layout import LayerLayout
from expertlens.points import EDITABLE_POINTS, MODEL_POINTS, POINTS, address_table, point_shape
from expertlens.testing import MOE_FAMILIES, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "expertlens"


@pytest.fixture
def wrap():
    made = []

    def make(family: str) -> ExpertModel:
        torch.manual_seed(0)
        model = ExpertModel(tiny_model(family), tiny_tokenizer())
        made.append(model)
        return model

    yield make
    for model in made:
        model.restore()


def _group(model: ExpertModel, attr: str, layer: int, expert: int = 0):
    """The object and attribute name ``attr`` ("layers[i].moe.experts[e].output") addresses."""
    obj: object = model
    parts = attr.replace("layers[i]", f"layers.{layer}").replace("experts[e]", f"experts.{expert}").split(".")
    for part in parts[:-1]:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj, parts[-1]


def _read_all(model: ExpertModel, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """Every table point of one layer (and the model-level ones), read in table (computation) order."""
    names = [n for n, p in POINTS.items() if p.level in ("model", "layer") or model.layout[layer].is_moe]
    names = [n for n in names if n != "moe.shared_out" or model.spec.shared is not None]
    names = [n for n in names if not n.startswith("attn.") or n == "attn.output" or model.layout[layer].o_proj]
    with torch.no_grad(), model.trace("hello world"):
        values = nnsight.save({})
        for name in names:
            obj, attr = _group(model, POINTS[name].attr, layer, expert)
            values[name] = getattr(obj, attr)
    return values


# ---- the point table ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_point_reads_with_the_table_shape_and_dtype(family, wrap):
    model = wrap(family)
    layer = model.moe_layers[-1]
    with torch.no_grad(), model.trace("hello world"):
        idx = model.layers[layer].moe.topk_indices.save()
    expert = int(idx.flatten()[0])
    values = _read_all(model, layer, expert)
    assert "moe.router_probs" in values and "moe.experts.output" in values
    for name, value in values.items():
        row = POINTS[name]
        lead = row.leading
        lay = None if name in MODEL_POINTS else layer
        assert tuple(value.shape[lead:]) == point_shape(model, name, lay), name
        if row.dtype == "index":
            assert value.dtype == torch.int64, name
        elif row.dtype == "bool":
            assert value.dtype == torch.bool, name
        else:
            assert value.is_floating_point(), name
    # the per-expert point counts the slots where that expert was chosen
    assert values["moe.experts.output"].shape[0] == int((values["moe.topk_indices"] == expert).sum())
    assert torch.equal(values["moe.experts.mask"], (values["moe.topk_indices"] == expert).any(-1))


def test_every_readable_point_is_writable_or_says_why():
    for name, row in POINTS.items():
        assert row.writable or row.not_writable, name
        if row.writable and row.batched and not row.per_expert:
            assert name in EDITABLE_POINTS
    assert {"moe.router_probs", "moe.experts.output", "moe.input"} <= {n for n, p in POINTS.items() if p.writable}
    assert MODEL_POINTS == ("embed", "logits")


def test_docs_address_table_is_rendered_from_the_point_table():
    page = (ROOT / "docs" / "concepts" / "points.md").read_text()
    assert address_table() in page, (
        "docs/concepts/points.md's address table is stale: paste expertlens.points.address_table() into it"
    )


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_expert_output_edit_equals_scale_expert_zero(family, wrap):
    """``add_edit("moe.experts.output", 0·x, expert=e)`` == ``ScaleExpert(alpha=0)``: the same slots."""
    model = wrap(family)
    layer = model.moe_layers[-1]
    enc = model.tokenize(["hello world", "hi"])
    with torch.no_grad():
        with record(model, [("moe.topk_indices", layer)]) as rec:
            base = model.hf_model(**enc).logits
        e = int(rec[("moe.topk_indices", layer)].flatten().mode().values)
        with model.intervene(ScaleExpert(layer, e, 0.0)):
            want = model.hf_model(**enc).logits
        h = model.add_edit("moe.experts.output", lambda x, ctx: 0 * x, layer=layer, expert=e)
        got = model.hf_model(**enc).logits
        h.remove()
    assert not torch.equal(base, want)  # expert e was used
    assert torch.equal(got, want)
    assert model.n_edits() == 0


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_router_probs_edit_changes_readers_not_routing(family, wrap):
    model = wrap(family)
    layer = model.moe_layers[-1]
    d = torch.randn(model.d_model)
    enc = model.tokenize("hello world")
    with torch.no_grad():
        base = model.hf_model(**enc).logits
        with model.intervene(ExpertSteer(layer, 2, d, coeff=3.0)):
            steered = model.hf_model(**enc).logits
        h = model.add_edit("moe.router_probs", lambda p, ctx: 0 * p, layer=layer)
        with model.trace("hello world"):
            probs = model.layers[layer].moe.router_probs.save()
            out = model.logits.save()
        # ExpertSteer weights by router_probs: with them zeroed the steering adds nothing
        with model.intervene(ExpertSteer(layer, 2, d, coeff=3.0)):
            zeroed = model.hf_model(**enc).logits
        h.remove()
    assert not torch.equal(base, steered)
    assert bool((probs == 0).all())
    assert torch.equal(out, base)  # routing untouched
    assert torch.equal(zeroed, base)


def test_moe_input_edit_reaches_the_router(wrap):
    model = wrap("olmoe")  # bias-free router: logits of a zero input are zero
    with torch.no_grad():
        h = model.add_edit("moe.input", lambda x, ctx: 0 * x, layer=1)
        with model.trace("hello"):
            logits = model.layers[1].moe.router_logits.save()
        h.remove()
    assert bool((logits == 0).all())


# ---- the edit registry -------------------------------------------------------------------------


def test_handles_are_tracked_by_identity(wrap):
    model = wrap("olmoe")

    def same(x, ctx):
        return x

    a = model.add_edit("resid_pre", same, layer=1)
    b = model.add_edit("moe.output", same, layer=1)
    c = model.add_edit("resid_pre", same, layer=1)  # the same function twice: two edits
    assert isinstance(a, EditHandle) and model.n_edits() == 3
    a.remove()
    assert not a.active and c.active and model.n_edits() == 2
    a.remove()  # idempotent
    assert model.n_edits() == 2
    model.clear_edits()
    assert model.n_edits() == 0 and not b.active and not c.active


def test_weight_edits_are_counted_and_cleared(wrap):
    model = wrap("olmoe")
    before = model.hf_model.model.embed_tokens.weight.clone()
    handle = OrthogonalizeWeights(torch.randn(model.d_model)).apply(model)
    assert model.n_edits() == 1
    assert not torch.equal(before, model.hf_model.model.embed_tokens.weight)
    model.clear_edits()
    assert model.n_edits() == 0 and not handle.active
    assert torch.equal(before, model.hf_model.model.embed_tokens.weight)


def test_clear_edits_cooperates_with_nnsight_edits(wrap):
    model = wrap("olmoe")
    with torch.no_grad():
        base = model.hf_model(**model.tokenize("hi")).logits
        with model.edit(inplace=True):
            model.layers[1].resid_post[:] = 0
        assert model.n_edits() == 1
        with model.trace("hi"):
            edited = model.logits.save()
        model.clear_edits()
        assert model.n_edits() == 0
        with model.trace("hi"):
            clean = model.logits.save()
    assert not torch.equal(edited, base)
    assert torch.equal(clean, base)


def test_record_equals_trace_reads(wrap):
    model = wrap("qwen2_moe")
    keys = [("resid_pre", 1), ("moe.router_logits", 1), ("moe.shared_out", 1), ("logits", None)]
    with torch.no_grad(), model.trace("hello"):
        want = nnsight.save([model.layers[1].resid_pre, model.layers[1].moe.router_logits,
                             model.layers[1].moe.shared_out, model.logits])
    with torch.no_grad(), record(model, keys, detach=True) as rec:
        model.hf_model(**model.tokenize("hello"))
    assert model.n_edits() == 0
    for key, value in zip(keys, want):
        assert torch.equal(rec[key], value), key
    with pytest.raises(PointError, match="unknown point 'nope'"):
        record(model, [("nope", 0)])


def test_no_edit_is_found_by_name():
    """Edits are removed and counted through their handles, never by matching a function's name."""
    for path in PACKAGE.rglob("*.py"):
        assert '"ExpertModel.add_edit' not in path.read_text(), path


# ---- the layout ----------------------------------------------------------------------------------


def test_layout_is_frozen_and_the_old_view_is_deprecated(wrap):
    model = wrap("deepseek_v3")
    lay = model.layout[1]
    assert isinstance(lay, LayerLayout) and lay.is_moe and not model.layout[0].is_moe
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.router = "x"
    assert model.hf_model.get_submodule(lay.router) is model.hf_model.model.layers[1].mlp.gate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = model._layer_info
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert rows[1]["router"] == lay.router and rows[0]["block"] is None and "router" not in rows[0]


# ---- import rules --------------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    out = {"expertlens": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages(expertlens.__path__, "expertlens."):
        spec = importlib.util.find_spec(info.name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            out[info.name] = Path(spec.origin)
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names imported from it, line) for every run-time import, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("expertlens")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("expertlens"):
                found.append((target, [a.name for a in node.names], node.lineno))
    return found


def test_no_import_cycles_lazy_imports_included():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, names, _ in _imports(name, path):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in modules and cand != name:
                    graph[name].add(cand)
                    break
    # a package's __init__ importing its own submodules is how packages work; ignore those edges
    for name in graph:
        graph[name] = {t for t in graph[name] if not (modules[name].name == "__init__.py" and
                                                        t.startswith(name + "."))}
        graph[name] = {t for t in graph[name] if not (modules[t].name == "__init__.py" and
                                                        name.startswith(t + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_private_name_is_imported_from_outside_its_subpackage():
    offenders = []
    for name, path in _modules().items():
        own = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target, names, line in _imports(name, path):
            target_pkg = target.rpartition(".")[0] if target.count(".") else target
            outside = not (target == own or target.startswith(own + ".") or target_pkg == own)
            if not outside:
                continue
            parts = target.split(".")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if any(p.startswith("_") and not p.startswith("__") for p in parts) or private:
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {private or target} from {target}")
    assert not offenders, "\n".join(offenders)


# ---- the recipes of docs/concepts/architecture.md -----------------------------------------------


def test_recipe_add_a_family(monkeypatch):
    """One table entry + one tiny config: the wrap-time truth checks and the routing identities hold."""
    from expertlens import families, testing
    from expertlens.checks import check_model
    from expertlens.families import FamilySpec, SoftmaxTopK
    from expertlens.interventions import MaskExperts

    spec = FamilySpec("toy_moe", ("toy_moe",), rule=SoftmaxTopK(renorm=True, cast_to_logits_dtype=False))  # the entry
    monkeypatch.setitem(families._REGISTRY, spec.name, spec)
    monkeypatch.setitem(testing.TINY_CONFIGS, "toy_moe", {**testing.TINY_CONFIGS["mixtral"]})  # the tiny config
    config = testing.TINY_CONFIGS["toy_moe"]
    hf = tiny_model("mixtral", **config)  # an architecture transformers knows, addressed by the new entry
    model = ExpertModel(hf, tiny_tokenizer(), family="toy_moe", validate=False)
    assert model.family == "toy_moe" and model.moe_layers == [0, 1]
    check_model(model)  # Σ w·expert_out == moe.output and the rule re-computes the routing
    with torch.no_grad(), model.intervene(MaskExperts({1: [0, 1, 2]})), model.trace("hello"):
        idx = model.layers[1].moe.topk_indices.save()
    assert not bool(torch.isin(idx, torch.tensor([0, 1, 2])).any())
    model.restore()


def test_recipe_add_an_intervention():
    """One small frozen dataclass: ``ScaleAt(point, 0)`` equals ``ZeroAblate(point)``; ×1 is the identity."""
    from expertlens.interventions import Intervention, ZeroAblate
    from expertlens.interventions.activation import point_layers
    from expertlens.interventions.selectors import LayerSpec, check_scalar

    @dataclasses.dataclass(frozen=True, eq=False)
    class ScaleAt(Intervention):
        point: str
        factor: float
        layers: LayerSpec = None

        def validate(self, model):
            check_scalar(self.factor, "ScaleAt: factor")
            point_layers(model, self.point, self.layers, "ScaleAt")

        def attach(self, model):
            f = float(self.factor)
            return [model.add_edit(self.point, lambda x, ctx: f * x, layer=layer)
                    for layer in point_layers(model, self.point, self.layers, "ScaleAt")]

    model = ExpertModel(tiny_model("qwen2_moe"), tiny_tokenizer())
    enc = model.tokenize(["hello world", "hi"])
    with torch.no_grad():
        base = model.hf_model(**enc).logits
        with model.intervene(ScaleAt("moe.shared_out", 1.0)):
            same = model.hf_model(**enc).logits
        with model.intervene(ScaleAt("moe.shared_out", 0.0, layers=1)):
            got = model.hf_model(**enc).logits
        with model.intervene(ZeroAblate("moe.shared_out", layers=1)):
            want = model.hf_model(**enc).logits
    assert torch.equal(same, base) and torch.equal(got, want) and not torch.equal(got, base)
    with pytest.raises(TypeError, match="factor must be a real number"):
        with model.intervene(ScaleAt("moe.output", "x")):
            pass
    assert model.n_edits() == 0


# ---- family maths lives in the rules --------------------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_rule_routes_the_same_with_an_identity_adjust_and_reroute_obeys(family, wrap):
    model = wrap(family)
    layer = model.moe_layers[-1]
    rule, router = model.spec.rule, model.hf_model.get_submodule(model.layout[layer].router)
    with torch.no_grad(), model.trace("hello world, again"):
        logits = model.layers[layer].moe.router_logits.save()
    flat = logits.reshape(-1, model.n_experts)
    w, idx = rule.route(flat, router)
    assert rule.selection_scores(flat, router).shape == flat.shape
    if family == "phimoe":  # sparsemixer cannot re-run from adjusted scores, and says so
        with pytest.raises(NotImplementedError, match="sparsemixer"):
            rule.route(flat, router, adjust=lambda s: s)
        return
    w2, idx2 = rule.route(flat, router, adjust=lambda s: s)
    order, order2 = idx.argsort(-1), idx2.argsort(-1)
    assert torch.equal(idx.gather(-1, order), idx2.gather(-1, order2))
    torch.testing.assert_close(w.gather(-1, order), w2.gather(-1, order2), atol=0, rtol=0)
    chosen = idx.flatten().mode().values.reshape(1)
    _, idx_masked = rule.reroute(flat, router, chosen, None)
    assert not bool((idx_masked == chosen).any())
    other = torch.tensor([int(e) for e in range(model.n_experts) if e not in idx[0].tolist()][:1])
    groups = rule.groups(router)
    if groups is None:  # with groups, a forced expert outside the chosen groups may be filtered out
        _, idx_forced = rule.reroute(flat, router, None, other)
        assert bool((idx_forced == other).any(-1).all())


def test_no_rule_class_is_dispatched_on_outside_families():
    import re

    rules = (r"\b(RoutingRule|SoftmaxTopK|GroupLimitedSoftmax|SigmoidGroupTopK|TopKThenSoftmax|SparseMixer|"
             r"BiasedSoftmaxTopK)\b")
    for path in PACKAGE.rglob("*.py"):
        if path.name == "families.py":
            continue
        text = path.read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(">>>"))
        assert "isinstance(model.spec.rule" not in code and "isinstance(rule" not in code, path
        assert not re.search(r"from \.*(expertlens\.)?families import[^\n]*" + rules, code), path
        assert not re.search(r"\.family (==|!=) \"", code), path


#: The layers of docs/concepts/architecture.md, lowest first; a module imports only from its own layer or lower.
LAYERS = [
    ("families", "compat", "prompts", "direction", "unsaved", "plot", "report", "writes", "_tiny_configs"),
    ("summary",),
    ("instrument",),
    ("layout", "infer"),
    ("points",),
    ("edits",),
    ("loops",),
    ("model", "checks"),
    ("interventions",),
    ("attribution", "organism"),
    ("refusal",),
    ("cli", "testing", ""),  # "" is the package's __init__
]


def _layer(module: str) -> tuple[int, str]:
    top = module.removeprefix("expertlens").removeprefix(".").split(".")[0]
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank, top
    raise AssertionError(f"{module} is in no layer of docs/concepts/architecture.md; add it to LAYERS and the page")


def test_modules_import_only_from_their_layer_or_below():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        rank, group = _layer(name)
        for target, names, line in _imports(name, path):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in modules:
                    break
            t_rank, t_group = _layer(cand)
            if t_rank > rank or (t_rank == rank and t_group != group and {group, t_group} != {"model", "checks"}):
                if not (path.name == "__init__.py" and cand.startswith(name)):
                    offenders.append(f"{path.relative_to(ROOT)}:{line} ({group}) imports {cand} ({t_group})")
    assert not offenders, "\n".join(offenders)


def test_points_a_layer_lacks_say_why(wrap):
    """Hybrid layers without attention or resid_mid (rows of the layout) refuse those points, naming the layer."""
    model = wrap("olmoe")
    lay = model.layout[0]
    object.__setattr__(model, "layout", (dataclasses.replace(lay, attn=None, o_proj=None, mid=None,
                                                             layer_type="MambaLayer"), *model.layout[1:]))
    model._point_cache.clear()
    for name in ("attn.output", "attn.z", "attn.head_out", "attn_write"):
        with pytest.raises(PointError, match=r"layer 0 is a MambaLayer with no attention.*with attention: \[1\]"):
            POINTS[name].site(model, 0)
    with pytest.raises(PointError, match="layer 0 .MambaLayer. of this olmoe model has no resid_mid"):
        POINTS["resid_mid"].site(model, 0)
    with pytest.raises(PointError, match="family 'olmoe' has no shared expert"):
        model.add_edit("moe.shared_out", lambda x, ctx: x, layer=1)
    assert model.layers[1].moe.has_shared is False


def test_moved_modules_keep_their_old_paths_with_a_warning():
    import expertlens.instrument as instrument
    import expertlens.interventions as interventions

    moved = [("expertlens.experts", "HookPoint", instrument.HookPoint),
             ("expertlens.experts", "install", instrument.install),
             ("expertlens.interventions.steering", "AddVector", interventions.AddVector),
             ("expertlens.interventions.steering", "Patch", interventions.Patch),
             ("expertlens.interventions.steering", "cache_points", interventions.cache_points),
             ("expertlens.interventions.steering", "ScaleExpert", interventions.ScaleExpert),
             ("expertlens.interventions.expert_steer", "ExpertSteer", interventions.ExpertSteer)]
    for old, name, obj in moved:
        module = importlib.import_module(old)
        with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to expertlens"):
            assert getattr(module, name) is obj
    with pytest.raises(AttributeError, match="has no 'nope'"):
        importlib.import_module("expertlens.experts").nope


def test_write_validation_hooks_see_every_write_and_edit_result(wrap, monkeypatch):
    model = wrap("olmoe")
    seen = []

    def on_write(point, value, model_, layout, current):
        seen.append(("write", point.name, layout.index, tuple(current().shape)))
        if not bool(torch.isfinite(value).all()):
            raise PointError(f"{point.name}: non-finite write")
        return value

    def on_edit(point, new, old, layout):
        seen.append(("edit", point.name, layout.index, tuple(old.shape)))
        return new * 0

    for name in ("resid_post", "moe.output"):
        monkeypatch.setitem(POINTS, name, dataclasses.replace(POINTS[name], validate_write=on_write,
                                                              validate_edit=on_edit))
    with torch.no_grad(), model.trace("hey"):
        model.layers[0].resid_post = model.layers[0].resid_post * 2
    with pytest.raises(PointError, match="resid_post: non-finite write"):
        with torch.no_grad(), model.trace("hey"):
            model.layers[0].resid_post = model.layers[0].resid_post * float("nan")
    h = model.add_edit("moe.output", lambda x, ctx: x + 1, layer=1)
    with torch.no_grad(), record(model, [("moe.output", 1)]) as rec:
        model.hf_model(**model.tokenize("hey"))
    h.remove()
    assert bool((rec[("moe.output", 1)] == 0).all())  # what the check returned is what flows on
    assert ("write", "resid_post", 0, (1, 3, 64)) in seen and ("edit", "moe.output", 1, (1, 3, 64)) in seen


def test_no_module_unpickles_tensors():
    """Files that load tensors use safetensors, never pickle (a pickle can run code when loaded)."""
    offenders = []
    for path in sorted((ROOT / "expertlens").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\btorch\.load\(|\bpickle\.loads?\(|weights_only\s*=\s*False", code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
