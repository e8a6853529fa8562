"""The waypoint reconciler's `Applier` for the lab: objects in the lab's object store, credentials on disk.

The lab's store (loom/lab/store.py, LAB_DIR/config) is the lab's API server, and the controller reads
it as its configuration directory. The applier writes the waypoint's ServiceAccount, Service and
Deployment there with `LabStore.put` (validated by the store's admission, as the API server would),
reads them back with `get`, removes them with `remove`, and writes the Gateway's status with `update`
(a read-modify-write under the store's lock, so a concurrent `loomctl` edit is not lost). The lab then
runs the Deployment like any other: `loomctl` reconciles the store, schedules the pod on a node and
starts the command of its `lab.loom.io/command` annotation; it allocates the Service's clusterIP and
writes it into the stored Service, which is why replacing an object keeps `spec.clusterIP(s)` and
`status` from the stored one (fields the lab owns, as the API server owns them on Kubernetes).

Readiness: the waypoint's pods as the controller's snapshot shows them (the lab writes each Pod with
phase Running and ready once it is started).

Store operations are file I/O under a lock, so they run in a worker thread; every failure becomes an
`ApplyError`.

`LabCredentialFiles` writes each deployed waypoint's credential (controller/waypoints/auth.py) to
`<token dir>/<namespace>.<name>.token`, mode 0600, replaced atomically, only when it differs; the
Deployment's command line names that file. It is removed with the waypoint. The token directory is in
the controller's state directory, never in the configuration directory that everything reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from controller.waypoints.desired import LabSettings, ready_pods
from controller.waypoints.reconciler import ApplyError
from loom.lab.store import LabStore, StoredKey, StoreError
from loom.resources.model import ConfigSnapshot, ResourceKey

# Fields the lab sets on stored objects (paths into the manifest), kept when loom replaces one.
_LAB_OWNED: Final = (("spec", "clusterIP"), ("spec", "clusterIPs"), ("status",))


def keep_lab_owned(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """`desired`, plus the fields of `current` the lab owns that `desired` does not set."""
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in desired.items()}
    if current is None:
        return merged
    for path in _LAB_OWNED:
        source: Any = current
        for part in path:
            source = source.get(part) if isinstance(source, Mapping) else None
        if source is None:
            continue
        target = merged
        for part in path[:-1]:
            nested = target.get(part)
            if not isinstance(nested, dict):
                break
            target = nested
        else:
            target.setdefault(path[-1], source)
    return merged


class StoreApplier:
    """`Applier` over the lab's object store."""

    def __init__(self, store: LabStore) -> None:
        self.store = store

    async def _run(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return await asyncio.to_thread(call)
        except StoreError as e:
            raise ApplyError(f"{what}: {e}") from e

    async def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        key = StoredKey(kind, namespace, name)
        found: Mapping[str, Any] | None = await self._run(f"reading {key}", lambda: self.store.get(key))
        return found

    async def put(self, manifest: Mapping[str, Any], current: Mapping[str, Any] | None) -> Mapping[str, Any]:
        merged = keep_lab_owned(current, manifest)
        await self._run(f"writing {manifest.get('kind')}", lambda: self.store.put(merged))
        return merged

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        key = StoredKey(kind, namespace, name)
        removed: bool = await self._run(f"deleting {key}", lambda: self.store.remove(key))
        return removed

    async def ready_replicas(self, namespace: str, name: str, snapshot: ConfigSnapshot) -> int:
        return ready_pods(snapshot, namespace, name)

    async def write_status(self, gateway: ResourceKey, status: Mapping[str, Any]) -> None:
        key = StoredKey.of(gateway)

        def replace_status(manifest: dict[str, Any]) -> None:
            manifest["status"] = dict(status)

        # None: the Gateway was deleted meanwhile; its status no longer matters.
        await self._run(f"writing the status of {key}", lambda: self.store.update(key, replace_status))


class LabCredentialFiles:
    """Per-waypoint credential files for the lab (see the module docstring)."""

    def __init__(self, issue: Callable[[str, str], str], settings: LabSettings) -> None:
        self._issue = issue
        self._settings = settings

    async def write(self, namespace: str, name: str) -> None:
        path = self._settings.token_path(namespace, name)
        token = self._issue(namespace, name)

        def write() -> None:
            with contextlib.suppress(OSError):
                if path.read_text(encoding="ascii") == token:
                    return
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "w", encoding="ascii") as handle:
                    handle.write(token)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

        try:
            await asyncio.to_thread(write)
        except OSError as e:
            raise ApplyError(f"writing the credential of waypoint {namespace}/{name}: {e}") from e

    async def remove(self, namespace: str, name: str) -> None:
        path = self._settings.token_path(namespace, name)
        try:
            await asyncio.to_thread(lambda: path.unlink(missing_ok=True))
        except OSError as e:
            raise ApplyError(f"removing the credential of waypoint {namespace}/{name}: {e}") from e


def lab_waypoint_command() -> tuple[str, ...]:
    """The waypoint command for lab pods: the `loom-waypoint` script installed next to this Python
    (the lab's processes do not inherit a virtualenv's PATH), else the module run by this Python."""
    script = Path(sys.executable).parent / "loom-waypoint"
    if script.is_file() and os.access(script, os.X_OK):
        return (str(script),)
    return (sys.executable, "-m", "waypoint.main")
