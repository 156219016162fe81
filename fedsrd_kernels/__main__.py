"""Command line: ``fedsrd {demo,run,compare} [...]`` (or ``python -m fedsrd_kernels ...``)."""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "run": "federated LoRA fine-tuning of an LLM with one method (the default command)",
    "demo": "synthetic federated run checked against the float64 oracle (no model needed)",
    "compare": "several methods on the same seed, data and steps, then a comparison table",
    "init-adapter": "write the adapter a run starts from (--out FILE): the Flower ServerApp's initial-adapter",
}


# (flag, type, help) of the RunConfig fields the command line sets; the defaults are RunConfig's.
_OPTIONS = (
    ("rounds", int, "federated rounds"),
    ("rank", int, "LoRA rank r"),
    ("alpha", float, "LoRA alpha (scale alpha / r)"),
    ("local-steps", int, "AdamW steps per client and round"),
    ("batch-size", int, "sequences per local step"),
    ("seq-len", int, "tokens per sequence"),
    ("lr", float, "local learning rate (default: the quality study's best for the run's upload, {rescaled:g} "
                  "with the L1 rescale, else {unscaled:g}; see BENCHMARKS.md)"),
    ("max-grad-norm", float, "clip the local gradient to this norm; 0 = no clipping"),
    ("lora-dropout", float, "dropout on the LoRA branch in local training"),
    ("max-examples", int, "examples per domain client, held-out included"),
    ("heldout-examples", int, "held-out examples per client"),
    ("eval-every", int, "held-out loss every this many rounds (and after the last; round 0 always)"),
    ("seed", int, "seed of the data split, the batches, the masks and LoRA's init"),
    ("mu", float, "FedProx proximal coefficient (default: the method's)"),
    ("participation", float, "fraction of clients sampled each round"),
    ("download-drop", float, "DARE drop rate of the download (default: 0.8 for FedSRD, else 0)"),
    ("norm-bound", float, "clip each update to this multiple of the round's median norm (default: off)"),
    ("min-updates", int, "skip a round with fewer valid updates than this"),
)


def _runner_parser(prog: str, command: str) -> argparse.ArgumentParser:
    from .baselines import METHODS
    from .config import RESCALE_SPACES, SELECTIONS
    from .runner.config import LR_L1_RESCALED, LR_UNSCALED, RunConfig
    from .server.decompose import SCHEDULES

    defaults = RunConfig()
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", help="TOML file ([run] table or top-level keys of RunConfig)")
    methods = ", ".join(METHODS)
    if command == "compare":
        parser.add_argument("--methods", default="fedavg,fedsrd-e,fedsrd", help=f"comma-separated, from: {methods}")
    else:
        parser.add_argument("--method", help=f"one of: {methods} (default: {defaults.method})")
    if command == "init-adapter":
        parser.add_argument("--out", required=True, help="safetensors file to write")
    parser.add_argument("--model", help='"tiny", a local HF folder or hub id (default: embedded SmolLM2-135M)')
    parser.add_argument("--domains", help=f"comma-separated (default: {','.join(defaults.domains)})")
    parser.add_argument("--jsonl", action="append", default=[], metavar="NAME=PATH",
                        help="an extra client from {\"text\"} or {\"instruction\", \"response\"} records")
    for name, kind, text in _OPTIONS:
        default = getattr(defaults, name.replace("-", "_"))
        if name == "lr":  # its default depends on the upload: the text names both
            text = text.format(rescaled=LR_L1_RESCALED, unscaled=LR_UNSCALED)
        help_text = text if "(default:" in text else f"{text} (default: {default})"
        parser.add_argument(f"--{name}", type=kind, help=help_text)
    for name, text in (("completion-only", "loss on the response tokens of instruction pairs only"),
                       ("error-feedback", "carry what a client did not upload into its next round"),
                       ("rescale", "L1 rescale of the sparse upload (default: on, off with error feedback)")):
        default = getattr(defaults, name.replace("-", "_"))
        parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction,
                            help=text if name == "rescale" else f"{text} (default: {default})")
    parser.add_argument("--rescale-space", choices=RESCALE_SPACES,
                        help="rescale the upload by L1 per matrix (the paper's code) or by the least-squares "
                             f"scalar per pair in dW space (default: {defaults.rescale_space})")
    parser.add_argument("--selection", choices=SELECTIONS,
                        help="override the method's upload selection, a study variant: e.g. fedsrd with "
                             "magnitude top-k, or a dense upload (default: the method's)")
    parser.add_argument("--schedule", choices=SCHEDULES,
                        help="which factor the FedSRD server moves per pair: alternate (the paper's: B in odd "
                             "rounds, A in even ones) or greedy (the one whose change keeps more of the "
                             f"aggregate; a study variant) (default: {defaults.schedule})")
    parser.add_argument("--weighting", choices=("equal", "samples"),
                        help=f"client weights: 1/m, or by sample count (default: {defaults.weighting})")
    parser.add_argument("--out-dir",
                        help="run folder (default: runs/run/<method>; compare: runs/compare, a subfolder per method)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument("--value-dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the broadcast values (default: float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _run_command(argv: list[str], command: str) -> int:
    from .errors import FedSRDError
    from .extras import require_extra

    try:
        require_extra("runner", f"fedsrd {command}")
    except FedSRDError as exc:
        print(f"fedsrd: {exc}", file=sys.stderr)
        return 2
    from .runner.config import RunConfig
    from .runner.run import compare, initial_adapter, run

    args = _runner_parser(f"fedsrd {command}", command).parse_args(argv)
    overrides = {
        key: value for key, value in vars(args).items()
        if key not in ("config", "methods", "jsonl", "domains", "no_progress", "out") and value is not None
    }
    if overrides.get("max_grad_norm") == 0:
        overrides["max_grad_norm"] = None
    if args.domains is not None:
        overrides["domains"] = tuple(d for d in args.domains.split(",") if d)
    if args.jsonl:
        overrides["jsonl"] = dict(item.split("=", 1) for item in args.jsonl)
    try:
        cfg = RunConfig.load(args.config, **overrides)
        if command == "compare":
            compare(cfg, [m for m in args.methods.split(",") if m], show_progress=not args.no_progress)
        elif command == "init-adapter":
            from safetensors.torch import save_file

            save_file(initial_adapter(cfg), args.out)
            print(f"wrote {args.out}")
        else:
            run(cfg, show_progress=not args.no_progress)
    except (FedSRDError, OSError) as exc:  # bad input, or a file or disk problem: one line, not a traceback
        print(f"fedsrd: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        lines = [f"usage: fedsrd {{{','.join(COMMANDS)}}} [options]"]
        print("\n".join(lines + [f"  {name:12} {text}" for name, text in COMMANDS.items()]))
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "run"
    if command not in COMMANDS:
        print(f"fedsrd: unknown command {command!r}; choose from {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(argv)
    return _run_command(argv, command)


if __name__ == "__main__":
    sys.exit(main())
