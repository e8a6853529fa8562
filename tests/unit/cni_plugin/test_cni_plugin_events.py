"""The plugin-event wire format (`cni.events`): codec round trips and rejections, fuzzing, and the blocking
client against the asyncio server the node agent runs, over a real unix socket."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import pathlib
import re
import socket
import stat
import threading
from collections.abc import AsyncIterator

import pytest
from cni_standin_agent import short_socket_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from cni import events
from cni.events import (
    AgentReply,
    AgentRequest,
    Attachment,
    EventDecodeError,
    Outcome,
    PodAttachment,
    RequestKind,
    call_agent,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    serve_plugin_events,
)

POD = PodAttachment(
    namespace="bookinfo",
    name="ratings-v1-7d9f",
    uid="1b2c",
    container_id="c0ffee",
    netns="/var/run/netns/cni-42",
    ifname="eth0",
    ips=(ipaddress.ip_address("10.244.0.12"), ipaddress.ip_address("fd00::12")),
)
REQUESTS = [
    AgentRequest(RequestKind.ADD, pod=POD),
    AgentRequest(RequestKind.CHECK, pod=POD),
    AgentRequest(RequestKind.DEL, pod=PodAttachment("ns", "p", "", "c1", "", "eth0")),
    AgentRequest(RequestKind.STATUS),
    AgentRequest(RequestKind.GC, valid_attachments=(Attachment("c0ffee", "eth0"),)),
    AgentRequest(RequestKind.GC),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.kind.value)
def test_request_round_trip(request_: AgentRequest) -> None:
    line = encode_request(request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_request(line) == request_


@pytest.mark.parametrize(
    "reply",
    [
        AgentReply(Outcome.ENROLLED),
        AgentReply(Outcome.ERROR, "ztunnel not connected", retry=True),
        AgentReply(Outcome.DONE, "ok"),
    ],
    ids=lambda r: r.outcome.value,
)
def test_reply_round_trip(reply: AgentReply) -> None:
    assert decode_reply(encode_reply(reply)) == reply


def test_wire_shape_is_documented_json() -> None:
    obj = json.loads(encode_request(REQUESTS[0]))
    assert obj == {
        "v": 1,
        "kind": "add",
        "pod": {
            "namespace": "bookinfo",
            "name": "ratings-v1-7d9f",
            "uid": "1b2c",
            "containerId": "c0ffee",
            "netns": "/var/run/netns/cni-42",
            "ifname": "eth0",
            "ips": ["10.244.0.12", "fd00::12"],
        },
    }


def test_unknown_keys_are_ignored() -> None:
    line = b'{"v":1,"outcome":"enrolled","message":"","retry":false,"extra":{"x":1}}'
    assert decode_reply(line) == AgentReply(Outcome.ENROLLED)


@pytest.mark.parametrize(
    ("line", "named"),
    [
        pytest.param(b"nope", "not JSON", id="not json"),
        pytest.param(b"\xff", "UTF-8", id="not utf-8"),
        pytest.param(b"[]", "object", id="not an object"),
        pytest.param(b'{"kind":"add"}', "'v'", id="no version"),
        pytest.param(b'{"v":2,"kind":"status"}', "version 2", id="future version"),
        pytest.param(b'{"v":1,"kind":"attach"}', "request.kind", id="unknown kind"),
        pytest.param(b'{"v":1,"kind":["add"]}', "request.kind", id="kind not a string"),
        pytest.param(b'{"v":1,"kind":"add"}', "request.pod", id="add without pod"),
        pytest.param(b'{"v":1,"kind":"add","pod":[]}', "request.pod", id="pod not an object"),
        pytest.param(
            b'{"v":1,"kind":"add","pod":{"namespace":"a","name":"b","containerId":"c","ifname":7}}',
            "request.pod.ifname",
            id="ifname not a string",
        ),
        pytest.param(
            b'{"v":1,"kind":"add","pod":{"namespace":"","name":"b","containerId":"c","ifname":"e"}}',
            "request.pod.namespace",
            id="empty namespace",
        ),
        pytest.param(
            b'{"v":1,"kind":"check","pod":{"namespace":"a","name":"b","containerId":"c","ifname":"e","ips":["x"]}}',
            "request.pod.ips[0]",
            id="bad ip",
        ),
        pytest.param(b'{"v":1,"kind":"gc"}', "request.validAttachments", id="gc without list"),
        pytest.param(b'{"v":1,"kind":"gc","validAttachments":[{"ifname":"e"}]}', "containerId", id="gc item"),
    ],
)
def test_bad_requests_are_rejected_naming_the_key(line: bytes, named: str) -> None:
    with pytest.raises(EventDecodeError, match=named.replace("[", r"\[").replace("]", r"\]")):
        decode_request(line)


@pytest.mark.parametrize(
    ("line", "named"),
    [
        pytest.param(b'{"v":1,"outcome":"maybe"}', "reply.outcome", id="unknown outcome"),
        pytest.param(b'{"v":1,"outcome":"error","retry":"yes"}', "reply.retry", id="retry not bool"),
        pytest.param(b'{"v":1,"outcome":"error","message":5}', "reply.message", id="message not a string"),
    ],
)
def test_bad_replies_are_rejected_naming_the_key(line: bytes, named: str) -> None:
    with pytest.raises(EventDecodeError, match=named):
        decode_reply(line)


def test_request_invariants() -> None:
    with pytest.raises(ValueError, match="needs a pod"):
        AgentRequest(RequestKind.ADD)
    with pytest.raises(ValueError, match="must not carry a pod"):
        AgentRequest(RequestKind.STATUS, pod=POD)
    with pytest.raises(ValueError, match="validAttachments"):
        AgentRequest(RequestKind.STATUS, valid_attachments=(Attachment("a", "b"),))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decoders_reject_garbage_only_with_event_decode_error(data: bytes) -> None:
    for decode in (decode_request, decode_reply):
        try:
            decode(data)
        except EventDecodeError:
            pass


@settings(max_examples=100, deadline=None)
@given(
    namespace=st.text(min_size=1, max_size=20),
    name=st.text(min_size=1, max_size=20),
    container_id=st.text(min_size=1, max_size=20),
    ips=st.lists(st.ip_addresses(), max_size=4),
)
def test_any_pod_round_trips(
    namespace: str, name: str, container_id: str, ips: list[events.IPAddress]
) -> None:
    request = AgentRequest(
        RequestKind.ADD, pod=PodAttachment(namespace, name, "", container_id, "/n", "eth0", tuple(ips))
    )
    assert decode_request(encode_request(request)) == request


# ---------------------------------------------------------------------------------------------------------
# Client <-> server over a real socket
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
async def socket_dir() -> AsyncIterator[str]:
    with short_socket_dir() as directory:
        yield directory


async def test_client_and_server_exchange(socket_dir: str) -> None:
    seen: list[AgentRequest] = []

    async def handler(request: AgentRequest) -> AgentReply:
        seen.append(request)
        return AgentReply(Outcome.ENROLLED, "rules installed")

    path = os.path.join(socket_dir, "ev.sock")
    server = await serve_plugin_events(path, handler)
    async with server:
        reply = await asyncio.to_thread(call_agent, path, REQUESTS[0], 5.0)
    assert reply == AgentReply(Outcome.ENROLLED, "rules installed")
    assert seen == [REQUESTS[0]]


async def test_server_socket_is_owner_only_and_replaces_a_stale_socket(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "ev.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()

    async def handler(request: AgentRequest) -> AgentReply:
        return AgentReply(Outcome.DONE)

    server = await serve_plugin_events(path, handler)
    async with server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert await asyncio.to_thread(call_agent, path, REQUESTS[3], 5.0) == AgentReply(Outcome.DONE)


async def test_server_refuses_to_replace_a_regular_file(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "ev.sock")
    await asyncio.to_thread(pathlib.Path(path).write_text, "not a socket")

    async def handler(request: AgentRequest) -> AgentReply:
        raise AssertionError("unreachable")

    with pytest.raises(FileExistsError, match="not a socket"):
        await serve_plugin_events(path, handler)


async def test_server_answers_a_malformed_request_with_an_error(socket_dir: str) -> None:
    async def handler(request: AgentRequest) -> AgentReply:
        raise AssertionError("malformed requests never reach the handler")

    path = os.path.join(socket_dir, "ev.sock")
    server = await serve_plugin_events(path, handler)
    async with server:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b'{"v":1,"kind":"attach"}\n')
        await writer.drain()
        reply = decode_reply(await asyncio.wait_for(reader.readline(), 5))
        writer.close()
        await writer.wait_closed()
    assert reply.outcome is Outcome.ERROR and not reply.retry
    assert "request.kind" in reply.message


async def test_handler_failure_becomes_a_retryable_error(socket_dir: str) -> None:
    async def handler(request: AgentRequest) -> AgentReply:
        raise RuntimeError("netlink exploded")

    path = os.path.join(socket_dir, "ev.sock")
    server = await serve_plugin_events(path, handler)
    async with server:
        reply = await asyncio.to_thread(call_agent, path, REQUESTS[0], 5.0)
    assert reply.outcome is Outcome.ERROR and reply.retry
    assert "netlink exploded" in reply.message


async def test_client_deadline_covers_a_slow_handler(socket_dir: str) -> None:
    release = asyncio.Event()

    async def handler(request: AgentRequest) -> AgentReply:
        await asyncio.wait_for(release.wait(), 10)
        return AgentReply(Outcome.ENROLLED)

    path = os.path.join(socket_dir, "ev.sock")
    server = await serve_plugin_events(path, handler)
    async with server:
        with pytest.raises(events.AgentTimeout, match=re.escape("no reply within 0.2s")) as caught:
            await asyncio.to_thread(call_agent, path, REQUESTS[0], 0.2)
        release.set()
    assert caught.value.socket_path == path


async def test_server_drops_a_silent_connection(socket_dir: str) -> None:
    async def handler(request: AgentRequest) -> AgentReply:
        raise AssertionError("no request was sent")

    path = os.path.join(socket_dir, "ev.sock")
    server = await serve_plugin_events(path, handler, read_timeout=0.1)
    async with server:
        reader, writer = await asyncio.open_unix_connection(path)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\n", events.AgentProtocolError, id="not our protocol"),
        pytest.param(b'{"v":1,"outcome":"enrolled"', events.AgentUnavailable, id="hung up mid-reply"),
    ],
)
def test_client_reports_a_bad_reply(answer: bytes, error: type[Exception]) -> None:
    with short_socket_dir() as directory:
        path = os.path.join(directory, "ev.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)

        def serve_once() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

        thread = threading.Thread(target=serve_once)
        thread.start()
        try:
            with pytest.raises(error, match=re.escape(path)):
                call_agent(path, REQUESTS[0], 5.0)
        finally:
            thread.join(5)
            listener.close()


def test_client_rejects_a_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match="timeout"):
        call_agent("/tmp/x.sock", REQUESTS[3], 0)
