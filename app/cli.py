"""The ``d2c`` command: ``condense | train | evaluate | compare | sweep | demo | report | config``.

Each subcommand loads one config (``--config FILE`` plus ``key=value`` overrides),
validates it before doing any work, and hands it to a thin Ray stage in ``app/``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional

from d2c.config import DEFAULT_BOOTSTRAP_LEVEL, DEFAULT_BOOTSTRAP_ROUNDS, ConfigError, D2CConfig, dump_config, load_config
from d2c.storage import StorageError

#: subcommand → (module in app/, function name, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "condense": ("app.condense", "run_condense", "score, select and attach: write RUN/condensed"),
    "train": ("app.train", "run_train", "train DiT/SiT on a condensed set (or a full dataset) with Ray Train"),
    "evaluate": ("app.evaluate", "run_evaluate", "sample a checkpoint and compute FID/KID/precision/recall"),
    "compare": ("d2c.eval.compare", "run_compare", "FID(A) - FID(B) of two evaluations with a bootstrap interval"),
    "sweep": ("app.sweep", "run_sweep", "Ray Tune sweep of interval k against data budget"),
    "demo": ("app.demo", "run_demo", "the whole method end to end on Fashion-MNIST, offline on a CPU"),
    "report": ("d2c.report.page", "run_report", "write the HTML report for one or more run directories"),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config file (default: the embedded default)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. select.k=16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2c",
        description="Diffusion Dataset Condensation on Ray: condense a dataset, then train diffusion transformers fast on it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(list(COMMANDS) + ["config"]) + "}")
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "demo":
            p.add_argument("--quick", action="store_true", help="fewer steps and samples, same stages")
            p.add_argument("--out", default=None, help="output directory (default: runs/demo)")
        if name == "report":
            p.add_argument("runs", nargs="+", help="run directories to report on")
            p.add_argument("--out", default=None, help="HTML file to write")
            continue
        if name == "compare":
            p.add_argument("eval_a", help="EVAL directory of model A (written by d2c evaluate)")
            p.add_argument("eval_b", help="EVAL directory of model B, scored against the same reference")
            p.add_argument("--rounds", type=int, default=DEFAULT_BOOTSTRAP_ROUNDS, help="bootstrap rounds")
            p.add_argument("--level", type=float, default=DEFAULT_BOOTSTRAP_LEVEL, help="interval level")
            p.add_argument("--seed", type=int, default=0, help="seed of the rounds' draws")
            p.add_argument("--out", default=None, help="also write the comparison to this JSON file")
            continue
        _add_config_args(p)
    p = sub.add_parser("config", help="validate a config and print it with every default filled in")
    _add_config_args(p)
    return parser


def _resolve(command: str) -> Callable[..., int]:
    """The function behind ``command``, imported on demand (``d2c config`` starts neither torch nor Ray)."""
    module_name, func_name, _ = COMMANDS[command]
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "report":
            return int(_resolve("report")(args.runs, out=args.out) or 0)
        if args.command == "compare":
            return int(_resolve("compare")(args.eval_a, args.eval_b, rounds=args.rounds, level=args.level,
                                           seed=args.seed, out=args.out) or 0)
        if args.command == "demo" and args.config is None:
            from app.demo import DEFAULT_CONFIG

            args.config = str(DEFAULT_CONFIG)
        cfg: D2CConfig = load_config(args.config, args.overrides)
        if args.command == "config":
            sys.stdout.write(dump_config(cfg))
            return 0
        func = _resolve(args.command)
        if args.command == "demo":
            return int(func(cfg, quick=args.quick, out=args.out, config_path=args.config, overrides=args.overrides) or 0)
        return int(func(cfg) or 0)
    except (ConfigError, StorageError) as err:
        print(f"d2c {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nd2c {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
