"""The node agent assembled: configuration watch, state, ZDS server, plugin socket, HTTP, node rules.

Theory of operation
-------------------
`NodeAgentApp` wires the pieces of `loom-cni-agent` together and owns their lifetimes, so the process
entry point (`cni.agent.main`) and the in-process root tests start exactly the same thing. Start-up
order matters for running pods:

1. the HTTP server (so /healthz answers and /readyz explains what start-up waits for);
2. `NodeAgent.restore`: the captured pods from the state file, their rules re-checked, the node's probe
   SNAT rules rebuilt from them (stale ones vanish). This happens BEFORE the ZDS socket listens: a
   ztunnel that reconnects after an agent restart must get a snapshot listing every pod it serves, or it
   would drain them;
3. the ZDS server; the reconcile loop; the annotation writer;
4. the configuration watch (`DirectorySource` over ``--manifests``, or with ``--kubernetes`` a list+watch
   of namespaces and of this node's pods through `KubernetesSource`; full snapshots on every change);
   each snapshot becomes the agent's `SnapshotDirectory` and triggers a reconcile, which releases pods
   no longer to be enrolled and captures newly labelled ones;
5. the plugin socket. Readiness is reached once 2, 4 (first snapshot) and 5 are done.

`stop()` closes everything in reverse and leaves every pod as it is: rules stay, ztunnel keeps its
proxies, the state file stays, so a restarted agent takes over without interrupting traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cni.agent.agent import CapturedStore, NodeAgent, SnapshotDirectory
from cni.agent.annotations import AnnotationSync, KubernetesAnnotator, PodAnnotator, StoreAnnotator
from cni.agent.health import (
    BLOCK_CONFIG,
    BLOCK_PLUGIN_SOCKET,
    BLOCK_STATE,
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    AgentHttpServer,
)
from cni.agent.host_rules import HostRules, HostRulesApplier
from cni.agent.metrics import AgentMetrics
from cni.agent.redirect import IptablesBackend, NetnsRunner, RedirectionBackend
from cni.agent.zds_server import DEFAULT_IO_TIMEOUT, ZdsServer
from cni.events import serve_plugin_events
from cni.plugin import DEFAULT_AGENT_SOCKET
from controller.sources.base import ConfigSource
from controller.sources.directory import DirectorySource
from controller.sources.kubernetes import NAMESPACES, KubernetesSource, pods_on_node
from loom.resources.diagnostics import Diagnostic
from loom.resources.model import ConfigSnapshot
from ztunnel.inpod.client import DEFAULT_SOCKET_PATH
from ztunnel.readiness import Readiness

log = logging.getLogger("loom.cni.agent")

# tmpfs: a node reboot starts fresh, as every sandbox is recreated then anyway.
DEFAULT_STATE_FILE: Final = "/var/run/loom-cni/captured.json"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str = ""  # this node's name; empty: every pod in the configuration is a candidate
    plugin_socket: str = DEFAULT_AGENT_SOCKET
    zds_socket: str = DEFAULT_SOCKET_PATH
    manifests: tuple[Path, ...] = ()  # Kubernetes YAML files/directories, followed for changes
    state_file: Path = Path(DEFAULT_STATE_FILE)
    annotate_store: Path | None = None  # lab object store root for the redirection annotation
    # Follow pods and namespaces in the Kubernetes API (and annotate pods there) instead of --manifests.
    kubernetes: bool = False
    kubernetes_url: str = ""  # an API server URL (e.g. kubectl proxy); "": in-cluster or kubeconfig
    http_host: str = DEFAULT_HTTP_HOST
    http_port: int = DEFAULT_HTTP_PORT
    host_netns: str | None = None  # the node's netns for the probe SNAT rules; None: our own
    config_debounce: float = 0.05
    resync_interval: float = 30.0
    zds_io_timeout: float = DEFAULT_IO_TIMEOUT


class NodeAgentApp:
    """See the module docstring. `annotator` overrides the one `config.annotate_store` selects;
    `backend` and `host_rules` replace the iptables implementations (tests without root)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        annotator: PodAnnotator | None = None,
        backend: RedirectionBackend | None = None,
        host_rules: HostRules | None = None,
    ) -> None:
        self.config = config
        self.kubernetes: KubernetesSource | None = None
        if config.kubernetes:
            # Only namespaces and the pods of this node (fieldSelector spec.nodeName=<node>, as Istio's
            # node agent watches them): the enrolment decision needs nothing else, and a cluster-wide pod
            # watch from every node would cost the API server and each agent O(cluster) for nothing.
            # Nothing is lost: the kubelet starts a pod's sandbox (the plugin ADD) only after the pod is
            # bound to the node, and the binding reaches this watch as the pod's ADDED event. Without a
            # node name (`--node` unset) the agent keeps the cluster-wide watch. Built first, before
            # anything holding a resource exists: a node name that is not a DNS subdomain fails the
            # construction with ValueError rather than corrupting the selector.
            resources = (NAMESPACES, pods_on_node(config.node))
            self.kubernetes = (
                KubernetesSource.from_url(config.kubernetes_url, resources=resources)
                if config.kubernetes_url
                else KubernetesSource.from_environment(resources=resources)
            )
        self.metrics = AgentMetrics()
        self.readiness = Readiness()
        self._blocks = {
            name: self.readiness.block(name) for name in (BLOCK_STATE, BLOCK_CONFIG, BLOCK_PLUGIN_SOCKET)
        }
        self.http = AgentHttpServer(self.readiness, self.metrics, config.http_host, config.http_port)
        self.runner = NetnsRunner()
        self.backend: RedirectionBackend = (
            backend if backend is not None else IptablesBackend(runner=self.runner)
        )
        self.host_rules: HostRules = (
            host_rules
            if host_rules is not None
            else HostRulesApplier(self.runner, netns_path=config.host_netns)
        )
        if annotator is None and config.annotate_store is not None:
            annotator = StoreAnnotator(config.annotate_store)
        elif annotator is None and self.kubernetes is not None:
            annotator = KubernetesAnnotator(self.kubernetes)
        self.annotations = (
            AnnotationSync(annotator, on_error=self.metrics.redirection_errors.inc)
            if annotator is not None
            else None
        )
        self.zds = ZdsServer(config.zds_socket, io_timeout=config.zds_io_timeout)
        self.agent = NodeAgent(
            None,
            self.backend,
            self.zds,
            CapturedStore(config.state_file),
            host_rules=self.host_rules,
            annotations=self.annotations,
            metrics=self.metrics,
            node=config.node,
            resync_interval=config.resync_interval,
        )
        self.source: ConfigSource | None = (
            self.kubernetes
            if self.kubernetes is not None
            else DirectorySource(list(config.manifests), config.config_debounce)
            if config.manifests
            else None
        )
        self._plugin_server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: set[Diagnostic] = set()

    @property
    def http_port(self) -> int:
        return self.http.port

    async def start(self) -> None:
        try:
            await self.http.start()
            restored = await self.agent.restore()
            log.info("restored %d captured pods from %s", restored, self.config.state_file)
            self._blocks[BLOCK_STATE].release()
            await self.zds.start()
            self._spawn(self.agent.run(), "cni-agent-reconcile")
            if self.annotations is not None:
                self._spawn(self.annotations.run(), "cni-agent-annotations")
            if self.source is not None:
                self._spawn(self.source.run(self._on_config), "cni-agent-config")
            else:
                log.warning("neither --manifests nor --kubernetes: this agent knows no pods and enrols none")
                self._on_config(ConfigSnapshot(), ())
            self._plugin_server = await serve_plugin_events(self.config.plugin_socket, self.agent.handle)
            self._blocks[BLOCK_PLUGIN_SOCKET].release()
            log.info(
                "serving plugin events on %s, ztunnel on %s, HTTP on %s",
                self.config.plugin_socket,
                self.config.zds_socket,
                self.http.address,
            )
        except BaseException:
            await self.stop()
            raise

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s ended unexpectedly", task.get_name(), exc_info=task.exception())

    def _on_config(self, snapshot: ConfigSnapshot, diagnostics: tuple[Diagnostic, ...]) -> None:
        # The source re-sends every diagnostic with each snapshot; log each problem once.
        current = {d for d in diagnostics if d.is_error}
        for diagnostic in sorted(current - self._reported, key=str):
            log.error("configuration: %s", diagnostic)
        self._reported = current
        self.agent.set_directory(SnapshotDirectory(snapshot, self.config.node))
        self._blocks[BLOCK_CONFIG].release()

    async def stop(self) -> None:
        """Stop serving; pods, rules and ztunnel's proxies stay as they are (see the module docstring)."""
        if self._plugin_server is not None:
            self._plugin_server.close()
            await self._plugin_server.wait_closed()
            self._plugin_server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.plugin_socket)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.zds.close()
        if self.kubernetes is not None:
            await self.kubernetes.aclose()
        await self.http.stop()
        if isinstance(self.backend, IptablesBackend):
            self.backend.close()
        self.runner.close()
