"""The waypoint reconciler's `Applier` for the Kubernetes API.

It writes through the controller's `KubernetesSource` (controller/sources/kubernetes.py), whose
`get_object`, `create_or_update` (POST, and on conflict GET + PUT with the current resourceVersion,
retried), `delete_object` and `patch_status` (merge patch of the status subresource) go through
kubernetes_asyncio's ApiClient with the same configuration, credentials and TLS as the watches. Objects
stay JSON dicts in API form, as everywhere in loom.

Readiness is the Deployment's `status.readyReplicas` as the API server reports it (Deployments are
not watched: the reconciler asks when something changed and on resync).

Replacing an object sends what loom wants; fields the API server allocated (a Service's clusterIP,
defaults) are kept by the API server itself on update. Every failure becomes `ApplyError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from controller.sources.kubernetes import KubernetesError
from controller.waypoints.reconciler import ApplyError
from loom.resources.model import ConfigSnapshot, ResourceKey


class KubernetesWriter(Protocol):
    """The writes of `KubernetesSource` the applier uses."""

    async def get_object(self, key: ResourceKey) -> dict[str, Any] | None: ...

    async def create_or_update(self, manifest: Mapping[str, Any]) -> dict[str, Any]: ...

    async def delete_object(self, key: ResourceKey) -> bool: ...

    async def patch_status(self, key: ResourceKey, status: Mapping[str, Any]) -> dict[str, Any]: ...


class KubernetesApplier:
    """`Applier` over the Kubernetes API."""

    def __init__(self, writer: KubernetesWriter) -> None:
        self._writer = writer

    async def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        try:
            return await self._writer.get_object(ResourceKey(kind, namespace, name))
        except (KubernetesError, ValueError) as e:
            raise ApplyError(f"reading {kind} {namespace}/{name}: {e}") from e

    async def put(self, manifest: Mapping[str, Any], current: Mapping[str, Any] | None) -> Mapping[str, Any]:
        try:
            return await self._writer.create_or_update(manifest)
        except (KubernetesError, ValueError) as e:
            meta = manifest.get("metadata", {})
            raise ApplyError(
                f"writing {manifest.get('kind')} {meta.get('namespace')}/{meta.get('name')}: {e}"
            ) from e

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        try:
            return await self._writer.delete_object(ResourceKey(kind, namespace, name))
        except (KubernetesError, ValueError) as e:
            raise ApplyError(f"deleting {kind} {namespace}/{name}: {e}") from e

    async def ready_replicas(self, namespace: str, name: str, snapshot: ConfigSnapshot) -> int:
        deployment = await self.get("Deployment", namespace, name)
        status = deployment.get("status") if deployment is not None else None
        ready = status.get("readyReplicas") if isinstance(status, Mapping) else None
        return ready if isinstance(ready, int) and not isinstance(ready, bool) and ready > 0 else 0

    async def write_status(self, gateway: ResourceKey, status: Mapping[str, Any]) -> None:
        try:
            await self._writer.patch_status(gateway, status)
        except KubernetesError as e:
            raise ApplyError(f"writing the status of {gateway}: {e}") from e
