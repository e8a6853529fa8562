"""Summaries of py-spy's collapsed stacks ("frame;frame;...;leaf COUNT" per line), for the benchmarks'
profiling phases.

`summarize(collapsed, components)` answers where an event-loop process spent its CPU: the share of
on-CPU samples by component of the leaf frame (the code that was running), the top leaf functions
(self time), and the top functions of the process's own code by inclusive time (self time plus
everything they called: which of our functions the CPU was spent under). Samples whose leaf is an
epoll wait, and samples of threads that only wait (executor and gRPC threads, whose stacks start at
threading's bootstrap), are idle time and left out.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Final

IDLE_LEAVES: Final = ("epoll_wait (", "epoll_pwait (")
IDLE_FRAMES: Final = ("Thread._bootstrap (threading.py)",)

# (component, markers in a leaf frame's "function (file)" text); the first match wins.
Components = Sequence[tuple[str, Sequence[str]]]
WAYPOINT_COMPONENTS: Final[Components] = (
    (
        "syscalls (kernel TCP, socket pairs, veth)",
        tuple(f"{call} (libc" for call in ("write", "read", "writev", "sendmsg", "recvmsg", "send", "recv")),
    ),
    ("libc: memcpy, malloc (unsymbolised)", ("(libc.so", "(libpthread")),
    ("TLS (ssl module, OpenSSL)", ("(ssl.py)", "_ssl", "(libssl", "(libcrypto")),
    ("h2 + hyperframe + hpack (HTTP/2: HBONE framing)", ("(h2/", "(hyperframe/", "(hpack/")),
    ("h11", ("(h11/",)),
    ("logging (access log, records)", ("(logging/", "waypoint/telemetry.py")),
    ("prometheus_client (metrics)", ("(prometheus_client/",)),
    ("waypoint (proxy, routing, authz)", ("(waypoint/",)),
    ("loom.hbone (HBONE endpoint, pools)", ("(loom/",)),
    ("ztunnel (shared code)", ("(ztunnel/",)),
    ("uvloop / asyncio", ("(loop.c)", "(uvloop", "(asyncio/", "(libuv", "core.c", "linux.c", "stream.c")),
    ("CPython runtime", ("(libpython", "(object.h)", "(python", "Objects/", "Python/")),
)

ZTUNNEL_COMPONENTS: Final[Components] = (
    (
        "syscalls (kernel TCP, veth, netfilter)",
        tuple(f"{call} (libc" for call in ("write", "read", "writev", "sendmsg", "recvmsg", "send", "recv")),
    ),
    ("libc: memcpy, malloc (unsymbolised)", ("(libc.so", "(libpthread")),
    ("TLS (ssl module, OpenSSL)", ("(ssl.py)", "_ssl", "(libssl", "(libcrypto")),
    ("h2 + hyperframe (HTTP/2 state, framing)", ("(h2/", "(hyperframe/", "(hpack/")),
    ("loom.hbone (HBONE endpoint, relay)", ("(loom/",)),
    ("ztunnel", ("(ztunnel/",)),
    ("uvloop / asyncio", ("(loop.c)", "(uvloop", "(asyncio/", "(libuv", "core.c", "linux.c", "stream.c")),
    ("CPython runtime", ("(libpython", "(object.h)", "(python", "Objects/", "Python/")),
)


def component(leaf: str, components: Components) -> str:
    for name, markers in components:
        if any(m in leaf for m in markers):
            return name
    return "other"


def summarize(collapsed: str, components: Components, own_code: str, top: int = 12) -> str:
    """See the module docstring; `own_code` marks the process's own frames (e.g. "(waypoint/")."""
    own: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = frames[-1]
        if leaf.startswith(IDLE_LEAVES) or any(f in IDLE_FRAMES for f in frames):
            continue
        total += count
        own[leaf] += count
        parts[component(leaf, components)] += count
        for frame in set(frames):  # once per sample, however deep the recursion
            if own_code in frame:
                inclusive[frame] += count
    if not total:
        return "  no on-CPU samples"
    lines = [f"  {total} on-CPU samples of the event-loop thread; by component of the leaf frame:"]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in parts.most_common()]
    lines.append("  top functions (self):")
    lines += [f"    {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines.append(f"  top functions of {own_code.strip('(/')} (inclusive):")
    lines += [f"    {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)
