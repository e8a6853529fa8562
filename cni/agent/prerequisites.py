"""What loom-cni-agent needs from the machine, checked at start-up so a missing piece is named at once.

Theory of operation
-------------------
Without these checks a node agent on an unsuitable machine would start, look healthy and then fail on
the first pod with an iptables error deep in a log. Each problem found here is one sentence naming what
is missing and what it is needed for; `loom-cni-agent` prints them and exits 2.

* **tools**: iptables-save, iptables-restore and ip on PATH;
* **root**: the agent enters pod namespaces and writes netfilter rules (effective uid 0);
* **setns**: entering a network namespace needs CAP_SYS_ADMIN; a root process in a restricted container
  may lack it. Tested by switching a short-lived thread into the namespace it is already in (allowed
  exactly when switching anywhere is);
* **kernel features**, probed for real in a throw-away network namespace: a dedicated thread unshares a
  fresh namespace (which dies with the thread) and runs iptables-restore there once per feature, so the
  agent's own rules are never touched and a missing module is reported by what it is for: the nat and
  mangle tables, the REDIRECT target (in-pod capture), the mark/connmark matches and CONNMARK target
  (replies of ztunnel's spoofed inbound connections), the owner match with SNAT (the node's probe
  exemption) and policy routing (`ip rule fwmark`). Probing beats reading /proc/net/ip_tables_matches,
  which lists only modules that happen to be loaded already.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from ztunnel.inpod.netns import CLONE_NEWNET, NetnsError, setns

REQUIRED_TOOLS: Final = ("iptables-save", "iptables-restore", "ip")
PROBE_TIMEOUT: Final = 10.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.unshare.restype = ctypes.c_int


@dataclass(frozen=True, slots=True)
class KernelFeature:
    """One thing the kernel must provide, probed by running `argv` (with `stdin`) in a fresh namespace."""

    name: str  # what is missing, for the message
    needed_for: str
    argv: tuple[str, ...]
    stdin: str = ""
    requires: tuple[str, ...] = ()  # names of features that must work for this probe to mean anything


KERNEL_FEATURES: Final = (
    KernelFeature(
        "the iptables nat table",
        "the in-pod REDIRECT rules and the node's probe SNAT",
        ("iptables-restore", "--noflush"),
        "*nat\n-A OUTPUT -j ACCEPT\nCOMMIT\n",
    ),
    KernelFeature(
        "the iptables mangle table",
        "marking ztunnel's inbound connections",
        ("iptables-restore", "--noflush"),
        "*mangle\n-A OUTPUT -j ACCEPT\nCOMMIT\n",
    ),
    KernelFeature(
        "the REDIRECT target",
        "capturing pod traffic to ztunnel",
        ("iptables-restore", "--noflush"),
        "*nat\n-A OUTPUT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n",
        requires=("the iptables nat table",),
    ),
    KernelFeature(
        "the mark and connmark matches and the CONNMARK target",
        "returning the replies of ztunnel's inbound connections to it",
        ("iptables-restore", "--noflush"),
        "*mangle\n-A PREROUTING -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff\n"
        "-A OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark"
        " --nfmask 0xffffffff --ctmask 0xffffffff\nCOMMIT\n",
        requires=("the iptables mangle table",),
    ),
    KernelFeature(
        "the owner match (-m owner --socket-exists) or the SNAT target",
        "exempting the node's own probes to enrolled pods (SNAT to 169.254.7.127)",
        ("iptables-restore", "--noflush"),
        "*nat\n-A POSTROUTING -d 127.0.0.2/32 -p tcp -m owner --socket-exists"
        " -j SNAT --to-source 169.254.7.127\nCOMMIT\n",
        requires=("the iptables nat table",),
    ),
    KernelFeature(
        "policy routing (ip rule fwmark, CONFIG_IP_MULTIPLE_TABLES)",
        "delivering the replies of ztunnel's inbound connections locally",
        ("ip", "-4", "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100"),
    ),
)


def check_prerequisites(
    tools: Sequence[str] = REQUIRED_TOOLS,
    *,
    euid: int | None = None,
    probe_setns: Callable[[], str | None] | None = None,
    probe_kernel: Callable[[], list[str]] | None = None,
) -> list[str]:
    """Problems that keep the agent from working here; empty when it can run. The probes can be
    replaced (tests); by default they are `setns_problem` and `kernel_feature_problems`."""
    problems = [f"{tool} is not installed (or not on PATH)" for tool in tools if shutil.which(tool) is None]
    if (os.geteuid() if euid is None else euid) != 0:
        problems.append(
            "loom-cni-agent must run as root: it enters pod network namespaces and writes netfilter rules"
        )
        return problems  # the other probes need root themselves: they would only repeat this
    setns_check = probe_setns if probe_setns is not None else setns_problem
    problem = setns_check()
    if problem is not None:
        problems.append(problem)
        return problems  # the kernel probes enter a namespace too
    if not problems:
        problems += (probe_kernel if probe_kernel is not None else kernel_feature_problems)()
    return problems


def _on_thread(fn: Callable[[], None]) -> None:
    """Run `fn` on a fresh thread and wait; the thread's namespace changes die with it."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="loom-cni-prerequisites", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT * (len(KERNEL_FEATURES) + 1))
    if thread.is_alive():
        raise TimeoutError("the prerequisite probe did not finish")
    if errors:
        raise errors[0]


def setns_problem() -> str | None:
    """None when this process may switch network namespaces (setns with CLONE_NEWNET), else why not."""

    def probe() -> None:
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(fd)  # into the namespace it is already in: permitted exactly when any switch is
        finally:
            os.close(fd)

    try:
        _on_thread(probe)
    except (NetnsError, OSError, TimeoutError) as exc:
        return (
            "entering network namespaces (setns CLONE_NEWNET) is not permitted: the agent needs "
            f"CAP_SYS_ADMIN to install rules inside pods ({exc})"
        )
    return None


def probe_features(
    features: Sequence[KernelFeature], run: Callable[[KernelFeature], str | None]
) -> list[str]:
    """Messages for the features whose probe fails; `run` returns the probe's error text or None.
    A feature whose prerequisite is missing is not probed (its failure would only repeat that)."""
    missing: set[str] = set()
    problems: list[str] = []
    for feature in features:
        if missing.intersection(feature.requires):
            missing.add(feature.name)
            continue
        error = run(feature)
        if error is not None:
            missing.add(feature.name)
            problems.append(f"the kernel lacks {feature.name}, needed for {feature.needed_for}: {error}")
    return problems


def kernel_feature_problems(features: Sequence[KernelFeature] = KERNEL_FEATURES) -> list[str]:
    """Probe every feature in a throw-away network namespace (see the module docstring)."""
    problems: list[str] = []

    def run(feature: KernelFeature) -> str | None:
        try:
            result = subprocess.run(
                list(feature.argv),
                input=feature.stdin,
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"{feature.argv[0]} did not finish within {PROBE_TIMEOUT}s"
        except OSError as exc:
            return f"cannot run {feature.argv[0]}: {exc.strerror or exc}"
        if result.returncode != 0:
            detail = " ".join(line.strip() for line in result.stderr.splitlines()[:2] if line.strip())
            return detail or f"{feature.argv[0]} exited with {result.returncode}"
        return None

    def probe() -> None:
        # Only this thread moves into the new namespace; the commands it forks start there too.
        if _libc.unshare(CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"unshare(CLONE_NEWNET) failed: {os.strerror(code)}")
        problems.extend(probe_features(features, run))

    try:
        _on_thread(probe)
    except (OSError, TimeoutError) as exc:
        return [f"cannot create a scratch network namespace to probe kernel features: {exc}"]
    return problems
