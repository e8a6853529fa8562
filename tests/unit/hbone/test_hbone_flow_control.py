"""FastDataH2Connection's shortcuts for received DATA (`take_plain_data`) and for acknowledging
processed bytes (`acknowledge_quietly`) leave h2's windows exactly as h2's own methods leave them, and
put exactly the same bytes on the wire, whatever the window sizes and the order of frames and acks."""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.hbone.connection import FastDataH2Connection

STREAMS = (1, 3)
HEADERS = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]


@dataclass
class Peers:
    """A client sending DATA to two servers fed the same bytes: `fast` (loom's subclass, acknowledging
    through its shortcut first) and `plain` (h2 itself)."""

    client: H2Connection
    fast: FastDataH2Connection
    plain: H2Connection
    unacked: dict[int, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    quiet: int = 0

    def to_servers(self) -> None:
        data = self.client.data_to_send()
        fast_events = self.fast.receive_data(data)
        plain_events = self.plain.receive_data(data)
        assert [received(e) for e in fast_events] == [received(e) for e in plain_events]
        for event in fast_events:
            if isinstance(event, h2.events.DataReceived):
                self.unacked[event.stream_id] += event.flow_controlled_length

    def to_client(self) -> None:
        fast_out, plain_out = self.fast.data_to_send(), self.plain.data_to_send()
        assert fast_out == plain_out
        self.client.receive_data(fast_out)

    def acknowledge(self, stream_id: int, size: int) -> None:
        if self.fast.acknowledge_quietly(size, stream_id):
            self.quiet += 1
        else:
            self.fast.acknowledge_received_data(size, stream_id)
        self.plain.acknowledge_received_data(size, stream_id)
        self.unacked[stream_id] -= size


def received(event: h2.events.Event) -> tuple[object, ...]:
    if isinstance(event, h2.events.DataReceived):
        return ("data", event.stream_id, event.data, event.flow_controlled_length)
    return (type(event).__name__, getattr(event, "stream_id", None))


def windows(conn: H2Connection) -> list[tuple[int, int, int]]:
    managers = [conn._inbound_flow_control_window_manager]
    managers += [conn.streams[i]._inbound_window_manager for i in STREAMS if i in conn.streams]
    return [(m.max_window_size, m.current_window_size, m._bytes_processed) for m in managers]


def connect(stream_window: int, connection_grow: int) -> Peers:
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    fast = FastDataH2Connection(H2Configuration(client_side=False, header_encoding=None))
    plain = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    peers = Peers(client, fast, plain)
    client.initiate_connection()
    for server in (fast, plain):
        server.initiate_connection()
        server.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: stream_window})
        if connection_grow:
            server.increment_flow_control_window(connection_grow)
    peers.to_servers()
    peers.to_client()
    for stream_id in STREAMS:
        client.send_headers(stream_id, HEADERS)
    peers.to_servers()
    peers.to_client()
    return peers


step = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(STREAMS), st.integers(1, 40_000)),
    st.tuples(st.just("ack"), st.sampled_from(STREAMS), st.floats(0.0, 1.0)),
    st.tuples(st.just("end"), st.sampled_from(STREAMS), st.just(0)),
    st.tuples(st.just("answer"), st.sampled_from(STREAMS), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(
    stream_window=st.integers(1_000, 300_000),
    connection_grow=st.sampled_from([0, 10_000, 1 << 20]),
    steps=st.lists(step, max_size=40),
)
def test_shortcuts_match_h2(
    stream_window: int, connection_grow: int, steps: list[tuple[str, int, float]]
) -> None:
    peers = connect(stream_window, connection_grow)
    ended: set[int] = set()
    answered: set[int] = set()  # the servers' side ended too: acks on a closed stream after both
    for kind, stream_id, amount in steps:
        if kind == "send" and stream_id not in ended:
            room = min(
                peers.client.local_flow_control_window(stream_id), peers.client.max_outbound_frame_size
            )
            size = min(int(amount), room)
            if size:
                peers.client.send_data(stream_id, b"x" * size)
                peers.to_servers()
        elif kind == "ack":
            size = int(peers.unacked[stream_id] * amount)
            if size:
                peers.acknowledge(stream_id, size)
        elif kind == "end" and stream_id not in ended:
            ended.add(stream_id)
            peers.client.end_stream(stream_id)
            peers.to_servers()
        elif kind == "answer" and stream_id not in answered:
            answered.add(stream_id)
            for server in (peers.fast, peers.plain):
                server.send_headers(stream_id, [(":status", "200")], end_stream=True)
        assert windows(peers.fast) == windows(peers.plain)
        peers.to_client()  # the WINDOW_UPDATE frames (if any) are the same bytes


def test_quiet_only_while_no_update_is_due() -> None:
    peers = connect(stream_window=100_000, connection_grow=1 << 20)
    peers.client.send_data(1, b"x" * 16_000)
    peers.client.send_data(1, b"x" * 16_000)
    peers.client.send_data(1, b"x" * 16_000)
    peers.to_servers()
    assert peers.fast.acknowledge_quietly(40_000, 1)  # 40 % of the stream window: no update yet
    assert peers.fast.acknowledge_quietly(9_999, 1)  # 49,999 of 100,000
    assert not peers.fast.acknowledge_quietly(1, 1)  # half the stream window: h2 must answer
    peers.fast.acknowledge_received_data(1, 1)
    assert peers.fast.data_to_send()  # the stream's WINDOW_UPDATE
    assert peers.fast.acknowledge_quietly(1_000, 1)
    assert not peers.fast.acknowledge_quietly(10, 5)  # no such stream
    assert not peers.fast.acknowledge_quietly(0, 1)


def test_not_quiet_when_the_connection_window_is_due() -> None:
    """Two streams each below half their window, together at half the connection window (65,535 when
    not grown): h2 sends a connection WINDOW_UPDATE, so the shortcut must not take the bytes."""
    peers = connect(stream_window=200_000, connection_grow=0)
    for stream_id in STREAMS:
        peers.client.send_data(stream_id, b"x" * 16_000)
        peers.client.send_data(stream_id, b"x" * 16_000)
    peers.to_servers()
    peers.acknowledge(1, 30_000)
    assert peers.quiet == 1
    assert not peers.fast.acknowledge_quietly(2_767, 3)  # 32,767 = 65,535 // 2 on the connection
    peers.acknowledge(3, 2_767)
    assert peers.quiet == 1
    assert windows(peers.fast) == windows(peers.plain)
    peers.to_client()
