"""Translation: Kubernetes/Istio resources -> the workload API the node proxies consume.

Pure functions only: `translate(snapshot, mesh)` has no I/O and is deterministic, so it is tested with
tables and property tests. The xDS server diffs successive `Translation`s per resource.

`Translator` is the incremental form the controller keeps across changes: when only Pods changed it
recomputes just those pods' Workloads (and the Services whose per-service-account waypoint depends on
them) and hands back the very same proto objects for everything else, so the xDS server can skip
unchanged resources by identity. Output protos are shared between successive Translations: treat them
as read-only.

Module map: `context` (everything that does not depend on Pods), `workloads`, `services`, `waypoints`,
`policy` (AuthorizationPolicy), `peer_authentication`, `translator` (full and incremental driver).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
    """Everything the controller serves, derived from one ConfigSnapshot."""

    # Resource name -> Address. Workloads are named by uid, services by "<namespace>/<hostname>".
    addresses: Mapping[str, workload_pb2.Address] = field(default_factory=dict)
    # "<namespace>/<name>" -> Authorization (includes converted PeerAuthentication policies).
    authorizations: Mapping[str, authorization_pb2.Authorization] = field(default_factory=dict)
    # Warnings and errors found while translating (e.g. L7 fields in a policy enforced at L4).
    diagnostics: tuple[Diagnostic, ...] = ()


# Imported last: the translator modules use MeshConfig and Translation defined above.
from controller.translate.translator import Translator, translate  # noqa: E402

__all__ = [
    "ADDRESS_TYPE_URL",
    "AUTHORIZATION_TYPE_URL",
    "MeshConfig",
    "Translation",
    "Translator",
    "translate",
]
