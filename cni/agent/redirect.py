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

Every operation is idempotent: apply replaces our chains wholesale and adds the jump/rule/route only
where missing; remove is a no-op where nothing is installed. Operations on one namespace are serialised
(the save and the restore are two steps), different namespaces proceed independently.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any, Final, Protocol

from cni.rules import InpodRules, IpFamily
from ztunnel.inpod.netns import NetnsSwitcher

COMMAND_TIMEOUT: Final = 10.0
REQUIRED_TOOLS: Final = ("iptables-save", "iptables-restore", "ip")


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


def check_prerequisites(tools: Sequence[str] = REQUIRED_TOOLS) -> list[str]:
    """Problems that make the iptables backend unusable here (missing tools, not root), for a clear
    start-up error instead of a failure on the first pod."""
    problems = [f"{tool} is not installed (or not on PATH)" for tool in tools if shutil.which(tool) is None]
    if os.geteuid() != 0:
        problems.append(
            "loom-cni-agent must run as root (it enters pod namespaces and writes netfilter rules)"
        )
    return problems


def _run(argv: Sequence[str], netns_path: str, input: str | None = None) -> str:
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


def _ip_json(netns_path: str, *args: str) -> list[dict[str, Any]]:
    output = _run(["ip", "-j", *args], netns_path).strip()
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


class IptablesBackend:
    """`RedirectionBackend` with iptables-restore and iproute2 (see the module docstring)."""

    def __init__(
        self,
        rules: InpodRules | None = None,
        families: Sequence[IpFamily] = (IpFamily.V4,),
        switcher: NetnsSwitcher | None = None,
    ) -> None:
        self.rules = rules if rules is not None else InpodRules()
        self.families = tuple(families)
        self._own_switcher = switcher is None
        self._switcher = switcher if switcher is not None else NetnsSwitcher("loom-cni-redirect")
        self._locks: dict[str, asyncio.Lock] = {}

    def close(self) -> None:
        if self._own_switcher:
            self._switcher.close()

    async def _inside(self, netns_path: str, what: str, fn: Any, *, missing_ok: bool = False) -> Any:
        lock = self._locks.setdefault(netns_path, asyncio.Lock())
        async with lock:
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

    async def apply(self, netns_path: str) -> None:
        def work() -> None:
            for family in self.families:
                current = _run([family.save_command], netns_path)
                restore = self.rules.iptables_restore(family, current)
                if restore:
                    _run([family.restore_command, "--noflush"], netns_path, input=restore)
                policy_rule = self.rules.policy_rule(family)
                if not policy_rule.found_in(_ip_json(netns_path, family.ip_flag, "rule", "show")):
                    _run(["ip", *policy_rule.ip_args("add")], netns_path)
                _run(["ip", *self.rules.local_route(family).ip_args("replace")], netns_path)

        await self._inside(netns_path, "install the redirection", work)

    async def remove(self, netns_path: str) -> None:
        def work() -> None:
            for family in self.families:
                restore = self.rules.removal_restore(family, _run([family.save_command], netns_path))
                if restore:
                    _run([family.restore_command, "--noflush"], netns_path, input=restore)
                policy_rule = self.rules.policy_rule(family)
                # Bounded: each pass deletes one copy; a namespace never holds more than a few.
                for _ in range(16):
                    if not policy_rule.found_in(_ip_json(netns_path, family.ip_flag, "rule", "show")):
                        break
                    _run(["ip", *policy_rule.ip_args("del")], netns_path)
                route = self.rules.local_route(family)
                routes = _routes_in_table(netns_path, family, route.table)
                if route.found_in(routes):
                    _run(["ip", *route.ip_args("del")], netns_path)

        try:
            await self._inside(netns_path, "remove the redirection", work, missing_ok=True)
        finally:
            self._locks.pop(netns_path, None)

    async def verify(self, netns_path: str) -> tuple[str, ...]:
        def work() -> tuple[str, ...]:
            problems: list[str] = []
            for family in self.families:
                problems.extend(self.rules.verify(family, _run([family.save_command], netns_path)))
                policy_rule = self.rules.policy_rule(family)
                if not policy_rule.found_in(_ip_json(netns_path, family.ip_flag, "rule", "show")):
                    problems.append(f"policy rule missing: ip {' '.join(policy_rule.ip_args('add'))}")
                route = self.rules.local_route(family)
                routes = _routes_in_table(netns_path, family, route.table)
                if not route.found_in(routes):
                    problems.append(f"route missing: ip {' '.join(route.ip_args('replace'))}")
            return tuple(problems)

        result: tuple[str, ...] = await self._inside(netns_path, "verify the redirection", work)
        return result
