"""Node-side probe exemption (reference §4.1, "host-netns rules for kubelet probes").

Theory of operation
-------------------
An enrolled pod REDIRECTs every inbound TCP connection to ztunnel, which would apply mesh policy to the
node's own health probes (kubelet) and break them. The pod's rules therefore let through connections
from 169.254.7.127 (`cni.rules`, nat ISTIO_PRERT ACCEPT, and the replies' ACCEPT in ISTIO_OUTPUT), and
the node makes its own connections to enrolled pods come from that address: in the node's network
namespace, nat POSTROUTING jumps to our chain `LOOM-POSTRT`, which holds one rule per enrolled pod IP::

    -A LOOM-POSTRT -d 10.80.1.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127

`-m owner --socket-exists` matches only packets of a local socket: the node's own connections
(kubelet, a person with `ip netns exec`), never pod traffic the node forwards. The pod sees the probe
from 169.254.7.127, lets it reach the app directly and replies; conntrack reverses the SNAT on the node.
IPv6 pod addresses get the same rules in ip6tables, to fd16:9254:7127:1337:ffff:ffff:ffff:ffff, wherever
the node's namespace has IPv6 (a pod's IPv6 rules accept that source, as its IPv4 ones 169.254.7.127).

Per-IP rules instead of Istio's ipset: no dependency on the ipset tool or the ip_set kernel module, and
the whole rule set (chain plus jump) changes in ONE iptables-restore transaction, so there is never a
moment with a half-updated set. The cost is linear matching, but only for packets the node itself
originates (the `-d` test comes first and fails fast), and a node holds at most a few hundred pods.

Idempotent, atomic rewrite: every change renders the complete chain for `iptables-restore --noflush`
(`:LOOM-POSTRT - [0:0]` creates or flushes it) plus exactly one jump at the top of POSTROUTING, added
only when missing, with duplicates and stray references deleted; the node's current `iptables-save`
output decides. Rules for pods that are no longer enrolled, or left by an agent that crashed, vanish
with that rewrite; an empty set removes the chain and the jump altogether. The renderer is pure; the
applier runs the two commands in the node's namespace.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from cni.agent.redirect import NetnsRunner, RedirectionError, families_here, run_tool
from cni.rules import InpodConfig, IpFamily, SavedTable, parse_iptables_save, rule_target

log = logging.getLogger(__name__)

HOST_CHAIN: Final = "LOOM-POSTRT"
HOOK_CHAIN: Final = "POSTROUTING"
TABLE: Final = "nat"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HostProbeRules:
    """Renders and checks the node's probe SNAT rules (pure; see the module docstring)."""

    def __init__(self, config: InpodConfig | None = None) -> None:
        self._config = config if config is not None else InpodConfig()

    def snat_address(self, family: IpFamily) -> str:
        c = self._config
        return c.probe_snat_ipv4 if family is IpFamily.V4 else c.probe_snat_ipv6

    def rules(self, family: IpFamily, pod_ips: Iterable[IPAddress]) -> tuple[str, ...]:
        """The specs of LOOM-POSTRT, one per pod IP of `family`, sorted (stable output), exactly as
        iptables-save prints them."""
        version = 4 if family is IpFamily.V4 else 6
        ips = sorted({ip for ip in pod_ips if ip.version == version})
        snat = self.snat_address(family)
        return tuple(
            f"-d {ip}/{family.host_prefix} -p tcp -m owner --socket-exists -j SNAT --to-source {snat}"
            for ip in ips
        )

    def restore(self, family: IpFamily, pod_ips: Iterable[IPAddress], current: str) -> str:
        """Input for `iptables-restore --noflush` that makes the node's nat table hold exactly the rules
        for `pod_ips` (and no chain at all when there are none); "" when nothing needs to change.
        `current` is the node's `iptables-save -t nat` output."""
        table = parse_iptables_save(current).get(TABLE)
        specs = self.rules(family, pod_ips)
        if not specs:
            return _render_removal(table) if table is not None else ""
        if table is not None and not self.verify(family, pod_ips, current):
            return ""
        lines = [f"*{TABLE}", f":{HOST_CHAIN} - [0:0]"]  # creates the chain, or flushes it
        exact = f"-j {HOST_CHAIN}"
        jumps = 0
        for chain, spec in _references(table):
            if chain == HOOK_CHAIN and spec == exact:
                jumps += 1
                if jumps > 1:
                    lines.append(f"-D {chain} {spec}")
            else:
                lines.append(f"-D {chain} {spec}")
        if jumps == 0:
            # First: a MASQUERADE further down must not rewrite the source before we do.
            lines.append(f"-I {HOOK_CHAIN} 1 {exact}")
        lines += [f"-A {HOST_CHAIN} {spec}" for spec in specs]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def verify(self, family: IpFamily, pod_ips: Iterable[IPAddress], current: str) -> tuple[str, ...]:
        """What differs between the node's nat table (`current`) and the rules for `pod_ips`."""
        table = parse_iptables_save(current).get(TABLE)
        specs = self.rules(family, pod_ips)
        references = _references(table)
        present = table is not None and HOST_CHAIN in table.chains
        if not specs:
            leftovers = [f"{TABLE}: chain {HOST_CHAIN} exists although no pod is enrolled"] if present else []
            return tuple(leftovers + [f"{TABLE} {c}: stray reference: {s}" for c, s in references])
        if table is None or not present:
            return (f"{TABLE}: chain {HOST_CHAIN} is missing",)
        problems: list[str] = []
        found = table.rules_of(HOST_CHAIN)
        if found != specs:
            problems.append(f"{TABLE} {HOST_CHAIN}: expected {list(specs)}, found {list(found)}")
        hook = table.rules_of(HOOK_CHAIN)
        exact = f"-j {HOST_CHAIN}"
        if hook.count(exact) != 1 or not hook or hook[0] != exact:
            problems.append(f"{TABLE} {HOOK_CHAIN}: expected one jump to {HOST_CHAIN} in first place")
        problems += [
            f"{TABLE} {chain}: stray reference: {spec}"
            for chain, spec in references
            if chain != HOOK_CHAIN or spec != exact
        ]
        return tuple(problems)


def _references(table: SavedTable | None) -> list[tuple[str, str]]:
    if table is None:
        return []
    return [(c, s) for c, s in table.rules if c != HOST_CHAIN and rule_target(s) == HOST_CHAIN]


def _render_removal(table: SavedTable) -> str:
    references = _references(table)
    present = HOST_CHAIN in table.chains
    if not present and not references:
        return ""
    lines = [f"*{TABLE}"]
    lines += [f"-D {chain} {spec}" for chain, spec in references]
    if present:
        lines += [f"-F {HOST_CHAIN}", f"-X {HOST_CHAIN}"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class HostRules(Protocol):
    """What the agent needs of the node-side rules: make them cover exactly these pod IPs."""

    async def sync(self, pod_ips: Iterable[IPAddress], *, force: bool = False) -> bool: ...


class HostRulesApplier:
    """Keeps the node's probe SNAT rules equal to a set of pod IPs.

    `netns_path` is the node's namespace when the agent does not run in it (tests, or an agent started
    outside the node namespace); None means the agent's own namespace. `sync` rewrites only when the set
    changed since the last successful write (or `force`, e.g. at start-up, to clear stale rules)."""

    def __init__(
        self,
        runner: NetnsRunner,
        *,
        rules: HostProbeRules | None = None,
        families: Sequence[IpFamily] | None = None,
        netns_path: str | None = None,
    ) -> None:
        self.rules = rules if rules is not None else HostProbeRules()
        # None: IPv4, and IPv6 where the node's namespace has it (probes of IPv6 pod addresses).
        self.families = tuple(families) if families is not None else None
        self.netns_path = netns_path
        self._runner = runner
        self._applied: frozenset[IPAddress] | None = None
        self.writes = 0  # restores actually run, for tests and logs

    @property
    def where(self) -> str:
        return self.netns_path or "the node's namespace"

    @property
    def applied(self) -> frozenset[IPAddress] | None:
        """The set last written successfully; None before the first write or after a failure."""
        return self._applied

    async def sync(self, pod_ips: Iterable[IPAddress], *, force: bool = False) -> bool:
        """Make the node's rules match `pod_ips`; True when a rewrite ran. Raises RedirectionError (the
        next call retries: a failure forgets what was applied)."""
        wanted = frozenset(pod_ips)
        if not force and wanted == self._applied:
            return False
        where = self.where

        def work() -> bool:
            wrote = False
            for family in families_here(self.families):
                current = run_tool([family.save_command, "-t", TABLE], where)
                text = self.rules.restore(family, wanted, current)
                if text:
                    run_tool([family.restore_command, "--noflush"], where, input=text)
                    wrote = True
            return wrote

        self._applied = None
        try:
            wrote = await self._runner.run(self.netns_path, "write the probe SNAT rules", work)
        except RedirectionError as exc:
            raise RedirectionError(f"probe SNAT rules in {where}: {exc}") from None
        self._applied = wanted
        if wrote:
            self.writes += 1
            log.info("probe SNAT rules in %s now cover %d pod addresses", where, len(wanted))
        return bool(wrote)

    async def verify(self, pod_ips: Iterable[IPAddress]) -> tuple[str, ...]:
        """Differences between the node's rules and `pod_ips` (empty when in place)."""
        wanted = frozenset(pod_ips)
        where = self.where

        def work() -> tuple[str, ...]:
            problems: list[str] = []
            for family in families_here(self.families):
                current = run_tool([family.save_command, "-t", TABLE], where)
                problems += self.rules.verify(family, wanted, current)
            return tuple(problems)

        result = await self._runner.run(self.netns_path, "check the probe SNAT rules", work)
        return result or ()
