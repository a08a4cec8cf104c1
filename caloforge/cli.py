"""The one CLI: ``caloforge <command> ...``.

Each component owns its subcommands in a small ``cli`` module exposing ``register(subparsers)``; heavy
imports (torch, ray, mlflow) happen inside the handlers, so ``caloforge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from caloforge.environment import apply_default_env

# Modules registering subcommands, in the order shown by --help.
COMMAND_MODULES = (
    "caloforge.datasets.cli",
    "caloforge.training.cli",
    "caloforge.pretrain.cli",
    "caloforge.adapt.cli",
    "caloforge.distill.cli",
    "caloforge.evaluation.cli",
    "caloforge.registry.cli",
    "caloforge.adapt.service.cli",
    "caloforge.quickstart",
)


def setup_logging(verbose: bool = False) -> None:
    """Our own loggers at INFO (DEBUG with -v); third-party libraries only from WARNING up, unless -v."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("caloforge").setLevel(logging.DEBUG if verbose else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caloforge",
        description="CaloForge: pretrain, adapt, evaluate and serve calorimeter-shower generative models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:  # components register themselves as they land
            importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    apply_default_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # user mistakes carry a message naming file/key/value
        logging.getLogger("caloforge").debug("error", exc_info=True)
        print(f"caloforge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
