"""The ZDS protocol (node agent <-> ztunnel, reference §4.3), sans-IO: codec and client state machine.

Theory of operation
-------------------
ztunnel connects to the node agent's unix SOCK_SEQPACKET socket and says hello. The agent then sends a
*snapshot*: one request per enrolled pod of the node -- `add` (with the pod's netns fd as SCM_RIGHTS
ancillary data) or `keep` (the agent has no fd for the pod, e.g. after its own restart, but ztunnel may
already be serving it) -- followed by `snapshot_sent`. From then on only `add` and `del` flow. Every
request gets exactly one `WorkloadResponse{ack{error}}`, with an empty error on success.

This module turns datagrams into *commands* and never does I/O; `ztunnel.inpod.client` executes them.
The state machine is the table `TRANSITIONS` below:

    CONNECTING --connected--> AWAITING_SNAPSHOT --snapshot_sent--> SNAPSHOT_DONE
    AWAITING_SNAPSHOT: add, keep, del          SNAPSHOT_DONE: add, del
    any state --disconnected--> CONNECTING

Any other (state, input) pair -- e.g. `keep` after the snapshot, a second `snapshot_sent`, a request
before hello -- moves the machine to ERROR and raises ProtocolError naming the state and the input; the
client acks the error and reconnects, and the fresh snapshot resynchronises both sides. A datagram that
does not decode, or carries the wrong number of fds for its kind, is an ERROR in the same way.

The snapshot decides what survives a reconnect: at `snapshot_sent` the machine emits `Reconcile` with
every uid that was added or kept during the snapshot, and the executor drains every other proxy. Proxies
themselves outlive connections (a node-agent restart must not cut pod traffic).

fd ownership: the machine passes received fds through in `StartProxy` and never closes them; the caller
owns them (and must close them when decoding fails, see `Received.fds`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, assert_never

from google.protobuf.message import DecodeError

from loom.api import zds_pb2

# The largest request ztunnel accepts (one datagram; Istio's ztunnel reads into 1024 bytes too). A larger
# datagram arrives truncated (MSG_TRUNC) and is rejected.
MAX_REQUEST_SIZE: Final = 1024
# Kubernetes UIDs are 36-character UUIDs; anything far longer is not a pod uid.
MAX_UID_LENGTH: Final = 253


class ProtocolError(Exception):
    """The agent sent something the protocol does not allow at this point (or that does not decode)."""

    def __init__(self, message: str, *, state: State | None = None, input: Input | None = None) -> None:
        super().__init__(message)
        self.state = state
        self.input = input


class State(enum.Enum):
    CONNECTING = "connecting"  # no connection, or connected but hello not sent yet
    AWAITING_SNAPSHOT = "awaiting_snapshot"  # hello sent; add/keep/del until snapshot_sent
    SNAPSHOT_DONE = "snapshot_done"  # steady state: add/del
    ERROR = "error"  # protocol violation; only disconnecting leaves it


class Input(enum.Enum):
    CONNECTED = "connected"
    ADD = "add"
    KEEP = "keep"
    DEL = "del"
    SNAPSHOT_SENT = "snapshot_sent"
    DISCONNECTED = "disconnected"


TRANSITIONS: Final[dict[tuple[State, Input], State]] = {
    (State.CONNECTING, Input.CONNECTED): State.AWAITING_SNAPSHOT,
    (State.AWAITING_SNAPSHOT, Input.ADD): State.AWAITING_SNAPSHOT,
    (State.AWAITING_SNAPSHOT, Input.KEEP): State.AWAITING_SNAPSHOT,
    # The agent sends deletes to every connection, so one can arrive while our snapshot is under way.
    (State.AWAITING_SNAPSHOT, Input.DEL): State.AWAITING_SNAPSHOT,
    (State.AWAITING_SNAPSHOT, Input.SNAPSHOT_SENT): State.SNAPSHOT_DONE,
    (State.SNAPSHOT_DONE, Input.ADD): State.SNAPSHOT_DONE,
    (State.SNAPSHOT_DONE, Input.DEL): State.SNAPSHOT_DONE,
    **{(state, Input.DISCONNECTED): State.CONNECTING for state in State},
}


# -- requests (decoded datagrams) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """Who the pod is, as the agent tells it (used for logs and metrics before xDS knows the pod)."""

    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class AddWorkload:
    uid: str
    info: WorkloadInfo
    netns_fd: int  # received with the request; owned by whoever executes the StartProxy


@dataclass(frozen=True, slots=True)
class KeepWorkload:
    uid: str


@dataclass(frozen=True, slots=True)
class DelWorkload:
    uid: str


@dataclass(frozen=True, slots=True)
class SnapshotSent:
    pass


Request = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent

_INPUT_OF: Final[dict[type, Input]] = {
    AddWorkload: Input.ADD,
    KeepWorkload: Input.KEEP,
    DelWorkload: Input.DEL,
    SnapshotSent: Input.SNAPSHOT_SENT,
}


# -- commands -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendHello:
    """Send ZdsHello{V1}: the first datagram on every connection."""


@dataclass(frozen=True, slots=True)
class StartProxy:
    """Serve this pod from its namespace (idempotent per uid and namespace inode; see the client)."""

    uid: str
    info: WorkloadInfo
    netns_fd: int


@dataclass(frozen=True, slots=True)
class KeepProxy:
    """The pod is still enrolled: keep its proxy through the coming reconcile."""

    uid: str


@dataclass(frozen=True, slots=True)
class StopProxy:
    """Tear the pod's proxy down; `drain` lets open connections finish (False: the pod is gone)."""

    uid: str
    drain: bool


@dataclass(frozen=True, slots=True)
class Reconcile:
    """The snapshot is complete: drain every proxy whose uid is not in `keep`."""

    keep: frozenset[str]


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer the request. `error` is a protocol-level error; when empty, the executor reports the failure
    of the commands before it (if any) instead."""

    error: str = ""


Command = SendHello | StartProxy | KeepProxy | StopProxy | Reconcile | Ack


# -- codec ----------------------------------------------------------------------------------------------


def encode_hello() -> bytes:
    return zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString()


def decode_hello(datagram: bytes) -> int:
    """The version a client announced; raises ProtocolError when it is not a hello."""
    try:
        hello = zds_pb2.ZdsHello.FromString(datagram)
    except DecodeError as err:
        raise ProtocolError(f"hello does not decode: {err}") from None
    return int(hello.version)


def encode_ack(error: str = "") -> bytes:
    return zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=error)).SerializeToString()


def decode_ack(datagram: bytes) -> str:
    """The error of an ack ("" = success); raises ProtocolError when the response is not an ack."""
    try:
        response = zds_pb2.WorkloadResponse.FromString(datagram)
    except DecodeError as err:
        raise ProtocolError(f"response does not decode: {err}") from None
    if response.WhichOneof("payload") != "ack":
        raise ProtocolError("response carries no ack")
    return str(response.ack.error)


def encode_request(request: Request) -> bytes:
    """The datagram for a request (the agent side; an AddWorkload's fd travels separately)."""
    message = zds_pb2.WorkloadRequest()
    match request:
        case AddWorkload(uid=uid, info=info):
            message.add.uid = uid
            message.add.workload_info.name = info.name
            message.add.workload_info.namespace = info.namespace
            message.add.workload_info.service_account = info.service_account
        case KeepWorkload(uid=uid):
            message.keep.uid = uid
        case DelWorkload(uid=uid):
            getattr(message, "del").uid = uid  # `del` is a Python keyword
        case SnapshotSent():
            message.snapshot_sent.SetInParent()
    return message.SerializeToString()


def _check_uid(uid: str, kind: str) -> str:
    if not uid:
        raise ProtocolError(f"{kind} request has an empty uid")
    if len(uid) > MAX_UID_LENGTH or not uid.isprintable():
        raise ProtocolError(f"{kind} request has an invalid uid {uid[:64]!r}")
    return uid


def decode_request(datagram: bytes, fds: Sequence[int]) -> Request:
    """Decode one request datagram with the fds that came with it (exactly one for add, none otherwise).

    Does not close fds; on ProtocolError the caller closes every fd it received."""
    try:
        message = zds_pb2.WorkloadRequest.FromString(datagram)
    except DecodeError as err:
        raise ProtocolError(f"request does not decode: {err}") from None
    kind = message.WhichOneof("payload")
    if kind is None:
        raise ProtocolError("request carries no payload (add, keep, del or snapshot_sent)")
    expected_fds = 1 if kind == "add" else 0
    if len(fds) != expected_fds:
        raise ProtocolError(f"{kind} request came with {len(fds)} file descriptors, expected {expected_fds}")
    if kind == "add":
        info = message.add.workload_info
        return AddWorkload(
            uid=_check_uid(message.add.uid, kind),
            info=WorkloadInfo(info.name, info.namespace, info.service_account),
            netns_fd=fds[0],
        )
    if kind == "keep":
        return KeepWorkload(_check_uid(message.keep.uid, kind))
    if kind == "del":
        return DelWorkload(_check_uid(getattr(message, "del").uid, kind))
    return SnapshotSent()


# -- state machine --------------------------------------------------------------------------------------


@dataclass
class ZdsClientProtocol:
    """ztunnel's side of the protocol, across reconnects: feed it events, execute what it returns."""

    state: State = State.CONNECTING
    # uids added or kept during the snapshot in progress
    _snapshot: set[str] = field(default_factory=set)

    def _advance(self, event: Input) -> None:
        next_state = TRANSITIONS.get((self.state, event))
        if next_state is None:
            previous, self.state = self.state, State.ERROR
            raise ProtocolError(
                f"unexpected {event.value} in state {previous.value}", state=previous, input=event
            )
        self.state = next_state

    def connected(self) -> list[Command]:
        self._advance(Input.CONNECTED)
        self._snapshot.clear()
        return [SendHello()]

    def disconnected(self) -> list[Command]:
        self._advance(Input.DISCONNECTED)
        self._snapshot.clear()
        return []

    def receive(self, datagram: bytes, fds: Sequence[int]) -> list[Command]:
        """Decode a datagram and handle it; a bad datagram moves to ERROR like a bad transition."""
        try:
            request = decode_request(datagram, fds)
        except ProtocolError:
            self.state = State.ERROR
            raise
        return self.handle(request)

    def handle(self, request: Request) -> list[Command]:
        self._advance(_INPUT_OF[type(request)])
        awaiting = self.state is State.AWAITING_SNAPSHOT
        match request:
            case AddWorkload(uid=uid, info=info, netns_fd=fd):
                if awaiting:
                    self._snapshot.add(uid)
                return [StartProxy(uid, info, fd), Ack()]
            case KeepWorkload(uid=uid):
                self._snapshot.add(uid)
                return [KeepProxy(uid), Ack()]
            case DelWorkload(uid=uid):
                self._snapshot.discard(uid)
                # The pod's containers are gone: nothing is left to drain (reference §4.4).
                return [StopProxy(uid, drain=False), Ack()]
            case SnapshotSent():
                keep = frozenset(self._snapshot)
                self._snapshot.clear()
                return [Reconcile(keep), Ack()]
            case _:
                assert_never(request)
