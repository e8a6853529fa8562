"""Service VIPs as kube-proxy-style netfilter rules in a lab node's namespace, rendered as text; no I/O.

Theory of operation
-------------------
The lab plays kube-proxy (iptables mode) for traffic that no ztunnel handles (pods that are not
enrolled, and processes in the node namespace). Every node namespace gets the same rules:

nat table (rewrites the first packet of a connection; conntrack rewrites the rest, both directions)::

    PREROUTING  -j LOOM-SERVICES          traffic forwarded for the node's pods
    OUTPUT      -j LOOM-SERVICES          traffic of processes in the node namespace
    POSTROUTING -j LOOM-POSTROUTING
    LOOM-SERVICES     -d <vip>/32 -p tcp -m tcp --dport <port> -j LOOM-SVC-<hash>   per VIP:port
    LOOM-SVC-<hash>   -m statistic --mode random --probability 1/n     -j LOOM-SEP-<hash1>
                      -m statistic --mode random --probability 1/(n-1) -j LOOM-SEP-<hash2>
                      ...                                              -j LOOM-SEP-<hashn>
    LOOM-SEP-<hash>   -p tcp -m tcp -j DNAT --to-destination <backend ip>:<backend port>
    LOOM-POSTROUTING  -s <backend>/32 -d <backend>/32 -j MASQUERADE     per backend IP (hairpin)

The probabilities make every backend equally likely: the first is taken with 1/n, the second with
1/(n-1) of the remaining (n-1)/n, and so on; the last rule is unconditional.

filter table (the only table where REJECT is valid)::

    FORWARD -j LOOM-SERVICES
    OUTPUT  -j LOOM-SERVICES
    LOOM-SERVICES  -d <vip>/32 -p tcp -j REJECT --reject-with tcp-reset                 per VIP
                   -d <vip>/32 -j REJECT --reject-with icmp-port-unreachable

A packet that still carries a VIP as destination in filter was not DNATed (nat runs before filter on
both paths): the VIP:port has no backends, or the port is not one of the Service's. It is refused at once
(a TCP reset, so a client sees "connection refused" as with kube-proxy), never forwarded anywhere. The
network code gives each VIP a /32 route in the node (see `loom.lab.network`) so that such packets reach
the FORWARD/OUTPUT hooks instead of failing the routing lookup.

Why there is no masquerading between pods: the DNATed packet keeps the client pod's address as source.
The backend answers that address; its node routes the reply to the client's node over the wire (every
node routes every other node's pod range via that node's wire address), and the client's node is the
one that applied the DNAT, because a pod's only route is its own node's gateway. Its conntrack entry
turns the reply's source back into the VIP before the reply reaches the pod. Backends therefore see the
true client address, as in Kubernetes. The one exception is hairpin traffic (a pod reaching itself
through a VIP): the reply would be addressed to the pod's own address and delivered inside the pod
without passing the node, so LOOM-POSTROUTING masquerades connections whose source and destination are
the same backend; the pod then sees the node's gateway address as the peer.

Idempotent, atomic application
-------------------------------
The restore input is for `iptables-restore --noflush`, one transaction per table: declaring a chain
(`:LOOM-SVC-X - [0:0]`) creates it or flushes it, so every chain we own is rebuilt wholesale; chains we
owned that the new configuration no longer needs are flushed and deleted in the same transaction; nothing
outside our chains is touched except the jumps from the built-in chains. A jump cannot be "appended if
missing" in restore syntax, so the renderer reads the namespace's current `iptables-save` output and
inserts a jump only where it is missing (and deletes duplicates and stray references to our chains).
The chains we own are LOOM-SERVICES and LOOM-POSTROUTING and every chain named LOOM-SVC-* or LOOM-SEP-*
in the nat and filter tables. Callers serialise application per namespace (the save and the restore are
two steps).

The rule text is written as `iptables-save` prints it (e.g. the probability is rounded to the kernel's
31-bit fixed point and printed with 11 decimals) so `verify()` can compare rendered and saved rules.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cni.rules import SavedTable, parse_iptables_save, rule_target

SERVICES_CHAIN: Final = "LOOM-SERVICES"
POSTROUTING_CHAIN: Final = "LOOM-POSTROUTING"
SERVICE_CHAIN_PREFIX: Final = "LOOM-SVC-"
ENDPOINT_CHAIN_PREFIX: Final = "LOOM-SEP-"
# Built-in chain -> our chain it jumps to, per table, in the order the jumps are checked.
JUMPS: Final[Mapping[str, Mapping[str, str]]] = {
    "nat": {"PREROUTING": SERVICES_CHAIN, "OUTPUT": SERVICES_CHAIN, "POSTROUTING": POSTROUTING_CHAIN},
    "filter": {"FORWARD": SERVICES_CHAIN, "OUTPUT": SERVICES_CHAIN},
}
TABLES: Final = ("nat", "filter")
# Kubernetes Service port protocols; each has an iptables match module of the same (lower-case) name.
PROTOCOLS: Final = ("TCP", "UDP", "SCTP")
# xt_statistic keeps the probability as a 31-bit fixed-point fraction.
_STATISTIC_SCALE: Final = 0x80000000
# Hash characters in a chain name: 16 base32 characters (80 bits) keep "LOOM-SVC-" + hash at 25, under
# the 28 characters iptables allows, and make a collision between two VIPs practically impossible.
_HASH_CHARS: Final = 16
# Used inside a double-quoted iptables comment: no quotes, backslashes or whitespace.
_COMMENT = re.compile(r"^[A-Za-z0-9_.:/@=+-]{1,200}$")

IPv4Backend = tuple[ipaddress.IPv4Address, int]


class ServiceRulesError(ValueError):
    """A Service VIP (or a set of them) that cannot be turned into rules; the message names it."""


def _port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ServiceRulesError(f"{what}: {value!r} is not a port number (1-65535)")
    return value


def _ipv4(value: object, what: str) -> ipaddress.IPv4Address:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = value
    elif isinstance(value, str):
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise ServiceRulesError(f"{what}: {value!r} is not an IP address") from None
    else:
        raise ServiceRulesError(f"{what}: {value!r} is not an IP address")
    if not isinstance(address, ipaddress.IPv4Address):
        raise ServiceRulesError(f"{what}: {address} is IPv6; the lab's network is IPv4 only")
    return address


@dataclass(frozen=True, slots=True)
class ServiceVip:
    """One Service port on one ClusterIP and the pod endpoints behind it.

    Addresses may be given as `ipaddress` objects or strings and the protocol in any case; they are
    normalised (IPv4Address, upper-case protocol, backends sorted and checked for duplicates)."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address  # the ClusterIP (IPv4 only in the lab)
    port: int  # the Service port clients connect to
    protocol: str = "TCP"  # TCP, UDP or SCTP
    # (pod IP, target port) of every ready endpoint; empty: connections are refused.
    backends: tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], ...] = ()
    # Shown as a rule comment in iptables-save, e.g. "default/reviews:http"; optional.
    name: str = ""

    def __post_init__(self) -> None:
        where = f"service VIP {self.ip}:{self.port}"
        ip = _ipv4(self.ip, where)
        _port(self.port, f"{where} port")
        protocol = self.protocol.upper() if isinstance(self.protocol, str) else self.protocol
        if protocol not in PROTOCOLS:
            raise ServiceRulesError(
                f"{where}: protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}"
            )
        backends: list[IPv4Backend] = []
        for index, backend in enumerate(self.backends):
            if not isinstance(backend, tuple) or len(backend) != 2:
                raise ServiceRulesError(f"{where} backends[{index}]: {backend!r} is not an (ip, port) pair")
            entry = (
                _ipv4(backend[0], f"{where} backends[{index}]"),
                _port(backend[1], f"{where} backends[{index}]"),
            )
            if entry in backends:
                raise ServiceRulesError(f"{where}: backend {entry[0]}:{entry[1]} is listed twice")
            backends.append(entry)
        if self.name and not _COMMENT.match(self.name):
            raise ServiceRulesError(
                f"{where}: name {self.name!r} may hold only letters, digits and _.:/@=+- (at most 200)"
            )
        object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "protocol", protocol)
        object.__setattr__(self, "backends", tuple(sorted(backends)))

    @property
    def ipv4(self) -> ipaddress.IPv4Address:
        assert isinstance(self.ip, ipaddress.IPv4Address)  # guaranteed by __post_init__
        return self.ip

    @property
    def key(self) -> str:
        """What identifies the VIP:port (and names its chain): `TCP/10.96.0.10:9080`."""
        return f"{self.protocol}/{self.ip}:{self.port}"

    @property
    def service_chain(self) -> str:
        return SERVICE_CHAIN_PREFIX + _hash(self.key)

    def endpoint_chain(self, backend: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]) -> str:
        return ENDPOINT_CHAIN_PREFIX + _hash(f"{self.key}->{backend[0]}:{backend[1]}")


def _hash(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest).decode()[:_HASH_CHARS]


def statistic_probability(probability: float) -> str:
    """`probability` as `iptables-save` prints an xt_statistic random match (11 decimals of the kernel's
    31-bit fixed-point value), so rendered rules compare equal to saved ones."""
    if not 0.0 < probability <= 1.0:
        raise ServiceRulesError(f"probability {probability} is not in (0, 1]")
    fixed = int(probability * _STATISTIC_SCALE + 0.5)  # what iptables stores (it rounds half up)
    return f"{fixed / _STATISTIC_SCALE:.11f}"


@dataclass(frozen=True, slots=True)
class ChainRule:
    """One rule: `-A <chain> <spec>` in `table`, with `spec` as iptables-save prints it."""

    table: str
    chain: str
    spec: str

    @property
    def line(self) -> str:
        return f"-A {self.chain} {self.spec}"


@dataclass(frozen=True, slots=True)
class ServiceRules:
    """The desired chains and rules for a set of Service VIPs."""

    chains: Mapping[str, tuple[str, ...]]  # table -> every chain we want there, fixed ones first
    rules: tuple[ChainRule, ...]  # in evaluation order within each chain

    def rules_of(self, table: str, chain: str) -> tuple[str, ...]:
        return tuple(rule.spec for rule in self.rules if rule.table == table and rule.chain == chain)


def check_unique(services: Iterable[ServiceVip]) -> list[ServiceVip]:
    """`services` sorted by VIP, port and protocol; raises if a VIP:port/protocol appears twice."""
    by_key: dict[tuple[ipaddress.IPv4Address, int, str], ServiceVip] = {}
    for service in services:
        if not isinstance(service, ServiceVip):
            raise ServiceRulesError(f"{service!r} is not a ServiceVip")
        key = (service.ipv4, service.port, service.protocol)
        if key in by_key:
            raise ServiceRulesError(f"service VIP {service.key} is given twice")
        by_key[key] = service
    return [by_key[key] for key in sorted(by_key)]


def desired_rules(services: Iterable[ServiceVip]) -> ServiceRules:
    """Every chain and rule for `services` (pure; the same input always gives the same rules)."""
    ordered = check_unique(services)
    nat_chains: list[str] = [SERVICES_CHAIN, POSTROUTING_CHAIN]
    nat_services: list[ChainRule] = []
    nat_sub: list[ChainRule] = []
    hairpin: set[ipaddress.IPv4Address] = set()
    for service in ordered:
        if not service.backends:
            continue  # refused in filter LOOM-SERVICES
        proto = service.protocol.lower()
        comment = f' -m comment --comment "{service.name}"' if service.name else ""
        svc_chain = service.service_chain
        nat_chains.append(svc_chain)
        nat_services.append(
            ChainRule(
                "nat",
                SERVICES_CHAIN,
                f"-d {service.ip}/32 -p {proto} -m {proto} --dport {service.port}{comment} -j {svc_chain}",
            )
        )
        count = len(service.backends)
        for index, backend in enumerate(service.backends):
            sep_chain = service.endpoint_chain(backend)
            nat_chains.append(sep_chain)
            remaining = count - index
            if remaining > 1:
                choose = f"-m statistic --mode random --probability {statistic_probability(1 / remaining)} "
            else:
                choose = ""
            nat_sub.append(ChainRule("nat", svc_chain, f"{choose}-j {sep_chain}"))
            nat_sub.append(
                ChainRule(
                    "nat",
                    sep_chain,
                    f"-p {proto} -m {proto} -j DNAT --to-destination {backend[0]}:{backend[1]}",
                )
            )
            hairpin.add(_ipv4(backend[0], service.key))
    postrouting = [
        ChainRule("nat", POSTROUTING_CHAIN, f"-s {ip}/32 -d {ip}/32 -j MASQUERADE") for ip in sorted(hairpin)
    ]
    filter_rules: list[ChainRule] = []
    for vip in sorted({service.ipv4 for service in ordered}):
        filter_rules.append(
            ChainRule("filter", SERVICES_CHAIN, f"-d {vip}/32 -p tcp -j REJECT --reject-with tcp-reset")
        )
        filter_rules.append(
            ChainRule("filter", SERVICES_CHAIN, f"-d {vip}/32 -j REJECT --reject-with icmp-port-unreachable")
        )
    return ServiceRules(
        chains={"nat": tuple(nat_chains), "filter": (SERVICES_CHAIN,)},
        rules=(*nat_services, *postrouting, *nat_sub, *filter_rules),
    )


def is_owned_chain(chain: str) -> bool:
    """Whether `chain` (in nat or filter) is one this module manages."""
    return chain in (SERVICES_CHAIN, POSTROUTING_CHAIN) or chain.startswith(
        (SERVICE_CHAIN_PREFIX, ENDPOINT_CHAIN_PREFIX)
    )


def _foreign_references(table: SavedTable) -> list[tuple[str, str]]:
    """Rules in chains we do not own that jump or go to one we own."""
    found: list[tuple[str, str]] = []
    for chain, spec in table.rules:
        target = rule_target(spec)
        if not is_owned_chain(chain) and target is not None and is_owned_chain(target):
            found.append((chain, spec))
    return found


def render_restore(services: Iterable[ServiceVip], current: str) -> str:
    """Input for `iptables-restore --noflush` that puts exactly the rules for `services` in place.

    `current` is the namespace's `iptables-save` output ("" for a namespace with no rules at all)."""
    desired = desired_rules(services)
    saved = parse_iptables_save(current)
    sections: list[str] = []
    for table in TABLES:
        present = saved.get(table)
        wanted = desired.chains[table]
        lines = [f"*{table}"]
        lines += [f":{chain} - [0:0]" for chain in wanted]  # creates, or flushes when it exists
        jumps = JUMPS[table]
        kept: set[str] = set()
        if present is not None:
            for chain, spec in _foreign_references(present):
                exact = jumps.get(chain)
                if exact is not None and spec == f"-j {exact}" and chain not in kept:
                    kept.add(chain)
                else:
                    lines.append(f"-D {chain} {spec}")
        # First position: a Service VIP must be translated before anything else in the node decides.
        lines += [f"-I {builtin} 1 -j {ours}" for builtin, ours in jumps.items() if builtin not in kept]
        lines += [rule.line for rule in desired.rules if rule.table == table]
        stale = [
            chain
            for chain in (present.chains if present else ())
            if is_owned_chain(chain) and chain not in wanted
        ]
        # Flush every stale chain before deleting any: stale chains may reference each other.
        lines += [f"-F {chain}" for chain in stale]
        lines += [f"-X {chain}" for chain in stale]
        lines.append("COMMIT")
        sections.append("\n".join(lines) + "\n")
    return "".join(sections)


def render_removal(current: str) -> str:
    """Input for `iptables-restore --noflush` removing every chain we own and every reference to them;
    "" when there is nothing to remove."""
    saved = parse_iptables_save(current)
    sections: list[str] = []
    for table in TABLES:
        present = saved.get(table)
        if present is None:
            continue
        owned = [chain for chain in present.chains if is_owned_chain(chain)]
        references = _foreign_references(present)
        if not owned and not references:
            continue
        lines = [f"*{table}"]
        lines += [f"-D {chain} {spec}" for chain, spec in references]
        lines += [f"-F {chain}" for chain in owned]
        lines += [f"-X {chain}" for chain in owned]
        lines.append("COMMIT")
        sections.append("\n".join(lines) + "\n")
    return "".join(sections)


def verify(services: Iterable[ServiceVip], current: str) -> tuple[str, ...]:
    """Problems with the service rules in `current` (iptables-save output); empty when exactly in place."""
    desired = desired_rules(services)
    saved = parse_iptables_save(current)
    problems: list[str] = []
    for table in TABLES:
        present = saved.get(table)
        if present is None:
            problems.append(f"{table}: table has none of the service rules")
            continue
        wanted = desired.chains[table]
        for chain in wanted:
            if chain not in present.chains:
                problems.append(f"{table}: chain {chain} is missing")
                continue
            expected = desired.rules_of(table, chain)
            found = present.rules_of(chain)
            if found != expected:
                problems.append(f"{table} {chain}: expected {list(expected)}, found {list(found)}")
        problems += [
            f"{table}: chain {chain} is no longer needed"
            for chain in present.chains
            if is_owned_chain(chain) and chain not in wanted
        ]
        for builtin, ours in JUMPS[table].items():
            jumps = present.rules_of(builtin).count(f"-j {ours}")
            if jumps != 1:
                problems.append(f"{table} {builtin}: expected one jump to {ours}, found {jumps}")
        problems += [
            f"{table} {chain}: unexpected reference to a service chain: {spec}"
            for chain, spec in _foreign_references(present)
            if JUMPS[table].get(chain) is None or spec != f"-j {JUMPS[table][chain]}"
        ]
    return tuple(problems)


def vip_addresses(services: Sequence[ServiceVip]) -> tuple[ipaddress.IPv4Address, ...]:
    """The distinct VIPs of `services`, sorted: each needs a route in the node (see the module doc)."""
    return tuple(sorted({service.ipv4 for service in services}))
