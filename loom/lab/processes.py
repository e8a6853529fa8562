"""The lab's background processes: started detached inside a network namespace, found again later.

`loomctl lab up` starts the controller, the DNS server, a node agent and a ztunnel per node and one
workload per pod, then exits; later `loomctl` invocations (apply, status, down) must find those
processes again, also after a crash that lost `lab.json`. So every process is:

* started with `ip netns exec <netns> <argv>`, which enters the namespace (and bind-mounts
  `/etc/netns/<netns>/*` over `/etc`, which is how pods get their resolv.conf) and then `exec`s the
  program: the pid we record is the program's own;
* in its own session (no terminal signals from the shell that ran loomctl), stdin from /dev/null,
  stdout and stderr appended to its log file;
* marked with the environment variable `LOOM_LAB=<lab id>`, so `down` can find every process of the lab
  by scanning /proc even when the state file is gone;
* recorded with its kernel start time (field 22 of /proc/<pid>/stat), so a recycled pid is never
  mistaken for ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

LAB_MARKER_ENV: Final = "LOOM_LAB"
STOP_GRACE_SECONDS: Final = 5.0


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    name: str
    pid: int
    start_time: int
    netns: str
    log: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "start_time": self.start_time,
            "netns": self.netns,
            "log": self.log,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ProcessRecord:
        return cls(
            str(raw["name"]), int(raw["pid"]), int(raw["start_time"]), str(raw["netns"]), str(raw["log"])
        )


def start_time_of(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its closing ")".
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])  # field 22 overall; fields[0] here is field 3


def is_running(record: ProcessRecord) -> bool:
    started = start_time_of(record.pid)
    if started is None or started != record.start_time:
        return False
    with contextlib.suppress(OSError):  # a zombie counts as gone
        state = Path(f"/proc/{record.pid}/stat").read_text()
        return state[state.rfind(")") + 2] != "Z"
    return False


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    netns: str | None,
    log_path: Path,
    lab_id: str,
    env: Mapping[str, str] | None = None,
) -> ProcessRecord:
    """Start `argv` detached inside `netns` (None: in this process's namespace); see the module docstring."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, **(env or {}), LAB_MARKER_ENV: lab_id}
    # posix_spawn rather than subprocess.Popen: the process outlives this command, and a Popen object
    # dropped while its child runs is reported as a leak. Our fds are close-on-exec (PEP 446), so the
    # child inherits only the three set up here.
    command = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    pid = os.posix_spawnp(
        command[0],
        command,
        environment,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )
    # `ip netns exec` keeps the pid when it execs the program; the start time is that of the spawn.
    started = start_time_of(pid)
    if started is None:
        raise OSError(f"{name} exited at once; see {log_path}")
    return ProcessRecord(name, pid, started, netns or "", str(log_path))


def marked_pids(lab_id: str) -> list[int]:
    """Every live process carrying LOOM_LAB=<lab_id> in its environment."""
    needle = f"{LAB_MARKER_ENV}={lab_id}".encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def stop(
    records: Iterable[ProcessRecord], *, lab_id: str | None = None, grace: float = STOP_GRACE_SECONDS
) -> int:
    """SIGTERM the recorded processes (and every process marked with `lab_id`), SIGKILL what is left
    after `grace` seconds; returns how many were signalled."""
    pids = {r.pid for r in records if is_running(r)}
    if lab_id is not None:
        pids.update(marked_pids(lab_id))
    pids.discard(os.getpid())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    remaining = set(pids)
    while remaining and time.monotonic() < deadline:
        remaining = {pid for pid in remaining if _alive(pid)}
        if remaining:
            time.sleep(0.05)
    for pid in remaining:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:  # reap our own children, if loomctl started them in this run
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return len(pids)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child, so it does not linger as a zombie
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"
