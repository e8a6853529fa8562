"""Copying bytes between two plain TCP sockets (passthrough outbound, plaintext inbound), and refusing.

Theory of operation
-------------------
`relay(a, b)` runs one copy loop per direction on the event loop's socket primitives
(`sock_recv_into` / `sock_sendall`). Each loop reads at most `chunk` bytes and does not read again until
the previous chunk is fully written, so memory per connection is bounded by two chunks no matter how
slow either side is: back-pressure is TCP's own. When one side ends its stream (EOF), the loop
half-closes the other side (`shutdown(SHUT_WR)`) and the opposite direction keeps going, so protocols
that half-close (a client that sends a request and then its FIN) work. The relay ends when both
directions are done, or at the first error, in which case both sockets are closed at once (with RST, so
neither peer waits on a half-dead connection).

`refuse(sock)` closes with SO_LINGER 0: the peer gets an RST at once, which is how a refused connection
looks to the application (ztunnel does the same), and no TIME_WAIT is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

# One read per direction at a time: 64 KiB keeps syscalls few and memory per connection small.
DEFAULT_CHUNK = 64 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)


def refuse(sock: socket.socket) -> None:
    """Close `sock` with an RST (SO_LINGER 0); never raises."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    with contextlib.suppress(OSError):
        sock.close()


@dataclass(frozen=True, slots=True)
class RelayResult:
    a_to_b: int  # bytes read from `a` and written to `b`
    b_to_a: int  # bytes read from `b` and written to `a`
    error: str | None  # None when both directions ended with a clean EOF


async def _copy(
    source: socket.socket,
    sink: socket.socket,
    chunk: int,
    count: Callable[[int], None],
) -> None:
    loop = asyncio.get_running_loop()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    while True:
        n = await loop.sock_recv_into(source, view)
        if n == 0:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            return
        await loop.sock_sendall(sink, view[:n])
        count(n)


async def relay(a: socket.socket, b: socket.socket, *, chunk: int = DEFAULT_CHUNK) -> RelayResult:
    """Copy both ways until both directions ended; closes both sockets before returning (also when
    cancelled: then with RST)."""
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    totals = [0, 0]

    def count_ab(n: int) -> None:
        totals[0] += n

    def count_ba(n: int) -> None:
        totals[1] += n

    a.setblocking(False)
    b.setblocking(False)
    tasks = [
        asyncio.ensure_future(_copy(a, b, chunk, count_ab)),
        asyncio.ensure_future(_copy(b, a, chunk, count_ba)),
    ]
    error: str | None = None
    clean = False
    try:
        for finished in asyncio.as_completed(tasks):
            try:
                await finished
            except OSError as e:
                error = e.strerror or str(e) or type(e).__name__
                break
        else:
            clean = True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if clean:
            a.close()
            b.close()
        else:
            refuse(a)
            refuse(b)
    return RelayResult(totals[0], totals[1], error)
