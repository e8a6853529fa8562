"""The node proxy's xDS client: `XdsSession` (sans-IO delta state and per-resource NACKs) and
`XdsClient` (the grpclib stream with reconnect backoff), plus the TLS channel helpers shared with the
certificate client."""

from ztunnel.xds.channel import CredentialError, RootCertificate, TokenSource, secure_channel, token_from_file
from ztunnel.xds.client import Backoff, XdsClient, XdsMetrics
from ztunnel.xds.session import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    SUBSCRIPTION_ORDER,
    NodeInfo,
    ResponseOutcome,
    XdsSession,
)

__all__ = [
    "ADDRESS_TYPE_URL",
    "AUTHORIZATION_TYPE_URL",
    "SUBSCRIPTION_ORDER",
    "Backoff",
    "CredentialError",
    "NodeInfo",
    "ResponseOutcome",
    "RootCertificate",
    "TokenSource",
    "XdsClient",
    "XdsMetrics",
    "XdsSession",
    "secure_channel",
    "token_from_file",
]
