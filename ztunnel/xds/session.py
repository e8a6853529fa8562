"""The node proxy's side of delta xDS, sans-IO: what to send on connect, how to apply a response.

Theory of operation
-------------------
`XdsSession` outlives connections. It knows the resources the proxy holds (name -> version, per
type), which is what a reconnecting proxy announces in `initial_resource_versions` so the controller
sends only what changed and the names to remove. The asyncio client (`ztunnel.xds.client`) only
moves messages:

    on connect:     for request in session.connect(): write(request)
    on a response:  outcome = session.on_response(response); write(outcome.reply)

Subscriptions: wildcard (no names) for both types, Authorization first and then Address. The order
matters: the controller answers in request order, and policies must be in place before the
workloads that list them, otherwise a workload would briefly deny everything for a "missing" policy.
Only the first request of a stream carries the Node.

Applying a response: every resource is decoded from its `Any` (the Any's type must be the response's
type); resources that fail to decode or validate are rejected by name, the rest are applied to the
`ProxyState` as one batch (watchers then see the whole response at once), and the reply is an ACK,
or a NACK whose `error_detail` names every rejected resource and why. A NACK does not roll back
anything: the controller does not offer a NACKed version again, and the other resources stay applied.

What is "held" (and announced on reconnect): for Address, the versions actually in the state (a
rejected update leaves the previous version held, so the controller re-offers the new one after a
reconnect); for Authorization, every version the state acts on, including rejected ones, which the
state keeps as deny-all stand-ins.

Readiness: `ready` once a response of every subscribed type has arrived (even an empty one); it
stays true across reconnects, since the last known state keeps being served.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from loom.api import authorization_pb2, discovery_pb2, workload_pb2
from ztunnel.state import ProxyState

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"
# Policies before the workloads that list them (see the module docstring).
SUBSCRIPTION_ORDER = (AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL)
# google.rpc.Code INVALID_ARGUMENT, what Envoy and ztunnel put in a NACK.
NACK_CODE = 3
# A NACK names every rejected resource, but a response of thousands of bad resources must not make
# an unbounded request; the message is cut here (the count is always given).
MAX_ERROR_DETAIL_CHARS = 8192
DEFAULT_CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Who this proxy is, as announced in the xDS Node (Istio's ztunnel node id format).

    `proxy_type` is the node id's first field (istiod tells node types apart by it) and
    `extra_metadata` adds Node.metadata fields: a waypoint announces itself with "waypoint" and its
    Gateway's name (waypoint.xds)."""

    node_name: str  # the Kubernetes node it serves (metadata NODE_NAME; the controller checks it)
    pod_name: str = "ztunnel"
    pod_namespace: str = "istio-system"
    instance_ip: str = ""
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    proxy_type: str = "ztunnel"
    extra_metadata: tuple[tuple[str, str], ...] = ()

    @property
    def node_id(self) -> str:
        ns = self.pod_namespace
        return f"{self.proxy_type}~{self.instance_ip}~{self.pod_name}.{ns}~{ns}.svc.{self.cluster_domain}"

    def to_proto(self) -> discovery_pb2.Node:
        metadata = struct_pb2.Struct()
        metadata.update(
            {
                "NODE_NAME": self.node_name,
                "NAME": self.pod_name,
                "NAMESPACE": self.pod_namespace,
                "INSTANCE_IPS": self.instance_ip,
                **dict(self.extra_metadata),
            }
        )
        return discovery_pb2.Node(id=self.node_id, metadata=metadata)


@dataclass(frozen=True, slots=True)
class ResponseOutcome:
    """What applying one response did, and the ACK/NACK to send for it."""

    type_url: str
    reply: discovery_pb2.DeltaDiscoveryRequest
    applied: int  # resources accepted
    removed: int  # names in removed_resources
    rejected: Mapping[str, str] = field(default_factory=dict)  # name -> reason
    first: bool = False  # the first response of this type in this session

    @property
    def nacked(self) -> bool:
        return bool(self.rejected)


def _reply(type_url: str, nonce: str, rejected: Mapping[str, str]) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce)
    if rejected:
        listed = "; ".join(f"{name}: {reason}" for name, reason in sorted(rejected.items()))
        message = f"rejected {len(rejected)} resource(s): {listed}"
        if len(message) > MAX_ERROR_DETAIL_CHARS:
            message = message[: MAX_ERROR_DETAIL_CHARS - 3] + "..."
        request.error_detail.code = NACK_CODE
        request.error_detail.message = message
    return request


M = TypeVar("M", workload_pb2.Address, authorization_pb2.Authorization)


def _decode_all(
    response: discovery_pb2.DeltaDiscoveryResponse, message_type: type[M]
) -> tuple[dict[str, tuple[str, M]], dict[str, str], dict[str, str]]:
    """(name -> (version, message), name -> why it cannot be decoded, unnamed resources -> why)."""
    decoded: dict[str, tuple[str, M]] = {}
    undecodable: dict[str, str] = {}
    unnamed: dict[str, str] = {}
    expected = response.type_url
    for i, resource in enumerate(response.resources):
        name = resource.name
        if not name:
            unnamed[f"(resource #{i})"] = "a resource without a name cannot be tracked"
            continue
        # A name repeated in one response: the last occurrence wins, as if sent in two responses.
        decoded.pop(name, None)
        undecodable.pop(name, None)
        body = resource.resource
        if body.type_url != expected:
            undecodable[name] = f"carries {body.type_url or 'no type'}, expected {expected}"
            continue
        try:
            message = message_type.FromString(body.value)
        except DecodeError as e:
            undecodable[name] = f"cannot be decoded: {e}"
            continue
        decoded[name] = (resource.version, message)
    return decoded, undecodable, unnamed


class XdsSession:
    """Delta xDS client state across connections (see the module docstring). Not thread-safe."""

    def __init__(
        self, state: ProxyState, node: NodeInfo, *, subscriptions: tuple[str, ...] = SUBSCRIPTION_ORDER
    ) -> None:
        """`subscriptions`: the types to subscribe to, in order. A type other than Address and
        Authorization needs a subclass that applies it (`_apply_other`)."""
        self._state = state
        self._node = node
        self._subscriptions = subscriptions
        self._held: dict[str, dict[str, str]] = {t: {} for t in subscriptions}
        self._answered: set[str] = set()

    @property
    def node(self) -> NodeInfo:
        return self._node

    @property
    def ready(self) -> bool:
        """A response of every subscribed type has been applied (in this session, ever)."""
        return self._answered.issuperset(self._subscriptions)

    def held(self, type_url: str) -> Mapping[str, str]:
        """name -> version of what the proxy holds of `type_url`."""
        return dict(self._held.get(type_url, {}))

    def connect(self) -> list[discovery_pb2.DeltaDiscoveryRequest]:
        """The requests that open a new stream, in order."""
        requests: list[discovery_pb2.DeltaDiscoveryRequest] = []
        for type_url in self._subscriptions:
            request = discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, initial_resource_versions=self._held[type_url]
            )
            if not requests:
                request.node.CopyFrom(self._node.to_proto())
            requests.append(request)
        return requests

    def on_response(self, response: discovery_pb2.DeltaDiscoveryResponse) -> ResponseOutcome:
        """Apply `response` to the state; returns the reply (ACK or NACK) to send."""
        type_url = response.type_url
        held = self._held.get(type_url)
        if held is None:
            names = {
                r.name or "(unnamed)": f"type {type_url!r} is not subscribed" for r in response.resources
            }
            rejected = names or {"(response)": f"type {type_url!r} is not subscribed"}
            return ResponseOutcome(type_url, _reply(type_url, response.nonce, rejected), 0, 0, rejected)
        if type_url == ADDRESS_TYPE_URL:
            applied, rejected = self._apply_addresses(response, held)
        elif type_url == AUTHORIZATION_TYPE_URL:
            applied, rejected = self._apply_authorizations(response, held)
        else:
            applied, rejected = self._apply_other(response, held)
        first = type_url not in self._answered
        self._answered.add(type_url)
        return ResponseOutcome(
            type_url,
            _reply(type_url, response.nonce, rejected),
            applied,
            len(response.removed_resources),
            rejected,
            first,
        )

    # ------------------------------------------------------------------ per type

    def _apply_addresses(
        self, response: discovery_pb2.DeltaDiscoveryResponse, held: dict[str, str]
    ) -> tuple[int, dict[str, str]]:
        decoded, undecodable, unnamed = _decode_all(response, workload_pb2.Address)
        removals = list(response.removed_resources)
        # An Address that cannot be decoded has no usable content: the previous version (if any) stays.
        rejected = {**unnamed, **undecodable}
        rejected.update(
            self._state.apply_addresses({name: message for name, (_, message) in decoded.items()}, removals)
        )
        for name in removals:
            held.pop(name, None)
        for name, (version, _) in decoded.items():
            if name not in rejected:
                held[name] = version
        return len(decoded) - len(rejected.keys() & decoded.keys()), rejected

    def _apply_other(
        self, response: discovery_pb2.DeltaDiscoveryResponse, held: dict[str, str]
    ) -> tuple[int, dict[str, str]]:
        """Apply a subscribed type this class does not know: (resources applied, name -> why rejected).
        Subclasses that subscribe to more types override it; here everything is rejected."""
        reason = f"no handler for type {response.type_url!r}"
        return 0, {r.name or f"(resource #{i})": reason for i, r in enumerate(response.resources)}

    def _apply_authorizations(
        self, response: discovery_pb2.DeltaDiscoveryResponse, held: dict[str, str]
    ) -> tuple[int, dict[str, str]]:
        decoded, undecodable, unnamed = _decode_all(response, authorization_pb2.Authorization)
        removals = list(response.removed_resources)
        rejected = self._state.apply_authorizations(
            {name: message for name, (_, message) in decoded.items()}, removals, undecodable
        )
        rejected.update(unnamed)
        for name in removals:
            held.pop(name, None)
        versions = {r.name: r.version for r in response.resources if r.name}
        for name in (*decoded, *undecodable):
            # The state acts on every one of these, rejected ones as deny-all stand-ins.
            held[name] = versions[name]
        return len(decoded) - len(rejected.keys() & decoded.keys()), rejected
