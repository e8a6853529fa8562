"""The waypoint's data path: HBONE in on :15008, HTTP/1.1, HTTP/2 and gRPC proxied per request (authorized,
routed, load balanced, retried), L4 for TCP Services, HBONE out to the backend pods with the waypoint's
own identity.

Modules, in the order a request meets them:

* `server`: `WaypointProxy`, the HBONE listener and the per-tunnel decision (unknown destination, L4
  policy, TCP splice or HTTP session);
* `downstream_h1` / `downstream_h2`: the client-facing HTTP/1.1 (heads by llhttp, chunked bodies by
  h11) and HTTP/2 (h2) sessions, with `h1head` (raw request-head checks, the smuggling defences),
  `headers` (HTTP/2 request validation, hop-by-hop removal, route header edits, request ids) and
  `flood` (rapid reset, PING/SETTINGS floods);
* `pipeline`: per request normalize -> authorize -> route -> forward with retries -> record, with the
  pure decisions in `decide`;
* `upstream`, `upstream_h1`, `upstream_h2`: HBONE tunnels to backend pods and pooled HTTP/1.1 /
  multiplexed HTTP/2 connections on them;
* `body`: bounded streaming bodies with back-pressure, replayable for retries while small;
* `message`: the protocol-neutral request / response and the failures with their status and flag;
* `interfaces`: what the owner wires in (resolver, L4 authorizer, normalizer, observer);
* `limits`: every bound, with its reason.
"""

from waypoint.proxy.body import AttemptBody, BodyAborted, BodyNotReplayable, BodyPipe, RequestBody
from waypoint.proxy.interfaces import (
    Destination,
    L4Authorizer,
    Normalizer,
    RefusedRequest,
    RequestObserver,
    RequestRecord,
    ServiceResolver,
    TunnelRecord,
    TunnelView,
)
from waypoint.proxy.limits import ProxyLimits
from waypoint.proxy.pipeline import ConnectionContext, RequestPipeline
from waypoint.proxy.server import WaypointProxy, deny_all_l4
from waypoint.proxy.upstream import HBONE_PORT, TunnelOpener, UpstreamPools, UpstreamStats

__all__ = [
    "HBONE_PORT",
    "AttemptBody",
    "BodyAborted",
    "BodyNotReplayable",
    "BodyPipe",
    "ConnectionContext",
    "Destination",
    "L4Authorizer",
    "Normalizer",
    "ProxyLimits",
    "RefusedRequest",
    "RequestBody",
    "RequestObserver",
    "RequestPipeline",
    "RequestRecord",
    "ServiceResolver",
    "TunnelOpener",
    "TunnelRecord",
    "TunnelView",
    "UpstreamPools",
    "UpstreamStats",
    "WaypointProxy",
    "deny_all_l4",
]
