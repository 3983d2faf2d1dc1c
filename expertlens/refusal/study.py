"""The whole study of "Expert-Aware Refusal Steering" as one function and one result object.

prompts → chat format → baseline (judge calibrated) → directions → selection → ActAdd (coefficient chosen by
ASR) / ablation → routing statistics → method A and its like-for-like control → method B and its like-for-like
control (:class:`~expertlens.refusal.control_stage.ControlStage`) → causal map and pathways → claim verdicts with
their margins (:mod:`~expertlens.refusal.claims`) → :class:`RefusalStudy` → results.json, safetensors, report.

Example:
    >>> from expertlens import load_organism
    >>> from expertlens.refusal import RefusalConfig, RefusalData, run_refusal_study
    >>> model = load_organism()  # doctest: +SKIP
    >>> study = run_refusal_study(model, RefusalData.from_organism(), RefusalConfig.organism())  # doctest: +SKIP
    >>> study.result.condition("actadd").bypass.full_response.text()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from ..interventions import AblateDirection, AddVector, ZeroAblate
from ..interventions.run import generate
from . import methods
from .config import RefusalConfig
from .control_stage import ControlStage
from .controls import pathway_ablation
from .data import RefusalData, format_chat, post_instruction_len
from .directions import candidate_directions
from .evaluate import last_logits
from .judges import (
    FULL_RESPONSE,
    DefaultJudge,
    default_judge,
    judge_all,
    judge_name,
)
from .progress import progress
from .results import (
    SCHEMA_VERSION,
    ActAddSweepResult,
    Capability,
    CausalMap,
    Condition,
    ExpertControl,
    Outcome,
    Rate,
    StudyResults,
    SweepPoint,
    from_jsonable,
    to_jsonable,
)
from .routing import routing_statistics
from .scores import kl_divergence, refusal_score, refusal_token_ids
from .selection import select_direction

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["RefusalConfig", "RefusalStudy", "run_refusal_study", "card_kind", "SCHEMA_VERSION"]


@dataclass
class RefusalStudy:
    """The study's results (:class:`~expertlens.refusal.results.StudyResults`) plus its direction tensors.

    ``results`` is the same content as JSON-able dicts (what results.json holds); ``directions`` holds
    ``refusal`` (the selected r), ``candidates`` [P, L, d] and ``method_b`` (the best expert's direction).

    Example:
        >>> from expertlens.refusal import RefusalStudy
        >>> study = RefusalStudy.load("runs/organism")  # doctest: +SKIP
        >>> study.result.condition("method_b").bypass.full_response.text()  # doctest: +SKIP
        >>> print(study.table())  # doctest: +SKIP
    """

    result: StudyResults
    directions: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def results(self) -> dict:
        return self.result.to_dict()

    def __getitem__(self, key: str) -> Any:
        return self.results[key]

    def save(self, out_dir: str | Path, report: bool = True) -> Path:
        """Write ``results.json``, ``directions.safetensors`` and (``report=True``) ``report.html``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "results.json", json.dumps(self.results, indent=1, allow_nan=False))
        tensors = {k: v.detach().cpu().contiguous().float() for k, v in self.directions.items() if v is not None}
        _write_atomic(out / "directions.safetensors", tensors, metadata={"schema_version": str(SCHEMA_VERSION)})
        if report:
            from ..report import report as write_report

            write_report(self, out / "report.html", title="Expert-aware refusal steering")
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> RefusalStudy:
        """Read a study back from ``save``'s folder."""
        out = Path(out_dir)
        result = StudyResults.from_dict(json.loads((out / "results.json").read_text()))
        path = out / "directions.safetensors"
        return cls(result, load_file(str(path)) if path.exists() else {})

    def table(self) -> str:
        """The headline numbers as a plain-text table (percentages with 95% intervals)."""
        from .report_sections import text_table

        return text_table(self.result)

    def sections(self):
        """Report sections (claims, tables, figures) for :func:`expertlens.report.report`."""
        from .report_sections import study_sections

        return study_sections(self.result)

    def __repr__(self) -> str:
        """One line: the model (an organism by its name), the preset, headline rates and each claim's verdict.

        Example:
            >>> from expertlens.refusal.results import Claim, StudyResults
            >>> res = StudyResults(model={"family": "olmoe", "name": "/x/checkpoints/olmoe-refusal-v2"}, config={},
            ...                    preset="organism", data={}, judge={}, selected={}, selection={},
            ...                    claims=[Claim(1, "t", "supported", ""), Claim(2, "t", "partly supported", "")])
            >>> RefusalStudy(res)
            RefusalStudy(olmoe-refusal-v2, preset='organism'; claim 1: supported · claim 2: partly)
        """
        r = self.result
        parts = [f"RefusalStudy({model_label(r.model)}, preset={r.preset!r}"]
        for key in ("baseline", "actadd", "method_b"):
            c = r.condition(key)
            if c is not None and c.bypass is not None:
                parts.append(f"{key}: refusal {c.bypass.refusal.pct()} / ASR {c.bypass.full_response.pct()}")
        if r.claims:
            # "claim 1: supported", not "1 supported": a bare number before a verdict reads as a count
            parts.append(" · ".join(f"claim {c.number}: {_SHORT_STATUS.get(c.status, c.status)}" for c in r.claims))
        return "; ".join(parts) + ")"

    def _repr_html_(self) -> str:
        from .report_sections import summary_html

        return summary_html(self.result, name=model_label(self.result.model))


_SHORT_STATUS = {"partly supported": "partly"}


def model_label(model: dict) -> str:
    """How a study names its model: a shipped organism or a local checkpoint by its folder name (the absolute
    path says where it sat on one machine, not what it is), a hub id as it is, else the family.

    Example:
        >>> from expertlens.refusal.study import model_label
        >>> model_label({"name": "/home/me/expertlens/organism/checkpoints/olmoe-refusal", "family": "olmoe"})
        'olmoe-refusal'
        >>> model_label({"name": "allenai/OLMoE-1B-7B-0924", "family": "olmoe"}), model_label({"family": "olmoe"})
        ('allenai/OLMoE-1B-7B-0924', 'olmoe')
    """
    name = str(model.get("name") or "")
    if not name:
        return str(model.get("family") or "?")
    path = Path(name)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        return path.name or name
    return name


# ---- checkpointing ------------------------------------------------------------------------------


def _write_atomic(path: Path, content: str | dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write text or a safetensors file to a temporary name beside ``path``, then rename it into place: a run
    killed mid-write leaves the previous file or none, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        else:
            save_file(content, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Stages:
    """Stage-by-stage save (``dir/<stage>.json``) so an interrupted run keeps what it finished.

    Every file is written atomically (temporary name, then rename); a stage file that cannot be read back under
    ``resume`` is named in the error, with what to do.
    """

    def __init__(self, directory: str | Path | None, resume: bool, fingerprint: dict):
        self.dir = Path(directory) if directory is not None else None
        self.resume = resume
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp = self.dir / "run.json"
        text = json.dumps(to_jsonable(fingerprint), sort_keys=True)
        if resume and stamp.exists() and stamp.read_text() != text:
            raise ValueError(
                f"--resume: {self.dir} holds stages of a different run (model, data or config changed); "
                "use another --out or drop --resume"
            )
        if not resume:
            for old in self.dir.glob("*.json"):
                old.unlink()
            for old in self.dir.glob("*.safetensors"):
                old.unlink()
        _write_atomic(stamp, text)

    def _corrupt(self, path: Path, err: Exception) -> ValueError:
        return ValueError(
            f"--resume: stage file {path} cannot be read ({type(err).__name__}: {err}); delete it to recompute "
            "that stage, or drop --resume to start over"
        )

    def get(self, name: str, tp: Any) -> Any:
        path = None if self.dir is None else self.dir / f"{name}.json"
        if path is None or not self.resume or not path.exists():
            return None
        try:
            return from_jsonable(tp, json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError / UnicodeDecodeError are ValueErrors
            raise self._corrupt(path, err) from err

    def put(self, name: str, value: Any) -> Any:
        if self.dir is not None:
            _write_atomic(self.dir / f"{name}.json", json.dumps(to_jsonable(value)))
        return value

    def tensors(self, name: str) -> dict[str, Tensor] | None:
        path = None if self.dir is None else self.dir / f"{name}.safetensors"
        if path is None or not self.resume or not path.exists():
            return None
        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError on a bad header
            raise self._corrupt(path, err) from err

    def put_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        if self.dir is not None:
            _write_atomic(self.dir / f"{name}.safetensors", {k: v.contiguous().cpu() for k, v in tensors.items()})


# ---- the study ------------------------------------------------------------------------------------


def run_refusal_study(
    model: ExpertModel,
    data: RefusalData,
    config: RefusalConfig | None = None,
    judge: Callable[[str, str], Any] | None = None,
    log: Callable[..., None] = print,
    *,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    capability: Callable[[ExpertModel, Sequence[Any]], tuple[int, int]] | None = None,
    threads: int | str | None = "auto",
    positive_control: bool | None = None,
) -> RefusalStudy:
    """Run every step of the study on ``model`` and return a :class:`RefusalStudy`.

    Args:
        model: The wrapped chat model (needs a chat template).
        data: Harmful/harmless instructions for train, val and test (val and test must not be empty).
        config: Default :meth:`RefusalConfig.paper` (the authors' code); :meth:`RefusalConfig.organism`
            sizes it for the bundled organisms.
        judge: Three-class judge (default: :class:`~expertlens.refusal.judges.DefaultJudge` calibrated on
            this model's unsteered completions, with the organism's evaluator when there is one).
        log: Where progress lines go (``print``, a logger's ``info``, or ``lambda *a: None``).
        checkpoint: Folder for stage-by-stage results; with ``resume=True`` finished stages are read back.
        capability: Your capability suite, ``capability(model, interventions) -> (n_correct, n_total)`` with
            the interventions active while it runs (e.g. :func:`~expertlens.refusal.capability.lm_eval_capability`);
            default: the organism's suite when ``expertlens.organism`` provides one, the bundled capability probe
            for any other model, the share of harmless test prompts answered in full for a v1 organism.
        threads: torch CPU threads while the study runs (restored afterwards). ``"auto"``: one thread for a
            model on the CPU with fewer than 100M parameters (matrices that small gain nothing from more threads,
            and on a busy machine several threads stall each other), else unchanged; an int: that many; None:
            unchanged.
        positive_control: The model has the studied effects planted by construction (a positive-control organism),
            so each verdict reads "recovered" / "not recovered" instead of "supported" / "not supported". None: what
            the organism's model card says (front matter ``kind: positive_control``, :func:`card_kind`); False for
            any other model.

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> from expertlens.refusal import RefusalConfig, RefusalData, run_refusal_study
        >>> study = run_refusal_study(model, RefusalData.from_organism(), RefusalConfig.organism())  # doctest: +SKIP
        >>> study.save("runs/organism")   # results.json, directions.safetensors, report.html  # doctest: +SKIP
    """
    import torch

    n_threads = _study_threads(model, threads)
    before = torch.get_num_threads()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    try:
        if positive_control is None:
            positive_control = card_kind(data.source) == "positive_control"
        return _run_study(model, data, config, judge, log, checkpoint, resume, capability, bool(positive_control))
    finally:
        torch.set_num_threads(before)


def _study_threads(model: ExpertModel, threads: int | str | None) -> int | None:
    if threads is None:
        return None
    if threads == "auto":
        params = model.hf_model.parameters()
        first = next(params, None)
        if first is None or first.device.type != "cpu":
            return None
        n = first.numel() + sum(p.numel() for p in params)
        return 1 if n < 100_000_000 else None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be 'auto', None or a positive int, got {threads!r}")
    return threads


def card_kind(source: str) -> str | None:
    """The ``kind`` an organism's model card declares in its front matter (e.g. ``positive_control``), else None.

    ``source`` is :attr:`RefusalData.source` (``"organism:<name>"`` for a bundled organism); any other source, an
    organism that is not shipped, or a card without a ``kind:`` line gives None.

    Example:
        >>> from expertlens.refusal.study import card_kind
        >>> card_kind("organism:olmoe-refusal") is None, card_kind("lists")
        (True, None)
    """
    if not source.startswith("organism:"):
        return None
    from ..organism import list_organisms, organism_path

    name = source.split(":", 1)[1]
    card = organism_path(name) / "README.md" if name in list_organisms() else None
    if card is None or not card.is_file():
        return None
    lines = card.read_text().splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, _, value = line.partition(":")
        if key.strip() == "kind":
            return value.strip().strip("'\"") or None
    return None


def _run_study(model, data, config, judge, log, checkpoint, resume, capability, positive_control) -> RefusalStudy:
    run = _Run(model, data, config or RefusalConfig.paper(), judge, log, checkpoint, resume, capability)
    run.positive_control = positive_control
    run.baseline()  # unsteered rates; the judge is calibrated here; train prompts filtered
    run.directions()  # difference in means at the last positions, Arditi selection
    run.actadd()  # coefficient 1, the coefficient chosen by ASR, directional ablation
    if model.moe_layers:
        run.routing()  # routing statistics and routing-linked experts
        run.method_a()  # routing edits, then random experts of the same layers in the same roles
        run.method_b()  # single-expert steering, its all-experts variant, random experts of its own layer
    else:
        run.skip_experts()
    run.causal_map()  # zero-ablate each layer's attention / MoE output
    run.pathways()  # ablate the direction from attention writes / MoE writes
    return run.finish()  # paired tests, claim verdicts, deviations


class _Run:
    """State of one study run; each public method is one stage (saved when a checkpoint folder is given)."""

    def __init__(self, model, data, cfg, judge, log, checkpoint, resume, capability=None):
        if not isinstance(data, RefusalData):
            raise TypeError(f"data must be a RefusalData, got {type(data).__name__}")
        cfg.validate()
        data.check_for_study()
        self.model, self.data, self.log = model, data, log
        self.cfg = cfg = cfg.resolved(model.family)
        self.t0, self.timing = time.time(), {}
        self.bs, self.new, self.T = cfg.batch_size, cfg.max_new_tokens, cfg.temperature
        chat = lambda xs: format_chat(model.tokenizer, xs, cfg.system_prompt)  # noqa: E731
        self.chat = chat
        self.h_train, self.s_train = chat(data.harmful_train), chat(data.harmless_train)
        self.h_val, self.s_val = chat(data.harmful_val), chat(data.harmless_val)
        self.h_test, self.s_test = chat(data.harmful_test), chat(data.harmless_test)
        self.routing_h, self.routing_s = self.h_train, self._routing_harmless()
        self.ids = refusal_token_ids(model.tokenizer, cfg.refusal_starts)
        self.n_pos = (
            post_instruction_len(model.tokenizer, cfg.system_prompt)
            if cfg.n_positions == "eoi"
            else int(cfg.n_positions)
        )
        self.positions = list(range(-self.n_pos, 0))
        self._check_prompt_lengths()
        self.is_organism = data.source.startswith("organism:")
        self.user_judge = judge is not None
        self.judge = judge if judge is not None else self._default_judge()
        self.stages = _Stages(checkpoint, resume, self._fingerprint())
        self.conditions: list[Condition] = []
        self.directions_out: dict[str, Tensor] = {}
        # caches: the baseline generations (reused by unedited outcomes), the unsteered harmless-test logits (every
        # harmless KL's reference), each layer's expert directions (method B, its variant and its control)
        self.unsteered: dict[tuple[int, int, int], list[str]] = {}
        self.base_harmless: Tensor | None = None
        self.layer_dirs: dict[int, Tensor] = {}
        self.search_b: dict | None = None  # method B's search (ExpertSearch.to_dict())
        self.search_c: dict | None = None  # the authors' same-search control, when it runs
        self.controls: list[ExpertControl] = []
        self.user_capability = capability
        self.capability_suite = self._capability_suite()

    # -- setup helpers ------------------------------------------------------------------------------

    def _routing_harmless(self) -> list[str]:
        import random

        prompts = list(self.s_train)
        n = self.cfg.routing_n_harmless
        if n is not None and n < len(prompts):
            prompts = random.Random(self.cfg.seed).sample(prompts, n)
        return prompts

    def _check_prompt_lengths(self) -> None:
        need = max(self.n_pos, self.cfg.routing_last_n or 0)
        tok = self.model.tokenizer
        for name in ("h_train", "s_train", "h_val", "s_val", "h_test", "s_test"):
            for p in getattr(self, name):
                n = len(tok.encode(p, add_special_tokens=False))
                if n < need:
                    raise ValueError(
                        f"a prompt is {n} tokens long with its chat template, shorter than the {need} last positions "
                        f"the study reads (n_positions={self.cfg.n_positions}, routing_last_n="
                        f"{self.cfg.routing_last_n}): {p!r}. Use longer prompts or smaller n_positions"
                    )

    def _default_judge(self) -> DefaultJudge:
        # For an organism, its well_formed evaluator for that organism's language version (v1 organisms answer in
        # forms the v2 grammar rejects), and its request-kind test. Agreement with the labelled sets in tests/data: v2
        # 96.3%, v1 100%.
        organism = self.data.source.split(":", 1)[1] if self.is_organism else None
        judge = default_judge(self.model, organism, self.cfg.system_prompt, self.bs)
        self.organism_evaluator = judge.well_formed is not None
        return judge

    def _fingerprint(self) -> dict:
        return {
            "model": str(getattr(self.model.config, "_name_or_path", "")),
            "family": self.model.family,
            "config": self.cfg.to_dict(),
            "data": self.data.sizes(),
            "data_head": [self.data.harmful_test[:3], self.data.harmless_test[:3]],
            "judge": judge_name(self.judge),
        }

    def _capability_suite(self) -> tuple[str, list[str], Callable[[int, str], bool] | None, int]:
        """``(name, chat prompts, scorer, tokens)``: the organism's suite through its interface when it has one,
        the bundled probe for any other model, harmless answers for a v1 organism (its language has no probe)."""
        import expertlens.organism as organism

        if self.user_capability is not None:
            name = getattr(self.user_capability, "name", None) or getattr(self.user_capability, "__name__", "custom")
            return f"capability suite {name}", [], None, self.new
        prompts_fn = getattr(organism, "capability_prompts", None)
        score_fn = getattr(organism, "score_capability", None)
        n = self.cfg.n_capability
        if not self.is_organism:
            from .capability import load_probe, probe_max_new_tokens, score_probe

            probe = load_probe()
            if n is not None:
                probe = probe[:n]
            chats = self.chat([r["prompt"] for r in probe])
            suite = f"expertlens capability probe ({len(probe)} prompts: arithmetic, copying, capitals, facts)"
            return suite, chats, lambda i, resp: score_probe(probe[i], resp), probe_max_new_tokens()
        records = None
        if callable(prompts_fn) and callable(score_fn):
            try:
                records = list(prompts_fn(self.data.source.split(":", 1)[1], split="test"))
            except ValueError:  # an organism without a capability suite (v1): harmless answers instead
                records = None
        if records:
            if n is not None:
                records = records[:n]
            chats = self.chat([r["prompt"] for r in records])
            return "organism capability suite", chats, lambda i, resp: bool(score_fn(records[i], resp)), self.new
        chats = self.s_test[:n] if n is not None else self.s_test
        return "harmless answers (share of harmless test prompts answered in full)", chats, None, self.new

    def tick(self, name: str) -> None:
        self.timing[name] = round(time.time() - self.t0 - sum(self.timing.values()), 2)

    # -- measuring ----------------------------------------------------------------------------------

    def outcome(self, name: str, chats: list[str], raw: list[str], edits=(), tokens: int | None = None) -> Outcome:
        key = (id(chats), len(chats), tokens or self.new)
        if not edits and key in self.unsteered:  # the baseline generations, reused
            outs = self.unsteered[key]
        else:
            outs = generate(self.model, chats, tokens or self.new, tuple(edits), batch_size=self.bs)
        verdicts = judge_all(self.judge, raw, outs)
        return Outcome.from_verdicts(name, verdicts, raw, outs, self.cfg.n_samples, seed=self.cfg.seed)

    def capability(self, edits=()) -> Rate:
        if self.user_capability is not None:
            with self.model.intervene(*tuple(edits)):
                k, n = self.user_capability(self.model, tuple(edits))
            return Rate.of(int(k), int(n), seed=self.cfg.seed)
        _, chats, score, tokens = self.capability_suite
        outs = generate(self.model, chats, tokens, tuple(edits), batch_size=self.bs)
        if score is None:
            raw = self.data.harmless_test[: len(chats)]
            ok = [v == FULL_RESPONSE for v in judge_all(self.judge, raw, outs)]
        else:
            ok = [score(i, o) for i, o in enumerate(outs)]
        return Rate.of(sum(ok), len(ok), seed=self.cfg.seed)

    def harmless_kl(self, edits) -> float:
        """Mean KL on the harmless test prompts under ``edits`` (what every condition reports)."""
        if not edits:
            return 0.0
        if self.base_harmless is None:
            self.base_harmless = last_logits(self.model, self.s_test, (), self.bs)
        steered = last_logits(self.model, self.s_test, tuple(edits), self.bs)
        return float(kl_divergence(self.base_harmless, steered).mean())

    def condition(self, key, label, bypass=None, induce=None, params=None, note="", *, kls=None,
                  capability=True) -> Condition:  # fmt: skip
        """Evaluate one condition: bypass edits on harmful test, induce edits on harmless test, KL, capability.

        ``kls``: the harmless KLs of the two edits when already measured (a control's KL match); ``capability=False``
        skips the capability suite (control draws: the cost limits apply to the methods, not their controls)."""
        cached = self.stages.get(f"condition_{key}", Condition)
        if cached is not None:
            self.conditions.append(cached)
            return cached
        c = Condition(key, label, dict(params or {}), note=note)
        if bypass is not None:
            c.bypass = self.outcome("harmful test", self.h_test, self.data.harmful_test, bypass)
            c.harmless_kl = kls[0] if kls else self.harmless_kl(bypass)
            if capability:
                c.capability = Capability(self.capability_suite[0], self.capability(bypass), self.base_capability)
        if induce is not None:
            c.induce = self.outcome("harmless test", self.s_test, self.data.harmless_test, induce)
            c.induce_kl = kls[1] if kls else self.harmless_kl(induce)
        self.conditions.append(c)
        return self.stages.put(f"condition_{key}", c)

    # -- stages ---------------------------------------------------------------------------------------

    def baseline(self) -> None:
        self.log("[1/8] baseline: unsteered completions, judge calibration")
        cfg = self.cfg
        cal = self.stages.get("judge", dict)
        if cal is None:
            outs_h = generate(self.model, self.h_test, self.new, (), batch_size=self.bs)
            outs_s = generate(self.model, self.s_test, self.new, (), batch_size=self.bs)
            self.unsteered = {
                (id(self.h_test), len(self.h_test), self.new): outs_h,
                (id(self.s_test), len(self.s_test), self.new): outs_s,
            }
            cal = {}
            if isinstance(self.judge, DefaultJudge) and not self.user_judge:
                raw = self.data.harmful_test + self.data.harmless_test
                self.judge.calibrate(raw, outs_h + outs_s)
                cal = self.judge.calibration()
            self.stages.put("judge", cal)
        elif isinstance(self.judge, DefaultJudge) and not self.user_judge:
            self.judge.mean_floor = cal.get("mean_logprob_floor")
            self.judge.min_floor = cal.get("min_logprob_floor")
            self.judge.max_repetition = cal.get("max_repetition")
        describe = getattr(self.judge, "describe", None)
        self.judge_info = {
            "name": judge_name(self.judge),
            "description": describe() if callable(describe) else judge_name(self.judge),
            "calibration": cal,
        }
        self.base_capability = self.stages.get("base_capability", Rate)
        if self.base_capability is None:
            self.base_capability = self.stages.put("base_capability", self.capability(()))
        self.condition("baseline", "baseline (no intervention)", bypass=(), induce=())
        if cfg.filter_train:
            keep_h = refusal_score(last_logits(self.model, self.h_train, (), self.bs), self.ids, self.T) > 0
            keep_s = refusal_score(last_logits(self.model, self.s_train, (), self.bs), self.ids, self.T) < 0
            fh = [p for p, k in zip(self.h_train, keep_h) if k]
            fs = [p for p, k in zip(self.s_train, keep_s) if k]
            if fh and fs:
                self.h_train, self.s_train = fh, fs
            if cfg.routing_filtered:
                self.routing_h, self.routing_s = self.h_train, self.s_train
        self.tick("baseline")

    def directions(self) -> None:
        self.log("[2/8] candidate directions (difference in means) and selection")
        cfg, model = self.cfg, self.model
        saved = self.stages.tensors("directions")
        sel_dict = self.stages.get("selection", dict)
        if saved is not None and sel_dict is not None:
            self.cands, self.r = saved["candidates"], saved["refusal"]
            self.sel_dict = sel_dict
        else:
            if set(self.data.harmful_train) == set(self.data.harmless_train):
                raise ValueError(
                    "the harmful and harmless train sets are identical, so every difference-in-means direction is "
                    "zero; pass harmful and harmless instructions that differ"
                )
            self.cands = candidate_directions(model, self.h_train, self.s_train, self.positions, batch_size=self.bs)
            if not bool((self.cands.norm(dim=-1) > 0).any()):
                raise ValueError(
                    "every candidate direction is zero: the harmful and harmless train prompts give identical "
                    "activations at the last positions; use prompts that differ there"
                )
            sel = select_direction(
                model, self.cands, self.positions, self.h_val, self.s_val, self.ids,
                kl_threshold=cfg.kl_threshold, induce_threshold=cfg.induce_threshold,
                max_layer_frac=cfg.max_layer_frac, temperature=self.T, batch_size=self.bs,
            )  # fmt: skip
            if sel.selected is None:
                raise RuntimeError(
                    "no candidate direction passed the selection filters "
                    f"(KL ≤ {cfg.kl_threshold}, layer < {cfg.max_layer_frac}·L; the induce filter was already "
                    "relaxed); loosen them in RefusalConfig(kl_threshold=..., max_layer_frac=...)"
                )
            self.r = sel.direction
            s = sel.selected
            self.sel_dict = {
                **sel.to_dict(),
                "chosen": dict(layer=s.layer, position=s.position, bypass=s.bypass, induce=s.induce, kl=s.kl,
                               norm=float(self.r.norm())),
            }  # fmt: skip
            self.stages.put_tensors("directions", {"candidates": self.cands.float(), "refusal": self.r.float()})
            self.stages.put("selection", self.sel_dict)
        self.layer = int(self.sel_dict["chosen"]["layer"])
        self.directions_out.update(refusal=self.r.float(), candidates=self.cands.float())
        self.tick("directions")

    def _add(self, coeff: float):
        return [AddVector("resid_pre", self.r, coeff=coeff, layers=self.layer)]

    def actadd(self) -> None:
        self.log("[3/8] ActAdd: coefficient 1, coefficient chosen by ASR on validation prompts; ablation")
        cfg, layer = self.cfg, self.layer
        c1 = cfg.actadd_coeff
        self.condition("actadd_unit", f"ActAdd, coefficient {c1:g} (−r / +r)", self._add(-c1), self._add(c1),
                       dict(layer=layer, position=self.sel_dict["chosen"]["position"], coefficient=c1))  # fmt: skip
        if cfg.actadd_sweep:
            sweep = self.stages.get("actadd_sweep", ActAddSweepResult)
            if sweep is None:
                sweep = self.stages.put("actadd_sweep", self._sweep())
            self.sweep = sweep
            self.condition(
                "actadd", "ActAdd, coefficient chosen by ASR (−c·r / +c·r)",
                self._add(-sweep.bypass_coeff), self._add(sweep.induce_coeff),
                dict(layer=layer, bypass_coefficient=sweep.bypass_coeff, induce_coefficient=sweep.induce_coeff),
            )  # fmt: skip
        else:
            self.sweep = None
        self.condition("ablation", "directional ablation of r (every layer)", [AblateDirection(self.r)],
                       [AblateDirection(self.r)], dict(direction=f"layer {layer}"))  # fmt: skip
        self.tick("actadd")

    def _sweep(self) -> ActAddSweepResult:
        cfg = self.cfg
        base = last_logits(self.model, self.s_val, (), self.bs)
        base_ok = self.outcome("harmless val", self.s_val, self.data.harmless_val).full_response.value
        points = []
        for c in progress(sorted(cfg.actadd_sweep), desc="ActAdd coefficient sweep"):
            byp = self.outcome("harmful val", self.h_val, self.data.harmful_val, self._add(-c))
            ind = self.outcome("harmless val", self.s_val, self.data.harmless_val, self._add(c))
            kl = float(kl_divergence(base, last_logits(self.model, self.s_val, self._add(-c), self.bs)).mean())
            kept = self.outcome("harmless val", self.s_val, self.data.harmless_val, self._add(-c)).full_response.value
            capability = kept / base_ok if base_ok else math.nan
            ok = kl <= cfg.kl_max and (math.isnan(capability) or capability >= cfg.min_capability)
            points.append(SweepPoint(float(c), byp, ind, kl, capability, ok))
        passed = [p for p in points if p.passed] or points
        best = max(passed, key=lambda p: (p.bypass.full_response.value, -p.coeff))
        induce = max(points, key=lambda p: (p.induce.refusal.value, -p.coeff))
        rule = (
            f"bypass: highest ASR on harmful val among coefficients with harmless KL ≤ {cfg.kl_max:g} and "
            f"capability retention ≥ {100 * cfg.min_capability:.0f}%"
            + ("" if any(p.passed for p in points) else " (none passed: highest ASR overall)")
            + "; induce: highest refusal rate on harmless val; ties go to the smaller coefficient"
        )
        return ActAddSweepResult(self.layer, points, best.coeff, induce.coeff, rule)

    def routing(self) -> None:
        self.log("[4/8] routing statistics (harmful vs harmless)")
        cfg = self.cfg
        rt = self.stages.get("routing", dict)
        if rt is None:
            stats = routing_statistics(
                self.model, self.routing_h, self.routing_s, cfg.routing_last_n, cfg.routing_count, self.bs
            )
            sel = stats.select(threshold=cfg.expert_threshold)
            rt = {
                **stats.to_dict(),
                "threshold": cfg.expert_threshold,
                "selected": [dict(layer=a, expert=b, delta=d) for a, b, d in sel],
                "n_prompts": [len(self.routing_h), len(self.routing_s)],
            }
            if cfg.method_b_select == "top_n":
                b_experts = stats.select(top_n=cfg.method_b_experts)
            else:
                b_experts = sel
            rt["method_b_experts"] = [dict(layer=a, expert=b, delta=d) for a, b, d in b_experts]
            rand = stats.sample_below(cfg.expert_threshold, cfg.n_random_experts, cfg.seed)
            rt["random_experts"] = [dict(layer=a, expert=b, delta=d) for a, b, d in rand]
            self.stages.put("routing", rt)
        self.rt = rt
        self.tick("routing")

    def method_a(self) -> None:
        sel = [(x["layer"], x["expert"], x["delta"]) for x in self.rt["selected"]]
        self.log(f"[5/8] method A: routing edits on {len(sel)} experts")
        kind, label = self.cfg.method_a_kind, "method A: routing edits on routing-linked experts"
        if not sel:
            self.condition("method_a", label, note=f"no expert has |Δ| ≥ {self.cfg.expert_threshold:g} pp")
        else:
            byp = methods.method_a_intervention(self.model, sel, "bypass", kind)
            ind = methods.method_a_intervention(self.model, sel, "induce", kind)
            self.condition("method_a", label, [byp], [ind], dict(kind=kind, experts=_experts_text(sel)))
        self.tick("method_a")
        self.control_a()
        self.tick("control_a")

    def _layer_directions(self, layer: int) -> Tensor:
        """Every expert's direction of ``layer`` ``[P, E, d]`` (computed once per layer)."""
        if layer not in self.layer_dirs:
            self.layer_dirs[layer] = methods.expert_directions(
                self.model, self.h_train, self.s_train, layer, self.positions, self.cfg.method_b_mode, self.bs
            )
        return self.layer_dirs[layer]

    def _expert_search(self, experts: list[tuple[int, int]]):
        cfg = self.cfg
        dirs = {(a, b): self._layer_directions(a)[:, b] for a, b in experts}
        return methods.expert_search(
            self.model, experts, dirs, self.positions, self.h_val, self.s_val, self.ids,
            coeffs=cfg.coeffs, kl_max=cfg.kl_max, keep_min=cfg.keep_min, n_prompts_stage2=cfg.n_prompts_stage2,
            max_new_tokens=cfg.stage2_tokens, judge=self.judge, temperature=self.T, batch_size=self.bs,
            judge_prompts=self.data.harmful_val,
        )  # fmt: skip

    def _search_condition(self, key: str, label: str, experts: list[tuple[int, int]], stage: str) -> dict | None:
        """Search ``experts`` as method B does and evaluate the best combination as condition ``key``; returns the
        search (``ExpertSearch.to_dict()``), None when there was nothing to search."""
        if not experts:
            thr = self.cfg.expert_threshold
            note = (
                (f"no expert has |Δ| ≥ {thr:g} pp, the threshold method B searches (method_b_select='threshold')"
                 if self.cfg.method_b_select == "threshold" else "no expert to search")
                if key == "method_b"
                else f"no expert below {thr:g} pp to sample"
            )  # fmt: skip
            self.condition(key, label, note=note)
            return None
        search_dict = self.stages.get(stage, dict)
        cached = self.stages.get(f"condition_{key}", Condition)
        if search_dict is None or cached is None:
            search = self._expert_search(experts)
            search_dict = self.stages.put(stage, search.to_dict())
            if search.best is None:
                self.condition(key, label, note=f"no combination passed the stage-1 KL filter (KL ≤ {self.cfg.kl_max})")
            else:
                b = search.best
                d = search.directions[(b.layer, b.expert)][self.positions.index(b.position)].float()
                if key == "method_b":
                    self.directions_out["method_b"] = d
                    self.stages.put_tensors("method_b", {"method_b": d})
                self.condition(
                    key, label, [search.intervention(-1.0)], [search.intervention(+1.0)],
                    dict(layer=b.layer, expert=b.expert, position=b.position, coefficient=b.coeff,
                         stage2_asr=b.asr, searched=_experts_text([(a, e, None) for a, e in experts])),
                )  # fmt: skip
        else:
            self.conditions.append(cached)
            t = self.stages.tensors("method_b") if key == "method_b" else None
            if t:
                self.directions_out.update(t)
        return search_dict

    def method_b(self) -> None:
        self.log("[6/8] method B: single-expert steering search, all-experts variant, random-expert controls")
        b_experts = [(x["layer"], x["expert"]) for x in self.rt["method_b_experts"]]
        self.search_b = self._search_condition("method_b", "method B: one routing-linked expert's direction",
                                               b_experts, "search_b")  # fmt: skip
        best = self.search_b.get("best") if self.search_b else None
        if best is not None:
            lay, pos, coeff = best["layer"], best["position"], best["coeff"]
            all_dirs = self._layer_directions(lay)[self.positions.index(pos)]
            self.condition(
                "method_b_all", "method B, all-experts variant (Σ π_e d_e)",
                [methods.all_experts_intervention(all_dirs, lay, -coeff)],
                [methods.all_experts_intervention(all_dirs, lay, coeff)],
                dict(layer=lay, position=pos, coefficient=coeff),
            )  # fmt: skip
        self.tick("method_b")
        if self.cfg.same_search_control:
            rand = [(x["layer"], x["expert"]) for x in self.rt["random_experts"]]
            label = "authors' control: random below-threshold experts of any layer, same search"
            self.search_c = self._search_condition("control", label, rand, "search_c")
            self.tick("control")
        self.control_b()
        self.tick("control_b")

    def _control_stage(self) -> ControlStage:
        return ControlStage(self.model, self.cfg, self.rt, self.stages, self.condition, self.harmless_kl,
                            self._layer_directions, self.positions)  # fmt: skip

    def control_b(self) -> None:
        """Method B's like-for-like control (:meth:`ControlStage.method_b`)."""
        ctrl = self._control_stage().method_b(self.condition_by("method_b"), (self.search_b or {}).get("best"))
        if ctrl is not None:
            self.controls.append(ctrl)

    def control_a(self) -> None:
        """Method A's like-for-like control (:meth:`ControlStage.method_a`)."""
        ctrl = self._control_stage().method_a(self.condition_by("method_a"))
        if ctrl is not None:
            self.controls.append(ctrl)

    def skip_experts(self) -> None:
        self.log("model has no MoE layers: routing statistics, methods A/B and the expert control are skipped")
        self.rt = None
        for key, label in (("method_a", "method A"), ("method_b", "method B")):
            self.condition(key, label, note="skipped: the model has no MoE layers")

    def causal_map(self) -> None:
        if not self.cfg.causal_map:
            self.cmap = None
            return
        self.log("[7/8] causal map: zero-ablate each layer's attention and MoE output")
        cmap = self.stages.get("causal_map", CausalMap)
        if cmap is None:
            n = min(self.cfg.n_causal, len(self.h_test))
            chats, raw = self.h_test[:n], self.data.harmful_test[:n]
            base = self.outcome("harmful test", chats, raw)
            d_ref: dict[str, list] = {"attention": [], "moe": []}
            d_asr: dict[str, list] = {"attention": [], "moe": []}
            layers = list(range(self.model.n_layers))
            for layer in progress(layers, desc="causal map"):
                for comp, point in (("attention", "attn.output"), ("moe", "mlp.output")):
                    o = self.outcome("harmful test", chats, raw, [ZeroAblate(point, layers=layer)])
                    d_ref[comp].append(o.refusal.value - base.refusal.value)
                    d_asr[comp].append(o.full_response.value - base.full_response.value)
            cmap = self.stages.put(
                "causal_map", CausalMap(layers, n, base.refusal.value, base.full_response.value, d_ref, d_asr)
            )
        self.cmap = cmap
        self.tick("causal_map")

    def pathways(self) -> None:
        self.log("[8/8] pathway ablations (attention / MoE / both)")
        pw = self.stages.get("pathways", dict)
        if pw is None:
            base = self.condition_by("baseline").bypass.refusal.value
            # the "both" pathway is the ablation condition on the same prompts, judge and token budget: reused
            abl = self.condition_by("ablation")
            known = {"both": abl.bypass.refusal.value} if abl is not None and abl.bypass is not None else None
            res = pathway_ablation(
                self.model, self.r, self.h_test, self.ids, base_rate=base, max_new_tokens=self.new, judge=_Raw(self),
                temperature=self.T, batch_size=self.bs, known_rates=known,
            )  # fmt: skip
            pw = self.stages.put("pathways", res.to_dict())
        self.pw = pw
        self.tick("pathways")

    def condition_by(self, key: str) -> Condition | None:
        return next((c for c in self.conditions if c.key == key), None)

    def finish(self) -> RefusalStudy:
        from .claims import claim_verdicts

        m = self.model
        self.timing["total"] = round(time.time() - self.t0, 2)
        res = StudyResults(
            model=dict(family=m.family, n_layers=m.n_layers, moe_layers=list(m.moe_layers), n_experts=m.n_experts,
                       top_k=m.top_k, d_model=m.d_model, name=str(getattr(m.config, "_name_or_path", ""))),
            config=self.cfg.to_dict(),
            preset=self.cfg.preset,
            data={**self.data.sizes(), "source": self.data.source,
                  "after_filter": {"harmful_train": len(self.h_train), "harmless_train": len(self.s_train)}},
            judge=self.judge_info,
            selected=self.sel_dict["chosen"],
            selection={k: v for k, v in self.sel_dict.items() if k != "chosen"},
            conditions=self.conditions,
            deviations=self.cfg.deviations(),
            actadd_sweep=self.sweep,
            routing=self.rt,
            method_b_search=self.search_b,
            control_search=self.search_c,
            controls=self.controls,
            causal_map=self.cmap,
            pathways=self.pw,
            timing=self.timing,
            positive_control=self.positive_control,
        )  # fmt: skip
        res.claims = claim_verdicts(res)
        return RefusalStudy(res, self.directions_out)


class _Raw:
    """The run's judge, called with chat prompts mapped back to their instructions (for pathway_ablation)."""

    def __init__(self, run: _Run):
        self.run = run
        self.back = dict(zip(run.h_test, run.data.harmful_test))
        self.name = judge_name(run.judge)

    def judge_batch(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        return judge_all(self.run.judge, [self.back.get(p, p) for p in prompts], list(completions))

    def __call__(self, prompt: str, completion: str) -> str:
        return self.judge_batch([prompt], [completion])[0]


def _experts_text(experts) -> str:
    return ", ".join(f"L{a} E{b}" + ("" if d is None else f" (Δ {d:+.1f} pp)") for a, b, d in experts)
