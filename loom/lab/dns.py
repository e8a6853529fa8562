"""The lab's cluster DNS: Service names resolve inside lab pods as they do in Kubernetes.

Theory of operation
-------------------
Lab pods get a resolv.conf naming this server, with the Kubernetes search list (``<ns>.svc.cluster.local
svc.cluster.local cluster.local``, ``ndots:5``), so ``reviews``, ``reviews.default`` and
``reviews.default.svc.cluster.local`` all reach a query for ``reviews.default.svc.cluster.local``.

*Records.* `records_from_snapshot` (pure) turns the configuration into a map name -> addresses:

* ``<service>.<namespace>.svc.<domain>``: the Service's cluster IPs; for a headless Service
  (``clusterIP: None``) the addresses of the ready, running pods its selector picks (what Kubernetes
  publishes as endpoints), sorted so answers are stable;
* ``<a-b-c-d>.<namespace>.pod.<domain>``: each running pod's own addresses (IPv6 with ``-`` for ``:``),
  only for pods that exist, unlike CoreDNS's "pods insecure" mode which answers any address.

A Service that exists but has no address yet (no cluster IP allocated, no ready pod behind a headless
one) is kept with no addresses: its name exists and answers "no data" rather than "no such name".
ExternalName Services are not modelled (no externalName field) and get no records.

*Answers* (`Zone.answer`, pure, wire bytes in and out, built on dnspython):

* a name with records: its A / AAAA records (ANY: both), authoritative (AA), no recursion offered;
  another type, or a family the name has no address of: NOERROR with no answer and the zone's SOA in
  the authority section (negative caching, RFC 2308);
* a name in the domain that is neither a record nor an ancestor of one: NXDOMAIN with the SOA. This
  is the common case: the search list makes a resolver try ``reviews.default.svc.cluster.local.
  default.svc.cluster.local`` first, and it must fail fast; ancestors such as ``svc.cluster.local``
  exist (empty non-terminals) and answer "no data";
* a name outside the domain: REFUSED. The lab never recurses: it must never reach the internet.

Names compare case-insensitively (DNS names do; dnspython's `Name` hashes and compares that way).
Malformed input never raises: a datagram shorter than a header, or one with the QR bit set (a
response: answering it could start a loop between two servers), is dropped; anything else that does
not parse gets FORMERR; a query of another opcode NOTIMP; an EDNS version above 0 BADVERS.

*Transport.* UDP answers fit in 512 bytes without EDNS, or in the client's EDNS payload size up to
1232 bytes (the DNS flag day 2020 value, which avoids IP fragmentation); a larger answer is
truncated with the TC bit set and the resolver retries over TCP. TCP uses the 2-byte length framing
(RFC 1035 4.2.2), several queries per connection, bounded in connections and idle time. UDP and TCP
share one port; with port 0 the UDP port is picked first and TCP bound to the same number.

`LabDns.update` swaps the whole zone at once (one assignment), so a query sees the old or the new
records, never a mix. ``python -m loom.lab.dns --config-dir DIR --listen IP:PORT`` follows the lab's
object store with `DirectorySource` and serves it until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from loom.resources.model import ConfigSnapshot, LabelSelector, Pod, Service

log = logging.getLogger("loom.lab.dns")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_DOMAIN: Final = "cluster.local"
# Short, because lab objects change while pods run; resolvers re-ask every few seconds.
DEFAULT_TTL: Final = 5
# Without EDNS a UDP answer must fit in 512 bytes (RFC 1035); with EDNS at most this much.
CLASSIC_UDP_SIZE: Final = 512
MAX_UDP_PAYLOAD: Final = 1232
_HEADER_SIZE: Final = 12


@dataclass(frozen=True, slots=True)
class DnsLimits:
    # Concurrent TCP connections; one more is closed at once (resolvers use TCP only after truncation).
    max_tcp_connections: int = 256
    # Seconds a TCP connection may wait for its next query.
    tcp_idle_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.max_tcp_connections < 1 or not self.tcp_idle_timeout > 0:
            raise ValueError(
                f"DnsLimits: max_tcp_connections={self.max_tcp_connections} must be >= 1 and "
                f"tcp_idle_timeout={self.tcp_idle_timeout} > 0"
            )


def service_name(service: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    return f"{service}.{namespace}.svc.{domain}"


def pod_name(ip: Address, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    """``10-80-1-5.default.pod.cluster.local``: the address with its separators turned into dashes."""
    dashed = str(ip).replace(".", "-").replace(":", "-")
    return f"{dashed}.{namespace}.pod.{domain}"


def _addresses(texts: Sequence[str]) -> list[Address]:
    found: list[Address] = []
    for text in texts:
        try:
            found.append(ipaddress.ip_address(text))
        except ValueError:
            log.warning("ignoring %r: not an IP address", text)  # the loader reports it with its file
    return found


def _sorted(addresses: set[Address]) -> list[Address]:
    return sorted(addresses, key=lambda a: (a.version, int(a)))


def _is_dns_name(name: str) -> bool:
    try:
        dns.name.from_text(name)
    except dns.exception.DNSException:
        return False
    return True


def records_from_snapshot(snapshot: ConfigSnapshot, domain: str = DEFAULT_DOMAIN) -> dict[str, list[Address]]:
    """Every name the lab DNS answers, with its addresses (see the module docstring). A name that
    cannot be a DNS name (a label over 63 bytes) is left out with a warning, so that one odd object
    does not hold back every other record."""
    running = [pod for pod in snapshot.of_kind(Pod) if pod.phase not in ("Failed", "Succeeded") and pod.ips]
    records: dict[str, list[Address]] = {}
    for service in snapshot.of_kind(Service):
        if service.type == "ExternalName":
            continue
        name = service_name(service.name, service.namespace, domain)
        if not service.headless:
            records[name] = _addresses(service.cluster_ips)
            continue
        endpoints: set[Address] = set()
        # No selector: endpoints are managed by someone else (none in the lab); an empty selector
        # selects nothing (Kubernetes semantics, as the model says).
        if service.selector:
            selector = LabelSelector(match_labels=service.selector)
            for pod in running:
                if pod.namespace == service.namespace and pod.ready and selector.matches(pod.meta.labels):
                    endpoints.update(_addresses(pod.ips))
        records[name] = _sorted(endpoints)
    for pod in running:
        for address in _addresses(pod.ips):
            records.setdefault(pod_name(address, pod.namespace, domain), []).append(address)
    for name in [name for name in records if not _is_dns_name(name)]:
        log.warning("no DNS record for %r: not a valid DNS name", name)
        del records[name]
    return records


def _formerr(wire: bytes) -> bytes | None:
    """FORMERR for a message dnspython could not parse, echoing its id and opcode; None to drop it."""
    if len(wire) < _HEADER_SIZE or wire[2] & 0x80:  # no header, or a response (QR set)
        return None
    reply = dns.message.Message(id=int.from_bytes(wire[0:2], "big"))
    reply.flags = dns.flags.QR
    reply.set_opcode(dns.opcode.from_flags(int.from_bytes(wire[2:4], "big")))
    reply.set_rcode(dns.rcode.FORMERR)
    return reply.to_wire()


@dataclass(frozen=True, slots=True)
class Zone:
    """An immutable snapshot of the records for one domain, able to answer queries."""

    domain: dns.name.Name
    records: Mapping[dns.name.Name, tuple[Address, ...]]
    nonterminals: frozenset[dns.name.Name]  # ancestors of record names inside the domain
    ttl: int
    serial: int

    @classmethod
    def build(
        cls,
        records: Mapping[str, Sequence[Address]],
        domain: str = DEFAULT_DOMAIN,
        *,
        ttl: int = DEFAULT_TTL,
        serial: int = 1,
    ) -> Zone:
        """ValueError naming the record when a name is not a valid DNS name or lies outside `domain`."""
        if not 0 <= ttl <= 2**31 - 1:
            raise ValueError(f"ttl={ttl} is not valid: it must be from 0 to {2**31 - 1} seconds")
        try:
            origin = dns.name.from_text(domain)
        except dns.exception.DNSException as err:
            raise ValueError(f"domain {domain!r} is not a valid DNS name: {err}") from err
        by_name: dict[dns.name.Name, tuple[Address, ...]] = {}
        nonterminals: set[dns.name.Name] = set()
        for text, addresses in records.items():
            try:
                name = dns.name.from_text(text)
            except dns.exception.DNSException as err:
                raise ValueError(f"record {text!r} is not a valid DNS name: {err}") from err
            if not name.is_subdomain(origin):
                raise ValueError(f"record {text!r} is outside the domain {domain!r} this server answers for")
            by_name[name] = tuple(dict.fromkeys([*by_name.get(name, ()), *addresses]))
            parent = name
            while parent != origin:
                parent = parent.parent()
                nonterminals.add(parent)
        return cls(origin, by_name, frozenset(nonterminals), ttl, serial)

    def answer(self, wire: bytes, *, udp: bool) -> bytes | None:
        """The response to one query message, or None when it must be dropped (see module docstring)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.message.ShortHeader:
            return None
        except Exception:  # dnspython raises several kinds for hostile input; all mean "cannot parse"
            return _formerr(wire)
        if query.flags & dns.flags.QR:
            return None
        response = dns.message.make_response(query, recursion_available=False, our_payload=MAX_UDP_PAYLOAD)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
        elif query.edns > 0:
            response.set_rcode(dns.rcode.BADVERS)
        elif len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
        else:
            question = query.question[0]
            self._resolve(response, question.name, question.rdtype, question.rdclass)
        if udp:
            limit = (
                CLASSIC_UDP_SIZE
                if query.edns < 0
                else min(max(query.payload, CLASSIC_UDP_SIZE), MAX_UDP_PAYLOAD)
            )
        else:
            limit = 65535
        return response.to_wire(max_size=limit, prefer_truncation=True)

    def _resolve(
        self,
        response: dns.message.Message,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        rdclass: dns.rdataclass.RdataClass,
    ) -> None:
        if not qname.is_subdomain(self.domain) or rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            return
        response.flags |= dns.flags.AA
        addresses = self.records.get(qname)
        if addresses is None and qname != self.domain and qname not in self.nonterminals:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
            return
        wanted: list[tuple[dns.rdatatype.RdataType, int]] = []
        if rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            wanted.append((dns.rdatatype.A, 4))
        if rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY):
            wanted.append((dns.rdatatype.AAAA, 6))
        for record_type, version in wanted:
            texts = [str(a) for a in addresses or () if a.version == version]
            if texts:
                response.answer.append(dns.rrset.from_text_list(qname, self.ttl, "IN", record_type, texts))
        if rdtype == dns.rdatatype.SOA and qname == self.domain:
            response.answer.append(self._soa())
        if not response.answer:
            response.authority.append(self._soa())

    def _soa(self) -> dns.rrset.RRset:
        # Negative answers are cached for the SOA minimum: the same short TTL as the records.
        domain = self.domain.to_text()
        rdata = f"ns.dns.{domain} hostmaster.{domain} {self.serial} 7200 1800 86400 {self.ttl}"
        return dns.rrset.from_text(self.domain, self.ttl, "IN", "SOA", rdata)


@dataclass(slots=True)
class DnsStats:
    queries: int = 0  # messages received (UDP and TCP)
    dropped: int = 0  # received but not answered (short, a response, or a send error)
    tcp_refused: int = 0  # TCP connections closed at once (max_tcp_connections open)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: LabDns) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Neither asyncio's selector transport nor uvloop's derive from DatagramTransport; both have sendto.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self._server.respond(data, udp=True)
        if reply is None or self._transport is None:
            return
        try:
            self._transport.sendto(reply, addr)
        except OSError as err:
            self._server.stats.dropped += 1
            log.debug("cannot answer %s: %s", addr, err)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier answers (the client went away): nothing to do.
        log.debug("UDP error: %s", exc)


class LabDns:
    """An asyncio DNS server for the lab's records, UDP and TCP on one port."""

    def __init__(
        self,
        records: Mapping[str, Sequence[Address]],
        *,
        domain: str = DEFAULT_DOMAIN,
        ttl: int = DEFAULT_TTL,
        limits: DnsLimits | None = None,
    ) -> None:
        self.domain = domain
        self.ttl = ttl
        self.limits = limits or DnsLimits()
        self.stats = DnsStats()
        self._zone = Zone.build(records, domain, ttl=ttl)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_connections: set[asyncio.Task[object]] = set()
        self._stopping = False
        self.host = ""
        self.port = 0

    @property
    def zone(self) -> Zone:
        return self._zone

    def update(self, records: Mapping[str, Sequence[Address]]) -> None:
        """Serve `records` from now on (all at once); ValueError leaves the previous records in place."""
        self._zone = Zone.build(records, self.domain, ttl=self.ttl, serial=self._zone.serial + 1)

    def respond(self, wire: bytes, *, udp: bool) -> bytes | None:
        self.stats.queries += 1
        try:
            reply = self._zone.answer(wire, udp=udp)
        except Exception:  # never let one query take the server down; the client will retry
            log.exception("answering a DNS query failed")
            reply = None
        if reply is None:
            self.stats.dropped += 1
        return reply

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port over UDP and TCP (port 0: a free port, the same for both)."""
        loop = asyncio.get_running_loop()
        self._stopping = False
        attempts = 16 if port == 0 else 1
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(host, port))
            bound = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._accept_tcp, host, bound, reuse_address=True)
            except OSError:
                udp.close()
                if attempt + 1 == attempts:
                    raise
                continue  # another process holds that TCP port: pick another UDP port
            self._udp, self.host, self.port = udp, host, bound
            return

    async def stop(self) -> None:
        self._stopping = True
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        tcp, self._tcp = self._tcp, None
        if tcp is not None:
            tcp.close()
        tasks = list(self._tcp_connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tcp is not None:
            await tcp.wait_closed()

    async def _accept_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping:  # accepted by the kernel before `stop`, handed to us after it
            writer.close()
            return
        if len(self._tcp_connections) >= self.limits.max_tcp_connections:
            self.stats.tcp_refused += 1
            writer.close()
            return
        # A task of our own, not start_server's: `stop` cancels these, and Python 3.11's streams log a
        # spurious error when the task they created is cancelled.
        task = asyncio.create_task(self._serve_tcp(reader, writer), name="dns-tcp-connection")
        self._tcp_connections.add(task)
        task.add_done_callback(self._tcp_connections.discard)
        # Also when `stop` cancels the task before it ever ran (its own `finally` then never runs).
        task.add_done_callback(lambda _: writer.close())

    # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose the cancellation `stop` sends.
    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(self.limits.tcp_idle_timeout):
                    prefix = await reader.readexactly(2)
                length = int.from_bytes(prefix, "big")
                if length == 0:
                    return
                async with asyncio.timeout(self.limits.tcp_idle_timeout):
                    wire = await reader.readexactly(length)
                reply = self.respond(wire, udp=False)
                if reply is None:
                    return  # not a query we can answer: no framing-safe way to go on
                writer.write(len(reply).to_bytes(2, "big") + reply)
                async with asyncio.timeout(self.limits.tcp_idle_timeout):
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the client went away or stayed silent: both end the connection
        except Exception:
            log.exception("DNS TCP connection failed")
        finally:
            writer.close()


# ---------------------------------------------------------------------------------------------------
# Entry point: serve the lab's object store


def parse_listen(text: str) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT``; ValueError naming what is wrong."""
    host, colon, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--listen {text!r}: the address must be an IP address (IP:PORT)") from None
    if not colon or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"--listen {text!r}: the port must be a number from 0 to 65535 (IP:PORT)")
    return host, int(port_text)


async def serve_directory(
    config_dir: Path,
    host: str,
    port: int,
    *,
    domain: str = DEFAULT_DOMAIN,
    ttl: int = DEFAULT_TTL,
    ready: Callable[[LabDns], None] | None = None,
) -> int:
    """Serve the records of the store in `config_dir` until SIGTERM/SIGINT; the exit code."""
    from controller.sources.directory import DirectorySource  # watchfiles: only the server needs it

    try:
        source = DirectorySource([config_dir])
    except FileNotFoundError as err:
        log.error("%s", err)
        return 1
    server = LabDns({}, domain=domain, ttl=ttl)

    def on_change(snapshot: ConfigSnapshot, _diagnostics: object) -> None:
        try:
            server.update(records_from_snapshot(snapshot, domain))
        except ValueError as err:  # e.g. a name too long for DNS; keep serving the last good records
            log.error("cannot serve the new records: %s", err)
            return
        log.info("serving %d names (zone serial %d)", len(server.zone.records), server.zone.serial)

    # Load before listening, so that no query is answered NXDOMAIN for a Service that exists.
    snapshot, _ = await source.load_once()
    on_change(snapshot, ())
    try:
        await server.start(host, port)
    except OSError as err:
        log.error("the lab DNS cannot listen on %s:%d: %s", host, port, err)
        return 1
    log.info("lab DNS for %s listening on %s:%d (udp+tcp)", domain, host, server.port)
    if ready is not None:
        ready(server)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watch = asyncio.create_task(source.run(on_change), name="dns-config-watch")
    try:
        stopped = asyncio.create_task(stop.wait(), name="dns-stop")
        await asyncio.wait({watch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await server.stop()
    if watch.done() and not watch.cancelled() and watch.exception() is not None:
        log.error("watching %s failed: %s", config_dir, watch.exception())
        return 1
    log.info("lab DNS stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loom.lab.dns", description="The lab's cluster DNS server."
    )
    parser.add_argument(
        "--config-dir", required=True, type=Path, help="the lab object store (LAB_DIR/config)"
    )
    parser.add_argument("--listen", required=True, help="IP:PORT for UDP and TCP (port 0: any free port)")
    parser.add_argument("--domain", default=DEFAULT_DOMAIN, help="cluster domain (default cluster.local)")
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="record TTL in seconds (default 5)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    try:
        host, port = parse_listen(args.listen)
        Zone.build({}, args.domain, ttl=args.ttl)  # validates the domain and TTL before starting
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The watcher logs every file event at debug; keep that out of the DNS server's debug log.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)

    async def run() -> int:
        return await serve_directory(args.config_dir, host, port, domain=args.domain, ttl=args.ttl)

    try:
        import uvloop
    except ImportError:
        return asyncio.run(run())
    result: int = uvloop.run(run())
    return result


if __name__ == "__main__":
    sys.exit(main())
