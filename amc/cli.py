"""``amc``: the command line. Exit status 0 done, 2 bad input (one line), 1 anything unexpected."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from amc.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amc", description="AMC: search per-layer pruning ratios with DDPG.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("config", help="YAML config file")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. search.target=0.3 (repeatable)")
        return c

    c = with_config("run", "the whole pipeline: train if missing, search, export, fine-tune, evaluate")
    c.add_argument("--episodes", type=int)
    c = with_config("train", "train the base model and write model.checkpoint")
    c.add_argument("--epochs", type=int)
    with_config("info", "list the prunable units with channels, MACs and params")

    c = sub.add_parser("search", help="run a search, or continue one with --resume")
    c.add_argument("config", nargs="?", help="YAML config file (omit with --resume)")
    c.add_argument("--resume", metavar="RUN_DIR", type=Path)
    c.add_argument("--episodes", type=int)
    c.add_argument("--run-dir", type=Path)
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    c = sub.add_parser("export", help="write a run's policy as a pruned checkpoint")
    c.add_argument("run_dir", type=Path)
    c.add_argument("--policy", default="best", help="'best' or a policy JSON file")
    c.add_argument("--out", type=Path)
    c.add_argument("--onnx", type=Path)

    c = sub.add_parser("finetune", help="fine-tune a pruned checkpoint")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--config", required=True)
    c.add_argument("--epochs", type=int)
    c.add_argument("--distill", action="store_true", default=None, help="distil from the base model")
    c.add_argument("--out", type=Path)

    c = sub.add_parser("eval", help="print a checkpoint's metrics as JSON")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--config", required=True)

    c = with_config("baseline", "prune or quantize by a rule through the same export path")
    c.add_argument("--method", required=True, choices=["uniform", "random", "global", "deep", "shallow", "sensitivity"])
    c.add_argument("--out", type=Path)
    return p


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise UserError(f"must be a positive integer, got {value}", field=flag)


def _dispatch(args: argparse.Namespace) -> None:
    from amc.config import load_config, run_dir_for

    for flag in ("episodes", "epochs"):
        _positive(getattr(args, flag, None), f"--{flag}")
    if args.command == "search":
        from amc.search import load_run_config, search

        if args.resume:
            if args.config:
                raise UserError("give either CONFIG or --resume RUN_DIR, not both", field="amc search")
            overrides = args.overrides + ([f"search.episodes={args.episodes}"] if args.episodes else [])
            cfg = load_run_config(args.resume, overrides)
            run_dir = args.resume
        else:
            if not args.config:
                raise UserError("needs a CONFIG file or --resume RUN_DIR", field="amc search")
            overrides = args.overrides + ([f"search.episodes={args.episodes}"] if args.episodes else [])
            cfg = load_config(args.config, overrides)
            run_dir = args.run_dir or run_dir_for(cfg)
        best = search(cfg, run_dir, resume=bool(args.resume))
        print(json.dumps({"run_dir": str(run_dir), **{k: best[k] for k in ("episode", "reward", "error", "cost_ratio")}}))
        return
    if args.command == "export":
        from amc.pipeline import export_run

        out, metrics = export_run(args.run_dir, args.policy, args.out, args.onnx)
        print(json.dumps({"checkpoint": str(out), **metrics}))
        return
    if args.command in ("finetune", "eval"):
        from amc.pipeline import evaluate, finetune

        cfg = load_config(args.config)
        if args.command == "eval":
            print(json.dumps(evaluate(args.checkpoint, cfg)))
        else:
            out, metrics = finetune(args.checkpoint, cfg, args.epochs, args.distill, args.out)
            print(json.dumps({"checkpoint": str(out), **metrics}))
        return

    cfg = load_config(args.config, args.overrides)
    if args.command == "train":
        from amc.pipeline import train_base

        metrics = train_base(cfg, args.epochs)
        print(f"test top-1 {100 * metrics['test_top1']:.2f}% after {metrics['epochs']} epochs "
              f"({metrics['seconds']:.0f} s) -> {cfg.model.checkpoint}")
    elif args.command == "info":
        from amc.pipeline import info

        print(info(cfg))
    elif args.command == "run":
        from amc.pipeline import run_all

        print(run_all(cfg, args.episodes))
    elif args.command == "baseline":
        from amc.baselines import run_baseline

        out, metrics = run_baseline(cfg, args.method, args.out)
        print(json.dumps({"checkpoint": str(out), **metrics}))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*distutils.*")
    try:
        _dispatch(args)
    except UserError as exc:
        print(f"amc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("amc: interrupted", file=sys.stderr)
        return 130
    return 0


POSITIONAL_CONFIG = {"run", "train", "info", "search", "baseline"}


def script_main(command: str) -> None:
    """Entry of the ``scripts/*.py`` wrappers: ``python scripts/search.py --config X.yaml ...``.

    Research code takes ``--config``; the CLI takes the config positionally for some commands.
    """
    argv = sys.argv[1:]
    if command in POSITIONAL_CONFIG and "--config" in argv:
        i = argv.index("--config")
        argv = argv[i + 1:i + 2] + argv[:i] + argv[i + 2:]
    sys.exit(main([command, *argv]))


if __name__ == "__main__":
    sys.exit(main())
