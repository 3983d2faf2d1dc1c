"""``expertlens`` command line: thin wrappers over the library.

expertlens refusal [--model NAME_OR_PATH] [--out DIR] [--device cpu] [--dtype float32]
expertlens organisms
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _refusal(args: argparse.Namespace) -> int:
    import torch

    from .model import ExpertModel
    from .refusal import RefusalConfig, RefusalData, load_prompt_file, run_refusal_study
    from .refusal.progress import set_progress

    # One thread by default: on a shared CPU, two threads stall each other (steps swing 10x).
    if args.threads or not args.device or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    set_progress(not args.quiet)
    t0 = time.time()
    kwargs = {}
    if args.dtype:
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.device:
        kwargs["device_map"] = args.device
    if args.model is None:
        from .organism import DEFAULT_ORGANISM, organism_path

        name = args.organism or DEFAULT_ORGANISM
        model = ExpertModel(str(organism_path(name)), **kwargs)
        data = RefusalData.from_organism(name, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    else:
        model = ExpertModel(args.model, trust_remote_code=args.trust_remote_code, **kwargs)
        if not (args.harmful and args.harmless):
            print(
                "error: with --model, pass --harmful FILE and --harmless FILE (txt/json/jsonl/csv instructions)",
                file=sys.stderr,
            )
            return 2
        data = RefusalData.from_lists(load_prompt_file(args.harmful), load_prompt_file(args.harmless))
    preset = args.preset or ("organism" if args.model is None else "paper")
    config = getattr(RefusalConfig, preset)()
    if args.system_prompt:
        config.system_prompt = args.system_prompt
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    log(f"expertlens refusal: {model!r}")
    study = run_refusal_study(model, data, config, log=log)
    out = study.save(args.out, report=not args.no_report)
    print(study.table())
    print(
        f"\nresults: {out / 'results.json'}  directions: {out / 'directions.safetensors'}"
        + ("" if args.no_report else f"  report: {out / 'report.html'}")
    )
    print(f"wall time {time.time() - t0:.1f}s")
    return 0


def _organisms(args: argparse.Namespace) -> int:
    from .organism import list_organisms, organism_path

    for name in list_organisms():
        print(f"{name}\t{organism_path(name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``expertlens`` command.

    Example:
        >>> from expertlens.cli import main
        >>> main(["organisms"])  # doctest: +SKIP
        qwen3moe-refusal	.../expertlens/organism/checkpoints/qwen3moe-refusal
        0

        From a shell: ``expertlens refusal --out runs/organism`` runs the whole study on the bundled
        organism; ``expertlens refusal --model NAME --harmful FILE --harmless FILE`` on any model.
    """
    parser = argparse.ArgumentParser(prog="expertlens", description="Mechanistic interpretability for MoE LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("refusal", help="run the expert-aware refusal steering study (default: bundled organism)")
    p.add_argument("--model", help="hub name or local folder (default: the bundled organism)")
    p.add_argument("--organism", help="which bundled organism when --model is not given")
    p.add_argument("--out", default="runs/refusal", help="output folder (results.json, directions, report.html)")
    p.add_argument("--device", help="device or device_map, e.g. cpu, cuda, auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--harmful", help="harmful instructions file (with --model)")
    p.add_argument("--harmless", help="harmless instructions file (with --model)")
    p.add_argument("--system-prompt", help="system message for the chat template")
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--n-test", type=int, default=None, help="test prompts per class (default: all held out)")
    p.add_argument(
        "--preset",
        choices=["paper", "organism", "fast"],
        help="search sizes: the paper's defaults, sized for the organism (default without --model), or fast",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_refusal)
    o = sub.add_parser("organisms", help="list the bundled model organisms")
    o.set_defaults(func=_organisms)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
