"""The CA's gRPC API (istio.v1.auth.IstioCertificateService/CreateCertificate) and node authorization.

Theory of operation
-------------------
A node proxy asks for a certificate on behalf of a workload on its node: the CSR plus request metadata
`ImpersonatedIdentity: spiffe://<td>/ns/<ns>/sa/<sa>`. The decision, in order (Istio's node authorizer):

1. authenticate the caller (`controller.auth`): the node it serves, never a claim of the request;
2. the impersonated identity is required and must be a SPIFFE ID of the mesh's trust domain;
3. at least one pod running as that service account, not Failed/Succeeded, is scheduled on the
   caller's node in the controller's *current* configuration (`NodeIndex`, rebuilt on every snapshot);
   a waypoint caller instead (controller/waypoints/auth.py) may only get its own service account;
4. the CSR is well formed, self-signed, EC P-256.

Only then is the certificate signed, and its only SAN is the authorized identity, whatever the CSR
asked for. Every refusal, whatever the cause, is answered with the same opaque error (UNAUTHENTICATED,
"request authentication failure"), so a caller probing for which service accounts exist on which nodes
learns nothing; the reason goes to the log and to `loom_ca_certificates_refused_total{reason}`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2

from controller.auth import AuthenticationError, NodeAuthenticator, NodeIdentity
from controller.ca.authority import CertificateAuthority, SigningError
from controller.metrics import ControllerMetrics
from loom.api import ca_pb2
from loom.identity import Identity, IdentityError
from loom.resources.model import ConfigSnapshot, Pod

logger = logging.getLogger("controller.ca")

SERVICE_NAME = "istio.v1.auth.IstioCertificateService"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
REFUSAL_CODE = grpc.StatusCode.UNAUTHENTICATED
REFUSAL_MESSAGE = "request authentication failure"
_TERMINATED_PHASES = frozenset({"Failed", "Succeeded"})


@dataclass(frozen=True, slots=True)
class NodeIndex:
    """Which service accounts have a live pod on which node: {(node, namespace, service account)}."""

    entries: frozenset[tuple[str, str, str]] = frozenset()

    @classmethod
    def from_pods(cls, pods: Iterable[Pod]) -> NodeIndex:
        return cls(
            frozenset(
                (pod.spec.node_name, pod.namespace, pod.spec.service_account)
                for pod in pods
                if pod.spec.node_name and pod.phase not in _TERMINATED_PHASES
            )
        )

    @classmethod
    def from_snapshot(cls, snapshot: ConfigSnapshot) -> NodeIndex:
        return cls.from_pods(snapshot.of_kind(Pod))

    def has(self, node: str, namespace: str, service_account: str) -> bool:
        return (node, namespace, service_account) in self.entries


class Refusal(Exception):
    """An authorization refusal: `reason` is a short bounded token, `detail` explains (log only)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def impersonated_identity(metadata: struct_pb2.Struct) -> str | None:
    """The ImpersonatedIdentity request metadata, None if absent; a non-string value is refused."""
    value = metadata.fields.get(IMPERSONATED_IDENTITY)
    if value is None:
        return None
    if value.WhichOneof("kind") != "string_value":
        raise Refusal("bad-identity", f"{IMPERSONATED_IDENTITY} is not a string")
    return value.string_value


def authorize(caller: NodeIdentity, requested: str | None, index: NodeIndex, trust_domain: str) -> Identity:
    """The identity `caller` may get a certificate for, or raise Refusal. Pure: no I/O, no clock."""
    if not requested:
        # Node proxies always impersonate; there is no "own identity" certificate for a node credential.
        raise Refusal("missing-identity", f"no {IMPERSONATED_IDENTITY} in the request metadata")
    try:
        identity = Identity.parse(requested)
    except IdentityError as e:
        raise Refusal("bad-identity", str(e)) from e
    if identity.trust_domain != trust_domain:
        raise Refusal("foreign-trust-domain", f"{requested} is not in trust domain {trust_domain!r}")
    if caller.waypoint:
        # A waypoint gets its own identity and nothing else, whatever runs on its node.
        namespace = caller.waypoint.partition("/")[0]
        own = (namespace, caller.waypoint_service_account)
        if not caller.waypoint_service_account or (identity.namespace, identity.service_account) != own:
            raise Refusal(
                "not-waypoint-identity",
                f"waypoint {caller.waypoint} runs as {namespace}/{caller.waypoint_service_account}, "
                f"not {identity.namespace}/{identity.service_account}",
            )
        return identity
    if not index.has(caller.node_name, identity.namespace, identity.service_account):
        raise Refusal(
            "no-pod-on-node",
            f"no running pod of {identity.namespace}/{identity.service_account} on node {caller.node_name!r}",
        )
    return identity


class CertificateService:
    """grpc.aio servicer of CreateCertificate."""

    def __init__(
        self,
        authority: CertificateAuthority,
        authenticator: NodeAuthenticator,
        node_index: Callable[[], NodeIndex],
        metrics: ControllerMetrics,
    ) -> None:
        self._authority = authority
        self._authenticator = authenticator
        self._node_index = node_index
        self._metrics = metrics

    def method_handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                    self.CreateCertificate,
                    request_deserializer=ca_pb2.IstioCertificateRequest.FromString,
                    response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString,
                )
            },
        )

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        caller: NodeIdentity | None = None
        requested: str | None = None
        try:
            caller = await self._authenticator.authenticate(context.invocation_metadata() or ())
            requested = impersonated_identity(request.metadata)
            identity = authorize(caller, requested, self._node_index(), self._authority.trust_domain)
            chain = self._authority.sign(
                request.csr, identity, self._requested_ttl(request.validity_duration)
            )
        except (AuthenticationError, Refusal) as e:
            reason, detail = e.reason, e.detail
        except SigningError as e:
            reason, detail = "bad-csr", str(e)
        except Exception as e:  # a bug must not answer with its own message: refuse like any other case
            logger.exception("certificate request failed unexpectedly")
            reason, detail = "internal", f"{type(e).__name__}: {e}"
        else:
            self._metrics.certificates_issued.inc()
            logger.info(
                "certificate issued",
                extra={
                    "fields": {"identity": str(identity), "node": caller.node_name, "caller": caller.subject}
                },
            )
            return ca_pb2.IstioCertificateResponse(cert_chain=chain)
        self._metrics.certificates_refused.labels(reason=reason).inc()
        logger.warning(
            "certificate refused",
            extra={
                "fields": {
                    "reason": reason,
                    "detail": detail,
                    "node": caller.node_name if caller else "",
                    "caller": caller.subject if caller else context.peer(),
                    "identity": requested or "",
                }
            },
        )
        await context.abort(REFUSAL_CODE, REFUSAL_MESSAGE)
        raise AssertionError("context.abort returned")  # abort always raises

    def _requested_ttl(self, seconds: int) -> dt.timedelta | None:
        if seconds <= 0:
            return None
        # Clamp before building a timedelta: an int64 number of seconds can overflow it.
        return dt.timedelta(seconds=min(seconds, int(self._authority.max_ttl.total_seconds())))
