"""The server side of one delta xDS stream, as a sans-IO state machine (no gRPC, no asyncio, no clock).

Theory of operation
-------------------
`DeltaStream` is the server's view of one subscriber (one node proxy). The gRPC layer feeds it two kinds
of input and writes whatever responses it returns, in order:

* `on_request(request)`: a `DeltaDiscoveryRequest` read from the stream;
* `on_update(resources, changed)`: the server's complete current state, every time it changes.

Per type URL the machine keeps:

* the subscription: wildcard (everything of the type) and/or explicit names. The first request of a
  type with neither names to subscribe nor to unsubscribe is a wildcard subscription (Envoy's "legacy
  wildcard", what Istio's ztunnel sends by default); "*" subscribes/unsubscribes the wildcard
  explicitly, so subscribing and unsubscribing "*" in the first request means "nothing yet" (on-demand).
* `client`: name -> version the client holds, as far as the server knows. It starts from the first
  request's `initial_resource_versions` (a reconnecting client's cache) and is updated by every
  response the moment it is produced. A diff against it gives exactly the resources whose version
  differs and the names to remove (held by the client, no longer existing).
* `pending`: nonce -> what that response carried, until the client ACKs or NACKs it.
* `rejected`: name -> version the client NACKed. That version is not offered again; a later,
  different version is. Other resources of a NACKed response stay applied on the client (ztunnel
  rejects resources one by one), so a NACK does not roll back anything else.

Flow control: responses are produced immediately, several may be in flight per type (pipelining, as
Envoy and Istio allow). This keeps pushes fast for healthy clients; a client that is slow to read is
handled one layer up, where the gRPC layer coalesces states (it calls `on_update` with the latest state
only, and the diff against `client` covers everything that happened in between). Pending nonces are
bounded: an ACK or NACK of nonce N settles every older nonce of that type, and at most
`max_pending_per_type` are remembered.

Nonces: an ACK/NACK whose `response_nonce` is not pending for that type (stale, unknown, or from
another type) is ignored (reported as `StaleNonce`); subscription changes in the same request are still
applied, since they do not depend on which response the client last saw. `initial_resource_versions`
is only read on the first request of a type.

Every first request of a type is answered, even with an empty response: a node proxy's readiness waits
for the first response of each type. Explicitly subscribed names are always answered too: with the
resource, or, if it does not exist, with the name in `removed_resources` (how on-demand lookups learn
that an address is unknown).

Large responses are split so that no response carries more than `max_response_bytes` of resources
(each response still holds at least one resource); removals go in the first one.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from controller.xds.resources import ResourcesByType, VersionedResource
from loom.api import discovery_pb2

WILDCARD = "*"
# A gRPC client's default receive limit is 4 MiB; stay well under it including per-resource framing.
DEFAULT_MAX_RESPONSE_BYTES = 2 * 1024 * 1024
# A healthy client ACKs every response within milliseconds; more than this in flight for one type
# means the client has stopped ACKing, and older entries are forgotten (their ACK becomes "stale").
DEFAULT_MAX_PENDING_PER_TYPE = 64


class ProtocolError(Exception):
    """The client sent a request that breaks the delta protocol; the stream must be closed."""


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The first request of a type arrived."""

    type_url: str
    wildcard: bool
    names: frozenset[str]  # explicit subscriptions
    initial_versions: int  # how many resources the client said it already holds


@dataclass(frozen=True, slots=True)
class Acked:
    type_url: str
    nonce: str


@dataclass(frozen=True, slots=True)
class Nacked:
    type_url: str
    nonce: str
    code: int
    message: str
    # name -> version carried by the NACKed response; none of these versions is offered again.
    rejected: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class StaleNonce:
    """An ACK/NACK for a response that is not pending (already settled, forgotten, or never sent)."""

    type_url: str
    nonce: str
    was_nack: bool


StreamEvent = Subscribed | Acked | Nacked | StaleNonce


@dataclass(slots=True)
class _Sent:
    """What one response carried, remembered until ACKed or NACKed."""

    versions: dict[str, str]
    removed: tuple[str, ...]


@dataclass(slots=True)
class _TypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    client: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    # Explicitly subscribed names that still owe the client an answer.
    unanswered: set[str] = field(default_factory=set)
    pending: OrderedDict[str, _Sent] = field(default_factory=OrderedDict)

    def interested(self, name: str) -> bool:
        return self.wildcard or name in self.names


@dataclass(frozen=True, slots=True)
class TypeStatus:
    """A read-only view of one type's subscription, for debugging and metrics."""

    wildcard: bool
    names: frozenset[str]
    client_versions: Mapping[str, str]
    rejected: Mapping[str, str]
    unacked_nonces: tuple[str, ...]


class DeltaStream:
    """Server-side delta xDS state of one subscriber. Not thread-safe; one owner drives it."""

    def __init__(
        self,
        served_types: Collection[str],
        resources: ResourcesByType | None = None,
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_pending_per_type: int = DEFAULT_MAX_PENDING_PER_TYPE,
    ) -> None:
        if max_response_bytes <= 0 or max_pending_per_type <= 0:
            raise ValueError("max_response_bytes and max_pending_per_type must be positive")
        self._served = tuple(served_types)
        self._resources: ResourcesByType = resources or {}
        self._types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)
        self._max_bytes = max_response_bytes
        self._max_pending = max_pending_per_type
        self._events: list[StreamEvent] = []

    # ------------------------------------------------------------------ inputs

    def on_request(
        self, request: discovery_pb2.DeltaDiscoveryRequest
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        type_url = request.type_url
        if not type_url:
            raise ProtocolError("request without type_url (aggregated discovery needs one per request)")
        if type_url not in self._served:
            raise ProtocolError(f"type {type_url!r} is not served (served: {', '.join(self._served)})")
        state = self._types.get(type_url)
        first = state is None
        if state is None:
            state = _TypeState()
            self._types[type_url] = state
        elif request.response_nonce:
            self._settle(type_url, state, request)

        subscribe = list(request.resource_names_subscribe)
        unsubscribe = list(request.resource_names_unsubscribe)
        if first and not subscribe and not unsubscribe:
            state.wildcard = True
        self._apply_subscription(state, subscribe, unsubscribe)

        if first:
            if request.response_nonce:
                # A first request cannot acknowledge anything of this stream.
                self._events.append(
                    StaleNonce(type_url, request.response_nonce, request.HasField("error_detail"))
                )
            state.client = {
                name: version
                for name, version in request.initial_resource_versions.items()
                if state.interested(name)
            }
            # Names the client announced it holds are answered only if their version differs.
            state.unanswered -= state.client.keys()
            self._events.append(
                Subscribed(type_url, state.wildcard, frozenset(state.names), len(state.client))
            )
            return self._respond(type_url, state, None, always=True)
        candidates: set[str] | None = None
        if not (WILDCARD in subscribe and state.wildcard):
            # Only the names this request touched can have changed their answer.
            candidates = {n for n in subscribe if n != WILDCARD}
        return self._respond(type_url, state, candidates, always=False)

    def on_update(
        self, resources: ResourcesByType, changed: Mapping[str, Collection[str]] | None = None
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        """Take the server's new complete state; answer with what each subscribed type is missing.

        `changed`, when given, must list per type every name whose version differs between the state
        previously given to this stream and `resources`; only those are compared. Pass None after a
        gap (coalesced states) to compare everything.
        """
        self._resources = resources
        responses: list[discovery_pb2.DeltaDiscoveryResponse] = []
        for type_url in self._served:
            state = self._types.get(type_url)
            if state is None:
                continue  # the client has not asked for this type: never send it anything
            candidates = None if changed is None else set(changed.get(type_url, ()))
            if candidates is not None and not candidates:
                continue
            responses.extend(self._respond(type_url, state, candidates, always=False))
        return responses

    def pop_events(self) -> list[StreamEvent]:
        """Events since the last call (subscriptions, ACKs, NACKs, stale nonces), oldest first."""
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ queries

    @property
    def subscribed_types(self) -> tuple[str, ...]:
        return tuple(t for t in self._served if t in self._types)

    def status(self, type_url: str) -> TypeStatus | None:
        state = self._types.get(type_url)
        if state is None:
            return None
        return TypeStatus(
            wildcard=state.wildcard,
            names=frozenset(state.names),
            client_versions=dict(state.client),
            rejected=dict(state.rejected),
            unacked_nonces=tuple(state.pending),
        )

    # ------------------------------------------------------------------ internals

    def _settle(self, type_url: str, state: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        nonce = request.response_nonce
        is_nack = request.HasField("error_detail")
        sent = state.pending.get(nonce)
        if sent is None:
            self._events.append(StaleNonce(type_url, nonce, is_nack))
            return
        # Responses are processed in order by the client, so older pending ones are settled too.
        while state.pending.popitem(last=False)[0] != nonce:
            pass
        if is_nack:
            for name, version in sent.versions.items():
                state.rejected[name] = version
            self._events.append(
                Nacked(
                    type_url,
                    nonce,
                    request.error_detail.code,
                    request.error_detail.message,
                    dict(sent.versions),
                )
            )
        else:
            self._events.append(Acked(type_url, nonce))

    @staticmethod
    def _apply_subscription(state: _TypeState, subscribe: Iterable[str], unsubscribe: Iterable[str]) -> None:
        # Subscribe before unsubscribe, so that {+*, -*} in one request is "subscribed to nothing".
        for name in subscribe:
            if name == WILDCARD:
                state.wildcard = True
            else:
                state.names.add(name)
                state.unanswered.add(name)
        for name in unsubscribe:
            if name == WILDCARD:
                state.wildcard = False
            else:
                state.names.discard(name)
                state.unanswered.discard(name)
        # The client drops what it is no longer subscribed to; no removal is owed for those.
        for name in [n for n in state.client if not state.interested(n)]:
            del state.client[name]
            state.rejected.pop(name, None)

    def _respond(
        self, type_url: str, state: _TypeState, candidates: set[str] | None, *, always: bool
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        current = self._resources.get(type_url, {})
        if candidates is None:
            names: Iterable[str] = set(current) | set(state.client) | state.unanswered
        else:
            names = candidates
        to_send: list[tuple[str, VersionedResource]] = []
        removed: list[str] = []
        for name in sorted(names):
            resource = current.get(name)
            owed = name in state.unanswered
            if resource is not None and state.interested(name):
                if not owed and resource.version in (state.client.get(name), state.rejected.get(name)):
                    continue
                to_send.append((name, resource))
            elif name in state.client or owed:
                removed.append(name)
            state.unanswered.discard(name)
        if not to_send and not removed and not always:
            return []
        return self._build(type_url, state, to_send, removed)

    def _build(
        self,
        type_url: str,
        state: _TypeState,
        to_send: list[tuple[str, VersionedResource]],
        removed: list[str],
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        chunks: list[list[tuple[str, VersionedResource]]] = [[]]
        size = 0
        for item in to_send:
            if chunks[-1] and size + item[1].size > self._max_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += item[1].size
        responses = []
        for index, chunk in enumerate(chunks):
            nonce = format(next(self._nonces), "x")
            chunk_removed = removed if index == 0 else []
            response = discovery_pb2.DeltaDiscoveryResponse(
                type_url=type_url, nonce=nonce, removed_resources=chunk_removed
            )
            # Built in place from the stored bytes: no intermediate Resource/Any messages to copy
            # (upb copies a message given to a constructor), and nothing outlives the response.
            add = response.resources.add
            for name, r in chunk:
                body = add(name=name, version=r.version).resource
                body.type_url = type_url
                body.value = r.serialized
            for name, r in chunk:
                state.client[name] = r.version
                state.rejected.pop(name, None)
            for name in chunk_removed:
                state.client.pop(name, None)
                state.rejected.pop(name, None)
            state.pending[nonce] = _Sent({name: r.version for name, r in chunk}, tuple(chunk_removed))
            while len(state.pending) > self._max_pending:
                state.pending.popitem(last=False)
            responses.append(response)
        return responses
