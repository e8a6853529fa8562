"""`loomctl lab up|down|status|exec`: the local lab cluster (see loom/lab/cluster.py).

    loomctl lab up [-f FILE|DIR ...] [--nodes N]     build the lab (or apply FILEs to the running one)
    loomctl lab down                                 remove everything the lab created (idempotent)
    loomctl lab status                               nodes, and pods with node, IP and enrolment
    loomctl lab exec POD|NS/POD|deploy/NAME|node/NODE [-n NS] -- CMD ...
                                                     run CMD in that network namespace

The lab lives in $LOOM_LAB_DIR (default /var/run/loom-lab); `--lab-dir` overrides it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from loom.cli.table import render_table
from loom.lab.cluster import Cluster, LabError, lab_dir_from_env


def register(commands: Any) -> None:
    lab = commands.add_parser("lab", help="the local lab cluster built from network namespaces")
    sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND")
    sub.required = True

    up = sub.add_parser("up", help="build the lab (idempotent) and apply configuration to it")
    up.add_argument("-f", "--filename", action="append", type=Path, default=[], help="YAML file or directory")
    up.add_argument(
        "--nodes", type=int, default=2, help="number of nodes when the lab is created (default 2)"
    )
    up.set_defaults(run=run_up)

    down = sub.add_parser("down", help="remove every namespace, link, rule and process of the lab")
    down.set_defaults(run=run_down)

    status = sub.add_parser("status", help="nodes and pods of the lab")
    status.set_defaults(run=run_status)

    exec_ = sub.add_parser("exec", help="run a command in a pod's or node's network namespace")
    exec_.add_argument("target", help="POD, NS/POD, deploy/NAME, node/NODE or cp")
    exec_.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default: default)")
    exec_.set_defaults(run=run_exec)

    for parser in (up, down, status, exec_):
        parser.add_argument("--lab-dir", type=Path, default=None, help="lab state directory ($LOOM_LAB_DIR)")


def _cluster(args: argparse.Namespace) -> Cluster:
    return Cluster(args.lab_dir or lab_dir_from_env())


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _fail(error: Exception) -> int:
    print(f"loomctl lab: {error}", file=sys.stderr)
    return 1


def run_up(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    print(f"lab: bringing up {cluster.lab_dir} ({args.nodes} nodes)", file=sys.stderr)
    try:
        report = cluster.up(args.filename, args.nodes, _progress)
    except (LabError, OSError) as e:
        return _fail(e)
    for line in report:
        print(line)
    print("lab: up — `loomctl lab status` shows it, `loomctl lab down` removes it", file=sys.stderr)
    # The lab is up either way; invalid objects in the files were refused (and named above).
    return 1 if any(line.startswith("Error:") for line in report) else 0


def run_down(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    try:
        removed = cluster.down(_progress)
    except (LabError, OSError) as e:
        return _fail(e)
    print(f"lab: down ({len(removed)} namespaces removed)")
    return 0


def run_status(args: argparse.Namespace) -> int:
    try:
        status = _cluster(args).status()
    except (LabError, OSError) as e:
        return _fail(e)
    if not status.up:
        print("lab: not up")
        return 1
    yes = {True: "yes", False: "no"}
    print(f"controller running: {yes[status.controller_running]}\n")
    node_rows = [
        [n.name, n.wire_ip, n.pod_cidr, yes[n.agent_running], yes[n.ztunnel_running], yes[n.ztunnel_ready]]
        for n in status.nodes
    ]
    print(render_table(["NODE", "ADDRESS", "POD CIDR", "AGENT", "ZTUNNEL", "READY"], node_rows))
    pod_rows = [
        [p.namespace, p.name, p.node, p.ip, "Running" if p.running else "Stopped", p.redirection or "-"]
        for p in status.pods
    ]
    print()
    print(render_table(["NAMESPACE", "NAME", "NODE", "IP", "STATUS", "REDIRECTION"], pod_rows))
    return 0


def run_exec(args: argparse.Namespace) -> int:
    command = list(args.passthrough)
    if not command:
        print("loomctl lab exec: give the command after --", file=sys.stderr)
        return 2
    try:
        netns = _cluster(args).netns_of(args.target, args.namespace)
    except (LabError, OSError) as e:
        return _fail(e)
    # Replace loomctl: signals, exit status and the terminal all belong to the command.
    os.execvp("ip", ["ip", "netns", "exec", netns, *command])
    return 127  # not reached
