"""The in-pod `ProxyManager`: one `WorkloadProxy` per enrolled pod, started and stopped by ZDS.

Theory of operation
-------------------
`InpodClient` calls `start(uid, info, netns)` and `stop(uid, drain)` under its own lock, so the manager
never sees two operations at once. `start` takes its own duplicate of the namespace fd (the client
closes its copy right after `stop`) and binds the pod's listeners; a failed start leaves nothing behind.

`stop` closes the pod's listeners before it returns. With `drain`, open connections continue in a
background task until the drain deadline, then are closed; the same uid may meanwhile be started again
(a pod whose sandbox was recreated gets a new proxy at once while the old one drains). Without `drain`
everything is closed before `stop` returns.

`shutdown(deadline)` is SIGTERM: every listener closes at once, open connections drain until the
deadline, then are closed. `abort()` is the second SIGTERM: close everything now.
"""

from __future__ import annotations

import asyncio
import logging

from ztunnel.inpod.netns import InpodNetns
from ztunnel.inpod.protocol import WorkloadInfo
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.workload import WorkloadProxy

logger = logging.getLogger("ztunnel.proxy")


class InpodProxyManager:
    """Runs the per-pod proxies of one node proxy (implements `ztunnel.inpod.ProxyManager`)."""

    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self._proxies: dict[str, WorkloadProxy] = {}
        self._draining: dict[asyncio.Task[None], WorkloadProxy] = {}
        self._stopping = False

    @property
    def proxies(self) -> dict[str, WorkloadProxy]:
        """The running proxies by pod uid (draining ones are not listed)."""
        return dict(self._proxies)

    @property
    def draining(self) -> int:
        return len(self._draining)

    async def start(self, uid: str, workload: WorkloadInfo, netns: InpodNetns) -> None:
        if self._stopping:
            raise RuntimeError("ztunnel is shutting down; not starting new proxies")
        previous = self._proxies.pop(uid, None)
        if previous is not None:
            # The client never starts a running uid twice; if it does, the newest namespace wins.
            self._drain_in_background(previous)
        own = netns.dup()
        proxy = WorkloadProxy(self.context, uid, workload, own)
        try:
            await proxy.start()
        except BaseException:
            await proxy.abort()
            raise
        self._proxies[uid] = proxy

    async def stop(self, uid: str, drain: bool) -> None:
        proxy = self._proxies.pop(uid, None)
        if proxy is None:
            return
        await proxy.close_listeners()
        if drain:
            self._drain_in_background(proxy)
        else:
            await proxy.abort()

    def _drain_in_background(self, proxy: WorkloadProxy) -> None:
        task = asyncio.get_running_loop().create_task(
            proxy.drain(self.context.settings.drain_deadline), name=f"drain-{proxy.uid}"
        )
        self._draining[task] = proxy
        task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task[None]) -> None:
        proxy = self._draining.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "proxy drain failed",
                extra={"fields": {"workload": proxy.name if proxy else "?", "error": repr(task.exception())}},
            )

    async def close_listeners(self) -> None:
        """Stop accepting on every pod at once (first step of SIGTERM)."""
        self._stopping = True
        await asyncio.gather(*(proxy.close_listeners() for proxy in self._proxies.values()))

    async def shutdown(self, deadline: float) -> None:
        """Close every listener now, let connections finish until `deadline` seconds, close the rest."""
        await self.close_listeners()
        proxies, self._proxies = list(self._proxies.values()), {}
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(proxy.drain(deadline), name=f"drain-{proxy.uid}") for proxy in proxies]
        for task, proxy in zip(tasks, proxies, strict=True):
            self._draining[task] = proxy
            task.add_done_callback(self._drained)
        await self.wait_drained()

    async def wait_drained(self) -> None:
        """Wait for every background drain (each is bounded by its deadline)."""
        while self._draining:
            await asyncio.wait(set(self._draining))

    async def abort(self) -> None:
        """Close every proxy and connection now (second SIGTERM, or teardown)."""
        self._stopping = True
        proxies = [*self._proxies.values(), *self._draining.values()]
        self._proxies = {}
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*(proxy.abort() for proxy in proxies), return_exceptions=True)
        await self.wait_drained()
