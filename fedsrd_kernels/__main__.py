"""Command line: ``fedsrd {demo,run,compare} [...]`` (or ``python -m fedsrd_kernels ...``)."""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "run": "federated LoRA fine-tuning of an LLM with one method (the default command)",
    "demo": "synthetic federated run checked against the float64 oracle (no model needed)",
    "compare": "several methods on the same seed, data and steps, then a comparison table",
}


def _runner_parser(prog: str, compare: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", help="TOML file ([run] table or top-level keys of RunConfig)")
    if compare:
        parser.add_argument("--methods", default="fedavg,fedsrd-e,fedsrd", help="comma-separated methods")
    else:
        parser.add_argument("--method")
    parser.add_argument("--model", help='"tiny", a local HF folder or hub id; default: embedded SmolLM2-135M')
    parser.add_argument("--domains", help="comma-separated: code,medical,math,finance")
    parser.add_argument("--jsonl", action="append", default=[], metavar="NAME=PATH", help="an extra client")
    for name, kind in (("rounds", int), ("rank", int), ("local-steps", int), ("batch-size", int),
                       ("seq-len", int), ("max-examples", int), ("heldout-examples", int), ("seed", int),
                       ("lr", float), ("alpha", float), ("mu", float), ("participation", float),
                       ("download-drop", float), ("norm-bound", float), ("min-updates", int)):
        parser.add_argument(f"--{name}", type=kind)
    parser.add_argument("--out-dir")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--value-dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _run_command(argv: list[str], compare: bool) -> int:
    from .errors import FedSRDError
    from .runner.config import RunConfig
    from .runner.run import compare as compare_methods
    from .runner.run import run

    args = _runner_parser("fedsrd compare" if compare else "fedsrd run", compare).parse_args(argv)
    overrides = {
        key: value for key, value in vars(args).items()
        if key not in ("config", "methods", "jsonl", "domains", "no_progress") and value is not None
    }
    if args.domains is not None:
        overrides["domains"] = tuple(d for d in args.domains.split(",") if d)
    if args.jsonl:
        overrides["jsonl"] = dict(item.split("=", 1) for item in args.jsonl)
    try:
        cfg = RunConfig.load(args.config, **overrides)
        if compare:
            compare_methods(cfg, [m for m in args.methods.split(",") if m], show_progress=not args.no_progress)
        else:
            run(cfg, show_progress=not args.no_progress)
    except FedSRDError as exc:
        print(f"fedsrd: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: fedsrd {demo,run,compare} [options]\n" + "\n".join(f"  {k:8} {v}" for k, v in COMMANDS.items()))
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "run"
    if command not in COMMANDS:
        print(f"fedsrd: unknown command {command!r}; choose from {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(argv)
    return _run_command(argv, compare=command == "compare")


if __name__ == "__main__":
    sys.exit(main())
