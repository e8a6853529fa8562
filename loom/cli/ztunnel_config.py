"""`loomctl ztunnel-config` (alias `zc`): what a node proxy knows, in istioctl's tables.

    loomctl ztunnel-config workloads|services|policies|certificates|connections|all
        [-o short|json|yaml] [-f dump.json | --admin-address HOST:PORT | --node NODE] [filters]
    loomctl ztunnel-config log [--level [scope:]level,...] [-r]

The data is the node proxy's ``GET /config_dump`` (ztunnel/admin.py), read from a live admin endpoint
(default 127.0.0.1:15000, the ztunnel's localhost-only port) or from a saved file. Dumps written by an
Istio ztunnel work too: the reader accepts the older keyed-map form of the sections, and without loom's
flat ``connections`` section it reads the connections from ``workloadState``.

`short` output prints istioctl's columns (a Go-tabwriter-style table, single-space padding); `json`
and `yaml` print the section (filtered) or, for `all`, the whole dump. ``--node`` asks a resolver for
the node's admin address; the default resolver asks the running lab (entering the node's network
namespace, where the admin port listens on loopback) or reads the node file named by ``LOOM_LAB_NODES``
(a JSON object ``{"node": "host:port"}``); `register` takes another resolver.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from loom.cli.table import render_table

DEFAULT_ADMIN_ADDRESS = "127.0.0.1:15000"
LAB_NODES_ENV = "LOOM_LAB_NODES"
# A dump of 10k workloads is a few MB on loopback; 10 s leaves room for a busy proxy.
FETCH_TIMEOUT = 10.0

# Subcommand -> aliases (istioctl's).
SUBCOMMANDS: dict[str, tuple[str, ...]] = {
    "workloads": ("workload", "w"),
    "services": ("service", "s", "svc"),
    "policies": ("policy", "p", "pol"),
    "certificates": ("certificate", "certs", "cert"),
    "connections": ("cons",),
    "all": (),
}

WORKLOAD_HEADERS = ("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL")
SERVICE_HEADERS = ("NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS")
POLICY_HEADERS = ("NAMESPACE", "POLICY NAME", "ACTION", "SCOPE")
CERTIFICATE_HEADERS = (
    "CERTIFICATE NAME",
    "TYPE",
    "STATUS",
    "VALID CERT",
    "SERIAL NUMBER",
    "NOT AFTER",
    "NOT BEFORE",
)
CONNECTION_HEADERS = ("WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL")

Dump = Mapping[str, Any]


class ZtunnelConfigError(Exception):
    """A problem the user can fix (unreachable endpoint, bad file, unknown node); printed as is."""


# ---------------------------------------------------------------------------------------------------
# where the dump comes from

NodeResolver = Callable[[str, Mapping[str, str]], str]


def lab_node_resolver(node: str, env: Mapping[str, str]) -> str:
    """The admin address of `node`: from the node file named by $LOOM_LAB_NODES when set
    (``{"node": "host:port"}``), otherwise from the running lab (loomctl lab up).

    A lab node's ztunnel serves its admin port on the node's own loopback, as in a Kubernetes node's
    ztunnel pod, and the root namespace has no route into the lab; so this short-lived command moves
    its main thread into the node's network namespace and talks to 127.0.0.1 there."""
    path = env.get(LAB_NODES_ENV, "")
    if not path:
        from loom.lab.cluster import Cluster, LabError, lab_dir_from_env

        try:
            return Cluster(lab_dir_from_env(env)).enter_node_netns(node)
        except LabError as e:
            raise ZtunnelConfigError(f"--node: {e} (or use --admin-address)") from e
    try:
        nodes = json.loads(Path(path).read_text())
    except OSError as e:
        raise ZtunnelConfigError(
            f"--node: cannot read the lab node file {path} ({LAB_NODES_ENV}): {e.strerror or e}"
        ) from e
    except ValueError as e:
        raise ZtunnelConfigError(f"--node: the lab node file {path} is not valid JSON: {e}") from e
    if not isinstance(nodes, dict) or not all(isinstance(v, str) for v in nodes.values()):
        raise ZtunnelConfigError(
            f'--node: the lab node file {path} must be a JSON object {{"node": "host:port"}}'
        )
    address = nodes.get(node)
    if address is None:
        known = ", ".join(sorted(nodes)) or "(none)"
        raise ZtunnelConfigError(f"--node: node {node!r} is not in the lab (known nodes: {known})")
    return str(address)


def _admin_url(address: str, path: str) -> str:
    return f"http://{address}{path}"


def _http(address: str, path: str, method: str = "GET", timeout: float = FETCH_TIMEOUT) -> str:
    request = urllib.request.Request(_admin_url(address, path), method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace").strip()
        raise ZtunnelConfigError(
            f"the ztunnel admin endpoint at {address} answered {e.code} for {path}: {detail or e.reason}"
        ) from e
    except urllib.error.URLError as e:
        reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else e.reason
        raise ZtunnelConfigError(
            f"cannot reach the ztunnel admin endpoint at {address}: {reason} "
            "(is the ztunnel running there? use --admin-address, --node or -f)"
        ) from e
    except (TimeoutError, OSError) as e:
        raise ZtunnelConfigError(f"cannot reach the ztunnel admin endpoint at {address}: {e}") from e
    return body.decode("utf-8", "replace")


def fetch_dump(address: str, timeout: float = FETCH_TIMEOUT) -> dict[str, Any]:
    text = _http(address, "/config_dump", timeout=timeout)
    return _parse_dump(text, f"the config_dump of {address}")


def load_dump_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ZtunnelConfigError(f"cannot read {path}: {e.strerror or e}") from e
    return _parse_dump(text, str(path))


def _parse_dump(text: str, origin: str) -> dict[str, Any]:
    try:
        dump = json.loads(text)
    except ValueError as e:
        raise ZtunnelConfigError(f"{origin} is not valid JSON: {e}") from e
    if not isinstance(dump, dict):
        raise ZtunnelConfigError(
            f"{origin}: expected a JSON object with workloads, services, ..., got {type(dump).__name__}"
        )
    return dump


def _section(dump: Dump, key: str) -> list[dict[str, Any]]:
    """A list section; an Istio dump's older keyed-map form is read as its values."""
    value = dump.get(key)
    if value is None:
        return []
    items = list(value.values()) if isinstance(value, dict) else value
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ZtunnelConfigError(f"the dump's {key!r} section must be a list of objects")
    return items


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------------------------------
# rows (pure)


def _waypoint_name(waypoint: Any, services: Sequence[Mapping[str, Any]]) -> str:
    """istioctl's WAYPOINT cell: None without a waypoint, else the waypoint service's name (matched by
    VIP "network/ip", or by "namespace/hostname"), else NA."""
    if not isinstance(waypoint, dict):
        return "None"
    destination = waypoint.get("destination", "")
    for svc in services:
        if destination in (svc.get("vips") or []):
            return _text(svc.get("name"))
        if destination == f"{svc.get('namespace')}/{svc.get('hostname')}":
            return _text(svc.get("name"))
    return "NA"


def select_workloads(
    dump: Dump, namespace: str | None = None, node: str | None = None, address: str | None = None
) -> list[dict[str, Any]]:
    selected = [
        w
        for w in _section(dump, "workloads")
        if (namespace is None or w.get("namespace") == namespace)
        and (node is None or w.get("node") == node)
        and (address is None or address in (w.get("workloadIps") or []))
    ]
    return sorted(selected, key=lambda w: (_text(w.get("namespace")), _text(w.get("name"))))


def workload_rows(workloads: Sequence[Mapping[str, Any]], dump: Dump) -> list[list[str]]:
    services = _section(dump, "services")
    return [
        [
            _text(w.get("namespace")),
            _text(w.get("name")),
            ",".join(w.get("workloadIps") or []),
            _text(w.get("node")),
            _waypoint_name(w.get("waypoint"), services),
            _text(w.get("protocol")),
        ]
        for w in workloads
    ]


def select_services(dump: Dump, namespace: str | None = None) -> list[dict[str, Any]]:
    selected = [s for s in _section(dump, "services") if namespace is None or s.get("namespace") == namespace]
    return sorted(selected, key=lambda s: (_text(s.get("namespace")), _text(s.get("name"))))


def _vip_ip(vip: str) -> str:
    network, slash, ip = vip.partition("/")
    return ip if slash else network


def service_rows(services: Sequence[Mapping[str, Any]], dump: Dump) -> list[list[str]]:
    all_services = _section(dump, "services")
    status = {_text(w.get("uid")): w.get("status") for w in _section(dump, "workloads")}
    rows = []
    for svc in services:
        endpoints = svc.get("endpoints") or {}
        entries = list(endpoints.values()) if isinstance(endpoints, dict) else list(endpoints)
        healthy = sum(
            1
            for e in entries
            if isinstance(e, dict)
            and (e.get("status") or status.get(_text(e.get("workloadUid")))) == "Healthy"
        )
        rows.append(
            [
                _text(svc.get("namespace")),
                _text(svc.get("name")),
                ",".join(_vip_ip(v) for v in svc.get("vips") or []) or "None",
                _waypoint_name(svc.get("waypoint"), all_services),
                f"{healthy}/{len(entries)}",
            ]
        )
    return rows


def select_policies(dump: Dump, namespace: str | None = None) -> list[dict[str, Any]]:
    selected = [p for p in _section(dump, "policies") if namespace is None or p.get("namespace") == namespace]
    return sorted(selected, key=lambda p: (_text(p.get("namespace")), _text(p.get("name"))))


def policy_rows(policies: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [_text(p.get("namespace")), _text(p.get("name")), _text(p.get("action")), _text(p.get("scope"))]
        for p in policies
    ]


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _valid(cert: Mapping[str, Any], now: dt.datetime) -> str:
    start, end = _parse_time(cert.get("validFrom")), _parse_time(cert.get("expirationTime"))
    return "true" if start is not None and end is not None and start <= now < end else "false"


def certificate_rows(certificates: Sequence[Mapping[str, Any]], now: dt.datetime) -> list[list[str]]:
    """One row per certificate: Leaf (first of the chain), Intermediate (the rest), Root (trust
    bundle). An identity without a certificate yet gets one Leaf row with its state and NA."""
    rows = []
    for entry in certificates:
        identity, state = _text(entry.get("identity")), _text(entry.get("state"))
        chain = [c for c in entry.get("cert_chain") or [] if isinstance(c, dict)]
        roots = [c for c in entry.get("root_certs") or [] if isinstance(c, dict)]
        if not chain:
            rows.append([identity, "Leaf", state, "false", "NA", "NA", "NA"])
        typed = [("Leaf" if i == 0 else "Intermediate", c) for i, c in enumerate(chain)]
        typed += [("Root", c) for c in roots]
        for kind, cert in typed:
            rows.append(
                [
                    identity,
                    kind,
                    state,
                    _valid(cert, now),
                    _text(cert.get("serialNumber")) or "NA",
                    _text(cert.get("expirationTime")) or "NA",
                    _text(cert.get("validFrom")) or "NA",
                ]
            )
    return rows


def _connections_from_workload_state(dump: Dump) -> list[dict[str, Any]]:
    """An Istio dump's per-pod connections, flattened into loom's shape."""
    result = []
    states = dump.get("workloadState") or {}
    if not isinstance(states, dict):
        raise ZtunnelConfigError("the dump's 'workloadState' section must be an object")
    for state in states.values():
        if not isinstance(state, dict):
            continue
        info = state.get("info") or {}
        name = f"{info.get('name', '')}.{info.get('namespace', '')}"
        connections = state.get("connections") or {}
        for c in connections.get("inbound") or []:
            result.append(
                {
                    "workload": name,
                    "direction": "inbound",
                    "local": c.get("actualDst", ""),
                    "remote": c.get("src", ""),
                    "remoteTarget": c.get("originalDst", ""),
                    "protocol": c.get("protocol", ""),
                }
            )
        for c in connections.get("outbound") or []:
            result.append(
                {
                    "workload": name,
                    "direction": "outbound",
                    "local": c.get("src", ""),
                    "remote": c.get("actualDst", ""),
                    "remoteTarget": c.get("originalDst", ""),
                    "protocol": c.get("protocol", ""),
                }
            )
    return result


def select_connections(
    dump: Dump, direction: str | None = None, namespace: str | None = None
) -> list[dict[str, Any]]:
    connections = (
        _section(dump, "connections") if "connections" in dump else _connections_from_workload_state(dump)
    )
    return [
        c
        for c in connections
        if (direction is None or _text(c.get("direction")).lower() == direction)
        and (namespace is None or _text(c.get("workload")).rpartition(".")[2] == namespace)
    ]


def connection_rows(connections: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            _text(c.get("workload")),
            _text(c.get("direction")).capitalize(),
            _text(c.get("local")),
            _text(c.get("remote")),
            _text(c.get("remoteTarget")),
            _text(c.get("protocol")),
        ]
        for c in connections
    ]


# ---------------------------------------------------------------------------------------------------
# command


def _selection(command: str, dump: Dump, args: argparse.Namespace) -> tuple[Any, str]:
    """(what -o json/yaml prints, the short table) for one subcommand."""
    if command == "workloads":
        workloads = select_workloads(dump, args.workload_namespace, args.workload_node, args.address)
        return workloads, render_table(WORKLOAD_HEADERS, workload_rows(workloads, dump))
    if command == "services":
        services = select_services(dump, args.service_namespace)
        return services, render_table(SERVICE_HEADERS, service_rows(services, dump))
    if command == "policies":
        policies = select_policies(dump, args.policy_namespace)
        return policies, render_table(POLICY_HEADERS, policy_rows(policies))
    if command == "certificates":
        certificates = _section(dump, "certificates")
        return certificates, render_table(CERTIFICATE_HEADERS, certificate_rows(certificates, args.now()))
    if command == "connections":
        connections = select_connections(dump, args.direction, args.workload_namespace)
        return connections, render_table(CONNECTION_HEADERS, connection_rows(connections))
    tables = [
        render_table(WORKLOAD_HEADERS, workload_rows(select_workloads(dump), dump)),
        render_table(SERVICE_HEADERS, service_rows(select_services(dump), dump)),
        render_table(POLICY_HEADERS, policy_rows(select_policies(dump))),
        render_table(CERTIFICATE_HEADERS, certificate_rows(_section(dump, "certificates"), args.now())),
        render_table(CONNECTION_HEADERS, connection_rows(select_connections(dump))),
    ]
    return dump, "\n\n".join(tables)


def _write(data: Any, table: str, output: str, out: TextIO) -> None:
    if output == "json":
        out.write(json.dumps(data, indent=2) + "\n")
    elif output == "yaml":
        out.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    else:
        out.write(table + "\n")


def _address(args: argparse.Namespace) -> str:
    if args.node is not None:
        resolver: NodeResolver = args.node_resolver
        return resolver(args.node, os.environ)
    return str(args.admin_address or DEFAULT_ADMIN_ADDRESS)


def run(args: argparse.Namespace) -> int:
    try:
        if args.zc_command == "log":
            return _run_log(args, sys.stdout)
        dump = load_dump_file(args.file) if args.file is not None else fetch_dump(_address(args))
        data, table = _selection(args.zc_command, dump, args)
    except ZtunnelConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    _write(data, table, args.output, sys.stdout)
    return 0


def _run_log(args: argparse.Namespace, out: TextIO) -> int:
    address = _address(args)
    if args.reset or args.level:
        query: dict[str, str] = {}
        if args.reset:
            query["reset"] = "true"
        if args.level:
            query["level"] = args.level
        text = _http(address, "/logging?" + urllib.parse.urlencode(query), method="POST")
    else:
        text = _http(address, "/logging")
    out.write(f"{address}:\n{text}")
    if not text.endswith("\n"):
        out.write("\n")
    return 0


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _source_flags(parser: argparse.ArgumentParser, with_file: bool) -> None:
    source = parser.add_mutually_exclusive_group()
    if with_file:
        source.add_argument("-f", "--file", type=Path, metavar="DUMP.json", help="read a saved /config_dump")
    source.add_argument(
        "--admin-address",
        metavar="HOST:PORT",
        help=f"the ztunnel admin endpoint (default {DEFAULT_ADMIN_ADDRESS})",
    )
    source.add_argument("--node", metavar="NODE", help="the ztunnel of this node (needs the lab)")


def register(commands: Any, node_resolver: NodeResolver = lab_node_resolver) -> None:
    zc = commands.add_parser(
        "ztunnel-config",
        aliases=["zc"],
        help="show what a node proxy knows: workloads, services, policies, certificates, connections",
        description="Read a node proxy's /config_dump and print it as istioctl ztunnel-config does.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-o", "--output", choices=("short", "json", "yaml"), default="short")
    _source_flags(common, with_file=True)
    sub = zc.add_subparsers(dest="zc_command", metavar="SUBCOMMAND")
    sub.required = True
    helps = {
        "workloads": "workloads: NAMESPACE, POD NAME, ADDRESS, NODE, WAYPOINT, PROTOCOL",
        "services": "services: NAMESPACE, SERVICE NAME, SERVICE VIP, WAYPOINT, ENDPOINTS",
        "policies": "L4 authorization policies: NAMESPACE, POLICY NAME, ACTION, SCOPE",
        "certificates": "workload certificates: leaf and root per identity",
        "connections": "live proxied connections",
        "all": "every table, one after another (-o json: the whole dump)",
    }
    defaults = {"node_resolver": node_resolver, "now": _utc_now, "run": run}
    for name, aliases in SUBCOMMANDS.items():
        p = sub.add_parser(name, aliases=list(aliases), parents=[common], help=helps[name])
        p.set_defaults(zc_command=name, **defaults)
        if name in ("workloads", "connections"):
            p.add_argument("--workload-namespace", metavar="NS", help="only workloads in this namespace")
        else:
            p.set_defaults(workload_namespace=None)
        if name == "workloads":
            p.add_argument("--workload-node", metavar="NODE", help="only workloads on this node")
            p.add_argument("--address", metavar="IP", help="only the workload with this address")
        else:
            p.set_defaults(workload_node=None, address=None)
        if name == "services":
            p.add_argument("--service-namespace", metavar="NS", help="only services in this namespace")
        else:
            p.set_defaults(service_namespace=None)
        if name == "policies":
            p.add_argument("--policy-namespace", metavar="NS", help="only policies in this namespace")
        else:
            p.set_defaults(policy_namespace=None)
        if name == "connections":
            p.add_argument("--direction", choices=("inbound", "outbound"), help="only one direction")
        else:
            p.set_defaults(direction=None)
    log = sub.add_parser(
        "log",
        aliases=["o"],
        help="show or change a ztunnel's log levels",
        description="Show the log levels, or change them: --level access:debug,xds:warn (scopes: access, "
        "xds, inpod, ca, proxy, state, admin, hbone; levels: trace, debug, info, warn, error, off).",
    )
    _source_flags(log, with_file=False)
    log.add_argument("--level", metavar="[SCOPE:]LEVEL,...", help="levels to set")
    log.add_argument("-r", "--reset", action="store_true", help="back to the start-up levels")
    log.set_defaults(zc_command="log", **defaults)
