"""Translation: Kubernetes/Istio resources -> the workload API the node proxies consume.

Pure functions only: `translate(snapshot, mesh)` has no I/O and is deterministic, so it is tested with
tables and property tests. The xDS server diffs successive `Translation`s per resource.

`Translator` is the incremental form the controller keeps across changes: when only Pods changed it
recomputes just those pods' Workloads (and the Services whose per-service-account waypoint depends on
them) and hands back the very same serialized bytes for everything else, so the xDS server can skip
unchanged resources by identity.

Resources are kept serialized, not as live messages (`serialized`: a live upb message costs about
twenty times its wire size, and the controller holds every resource it serves). `Translation.addresses`
and `.authorizations` are read-only Mappings of messages all the same: each read decodes a fresh
message, which callers must treat as a value (mutating it changes nothing). The xDS layer reads the
bytes directly (`SerializedMessages.blobs`).

Module map: `context` (everything that does not depend on Pods), `workloads`, `services`, `waypoints`,
`policy` (AuthorizationPolicy), `peer_authentication`, `translator` (full and incremental driver),
`serialized` (the byte-backed message mapping).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from controller.translate.serialized import SerializedMessages
from loom.api import authorization_pb2, workload_pb2
from loom.resources.diagnostics import Diagnostic
from loom.resources.model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Mesh-wide settings the translation depends on."""

    trust_domain: str = DEFAULT_TRUST_DOMAIN
    # Policies in this namespace without a selector apply mesh-wide (scope GLOBAL).
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    cluster_id: str = "Kubernetes"
    network: str = ""
    # DNS suffix of service hostnames: <svc>.<ns>.svc.<cluster_domain>.
    cluster_domain: str = "cluster.local"
    # When True, an enrolled pod is sent with tunnel_protocol HBONE only once its annotation
    # ambient.istio.io/redirection is "enabled" (Istio's rule: the CNI node agent writes it after the pod's
    # traffic is captured). False by default because the directory source is read before the lab's node
    # agent has captured anything (it adds the annotation later, and the YAML users bring never has it);
    # waiting for it there would leave every pod out of the mesh. The Kubernetes source should set True.
    require_redirection_annotation: bool = False


@dataclass(frozen=True, slots=True)
class Translation:
    """Everything the controller serves, derived from one ConfigSnapshot.

    `addresses` and `authorizations` may be given as any Mapping of messages (tests, tools); they are
    stored as `SerializedMessages` (serialized once, here), which is what reading them returns. Each
    read of an entry decodes a fresh message: treat it as a value.
    """

    # Resource name -> Address. Workloads are named by uid, services by "<namespace>/<hostname>".
    addresses: Mapping[str, workload_pb2.Address] = field(default_factory=dict)
    # "<namespace>/<name>" -> Authorization (includes converted PeerAuthentication policies).
    authorizations: Mapping[str, authorization_pb2.Authorization] = field(default_factory=dict)
    # Warnings and errors found while translating (e.g. L7 fields in a policy enforced at L4).
    diagnostics: tuple[Diagnostic, ...] = ()

    def __post_init__(self) -> None:
        # No-ops for what the translator builds (already SerializedMessages of the right type).
        object.__setattr__(self, "addresses", SerializedMessages.of(workload_pb2.Address, self.addresses))
        object.__setattr__(
            self,
            "authorizations",
            SerializedMessages.of(authorization_pb2.Authorization, self.authorizations),
        )

    @property
    def serialized_addresses(self) -> SerializedMessages[workload_pb2.Address]:
        """`addresses` with its byte-level accessors (`serialized(name)`, `blobs`)."""
        return SerializedMessages.of(workload_pb2.Address, self.addresses)

    @property
    def serialized_authorizations(self) -> SerializedMessages[authorization_pb2.Authorization]:
        """`authorizations` with its byte-level accessors (`serialized(name)`, `blobs`)."""
        return SerializedMessages.of(authorization_pb2.Authorization, self.authorizations)


# Imported last: the translator modules use MeshConfig and Translation defined above.
from controller.translate.translator import Translator, translate  # noqa: E402

__all__ = [
    "ADDRESS_TYPE_URL",
    "AUTHORIZATION_TYPE_URL",
    "MeshConfig",
    "SerializedMessages",
    "Translation",
    "Translator",
    "translate",
]
