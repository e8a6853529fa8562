"""PeerAuthentication -> L4 `Authorization` DENY policies for connections without a peer identity.

Effective mode of a workload, most specific first (Istio's precedence): the workload-level
PeerAuthentication (a selector matching the pod, in the pod's namespace) > the namespace-wide one (no
selector, the pod's namespace) > the mesh-wide one (no selector, root namespace) > PERMISSIVE. UNSET
inherits from the next level; DISABLE is treated like PERMISSIVE (the node proxy has nothing to switch
off: it never requires plaintext). Port-level settings (`portLevelMtls`) are honoured on
workload-level PeerAuthentications only, as in Istio, and override the workload's mode on that port
(UNSET there inherits). Port-level settings on a PeerAuthentication without selector are ignored with a
warning. When several workload-level PeerAuthentications select one pod, the first by name is used
and the pod gets a warning (Istio uses the oldest; loom has no creation times). A mode loom does not
know is treated as STRICT, with a warning: failing closed.

Representation. Every converted policy is WORKLOAD_SELECTOR-scoped and listed in
`Workload.authorization_policies` of exactly the workloads whose effective mode needs it:

* `<root>/istio_converted_static_strict`: DENY when the peer has no identity (`not_principals:
  [presence]`). One policy shared by every workload that is STRICT on all ports, whichever level made
  it so (mesh, namespace or workload).
* `<ns>/converted_peer_authentication_<name>`: one per workload-level PeerAuthentication whose
  port-level settings leave its workloads with a mix of STRICT and PERMISSIVE ports: STRICT by default
  -> DENY without identity unless the port is one of the PERMISSIVE ports (`not_destination_ports`);
  PERMISSIVE by default -> DENY without identity on the STRICT ports (`destination_ports`).
* PERMISSIVE on all ports: nothing.

Why not NAMESPACE or GLOBAL scope for a namespace- or mesh-wide STRICT: a proxy applies such a policy
to every workload of the namespace (or mesh), including one a workload-level PERMISSIVE exempts, and
scopes cannot subtract. Listing per workload keeps the override exact; the effective state of a
workload depends only on PeerAuthentications, so the set of distinct policies does not depend on pods.
The names contain "_", which Kubernetes object names cannot, so they never collide with a user's policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf import empty_pb2

from controller.translate.serialized import serialize
from loom.api import authorization_pb2
from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.model import PeerAuthentication, Pod

STATIC_STRICT_NAME = "istio_converted_static_strict"
CONVERTED_PREFIX = "converted_peer_authentication_"
MAX_PORT = 65535

UNSET = "UNSET"
STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
DISABLE = "DISABLE"
_KNOWN_MODES = frozenset({UNSET, STRICT, PERMISSIVE, DISABLE})


@dataclass(frozen=True, slots=True)
class MtlsState:
    """The effective mTLS requirement of a workload."""

    strict: bool  # on ports without their own setting
    exceptions: frozenset[int]  # ports where the opposite holds


def _no_identity(**ports: list[int]) -> authorization_pb2.Group:
    match = authorization_pb2.Match(
        not_principals=[authorization_pb2.StringMatch(presence=empty_pb2.Empty())]
    )
    for field, values in ports.items():
        getattr(match, field).extend(values)
    return authorization_pb2.Group(rules=[authorization_pb2.Rules(matches=[match])])


def _deny(name: str, namespace: str, group: authorization_pb2.Group) -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(
        name=name,
        namespace=namespace,
        scope=authorization_pb2.WORKLOAD_SELECTOR,
        action=authorization_pb2.DENY,
        groups=[group],
    )


def _warning(pa: PeerAuthentication | Pod, field: str, message: str) -> Diagnostic:
    return Diagnostic(Severity.WARNING, message, origin=pa.origin, key=pa.key, field=field)


class PeerAuthenticationIndex:
    """The PeerAuthentications of one snapshot: the converted policies, and which one a pod lists."""

    def __init__(self, peer_authentications: Iterable[PeerAuthentication], root_namespace: str) -> None:
        self.root_namespace = root_namespace
        self.static_strict_key = f"{root_namespace}/{STATIC_STRICT_NAME}"
        # Converted policy key -> serialized Authorization (no messages kept: see translate.serialized).
        self.authorizations: dict[str, bytes] = {}
        self.diagnostics: list[Diagnostic] = []
        namespace_wide: dict[str, PeerAuthentication] = {}
        self._workload_level: dict[str, list[PeerAuthentication]] = {}
        for pa in sorted(peer_authentications, key=lambda p: p.key):
            self._check(pa)
            if pa.selector is None:
                kept = namespace_wide.setdefault(pa.namespace, pa)
                if kept is not pa:
                    self.diagnostics.append(
                        _warning(
                            pa,
                            "spec",
                            f"namespace {pa.namespace} already has the namespace-wide PeerAuthentication "
                            f"{kept.name}; this one is ignored",
                        )
                    )
            else:
                self._workload_level.setdefault(pa.namespace, []).append(pa)

        mesh = namespace_wide.get(root_namespace)
        self._mesh_strict = self._inherit(False, mesh.mode if mesh is not None else UNSET)
        self._namespace_strict = {
            ns: self._inherit(self._mesh_strict, pa.mode) for ns, pa in namespace_wide.items()
        }
        # The key each workload-level PeerAuthentication gives its pods (None: nothing to enforce).
        self._workload_keys: dict[tuple[str, str], str | None] = {}
        for namespace, pas in self._workload_level.items():
            for pa in pas:
                state = self._workload_state(pa, self.namespace_strict(namespace))
                self._workload_keys[(namespace, pa.name)] = self._key_for(state, pa)
        if any(strict for strict in self._namespace_strict.values()) or self._mesh_strict:
            self._add_static_strict()

    def _check(self, pa: PeerAuthentication) -> None:
        if pa.mode not in _KNOWN_MODES and pa.mode:
            self.diagnostics.append(
                _warning(pa, "spec.mtls.mode", f"unknown mTLS mode {pa.mode!r}; loom treats it as STRICT")
            )
        if pa.port_level_mtls and pa.selector is None:
            self.diagnostics.append(
                _warning(
                    pa,
                    "spec.portLevelMtls",
                    "port-level mTLS settings need a workload selector (as in Istio); they are ignored here",
                )
            )
        for port, mode in pa.port_level_mtls.items():
            if mode not in _KNOWN_MODES and mode:
                self.diagnostics.append(
                    _warning(
                        pa,
                        f"spec.portLevelMtls[{port}].mode",
                        f"unknown mTLS mode {mode!r}; loom treats it as STRICT",
                    )
                )
            if not 0 < port <= MAX_PORT:
                self.diagnostics.append(
                    _warning(
                        pa, f"spec.portLevelMtls[{port}]", f"{port} is not a port; the setting is ignored"
                    )
                )

    @staticmethod
    def _inherit(parent_strict: bool, mode: str) -> bool:
        if mode in (UNSET, ""):
            return parent_strict
        return mode not in (PERMISSIVE, DISABLE)  # STRICT, and fail closed on unknown modes

    def namespace_strict(self, namespace: str) -> bool:
        return self._namespace_strict.get(namespace, self._mesh_strict)

    def _workload_state(self, pa: PeerAuthentication, parent_strict: bool) -> MtlsState:
        strict = self._inherit(parent_strict, pa.mode)
        exceptions = frozenset(
            port
            for port, mode in pa.port_level_mtls.items()
            if 0 < port <= MAX_PORT and self._inherit(strict, mode) != strict
        )
        return MtlsState(strict, exceptions)

    def _add_static_strict(self) -> None:
        if self.static_strict_key not in self.authorizations:
            self.authorizations[self.static_strict_key] = serialize(
                _deny(STATIC_STRICT_NAME, self.root_namespace, _no_identity())
            )

    def _key_for(self, state: MtlsState, pa: PeerAuthentication) -> str | None:
        if not state.exceptions:
            if not state.strict:
                return None
            self._add_static_strict()
            return self.static_strict_key
        name = CONVERTED_PREFIX + pa.name
        key = f"{pa.namespace}/{name}"
        ports = sorted(state.exceptions)
        group = (
            _no_identity(not_destination_ports=ports)
            if state.strict
            else _no_identity(destination_ports=ports)
        )
        self.authorizations[key] = serialize(_deny(name, pa.namespace, group))
        return key

    def policy_for(self, pod: Pod) -> tuple[str | None, Diagnostic | None]:
        """(the converted policy key the pod lists or None, a warning when several PAs select it)."""
        candidates = self._workload_level.get(pod.namespace)
        if candidates:
            labels = pod.meta.labels
            selecting = [pa for pa in candidates if pa.selector is not None and pa.selector.matches(labels)]
            if selecting:
                chosen = selecting[0]
                diagnostic = None
                if len(selecting) > 1:
                    names = ", ".join(pa.name for pa in selecting)
                    diagnostic = _warning(
                        pod,
                        "metadata.labels",
                        f"several workload-level PeerAuthentications select this pod ({names}); loom "
                        f"applies {chosen.name}, the first by name",
                    )
                return self._workload_keys[(pod.namespace, chosen.name)], diagnostic
        if self.namespace_strict(pod.namespace):
            return self.static_strict_key, None
        return None, None
