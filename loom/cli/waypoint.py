"""`loomctl waypoint generate|apply|list|status|delete`: istioctl's waypoint commands, on the lab.

    loomctl waypoint generate [-n NS] [--name N] [--service-account SA] [--for T] [-r REV]
    loomctl waypoint apply    [-n NS] [--name N] [--service-account SA] [--for T] [-r REV]
                              [--enroll-namespace] [--overwrite] [-w] [--waypoint-timeout 90s]
    loomctl waypoint list     [-n NS | -A]
    loomctl waypoint status   [-n NS | -A] [NAME ...] [-w] [--waypoint-timeout 90s]
    loomctl waypoint delete   NAME ... | --all  [-n NS]

A waypoint is a Gateway of class istio-waypoint (waypoint/gateway.py builds it); the commands act on
the lab's object store like `loomctl apply` (same --lab-dir rules, and the same lab sync afterwards),
and print what istioctl prints (reference: istio-ambient-facts §5.2, ecosystem-and-libraries §1.3):

* `apply` writes the Gateway with kubectl's three-way merge, so the status the controller wrote is
  kept. `--service-account SA` makes it the waypoint of that service account (loom's per-SA model:
  it serves the SA's pods without any use-waypoint label). `--enroll-namespace` then labels the
  namespace istio.io/use-waypoint=NAME (refused when the namespace already names another waypoint,
  unless --overwrite; refused with --service-account, which would route every Service of the namespace
  through one account's waypoint) and warns when the namespace is not in ambient mode. Conflicts are
  checked before anything is written. `--wait` waits for Programmed=True.
* `list` shows NAME REVISION TRAFFIC TYPE PROGRAMMED (NAMESPACE first with -A), plus loom's SERVICE
  ACCOUNT column for per-SA waypoints. TRAFFIC TYPE is the effective one: "service" for an unlabelled
  waypoint, "all" for an unlabelled per-SA waypoint (what the controller binds; istioctl prints "none"
  there, which would be misleading).
* `status` shows one row per condition the controller reports (Accepted, Programmed) with reason and
  message; a condition not reported yet shows as Unknown/Pending. Every waypoint that is not ready is
  named on its own line, and the exit status is 1 when any is not ready.
* `delete` removes only Gateways of class istio-waypoint, and warns when the namespace still names the
  deleted waypoint (loom then fails traffic closed rather than bypassing the waypoint).

Exit status: 0 on success, 1 when anything failed or (status, --wait) is not ready.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from loom.cli.config_cmds import _add_lab_dir, _open_store, _sync_lab
from loom.cli.table import render_table
from loom.lab.store import LabStore, StoredKey, StoreError
from loom.resources.model import LABEL_DATAPLANE_MODE, LABEL_USE_WAYPOINT
from loom.resources.parse_gateway import parse_duration
from waypoint.gateway import (
    CONDITION_PROGRAMMED,
    DEFAULT_WAYPOINT_NAME,
    REPORTED_CONDITIONS,
    WAYPOINT_FOR_VALUES,
    WaypointSpecError,
    WaypointState,
    is_waypoint_manifest,
    waypoint_gateway,
    waypoint_state,
)

DEFAULT_NAMESPACE = "default"
DEFAULT_WAIT_TIMEOUT = 90.0  # istioctl's --waypoint-timeout default
POLL_INTERVAL = 0.2
NO_WAYPOINTS = "No waypoints found."
PENDING_REASON = "Pending"
PENDING_MESSAGE = "the controller has not reported on this waypoint yet"


def register(commands: Any) -> None:
    waypoint = commands.add_parser(
        "waypoint",
        help="create, list, inspect and delete waypoints (istioctl waypoint)",
        description="Manage waypoint proxies: Gateways of class istio-waypoint in the lab.",
    )
    sub = waypoint.add_subparsers(dest="waypoint_command", metavar="COMMAND")
    sub.required = True

    generate = sub.add_parser("generate", help="print the waypoint Gateway YAML")
    _add_spec_options(generate)
    generate.set_defaults(run=run_generate)

    apply = sub.add_parser("apply", help="create or update a waypoint in the lab")
    _add_spec_options(apply)
    apply.add_argument(
        "--enroll-namespace",
        action="store_true",
        help="label the namespace istio.io/use-waypoint=NAME so its Services use this waypoint",
    )
    apply.add_argument(
        "--overwrite",
        action="store_true",
        help="with --enroll-namespace: replace the waypoint the namespace already uses",
    )
    _add_wait_options(apply)
    _add_lab_dir(apply)
    apply.set_defaults(run=run_apply)

    list_ = sub.add_parser("list", help="list the waypoints of a namespace (or all, -A)")
    list_.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE, help="namespace (default: default)")
    list_.add_argument("-A", "--all-namespaces", action="store_true", help="waypoints of every namespace")
    _add_lab_dir(list_)
    list_.set_defaults(run=run_list)

    status = sub.add_parser("status", help="the conditions of waypoints, and which are not ready")
    status.add_argument("names", nargs="*", metavar="NAME", help="only these waypoints (needs -n)")
    status.add_argument("-n", "--namespace", default=None, help="namespace (default: every namespace)")
    status.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace (the default)")
    _add_wait_options(status)
    _add_lab_dir(status)
    status.set_defaults(run=run_status)

    delete = sub.add_parser("delete", help="delete waypoints by name, or all of a namespace")
    delete.add_argument("names", nargs="*", metavar="NAME", help="waypoints to delete")
    delete.add_argument("--all", action="store_true", help="delete every waypoint of the namespace")
    delete.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE, help="namespace (default: default)")
    _add_lab_dir(delete)
    delete.set_defaults(run=run_delete)


def _add_spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE, help="namespace (default: default)")
    parser.add_argument(
        "--name", default=DEFAULT_WAYPOINT_NAME, help=f"waypoint name (default: {DEFAULT_WAYPOINT_NAME})"
    )
    parser.add_argument(
        "--service-account",
        default=None,
        metavar="SA",
        help="make this the waypoint of one service account: it serves that account's pods",
    )
    parser.add_argument(
        "--for",
        dest="for_",
        default=None,
        choices=WAYPOINT_FOR_VALUES,
        help="traffic the waypoint takes (default: service; both for a per-service-account waypoint)",
    )
    parser.add_argument("-r", "--revision", default=None, help="the revision label istio.io/rev")


def _add_wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-w", "--wait", action="store_true", help="wait until the waypoint is Programmed")
    parser.add_argument(
        "--waypoint-timeout",
        type=_timeout,
        default=DEFAULT_WAIT_TIMEOUT,
        metavar="DURATION",
        help="how long --wait waits, e.g. 90s, 2m, 500ms or seconds (default: 90s)",
    )


def _timeout(text: str) -> float:
    seconds: float | None
    try:
        seconds = float(text)
    except ValueError:
        seconds = parse_duration(text)
    if seconds is None or not 0 <= seconds <= 24 * 3600:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected e.g. 90s, 2m, 500ms or a number of seconds, at most 24h"
        )
    return seconds


def _error(message: str) -> int:
    print(f"Error: {message}", file=sys.stderr)
    return 1


def _manifest(args: argparse.Namespace) -> dict[str, Any]:
    return waypoint_gateway(
        args.namespace,
        args.name,
        service_account=args.service_account,
        for_=args.for_,
        revision=args.revision,
    )


def run_generate(args: argparse.Namespace) -> int:
    try:
        manifest = _manifest(args)
    except WaypointSpecError as exc:
        return _error(str(exc))
    sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False))
    return 0


# ---------------------------------------------------------------------------------------------------
# apply


def _namespace_labels(store: LabStore, namespace: str) -> dict[str, str] | None:
    """The labels of a stored Namespace, None when it does not exist."""
    manifest = store.get(StoredKey("Namespace", "", namespace))
    if manifest is None:
        return None
    meta = manifest.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def _enrollment_conflict(args: argparse.Namespace, labels: dict[str, str] | None) -> str | None:
    """Why --enroll-namespace must not go ahead, or None."""
    if args.service_account is not None:
        return (
            "--enroll-namespace with --service-account would send every Service of namespace "
            f"{args.namespace} through the waypoint of service account {args.service_account!r}; a "
            "per-service-account waypoint already serves that account's pods without a namespace label"
        )
    current = (labels or {}).get(LABEL_USE_WAYPOINT)
    if current is not None and current != args.name and not args.overwrite:
        return (
            f"namespace {args.namespace} already uses waypoint {current!r} ({LABEL_USE_WAYPOINT}={current}); "
            "it was not relabelled and nothing was applied: use --overwrite to replace it"
        )
    return None


def run_apply(args: argparse.Namespace) -> int:
    try:
        manifest = _manifest(args)
    except WaypointSpecError as exc:
        return _error(str(exc))
    store = _open_store(args)
    if store is None:
        return 1
    ref = f"{args.namespace}/{args.name}"
    try:
        labels = _namespace_labels(store, args.namespace)
    except StoreError as exc:
        return _error(str(exc))
    if args.enroll_namespace:
        conflict = _enrollment_conflict(args, labels)
        if conflict is not None:
            return _error(conflict)
    report = store.apply_text(yaml.safe_dump(manifest, sort_keys=False), f"loomctl waypoint apply {ref}")
    for warning in report.warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    if not report.ok:
        for error in report.errors:
            print(f"Error: {error}", file=sys.stderr)
        return 1
    print(f"✅ waypoint {ref} applied")
    code = _sync_lab(args)
    if args.wait:
        states = _wait_until_programmed(store, [(args.namespace, args.name)], args.waypoint_timeout)
        state = states.get((args.namespace, args.name))
        if state is None or not state.programmed:
            return _error(
                f"waypoint {ref} is not ready after {args.waypoint_timeout:g}s: {_not_ready_reason(state)}"
            )
        print(f"✅ waypoint {ref} is ready!")
    if args.enroll_namespace:
        code = _enroll(store, args, labels) or code
    return code


def _enroll(store: LabStore, args: argparse.Namespace, labels: dict[str, str] | None) -> int:
    key = StoredKey("Namespace", "", args.namespace)
    try:
        outcome = store.change_labels(
            key, {LABEL_USE_WAYPOINT: args.name}, overwrite=True, create_namespace=True
        )
    except StoreError as exc:
        return _error(str(exc))
    print(f'✅ namespace {args.namespace} labeled with "{LABEL_USE_WAYPOINT}: {args.name}"')
    if (labels or {}).get(LABEL_DATAPLANE_MODE) != "ambient":
        print(
            "⚠️ Warning: namespace is not enrolled in ambient. Consider running "
            f'"loomctl label namespace {args.namespace} {LABEL_DATAPLANE_MODE}=ambient"',
            file=sys.stderr,
        )
    return _sync_lab(args) if outcome.changed or outcome.created else 0


# ---------------------------------------------------------------------------------------------------
# reading waypoints


def _waypoints(store: LabStore, namespace: str | None) -> list[WaypointState]:
    """The stored waypoints of one namespace (None: all), ordered by namespace and name."""
    return [
        waypoint_state(manifest)
        for manifest in store.list(kind="Gateway", namespace=namespace)
        if is_waypoint_manifest(manifest)
    ]


def _not_ready_reason(state: WaypointState | None) -> str:
    if state is None:
        return "it does not exist"
    programmed = state.condition(CONDITION_PROGRAMMED)
    if programmed is None:
        return f"{CONDITION_PROGRAMMED} not reported yet ({PENDING_MESSAGE})"
    detail = ": ".join(part for part in (programmed.reason, programmed.message) if part)
    return f"{CONDITION_PROGRAMMED}={programmed.status}" + (f" ({detail})" if detail else "")


def _wait_until_programmed(
    store: LabStore,
    refs: Sequence[tuple[str, str]],
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[tuple[str, str], WaypointState]:
    """Poll the store until every named waypoint is Programmed or `timeout` seconds passed; returns
    the last states read (a waypoint that does not exist is absent)."""
    deadline = time.monotonic() + timeout
    while True:
        states: dict[tuple[str, str], WaypointState] = {}
        for namespace, name in refs:
            manifest = store.get(StoredKey("Gateway", namespace, name))
            if manifest is not None and is_waypoint_manifest(manifest):
                states[(namespace, name)] = waypoint_state(manifest)
        if all(ref in states and states[ref].programmed for ref in refs):
            return states
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return states
        sleep(min(POLL_INTERVAL, remaining))


def run_list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if store is None:
        return 1
    try:
        waypoints = _waypoints(store, None if args.all_namespaces else args.namespace)
    except StoreError as exc:
        return _error(str(exc))
    if not waypoints:
        print(NO_WAYPOINTS)
        return 0
    headers = ["NAME", "REVISION", "TRAFFIC TYPE", "PROGRAMMED", "SERVICE ACCOUNT"]
    rows = [
        [w.name, w.revision, w.traffic_type, "True" if w.programmed else "False", w.service_account or "-"]
        for w in waypoints
    ]
    if args.all_namespaces:
        headers.insert(0, "NAMESPACE")
        rows = [[w.namespace, *row] for w, row in zip(waypoints, rows, strict=True)]
    print(render_table(headers, rows))
    return 0


def run_status(args: argparse.Namespace) -> int:
    if args.names and (args.namespace is None or args.all_namespaces):
        return _error("naming waypoints needs their namespace: add -n NAMESPACE (and no -A)")
    store = _open_store(args)
    if store is None:
        return 1
    namespace = None if args.all_namespaces else args.namespace
    try:
        if args.wait:
            refs = [(namespace or "", name) for name in args.names] or [
                (w.namespace, w.name) for w in _waypoints(store, namespace)
            ]
            _wait_until_programmed(store, refs, args.waypoint_timeout)
        waypoints = _waypoints(store, namespace)
    except StoreError as exc:
        return _error(str(exc))
    code = 0
    if args.names:
        found = {w.name for w in waypoints}
        for name in args.names:
            if name not in found:
                print(f"Error: waypoint {namespace}/{name} not found", file=sys.stderr)
                code = 1
        waypoints = [w for w in waypoints if w.name in args.names]
    if not waypoints:
        if code == 0:
            print(NO_WAYPOINTS)
        return code
    with_namespace = namespace is None
    headers = ["NAME", "STATUS", "TYPE", "REASON", "MESSAGE"]
    if with_namespace:
        headers.insert(0, "NAMESPACE")
    rows: list[list[str]] = []
    for state in waypoints:
        for kind in REPORTED_CONDITIONS:
            condition = state.condition(kind)
            cells = (
                [state.name, condition.status, kind, condition.reason or "-", condition.message or "-"]
                if condition is not None
                else [state.name, "Unknown", kind, PENDING_REASON, PENDING_MESSAGE]
            )
            rows.append([state.namespace, *cells] if with_namespace else cells)
    print(render_table(headers, rows))
    not_ready = [state for state in waypoints if not state.programmed]
    if not_ready:
        print()
        for state in not_ready:
            print(f"waypoint {state.namespace}/{state.name} is not ready: {_not_ready_reason(state)}")
        code = 1
    return code


# ---------------------------------------------------------------------------------------------------
# delete


def run_delete(args: argparse.Namespace) -> int:
    if args.all == bool(args.names):
        return _error("give the NAMEs of the waypoints to delete, or --all (not both)")
    store = _open_store(args)
    if store is None:
        return 1
    namespace: str = args.namespace
    code = 0
    deleted: list[str] = []
    try:
        names = [w.name for w in _waypoints(store, namespace)] if args.all else list(args.names)
    except StoreError as exc:
        return _error(str(exc))
    if args.all and not names:
        print(NO_WAYPOINTS)
        return 0
    for name in names:
        key = StoredKey("Gateway", namespace, name)
        try:
            manifest = store.get(key)
            if manifest is None:
                print(f"waypoint {namespace}/{name} not found", file=sys.stderr)
                code = 1
                continue
            if not is_waypoint_manifest(manifest):
                spec = manifest.get("spec")
                gateway_class = spec.get("gatewayClassName") if isinstance(spec, dict) else None
                code = _error(
                    f"gateway {namespace}/{name} is not a waypoint (gatewayClassName {gateway_class!r}); "
                    "not deleted"
                )
                continue
            store.remove(key)
        except StoreError as exc:
            code = _error(f"waypoint {namespace}/{name}: {exc}")
            continue
        print(f"waypoint {namespace}/{name} deleted")
        deleted.append(name)
    if deleted:
        _warn_still_used(store, namespace, deleted)
        code = _sync_lab(args) or code
    return code


def _warn_still_used(store: LabStore, namespace: str, deleted: Sequence[str]) -> None:
    try:
        labels = _namespace_labels(store, namespace) or {}
    except StoreError:
        return  # only a courtesy warning: the deletion itself succeeded
    used = labels.get(LABEL_USE_WAYPOINT)
    if used in deleted:
        print(
            f"Warning: namespace {namespace} still has {LABEL_USE_WAYPOINT}={used}: traffic bound to it "
            "fails until a waypoint of that name exists again; remove the label with "
            f'"loomctl label namespace {namespace} {LABEL_USE_WAYPOINT}-"',
            file=sys.stderr,
        )
