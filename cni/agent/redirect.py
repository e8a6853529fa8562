"""The redirection backend: installs, removes and verifies a pod's in-pod capture inside its netns.

Theory of operation
-------------------
`RedirectionBackend` is the interface the node agent uses; it only knows "this pod's network namespace
(by path) should / should no longer redirect its traffic to ztunnel". `IptablesBackend` is the iptables
implementation of reference §4.1: the rule text comes from `cni.rules.InpodRules` (restore input for
`iptables-restore --noflush`, one COMMIT per table so each table changes atomically) plus the policy rule
and `local` route that bring replies of spoofed inbound connections back to ztunnel.

The pod's namespace is given as a path (the CNI_NETNS of the runtime, e.g. /var/run/netns/cni-...,
or /proc/<pid>/ns/net), which `ip netns exec` cannot use. So every step runs on the agent's namespace
switcher thread (`ztunnel.inpod.netns.NetnsSwitcher`, setns with the netns fd): the `iptables-*` and
`ip` child processes are forked from that thread and therefore start inside the pod's namespace. The
switcher always returns the thread to the agent's own namespace.

Enrolling a RUNNING pod must not cut the connections it already has. A namespace without netfilter rules
has no connection tracking at all; the first rules start it, and with the kernel's default
`nf_conntrack_tcp_loose=1` the next packet of a connection opened before would be picked up mid-stream
as a NEW connection, REDIRECTed to ztunnel's inbound listener and answered with a reset. So apply sets
`net.netfilter.nf_conntrack_tcp_loose=0` in the pod's namespace first (a per-namespace sysctl): such
packets are then left alone and the old connection carries on directly, while every connection opened
afterwards is tracked from its SYN and captured. The setting stays after release (it only concerns
connections conntrack did not see begin, which nothing in the pod relies on being picked up).

Both address families. A pod whose namespace has IPv6 (the kernel's default, also in clusters that hand
out IPv4 addresses only) gets the IPv6 rules too (`ip6tables-restore`, policy rule and route of
`ip -6`), as Istio's CNI does with IPv6 enabled: IPv6 traffic that is not captured would leave the pod
past ztunnel, with neither mTLS nor policy, so the choice fails closed. The families are read in the
pod's namespace at each step (`net.ipv6.conf.all.disable_ipv6`, absent without IPv6 in the kernel);
`IptablesBackend(families=...)` fixes them instead.

Every operation is idempotent: apply replaces our chains wholesale and adds the jump/rule/route only
where missing; remove is a no-op where nothing is installed. Operations on one namespace are serialised
(the save and the restore are two steps), different namespaces proceed independently.

`NetnsRunner` is that "run blocking work in the namespace at this path" step on its own, shared with the
node-side probe rules (`cni.agent.host_rules`), which run in the node's namespace: the agent's own (no
path: a worker thread, no switching) or, when the agent runs outside it, one given by path.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

from cni.rules import InpodRules, IpFamily
from ztunnel.inpod.netns import NetnsSwitcher

T = TypeVar("T")

COMMAND_TIMEOUT: Final = 10.0
# Opened from the switcher thread, so it is the pod namespace's own copy of the sysctl.
TCP_LOOSE_SYSCTL: Final = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose"
# Likewise per namespace: absent when the kernel has no IPv6, "1" when IPv6 is off in the namespace.
IPV6_DISABLED_SYSCTL: Final = "/proc/sys/net/ipv6/conf/all/disable_ipv6"


class RedirectionError(RuntimeError):
    """Installing, removing or checking a pod's redirection failed; names the namespace and the step."""


class RedirectionBackend(Protocol):
    """How the agent makes a pod namespace's traffic go to ztunnel (iptables now, eBPF later)."""

    async def apply(self, netns_path: str) -> None:
        """Install the redirection (idempotent). Raises RedirectionError."""
        ...

    async def remove(self, netns_path: str) -> None:
        """Remove the redirection; a no-op where none is installed. Raises RedirectionError."""
        ...

    async def verify(self, netns_path: str) -> tuple[str, ...]:
        """What is missing or wrong (empty when the redirection is fully in place)."""
        ...


def run_tool(argv: Sequence[str], netns_path: str, input: str | None = None) -> str:
    """Run one command (in whatever namespace the calling thread is in); stdout, or RedirectionError
    naming the command, the namespace and the tool's error output."""
    try:
        result = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise RedirectionError(
            f"{' '.join(argv)} in {netns_path} took longer than {COMMAND_TIMEOUT}s"
        ) from None
    except FileNotFoundError:
        raise RedirectionError(f"{argv[0]} is not installed; the iptables backend needs it") from None
    if result.returncode != 0:
        raise RedirectionError(
            f"{' '.join(argv)} in {netns_path} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


def _keep_untracked_connections(netns_path: str) -> None:
    """nf_conntrack_tcp_loose=0 in the current (pod) namespace; see the module docstring. Without
    conntrack support in the kernel there is nothing to set (and no NAT either: apply fails later with
    a clear error)."""
    try:
        with open(TCP_LOOSE_SYSCTL, "w") as handle:
            handle.write("0\n")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RedirectionError(
            f"cannot set {TCP_LOOSE_SYSCTL} in {netns_path}: {exc.strerror or exc}"
        ) from None


def ipv6_enabled_here() -> bool:
    """Whether the current thread's network namespace has IPv6 (so pod traffic can use it)."""
    try:
        with open(IPV6_DISABLED_SYSCTL) as handle:
            return handle.read().strip() == "0"
    except FileNotFoundError:
        return False


def families_here(fixed: tuple[IpFamily, ...] | None = None) -> tuple[IpFamily, ...]:
    """The address families to write rules for in the calling thread's namespace: `fixed` when
    given, else IPv4 plus IPv6 wherever the namespace has it (see the module docstring)."""
    if fixed is not None:
        return fixed
    return (IpFamily.V4, IpFamily.V6) if ipv6_enabled_here() else (IpFamily.V4,)


def _ip_json(netns_path: str, *args: str) -> list[dict[str, Any]]:
    output = run_tool(["ip", "-j", *args], netns_path).strip()
    parsed = json.loads(output) if output else []
    if not isinstance(parsed, list):
        raise RedirectionError(f"ip -j {' '.join(args)} in {netns_path} did not print a JSON list")
    return parsed


def _routes_in_table(netns_path: str, family: IpFamily, table: int) -> list[dict[str, Any]]:
    try:
        return _ip_json(netns_path, family.ip_flag, "route", "show", "table", str(table))
    except RedirectionError as exc:
        # The kernel creates a table with its first route and drops it with its last one.
        if "table does not exist" in str(exc):
            return []
        raise


class NetnsRunner:
    """Runs short blocking work inside a network namespace given by path, or in the agent's own.

    Work for one path is serialised (a read-modify-write of netfilter state is two commands); work for
    different paths proceeds independently. Pod namespaces are entered on the namespace switcher thread
    (see the module docstring); `None` means the agent's own namespace and runs on a worker thread."""

    def __init__(self, switcher: NetnsSwitcher | None = None) -> None:
        self._own_switcher = switcher is None
        self._switcher = switcher if switcher is not None else NetnsSwitcher("loom-cni-redirect")
        self._locks: dict[str | None, asyncio.Lock] = {}

    def close(self) -> None:
        if self._own_switcher:
            self._switcher.close()

    def forget(self, netns_path: str) -> None:
        """Drop the lock of a namespace that is gone (bounded memory over many pods)."""
        self._locks.pop(netns_path, None)

    async def run(
        self, netns_path: str | None, what: str, fn: Callable[[], T], *, missing_ok: bool = False
    ) -> T | None:
        """`fn()` inside `netns_path`; None without running it when the namespace is gone and
        `missing_ok`. Raises RedirectionError naming the namespace and `what` was being done."""
        lock = self._locks.setdefault(netns_path, asyncio.Lock())
        async with lock:
            if netns_path is None:
                return await asyncio.to_thread(fn)
            try:
                fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if missing_ok:
                    return None  # the sandbox is gone, and its rules with it
                raise RedirectionError(f"pod namespace {netns_path} does not exist (cannot {what})") from None
            except OSError as exc:
                raise RedirectionError(
                    f"cannot open pod namespace {netns_path} to {what}: {exc.strerror}"
                ) from None
            try:
                return await self._switcher.run(fd, fn)
            except RedirectionError:
                raise
            except OSError as exc:
                raise RedirectionError(f"cannot enter pod namespace {netns_path} to {what}: {exc}") from None
            finally:
                os.close(fd)


class IptablesBackend:
    """`RedirectionBackend` with iptables-restore and iproute2 (see the module docstring)."""

    def __init__(
        self,
        rules: InpodRules | None = None,
        families: Sequence[IpFamily] | None = None,
        switcher: NetnsSwitcher | None = None,
        *,
        runner: NetnsRunner | None = None,
    ) -> None:
        self.rules = rules if rules is not None else InpodRules()
        # None: whatever each pod's namespace has (see the module docstring).
        self.families = tuple(families) if families is not None else None
        self._own_runner = runner is None
        self.runner = runner if runner is not None else NetnsRunner(switcher)

    def close(self) -> None:
        if self._own_runner:
            self.runner.close()

    async def _inside(
        self, netns_path: str, what: str, fn: Callable[[], T], *, missing_ok: bool = False
    ) -> T | None:
        return await self.runner.run(netns_path, what, fn, missing_ok=missing_ok)

    async def apply(self, netns_path: str) -> None:
        def work() -> None:
            _keep_untracked_connections(netns_path)
            for family in families_here(self.families):
                current = run_tool([family.save_command], netns_path)
                restore = self.rules.iptables_restore(family, current)
                if restore:
                    run_tool([family.restore_command, "--noflush"], netns_path, input=restore)
                policy_rule = self.rules.policy_rule(family)
                if not policy_rule.found_in(_ip_json(netns_path, family.ip_flag, "rule", "show")):
                    run_tool(["ip", *policy_rule.ip_args("add")], netns_path)
                run_tool(["ip", *self.rules.local_route(family).ip_args("replace")], netns_path)

        await self._inside(netns_path, "install the redirection", work)

    async def remove(self, netns_path: str) -> None:
        def work() -> None:
            for family in families_here(self.families):
                restore = self.rules.removal_restore(family, run_tool([family.save_command], netns_path))
                if restore:
                    run_tool([family.restore_command, "--noflush"], netns_path, input=restore)
                policy_rule = self.rules.policy_rule(family)
                # Bounded: each pass deletes one copy; a namespace never holds more than a few.
                for _ in range(16):
                    if not policy_rule.found_in(_ip_json(netns_path, family.ip_flag, "rule", "show")):
                        break
                    run_tool(["ip", *policy_rule.ip_args("del")], netns_path)
                route = self.rules.local_route(family)
                routes = _routes_in_table(netns_path, family, route.table)
                if route.found_in(routes):
                    run_tool(["ip", *route.ip_args("del")], netns_path)

        try:
            await self._inside(netns_path, "remove the redirection", work, missing_ok=True)
        finally:
            self.runner.forget(netns_path)

    async def verify(self, netns_path: str) -> tuple[str, ...]:
        def work() -> tuple[str, ...]:
            problems: list[str] = []
            for family in families_here(self.families):
                problems.extend(self.rules.verify(family, run_tool([family.save_command], netns_path)))
                policy_rule = self.rules.policy_rule(family)
                if not policy_rule.found_in(_ip_json(netns_path, family.ip_flag, "rule", "show")):
                    problems.append(f"policy rule missing: ip {' '.join(policy_rule.ip_args('add'))}")
                route = self.rules.local_route(family)
                routes = _routes_in_table(netns_path, family, route.table)
                if not route.found_in(routes):
                    problems.append(f"route missing: ip {' '.join(route.ip_args('replace'))}")
            return tuple(problems)

        result = await self._inside(netns_path, "verify the redirection", work)
        assert result is not None  # a missing namespace raised instead
        return result
