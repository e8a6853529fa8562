"""loomctl: the command users type. Subcommands live in their own modules and register here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loom.cli import demo, validate, ztunnel_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loomctl",
        description="Operate the loom ambient mesh: validate configuration, inspect proxies, run the lab.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    validate.register(commands)
    demo.register(commands)
    ztunnel_config.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
