"""A stand-in for loom-cni-agent's plugin-event socket, for the CNI plugin tests.

A threaded unix stream server speaking the `cni.events` wire format through its codec. Each test decides
the answer per request with a `Behaviour`: a reply, "hang" (accept and never answer, to exercise the
plugin's deadline) or "close" (hang up without answering). Every request received is recorded.
"""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

from cni.events import AgentReply, AgentRequest, decode_request, encode_reply

Behaviour = Callable[[AgentRequest], AgentReply | Literal["hang", "close"]]

# Upper bound on how long a "hang" handler keeps its connection open; the test ends it sooner.
_HANG_LIMIT_SECONDS = 30.0


class StandInAgent:
    def __init__(self, socket_path: str, behaviour: Behaviour) -> None:
        self.socket_path = socket_path
        self.behaviour = behaviour
        self.requests: list[AgentRequest] = []
        self.raw_lines: list[bytes] = []
        self._release = threading.Event()
        self._lock = threading.Lock()
        agent = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(1 << 20)
                request = decode_request(line)
                with agent._lock:
                    agent.raw_lines.append(line)
                    agent.requests.append(request)
                answer = agent.behaviour(request)
                if answer == "hang":
                    agent._release.wait(_HANG_LIMIT_SECONDS)
                    return
                if answer == "close":
                    return
                assert isinstance(answer, AgentReply)
                self.wfile.write(encode_reply(answer))

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True
            block_on_close = False

        self._server = Server(socket_path, Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@contextmanager
def short_socket_dir() -> Iterator[str]:
    """A fresh directory under /tmp: unix socket paths must stay under 108 bytes."""
    path = tempfile.mkdtemp(prefix="lc", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running_agent(behaviour: Behaviour) -> Iterator[StandInAgent]:
    with short_socket_dir() as directory:
        agent = StandInAgent(os.path.join(directory, "ev.sock"), behaviour)
        agent.start()
        try:
            yield agent
        finally:
            agent.stop()


@contextmanager
def dead_socket() -> Iterator[str]:
    """A socket file nobody listens on (bound, never listening): connecting is refused at once."""
    with short_socket_dir() as directory:
        path = os.path.join(directory, "dead.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            yield path
        finally:
            sock.close()
