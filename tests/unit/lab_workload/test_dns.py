"""The lab DNS: records from the model, answers table-driven on wire bytes, and the server over real
loopback sockets queried with dnspython's own client (dns.query.udp / dns.query.tcp)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom.lab.dns import (
    Address,
    DnsLimits,
    LabDns,
    Zone,
    parse_listen,
    pod_name,
    records_from_snapshot,
    service_name,
)
from loom.resources.model import ConfigSnapshot, ObjectMeta, Pod, Service

LOOPBACK = "127.0.0.1"
TIMEOUT = 5.0


def ip(text: str) -> Address:
    return ipaddress.ip_address(text)


def pod(name: str, namespace: str, ips: tuple[str, ...], labels: dict[str, str], **kw: Any) -> Pod:
    return Pod(meta=ObjectMeta(name=name, namespace=namespace, labels=labels), ips=ips, **kw)


def service(name: str, namespace: str, **kw: Any) -> Service:
    return Service(meta=ObjectMeta(name=name, namespace=namespace), **kw)


# ---------------------------------------------------------------------------------------------------
# Records from the model


def test_records_from_snapshot() -> None:
    snapshot = ConfigSnapshot.of(
        [
            service("reviews", "default", selector={"app": "reviews"}, cluster_ips=("10.96.0.10",)),
            service("dual", "default", cluster_ips=("10.96.0.11", "fd00::11")),
            service("pending", "default", selector={"app": "x"}),  # no cluster IP allocated yet
            service("db", "data", selector={"app": "db"}, headless=True),
            service("manual", "data", headless=True),  # no selector: endpoints managed elsewhere
            service("nothing", "data", selector={}, headless=True),  # empty selector selects nothing
            service("ext", "data", type="ExternalName"),
            pod("db-0", "data", ("10.80.1.7",), {"app": "db"}),
            pod("db-1", "data", ("10.80.2.3", "fd00::3"), {"app": "db"}),
            pod("db-unready", "data", ("10.80.1.9",), {"app": "db"}, ready=False),
            pod("db-failed", "data", ("10.80.1.10",), {"app": "db"}, phase="Failed"),
            pod("db-other-ns", "default", ("10.80.1.11",), {"app": "db"}),
            pod("db-no-ip", "data", (), {"app": "db"}),
        ]
    )
    records = records_from_snapshot(snapshot)
    assert records == {
        "reviews.default.svc.cluster.local": [ip("10.96.0.10")],
        "dual.default.svc.cluster.local": [ip("10.96.0.11"), ip("fd00::11")],
        "pending.default.svc.cluster.local": [],
        "db.data.svc.cluster.local": [ip("10.80.1.7"), ip("10.80.2.3"), ip("fd00::3")],
        "manual.data.svc.cluster.local": [],
        "nothing.data.svc.cluster.local": [],
        # Every running pod with an address, ready or not (like Kubernetes pod records).
        "10-80-1-7.data.pod.cluster.local": [ip("10.80.1.7")],
        "10-80-2-3.data.pod.cluster.local": [ip("10.80.2.3")],
        "fd00--3.data.pod.cluster.local": [ip("fd00::3")],
        "10-80-1-9.data.pod.cluster.local": [ip("10.80.1.9")],
        "10-80-1-11.default.pod.cluster.local": [ip("10.80.1.11")],
    }


def test_records_leave_out_names_dns_cannot_carry() -> None:
    snapshot = ConfigSnapshot.of(
        [
            service("ok", "default", cluster_ips=("10.96.0.1",)),
            service("x" * 70, "default", cluster_ips=("10.96.0.2",)),
        ]
    )
    assert records_from_snapshot(snapshot) == {"ok.default.svc.cluster.local": [ip("10.96.0.1")]}


def test_records_follow_the_domain() -> None:
    snapshot = ConfigSnapshot.of([service("a", "b", cluster_ips=("10.96.0.1",))])
    assert records_from_snapshot(snapshot, "lab.example") == {"a.b.svc.lab.example": [ip("10.96.0.1")]}
    assert service_name("a", "b") == "a.b.svc.cluster.local"
    assert pod_name(ip("10.0.0.1"), "ns") == "10-0-0-1.ns.pod.cluster.local"


# ---------------------------------------------------------------------------------------------------
# Answers (pure)

RECORDS: dict[str, list[Address]] = {
    "reviews.default.svc.cluster.local": [ip("10.96.0.10")],
    "dual.default.svc.cluster.local": [ip("10.96.0.11"), ip("fd00::11")],
    "pending.default.svc.cluster.local": [],
    "big.default.svc.cluster.local": [ip(f"10.80.1.{i}") for i in range(1, 61)],
}
ZONE = Zone.build(RECORDS)


def ask(zone: Zone, name: str, rdtype: str = "A", *, udp: bool = True, **kw: Any) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    reply = zone.answer(query.to_wire(), udp=udp)
    assert reply is not None
    response = dns.message.from_wire(reply)
    assert response.id == query.id
    assert response.flags & dns.flags.QR
    assert not response.flags & dns.flags.RA  # no recursion, ever
    return response


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(rdata.address for rrset in response.answer for rdata in rrset)


@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "expected"),
    [
        pytest.param("reviews.default.svc.cluster.local", "A", "NOERROR", ["10.96.0.10"], id="service A"),
        pytest.param(
            "ReViEwS.DeFaUlT.sVc.CLUSTER.local.", "A", "NOERROR", ["10.96.0.10"], id="case-insensitive"
        ),
        pytest.param("dual.default.svc.cluster.local", "AAAA", "NOERROR", ["fd00::11"], id="service AAAA"),
        pytest.param(
            "dual.default.svc.cluster.local", "ANY", "NOERROR", ["10.96.0.11", "fd00::11"], id="ANY"
        ),
        pytest.param("reviews.default.svc.cluster.local", "AAAA", "NOERROR", [], id="no v6: no data"),
        pytest.param("reviews.default.svc.cluster.local", "MX", "NOERROR", [], id="other type: no data"),
        pytest.param("pending.default.svc.cluster.local", "A", "NOERROR", [], id="service without address"),
        pytest.param("default.svc.cluster.local", "A", "NOERROR", [], id="empty non-terminal"),
        pytest.param("cluster.local", "A", "NOERROR", [], id="apex"),
        pytest.param(
            "reviews.default.svc.cluster.local.default.svc.cluster.local",
            "A",
            "NXDOMAIN",
            [],
            id="search list",
        ),
        pytest.param("reviews.svc.cluster.local", "A", "NXDOMAIN", [], id="missing namespace"),
        pytest.param("sub.reviews.default.svc.cluster.local", "A", "NXDOMAIN", [], id="below a record"),
        pytest.param("example.com", "A", "REFUSED", [], id="outside the domain"),
        pytest.param("cluster.local.example.com", "A", "REFUSED", [], id="domain as a prefix"),
    ],
)
def test_answers(name: str, rdtype: str, rcode: str, expected: list[str]) -> None:
    response = ask(ZONE, name, rdtype)
    assert dns.rcode.to_text(response.rcode()) == rcode
    assert addresses(response) == expected
    if rcode == "REFUSED":
        assert not response.flags & dns.flags.AA
        assert response.authority == []
        return
    assert response.flags & dns.flags.AA
    if not expected:
        # Negative answers carry the SOA so that resolvers cache them (for the short TTL only).
        [soa] = response.authority
        assert soa.rdtype == dns.rdatatype.SOA
        assert soa.ttl == 5
    else:
        assert all(rrset.ttl == 5 for rrset in response.answer)
        assert str(response.answer[0].name).lower() == name.lower().rstrip(".") + "."


def test_soa_query_at_the_apex() -> None:
    response = ask(ZONE, "cluster.local", "SOA")
    assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.SOA]


def test_udp_truncation_without_edns_and_with_a_small_payload() -> None:
    classic = ask(ZONE, "big.default.svc.cluster.local")
    assert classic.flags & dns.flags.TC
    assert len(classic.to_wire()) <= 512
    edns = ask(ZONE, "big.default.svc.cluster.local", use_edns=0, payload=4096)
    assert not edns.flags & dns.flags.TC
    assert len(addresses(edns)) == 60
    assert edns.payload == 1232  # what the server advertises
    small = ask(ZONE, "big.default.svc.cluster.local", use_edns=0, payload=600)
    assert small.flags & dns.flags.TC
    over_tcp = ask(ZONE, "big.default.svc.cluster.local", udp=False)
    assert not over_tcp.flags & dns.flags.TC
    assert len(addresses(over_tcp)) == 60


def test_other_opcodes_edns_versions_and_question_counts() -> None:
    query = dns.message.make_query("reviews.default.svc.cluster.local", "A")
    query.set_opcode(dns.opcode.STATUS)
    notimp = ZONE.answer(query.to_wire(), udp=True)
    assert notimp is not None
    assert dns.message.from_wire(notimp).rcode() == dns.rcode.NOTIMP

    badvers = ask(ZONE, "reviews.default.svc.cluster.local", use_edns=1)
    assert badvers.rcode() == dns.rcode.BADVERS

    two = dns.message.make_query("reviews.default.svc.cluster.local", "A")
    two.question.append(dns.message.make_query("dual.default.svc.cluster.local", "A").question[0])
    formerr = ZONE.answer(two.to_wire(), udp=True)
    assert formerr is not None
    assert dns.message.from_wire(formerr).rcode() == dns.rcode.FORMERR


def test_malformed_messages_get_formerr_or_are_dropped() -> None:
    assert ZONE.answer(b"\x12\x34\x01", udp=True) is None  # shorter than a header
    junk = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\xff\xff\xff"
    reply = ZONE.answer(junk, udp=True)
    assert reply is not None
    formerr = dns.message.from_wire(reply)
    assert (formerr.id, formerr.rcode()) == (0xABCD, dns.rcode.FORMERR)
    assert formerr.flags & dns.flags.QR
    # A response (QR set) is never answered: two servers could otherwise bounce messages forever.
    response = dns.message.make_response(dns.message.make_query("reviews.default.svc.cluster.local", "A"))
    assert ZONE.answer(response.to_wire(), udp=True) is None
    assert ZONE.answer(b"\xab\xcd\x81\x00" + b"\x00" * 8 + b"\xff", udp=True) is None


@given(st.binary(max_size=300))
def test_any_bytes_are_answered_or_dropped_never_raise(wire: bytes) -> None:
    reply = ZONE.answer(wire, udp=True)
    if reply is not None:
        assert len(reply) <= 1232
        assert dns.message.from_wire(reply).flags & dns.flags.QR


@pytest.mark.parametrize(
    ("records", "domain", "mentions"),
    [
        pytest.param({"a.example.com": []}, "cluster.local", "outside the domain", id="outside"),
        pytest.param(
            {"x" * 64 + ".cluster.local": []}, "cluster.local", "not a valid DNS name", id="long label"
        ),
        pytest.param({}, "bad..domain", "not a valid DNS name", id="bad domain"),
    ],
)
def test_zone_build_errors(records: dict[str, list[Address]], domain: str, mentions: str) -> None:
    with pytest.raises(ValueError, match=mentions):
        Zone.build(records, domain)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("10.79.0.254:53", ("10.79.0.254", 53), id="ipv4"),
        pytest.param("[::1]:5353", ("::1", 5353), id="ipv6"),
        pytest.param("127.0.0.1:0", ("127.0.0.1", 0), id="any port"),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["localhost:53", "10.0.0.1", "10.0.0.1:x", "10.0.0.1:70000", ":53"])
def test_parse_listen_errors(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(text)):
        parse_listen(text)


# ---------------------------------------------------------------------------------------------------
# The server over loopback


@asynccontextmanager
async def serving(
    records: dict[str, list[Address]] | None = None, limits: DnsLimits | None = None
) -> AsyncIterator[LabDns]:
    server = LabDns(RECORDS if records is None else records, limits=limits)
    await server.start(LOOPBACK, 0)
    try:
        yield server
    finally:
        await server.stop()


async def query_udp(port: int, name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    return await asyncio.to_thread(dns.query.udp, query, LOOPBACK, timeout=TIMEOUT, port=port)


async def query_tcp(port: int, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return await asyncio.to_thread(dns.query.tcp, query, LOOPBACK, timeout=TIMEOUT, port=port)


def raw_udp(port: int, payload: bytes, timeout: float) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload, (LOOPBACK, port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


async def test_udp_and_tcp_on_one_port_with_truncation_and_update() -> None:
    async with serving() as server:
        answer = await query_udp(server.port, "REVIEWS.default.svc.cluster.local")
        assert addresses(answer) == ["10.96.0.10"]
        truncated = await query_udp(server.port, "big.default.svc.cluster.local")
        assert truncated.flags & dns.flags.TC
        full = await query_tcp(server.port, "big.default.svc.cluster.local")
        assert len(addresses(full)) == 60
        missing = await query_tcp(server.port, "ratings.default.svc.cluster.local.svc.cluster.local")
        assert missing.rcode() == dns.rcode.NXDOMAIN

        server.update({"ratings.default.svc.cluster.local": [ip("10.96.0.20")]})
        assert addresses(await query_udp(server.port, "ratings.default.svc.cluster.local")) == ["10.96.0.20"]
        gone = await query_udp(server.port, "reviews.default.svc.cluster.local")
        assert gone.rcode() == dns.rcode.NXDOMAIN
        assert server.zone.serial == 2
        with pytest.raises(ValueError, match="outside the domain"):
            server.update({"reviews.example.org": []})
        assert addresses(await query_udp(server.port, "ratings.default.svc.cluster.local")) == ["10.96.0.20"]


async def test_malformed_packets_do_not_hurt_the_server() -> None:
    async with serving() as server:
        assert await asyncio.to_thread(raw_udp, server.port, b"\x00\x01\x02", 0.2) is None  # dropped
        reply = await asyncio.to_thread(
            raw_udp, server.port, b"\x00\x07" + b"\x01\x00" + b"\xff" * 20, TIMEOUT
        )
        assert reply is not None
        assert dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR

        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        try:
            junk = b"\x00\x09\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff"
            writer.write(len(junk).to_bytes(2, "big") + junk)
            await writer.drain()
            async with asyncio.timeout(TIMEOUT):
                length = int.from_bytes(await reader.readexactly(2), "big")
                framed = dns.message.from_wire(await reader.readexactly(length))
            assert (framed.id, framed.rcode()) == (9, dns.rcode.FORMERR)
            # A good query on the same connection still works; then a zero length ends the connection.
            query = dns.message.make_query("reviews.default.svc.cluster.local", "A")
            writer.write(query.to_wire(prepend_length=True) + b"\x00\x00")
            await writer.drain()
            async with asyncio.timeout(TIMEOUT):
                length = int.from_bytes(await reader.readexactly(2), "big")
                assert addresses(dns.message.from_wire(await reader.readexactly(length))) == ["10.96.0.10"]
                assert await reader.read() == b""
        finally:
            writer.close()
        assert addresses(await query_udp(server.port, "reviews.default.svc.cluster.local")) == ["10.96.0.10"]
        assert server.stats.dropped == 1


async def test_tcp_connection_limit_and_idle_timeout() -> None:
    async with serving(limits=DnsLimits(max_tcp_connections=1, tcp_idle_timeout=0.2)) as server:
        first_reader, first_writer = await asyncio.open_connection(LOOPBACK, server.port)
        second_reader, second_writer = await asyncio.open_connection(LOOPBACK, server.port)
        try:
            async with asyncio.timeout(TIMEOUT):
                assert await second_reader.read() == b""  # over the limit: closed at once
                assert await first_reader.read() == b""  # silent past the idle timeout
        finally:
            first_writer.close()
            second_writer.close()
        assert server.stats.tcp_refused == 1


async def test_stop_closes_tcp_connections_and_frees_the_port() -> None:
    server = LabDns(RECORDS)
    await server.start(LOOPBACK, 0)
    port = server.port
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        await server.stop()
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""
    finally:
        writer.close()
    again = LabDns(RECORDS)
    await again.start(LOOPBACK, port)  # both protocols were released
    await again.stop()


# ---------------------------------------------------------------------------------------------------
# The entry point: serving the lab's object store

SERVICE_YAML = """\
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  clusterIP: {ip}
  selector:
    app: {name}
  ports:
  - port: 9080
"""


async def wait_for_address(port: int, name: str, expected: list[str]) -> None:
    """Until the server answers `name` with `expected` (the directory watch needs a moment), bounded."""
    async with asyncio.timeout(15):
        while addresses(await query_udp(port, name)) != expected:  # noqa: ASYNC110 - polls a server
            await asyncio.sleep(0.05)


async def wait_for_rcode(port: int, name: str, rcode: dns.rcode.Rcode) -> None:
    async with asyncio.timeout(15):
        while (await query_udp(port, name)).rcode() != rcode:  # noqa: ASYNC110 - polls a server
            await asyncio.sleep(0.05)


async def test_module_follows_the_config_directory_until_sigterm(tmp_path: Path) -> None:
    (tmp_path / "reviews.yaml").write_text(SERVICE_YAML.format(name="reviews", ip="10.96.0.10"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH", "")]))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loom.lab.dns", "--config-dir", str(tmp_path), "--listen", f"{LOOPBACK}:0",
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        async with asyncio.timeout(15):
            while True:
                line = (await process.stderr.readline()).decode()
                assert line, "the DNS server exited before listening"
                found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                if found:
                    port = int(found.group(1))
                    break
        # Loaded before listening: the first answer already knows the Service.
        answer = await query_udp(port, "reviews.default.svc.cluster.local")
        assert addresses(answer) == ["10.96.0.10"]
        (tmp_path / "ratings.yaml").write_text(SERVICE_YAML.format(name="ratings", ip="10.96.0.11"))
        await wait_for_address(port, "ratings.default.svc.cluster.local", ["10.96.0.11"])
        (tmp_path / "reviews.yaml").unlink()
        await wait_for_rcode(port, "reviews.default.svc.cluster.local", dns.rcode.NXDOMAIN)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0


def test_module_rejects_bad_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from loom.lab.dns import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config-dir", str(tmp_path), "--listen", "nowhere:53"])
    assert exit_info.value.code == 2
    assert "nowhere:53" in capsys.readouterr().err
