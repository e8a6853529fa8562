"""The node agent's HTTP surface: /healthz, /readyz and /metrics on one small h11 server.

* ``GET /healthz``: 200 ``ok`` while the process serves HTTP at all (liveness);
* ``GET /readyz``: 200 ``ready`` once the captured pods are restored from the state file, the first
  configuration is loaded and the plugin socket listens; otherwise 503 naming what is still awaited
  (the blockers of a `ztunnel.readiness.Readiness`). A missing ztunnel does NOT make the agent unready:
  ztunnel needs a ready agent to connect to, not the other way round;
* ``GET /metrics``: the Prometheus exposition of `AgentMetrics`.

Default address 127.0.0.1:15016 (`DEFAULT_HTTP_ADDR`): loopback, because nothing outside the node needs
these pages unless told so (the lab binds the node's wire address); not Istio's 15014, because
loom-controller listens on 0.0.0.0:15014 and both share a network namespace whenever the controller
runs on a node outside the lab. The server is `loom.httpserver.HttpServer`, like ztunnel's.
"""

from __future__ import annotations

import logging
from typing import Final

import prometheus_client

from cni.agent.metrics import AgentMetrics
from loom.httpserver import HttpServer, Request, Response
from ztunnel.readiness import Readiness

log = logging.getLogger("loom.cni.agent.http")

DEFAULT_HTTP_HOST: Final = "127.0.0.1"
DEFAULT_HTTP_PORT: Final = 15016
DEFAULT_HTTP_ADDR: Final = f"{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}"

# Readiness blockers, worded for the 503 body.
BLOCK_STATE: Final = "restoring the captured pods from the state file"
BLOCK_CONFIG: Final = "the first configuration (--manifests)"
BLOCK_PLUGIN_SOCKET: Final = "the plugin socket to listen"


class AgentHttpServer(HttpServer):
    def __init__(
        self,
        readiness: Readiness,
        metrics: AgentMetrics,
        host: str = DEFAULT_HTTP_HOST,
        port: int = DEFAULT_HTTP_PORT,
    ) -> None:
        routes = [
            ("GET", "/healthz", self._healthz),
            ("GET", "/readyz", self._readyz),
            ("GET", "/metrics", self._metrics),
        ]
        super().__init__("cni-agent", host, port, routes, logger=log)
        self.readiness = readiness
        self.metrics = metrics

    async def _healthz(self, request: Request) -> Response:
        return Response(body="ok\n")

    async def _readyz(self, request: Request) -> Response:
        if self.readiness.ready:
            return Response(body="ready\n")
        return Response(503, f"not ready, waiting for: {'; '.join(self.readiness.pending)}\n")

    async def _metrics(self, request: Request) -> Response:
        return Response(body=self.metrics.exposition(), content_type=prometheus_client.CONTENT_TYPE_LATEST)
