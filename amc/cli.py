"""``amc``: the command line. Exit status 0 done, 2 bad input (one line), 1 anything unexpected, 130 Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from amc.config import EVAL_SPLITS, EXPORT_SETTABLE
from amc.errors import UserError

BASELINES = ("uniform", "random", "global", "deep", "shallow", "sensitivity")
NO_PROGRESS_ENV = "AMC_NO_PROGRESS"
CONFIG_HELP = "YAML config file (paths inside it are relative to the current directory)"
QUIET_HELP = f"no progress bars, e.g. when logging to a file (or set {NO_PROGRESS_ENV}=1)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amc", description="AMC: search per-layer pruning ratios with DDPG.")
    p.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quiet = argparse.ArgumentParser(add_help=False)  # --quiet after the command too; SUPPRESS keeps the global one
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)

    def command(name: str, help: str, config: bool = True, set_help: str | None = None) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help, parents=[quiet])
        if config:
            c.add_argument("config", help=CONFIG_HELP)
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help=set_help or "override a config field, e.g. search.target=0.3 (repeatable)")
        return c

    episodes = "search episodes in all (overrides search.episodes)"
    c = command("run", "the whole pipeline: train if missing, search, export, fine-tune, evaluate")
    c.add_argument("--episodes", type=int, help=episodes)
    c = command("train", "train the base model and write model.checkpoint")
    c.add_argument("--epochs", type=int, help="training epochs (overrides train.epochs)")
    command("info", "list the prunable units with channels, MACs and params")

    c = command("search", "run a search, or continue one with --resume", config=False,
                set_help="override a config field (with --resume: only search.episodes may change)")
    c.add_argument("config", nargs="?", help=f"{CONFIG_HELP}; omit with --resume")
    c.add_argument("--resume", metavar="RUN_DIR", type=Path, help="continue the search in this run directory")
    c.add_argument("--episodes", type=int, help=episodes)
    c.add_argument("--run-dir", type=Path, help="where the run goes (default: search.run_dir or runs/<config name>)")

    c = command("export", "write a run's policy as a pruned checkpoint", config=False,
                set_help=f"change the run's config for the export, only {', '.join(EXPORT_SETTABLE)} (repeatable)")
    c.add_argument("run_dir", type=Path, help="a run directory written by `amc search`")
    c.add_argument("--policy", default="best", help="'best' (the run's best_policy.json) or a policy JSON file")
    c.add_argument("--out", type=Path, help="checkpoint to write (default: RUN_DIR/pruned.pt)")
    c.add_argument("--onnx", type=Path, help="also write the pruned model as ONNX to this file")

    c = command("finetune", "fine-tune a pruned checkpoint", config=False)
    c.add_argument("checkpoint", type=Path, help="a pruned checkpoint (from export, baseline or finetune)")
    c.add_argument("--config", required=True, help=f"{CONFIG_HELP}; its model and data must match the checkpoint's")
    c.add_argument("--epochs", type=int, help="fine-tuning epochs (overrides finetune.epochs)")
    c.add_argument("--distill", action="store_true", default=None, help="distil from the base model")
    c.add_argument("--out", type=Path, help="checkpoint to write (default: CHECKPOINT with an _ft suffix)")

    c = command("eval", "print a checkpoint's metrics as JSON", config=False)
    c.add_argument("checkpoint", type=Path, help="a base or pruned checkpoint")
    c.add_argument("--config", required=True, help=f"{CONFIG_HELP}; its model and data must match the checkpoint's")
    c.add_argument("--split", choices=EVAL_SPLITS, default="test", help="the data to measure accuracy on (default: test)")

    c = command("baseline", f"prune or quantize by a rule ({', '.join(BASELINES)}) through the same export path")
    c.add_argument("--method", required=True, choices=BASELINES, help="the rule (see amc/baselines.py)")
    c.add_argument("--out", type=Path, help="checkpoint to write (default: RUN_DIR/baseline_<method>.pt)")
    return p


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise UserError(f"must be a positive integer, got {value}", field=flag)


def require_run_dir(path: Path, command: str) -> None:
    """Refuse a path that is not a search's run directory, in terms of the command that needs one."""
    from amc.search import CONFIG_FILE

    needs = f"`{command}` needs a run directory written by `amc search`"
    if not path.exists():
        raise UserError(f"no such directory; {needs}", where=str(path))
    if not path.is_dir():
        raise UserError(f"not a directory; {needs}", where=str(path))
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"not a run directory (no {CONFIG_FILE}); {needs}", where=str(path))


@contextmanager
def _resume_hint(run_dir: Path) -> Iterator[None]:
    """On Ctrl-C during a search, say how to continue it (once the run directory can be resumed)."""
    try:
        yield
    except KeyboardInterrupt:
        from amc.search import CONFIG_FILE

        if (run_dir / CONFIG_FILE).is_file():
            raise KeyboardInterrupt(f"interrupted; continue with `amc search --resume {shlex.quote(str(run_dir))}`"
                                    ) from None
        raise


def _dispatch(args: argparse.Namespace, progress: bool) -> None:
    from amc.config import load_config, run_dir_for

    for flag in ("episodes", "epochs"):
        _positive(getattr(args, flag, None), f"--{flag}")
    if args.command == "search":
        from amc.search import load_run_config, search

        overrides = args.overrides + ([f"search.episodes={args.episodes}"] if args.episodes else [])
        if args.resume:
            if args.config:
                raise UserError("give either CONFIG or --resume RUN_DIR, not both", field="amc search")
            require_run_dir(args.resume, "amc search --resume")
            cfg = load_run_config(args.resume, overrides)
            run_dir = args.resume
        else:
            if not args.config:
                raise UserError("needs a CONFIG file or --resume RUN_DIR", field="amc search")
            cfg = load_config(args.config, overrides)
            run_dir = args.run_dir or run_dir_for(cfg)
        with _resume_hint(run_dir):
            best = search(cfg, run_dir, resume=bool(args.resume), progress=progress)
        print(json.dumps({"run_dir": str(run_dir), **{k: best[k] for k in ("episode", "reward", "error", "cost_ratio")}}))
        return
    if args.command == "export":
        from amc.pipeline import export_run

        require_run_dir(args.run_dir, "amc export")
        out, metrics = export_run(args.run_dir, args.policy, args.out, args.onnx, args.overrides)
        print(json.dumps({"checkpoint": str(out), **metrics}))
        return
    if args.command in ("finetune", "eval"):
        from amc.pipeline import evaluate, finetune

        cfg = load_config(args.config, args.overrides)
        if args.command == "eval":
            print(json.dumps(evaluate(args.checkpoint, cfg, args.split)))
        else:
            out, metrics = finetune(args.checkpoint, cfg, args.epochs, args.distill, args.out, progress)
            print(json.dumps({"checkpoint": str(out), **metrics}))
        return

    cfg = load_config(args.config, args.overrides)
    if args.command == "train":
        from amc.pipeline import train_base

        metrics = train_base(cfg, args.epochs, progress)
        print(f"test top-1 {100 * metrics['test_top1']:.2f}% after {metrics['epochs']} epochs "
              f"({metrics['seconds']:.0f} s) -> {cfg.model.checkpoint}")
    elif args.command == "info":
        from amc.pipeline import info

        print(info(cfg))
    elif args.command == "run":
        from amc.pipeline import run_all

        with _resume_hint(run_dir_for(cfg)):
            print(run_all(cfg, args.episodes, progress))
    elif args.command == "baseline":
        from amc.baselines import run_baseline

        out, metrics = run_baseline(cfg, args.method, args.out)
        print(json.dumps({"checkpoint": str(out), **metrics}))


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings print as ``amc: warning: <message>``, not Python's file:line and source excerpt."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"amc: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*distutils.*")
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = not (args.quiet or os.environ.get(NO_PROGRESS_ENV, "") not in ("", "0"))
    with _one_line_warnings():
        try:
            _dispatch(args, progress)
        except UserError as exc:
            print(f"amc: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            print(f"amc: {exc or 'interrupted'}", file=sys.stderr)
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
