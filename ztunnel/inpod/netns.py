"""Working inside a pod's network namespace from ztunnel's own namespace.

Theory of operation
-------------------
ztunnel runs in the node's namespace but listens and connects *inside* each enrolled pod's namespace,
whose fd the node agent passes over ZDS. A socket belongs, for its whole life, to the namespace its
creating thread was in at `socket()` time, so ztunnel only needs to be inside the pod namespace for the
few system calls that create and set up a socket; the event loop then drives the socket from the node
namespace like any other.

The network namespace is a per-thread property (`setns(fd, CLONE_NEWNET)` moves the calling thread
only). The event loop thread must never switch: if switching back failed it would be stranded in a pod,
and every later socket would be created there. So all switching happens on one dedicated thread (the
`NetnsSwitcher`): it enters the pod namespace, runs a short callable, and always switches back to the
namespace the switcher was created in. If switching back ever fails, that thread is retired (its
executor is shut down and replaced), so no later work runs in the wrong namespace.

Python 3.11 has no `os.setns`; the switcher calls libc's `setns(2)` through ctypes.

Sockets made here carry SO_MARK 0x539 (`INPOD_MARK`): the in-pod capture rules skip that mark, which is
how ztunnel's own connections escape the redirection it serves. Setting the mark is mandatory (an
unmarked ztunnel socket would be captured by ztunnel itself); IP_TRANSPARENT on listeners is best effort
(it is needed only with TPROXY-style capture, not with the REDIRECT rules loom installs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Final, TypeVar

from cni.rules import INPOD_MARK
from loom.hbone import listening_socket

log = logging.getLogger(__name__)

T = TypeVar("T")

CLONE_NEWNET: Final = 0x40000000
# ioctl on an nsfs file answering its namespace type (a CLONE_NEW* value); Linux >= 4.11.
NS_GET_NSTYPE: Final = 0xB703
# Linux socket options the socket module does not name on every build.
SOL_IPV6: Final = 41
IP_TRANSPARENT: Final = 19
IP_FREEBIND: Final = 15
IPV6_TRANSPARENT: Final = 75
IPV6_FREEBIND: Final = 78
# netfilter's getsockopt for the pre-NAT destination of a REDIRECTed connection (SOL_IP / SOL_IPV6).
SO_ORIGINAL_DST: Final = 80
IP6T_SO_ORIGINAL_DST: Final = 80
_SOCKADDR_IN_SIZE: Final = 16
_SOCKADDR_IN6_SIZE: Final = 28

# Listen backlog: large enough for a connection burst to one pod; the kernel caps it at somaxconn.
DEFAULT_BACKLOG: Final = 1024
# How long an outbound connect from inside a pod may take before it counts as failed (ztunnel uses 10 s).
DEFAULT_CONNECT_TIMEOUT: Final = 10.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


class NetnsError(OSError):
    """A namespace fd that cannot be used, or a namespace switch that failed."""


def setns(fd: int) -> None:
    """Move the *calling thread* into the network namespace `fd` refers to."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise NetnsError(code, f"setns(fd={fd}, CLONE_NEWNET) failed: {os.strerror(code)}")


def namespace_identity(fd: int) -> tuple[int, int]:
    """(device, inode) of a network namespace fd; raises NetnsError when `fd` is not one."""
    try:
        stat = os.fstat(fd)
    except OSError as err:
        raise NetnsError(err.errno or errno.EBADF, f"fd {fd} is not an open file: {err.strerror}") from None
    try:
        # Asks nsfs itself; works for /proc/<pid>/ns/net and for bind mounts such as /var/run/netns/<name>.
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = None
    if kind != CLONE_NEWNET:
        raise NetnsError(errno.EINVAL, f"fd {fd} is not a network namespace (it refers to {_describe(fd)})")
    return stat.st_dev, stat.st_ino


def _describe(fd: int) -> str:
    try:
        return repr(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return "an unknown file"


class NetnsSwitcher:
    """Runs short callables inside network namespaces on one dedicated thread; always switches back."""

    def __init__(self, name: str = "netns-switcher") -> None:
        self._name = name
        # The namespace of the constructing thread is "home": every call ends by returning there.
        self._home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._executor = self._new_executor()
        self._closed = False

    def _new_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)

    def submit(self, netns_fd: int, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._closed:
                raise NetnsError(errno.EBADF, "the namespace switcher is closed")
            return self._executor.submit(self._call_inside, netns_fd, fn)

    def call(self, netns_fd: int, fn: Callable[[], T], timeout: float | None = 30.0) -> T:
        """Run `fn` inside the namespace and wait for its result (from any thread but the switcher's)."""
        return self.submit(netns_fd, fn).result(timeout)

    async def run(self, netns_fd: int, fn: Callable[[], T]) -> T:
        """Run `fn` inside the namespace without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(netns_fd, fn))

    def _call_inside(self, netns_fd: int, fn: Callable[[], T]) -> T:
        setns(netns_fd)
        try:
            return fn()
        finally:
            try:
                setns(self._home_fd)
            except OSError:
                log.critical("could not return the namespace switcher thread home; retiring that thread")
                with self._lock:
                    retired, self._executor = self._executor, self._new_executor()
                # Queued work must not run on the stranded thread either: fail it.
                retired.shutdown(wait=False, cancel_futures=True)
                raise

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor = self._executor
        executor.shutdown(wait=True)
        os.close(self._home_fd)


_default_switcher: NetnsSwitcher | None = None
_default_lock = threading.Lock()


def default_switcher() -> NetnsSwitcher:
    """The process-wide switcher; created on first use, in the namespace of the thread that first asks."""
    global _default_switcher
    with _default_lock:
        if _default_switcher is None:
            _default_switcher = NetnsSwitcher()
        return _default_switcher


def _family_of(ip: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    except ValueError:
        raise ValueError(f"{ip!r} is not an IP address") from None


def _set_mark(sock: socket.socket, mark: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except OSError as err:
        # Fail closed: an unmarked ztunnel socket would be captured by the rules it serves.
        raise NetnsError(
            err.errno or errno.EPERM, f"cannot set SO_MARK {mark:#x} (needs CAP_NET_ADMIN): {err.strerror}"
        ) from None


class InpodNetns:
    """A pod's network namespace, held open by its fd, with factories for sockets inside it.

    Owns the fd: `close()` releases it (sockets already created inside stay valid). Work queued for the
    switcher keeps the fd open until it has run or been cancelled, so a concurrent close can never let
    the fd number be reused -- possibly by another pod's namespace -- under a pending switch."""

    def __init__(self, fd: int, *, switcher: NetnsSwitcher | None = None) -> None:
        self._device, self._inode = namespace_identity(fd)
        self._fd = fd
        self._switcher = switcher
        self._state = threading.Lock()  # pending-work completions arrive on the switcher thread
        self._closed = False
        self._fd_released = False
        self._pending = 0

    @classmethod
    def open(cls, path: str, *, switcher: NetnsSwitcher | None = None) -> InpodNetns:
        """Open a namespace by path (/var/run/netns/<name>, /proc/<pid>/ns/net)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return cls(fd, switcher=switcher)
        except BaseException:
            os.close(fd)
            raise

    def dup(self) -> InpodNetns:
        """An independent handle on the same namespace (its own fd), for holders with their own lifetime."""
        fd = os.dup(self.fd)
        try:
            return InpodNetns(fd, switcher=self._switcher)
        except BaseException:
            os.close(fd)
            raise

    @property
    def fd(self) -> int:
        if self._closed:
            raise NetnsError(errno.EBADF, f"network namespace inode {self._inode} is already closed")
        return self._fd

    @property
    def inode(self) -> int:
        return self._inode

    @property
    def identity(self) -> tuple[int, int]:
        """(device, inode): equal for two fds of the same namespace."""
        return self._device, self._inode

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
            release = self._pending == 0
            self._fd_released |= release
        if release:
            os.close(self._fd)

    def _work_done(self, _: object = None) -> None:
        with self._state:
            self._pending -= 1
            release = self._closed and self._pending == 0 and not self._fd_released
            self._fd_released |= release
        if release:
            os.close(self._fd)

    def __enter__(self) -> InpodNetns:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"InpodNetns(inode={self._inode}{', closed' if self._closed else ''})"

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue `fn` to run inside this namespace; the future completes on the switcher thread."""
        switcher = self._switcher if self._switcher is not None else default_switcher()
        with self._state:
            fd = self.fd
            self._pending += 1
        try:
            future = switcher.submit(fd, fn)
        except BaseException:
            self._work_done()
            raise
        # Runs when the work finished or was cancelled before it started.
        future.add_done_callback(self._work_done)
        return future

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` with a thread switched into this namespace (never the event loop's thread)."""
        return await asyncio.wrap_future(self.submit(fn))

    def run_blocking(self, fn: Callable[[], T], timeout: float | None = 30.0) -> T:
        """`run` for synchronous callers (not on the event loop)."""
        return self.submit(fn).result(timeout)

    async def listener(
        self,
        port: int,
        *,
        host: str = "0.0.0.0",
        transparent: bool = True,
        reuseport: bool = True,
        mark: int = INPOD_MARK,
        backlog: int = DEFAULT_BACKLOG,
    ) -> socket.socket:
        """A listening, non-blocking TCP socket on host:port inside the namespace (an IPv6 host listens
        for IPv6 only).

        SO_REUSEPORT lets a second ztunnel bind the same ports while the first drains (restarts)."""
        _family_of(host)  # a clear error for anything but an IP address, before the thread hop

        def prepare(sock: socket.socket) -> None:
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            _set_mark(sock, mark)
            if transparent:
                level, option = (socket.SOL_IP, IP_TRANSPARENT)
                if sock.family == socket.AF_INET6:
                    level, option = (SOL_IPV6, IPV6_TRANSPARENT)
                try:
                    sock.setsockopt(level, option, 1)
                except PermissionError:
                    log.debug(
                        "IP_TRANSPARENT refused on listener port %d; REDIRECT capture does not need it",
                        port,
                    )

        return await self.run(lambda: listening_socket(host, port, backlog, prepare=prepare))

    async def socket_for(
        self, dst: tuple[str, int], *, src_ip: str | None = None, mark: int = INPOD_MARK
    ) -> socket.socket:
        """An unconnected, non-blocking TCP socket inside the namespace, marked, for connecting to `dst`.

        With `src_ip`, the socket is bound to that address even though it is not local (IP_TRANSPARENT +
        IP_FREEBIND): this is how inbound connections reach the app with the client's own address."""
        family = _family_of(dst[0])
        if src_ip is not None and _family_of(src_ip) != family:
            raise ValueError(f"source {src_ip} and destination {dst[0]} are of different address families")

        def make() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                _set_mark(sock, mark)
                if src_ip is not None:
                    level = socket.SOL_IP if family == socket.AF_INET else SOL_IPV6
                    transparent = IP_TRANSPARENT if family == socket.AF_INET else IPV6_TRANSPARENT
                    freebind = IP_FREEBIND if family == socket.AF_INET else IPV6_FREEBIND
                    sock.setsockopt(level, transparent, 1)
                    sock.setsockopt(level, freebind, 1)
                    sock.bind((src_ip, 0))
                sock.setblocking(False)
                return sock
            except BaseException:
                sock.close()
                raise

        return await self.run(make)

    async def connect(
        self,
        dst: tuple[str, int],
        *,
        src_ip: str | None = None,
        mark: int = INPOD_MARK,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> socket.socket:
        """A connected, non-blocking TCP socket from inside the namespace to `dst` (see `socket_for`).

        Only creation happens in the namespace; the connect itself runs on the event loop."""
        sock = await self.socket_for(dst, src_ip=src_ip, mark=mark)
        try:
            async with asyncio.timeout(connect_timeout):
                await asyncio.get_running_loop().sock_connect(sock, dst)
        except BaseException:
            sock.close()
            raise
        return sock


def parse_original_dst(raw: bytes) -> tuple[str, int]:
    """Decode a `struct sockaddr_in` / `sockaddr_in6` as returned by SO_ORIGINAL_DST."""
    if len(raw) < 2:
        raise ValueError(f"original destination address is {len(raw)} bytes, too short for a sockaddr")
    (family,) = struct.unpack_from("=H", raw)
    if family == socket.AF_INET:
        if len(raw) < 8:
            raise ValueError(f"sockaddr_in is {len(raw)} bytes, need at least 8")
        port, address = struct.unpack_from("!H4s", raw, 2)
        return socket.inet_ntop(socket.AF_INET, address), port
    if family == socket.AF_INET6:
        if len(raw) < 24:
            raise ValueError(f"sockaddr_in6 is {len(raw)} bytes, need at least 24")
        port, _flowinfo, address = struct.unpack_from("!HI16s", raw, 2)
        return socket.inet_ntop(socket.AF_INET6, address), port
    raise ValueError(f"original destination has address family {family}, not AF_INET or AF_INET6")


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination a REDIRECTed connection was originally addressed to (netfilter conntrack)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_SIZE)
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_SIZE)
    return parse_original_dst(raw)
