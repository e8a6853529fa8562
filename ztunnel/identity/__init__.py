"""Workload identities on the node proxy: certificates from the controller's CA (`CaClient`), kept
fresh by the `CertificateManager`, with an injectable `Clock`."""

from ztunnel.identity.caclient import (
    CaClient,
    CaUnavailable,
    CertificateError,
    CertificateRefused,
    CertificateSource,
    InvalidCertificate,
    build_csr,
    verify_issued,
)
from ztunnel.identity.clock import Clock, ManualClock, SystemClock
from ztunnel.identity.manager import (
    CertificateInfo,
    CertificateManager,
    CertificateStatus,
    CertificateUnavailable,
    CertState,
    Priority,
)

__all__ = [
    "CaClient",
    "CaUnavailable",
    "CertState",
    "CertificateError",
    "CertificateInfo",
    "CertificateManager",
    "CertificateRefused",
    "CertificateSource",
    "CertificateStatus",
    "CertificateUnavailable",
    "Clock",
    "InvalidCertificate",
    "ManualClock",
    "Priority",
    "SystemClock",
    "build_csr",
    "verify_issued",
]
