"""Run the expertlens benchmarks: prints a table and writes JSON.

    python bench/run.py                      # full run (~5 min on 2 shared cores), bench/results.json
    python bench/run.py --quick              # smoke test on the tiny config, one round (seconds)
    python bench/run.py --docs docs/performance.md   # also rewrite the table in the docs page

Sections (each measured side by side in one process, interleaved rounds, medians):
  1. forward      bare HF vs ExpertModel trace: nothing saved / full capture / one AddVector
  2. generate     bare generate vs expertlens steered generate vs hooks without KV cache
  3. extract      difference in means, expertlens vs plain torch hooks
  4. memory       peak RSS of capturing expert_out (one subprocess per configuration)
  5. e2e          `expertlens refusal` on the organism, wall time
  6. startup      `import expertlens` and `expertlens --help` vs `import torch`, fresh interpreters
on the medium synthetic config and on the organism (skipped with a note when no checkpoint ships).
One torch thread throughout (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from bench import sections  # noqa: E402
from bench.harness import REPO, load_average, machine_info, organism_setting, synthetic_setting  # noqa: E402
from bench.memory import MemoryRun, memory_specs  # noqa: E402

FORWARD_KEYS = (
    "bare", "wrapped_call", "trace_nothing", "trace_capture", "trace_addvector", "nnsight_nothing", "nnsight_capture",
    "nnsight_addvector",
)
GENERATE_KEYS = ("bare", "expertlens_plain", "expertlens_steered", "hooks_nocache", "hooks_cached")
EXTRACT_KEYS = ("plain_hooks", "expertlens")
SECTIONS = ("forward", "generate", "extract", "memory", "e2e", "startup")
DOCS_BEGIN, DOCS_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def expected_row_ids(quick: bool) -> list[str]:
    """Every row a run's JSON has (organism rows are present and marked ``skipped`` when unavailable)."""
    synthetic = "tiny" if quick else "medium"
    ids = []
    for setting in (synthetic, "olmoe", "organism"):
        ids += [f"forward/{setting}/{k}" for k in FORWARD_KEYS]
        if setting == "olmoe":  # the OLMoE-shaped config has forward targets only
            continue
        ids += [f"generate/{setting}/{k}" for k in GENERATE_KEYS]
        ids += [f"extract/{setting}/{k}" for k in EXTRACT_KEYS]
    ids += [rid for rid, _ in memory_specs(quick, "organism")]
    ids.append("e2e/organism/refusal_cli")
    ids += [f"startup/python/{k}" for k in sections.STARTUP_KEYS]
    return ids


def _skipped(ids: list[str], why: str) -> list[dict]:
    return [
        {"id": i, "section": i.split("/")[0], "setting": i.split("/")[1], "name": i, "skipped": why} for i in ids
    ]


def _error_rows(section: str, setting: str, keys, err: str) -> list[dict]:
    """Rows of a section that failed: present, with the error, and counted as missed targets."""
    return [
        {"id": f"{section}/{setting}/{k}", "section": section, "setting": setting,
         "name": f"{section}/{setting}/{k}", "error": err, "met": False}
        for k in keys
    ]  # fmt: skip


def _setting_rows(setting, wanted: set[str], log) -> list[dict]:
    t0 = time.perf_counter()
    rows: list[dict] = []
    try:
        bare, model, tok = setting.build()
    except Exception as e:  # noqa: BLE001  (a setting that cannot be built must not lose the others)
        log(f"  building {setting.name} FAILED: {e!r}")
        return rows  # its rows are filled in as "not run"
    log(f"  built {setting.name} in {time.perf_counter() - t0:.1f}s: {setting.describe}")
    for section, fn in (
        ("forward", sections.forward_rows),
        ("generate", sections.generation_rows),
        ("extract", sections.extraction_rows),
    ):
        if section not in wanted:
            continue
        t0 = time.perf_counter()
        load = load_average()
        try:
            new_rows = fn(bare, model, tok, setting)
            for r in new_rows:
                r["load_average"] = load  # the machine's load when this section started
            rows += new_rows
        except Exception as e:  # noqa: BLE001  (one broken section must not lose the others)
            import traceback

            err = "".join(traceback.format_exception(e))[-2000:]
            log(f"  {section}/{setting.name} FAILED: {e!r}")
            keys = {"forward": FORWARD_KEYS, "generate": GENERATE_KEYS, "extract": EXTRACT_KEYS}[section]
            rows += _error_rows(section, setting.name, keys, err)
            continue
        log(f"  {section}/{setting.name}: {time.perf_counter() - t0:.1f}s")
    model.restore()
    del bare, model
    gc.collect()
    return rows


def run(
    quick: bool = False,
    out: str | Path | None = None,
    docs: str | Path | None = None,
    only: tuple[str, ...] = SECTIONS,
    organism: bool | str = True,
    log=print,
    update: bool = False,
) -> dict:
    """Run the benchmarks and write the JSON; returns the results dict.

    ``organism``: True = the shipped organism if any, False = skip, a folder = that checkpoint
    (e.g. one still training; its e2e row runs ``expertlens refusal --model`` on the train prompts).
    ``update``: keep the rows of the sections not in ``only`` from the existing ``out`` JSON.
    """
    torch.set_num_threads(1)
    from expertlens.organism import list_organisms
    from expertlens.refusal.progress import set_progress

    set_progress(False)
    try:  # no "Loading weights" bars in the output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    started = time.perf_counter()
    wanted = set(only)
    meta = machine_info()
    meta.update(quick=quick, load_average_start=load_average(), sections=sorted(wanted))
    org_path = organism if isinstance(organism, str) else None
    names = list_organisms() if organism is True else []
    org = organism_setting(quick, org_path) if (names or org_path) else None
    org_name = org.extra["organism"] if org else None
    notes = []
    if org is None:
        why = "organism rows skipped: no checkpoint yet (list_organisms() is empty)" if organism else "--no-organism"
        notes.append(why)
        log(f"note: {why}")
    elif org_path:
        notes.append(f"organism rows use the checkpoint folder {org_path} (--organism-path), not a shipped organism")
    rows: list[dict] = []

    # 6. start-up first: fresh interpreters, timed while nothing else of this run is working
    if "startup" in wanted:
        t0 = time.perf_counter()
        load = load_average()
        try:
            startup = sections.startup_rows(quick)
        except Exception as e:  # noqa: BLE001  (a broken section must not lose the others)
            log(f"  startup FAILED: {e!r}")
            startup = _error_rows("startup", "python", sections.STARTUP_KEYS, repr(e))
        rows += [{**r, "load_average": load} for r in startup]
        log(f"  startup: {time.perf_counter() - t0:.1f}s")

    # 4. memory: fresh subprocesses, two at a time, while nothing here is being timed
    # (--quick: forked from this process after the timed sections, so they start warm).
    if "memory" in wanted and not quick:
        t0 = time.perf_counter()
        rows += MemoryRun(quick, org.extra["path"] if org else None).rows()
        log(f"  memory: {time.perf_counter() - t0:.1f}s")

    # 1-3 on the synthetic config, then the organism.
    syn = synthetic_setting("tiny" if quick else "medium", quick)
    meta["synthetic"] = {"name": syn.name, "describe": syn.describe, **syn.extra}
    rows += _setting_rows(syn, wanted, log)
    if not quick:
        olmoe = synthetic_setting("olmoe", quick)
        meta["olmoe"] = {"name": olmoe.name, "describe": olmoe.describe, **olmoe.extra}
        rows += _setting_rows(olmoe, wanted & {"forward"}, log)
    if org is not None:
        meta["organism"] = {"describe": org.describe, **org.extra}
        rows += _setting_rows(org, wanted, log)

    if "memory" in wanted and quick:
        t0 = time.perf_counter()
        rows += MemoryRun(quick, org.extra["path"] if org else None).rows()
        log(f"  memory (forked): {time.perf_counter() - t0:.1f}s")

    # 5. the organism end to end.
    if "e2e" in wanted and org_name is not None and not quick:
        with tempfile.TemporaryDirectory(prefix="expertlens-bench-") as tmp:
            t0 = time.perf_counter()
            rows.append(sections.refusal_cli_row(org_name, tmp, path=org_path))
            log(f"  e2e: {time.perf_counter() - t0:.1f}s")

    out = Path(out) if out else REPO / "bench" / ("results-quick.json" if quick else "results.json")
    if update and out.exists():
        old = json.loads(out.read_text())
        kept = [r for r in old.get("rows", []) if r["section"] not in wanted and "skipped" not in r]
        rows += kept
        meta["updated_sections_only"] = sorted(wanted)
        meta["kept_from_previous_run"] = {k: old["meta"].get(k) for k in ("date", "git_commit", "total_wall_s")}
        notes += [n for n in old.get("notes", []) if n not in notes]
        for key in ("synthetic", "organism"):
            if key not in meta and key in old["meta"]:
                meta[key] = old["meta"][key]

    # Rows not produced (organism missing, quick mode, --only) are present and say why.
    have = {r["id"] for r in rows}
    for rid in expected_row_ids(quick):
        if rid in have:
            continue
        section, setting = rid.split("/")[:2]
        if section not in wanted:
            why = "section not selected (--only)"
        elif setting == "organism" and org_name is None:
            why = notes[0] if notes else "no organism"
        elif section == "e2e" and quick:
            why = "--quick (the study takes minutes)"
        elif setting == "olmoe" and quick:
            why = "--quick (the OLMoE-shaped config is a full-run setting)"
        else:
            why = "not run"
        rows += _skipped([rid], why)
    order = {rid: i for i, rid in enumerate(expected_row_ids(quick))}
    rows.sort(key=lambda r: order.get(r["id"], len(order)))

    meta["load_average_end"] = load_average()
    meta["total_wall_s"] = round(time.perf_counter() - started, 1)
    result = {"meta": meta, "notes": notes, "rows": rows, "targets": targets_summary(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(result), indent=1) + "\n")
    table = markdown(result)
    log("\n" + table)
    log(f"\nwrote {out} (total {meta['total_wall_s']}s)")
    if docs:
        update_docs(Path(docs), table)
        log(f"updated {docs}")
    return result


def _clean(x):
    """JSON-safe: NaN/inf become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _bound(target: str) -> float | None:
    """The number of a ``"... <= 1.05"`` target (``None`` for other forms)."""
    head, sep, num = target.rpartition("<=")
    try:
        return float(num) if sep else None
    except ValueError:
        return None


def targets_summary(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if "target" not in r:
            continue
        t = {"id": r["id"], "target": r["target"], "value": r.get("ratio"), "met": r.get("met")}
        for key in ("nnsight_floor", "ratio_vs_nnsight", "ratio_vs_bare", "load_average"):
            if key in r:
                t[key] = r[key]
        bound = _bound(r["target"])
        if t.get("nnsight_floor") is not None and bound is not None:
            # nnsight itself, doing the same work in the same run, already exceeds the target
            t["floor_exceeds_target"] = t["nnsight_floor"] > bound
        out.append(t)
    return out


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def _ms(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.1f} s"


def _x(r: float | None) -> str:
    return "–" if r is None or (isinstance(r, float) and not math.isfinite(r)) else f"{r:.2f}×"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _met(row: dict) -> str:
    if "met" not in row:
        return ""
    return "met" if row["met"] else "**missed**"


def markdown(result: dict) -> str:
    rows, meta = result["rows"], result["meta"]
    out = []
    m = meta
    out.append(
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs (shared), {m.get('memory_gb')} GB; "
        f"torch {m['torch']}, transformers {m['transformers']}, nnsight {m['nnsight']}, Python {m['python']}; "
        f"torch threads: {m['torch_threads']}; load average {m.get('load_average_start')} → "
        f"{m.get('load_average_end')}; commit {m.get('git_commit')}; {m['date']}; total {m.get('total_wall_s')} s."
    )
    if m.get("updated_sections_only"):
        prev = m.get("kept_from_previous_run") or {}
        out.append(
            f"\nSections {', '.join(m['updated_sections_only'])} are from this run; the other rows are kept from "
            f"the run of {prev.get('date')} (commit {prev.get('git_commit')}, total {prev.get('total_wall_s')} s)."
        )
    if "synthetic" in m:
        out.append(f"\nSynthetic setting `{m['synthetic']['name']}`: {m['synthetic']['describe']}.")
    if "olmoe" in m:
        out.append(f"OLMoE-shaped setting `olmoe`: {m['olmoe']['describe']}.")
    if "organism" in m:
        out.append(f"Organism setting: {m['organism']['describe']}.")
    for note in result.get("notes", []):
        out.append(f"\nNote: {note}.")
    timed = [r for r in rows if r["section"] in ("forward", "generate", "extract", "startup")]
    out.append("\n| row | setting | wall (median) | CPU (median) | rounds | ratio (CPU) | ratio (wall) "
               "| ÷ nnsight (CPU) | target | |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in timed:
        if "skipped" in r or "error" in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else "error: " + r["error"].strip().splitlines()[-1][:99]
            out.append(f"| `{r['id']}` | {r['setting']} | {why} | | | | | | | |")
            continue
        extra = ""
        if r["section"] == "extract":
            extra = f" ({r['prompts_per_s']:.0f} prompts/s)"
        out.append(
            f"| {r['name']} | {r['setting']} | {_ms(r['wall_s'])} | {_ms(r['cpu_s'])}{extra} | {r['rounds']} | "
            f"{_x(r.get('ratio'))} | {_x(r.get('ratio_wall'))} | {_x(r.get('ratio_vs_nnsight'))} | "
            f"{r.get('target', r.get('ratio_of', ''))} | {_met(r)} |"
        )
    mem = [r for r in rows if r["section"] == "memory"]
    out.append(
        "\n| capture memory | tokens | estimate [tokens,k,d]×layers | dense [tokens,E,d]×layers | "
        "peak RSS increase | live RSS increase | ratio | |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in mem:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or ("error: " + r["error"].strip().splitlines()[-1][:120])
            out.append(f"| `{r['id']}` | {why} | | | | | | |")
            continue
        scale = ""
        for key in ("scaling_vs_E", "scaling_vs_k"):
            if key in r:
                sc = r[key]
                scale += f" ({sc['from']}→{sc['to']}: peak ×{_num(sc['peak_ratio'])}, live ×{_num(sc['live_ratio'])})"
        out.append(
            f"| {r['name']}{scale} | {r['tokens']} | {r['estimate_mb']:.1f} MB | {r['dense_estimate_mb']:.1f} MB | "
            f"{r['peak_delta_mb']:.1f} MB | {r['live_delta_mb']:.1f} MB | {_x(r['ratio'])} | {_met(r)} |"
        )
    for r in rows:
        if r["section"] != "e2e":
            continue
        if "skipped" in r:
            out.append(f"\nOrganism end to end (`expertlens refusal`): skipped: {r['skipped']}.")
        elif r.get("returncode", 0) != 0:
            out.append(
                f"\nOrganism end to end: `{r['command']}` failed (rc {r['returncode']}) after {r['wall_s']:.1f} s."
            )
        else:
            out.append(
                f"\nOrganism end to end: `{r['command']}`: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU (one run)."
            )
    tg = result["targets"]
    if tg:
        out.append("\nTargets:")
        for t in tg:
            v = "–" if t["value"] is None else f"{t['value']:.3f}"
            extra = ""
            if t.get("nnsight_floor") is not None:
                extra = (f" (nnsight's own floor in the same run: {t['nnsight_floor']:.3f}; expertlens over plain "
                         f"nnsight: {t['ratio_vs_nnsight']:.3f})")
                if t.get("floor_exceeds_target") and not t["met"]:
                    extra += " — nnsight's floor alone is above the target"
            elif t.get("ratio_vs_bare") is not None:
                extra = f" (vs bare unsteered generate: {t['ratio_vs_bare']:.3f})"
            load = f"; load {t['load_average']}" if t.get("load_average") else ""
            out.append(f"- `{t['id']}`: {t['target']}: {v} — {'met' if t['met'] else 'MISSED'}{extra}{load}")
    return "\n".join(out)


def update_docs(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else f"# Performance\n\n{DOCS_BEGIN}\n{DOCS_END}\n"
    if DOCS_BEGIN not in text or DOCS_END not in text:
        text += f"\n{DOCS_BEGIN}\n{DOCS_END}\n"
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    path.write_text(f"{head}{DOCS_BEGIN}\n{table}\n{DOCS_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny config, one round, no e2e: a smoke test in seconds")
    p.add_argument("--out", help="JSON path (default bench/results.json, or bench/results-quick.json)")
    p.add_argument("--docs", help="also rewrite the table between the bench markers of this markdown file")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--no-organism", action="store_true", help="skip the organism rows")
    p.add_argument("--organism-path", help="use this checkpoint folder for the organism rows (e.g. one in training)")
    p.add_argument("--update", action="store_true", help="with --only: keep the other sections' rows from --out")
    args = p.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = set(only) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections {sorted(bad)}; choose from {SECTIONS}")
    organism: bool | str = args.organism_path or not args.no_organism
    run(quick=args.quick, out=args.out, docs=args.docs, only=only, organism=organism, update=args.update)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
