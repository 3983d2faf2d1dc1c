"""``expertlens`` command line: thin wrappers over the library.

expertlens refusal [--organism NAME[,NAME...]|all] [--model NAME_OR_PATH --harmful FILE --harmless FILE]
                   [--out DIR] [--resume] [--preset organism|paper|fast] [--parallel tp] ...
expertlens organisms
expertlens --version

Every input is checked before a model is loaded; errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "CLIError"]


class CLIError(Exception):
    """A bad command-line input: printed as one line, exit status 2.

    Example:
        >>> from expertlens.cli import CLIError
        >>> str(CLIError("--out: /etc is not writable"))
        '--out: /etc is not writable'
    """


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("expertlens")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _check_out(out: str, resume: bool) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {out}: exists and is not a folder; pass a folder path")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise CLIError(f"--out {out}: {probe} is not writable; pass a folder you can write to")
    if resume and not (path / "stages" / "run.json").exists():
        raise CLIError(f"--resume: {out} holds no unfinished run (no stages/run.json); drop --resume")
    return path


def _launch(parallel: str | None, resume: bool) -> tuple[int, int]:
    """``(rank, world size)``: under ``torchrun`` every rank runs the same study on its split of the model."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if parallel is not None:
            raise CLIError(f"--parallel {parallel}: launch with torchrun --nproc-per-node N (WORLD_SIZE is 1)")
        return 0, 1
    if resume:
        raise CLIError("--resume under torchrun: every rank must run every stage; drop --resume")
    return int(os.environ.get("RANK", "0")), world


def _split(model: str, world: int, trust_remote_code: bool) -> dict:
    """Loading keyword arguments that split ``model`` tensor-parallel across ``world`` ranks, experts included
    (``{}`` on one process); refused where the experts would be copied to every rank instead."""
    if world == 1:
        return {}
    from .compat import tensor_parallel_config

    try:
        return {"distributed_config": tensor_parallel_config(model, world, trust_remote_code=trust_remote_code)}
    except ValueError as exc:  # the model would load, but not split: say so before anything loads
        raise CLIError(f"--parallel tp: {exc}") from exc


def _organism_path(name: str) -> str:
    from .organism import organism_path

    return str(organism_path(name))


def _organisms(value: str | None) -> list[str]:
    from .organism import DEFAULT_ORGANISM, list_organisms

    shipped = list_organisms()
    if value is None:
        return [DEFAULT_ORGANISM]
    names = shipped if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in shipped]
    if unknown or not names:
        raise CLIError(f"--organism {value}: unknown {unknown or 'empty'}; shipped: {', '.join(shipped)} (or 'all')")
    return names


def _load_prompts(path: str | None, flag: str, column: str | None) -> list[str]:
    if not path:
        raise CLIError(f"with --model, pass {flag} FILE (.txt one per line, .json/.jsonl, or .csv with --column)")
    if not Path(path).is_file():
        raise CLIError(f"{flag} {path}: no such file")
    from .refusal import load_prompt_file  # imports torch: only once the arguments are known to be good

    try:
        return load_prompt_file(path, column)
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CLIError(f"{flag} {path}: {exc}") from exc


def _sample(items: list[str], n: int | None, seed: int) -> list[str]:
    import random

    return items if n is None or n >= len(items) else random.Random(seed).sample(items, n)


def _data_for_model(args):
    harmful = _load_prompts(args.harmful, "--harmful", args.column)
    harmless = _load_prompts(args.harmless, "--harmless", args.column)
    from .refusal import RefusalData  # after the file checks: a missing file is reported without torch

    try:
        data = RefusalData.from_lists(harmful, harmless)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    # honour the split sizes (per class), as for the organisms
    return RefusalData(
        _sample(data.harmful_train, args.n_train, 1), _sample(data.harmless_train, args.n_train, 2),
        _sample(data.harmful_val, args.n_val, 3), _sample(data.harmless_val, args.n_val, 4),
        _sample(data.harmful_test, args.n_test, 5), _sample(data.harmless_test, args.n_test, 6),
        source=f"files:{args.harmful},{args.harmless}",
    )  # fmt: skip


def _check_device(device: str | None, torch) -> None:
    """One line, before anything loads, for a device this torch build or machine does not have."""
    if not device or device in ("cpu", "auto"):
        return
    kind = device.split(":")[0]
    checks = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}
    if kind not in checks:
        raise CLIError(f"--device {device}: unknown device; pass cpu, auto, cuda, cuda:N, mps or xpu")
    backend = checks[kind]
    if backend is None or not backend.is_available():
        raise CLIError(f"--device {device}: no {kind} device is available to this torch build "
                       f"({torch.__version__}); pass --device cpu, or install a torch build for {kind}")  # fmt: skip
    if kind == "cuda" and ":" in device:
        index = device.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")  # fmt: skip


def _capped(args: argparse.Namespace, data) -> list[str]:
    """A note for each split size asked for beyond the prompts there are (the study then uses all of them)."""
    notes = []
    for split in ("train", "val", "test"):
        asked = getattr(args, f"n_{split}")
        have = min(len(getattr(data, f"harmful_{split}")), len(getattr(data, f"harmless_{split}")))
        if asked is not None and asked > have:
            counts = f"{len(getattr(data, f'harmful_{split}'))} harmful / {len(getattr(data, f'harmless_{split}'))}"
            notes.append(f"--n-{split} {asked}: only {counts} harmless {split} prompts exist; using all of them")
    return notes


def _refusal(args: argparse.Namespace) -> int:
    # -- everything is checked before a model is loaded
    out = _check_out(args.out, args.resume)
    for name in ("n_train", "n_val", "n_test", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} {v}: must be a positive integer")
    if args.model is not None and args.organism is not None:
        raise CLIError("pass either --model or --organism, not both")
    if args.model is None:
        given = [f"--{n}" for n in ("harmful", "harmless", "column") if getattr(args, n) is not None]
        if given:
            raise CLIError(f"{' / '.join(given)} only apply with --model (an organism brings its own prompts); "
                           "pass --model NAME_OR_PATH, or drop them")  # fmt: skip
    if args.model is not None and (
        args.model.startswith((".", "/", "~")) and not Path(args.model).expanduser().exists()
    ):
        raise CLIError(f"--model {args.model}: no such folder")
    organisms = _organisms(args.organism) if args.model is None else []
    data_model = _data_for_model(args) if args.model is not None else None
    preset = args.preset or ("organism" if args.model is None else "paper")
    rank, world = _launch(args.parallel, args.resume)  # rank 0 writes the outputs, the others nothing

    import torch

    _check_device(args.device, torch)

    from .model import ExpertModel
    from .refusal import RefusalConfig, RefusalData, run_refusal_study
    from .refusal.progress import set_progress

    config = getattr(RefusalConfig, preset)()
    if args.system_prompt is not None:
        config = config.with_(system_prompt=args.system_prompt or None)
    config.validate()
    if args.quiet or not sys.stderr.isatty():  # transformers' loading bars are carriage-return spam in a log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # One thread by default on CPU: on a shared machine two threads stall each other (steps swing 10x).
    if args.threads or not args.device or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    quiet = args.quiet or rank != 0
    set_progress(not quiet)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    say = print if rank == 0 else (lambda *a: None)
    kwargs: dict = {}
    if args.dtype:
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.device:
        kwargs["device_map"] = args.device
    t0 = time.time()
    studies = {}
    runs = [(None, args.model, data_model)] if args.model else [(n, None, None) for n in organisms]
    # every model's split is settled before the first one loads, so a refused one stops the command up front
    splits = [_split(model_name or _organism_path(name), world, args.trust_remote_code and not name)
              for name, model_name, _ in runs]  # fmt: skip
    for (name, model_name, data), split in zip(runs, splits, strict=True):
        log(f"expertlens refusal: loading {name or model_name}")  # a line, where a bar would spam a log
        if name is not None:
            data = RefusalData.from_organism(name, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
        for note in _capped(args, data):
            say(f"expertlens: note: {note}")
        if name is not None:
            model = ExpertModel(_organism_path(name), **kwargs, **split)
        else:
            model = ExpertModel(model_name, trust_remote_code=args.trust_remote_code, **kwargs, **split)
        where = out / name if len(runs) > 1 else out
        log(f"expertlens refusal: {model!r} ({preset} preset) -> {where}")
        stages = where / "stages" if rank == 0 else None
        study = run_refusal_study(model, data, config, log=log, checkpoint=stages, resume=args.resume)
        if rank == 0:
            study.save(where, report=not args.no_report)
        studies[name or model_name] = study
        say(study.table())
        say(f"\nresults: {where / 'results.json'}" + ("" if args.no_report else f"  report: {where / 'report.html'}"))
    if len(studies) > 1 and rank == 0:
        from .refusal.compare import write_comparison

        path = write_comparison(studies, out, report=not args.no_report)
        say(f"\ncomparison of {len(studies)} organisms: {path}")
    say(f"wall time {time.time() - t0:.1f}s")
    return 0


def _list_organisms(args: argparse.Namespace) -> int:
    from .organism import DEFAULT_ORGANISM, KINDS, list_organisms, organism_kind, organism_path

    names = list_organisms()
    if not names:
        print("(none): this checkout ships no organism checkpoints")
        return 0
    kinds = {n: organism_kind(n) + (", default" if n == DEFAULT_ORGANISM else "") for n in names}
    wide, kind_wide = max(map(len, names)), max(map(len, kinds.values()))
    print(f"{'name':<{wide}}  {'kind':<{kind_wide}}  path")
    for name in names:
        print(f"{name:<{wide}}  {kinds[name]:<{kind_wide}}  {organism_path(name)}")
    print()  # the legend: every kind, also those no shipped organism has (so "none" is said, not implied)
    for kind, what in KINDS.items():
        n = sum(organism_kind(name) == kind for name in names)
        print(f"{kind}: {what} ({n or 'none'} shipped)")
    return 0


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in ``--help``, except where the help already says it or there is none to show (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False) or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (defaults shown in ``--help``)."""
    fmt = _DefaultsHelp
    parser = argparse.ArgumentParser(prog="expertlens", description="Mechanistic interpretability for MoE LMs",
                                     formatter_class=fmt)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"expertlens {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("refusal", formatter_class=fmt,
                       help="run the expert-aware refusal steering study (default: the bundled organism)")  # fmt: skip
    p.add_argument("--organism", help="bundled organism(s): a name, a comma-separated list or 'all' "
                   "(default: the default organism)")  # fmt: skip
    p.add_argument("--model", help="hub name or local folder instead of an organism (needs --harmful/--harmless)")
    p.add_argument("--harmful", help="harmful instructions file (.txt/.json/.jsonl/.csv), with --model")
    p.add_argument("--harmless", help="harmless instructions file, with --model")
    p.add_argument("--column", help="column of a CSV/JSON file holding the instruction (default: first of "
                   "instruction, prompt, goal, behavior, text)")  # fmt: skip
    p.add_argument("--out", default="runs/refusal", help="output folder (results.json, directions, report.html)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last stage")
    p.add_argument("--preset", choices=["organism", "paper", "fast"],
                   help="study settings; default organism for organisms, paper for --model")  # fmt: skip
    p.add_argument("--system-prompt", help="system message for the chat template ('' for none)")
    p.add_argument("--n-train", type=int, default=128, help="train prompts per class")
    p.add_argument("--n-val", type=int, default=32, help="validation prompts per class")
    p.add_argument("--n-test", type=int, default=None, help="test prompts per class (default: all held out)")
    p.add_argument("--device", help="device or device_map, e.g. cpu, cuda, auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--parallel", choices=["tp"], help="under torchrun (the default there): split the model "
                   "across the ranks, tensor parallel; rank 0 writes the outputs")  # fmt: skip
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    p.set_defaults(func=_refusal)
    o = sub.add_parser("organisms", help="list the bundled model organisms and their kinds (planted, control, ...)",
                       formatter_class=fmt)  # fmt: skip
    o.set_defaults(func=_list_organisms)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``expertlens`` command (exit status 2 with a one-line message on bad input).

    Example:
        >>> from expertlens.cli import main
        >>> main(["organisms"])  # doctest: +SKIP
        name              kind              path
        olmoe-refusal     planted, default  .../expertlens/organism/checkpoints/olmoe-refusal
        ...
        0

        From a shell: ``expertlens refusal --out runs/organism`` runs the whole study on the bundled
        organism; ``expertlens refusal --organism all`` on every organism with a comparison table;
        ``expertlens refusal --model NAME --harmful FILE --harmless FILE`` on any model.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"expertlens: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as exc:
        if os.environ.get("EXPERTLENS_TRACEBACK"):
            raise
        msg = " ".join(str(exc).split())
        print(f"expertlens: error: {type(exc).__name__}: {msg} (EXPERTLENS_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)  # fmt: skip
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
