"""The delta xDS client: one TLS gRPC stream to the controller, reconnected for as long as it runs.

Theory of operation
-------------------
`run()` loops: open a fresh channel (re-reading the root file and the credential), open
DeltaAggregatedResources, send the session's opening requests (Authorization, then Address, each with
`initial_resource_versions` of what the proxy holds), then for each response apply it through the
sans-IO `XdsSession` and write its ACK/NACK. Responses are applied in the order they arrive, each as
one batch, on the event loop the data path runs on, so readers never see half a response.

When the stream ends (the controller stopped, the network failed, the credential was refused), the
state is *not* touched: the proxy keeps serving the last configuration it received. It then waits
and reconnects: 10 ms, doubling up to 15 s, each wait drawn uniformly from [d/2, d] so that every
node proxy of a restarted controller does not reconnect in the same instant. A stream that delivered
at least one response resets the wait to 10 ms. On reconnect the controller compares the announced
versions with its own, sends what changed and removes what no longer exists, so the proxy converges
without a full resend.

`ready` is set once a response of each type has been applied (Istio's readiness rule) and stays set.

Metrics (on the registry passed in): `istio_xds_connection_terminations_total{reason}` with Istio's
reasons (ConnectionError: transport failure or unreachable controller; Error: refused or broken
stream, unreadable credential; Complete: the controller ended the stream), `istio_xds_message_total
{url}` and `istio_xds_message_bytes_total{url}` per response received, and
`loom_xds_rejected_resources_total{url}` per resource NACKed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import prometheus_client
from grpclib.client import Channel, Stream
from grpclib.const import Cardinality
from prometheus_client import CollectorRegistry, Counter, Gauge

from loom.api import discovery_pb2
from ztunnel.state import ProxyState
from ztunnel.xds.channel import (
    CALL_ERRORS,
    DEFAULT_CLUSTER_ID,
    CredentialError,
    RootCertificate,
    TokenSource,
    call_metadata,
    describe_call_error,
    secure_channel,
)
from ztunnel.xds.session import NodeInfo, ResponseOutcome, XdsSession

logger = logging.getLogger("ztunnel.xds")

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

XDS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
# The controller splits responses at 2 MiB; gRPC's default 4 MiB limit leaves room and still refuses
# an oversized message (the stream fails, the last good state stays, and the client reconnects).
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# A dead controller (powered-off node) does not close TCP; pings find out. The controller accepts
# pings every 5 s at most, so 30 s is well inside its policy.
KEEPALIVE_SECONDS = 30.0
KEEPALIVE_TIMEOUT_SECONDS = 10.0


def xds_stream(
    channel: Channel, metadata: Sequence[tuple[str, str]] = ()
) -> Stream[discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse]:
    """A DeltaAggregatedResources call on `channel` (opened by its first message)."""
    return channel.request(
        XDS_METHOD,
        Cardinality.STREAM_STREAM,
        discovery_pb2.DeltaDiscoveryRequest,
        discovery_pb2.DeltaDiscoveryResponse,
        metadata=metadata,
    )


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect waits: `initial` doubling up to `maximum` seconds (Istio: 10 ms to 15 s)."""

    initial: float = 0.01
    maximum: float = 15.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"backoff needs 0 < initial ({self.initial}) <= maximum ({self.maximum})")

    def next(self, current: float) -> float:
        return min(current * 2, self.maximum)

    @staticmethod
    def jittered(current: float, rng: random.Random) -> float:
        """A wait drawn from [current/2, current]: spread out, and never above the cap."""
        return current * (0.5 + rng.random() / 2)


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.terminations = Counter(
            "istio_xds_connection_terminations",
            "xDS streams ended, by reason (ConnectionError, Error, Complete)",
            ["reason"],
            registry=registry,
        )
        self.messages = Counter(
            "istio_xds_message", "xDS responses received, by type URL", ["url"], registry=registry
        )
        self.message_bytes = Counter(
            "istio_xds_message_bytes",
            "Bytes of xDS responses received, by type URL",
            ["url"],
            registry=registry,
        )
        self.rejected = Counter(
            "loom_xds_rejected_resources",
            "xDS resources NACKed (invalid or undecodable), by type URL",
            ["url"],
            registry=registry,
        )
        self.connected = Gauge(
            "loom_xds_connected",
            "1 while a stream to the controller is delivering configuration",
            registry=registry,
        )


class XdsClient:
    """Keeps a `ProxyState` in sync with the controller (see the module docstring)."""

    def __init__(
        self,
        address: str,
        root_cert: RootCertificate,
        token_source: TokenSource,
        node_name: str,
        state: ProxyState,
        *,
        node: NodeInfo | None = None,
        session: XdsSession | None = None,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        server_name: str | None = None,
        registry: CollectorRegistry | None = None,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """`address` is host:port of the controller's gRPC port; `root_cert` PEM text or a file (re-read
        per connection); `token_source` returns the node credential (called per connection); `node`
        overrides the announced pod name/namespace/IP (its node_name must equal `node_name`); `session`
        replaces the default session over `state` (a waypoint's, which subscribes to other types)."""
        if session is not None:
            if node is not None:
                raise ValueError("give either node or session: a session carries its own node")
            node = session.node
        if node is not None and node.node_name != node_name:
            raise ValueError(f"node info is for {node.node_name!r}, the client for {node_name!r}")
        self._address = address
        self._root = root_cert
        self._token_source = token_source
        self._cluster_id = cluster_id
        self._server_name = server_name
        self.session = session or XdsSession(state, node or NodeInfo(node_name))
        self.metrics = XdsMetrics(registry if registry is not None else CollectorRegistry(auto_describe=True))
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._max_message_bytes = max_message_bytes
        self.ready = asyncio.Event()
        self.connected = False
        self.connections = 0  # streams that delivered at least one response
        self.last_error = ""
        self._delivered = False  # the current stream has delivered a response
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> asyncio.Task[None]:
        """Run in a task of its own (kept here); `close()` stops it."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="xds-client")
        return self._task

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Connect, stream, reconnect; returns only by cancellation."""
        delay = self._backoff.initial
        while True:
            delivered = False
            reason = "Complete"
            try:
                delivered = await self._stream()
                self.last_error = ""
            except CALL_ERRORS as e:
                unreachable, self.last_error = describe_call_error(e)
                reason = "ConnectionError" if unreachable else "Error"
                delivered = self._delivered
            except CredentialError as e:
                reason = "Error"
                self.last_error = str(e)
            except Exception as e:  # a bug must cost one stream, never the proxy's configuration
                reason = "Error"
                delivered = self._delivered
                self.last_error = f"{type(e).__name__}: {e}"
                logger.exception("xDS stream failed", extra={"fields": {"controller": self._address}})
            finally:
                self.connected = False
                self.metrics.connected.set(0)
            self.metrics.terminations.labels(reason=reason).inc()
            if delivered:
                delay = self._backoff.initial
            wait = self._backoff.jittered(delay, self._rng)
            logger.warning(
                "xDS stream ended; the last configuration stays in force",
                extra={
                    "fields": {
                        "reason": reason,
                        "error": self.last_error,
                        "controller": self._address,
                        "retry_in_s": round(wait, 3),
                    }
                },
            )
            await asyncio.sleep(wait)
            delay = self._backoff.next(delay)

    # ------------------------------------------------------------------ one stream

    async def _stream(self) -> bool:
        """One stream until it ends; True if it delivered at least one response."""
        self._delivered = False
        metadata = call_metadata(self._token_source, self._cluster_id)
        channel = secure_channel(
            self._address,
            self._root,
            server_name=self._server_name,
            keepalive_seconds=KEEPALIVE_SECONDS,
            keepalive_timeout_seconds=KEEPALIVE_TIMEOUT_SECONDS,
            max_message_bytes=self._max_message_bytes,
        )
        try:
            async with xds_stream(channel, metadata) as call:
                for request in self.session.connect():
                    await call.send_message(request)
                while True:
                    response = await call.recv_message()
                    if response is None:
                        # The controller ended the stream: its status (trailers) says how.
                        await call.end()
                        return self._delivered
                    outcome = self._handle(response)
                    await call.send_message(outcome.reply)
        finally:
            channel.close()

    def _handle(self, response: discovery_pb2.DeltaDiscoveryResponse) -> ResponseOutcome:
        url = response.type_url
        self.metrics.messages.labels(url=url).inc()
        self.metrics.message_bytes.labels(url=url).inc(response.ByteSize())
        outcome = self.session.on_response(response)
        if not self._delivered:
            self._delivered = True
            self.connections += 1
            self.connected = True
            self.metrics.connected.set(1)
        if outcome.rejected:
            self.metrics.rejected.labels(url=url).inc(len(outcome.rejected))
            logger.warning(
                "xDS resources rejected (NACK)",
                extra={"fields": {"type": url, "rejected": dict(outcome.rejected)}},
            )
        if outcome.first:
            logger.info(
                "first xDS response applied",
                extra={"fields": {"type": url, "applied": outcome.applied, "removed": outcome.removed}},
            )
        if self.session.ready and not self.ready.is_set():
            self.ready.set()
        return outcome
