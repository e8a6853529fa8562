"""The sans-IO ZDS client protocol (ztunnel/inpod/protocol.py): transition table, commands, codec."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.api import zds_pb2
from ztunnel.inpod.protocol import (
    TRANSITIONS,
    Ack,
    AddWorkload,
    DelWorkload,
    Input,
    KeepProxy,
    KeepWorkload,
    ProtocolError,
    Reconcile,
    Request,
    SendHello,
    SnapshotSent,
    StartProxy,
    State,
    StopProxy,
    WorkloadInfo,
    ZdsClientProtocol,
    decode_ack,
    decode_hello,
    decode_request,
    encode_ack,
    encode_hello,
    encode_request,
)

INFO = WorkloadInfo("reviews-v1-abc", "default", "bookinfo-reviews")
FD = 42


def request_for(event: Input, uid: str = "uid-1") -> Request:
    requests: dict[Input, Request] = {
        Input.ADD: AddWorkload(uid, INFO, FD),
        Input.KEEP: KeepWorkload(uid),
        Input.DEL: DelWorkload(uid),
        Input.SNAPSHOT_SENT: SnapshotSent(),
    }
    return requests[event]


def feed(protocol: ZdsClientProtocol, event: Input, uid: str = "uid-1") -> list[object]:
    if event is Input.CONNECTED:
        return list(protocol.connected())
    if event is Input.DISCONNECTED:
        return list(protocol.disconnected())
    return list(protocol.handle(request_for(event, uid)))


# -- the table ----------------------------------------------------------------------------------------


EXPECTED = {
    (State.CONNECTING, Input.CONNECTED): State.AWAITING_SNAPSHOT,
    (State.AWAITING_SNAPSHOT, Input.ADD): State.AWAITING_SNAPSHOT,
    (State.AWAITING_SNAPSHOT, Input.KEEP): State.AWAITING_SNAPSHOT,
    (State.AWAITING_SNAPSHOT, Input.DEL): State.AWAITING_SNAPSHOT,
    (State.AWAITING_SNAPSHOT, Input.SNAPSHOT_SENT): State.SNAPSHOT_DONE,
    (State.SNAPSHOT_DONE, Input.ADD): State.SNAPSHOT_DONE,
    (State.SNAPSHOT_DONE, Input.DEL): State.SNAPSHOT_DONE,
    (State.CONNECTING, Input.DISCONNECTED): State.CONNECTING,
    (State.AWAITING_SNAPSHOT, Input.DISCONNECTED): State.CONNECTING,
    (State.SNAPSHOT_DONE, Input.DISCONNECTED): State.CONNECTING,
    (State.ERROR, Input.DISCONNECTED): State.CONNECTING,
}


def test_transition_table_is_exactly_the_documented_one() -> None:
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize(
    ("state", "event"),
    list(itertools.product(State, Input)),
    ids=lambda value: value.value,
)
def test_every_state_and_input_pair(state: State, event: Input) -> None:
    protocol = ZdsClientProtocol(state=state)
    expected = EXPECTED.get((state, event))
    if expected is None:
        with pytest.raises(ProtocolError, match=f"unexpected {event.value} in state {state.value}") as caught:
            feed(protocol, event)
        assert (caught.value.state, caught.value.input) == (state, event)
        assert protocol.state is State.ERROR
    else:
        feed(protocol, event)
        assert protocol.state is expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(Input), st.sampled_from(["a", "b", "c"])), max_size=30))
def test_any_input_sequence_follows_the_table(events: list[tuple[Input, str]]) -> None:
    protocol = ZdsClientProtocol()
    model_state = State.CONNECTING
    model_snapshot: set[str] = set()
    for event, uid in events:
        expected = EXPECTED.get((model_state, event))
        if expected is None:
            with pytest.raises(ProtocolError):
                feed(protocol, event, uid)
            model_state = State.ERROR
            assert protocol.state is State.ERROR
            continue
        commands = feed(protocol, event, uid)
        # Reference model of which uids survive the snapshot.
        if event in (Input.CONNECTED, Input.DISCONNECTED):
            model_snapshot.clear()
        elif event in (Input.ADD, Input.KEEP) and model_state is State.AWAITING_SNAPSHOT:
            model_snapshot.add(uid)
        elif event is Input.DEL:
            model_snapshot.discard(uid)
        elif event is Input.SNAPSHOT_SENT:
            assert commands == [Reconcile(frozenset(model_snapshot)), Ack()]
            model_snapshot.clear()
        if event not in (Input.CONNECTED, Input.DISCONNECTED):
            assert isinstance(commands[-1], Ack), "every request is answered exactly once, last"
            assert sum(isinstance(c, Ack) for c in commands) == 1
        model_state = expected
        assert protocol.state is model_state


# -- commands -------------------------------------------------------------------------------------


def test_session_commands_in_order() -> None:
    protocol = ZdsClientProtocol()
    assert protocol.connected() == [SendHello()]
    assert protocol.handle(AddWorkload("a", INFO, 7)) == [StartProxy("a", INFO, 7), Ack()]
    assert protocol.handle(KeepWorkload("b")) == [KeepProxy("b"), Ack()]
    assert protocol.handle(AddWorkload("c", INFO, 8)) == [StartProxy("c", INFO, 8), Ack()]
    assert protocol.handle(DelWorkload("c")) == [StopProxy("c", drain=False), Ack()]
    assert protocol.handle(SnapshotSent()) == [Reconcile(frozenset({"a", "b"})), Ack()]
    assert protocol.handle(AddWorkload("d", INFO, 9)) == [StartProxy("d", INFO, 9), Ack()]
    assert protocol.handle(DelWorkload("a")) == [StopProxy("a", drain=False), Ack()]


def test_reconnect_starts_a_fresh_snapshot() -> None:
    protocol = ZdsClientProtocol()
    protocol.connected()
    protocol.handle(AddWorkload("a", INFO, 7))
    protocol.disconnected()
    protocol.connected()
    protocol.handle(KeepWorkload("b"))
    assert protocol.handle(SnapshotSent()) == [Reconcile(frozenset({"b"})), Ack()]


def test_keep_after_the_snapshot_is_a_protocol_error() -> None:
    protocol = ZdsClientProtocol()
    protocol.connected()
    protocol.handle(SnapshotSent())
    with pytest.raises(ProtocolError, match="unexpected keep in state snapshot_done"):
        protocol.handle(KeepWorkload("a"))
    with pytest.raises(ProtocolError, match="unexpected add in state error"):
        protocol.handle(AddWorkload("a", INFO, 1))
    protocol.disconnected()
    assert protocol.state is State.CONNECTING


# -- codec ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "fds"),
    [
        pytest.param(AddWorkload("uid-1", INFO, 5), [5], id="add with one fd"),
        pytest.param(KeepWorkload("uid-2"), [], id="keep"),
        pytest.param(DelWorkload("uid-3"), [], id="del"),
        pytest.param(SnapshotSent(), [], id="snapshot sent"),
    ],
)
def test_request_round_trip(request_: Request, fds: list[int]) -> None:
    assert decode_request(encode_request(request_), fds) == request_


def test_del_uses_field_two_as_istio_does() -> None:
    message = zds_pb2.WorkloadRequest.FromString(encode_request(DelWorkload("x")))
    assert message.WhichOneof("payload") == "del"
    assert encode_request(DelWorkload("x")) == bytes([0x12, 0x03, 0x12, 0x01]) + b"x"


ADD = encode_request(AddWorkload("u", INFO, 0))


@pytest.mark.parametrize(
    ("datagram", "fds", "message"),
    [
        pytest.param(b"", [], "request carries no payload", id="empty datagram"),
        pytest.param(b"\xff\xff\xff", [], "request does not decode", id="garbage"),
        pytest.param(ADD, [], "add request came with 0 file descriptors, expected 1", id="add without fd"),
        pytest.param(ADD, [3, 4], "add request came with 2 file descriptors", id="add with two fds"),
        pytest.param(
            encode_request(KeepWorkload("u")),
            [3],
            "keep request came with 1 file descriptors",
            id="keep with fd",
        ),
        pytest.param(
            encode_request(AddWorkload("", INFO, 0)), [3], "add request has an empty uid", id="empty uid"
        ),
        pytest.param(
            encode_request(DelWorkload("a\x00b")), [], "del request has an invalid uid", id="control"
        ),
        pytest.param(
            encode_request(KeepWorkload("u" * 300)), [], "keep request has an invalid uid", id="too long"
        ),
    ],
)
def test_bad_requests_are_named(datagram: bytes, fds: list[int], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_request(datagram, fds)


def test_receive_moves_to_error_on_a_bad_datagram() -> None:
    protocol = ZdsClientProtocol()
    protocol.connected()
    with pytest.raises(ProtocolError):
        protocol.receive(b"\xff", [])
    assert protocol.state is State.ERROR


@settings(max_examples=500, deadline=None)
@given(datagram=st.binary(max_size=64), fd_count=st.integers(0, 2))
def test_decoding_arbitrary_bytes_gives_a_request_or_a_protocol_error(datagram: bytes, fd_count: int) -> None:
    try:
        decoded = decode_request(datagram, list(range(100, 100 + fd_count)))
    except ProtocolError:
        return
    assert isinstance(decoded, AddWorkload | KeepWorkload | DelWorkload | SnapshotSent)


def test_hello_and_ack_codec() -> None:
    assert decode_hello(encode_hello()) == zds_pb2.V1
    assert decode_ack(encode_ack()) == ""
    assert decode_ack(encode_ack("boom")) == "boom"
    with pytest.raises(ProtocolError, match="response carries no ack"):
        decode_ack(b"")
    with pytest.raises(ProtocolError, match="response does not decode"):
        decode_ack(b"\xff")
    with pytest.raises(ProtocolError, match="hello does not decode"):
        decode_hello(b"\xff")
