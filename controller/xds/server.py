"""The delta xDS gRPC service: one authenticated stream per node proxy, fed from published translations.

Theory of operation
-------------------
Publication: `publish(translation)` (or `publish_prepared(resources)` when the caller already versioned
the translation off the event loop) records the new state as *pending*. A single push task commits
pending states after a quiet period (`debounce`, default 10 ms) or at the latest `max_delay` (default
100 ms) after the first uncommitted publication, so a burst of changes becomes one push. Committing
creates a new *generation*: the prepared resources (each serialized once, shared by every stream) plus
the names changed since the previous generation. Committing never waits for any stream: it only wakes
them.

Streams: each stream is authenticated from its call metadata before anything is read or sent, and the
node named in its first request (Node.metadata NODE_NAME, else the node id) must be the authenticated
node. Who the caller is also decides what the stream may see (`stream_scope`): a node proxy gets
Authorization and Address; a waypoint proxy (its Node.metadata NAMESPACE/WAYPOINT_NAME must name the
authenticated waypoint) gets Address and only its own WaypointConfig. Asking for a type or a name
outside the scope ends the stream with PERMISSION_DENIED: fail closed, and loud. Each stream then
runs its own loop around a sans-IO `DeltaStream`: requests (read by a helper task into a small
bounded inbox) and generation changes both wake it. A stream that is one generation
behind diffs only the changed names; a stream further behind (it was busy writing to a slow client)
diffs everything against the latest generation, i.e. intermediate states are coalesced and the stream
catches up in one step. So the per-stream "queue" of states has size one and cannot overflow, and a
slow or dead subscriber never delays any other: its writes block only its own loop.

Shutdown: `close()` wakes every stream, which then returns (the client sees the stream end with OK and
reconnects elsewhere), and stops the push task.

Metrics: connected proxies, responses written per type, push latency (first uncommitted publication to
the response written), NACKs per type, resources served per type, refused streams per reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc

from controller.auth import AuthenticationError, NodeAuthenticator, NodeIdentity
from controller.metrics import ControllerMetrics, type_label
from controller.translate import Translation
from controller.xds.delta import (
    DEFAULT_MAX_RESPONSE_BYTES,
    WILDCARD,
    Acked,
    DeltaStream,
    Nacked,
    ProtocolError,
    StaleNonce,
    Subscribed,
)
from controller.xds.resources import (
    NODE_PROXY_TYPE_URLS,
    SERVED_TYPE_URLS,
    WAYPOINT_CONFIG_TYPE_URL,
    WAYPOINT_TYPE_URLS,
    ResourcesByType,
    ResourceSet,
    VersionedResource,
    changed_names,
    prepare,
)
from loom.api import discovery_pb2

logger = logging.getLogger("controller.xds")

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"
NODE_NAME_METADATA = "NODE_NAME"
# What a waypoint proxy announces: its Gateway's namespace and name (waypoint/xds.py).
NAMESPACE_METADATA = "NAMESPACE"
WAYPOINT_NAME_METADATA = "WAYPOINT_NAME"
REFUSAL_MESSAGE = "request authentication failure"
# Requests buffered per stream before the reader stops reading (HTTP/2 flow control then pushes back).
_INBOX_SIZE = 32

DeltaRequest = discovery_pb2.DeltaDiscoveryRequest
DeltaResponse = discovery_pb2.DeltaDiscoveryResponse


@dataclass(frozen=True, slots=True)
class Generation:
    """One committed state."""

    number: int
    resources: ResourceSet
    changed: Mapping[str, frozenset[str]]  # names changed since generation number - 1
    published_at: float  # loop time of the earliest publication coalesced into this generation


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A connected node proxy, for debugging."""

    node: str
    subject: str
    peer: str
    connected_at: float  # wall clock (time.time())
    generation: int
    types: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StreamScope:
    """What one stream may see: the types it may subscribe to (in push order) and, for the types in
    `names`, only those resource names."""

    types: tuple[str, ...]
    names: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def view(self, resources: ResourcesByType) -> ResourcesByType:
        """`resources` cut down to the scope (unrestricted types are passed through, not copied)."""
        visible: dict[str, Mapping[str, VersionedResource]] = {}
        for type_url in self.types:
            of_type = resources.get(type_url, {})
            allowed = self.names.get(type_url)
            if allowed is None:
                visible[type_url] = of_type
            else:
                visible[type_url] = {n: of_type[n] for n in allowed if n in of_type}
        return visible


def stream_scope(identity: NodeIdentity) -> StreamScope:
    """A node proxy sees the workload API; a waypoint sees the addresses and its own configuration."""
    if identity.waypoint:
        return StreamScope(WAYPOINT_TYPE_URLS, {WAYPOINT_CONFIG_TYPE_URL: frozenset({identity.waypoint})})
    return StreamScope(NODE_PROXY_TYPE_URLS)


@dataclass(slots=True, eq=False)  # identity semantics: subscribers live in a set
class _Subscriber:
    identity: NodeIdentity
    scope: StreamScope
    peer: str
    delta: DeltaStream
    generation: int
    connected_at: float = field(default_factory=time.time)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Requests read from the client; None marks the end of the request stream.
    inbox: asyncio.Queue[DeltaRequest | None] = field(default_factory=lambda: asyncio.Queue(_INBOX_SIZE))
    # Loop time of the earliest publication not yet delivered to this stream.
    undelivered_since: float | None = None
    node_checked: bool = False


class StreamRefused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def _metadata_string(node: discovery_pb2.Node, key: str) -> str:
    value = node.metadata.fields.get(key)
    if value is not None and value.WhichOneof("kind") == "string_value":
        return value.string_value
    return ""


def requested_node(node: discovery_pb2.Node) -> str:
    """The node a request says it serves: metadata NODE_NAME (what ztunnel sends), else the node id."""
    return _metadata_string(node, NODE_NAME_METADATA) or node.id


def requested_waypoint(node: discovery_pb2.Node) -> str:
    """The waypoint a request says it is, "<namespace>/<name>" from metadata NAMESPACE and
    WAYPOINT_NAME; "" when either is missing."""
    namespace = _metadata_string(node, NAMESPACE_METADATA)
    name = _metadata_string(node, WAYPOINT_NAME_METADATA)
    return f"{namespace}/{name}" if namespace and name else ""


class XdsServer:
    """Serves the published resources over DeltaAggregatedResources to authenticated node proxies."""

    def __init__(
        self,
        authenticator: NodeAuthenticator,
        metrics: ControllerMetrics,
        *,
        debounce: float = 0.01,
        max_delay: float = 0.1,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if debounce < 0 or max_delay < debounce:
            raise ValueError("need 0 <= debounce <= max_delay")
        self._authenticator = authenticator
        self._metrics = metrics
        self._debounce = debounce
        self._max_delay = max_delay
        self._max_response_bytes = max_response_bytes
        self._current = Generation(0, ResourceSet(), {}, 0.0)
        self._latest_prepared = ResourceSet()
        self._pending: ResourceSet | None = None
        self._first_pending_at = 0.0
        self._last_publish_at = 0.0
        self._pending_event = asyncio.Event()
        self._subscribers: set[_Subscriber] = set()
        self._push_task: asyncio.Task[None] | None = None
        self._closing = False
        self._committed = asyncio.Condition()

    # ------------------------------------------------------------------ publication

    @property
    def latest_prepared(self) -> ResourceSet:
        """The most recently published resources (pass to `prepare` as `previous`)."""
        return self._latest_prepared

    @property
    def generation(self) -> int:
        return self._current.number

    @property
    def served(self) -> ResourceSet:
        """The resources of the committed generation (what streams are being given now)."""
        return self._current.resources

    def publish(self, translation: Translation) -> None:
        self.publish_prepared(prepare(translation, self._latest_prepared))

    def publish_prepared(self, resources: ResourceSet) -> None:
        """Make `resources` the served state; streams get it after the debounce. Event-loop thread only."""
        now = asyncio.get_running_loop().time()
        if self._pending is None:
            self._first_pending_at = now
        self._pending = resources
        self._latest_prepared = resources
        self._last_publish_at = now
        self._pending_event.set()

    async def wait_for_generation(self, number: int) -> None:
        """Wait until generation `number` is committed (callers bound the wait with asyncio.timeout)."""
        async with self._committed:
            await self._committed.wait_for(lambda: self._current.number >= number)

    async def start(self) -> None:
        if self._push_task is None:
            self._push_task = asyncio.create_task(self._push_loop(), name="xds-push")

    async def close(self) -> None:
        """End every stream cleanly and stop pushing."""
        self._closing = True
        for subscriber in list(self._subscribers):
            subscriber.wake.set()
        if self._push_task is not None:
            self._push_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._push_task
            self._push_task = None

    async def _push_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._pending_event.wait()
            while True:
                wake_at = min(
                    self._last_publish_at + self._debounce, self._first_pending_at + self._max_delay
                )
                delay = wake_at - loop.time()
                if delay <= 0:
                    break
                await asyncio.sleep(delay)
            self._pending_event.clear()
            pending, self._pending = self._pending, None
            if pending is not None:
                await self._commit(pending, self._first_pending_at)

    async def _commit(self, resources: ResourceSet, published_at: float) -> None:
        previous = self._current
        self._current = Generation(
            previous.number + 1, resources, changed_names(previous.resources, resources), published_at
        )
        for type_url in SERVED_TYPE_URLS:
            self._metrics.xds_resources.labels(type=type_label(type_url)).set(resources.count(type_url))
        for subscriber in self._subscribers:
            if subscriber.undelivered_since is None:
                subscriber.undelivered_since = published_at
            subscriber.wake.set()
        async with self._committed:
            self._committed.notify_all()

    # ------------------------------------------------------------------ queries

    def streams(self) -> list[StreamInfo]:
        return sorted(
            (
                StreamInfo(
                    node=s.identity.node_name,
                    subject=s.identity.subject,
                    peer=s.peer,
                    connected_at=s.connected_at,
                    generation=s.generation,
                    types=s.delta.subscribed_types,
                )
                for s in self._subscribers
            ),
            key=lambda i: (i.node, i.connected_at),
        )

    # ------------------------------------------------------------------ gRPC

    def method_handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.DeltaAggregatedResources,
                    request_deserializer=DeltaRequest.FromString,
                    response_serializer=DeltaResponse.SerializeToString,
                )
            },
        )

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[DeltaRequest], context: grpc.aio.ServicerContext
    ) -> None:
        peer = context.peer()
        try:
            if self._closing:
                raise StreamRefused(
                    grpc.StatusCode.UNAVAILABLE, "shutting-down", "controller is shutting down"
                )
            try:
                identity = await self._authenticator.authenticate(context.invocation_metadata() or ())
            except AuthenticationError as e:
                logger.warning(
                    "xDS stream refused",
                    extra={"fields": {"reason": e.reason, "detail": e.detail, "peer": peer}},
                )
                raise StreamRefused(grpc.StatusCode.UNAUTHENTICATED, e.reason, REFUSAL_MESSAGE) from e
        except StreamRefused as refused:
            self._metrics.xds_streams_refused.labels(reason=refused.reason).inc()
            await context.abort(refused.code, refused.message)
            return

        # Nothing is served before the first configuration is committed: generation 0 is empty, and a
        # node proxy that reconnects to a restarting controller would read it as "remove everything"
        # (its pods would then be treated as out of the mesh). The stream waits; its requests queue.
        if self._current.number < 1:
            await self.wait_for_generation(1)
        current = self._current
        scope = stream_scope(identity)
        subscriber = _Subscriber(
            identity=identity,
            scope=scope,
            peer=peer,
            delta=DeltaStream(
                scope.types,
                scope.view(current.resources.resources),
                max_response_bytes=self._max_response_bytes,
            ),
            generation=current.number,
        )
        reader = asyncio.create_task(self._read(request_iterator, subscriber), name=f"xds-read-{peer}")
        self._subscribers.add(subscriber)
        self._metrics.xds_connected.inc()
        logger.info(
            "xDS stream connected",
            extra={"fields": {"node": identity.node_name, "caller": identity.subject, "peer": peer}},
        )
        outcome = "closed by the node proxy"
        try:
            await self._serve(subscriber, context)
            if self._closing:
                outcome = "closed by controller shutdown"
        except StreamRefused as refused:
            outcome = f"refused: {refused.message}"
            self._metrics.xds_streams_refused.labels(reason=refused.reason).inc()
            logger.warning(
                "xDS stream refused",
                extra={
                    "fields": {
                        "reason": refused.reason,
                        "detail": refused.message,
                        "node": identity.node_name,
                    }
                },
            )
            await context.abort(refused.code, refused.message)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception:
            # A bug handling one stream ends that stream only; the node proxy reconnects.
            outcome = "internal error"
            logger.exception("xDS stream failed", extra={"fields": {"node": identity.node_name}})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._subscribers.discard(subscriber)
            self._metrics.xds_connected.dec()
            logger.info(
                "xDS stream ended",
                extra={
                    "fields": {
                        "node": identity.node_name,
                        "outcome": outcome,
                        "seconds": round(time.time() - subscriber.connected_at, 3),
                    }
                },
            )

    async def _read(self, requests: AsyncIterator[DeltaRequest], subscriber: _Subscriber) -> None:
        try:
            async for request in requests:
                await subscriber.inbox.put(request)
                subscriber.wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client went away mid-read: same as end of stream
            logger.debug(
                "xDS read ended", extra={"fields": {"node": subscriber.identity.node_name, "error": e}}
            )
        await subscriber.inbox.put(None)
        subscriber.wake.set()

    async def _serve(self, subscriber: _Subscriber, context: grpc.aio.ServicerContext) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await subscriber.wake.wait()
            subscriber.wake.clear()
            if self._closing:
                return
            responses: list[DeltaResponse] = []
            delivers_publication = False
            current = self._current
            if subscriber.generation != current.number:
                changed = current.changed if subscriber.generation == current.number - 1 else None
                responses += subscriber.delta.on_update(
                    subscriber.scope.view(current.resources.resources), changed
                )
                subscriber.generation = current.number
                delivers_publication = bool(responses)
                if not responses:
                    subscriber.undelivered_since = None
            while not subscriber.inbox.empty():
                request = subscriber.inbox.get_nowait()
                if request is None:
                    return
                responses += self._handle_request(subscriber, request)
            for response in responses:
                await context.write(response)
                self._metrics.xds_pushes.labels(type=type_label(response.type_url)).inc()
            if delivers_publication and subscriber.undelivered_since is not None:
                self._metrics.xds_push_latency.observe(loop.time() - subscriber.undelivered_since)
                subscriber.undelivered_since = None

    def _handle_request(self, subscriber: _Subscriber, request: DeltaRequest) -> list[DeltaResponse]:
        identity = subscriber.identity
        node = identity.node_name
        if request.HasField("node"):
            if identity.waypoint:
                claimed = requested_waypoint(request.node)
                if claimed != identity.waypoint:
                    raise StreamRefused(
                        grpc.StatusCode.PERMISSION_DENIED,
                        "waypoint-mismatch",
                        f"request is for waypoint {claimed!r}, the credential is for another waypoint",
                    )
            else:
                claimed = requested_node(request.node)
                if claimed != node:
                    raise StreamRefused(
                        grpc.StatusCode.PERMISSION_DENIED,
                        "node-mismatch",
                        f"request is for node {claimed!r}, the credential is for another node",
                    )
            subscriber.node_checked = True
        elif not subscriber.node_checked:
            raise StreamRefused(
                grpc.StatusCode.PERMISSION_DENIED, "missing-node", "the first request must carry the node"
            )
        self._check_scope(subscriber.scope, request)
        try:
            responses = subscriber.delta.on_request(request)
        except ProtocolError as e:
            raise StreamRefused(grpc.StatusCode.INVALID_ARGUMENT, "protocol-error", str(e)) from e
        for event in subscriber.delta.pop_events():
            fields: dict[str, object] = {"node": node, "type": type_label(event.type_url)}
            if isinstance(event, Nacked):
                self._metrics.xds_nacks.labels(type=type_label(event.type_url)).inc()
                fields.update(
                    nonce=event.nonce, code=event.code, error=event.message, resources=len(event.rejected)
                )
                logger.warning("xDS response rejected (NACK)", extra={"fields": fields})
            elif isinstance(event, Subscribed):
                fields.update(
                    wildcard=event.wildcard, names=len(event.names), initial_versions=event.initial_versions
                )
                logger.info("xDS subscription", extra={"fields": fields})
            elif isinstance(event, StaleNonce):
                logger.debug("xDS stale nonce", extra={"fields": {**fields, "nonce": event.nonce}})
            elif isinstance(event, Acked):
                logger.debug("xDS ACK", extra={"fields": {**fields, "nonce": event.nonce}})
        return responses

    @staticmethod
    def _check_scope(scope: StreamScope, request: DeltaRequest) -> None:
        type_url = request.type_url
        if type_url in SERVED_TYPE_URLS and type_url not in scope.types:
            raise StreamRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                "type-not-permitted",
                f"this caller may not subscribe to {type_url}",
            )
        allowed = scope.names.get(type_url)
        if allowed is not None:
            for name in request.resource_names_subscribe:
                if name != WILDCARD and name not in allowed:
                    raise StreamRefused(
                        grpc.StatusCode.PERMISSION_DENIED,
                        "name-not-permitted",
                        f"this caller may not subscribe to {type_url} {name!r}",
                    )
