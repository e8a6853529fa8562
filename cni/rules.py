"""The in-pod traffic redirection rules (reference §4.1), rendered as text and data; no I/O.

Theory of operation
-------------------
An enrolled pod's own network namespace carries a few netfilter rules and one policy-routing rule that
steer the pod's TCP traffic into the node's ztunnel, which listens *inside* that namespace:

* outbound: locally generated TCP to anything but loopback is REDIRECTed (nat OUTPUT) to 15001, where
  ztunnel reads the original destination with SO_ORIGINAL_DST;
* inbound: TCP arriving from outside is REDIRECTed (nat PREROUTING) to 15006, except HBONE to 15008, which
  ztunnel terminates itself;
* every socket ztunnel opens in the pod carries SO_MARK 0x539 and every REDIRECT skips that mark, so
  ztunnel never captures its own connections;
* inbound, ztunnel connects to the app with the *client's* address as source (a transparent socket), so
  the app's reply is addressed to a non-local IP and would leave through eth0. To bring it back, the
  marked SYN sets connmark 0x111 as it enters (mangle PREROUTING), the replies get the mark restored
  (mangle OUTPUT), and `ip rule fwmark 0x111/0xfff lookup 100` with a `local 0.0.0.0/0 dev lo` route in
  table 100 delivers them to ztunnel's transparent socket; nat OUTPUT ACCEPTs 0x111 packets so they are
  not redirected to 15001 on the way;
* kubelet probes are SNATed to 169.254.7.127 by the node, and they (and their replies) pass uncaptured.

DNS capture (UDP and TCP port 53 redirected to 15053, plus raw-table conntrack zone rules that keep the
proxy's own upstream queries apart from the app's) is OFF by default: loom has no DNS proxy on 15053 yet,
and capturing DNS without one would black-hole name resolution in every enrolled pod. The raw table is
used only when DNS capture is on.

Idempotent application
----------------------
All rules live in our own chains ISTIO_PRERT and ISTIO_OUTPUT, reached from one jump in the built-in
PREROUTING and OUTPUT chains of each table. The restore input is for `iptables-restore --noflush`:
declaring a chain (`:ISTIO_PRERT - [0:0]`) creates it or flushes it, so re-applying replaces our rules
wholesale, atomically per table (one COMMIT), without touching anybody else's rules. A jump in a built-in
chain cannot be made idempotent in restore syntax (there is no "append if missing"), so the renderer takes
the namespace's current `iptables-save` output and emits the jump only where it is missing, deletes
duplicates and stray references, and cleans up tables the configuration no longer uses (the raw table once
DNS capture is turned off). Callers serialise apply/remove per namespace (the save and the restore are two
steps). Removal deletes every reference to our chains, then flushes and deletes them; the ip rule and the
route are removed with the `ip` argument vectors of `PolicyRule`/`LocalRoute`.

The rule text is written exactly as `iptables-save` prints it (e.g. the implicit `-m tcp`), so `verify()`
can compare the rendered rules with a namespace's saved rules line by line.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

# ztunnel marks every socket it opens in a pod with this (SO_MARK); REDIRECTs skip it.
INPOD_MARK: Final = 0x539
# Only the low 12 bits are ours: other components (CNIs, kube-proxy) use the rest of the mark.
INPOD_MASK: Final = 0xFFF
# Connmark given to inbound connections ztunnel opens with a spoofed source; selects policy routing.
INPOD_TPROXY_MARK: Final = 0x111
# The routing table holding the `local` default route that returns spoofed-connection replies to ztunnel.
ROUTE_TABLE_INBOUND: Final = 100
# Just below the main table's rule (32766) so it is consulted first, and above user rules.
POLICY_RULE_PRIORITY: Final = 32764

OUTBOUND_PORT: Final = 15001
INBOUND_PLAINTEXT_PORT: Final = 15006
INBOUND_HBONE_PORT: Final = 15008
DNS_PROXY_PORT: Final = 15053

# Source address the node SNATs kubelet probes to; traffic from/to it is never captured.
PROBE_SNAT_IPV4: Final = "169.254.7.127"
PROBE_SNAT_IPV6: Final = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"

PRERT_CHAIN: Final = "ISTIO_PRERT"
OUTPUT_CHAIN: Final = "ISTIO_OUTPUT"
OUR_CHAINS: Final = (PRERT_CHAIN, OUTPUT_CHAIN)
# Built-in chain -> our chain it jumps to (the same pair in every table we use).
JUMPS: Final[Mapping[str, str]] = {"PREROUTING": PRERT_CHAIN, "OUTPUT": OUTPUT_CHAIN}
# Every table that may hold our chains, in the order the restore input lists them.
ALL_TABLES: Final = ("mangle", "nat", "raw")

_RESTORE_ALL_BITS: Final = 0xFFFFFFFF
# Linux interface names: at most 15 bytes, no whitespace, '/' or ':' (and not "." / "..").
_IFNAME = re.compile(r"^(?!\.{1,2}$)[^\s/:]{1,15}$")


class InpodRulesError(ValueError):
    """A configuration value or an `iptables-save` text that the rules cannot be built from."""


class IptablesSaveError(InpodRulesError):
    """`iptables-save` output that does not parse; names the line."""


class IpFamily(enum.Enum):
    """The address family a rule set is for; each has its own tables, tools and addresses."""

    V4 = 4
    V6 = 6

    @property
    def ip_flag(self) -> str:
        return "-4" if self is IpFamily.V4 else "-6"

    @property
    def restore_command(self) -> str:
        return "iptables-restore" if self is IpFamily.V4 else "ip6tables-restore"

    @property
    def save_command(self) -> str:
        return "iptables-save" if self is IpFamily.V4 else "ip6tables-save"

    @property
    def loopback(self) -> str:
        """The loopback host as iptables-save prints it (the destination outbound capture skips)."""
        return "127.0.0.1/32" if self is IpFamily.V4 else "::1/128"

    @property
    def default_destination(self) -> str:
        return "0.0.0.0/0" if self is IpFamily.V4 else "::/0"

    @property
    def host_prefix(self) -> int:
        return 32 if self is IpFamily.V4 else 128


@dataclass(frozen=True, slots=True)
class InpodConfig:
    """What varies between pods and deployments; every default matches Istio's in-pod mode."""

    # Redirect DNS (port 53) to the DNS proxy on `dns_port`. Off: loom has no DNS proxy yet.
    dns_capture: bool = False
    # Redirect inbound TCP to `inbound_plaintext_port`. False is Istio's "ingress mode"
    # (ambient.istio.io/bypass-inbound-capture) for pods that take traffic from outside the mesh.
    inbound_capture: bool = True
    # Extra pod interfaces whose incoming TCP is treated as outbound (istio.io/reroute-virtual-interfaces,
    # used by KubeVirt VMs whose traffic enters the pod through a tap device).
    virtual_interfaces: tuple[str, ...] = ()
    mark: int = INPOD_MARK
    tproxy_mark: int = INPOD_TPROXY_MARK
    mask: int = INPOD_MASK
    route_table: int = ROUTE_TABLE_INBOUND
    rule_priority: int = POLICY_RULE_PRIORITY
    outbound_port: int = OUTBOUND_PORT
    inbound_plaintext_port: int = INBOUND_PLAINTEXT_PORT
    inbound_hbone_port: int = INBOUND_HBONE_PORT
    dns_port: int = DNS_PROXY_PORT
    probe_snat_ipv4: str = PROBE_SNAT_IPV4
    probe_snat_ipv6: str = PROBE_SNAT_IPV6

    def __post_init__(self) -> None:
        problems: list[str] = []
        ports = {
            "outbound_port": self.outbound_port,
            "inbound_plaintext_port": self.inbound_plaintext_port,
            "inbound_hbone_port": self.inbound_hbone_port,
            "dns_port": self.dns_port,
        }
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                problems.append(f"{name}={port} is not a TCP port (1-65535)")
        if len(set(ports.values())) != len(ports):
            problems.append(f"ports must be distinct, got {ports}")
        if not 1 <= self.mask <= 0xFFFFFFFF:
            problems.append(f"mask={self.mask:#x} must be a non-zero 32-bit value")
        for name, mark in (("mark", self.mark), ("tproxy_mark", self.tproxy_mark)):
            if mark == 0 or mark & ~self.mask:
                problems.append(f"{name}={mark:#x} must be non-zero and inside mask {self.mask:#x}")
        if self.mark == self.tproxy_mark:
            problems.append(f"mark and tproxy_mark must differ, both are {self.mark:#x}")
        # Tables 253-255 are the kernel's default/main/local; 0 means "unspecified".
        if not 1 <= self.route_table <= 252:
            problems.append(f"route_table={self.route_table} must be 1-252 (253-255 are the kernel's own)")
        if not 1 <= self.rule_priority <= 32765:
            problems.append(
                f"rule_priority={self.rule_priority} must be 1-32765 (below the main table's rule)"
            )
        for name, text, version in (
            ("probe_snat_ipv4", self.probe_snat_ipv4, 4),
            ("probe_snat_ipv6", self.probe_snat_ipv6, 6),
        ):
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                problems.append(f"{name}={text!r} is not an IP address")
                continue
            if address.version != version:
                problems.append(f"{name}={text!r} is not an IPv{version} address")
            elif str(address) != text:
                problems.append(f"{name}={text!r} must be written canonically as {address}")
        for ifname in self.virtual_interfaces:
            if not _IFNAME.match(ifname):
                problems.append(f"virtual_interfaces: {ifname!r} is not a valid interface name")
        if problems:
            raise InpodRulesError("invalid in-pod rules configuration: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class IptablesRule:
    """One rule: `-A <chain> <spec>` in `table`, with `spec` exactly as iptables-save prints it."""

    table: str
    chain: str
    spec: str

    @property
    def line(self) -> str:
        return f"-A {self.chain} {self.spec}"


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """`ip rule ... fwmark <mark>/<mask> pref <priority> lookup <table>` in the pod namespace."""

    family: IpFamily
    fwmark: int
    mask: int
    priority: int
    table: int

    def ip_args(self, action: Literal["add", "del"]) -> tuple[str, ...]:
        """Arguments for `ip` (after any `-n <netns>`)."""
        return (
            self.family.ip_flag,
            "rule",
            action,
            "fwmark",
            f"{self.fwmark:#x}/{self.mask:#x}",
            "pref",
            str(self.priority),
            "lookup",
            str(self.table),
        )

    def found_in(self, ip_json: Sequence[Mapping[str, object]]) -> bool:
        """Whether `ip -j rule show` output (parsed JSON) already holds this rule."""
        return any(
            entry.get("priority") == self.priority
            and entry.get("fwmark") == f"{self.fwmark:#x}"
            and entry.get("fwmask") == f"{self.mask:#x}"
            and str(entry.get("table")) == str(self.table)
            for entry in ip_json
        )


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """`ip route ... local <destination> dev <device> table <table>`: deliver everything locally."""

    family: IpFamily
    destination: str
    device: str
    table: int

    def ip_args(self, action: Literal["replace", "del"]) -> tuple[str, ...]:
        """Arguments for `ip`; `replace` is idempotent (add-or-update), which is why there is no `add`."""
        return (
            self.family.ip_flag,
            "route",
            action,
            "local",
            self.destination,
            "dev",
            self.device,
            "table",
            str(self.table),
        )

    def found_in(self, ip_json: Sequence[Mapping[str, object]]) -> bool:
        """Whether `ip -j route show table <table>` output (parsed JSON) holds this route."""
        destinations = {self.destination}
        if self.destination == self.family.default_destination:
            destinations.add("default")
        return any(
            entry.get("type") == "local"
            and entry.get("dst") in destinations
            and entry.get("dev") == self.device
            for entry in ip_json
        )


@dataclass(frozen=True, slots=True)
class SavedTable:
    """One table of `iptables-save` output."""

    name: str
    chains: tuple[str, ...]  # declared chains, built-in and user-defined, in order
    rules: tuple[tuple[str, str], ...]  # (chain, spec) in order

    def rules_of(self, chain: str) -> tuple[str, ...]:
        return tuple(spec for rule_chain, spec in self.rules if rule_chain == chain)


_COUNTERS = re.compile(r"^\[\d+:\d+\]\s+")


def parse_iptables_save(text: str) -> dict[str, SavedTable]:
    """Parse `iptables-save`/`ip6tables-save` output (with or without `-c` counters) into tables.

    Raises IptablesSaveError naming the line for anything that is not save syntax, so a surprising
    namespace state is reported instead of being silently mis-read."""
    tables: dict[str, SavedTable] = {}
    current: str | None = None
    chains: list[str] = []
    rules: list[tuple[str, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def fail(reason: str, number: int = number, raw: str = raw) -> IptablesSaveError:
            return IptablesSaveError(f"iptables-save line {number}: {reason}: {raw!r}")

        if line.startswith("*"):
            if current is not None:
                raise fail(f"table starts before table {current!r} was committed")
            name = line[1:]
            if not name or not name.isidentifier():
                raise fail("bad table name")
            if name in tables:
                raise fail(f"table {name!r} appears twice")
            current, chains, rules = name, [], []
        elif line == "COMMIT":
            if current is None:
                raise fail("COMMIT outside a table")
            tables[current] = SavedTable(current, tuple(chains), tuple(rules))
            current = None
        elif line.startswith(":"):
            if current is None:
                raise fail("chain declared outside a table")
            parts = line[1:].split()
            if len(parts) != 3:
                raise fail("chain declaration is not ':<chain> <policy> [<packets>:<bytes>]'")
            chains.append(parts[0])
        else:
            if current is None:
                raise fail("rule outside a table")
            body = _COUNTERS.sub("", line)
            parts = body.split(None, 2)
            if len(parts) < 2 or parts[0] != "-A":
                raise fail("not a '-A <chain> ...' rule")
            chain = parts[1]
            spec = parts[2] if len(parts) == 3 else ""
            if chain not in chains:
                raise fail(f"rule for undeclared chain {chain!r}")
            try:
                shlex.split(spec)
            except ValueError as err:
                raise fail(f"unbalanced quoting ({err})") from None
            rules.append((chain, spec))
    if current is not None:
        raise IptablesSaveError(f"iptables-save: table {current!r} is not committed at the end of the input")
    return tables


def rule_target(spec: str) -> str | None:
    """The chain or target a rule jumps (-j) or goes (-g) to, or None."""
    tokens = shlex.split(spec)
    for index, token in enumerate(tokens[:-1]):
        if token in ("-j", "--jump", "-g", "--goto"):
            return tokens[index + 1]
    return None


class InpodRules:
    """The rule set for one configuration: iptables-restore input, verification and policy routing."""

    def __init__(self, config: InpodConfig | None = None) -> None:
        self._config = config if config is not None else InpodConfig()

    @property
    def config(self) -> InpodConfig:
        return self._config

    def tables(self) -> tuple[str, ...]:
        """The tables this configuration uses."""
        return ("mangle", "nat", "raw") if self._config.dns_capture else ("mangle", "nat")

    def rules(self, family: IpFamily) -> tuple[IptablesRule, ...]:
        """Every rule of our chains, grouped by table and chain, in evaluation order."""
        c = self._config
        mark = f"{c.mark:#x}/{c.mask:#x}"
        tproxy = f"{c.tproxy_mark:#x}/{c.mask:#x}"
        lo = family.loopback
        probe = c.probe_snat_ipv4 if family is IpFamily.V4 else c.probe_snat_ipv6
        probe_host = f"{probe}/{family.host_prefix}"
        out: list[IptablesRule] = [
            IptablesRule("mangle", PRERT_CHAIN, f"-m mark --mark {mark} -j CONNMARK --set-xmark {tproxy}"),
            IptablesRule(
                "mangle",
                OUTPUT_CHAIN,
                f"-m connmark --mark {tproxy} -j CONNMARK --restore-mark"
                f" --nfmask {_RESTORE_ALL_BITS:#x} --ctmask {_RESTORE_ALL_BITS:#x}",
            ),
            IptablesRule("nat", PRERT_CHAIN, f"-s {probe_host} -p tcp -m tcp -j ACCEPT"),
        ]
        out.extend(
            IptablesRule("nat", PRERT_CHAIN, f"-i {ifname} -p tcp -j REDIRECT --to-ports {c.outbound_port}")
            for ifname in c.virtual_interfaces
        )
        if c.inbound_capture:
            out.append(
                IptablesRule(
                    "nat",
                    PRERT_CHAIN,
                    f"! -d {lo} -p tcp -m tcp ! --dport {c.inbound_hbone_port} -m mark ! --mark {mark}"
                    f" -j REDIRECT --to-ports {c.inbound_plaintext_port}",
                )
            )
        out.append(IptablesRule("nat", OUTPUT_CHAIN, f"-d {probe_host} -p tcp -m tcp -j ACCEPT"))
        if c.dns_capture:
            out += [
                IptablesRule(
                    "nat",
                    OUTPUT_CHAIN,
                    f"! -o lo -p udp -m mark ! --mark {mark} -m udp --dport 53"
                    f" -j REDIRECT --to-ports {c.dns_port}",
                ),
                IptablesRule(
                    "nat",
                    OUTPUT_CHAIN,
                    f"! -d {lo} -p tcp -m tcp --dport 53 -m mark ! --mark {mark}"
                    f" -j REDIRECT --to-ports {c.dns_port}",
                ),
            ]
        out += [
            IptablesRule("nat", OUTPUT_CHAIN, f"-p tcp -m mark --mark {tproxy} -j ACCEPT"),
            IptablesRule("nat", OUTPUT_CHAIN, f"! -d {lo} -o lo -j ACCEPT"),
            IptablesRule(
                "nat",
                OUTPUT_CHAIN,
                f"! -d {lo} -p tcp -m mark ! --mark {mark} -j REDIRECT --to-ports {c.outbound_port}",
            ),
        ]
        if c.dns_capture:
            out += [
                IptablesRule(
                    "raw", PRERT_CHAIN, f"-p udp -m mark ! --mark {mark} -m udp --sport 53 -j CT --zone 1"
                ),
                IptablesRule(
                    "raw", OUTPUT_CHAIN, f"-p udp -m mark --mark {mark} -m udp --dport 53 -j CT --zone 1"
                ),
            ]
        order = {table: index for index, table in enumerate(ALL_TABLES)}
        # Stable sort: keeps the evaluation order within each chain.
        return tuple(sorted(out, key=lambda rule: (order[rule.table], OUR_CHAINS.index(rule.chain))))

    # -- iptables-restore input ----------------------------------------------------------------------

    def iptables_restore_v4(self, current: str | None = None) -> str:
        return self.iptables_restore(IpFamily.V4, current)

    def iptables_restore_v6(self, current: str | None = None) -> str:
        return self.iptables_restore(IpFamily.V6, current)

    def iptables_restore(self, family: IpFamily, current: str | None = None) -> str:
        """Input for `iptables-restore --noflush` that puts exactly our rules in place.

        `current` is the namespace's `iptables-save` output; None means a namespace holding none of our
        rules (a fresh pod), where the result must be applied once only."""
        saved = parse_iptables_save(current) if current is not None else {}
        desired = self.rules(family)
        sections: list[str] = []
        for table in ALL_TABLES:
            table_rules = [rule for rule in desired if rule.table == table]
            present = saved.get(table)
            if table_rules:
                sections.append(_render_apply(table, table_rules, present))
            elif present is not None:
                removal = _render_removal(table, present)
                if removal:
                    sections.append(removal)
        return "".join(sections)

    def removal_restore_v4(self, current: str) -> str:
        return self.removal_restore(IpFamily.V4, current)

    def removal_restore_v6(self, current: str) -> str:
        return self.removal_restore(IpFamily.V6, current)

    def removal_restore(self, family: IpFamily, current: str) -> str:
        """Input for `iptables-restore --noflush` removing our chains and every reference to them, in any
        table, whatever the configuration was when they were written; "" when there is nothing to remove.
        `family` only selects which tool the caller runs; the text depends on `current` alone."""
        del family
        saved = parse_iptables_save(current)
        return "".join(_render_removal(table, saved[table]) for table in ALL_TABLES if table in saved)

    def verify(self, family: IpFamily, current: str) -> tuple[str, ...]:
        """Problems with the rules in `current` (iptables-save output); empty when exactly in place."""
        saved = parse_iptables_save(current)
        desired = self.rules(family)
        problems: list[str] = []
        for table in ALL_TABLES:
            present = saved.get(table)
            table_rules = [rule for rule in desired if rule.table == table]
            if not table_rules:
                if present is not None and _references(present):
                    problems.append(
                        f"{table}: our chains are present although this configuration does not use it"
                    )
                continue
            if present is None:
                problems.append(f"{table}: table has none of our rules")
                continue
            for builtin, ours in JUMPS.items():
                if ours not in present.chains:
                    problems.append(f"{table}: chain {ours} is missing")
                    continue
                expected = tuple(rule.spec for rule in table_rules if rule.chain == ours)
                found = present.rules_of(ours)
                if found != expected:
                    problems.append(f"{table} {ours}: expected {list(expected)}, found {list(found)}")
                jumps = present.rules_of(builtin).count(f"-j {ours}")
                if jumps != 1:
                    problems.append(f"{table} {builtin}: expected one jump to {ours}, found {jumps}")
            problems += [
                f"{table} {chain}: unexpected reference to our chains: {spec}"
                for chain, spec in _references(present)
                if JUMPS.get(chain) is None or spec != f"-j {JUMPS[chain]}"
            ]
        return tuple(problems)

    # -- policy routing ------------------------------------------------------------------------------

    def policy_rule(self, family: IpFamily) -> PolicyRule:
        c = self._config
        return PolicyRule(family, c.tproxy_mark, c.mask, c.rule_priority, c.route_table)

    def local_route(self, family: IpFamily) -> LocalRoute:
        return LocalRoute(family, family.default_destination, "lo", self._config.route_table)


def _references(table: SavedTable) -> list[tuple[str, str]]:
    """Rules outside our chains that jump or go to one of them."""
    return [
        (chain, spec)
        for chain, spec in table.rules
        if chain not in OUR_CHAINS and rule_target(spec) in OUR_CHAINS
    ]


def _render_apply(table: str, rules: Iterable[IptablesRule], present: SavedTable | None) -> str:
    lines = [f"*{table}"]
    lines += [f":{chain} - [0:0]" for chain in OUR_CHAINS]  # creates, or flushes when it exists
    for builtin, ours in JUMPS.items():
        exact = f"-j {ours}"
        existing = 0
        if present is not None:
            for chain, spec in _references(present):
                if chain == builtin and spec == exact:
                    existing += 1
                    if existing > 1:
                        lines.append(f"-D {chain} {spec}")
                elif rule_target(spec) == ours:
                    lines.append(f"-D {chain} {spec}")
        if existing == 0:
            # First position: capture must win over anything else in the pod's built-in chains.
            lines.append(f"-I {builtin} 1 {exact}")
    lines += [rule.line for rule in rules]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _render_removal(table: str, present: SavedTable) -> str:
    ours_present = [chain for chain in OUR_CHAINS if chain in present.chains]
    references = _references(present)
    if not ours_present and not references:
        return ""
    lines = [f"*{table}"]
    lines += [f"-D {chain} {spec}" for chain, spec in references]
    lines += [f"-F {chain}" for chain in ours_present]
    lines += [f"-X {chain}" for chain in ours_present]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
