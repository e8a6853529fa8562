"""`loom-cni-agent`: the node agent process (configuration from arguments and LOOM_CNI_AGENT_* env).

It serves the CNI plugin's events on the plugin socket and ztunnel's ZDS connections on the ZDS socket,
using the iptables redirection backend. The pods and namespaces it knows come from Kubernetes YAML files
or directories (`--manifests`, the same files the controller reads); a Kubernetes watch and runtime
enrolment on label changes are later work. Exits 2 with a clear message when it cannot run here (not
root, iptables or iproute2 missing, bad manifests); SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from cni.agent.agent import CapturedStore, NodeAgent, StaticPodDirectory
from cni.agent.redirect import IptablesBackend, check_prerequisites
from cni.agent.zds_server import ZdsServer
from cni.events import serve_plugin_events
from cni.plugin import DEFAULT_AGENT_SOCKET
from loom.resources.loader import load_paths
from loom.resources.model import Namespace, Pod
from ztunnel.inpod.client import DEFAULT_SOCKET_PATH

log = logging.getLogger("loom.cni.agent")
ENV_PREFIX = "LOOM_CNI_AGENT_"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="loom-cni-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--node", default=env.get(ENV_PREFIX + "NODE", ""), help="this node's name")
    parser.add_argument(
        "--plugin-socket", default=env.get(ENV_PREFIX + "PLUGIN_SOCKET", DEFAULT_AGENT_SOCKET)
    )
    parser.add_argument("--zds-socket", default=env.get(ENV_PREFIX + "ZDS_SOCKET", DEFAULT_SOCKET_PATH))
    parser.add_argument(
        "--manifests",
        nargs="*",
        type=Path,
        default=[Path(p) for p in env.get(ENV_PREFIX + "MANIFESTS", "").split(os.pathsep) if p],
        help="Kubernetes YAML files/directories with the pods and namespaces",
    )
    # Where the captured pods are remembered across agent restarts (tmpfs: a node reboot starts fresh,
    # as every sandbox is recreated then anyway).
    parser.add_argument(
        "--state-file", default=env.get(ENV_PREFIX + "STATE_FILE", "/var/run/loom-cni/captured.json")
    )
    parser.add_argument("--log-level", default=env.get(ENV_PREFIX + "LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def load_directory(paths: Sequence[Path], node: str) -> tuple[StaticPodDirectory, list[str]]:
    """Pods scheduled on `node` (all pods when `node` is empty) and every namespace; plus error texts."""
    result = load_paths(list(paths)) if paths else None
    objects: list[Pod | Namespace] = []
    errors: list[str] = []
    if result is not None:
        errors = [str(d) for d in result.errors]
        for obj in result.objects:
            if isinstance(obj, Namespace) or (
                isinstance(obj, Pod) and (not node or obj.spec.node_name == node)
            ):
                objects.append(obj)
    return StaticPodDirectory(objects), errors


async def run(args: argparse.Namespace) -> int:
    directory, errors = load_directory(args.manifests, args.node)
    if errors:
        for error in errors:
            log.error("manifests: %s", error)
        return 2
    backend = IptablesBackend()
    try:
        zds = ZdsServer(args.zds_socket)
        agent = NodeAgent(directory, backend, zds, CapturedStore(Path(args.state_file)))
        # Before ztunnel can connect: its first snapshot must list the pods captured before a restart.
        restored = await agent.restore()
        log.info("restored %d captured pods from %s", restored, args.state_file)
        async with zds:
            server = await serve_plugin_events(args.plugin_socket, agent.handle)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            log.info("serving plugin events on %s and ztunnel on %s", args.plugin_socket, args.zds_socket)
            try:
                await stop.wait()
            finally:
                server.close()
                await server.wait_closed()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(args.plugin_socket)
    finally:
        backend.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    problems = check_prerequisites()
    if problems:
        for problem in problems:
            print(f"loom-cni-agent: cannot run: {problem}", file=sys.stderr)
        return 2
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
