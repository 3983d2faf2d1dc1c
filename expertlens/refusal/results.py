"""Typed results of the refusal study: one dataclass per stage, serialised to (and read from) results.json.

The text table, the report and ``RefusalStudy`` read these dataclasses, never string keys of a nested dict.
Rates are fractions in [0, 1] with their count ``n`` and a bootstrap 95% interval.

Example:
    >>> from expertlens.refusal.results import Outcome
    >>> out = Outcome.from_verdicts("harmful test", ["refusal", "full_response", "full_response", "non_response"])
    >>> out.full_response.k, out.full_response.n, out.full_response.value
    (2, 4, 0.5)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .judges import CLASSES, FULL_RESPONSE, NON_RESPONSE, REFUSAL
from .stats import bootstrap_interval, mcnemar_exact, paired_margin

__all__ = [
    "Rate",
    "Outcome",
    "Capability",
    "Condition",
    "SweepPoint",
    "ActAddSweepResult",
    "PairedTest",
    "Margin",
    "KLMatch",
    "ControlDraw",
    "ExpertControl",
    "CausalMap",
    "Claim",
    "Deviation",
    "StudyResults",
    "to_jsonable",
    "from_jsonable",
    "SCHEMA_VERSION",
]

SCHEMA_VERSION = 3
_LETTER = {REFUSAL: "R", FULL_RESPONSE: "F", NON_RESPONSE: "N"}
_CLASS = {v: k for k, v in _LETTER.items()}


@dataclass
class Rate:
    """``k`` of ``n`` with a bootstrap interval ``[lo, hi]``.

    Example:
        >>> from expertlens.refusal.results import Rate
        >>> r = Rate.of(3, 10)
        >>> r.value, r.n, r.pct()
        (0.3, 10, '30.0%')
    """

    k: int
    n: int
    lo: float
    hi: float

    @classmethod
    def of(cls, k: int, n: int, seed: int = 0) -> Rate:
        lo, hi = bootstrap_interval(int(k), int(n), seed=seed)
        return cls(int(k), int(n), lo, hi)

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    def pct(self) -> str:
        """The rate as a percentage, e.g. ``'30.0%'`` (``'n/a'`` without outcomes)."""
        return "n/a" if not self.n else f"{100 * self.value:.1f}%"

    def interval(self) -> str:
        """The 95% interval as text, e.g. ``'[10.0–60.0%]'``."""
        return "" if not self.n else f"[{100 * self.lo:.1f}–{100 * self.hi:.1f}%]"

    def text(self) -> str:
        """Rate, interval and n, e.g. ``'30.0% [10.0–60.0%], n = 10'``."""
        return "n/a" if not self.n else f"{self.pct()} {self.interval()}, n = {self.n}"


@dataclass
class Outcome:
    """The three-class verdicts on one prompt set under one intervention, with samples.

    ``verdicts`` keeps one letter per prompt (R / F / N, prompt order) so conditions can be compared pairwise.

    Example:
        >>> from expertlens.refusal.results import Outcome
        >>> Outcome.from_verdicts("harmless test", ["refusal"] * 3).refusal.value
        1.0
    """

    prompts: str
    verdicts: str
    refusal: Rate
    full_response: Rate
    non_response: Rate
    samples: list[dict] = field(default_factory=list)

    @classmethod
    def from_verdicts(
        cls,
        prompts_name: str,
        verdicts: list[str],
        prompts: list[str] | None = None,
        completions: list[str] | None = None,
        n_samples: int = 0,
        seed: int = 0,
    ) -> Outcome:
        n = len(verdicts)
        rates = {c: Rate.of(sum(v == c for v in verdicts), n, seed=seed + i) for i, c in enumerate(CLASSES)}
        samples = []
        if prompts is not None and completions is not None and n_samples:
            samples = _pick_samples(prompts, completions, verdicts, n_samples)
        return cls(prompts_name, "".join(_LETTER[v] for v in verdicts), **rates, samples=samples)

    @property
    def n(self) -> int:
        return len(self.verdicts)

    def classes(self) -> list[str]:
        """The per-prompt verdicts as class names."""
        return [_CLASS[c] for c in self.verdicts]

    def rate(self, cls_name: str) -> Rate:
        return getattr(self, cls_name)


def _pick_samples(prompts, completions, verdicts, n) -> list[dict]:
    """Up to ``n`` samples, covering every verdict class that occurs (first occurrences first)."""
    chosen: list[int] = []
    for c in CLASSES:
        idx = [i for i, v in enumerate(verdicts) if v == c]
        chosen.extend(idx[: max(1, n // 3)])
    for i in range(len(verdicts)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return [{"prompt": prompts[i], "completion": completions[i], "verdict": verdicts[i]} for i in sorted(chosen[:n])]


@dataclass
class Capability:
    """Capability retained under an intervention: the suite's score with and without it.

    Example:
        >>> from expertlens.refusal.results import Capability, Rate
        >>> cap = Capability("harmless answers", Rate.of(8, 10), Rate.of(10, 10))
        >>> cap.retention
        0.8
    """

    suite: str
    score: Rate
    baseline: Rate

    @property
    def retention(self) -> float:
        b = self.baseline.value
        return math.nan if not b or math.isnan(b) else self.score.value / b


@dataclass
class Condition:
    """One row of the study: an intervention's bypass (harmful test) and induce (harmless test) outcomes.

    Attributes:
        key: Stable identifier (``baseline``, ``actadd``, ``method_b``, ...).
        label: What a reader sees in tables.
        params: Human-readable settings (layer, expert, coefficient, ...).
        bypass: Harmful test prompts under the bypass (−) edit.
        induce: Harmless test prompts under the induce (+) edit.
        harmless_kl: Mean KL on the harmless test prompts under the bypass edit (nats).
        induce_kl: Mean KL on the harmless test prompts under the induce edit (nats): what a control of this
            condition's induce side is matched on.
        capability: Capability retained under the bypass edit.
        note: Why something is missing, if it is.

    Example:
        >>> from expertlens.refusal.results import Condition
        >>> Condition("method_a", "method A (routing)", note="no expert passed the threshold").bypass is None
        True
    """

    key: str
    label: str
    params: dict = field(default_factory=dict)
    bypass: Outcome | None = None
    induce: Outcome | None = None
    harmless_kl: float | None = None
    capability: Capability | None = None
    note: str = ""
    induce_kl: float | None = None

    def outcome(self, side: str) -> Outcome | None:
        """The ``"bypass"`` or ``"induce"`` outcome."""
        return self.bypass if side == "bypass" else self.induce

    def kl(self, side: str) -> float | None:
        """Harmless KL under the ``"bypass"`` or ``"induce"`` edit."""
        return self.harmless_kl if side == "bypass" else self.induce_kl


@dataclass
class SweepPoint:
    """One ActAdd coefficient on validation prompts: three-class rates under ∓c·r, KL and capability.

    Example:
        >>> from expertlens.refusal.results import Outcome, SweepPoint
        >>> o = Outcome.from_verdicts("harmful val", ["full_response"])
        >>> SweepPoint(2.0, o, Outcome.from_verdicts("harmless val", ["refusal"]), 0.05, 1.0).coeff
        2.0
    """

    coeff: float
    bypass: Outcome
    induce: Outcome
    harmless_kl: float
    capability: float
    passed: bool = True


@dataclass
class ActAddSweepResult:
    """The ActAdd coefficient sweep and the coefficients it chose (by ASR under the constraints).

    Example:
        >>> from expertlens.refusal.results import ActAddSweepResult
        >>> ActAddSweepResult(layer=3, points=[], bypass_coeff=1.0, induce_coeff=1.0, rule="...").layer
        3
    """

    layer: int
    points: list[SweepPoint]
    bypass_coeff: float
    induce_coeff: float
    rule: str


@dataclass
class _Comparison:
    """What two conditions were compared on: names, side (bypass / induce), outcome class and both rates."""

    a: str
    b: str
    side: str
    outcome: str
    a_rate: float
    b_rate: float


@dataclass
class PairedTest(_Comparison):
    """Exact McNemar test of two conditions on the same prompts for one outcome class.

    Example:
        >>> from expertlens.refusal.results import Outcome, PairedTest
        >>> a = Outcome.from_verdicts("t", ["full_response"] * 9 + ["refusal"])
        >>> b = Outcome.from_verdicts("t", ["refusal"] * 10)
        >>> t = PairedTest.compare("method B", a, "control", b, "full_response", "bypass")
        >>> t.only_a, t.only_b, round(t.p_value, 4)
        (9, 0, 0.0039)
    """

    only_a: int
    only_b: int
    n: int
    p_value: float

    @classmethod
    def compare(cls, a_name: str, a: Outcome, b_name: str, b: Outcome, outcome: str, side: str) -> PairedTest:
        if a.n != b.n:
            raise ValueError(f"paired test needs the same prompts: {a_name} has {a.n}, {b_name} has {b.n}")
        letter = _LETTER[outcome]
        xa = [c == letter for c in a.verdicts]
        xb = [c == letter for c in b.verdicts]
        only_a = sum(x and not y for x, y in zip(xa, xb))
        only_b = sum(y and not x for x, y in zip(xa, xb))
        return cls(
            a_name,
            b_name,
            side,
            outcome,
            sum(xa) / max(a.n, 1),
            sum(xb) / max(b.n, 1),
            only_a,
            only_b,
            a.n,
            mcnemar_exact(only_a, only_b),
        )


@dataclass
class Margin(_Comparison):
    """A's rate minus B's on the same prompts for one class, with a 95% interval and a paired test.

    B may be several draws of a control: then ``b_rate`` is the mean over draws, ``b_rates`` the draws, the
    interval resamples draws and prompts and the test is a sign-flip permutation test over prompts
    (:func:`~expertlens.refusal.stats.paired_margin`); for one B it is the exact McNemar test.

    Example:
        >>> from expertlens.refusal.results import Margin, Outcome
        >>> a = Outcome.from_verdicts("t", ["full_response"] * 9 + ["refusal"])
        >>> b = Outcome.from_verdicts("t", ["refusal"] * 10)
        >>> m = Margin.compare("method B", a, "control", [b], "full_response", "bypass")
        >>> m.value, round(m.p_value, 4), m.text()
        (0.9, 0.0039, '+90.0 points [70.0, 100.0], paired p = 0.0039')
    """

    value: float
    lo: float
    hi: float
    p_value: float
    n: int
    test: str
    b_rates: list[float] = field(default_factory=list)

    @classmethod
    def compare(
        cls, a_name: str, a: Outcome, b_name: str, b: Outcome | list[Outcome], outcome: str, side: str, seed: int = 0
    ) -> Margin:
        bs = [b] if isinstance(b, Outcome) else list(b)
        if not bs or any(x.n != a.n for x in bs):
            raise ValueError(f"a margin needs the same prompts: {a_name} has {a.n}, {b_name} has {[x.n for x in bs]}")
        letter = _LETTER[outcome]
        xa = np.array([c == letter for c in a.verdicts], dtype=float)
        xb = np.array([[c == letter for c in x.verdicts] for x in bs], dtype=float)
        value, lo, hi, p = paired_margin(xa, xb, seed=seed)
        test = "exact McNemar" if len(bs) == 1 else f"sign-flip permutation over prompts ({len(bs)} draws averaged)"
        return cls(a_name, b_name, side, outcome, float(xa.mean()), float(xb.mean()), value, lo, hi, p, a.n, test,
                   [float(r) for r in xb.mean(1)])  # fmt: skip

    @property
    def n_draws(self) -> int:
        return len(self.b_rates)

    def flipped(self) -> Margin:
        """B minus A: the same test seen from the other side (for one B; e.g. a control against the baseline)."""
        return Margin(self.b, self.a, self.side, self.outcome, self.b_rate, self.a_rate, -self.value, -self.hi,
                      -self.lo, self.p_value, self.n, self.test, [self.a_rate])  # fmt: skip

    def text(self) -> str:
        """The margin in points with its interval and p, e.g. ``'+12.0 points [4.1, 20.0], paired p = 0.003'``."""
        return (f"{100 * self.value:+.1f} points [{100 * self.lo:.1f}, {100 * self.hi:.1f}], "
                f"paired p = {self.p_value:.2g}")  # fmt: skip


@dataclass
class KLMatch:
    """The coefficient :func:`~expertlens.refusal.controls.match_kl` found: its KL, the target, whether it is within
    tolerance, every try.

    Example:
        >>> from expertlens.refusal.controls import match_kl
        >>> m = match_kl(lambda c: (c / 10) ** 2, target=4.0, start=1.0)
        >>> m.matched, abs(m.kl - 4.0) <= 0.4
        (True, True)
    """

    coeff: float
    kl: float
    target: float
    matched: bool
    tolerance: float
    tries: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return to_jsonable(self)


@dataclass
class ControlDraw:
    """One draw of a like-for-like control: its random experts and, per edit, the KL match of its coefficient.

    Attributes:
        key: Key of the :class:`Condition` that holds this draw's outcomes.
        experts: ``[layer, expert]`` pairs (for method A in the role, force or suppress, of the routing-linked
            expert they stand in for).
        position: Token position of the expert direction (method B), None for routing edits.
        bypass: The bypass coefficient, matched on the harmless KL of the method's bypass edit.
        induce: The induce coefficient, matched on the harmless KL of the method's induce edit.

    Example:
        >>> from expertlens.refusal.results import ControlDraw, KLMatch
        >>> m = KLMatch(50.0, 0.64, 0.65, True, 0.065)
        >>> ControlDraw("method_b_control_1", [[5, 7]], -1, m, m).experts
        [[5, 7]]
    """

    key: str
    experts: list[list[int]]
    position: int | None
    bypass: KLMatch | None
    induce: KLMatch | None


@dataclass
class ExpertControl:
    """The like-for-like random-expert control of one method: draws from the method's own layers, the same edit,
    coefficients KL-matched separately on each edit the method is compared on.

    Example:
        >>> from expertlens.refusal.results import ExpertControl
        >>> ExpertControl("method_b", "random experts of layer 5, 3 draws", []).draws
        []
    """

    method: str
    rule: str
    draws: list[ControlDraw]
    note: str = ""

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.draws]


@dataclass
class CausalMap:
    """Zero-ablation of each layer's MoE and attention output: change in refusal rate and ASR (fractions).

    Example:
        >>> from expertlens.refusal.results import CausalMap
        >>> m = CausalMap([0, 1], 10, 0.9, 0.0, {"moe": [-0.1, 0.0], "attention": [-0.5, 0.0]},
        ...               {"moe": [0.0, 0.0], "attention": [0.2, 0.0]})
        >>> m.strongest("refusal")
        ('attention', 0, -0.5)
    """

    layers: list[int]
    n_prompts: int
    base_refusal: float
    base_asr: float
    d_refusal: dict[str, list[float | None]]
    d_asr: dict[str, list[float | None]]

    def strongest(self, what: str = "refusal") -> tuple[str, int, float]:
        """``(component, layer, change)`` of the largest absolute change."""
        table = self.d_refusal if what == "refusal" else self.d_asr
        best = ("", -1, 0.0)
        for comp, vals in table.items():
            for layer, v in zip(self.layers, vals):
                if v is not None and abs(v) > abs(best[2]):
                    best = (comp, layer, v)
        return best


@dataclass
class Claim:
    """One claim of the paper with the verdict computed from this run's numbers.

    Example:
        >>> from expertlens.refusal.results import Claim
        >>> Claim(1, "ActAdd transfers", "supported", "supported on this model: ...").status
        'supported'
    """

    number: int
    title: str
    status: str
    verdict: str
    evidence: list[str] = field(default_factory=list)
    controls: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)
    tests: list[Margin] = field(default_factory=list)
    rule: str = ""


@dataclass
class Deviation:
    """One setting where a run differs from the authors' code (``RefusalConfig.paper()``), and why.

    Example:
        >>> from expertlens.refusal.results import Deviation
        >>> Deviation("max_new_tokens", "100", "24", "every organism answer fits in 24 tokens").setting
        'max_new_tokens'
    """

    setting: str
    paper: str
    here: str
    why: str


@dataclass
class StudyResults:
    """Everything the study measured, stage by stage (the schema of results.json).

    Example:
        >>> from expertlens.refusal.results import StudyResults
        >>> res = StudyResults.from_dict(json.load(open("runs/organism/results.json")))  # doctest: +SKIP
        >>> res.condition("method_b").bypass.full_response.text()  # doctest: +SKIP
    """

    model: dict
    config: dict
    preset: str
    data: dict
    judge: dict
    selected: dict
    selection: dict
    conditions: list[Condition] = field(default_factory=list)
    deviations: list[Deviation] = field(default_factory=list)
    actadd_sweep: ActAddSweepResult | None = None
    routing: dict | None = None
    method_b_search: dict | None = None
    control_search: dict | None = None
    controls: list[ExpertControl] = field(default_factory=list)
    causal_map: CausalMap | None = None
    pathways: dict | None = None
    claims: list[Claim] = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    positive_control: bool = False
    schema_version: int = SCHEMA_VERSION

    def condition(self, key: str) -> Condition | None:
        """The condition with ``key`` (``None`` if the run has none)."""
        for c in self.conditions:
            if c.key == key:
                return c
        return None

    def control(self, method: str) -> ExpertControl | None:
        """The like-for-like control of ``method`` (``"method_a"`` / ``"method_b"``), None if none ran."""
        return next((c for c in self.controls if c.method == method), None)

    def draws(self, method: str) -> list[Condition]:
        """The conditions of ``method``'s control draws that ran (empty if none)."""
        ctrl = self.control(method)
        got = [self.condition(k) for k in (ctrl.keys if ctrl else [])]
        return [c for c in got if c is not None and c.bypass is not None]

    def to_dict(self) -> dict:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict) -> StudyResults:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"results.json has schema_version {d.get('schema_version')!r}; this expertlens reads "
                f"version {SCHEMA_VERSION} (re-run the study)"
            )
        return from_jsonable(cls, d)


# ---- (de)serialisation ---------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Dataclasses → dicts, tuples → lists, non-finite floats → ``None`` (valid JSON).

    Example:
        >>> from expertlens.refusal.results import Rate, to_jsonable
        >>> to_jsonable(Rate(1, 2, 0.0, float("nan")))
        {'k': 1, 'n': 2, 'lo': 0.0, 'hi': None}
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy / torch scalars
        return to_jsonable(obj.item())
    return obj


def from_jsonable(tp: Any, value: Any) -> Any:
    """Rebuild a value of type ``tp`` (dataclasses, ``list[...]``, ``X | None``) from :func:`to_jsonable` output.

    Example:
        >>> from expertlens.refusal.results import Rate, from_jsonable
        >>> from_jsonable(Rate, {"k": 1, "n": 2, "lo": 0.0, "hi": None}).hi
        nan
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return from_jsonable(args[0], value) if len(args) == 1 else value
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return [from_jsonable(arg, v) for v in value]
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {
            f.name: from_jsonable(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value
        }
        return tp(**kwargs)
    if tp is float:
        return math.nan if value is None else float(value)
    return value
