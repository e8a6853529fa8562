"""`loomctl validate -f FILE|DIR`: everything loom would reject or treat differently than written.

Loads the files exactly as the controller's directory source does, translates them as the controller
would, and prints every error (object rejected) and warning (object used, but not as the user may
expect: e.g. an L7 rule loom enforces fail-closed at L4). Exit status 1 when there is any error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from controller.translate import MeshConfig, translate
from loom.resources.diagnostics import Diagnostic
from loom.resources.loader import load_paths


def register(commands: Any) -> None:
    p = commands.add_parser(
        "validate",
        help="check Kubernetes/Istio YAML the way the controller reads it",
        description="Check configuration files; exit 1 if any object would be rejected.",
    )
    p.add_argument("-f", "--filename", action="append", required=True, type=Path, metavar="FILE|DIR")
    defaults = MeshConfig()
    p.add_argument("--trust-domain", default=defaults.trust_domain)
    p.add_argument("--root-namespace", default=defaults.root_namespace)
    p.set_defaults(run=run)


def validate(paths: list[Path], mesh: MeshConfig) -> list[Diagnostic]:
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(", ".join(str(p) for p in missing))
    # Name files relative to what the user pointed at: `-f config/` reports `policy.yaml doc 2 ...`.
    dirs = [p.resolve() if p.is_dir() else p.resolve().parent for p in paths]
    root = Path(os.path.commonpath(dirs))
    loaded = load_paths(paths, root=root)
    translated = translate(loaded.snapshot, mesh)
    return [*loaded.diagnostics, *translated.diagnostics]


def report(diagnostics: list[Diagnostic], out: TextIO) -> int:
    errors = [d for d in diagnostics if d.is_error]
    warnings = [d for d in diagnostics if not d.is_error]
    for d in errors:
        print(f"Error: {d}", file=out)
    for d in warnings:
        print(f"Warning: {d}", file=out)
    if not diagnostics:
        print("✔ No validation issues found.", file=out)
    else:
        print(f"{len(errors)} error(s), {len(warnings)} warning(s)", file=out)
    return 1 if errors else 0


def run(args: argparse.Namespace) -> int:
    mesh = MeshConfig(trust_domain=args.trust_domain, root_namespace=args.root_namespace)
    try:
        diagnostics = validate(args.filename, mesh)
    except FileNotFoundError as exc:
        print(f"Error: no such file or directory: {exc}", file=sys.stderr)
        return 2
    return report(diagnostics, sys.stdout)
