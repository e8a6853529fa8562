"""loomctl: the command users type. Subcommands live in their own modules and register here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loom.cli import config_cmds, demo, lab, validate, waypoint, ztunnel_config


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
    lab.register(commands)
    config_cmds.register(commands)
    waypoint.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" belongs to the command being run (`lab exec ... -- CMD`), as with
    # kubectl: split it off before argparse, which would otherwise mix it with loomctl's options.
    passthrough: list[str] = []
    if "--" in words:
        at = words.index("--")
        words, passthrough = words[:at], words[at + 1 :]
    args = parser.parse_args(words)
    args.passthrough = passthrough
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
