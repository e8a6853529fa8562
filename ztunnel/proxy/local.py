"""Which Workload an enrolled pod is, and waiting (bounded) until xDS has told us.

The node agent names a pod by its Kubernetes uid and describes it (name, namespace, service account);
the workload API names it "<cluster>//Pod/<namespace>/<name>". `find_local_workload` accepts either: the
uid as given (a test or a future agent may use the workload API name), else this node's workload with
the same namespace and name. A workload found that way must also run as the service account the agent
reported; if it does not, one of the two views is stale, and using it could tunnel with the wrong
identity, so the pod counts as unknown (fail closed) until they agree.

The pod usually arrives over ZDS before its Workload arrives over xDS. `StateChanges` turns the state's
synchronous watcher into something a connection can await: `wait_for(lookup, timeout)` re-evaluates
`lookup` after every applied xDS response and gives up at the timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from ztunnel.inpod.protocol import WorkloadInfo
from ztunnel.state import ProxyState, StateChange, Workload

T = TypeVar("T")


def find_local_workload(state: ProxyState, uid: str, info: WorkloadInfo) -> Workload | None:
    """The Workload for the pod the node agent calls `uid` / `info`; None when not (yet) known."""
    workload = state.workload(uid)
    if workload is not None:
        return workload
    for candidate in state.local_workloads():
        if candidate.namespace == info.namespace and candidate.name == info.name:
            if info.service_account and (candidate.service_account or "default") != info.service_account:
                return None
            return candidate
    return None


class StateChanges:
    """Wakes waiters after every state change. Create and use it on the state's event loop."""

    def __init__(self, state: ProxyState) -> None:
        self._event = asyncio.Event()
        self._unwatch = state.watch(self._on_change)

    def _on_change(self, _change: StateChange) -> None:
        # Wake everyone waiting on the current event, and give later waiters a fresh one.
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_for(self, lookup: Callable[[], T | None], within: float) -> T | None:
        """`lookup()` as soon as it is not None; None if it still is after `within` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            value = lookup()
            if value is not None:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            event = self._event
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return lookup()

    def close(self) -> None:
        self._unwatch()
