"""The CNI plugin -> node agent messages ("plugin events") and their unix-socket transport.

Theory of operation
-------------------
The `loom-cni` plugin is a short-lived process the container runtime runs while it builds a pod sandbox.
It does not know the pod's labels or the mesh configuration; the node agent (`loom-cni-agent`) does. So
for every ADD, CHECK and DEL the plugin asks the agent over a unix stream socket (by default
`/var/run/loom-cni/pluginevent.sock`), and the agent answers once it has acted:

* ``add``: the agent decides whether the pod is enrolled. If it is, the agent enters the pod's netns,
  installs the redirection rules, hands the pod to ztunnel, and only then answers ``enrolled``; otherwise
  it answers ``not-enrolled``. The plugin lets the sandbox come up only after one of those two answers,
  which is what guarantees that no container of an enrolled pod runs uncaptured.
* ``check``: ``enrolled`` (redirection in place) or ``not-enrolled`` (the pod is not meant to be
  enrolled) are both healthy; ``error`` means the pod should be captured and is not.
* ``del``: the agent forgets the pod and removes what it installed; it answers ``done``.
* ``status`` (CNI 1.1 STATUS): ``done`` when the agent is ready to serve ADDs.
* ``gc`` (CNI 1.1 GC): the runtime's list of attachments that are still valid; the agent may drop every
  pod it tracks that is not in it, and answers ``done``.

Any request may be answered with ``error``, with a message for the person reading the kubelet's events and
a ``retry`` flag: ``true`` when the condition is transient (ztunnel not connected yet, agent still
syncing) so the plugin reports CNI code 11 "try again later", ``false`` when retrying cannot help.

Wire format (version 1)
-----------------------
Newline-delimited JSON, one exchange per connection: the plugin connects, writes one request object
followed by ``\\n``, the agent writes one reply object followed by ``\\n`` and closes. UTF-8, at most
`MAX_MESSAGE_BYTES` per line. Chosen over HTTP because a single request/reply needs no methods, headers
or status codes, both ends stay in the standard library, and `socat - UNIX-CONNECT:...` is enough to talk
to an agent by hand::

    {"v": 1, "kind": "add", "pod": {"namespace": "default", "name": "reviews-v1-5b7c", "uid": "8e0f...",
     "containerId": "4f1c...", "netns": "/var/run/netns/cni-1234", "ifname": "eth0",
     "ips": ["10.244.1.7"]}}
    {"v": 1, "outcome": "enrolled", "message": "", "retry": false}

    {"v": 1, "kind": "gc", "validAttachments": [{"containerId": "4f1c...", "ifname": "eth0"}]}
    {"v": 1, "kind": "status"}

Unknown keys are ignored (so either side can add optional fields without a version bump); a missing or
mistyped known key is an `EventDecodeError` naming the key.

This module holds the sans-IO codec (`encode_*`/`decode_*`), the blocking client the plugin uses
(`call_agent`, bounded by one overall deadline) and the asyncio server the node agent runs
(`serve_plugin_events`), which does the framing and decoding and hands typed requests to a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

logger = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
# A GC request lists every attachment on the node; 1 MiB holds ~10 000 of them, far beyond a node's pods.
MAX_MESSAGE_BYTES: Final = 1 << 20
# Linux sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES: Final = 107
# How long the server waits for a connected plugin to send its request line; the plugin writes it at once.
DEFAULT_SERVER_READ_TIMEOUT: Final = 5.0
DEFAULT_SERVER_WRITE_TIMEOUT: Final = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EventDecodeError(ValueError):
    """A message on the plugin-event socket is not valid; the text names the offending key."""


class RequestKind(enum.StrEnum):
    ADD = "add"
    DEL = "del"
    CHECK = "check"
    STATUS = "status"
    GC = "gc"


# Kinds that concern one pod attachment and therefore carry a `pod`.
POD_REQUEST_KINDS: Final = frozenset({RequestKind.ADD, RequestKind.DEL, RequestKind.CHECK})


class Outcome(enum.StrEnum):
    ENROLLED = "enrolled"
    """ADD/CHECK: the pod is enrolled and its redirection is in place."""
    NOT_ENROLLED = "not-enrolled"
    """ADD/CHECK: the pod is not meant to be enrolled; nothing was (or needs to be) installed."""
    DONE = "done"
    """DEL/STATUS/GC: the request was carried out."""
    ERROR = "error"
    """The request failed; `AgentReply.message` says why and `retry` whether trying again can help."""


@dataclass(frozen=True, slots=True)
class PodAttachment:
    """One pod sandbox's attachment to the network, as the runtime described it to the plugin."""

    namespace: str
    """Kubernetes namespace (CNI_ARGS K8S_POD_NAMESPACE)."""
    name: str
    """Pod name (CNI_ARGS K8S_POD_NAME)."""
    uid: str
    """Pod UID (CNI_ARGS K8S_POD_UID); empty when the runtime did not send it."""
    container_id: str
    """The sandbox's container ID (CNI_CONTAINERID): the key the runtime uses for this attachment."""
    netns: str
    """Path of the sandbox's network namespace (CNI_NETNS); may be empty on DEL."""
    ifname: str
    """Interface name inside the sandbox (CNI_IFNAME)."""
    ips: tuple[IPAddress, ...] = ()
    """The pod's addresses from the primary plugin's result (prevResult); may be empty on DEL."""


@dataclass(frozen=True, slots=True)
class Attachment:
    """A (container ID, interface) pair the runtime still considers valid (CNI 1.1 GC)."""

    container_id: str
    ifname: str


@dataclass(frozen=True, slots=True)
class AgentRequest:
    """One plugin -> agent request."""

    kind: RequestKind
    pod: PodAttachment | None = None
    """Set exactly for add, del and check."""
    valid_attachments: tuple[Attachment, ...] = ()
    """Only for gc: every attachment the runtime still has on this node's networks."""

    def __post_init__(self) -> None:
        if (self.kind in POD_REQUEST_KINDS) != (self.pod is not None):
            need = "needs" if self.kind in POD_REQUEST_KINDS else "must not carry"
            raise ValueError(f"a {self.kind.value!r} request {need} a pod")
        if self.valid_attachments and self.kind is not RequestKind.GC:
            raise ValueError(f"a {self.kind.value!r} request must not carry validAttachments")


@dataclass(frozen=True, slots=True)
class AgentReply:
    """The agent's one answer to a request."""

    outcome: Outcome
    message: str = ""
    """For a person: why the request failed, or what was done."""
    retry: bool = False
    """Only meaningful for ERROR: the condition is transient and the runtime should try again."""


# ---------------------------------------------------------------------------------------------------------
# Codec (sans-IO)
# ---------------------------------------------------------------------------------------------------------


def _line(obj: Mapping[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"plugin event of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return data


def encode_request(request: AgentRequest) -> bytes:
    """The request as one newline-terminated JSON line."""
    obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": request.kind.value}
    if request.pod is not None:
        pod = request.pod
        obj["pod"] = {
            "namespace": pod.namespace,
            "name": pod.name,
            "uid": pod.uid,
            "containerId": pod.container_id,
            "netns": pod.netns,
            "ifname": pod.ifname,
            "ips": [str(ip) for ip in pod.ips],
        }
    if request.kind is RequestKind.GC:
        obj["validAttachments"] = [
            {"containerId": a.container_id, "ifname": a.ifname} for a in request.valid_attachments
        ]
    return _line(obj)


def encode_reply(reply: AgentReply) -> bytes:
    """The reply as one newline-terminated JSON line."""
    return _line(
        {
            "v": PROTOCOL_VERSION,
            "outcome": reply.outcome.value,
            "message": reply.message,
            "retry": reply.retry,
        }
    )


def _parse_object(line: bytes, what: str) -> dict[str, Any]:
    if len(line) > MAX_MESSAGE_BYTES:
        raise EventDecodeError(f"{what} of {len(line)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise EventDecodeError(f"{what} is not UTF-8: {exc}") from None
    except ValueError as exc:
        raise EventDecodeError(f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise EventDecodeError(f"{what} is a JSON {type(obj).__name__}, expected an object")
    version = obj.get("v")
    if type(version) is not int:
        raise EventDecodeError(f"{what}: 'v' must be the integer protocol version, got {version!r}")
    if version != PROTOCOL_VERSION:
        raise EventDecodeError(f"{what}: protocol version {version} is not supported (this side speaks 1)")
    return obj


def _string(obj: Mapping[str, Any], key: str, where: str, *, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise EventDecodeError(f"{where}.{key} must be a string, got {value!r}")
    return value


def _decode_pod(raw: object) -> PodAttachment:
    if not isinstance(raw, dict):
        raise EventDecodeError(f"request.pod must be an object, got {raw!r}")
    where = "request.pod"
    ips_raw = raw.get("ips", [])
    if not isinstance(ips_raw, list):
        raise EventDecodeError(f"{where}.ips must be a list, got {ips_raw!r}")
    ips: list[IPAddress] = []
    for index, item in enumerate(ips_raw):
        if not isinstance(item, str):
            raise EventDecodeError(f"{where}.ips[{index}] must be a string, got {item!r}")
        try:
            ips.append(ipaddress.ip_address(item))
        except ValueError:
            raise EventDecodeError(f"{where}.ips[{index}]: {item!r} is not an IP address") from None
    pod = PodAttachment(
        namespace=_string(raw, "namespace", where),
        name=_string(raw, "name", where),
        uid=_string(raw, "uid", where, default=""),
        container_id=_string(raw, "containerId", where),
        netns=_string(raw, "netns", where, default=""),
        ifname=_string(raw, "ifname", where),
        ips=tuple(ips),
    )
    for key, value in (("namespace", pod.namespace), ("name", pod.name), ("containerId", pod.container_id)):
        if not value:
            raise EventDecodeError(f"{where}.{key} must not be empty")
    return pod


def decode_request(line: bytes) -> AgentRequest:
    """Parse one request line (with or without its newline). Raises `EventDecodeError`."""
    obj = _parse_object(line, "request")
    kind_raw = obj.get("kind")
    try:
        if not isinstance(kind_raw, str):
            raise ValueError(kind_raw)
        kind = RequestKind(kind_raw)
    except ValueError:
        known = ", ".join(k.value for k in RequestKind)
        raise EventDecodeError(f"request.kind {kind_raw!r} is not one of {known}") from None
    pod: PodAttachment | None = None
    if kind in POD_REQUEST_KINDS:
        if "pod" not in obj:
            raise EventDecodeError(f"a {kind.value!r} request needs request.pod")
        pod = _decode_pod(obj["pod"])
    attachments: list[Attachment] = []
    if kind is RequestKind.GC:
        raw_list = obj.get("validAttachments")
        if not isinstance(raw_list, list):
            raise EventDecodeError(f"request.validAttachments must be a list, got {raw_list!r}")
        for index, item in enumerate(raw_list):
            where = f"request.validAttachments[{index}]"
            if not isinstance(item, dict):
                raise EventDecodeError(f"{where} must be an object, got {item!r}")
            attachments.append(
                Attachment(_string(item, "containerId", where), _string(item, "ifname", where))
            )
    return AgentRequest(kind=kind, pod=pod, valid_attachments=tuple(attachments))


def decode_reply(line: bytes) -> AgentReply:
    """Parse one reply line (with or without its newline). Raises `EventDecodeError`."""
    obj = _parse_object(line, "reply")
    outcome_raw = obj.get("outcome")
    try:
        if not isinstance(outcome_raw, str):
            raise ValueError(outcome_raw)
        outcome = Outcome(outcome_raw)
    except ValueError:
        known = ", ".join(o.value for o in Outcome)
        raise EventDecodeError(f"reply.outcome {outcome_raw!r} is not one of {known}") from None
    retry = obj.get("retry", False)
    if not isinstance(retry, bool):
        raise EventDecodeError(f"reply.retry must be a boolean, got {retry!r}")
    return AgentReply(outcome=outcome, message=_string(obj, "message", "reply", default=""), retry=retry)


# ---------------------------------------------------------------------------------------------------------
# Client (the plugin side: blocking, one overall deadline)
# ---------------------------------------------------------------------------------------------------------


class AgentUnavailable(Exception):
    """The agent could not be reached, or went away before answering. Transient by nature."""

    def __init__(self, socket_path: str, reason: str) -> None:
        super().__init__(f"node agent at {socket_path} is unavailable: {reason}")
        self.socket_path = socket_path
        self.reason = reason


class AgentTimeout(AgentUnavailable):
    """The agent did not answer within the deadline."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__(socket_path, f"no reply within {timeout:g}s")
        self.timeout = timeout


class AgentProtocolError(Exception):
    """The agent answered something that is not a valid reply."""

    def __init__(self, socket_path: str, reason: str) -> None:
        super().__init__(f"node agent at {socket_path} sent an invalid reply: {reason}")
        self.socket_path = socket_path
        self.reason = reason


def _remaining(deadline: float, socket_path: str, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise AgentTimeout(socket_path, timeout)
    return left


def call_agent(socket_path: str, request: AgentRequest, timeout: float) -> AgentReply:
    """Send `request` to the agent listening on `socket_path` and return its reply.

    Connecting, sending and waiting for the reply together take at most `timeout` seconds. Raises
    `AgentUnavailable` (including `AgentTimeout`) or `AgentProtocolError`; never returns without a reply.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    payload = encode_request(request)
    deadline = time.monotonic() + timeout
    received = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(_remaining(deadline, socket_path, timeout))
            sock.connect(socket_path)
            sock.settimeout(_remaining(deadline, socket_path, timeout))
            sock.sendall(payload)
            # Bounded: every pass either grows `received` toward the size limit, ends on EOF, or the
            # deadline runs out.
            while b"\n" not in received:
                sock.settimeout(_remaining(deadline, socket_path, timeout))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if len(received) > MAX_MESSAGE_BYTES:
                    raise AgentProtocolError(socket_path, f"reply longer than {MAX_MESSAGE_BYTES} bytes")
        except TimeoutError:
            raise AgentTimeout(socket_path, timeout) from None
        except FileNotFoundError:
            raise AgentUnavailable(
                socket_path, "the socket does not exist (is loom-cni-agent running?)"
            ) from None
        except ConnectionRefusedError:
            raise AgentUnavailable(socket_path, "connection refused (is loom-cni-agent running?)") from None
        except PermissionError:
            raise AgentUnavailable(socket_path, "permission denied (the plugin must run as root)") from None
        except OSError as exc:
            raise AgentUnavailable(socket_path, exc.strerror or str(exc)) from None
    line, newline, _rest = bytes(received).partition(b"\n")
    if not newline:
        raise AgentUnavailable(socket_path, "the agent closed the connection without a reply")
    try:
        return decode_reply(line)
    except EventDecodeError as exc:
        raise AgentProtocolError(socket_path, str(exc)) from None


# ---------------------------------------------------------------------------------------------------------
# Server (the node agent side: asyncio)
# ---------------------------------------------------------------------------------------------------------

RequestHandler = Callable[[AgentRequest], Awaitable[AgentReply]]


async def handle_plugin_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: RequestHandler,
    *,
    read_timeout: float = DEFAULT_SERVER_READ_TIMEOUT,
    write_timeout: float = DEFAULT_SERVER_WRITE_TIMEOUT,
) -> None:
    """Serve one plugin connection: read one request line, run `handler`, write its reply, close.

    A malformed request gets an ERROR reply naming what was wrong (retry false); a handler that raises
    gets an ERROR reply with retry true, so the runtime retries instead of starting the pod unmeshed. The
    handler itself is not time-bounded here: the agent decides how long enrolment may take, and the plugin
    has its own deadline.
    """
    try:
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), read_timeout)
        except TimeoutError:
            logger.warning("plugin connection sent no request within %gs; closing", read_timeout)
            return
        except asyncio.IncompleteReadError:
            logger.warning("plugin connection closed before sending a complete request")
            return
        except asyncio.LimitOverrunError:
            reply = AgentReply(Outcome.ERROR, f"request longer than {MAX_MESSAGE_BYTES} bytes")
        else:
            try:
                request = decode_request(line)
            except EventDecodeError as exc:
                logger.warning("rejecting plugin request: %s", exc)
                reply = AgentReply(Outcome.ERROR, f"invalid request: {exc}")
            else:
                try:
                    reply = await handler(request)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    logger.exception("plugin event handler failed for %s request", request.kind.value)
                    reply = AgentReply(Outcome.ERROR, f"node agent failed: {exc}", retry=True)
        writer.write(encode_reply(reply))
        await asyncio.wait_for(writer.drain(), write_timeout)
    except (ConnectionError, TimeoutError) as exc:
        logger.warning("plugin connection failed while replying: %s", exc)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), write_timeout)


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


async def serve_plugin_events(
    socket_path: str,
    handler: RequestHandler,
    *,
    mode: int = 0o600,
    read_timeout: float = DEFAULT_SERVER_READ_TIMEOUT,
    write_timeout: float = DEFAULT_SERVER_WRITE_TIMEOUT,
) -> asyncio.Server:
    """Listen on `socket_path` (replacing a stale socket left by a previous agent) and serve requests.

    The socket is created with `mode` (owner-only by default: the plugin runs as root, and anybody who
    can write to this socket can ask the agent to enter pod namespaces). The parent directory is created
    if missing. Close the returned server to stop; the socket file is removed by the caller.
    """
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(f"socket path {socket_path!r} is longer than {MAX_SOCKET_PATH_BYTES} bytes")
    parent = os.path.dirname(socket_path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    _remove_stale_socket(socket_path)

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle_plugin_connection(
            reader, writer, handler, read_timeout=read_timeout, write_timeout=write_timeout
        )

    # chmod between bind and listen: nobody can connect to a socket that is not listening yet, so there
    # is no window in which a wider-than-`mode` socket accepts connections (and no process-wide umask).
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(socket_path)
        os.chmod(socket_path, mode)
        server = await asyncio.start_unix_server(on_connection, sock=sock, limit=MAX_MESSAGE_BYTES)
    except BaseException:
        sock.close()
        raise
    return server
