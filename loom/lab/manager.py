"""The lab's controller manager: reconciles the lab whenever its object store changes.

`loomctl` commands reconcile the lab themselves, but objects also change behind their back: the
controller's waypoint reconciler writes a waypoint's Deployment and Service into the store, a pod's
process can die. Like kube-controller-manager plus the kubelets, this process follows the store
(inotify through watchfiles, debounced) and runs `Cluster.sync` after every change, and every
`RESYNC_SECONDS` in any case (restarting pod processes that died). It runs in the root namespace (it
creates pod namespaces), started by `loomctl lab up` and stopped by `lab down` like every lab process.
A failed pass is logged and retried on the next change or resync; it never stops the manager.

    python -m loom.lab.manager --lab-dir DIR [--prefix PREFIX]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from watchfiles import awatch

from loom.lab.cluster import Cluster, LabError

log = logging.getLogger("loom.lab.manager")
RESYNC_SECONDS: Final = 10.0
DEBOUNCE_MS: Final = 100


async def manage(cluster: Cluster, stop: asyncio.Event) -> None:
    changed = asyncio.Event()
    changed.set()  # a first pass at start

    async def wake_on_stop() -> None:
        await stop.wait()
        changed.set()

    async def watch() -> None:
        async for _ in awatch(cluster.config_dir, debounce=DEBOUNCE_MS, stop_event=stop, recursive=True):
            changed.set()

    watcher = asyncio.create_task(watch(), name="lab-store-watch")
    waker = asyncio.create_task(wake_on_stop(), name="lab-stop-waker")
    try:
        while not stop.is_set():
            try:
                async with asyncio.timeout(RESYNC_SECONDS):
                    await changed.wait()
            except TimeoutError:
                pass
            changed.clear()
            if stop.is_set():
                break
            try:
                await asyncio.to_thread(cluster.sync, lambda line: log.info("%s", line.strip()))
            except (LabError, OSError, ValueError) as exc:
                log.error("reconcile failed (retried on the next change): %s", exc)
    finally:
        watcher.cancel()
        waker.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loom.lab.manager", description=__doc__.splitlines()[0])
    parser.add_argument("--lab-dir", type=Path, required=True)
    parser.add_argument("--prefix", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cluster = Cluster(args.lab_dir, args.prefix)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await manage(cluster, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
