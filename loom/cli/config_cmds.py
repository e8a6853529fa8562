"""`loomctl apply -f`, `loomctl delete -f`, `loomctl label`: kubectl's configuration commands, on the lab.

They act on the lab's object store (`loom.lab.store`, the lab's API server) at `--lab-dir`/config,
`--lab-dir` defaulting to $LOOM_LAB_DIR or /var/run/loom-lab. The lab directory must exist (the lab is
up, or was brought up with that directory): a typo in --lab-dir must not silently start a second store
that no controller reads.

Output is kubectl's: one line per object on stdout (`deployment.apps/reviews-v1 created`,
`namespace/default labeled`), and on stderr one `Error: ...` or `Warning: ...` line per problem,
naming file, document, kind, namespace/name and field. Invalid objects are refused while the valid
ones of the same files are stored; the exit status is 1 when anything was refused or not found.

`label` follows kubectl: `key=value` sets, `key-` removes, a label that already has a different value
is only changed with --overwrite, and only the named object changes (labelling a Deployment does not
relabel its pods). A Namespace that does not exist is created (printed as `namespace/NAME created`),
since labelling a namespace is how a user enrols it in the mesh.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loom.lab.store import (
    LAB_DIR_ENV,
    ApplyReport,
    LabelConflict,
    LabStore,
    NotFound,
    StoredKey,
    StoreError,
    default_lab_dir,
    lab_store,
)
from loom.resources.parse_common import quote

# kubectl's names and short names for the kinds `label` accepts.
KIND_ALIASES: dict[str, str] = {
    **dict.fromkeys(("namespace", "namespaces", "ns"), "Namespace"),
    **dict.fromkeys(("pod", "pods", "po"), "Pod"),
    **dict.fromkeys(("service", "services", "svc"), "Service"),
    **dict.fromkeys(("deployment", "deployments", "deploy", "deployment.apps"), "Deployment"),
    **dict.fromkeys(("serviceaccount", "serviceaccounts", "sa"), "ServiceAccount"),
}
_KIND_CHOICES = "namespace|ns, pod|po, service|svc, deployment|deploy, serviceaccount|sa"
DEFAULT_NAMESPACE = "default"
STDIN = "-"


def register(commands: Any) -> None:
    apply = commands.add_parser(
        "apply",
        help="create or update lab objects from YAML files (kubectl apply -f)",
        description="Create or update objects in the lab from files, directories (recursively) or stdin (-).",
    )
    _add_filenames(apply, "apply")
    _add_lab_dir(apply)
    apply.set_defaults(run=run_apply)

    delete = commands.add_parser(
        "delete",
        help="delete the lab objects named in YAML files (kubectl delete -f)",
        description="Delete the objects the files name; deleting a Namespace deletes everything in it.",
    )
    _add_filenames(delete, "delete")
    delete.add_argument(
        "--ignore-not-found", action="store_true", help="an object that does not exist is not an error"
    )
    _add_lab_dir(delete)
    delete.set_defaults(run=run_delete)

    label = commands.add_parser(
        "label",
        help="set or remove labels of a lab object (kubectl label)",
        usage="%(prog)s KIND NAME|KIND/NAME key=value|key- ... [-n NAMESPACE] [--overwrite] [--lab-dir DIR]",
        description=(
            f"Set (key=value) or remove (key-) labels. KIND is one of {_KIND_CHOICES}; "
            "KIND/NAME is accepted too. A missing Namespace is created."
        ),
    )
    label.add_argument(
        "words", nargs="+", metavar="ARG", help="KIND NAME, or KIND/NAME, then the label updates"
    )
    label.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE, help="namespace of the object")
    label.add_argument(
        "--overwrite", action="store_true", help="replace labels that already have a different value"
    )
    _add_lab_dir(label)
    label.set_defaults(run=run_label)


def _add_filenames(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE|DIR|-",
        help=f"what to {verb}; repeatable; - reads YAML from stdin",
    )


def _add_lab_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lab-dir",
        type=Path,
        default=None,
        help=f"the lab's state directory (default ${LAB_DIR_ENV} or {default_lab_dir({})})",
    )


def _open_store(args: argparse.Namespace) -> LabStore | None:
    lab_dir: Path = args.lab_dir if args.lab_dir is not None else default_lab_dir()
    if not lab_dir.is_dir():
        print(
            f"Error: there is no lab at {lab_dir}: bring one up with `loomctl lab up`, "
            f"or point --lab-dir (or ${LAB_DIR_ENV}) at its directory",
            file=sys.stderr,
        )
        return None
    return lab_store(lab_dir)


def _print_report(report: ApplyReport) -> int:
    for line in report.lines:
        print(line)
    for warning in report.warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    for error in report.errors:
        print(f"Error: {error}", file=sys.stderr)
    return 0 if report.ok else 1


def _each_source(
    store: LabStore, filenames: Sequence[str], delete: bool, ignore_not_found: bool
) -> ApplyReport:
    report = ApplyReport((), ())
    for name in filenames:
        if name == STDIN:
            text = sys.stdin.read()
            if delete:
                report += store.delete_text(text, "<stdin>", ignore_not_found=ignore_not_found)
            else:
                report += store.apply_text(text, "<stdin>")
        elif delete:
            report += store.delete_paths([Path(name)], ignore_not_found=ignore_not_found)
        else:
            report += store.apply_paths([Path(name)])
    return report


def _sync_lab(args: argparse.Namespace) -> int:
    """Let the lab act on the change now (pods of new Deployments, Service VIPs, deleted pods), as the
    Kubernetes controllers and kubelets would; the mesh itself follows the store by watching it."""
    from loom.lab.cluster import Cluster, LabError

    lab_dir: Path = args.lab_dir if args.lab_dir is not None else default_lab_dir()
    try:
        Cluster(lab_dir).sync(lambda line: None)
    except (LabError, OSError) as exc:
        print(f"Error: the lab could not apply the change: {exc}", file=sys.stderr)
        return 1
    return 0


def run_apply(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if store is None:
        return 1
    code = _print_report(_each_source(store, args.filename, delete=False, ignore_not_found=False))
    return _sync_lab(args) or code


def run_delete(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if store is None:
        return 1
    code = _print_report(
        _each_source(store, args.filename, delete=True, ignore_not_found=args.ignore_not_found)
    )
    return _sync_lab(args) or code


class UsageError(ValueError):
    """The command line of `label` cannot be understood; the message says why."""


def parse_label_target(words: Sequence[str], namespace: str) -> tuple[StoredKey, list[str]]:
    """(the object, the label updates) from `KIND NAME update...` or `KIND/NAME update...`."""
    first = words[0]
    if "/" in first:
        kind_word, _, name = first.partition("/")
        rest = list(words[1:])
    else:
        if len(words) < 2:
            raise UsageError(f"missing the NAME of the {first} to label")
        kind_word, name, rest = first, words[1], list(words[2:])
    kind = KIND_ALIASES.get(kind_word.lower())
    if kind is None:
        raise UsageError(f"cannot label {quote(kind_word)}: KIND must be one of {_KIND_CHOICES}")
    if not name:
        raise UsageError(f"missing the NAME of the {kind_word} to label")
    if not rest:
        raise UsageError("at least one label update is required (key=value or key-)")
    return StoredKey(kind, "" if kind == "Namespace" else namespace, name), rest


def parse_label_changes(updates: Sequence[str]) -> dict[str, str | None]:
    """kubectl's label updates: `key=value` sets (value may be empty), `key-` removes."""
    changes: dict[str, str | None] = {}
    for update in updates:
        value: str | None
        if "=" in update:
            key, _, value = update.partition("=")
        elif update.endswith("-"):
            key, value = update[:-1], None
        else:
            raise UsageError(f"invalid label update {quote(update)}: expected key=value or key-")
        if not key:
            raise UsageError(f"invalid label update {quote(update)}: the key is empty")
        if key in changes:
            raise UsageError(f"label {quote(key)} is changed more than once")
        changes[key] = value
    return changes


def run_label(args: argparse.Namespace) -> int:
    try:
        key, updates = parse_label_target(args.words, args.namespace)
        changes = parse_label_changes(updates)
    except UsageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    store = _open_store(args)
    if store is None:
        return 1
    try:
        outcome = store.change_labels(key, changes, overwrite=args.overwrite, create_namespace=True)
    except LabelConflict as exc:
        print(
            f"Error: {exc.key}: label {quote(exc.label)} already has a value ({exc.current}), "
            "and --overwrite is false",
            file=sys.stderr,
        )
        return 1
    except NotFound as exc:
        print(f"Error: {exc.key} not found", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if outcome.created:
        print(f"{key.ref} created")
    for missing in outcome.missing:
        print(f"Warning: {key}: label {quote(missing)} not found", file=sys.stderr)
    print(f"{key.ref} {'labeled' if outcome.changed else 'not labeled'}")
    return _sync_lab(args) if outcome.changed else 0
