"""`loom-cni-agent`: the node agent process (configuration from arguments and LOOM_CNI_AGENT_* env).

It serves the CNI plugin's events on the plugin socket and ztunnel's ZDS connections on the ZDS socket,
follows the pods and namespaces in Kubernetes YAML files or directories (`--manifests`, the same files
the controller reads) and enrols or releases running pods when their labels change, keeps the node's
probe SNAT rules, writes the `ambient.istio.io/redirection` annotation into the lab store
(`--annotate-store`) and answers /healthz, /readyz and /metrics on `--http-addr` (see
`cni.agent.app`). Exits 2 with a clear message when it cannot run here (not root, setns not permitted,
iptables or a kernel feature missing, a manifest path that does not exist, an address in use);
SIGTERM/SIGINT stop it cleanly, leaving every pod's capture in place for the next agent.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from cni.agent.app import DEFAULT_STATE_FILE, AgentConfig, NodeAgentApp
from cni.agent.health import DEFAULT_HTTP_ADDR
from cni.agent.prerequisites import check_prerequisites
from cni.plugin import DEFAULT_AGENT_SOCKET
from controller.sources.kubernetes import pods_on_node
from ztunnel.inpod.client import DEFAULT_SOCKET_PATH

log = logging.getLogger("loom.cni.agent")
ENV_PREFIX = "LOOM_CNI_AGENT_"


def parse_host_port(text: str) -> tuple[str, int]:
    """'127.0.0.1:15016', '[::1]:15016' or ':15016' (all addresses); port 0 picks a free port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not <host>:<port> (e.g. 127.0.0.1:15016)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {host!r} is not an IP address") from None
    return host, int(port_text)


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
        help="Kubernetes YAML files/directories with the pods and namespaces (watched for changes)",
    )
    parser.add_argument(
        "--kubernetes",
        action="store_true",
        default=env.get(ENV_PREFIX + "KUBERNETES", "").lower() in ("1", "true", "yes"),
        help="follow pods and namespaces in the Kubernetes API (in-cluster or $KUBECONFIG) and annotate "
        "pods there, instead of --manifests",
    )
    parser.add_argument(
        "--kubernetes-url",
        default=env.get(ENV_PREFIX + "KUBERNETES_URL", ""),
        help="an API server URL to use instead (e.g. `kubectl proxy`'s http://127.0.0.1:8001)",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        default=Path(env.get(ENV_PREFIX + "STATE_FILE", DEFAULT_STATE_FILE)),
        help="where the agent remembers its pods across restarts",
    )
    parser.add_argument(
        "--annotate-store",
        type=Path,
        default=Path(env[ENV_PREFIX + "ANNOTATE_STORE"]) if env.get(ENV_PREFIX + "ANNOTATE_STORE") else None,
        help="lab object store directory to write the ambient.istio.io/redirection pod annotation into",
    )
    parser.add_argument(
        "--http-addr",
        type=parse_host_port,
        # A string default goes through `type` too, so a bad environment value is a usage error.
        default=env.get(ENV_PREFIX + "HTTP_ADDR", DEFAULT_HTTP_ADDR),
        help=f"/healthz, /readyz and /metrics (default {DEFAULT_HTTP_ADDR})",
    )
    parser.add_argument(
        "--host-netns",
        default=env.get(ENV_PREFIX + "HOST_NETNS") or None,
        help="path of the node's network namespace for the probe SNAT rules (default: the agent's own)",
    )
    parser.add_argument("--log-level", default=env.get(ENV_PREFIX + "LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    host, port = args.http_addr
    return AgentConfig(
        node=args.node,
        plugin_socket=args.plugin_socket,
        zds_socket=args.zds_socket,
        manifests=tuple(args.manifests),
        state_file=args.state_file,
        annotate_store=args.annotate_store,
        kubernetes=args.kubernetes or bool(args.kubernetes_url),
        kubernetes_url=args.kubernetes_url,
        http_host=host,
        http_port=port,
        host_netns=args.host_netns,
    )


def config_problems(config: AgentConfig) -> list[str]:
    """What is wrong with the configuration itself (checked before anything starts)."""
    problems = []
    if config.kubernetes and config.manifests:
        problems.append("--kubernetes and --manifests exclude each other: choose one source of pods")
    if config.kubernetes:
        try:
            pods_on_node(config.node)
        except ValueError as exc:
            problems.append(f"--node {config.node!r}: {exc}")
    if config.host_netns is not None and not os.path.exists(config.host_netns):
        problems.append(f"--host-netns {config.host_netns} does not exist")
    return problems


async def run(config: AgentConfig) -> int:
    try:
        app = NodeAgentApp(config)
    except FileNotFoundError as exc:  # a --manifests path that does not exist
        print(f"loom-cni-agent: {exc}", file=sys.stderr)
        return 2
    try:
        await app.start()
    except OSError as exc:  # an address in use, a socket directory that cannot be created, ...
        print(f"loom-cni-agent: cannot start: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await app.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = config_from_args(args)
    problems = check_prerequisites() + config_problems(config)
    if problems:
        for problem in problems:
            print(f"loom-cni-agent: cannot run: {problem}", file=sys.stderr)
        return 2
    return asyncio.run(run(config))


if __name__ == "__main__":
    sys.exit(main())
