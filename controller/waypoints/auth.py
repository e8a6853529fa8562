"""Who is calling, when the caller is a waypoint proxy: its credential and its identity.

Theory of operation
-------------------
A waypoint talks to the same gRPC port as the node proxies (xDS and CA) with its own credential, and
is authenticated into a `NodeIdentity` whose `waypoint` ("<namespace>/<name>" of its Gateway) and
`waypoint_service_account` are set. From those alone the xDS server decides what it may see (Address
plus its own WaypointConfig) and the CA what it may get (a certificate for its own account only).

* Lab (`LabMeshAuthenticator`): the controller's node-credential mechanism, extended with a second
  kind of subject. A waypoint credential is `loom-waypoint.v1.<namespace>/<name>.<mac>`, the mac an
  HMAC-SHA256 under the same key as node credentials but with another purpose string, so that a node
  credential never verifies as a waypoint's or the reverse. Anything else goes to the node
  authenticator unchanged. The controller writes each deployed waypoint's credential to a file the
  waypoint's pod reads (reconciler.py).
* Kubernetes (`KubernetesMeshAuthenticator`): the waypoint presents its pod's projected
  service-account token (audience istio-ca), reviewed like a node proxy's. An account that is not a
  trusted node-proxy account is accepted as waypoint W only if the token is bound to a pod that
  exists now with the token's UID and account, is running, carries the label
  `gateway.networking.k8s.io/gateway-name: W`, and runs as the account loom gives W's waypoint
  (`waypoint_service_account`).

Both check against the controller's *current* snapshot on every call: the Gateway must exist and be of
class istio-waypoint. A waypoint whose Gateway was deleted (its credential does not expire, its pod
may linger) loses access at once. Every failure is an `AuthenticationError`; callers answer all of
them with one opaque error (fail closed).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from typing import Final

from controller.auth import (
    AuthenticationError,
    KubernetesNodeAuthenticator,
    LabNodeAuthenticator,
    Metadata,
    NodeIdentity,
    bearer_token,
)
from controller.translate.waypoints import LABEL_GATEWAY_NAME
from controller.waypoints.desired import waypoint_service_account
from loom.resources.model import ConfigSnapshot, Gateway, Pod

WAYPOINT_TOKEN_PREFIX: Final = "loom-waypoint.v1."
_PURPOSE: Final = "loom-waypoint.v1"
_TERMINATED_PHASES = frozenset({"Failed", "Succeeded"})
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")


def _valid_ref(namespace: str, name: str) -> bool:
    return bool(_DNS_LABEL.match(namespace)) and bool(_DNS_LABEL.match(name))


def waypoint_of(snapshot: ConfigSnapshot, namespace: str, name: str) -> Gateway:
    """The waypoint Gateway `namespace`/`name` of the current configuration, or AuthenticationError."""
    gateway = snapshot.get_obj(Gateway, namespace, name)
    if gateway is None:
        raise AuthenticationError("waypoint-not-found", f"there is no Gateway {namespace}/{name}")
    if not gateway.is_waypoint:
        raise AuthenticationError(
            "waypoint-not-found", f"Gateway {namespace}/{name} has class {gateway.gateway_class!r}"
        )
    return gateway


def waypoint_identity(gateway: Gateway, subject: str, node_name: str = "", pod: str = "") -> NodeIdentity:
    return NodeIdentity(
        node_name=node_name,
        subject=subject,
        pod=pod,
        waypoint=f"{gateway.namespace}/{gateway.name}",
        waypoint_service_account=waypoint_service_account(gateway),
    )


class LabMeshAuthenticator:
    """Lab credentials of node proxies (delegated) and of waypoints (see the module docstring)."""

    def __init__(self, nodes: LabNodeAuthenticator, snapshot: Callable[[], ConfigSnapshot]) -> None:
        self._nodes = nodes
        self._snapshot = snapshot

    def issue_waypoint_token(self, namespace: str, name: str) -> str:
        if not _valid_ref(namespace, name):
            raise ValueError(
                f"{namespace!r}/{name!r} is not a valid waypoint (namespace and name: DNS labels)"
            )
        subject = f"{namespace}/{name}"
        return f"{WAYPOINT_TOKEN_PREFIX}{subject}.{self._nodes.keyed_mac(_PURPOSE, subject)}"

    def issue_node_token(self, node: str) -> str:
        return self._nodes.issue_node_token(node)

    def verify_waypoint(self, token: str) -> tuple[str, str]:
        """(namespace, name) a waypoint credential was issued to, or AuthenticationError."""
        if not token.startswith(WAYPOINT_TOKEN_PREFIX):
            raise AuthenticationError("malformed-credential", "not a loom waypoint credential")
        subject, _, mac = token[len(WAYPOINT_TOKEN_PREFIX) :].rpartition(".")
        namespace, slash, name = subject.partition("/")
        if not slash or not mac or not _valid_ref(namespace, name):
            raise AuthenticationError(
                "malformed-credential", "loom waypoint credential without waypoint or mac"
            )
        expected = self._nodes.keyed_mac(_PURPOSE, subject)
        if not hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode("ascii")):
            raise AuthenticationError("bad-credential", f"credential for waypoint {subject} does not verify")
        return namespace, name

    async def authenticate(self, metadata: Metadata) -> NodeIdentity:
        token = bearer_token(metadata)
        if not token.startswith(WAYPOINT_TOKEN_PREFIX):
            return await self._nodes.authenticate(metadata)
        namespace, name = self.verify_waypoint(token)
        gateway = waypoint_of(self._snapshot(), namespace, name)
        return waypoint_identity(gateway, subject=f"waypoint/{namespace}/{name}")


def kubernetes_waypoint_caller(
    snapshot: ConfigSnapshot,
    *,
    namespace: str,
    service_account: str,
    username: str,
    pod_name: str,
    pod_uid: str,
    node_name: str,
) -> NodeIdentity:
    """The waypoint a reviewed token belongs to (pure: the checks of the module docstring)."""
    if not pod_name or not pod_uid:
        raise AuthenticationError("unbound-token", f"token of {username} is not bound to a pod")
    where = f"{namespace}/{pod_name}"
    pod = snapshot.get_obj(Pod, namespace, pod_name)
    if pod is None:
        raise AuthenticationError("caller-pod-not-found", f"pod {where} does not exist")
    if pod.meta.uid != pod_uid:
        raise AuthenticationError(
            "caller-pod-uid-mismatch", f"pod {where} has uid {pod.meta.uid!r}, token is for {pod_uid!r}"
        )
    if pod.spec.service_account != service_account:
        raise AuthenticationError(
            "caller-pod-account-mismatch", f"pod {where} runs as {pod.spec.service_account!r}"
        )
    if pod.phase in _TERMINATED_PHASES or not pod.spec.node_name:
        raise AuthenticationError(
            "caller-pod-not-running", f"pod {where} is {pod.phase} on {pod.spec.node_name!r}"
        )
    if node_name and node_name != pod.spec.node_name:
        raise AuthenticationError(
            "caller-node-mismatch",
            f"token is bound to node {node_name!r}, pod {where} is on {pod.spec.node_name!r}",
        )
    gateway_name = pod.meta.labels.get(LABEL_GATEWAY_NAME)
    if not gateway_name:
        raise AuthenticationError(
            "untrusted-account", f"{username} is neither a trusted node proxy account nor a waypoint's pod"
        )
    gateway = waypoint_of(snapshot, namespace, gateway_name)
    expected = waypoint_service_account(gateway)
    if service_account != expected:
        raise AuthenticationError(
            "waypoint-account-mismatch",
            f"pod {where} runs as {service_account!r}; "
            f"waypoint {namespace}/{gateway_name} runs as {expected!r}",
        )
    return waypoint_identity(gateway, subject=username, node_name=pod.spec.node_name, pod=where)


class KubernetesMeshAuthenticator(KubernetesNodeAuthenticator):
    """Node proxies exactly as `KubernetesNodeAuthenticator` authenticates them; any other account
    is checked as a waypoint (see the module docstring). The TokenReview is shared (one cache)."""

    async def authenticate(self, metadata: Metadata) -> NodeIdentity:
        review = await self._review(bearer_token(metadata))
        if (review.namespace, review.service_account) in self._trusted:
            return await super().authenticate(metadata)  # the review is cached: no second TokenReview
        return kubernetes_waypoint_caller(
            self._snapshot(),
            namespace=review.namespace,
            service_account=review.service_account,
            username=review.username,
            pod_name=review.pod_name,
            pod_uid=review.pod_uid,
            node_name=review.node_name,
        )
