"""Receiving ZDS requests with their fds (recvmsg over SOCK_SEQPACKET), namespace fd checks, and the
SO_ORIGINAL_DST decoder. Real sockets and fds; no root needed."""

from __future__ import annotations

import array
import fcntl
import itertools
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from cni.agent.zds_server import send_datagram
from ztunnel.inpod.client import (
    ANCILLARY_BUFFER_SIZE,
    Backoff,
    ConnectionClosed,
    InpodClientConfig,
    ZdsTransportError,
    receive_request,
    take_request,
)
from ztunnel.inpod.netns import InpodNetns, NetnsError, namespace_identity, parse_original_dst
from ztunnel.inpod.protocol import MAX_REQUEST_SIZE, AddWorkload, WorkloadInfo, decode_request, encode_request

INFO = WorkloadInfo("p", "ns", "sa")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    agent, ztunnel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    agent.setblocking(False)
    ztunnel.setblocking(False)
    try:
        yield agent, ztunnel
    finally:
        agent.close()
        ztunnel.close()


async def test_add_arrives_with_the_namespace_fd(pair: tuple[socket.socket, socket.socket]) -> None:
    agent, ztunnel = pair
    netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        await send_datagram(agent, encode_request(AddWorkload("uid-1", INFO, -1)), [netns_fd])
        data, fds = await receive_request(ztunnel)
        try:
            assert decode_request(data, fds) == AddWorkload("uid-1", INFO, fds[0])
            assert fds[0] != netns_fd
            assert namespace_identity(fds[0]) == namespace_identity(netns_fd)
            assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC, "received with MSG_CMSG_CLOEXEC"
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        os.close(netns_fd)


async def test_two_fds_are_rejected_and_nothing_leaks(pair: tuple[socket.socket, socket.socket]) -> None:
    agent, ztunnel = pair
    read_end, write_end = os.pipe()
    before = open_fds()
    try:
        await send_datagram(agent, b"x", [read_end, write_end])
        with pytest.raises(ZdsTransportError, match="ancillary data truncated"):
            await receive_request(ztunnel)
        assert open_fds() == before
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_an_oversized_request_is_rejected(pair: tuple[socket.socket, socket.socket]) -> None:
    agent, ztunnel = pair
    await send_datagram(agent, b"a" * (MAX_REQUEST_SIZE + 1))
    with pytest.raises(ZdsTransportError, match="request longer than 1024 bytes"):
        await receive_request(ztunnel)


async def test_a_request_of_exactly_the_buffer_size_is_accepted(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    agent, ztunnel = pair
    await send_datagram(agent, b"a" * MAX_REQUEST_SIZE)
    data, fds = await receive_request(ztunnel)
    assert (len(data), fds) == (MAX_REQUEST_SIZE, [])


async def test_end_of_stream_is_connection_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    agent, ztunnel = pair
    agent.close()
    with pytest.raises(ConnectionClosed):
        await receive_request(ztunnel)


def test_take_request_rejects_other_ancillary_data_and_closes_fds() -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    fds = array.array("i", [read_end]).tobytes()
    with pytest.raises(ZdsTransportError, match=r"unexpected ancillary data \(level, type\) \[\(1, 2\)\]"):
        take_request(b"x", [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds), (socket.SOL_SOCKET, 2, b"")], 0)
    with pytest.raises(OSError):
        os.fstat(read_end)  # closed by take_request


def test_ancillary_buffer_holds_exactly_one_fd() -> None:
    assert socket.CMSG_LEN(struct.calcsize("i")) == ANCILLARY_BUFFER_SIZE
    assert socket.CMSG_LEN(2 * struct.calcsize("i")) > ANCILLARY_BUFFER_SIZE


# -- namespace fds --------------------------------------------------------------------------------


def test_inpod_netns_identity_and_close() -> None:
    netns = InpodNetns.open("/proc/self/ns/net")
    assert netns.inode == os.stat("/proc/self/ns/net").st_ino
    assert netns.identity == namespace_identity(netns.fd)
    netns.close()
    netns.close()
    assert netns.closed
    with pytest.raises(NetnsError, match="already closed"):
        _ = netns.fd


def test_a_fd_that_is_not_a_network_namespace_is_refused() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(
            NetnsError, match=rf"fd {read_end} is not a network namespace \(it refers to 'pipe:"
        ):
            InpodNetns(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    with pytest.raises(NetnsError, match="is not an open file"):
        namespace_identity(read_end)


# -- SO_ORIGINAL_DST --------------------------------------------------------------------------------


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + bytes(8)


def sockaddr_in6(ip: str, port: int) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", port, 0)
        + socket.inet_pton(socket.AF_INET6, ip)
        + struct.pack("=I", 0)
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (sockaddr_in("10.80.1.6", 8080), ("10.80.1.6", 8080)),
        (sockaddr_in("255.255.255.255", 65535), ("255.255.255.255", 65535)),
        (sockaddr_in6("fd00::1", 443), ("fd00::1", 443)),
    ],
)
def test_original_dst_decodes_sockaddr(raw: bytes, expected: tuple[str, int]) -> None:
    assert parse_original_dst(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "too short for a sockaddr"),
        (struct.pack("=H", socket.AF_INET) + b"\x00", "sockaddr_in is 3 bytes"),
        (struct.pack("=H", socket.AF_INET6) + bytes(10), "sockaddr_in6 is 12 bytes"),
        (struct.pack("=H", socket.AF_UNIX) + bytes(14), "address family 1"),
    ],
)
def test_original_dst_rejects_bad_addresses(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_original_dst(raw)


# -- backoff --------------------------------------------------------------------------------------


def test_backoff_starts_between_5_and_10_ms_doubles_and_caps_at_15_s() -> None:
    backoff = Backoff(InpodClientConfig())
    first = backoff.next_delay()
    assert 0.005 <= first <= 0.010
    delays = [backoff.next_delay() for _ in range(20)]
    assert delays[0] == pytest.approx(first * 2)
    assert delays[-1] == 15.0
    assert all(b >= a for a, b in itertools.pairwise(delays))
    backoff.reset()
    assert backoff.next_delay() <= 0.010


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"socket_path": ""}, "socket_path is empty"),
        ({"backoff_initial_min": 0.02}, "backoff_initial_min <= backoff_initial_max"),
        ({"retry_interval": 0}, "retry_interval must be positive"),
        ({"io_timeout": -1}, "io_timeout must be positive"),
    ],
)
def test_client_configuration_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InpodClientConfig(**kwargs)  # type: ignore[arg-type]
