"""Per request: normalize, authorize, route, forward with retries, and report.

Theory of operation
-------------------
A downstream session (HTTP/1.1 or HTTP/2) hands `RequestPipeline.handle()` a validated `RequestHead`
and the request body, and gets a `ProxyResponse` back as soon as there is a response head; it then
streams the body and calls `ProxyResponse.complete()`, which records the request (one record per
request, whatever happened).

1. x-request-id / traceparent (generated when missing), x-forwarded-proto, forged identity headers
   dropped.
2. `normalize(target)` -> (path, query); a ValueError is a 400 (counted as `bad_path`).
3. `RequestView` -> `Authorizer.check`: a denial is 403 `RBAC: access denied`. An authorizer that
   raises denies (fail closed).
4. `Router.route`: Redirect (301/302 + Location), DirectResponse, or Forward. A router that raises is
   a 500.
5. Forward: one backend drawn by weight with the injected rng, the upstream request (header edits,
   normalized or rewritten path, authority rewrite), then attempts:

   * the endpoint: the addressed workload when the client dialled a pod, else
     `EndpointPicker.pick(service, exclude=ips already tried)` (falling back to any endpoint when every
     one was tried: the same one again beats none); None -> 503 UH;
   * each attempt is bounded by the per-try timeout and the route timeout; its outcome is reported to
     the picker (5xx, reset, connect failure and timeout are failures);
   * retried (idempotent methods only, while the request body is still replayable) on the policy's
     statuses, on reset and per-try timeout when `on_reset`, on connect failure when
     `on_connect_failure`, after a jittered, doubling backoff; a stream the backend refused
     (REFUSED_STREAM, GOAWAY) or a stale keep-alive connection is sent again once without counting;
   * no attempt left: the last failure's answer (503 UF / UC, 504 UT); the route timeout -> 504 UT.
   Before the first attempt the request body is read up to the retry buffer (`RequestBody.prefetch`):
   a small body is complete (and validated by the session's parser) before the backend sees a byte.
6. The response gets the route's response header edits; the body streams through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

from loom.hbone.headers import format_address
from waypoint.model import (
    Authorizer,
    AuthzDecision,
    DirectResponse,
    Endpoint,
    EndpointPicker,
    Forward,
    Peer,
    Redirect,
    RequestView,
    Router,
    ServiceRef,
)
from waypoint.proxy.body import BodyAborted, BodyNotReplayable, RequestBody
from waypoint.proxy.deadline import Deadline
from waypoint.proxy.decide import (
    IDEMPOTENT_METHODS,
    LOCAL_BODIES,
    RBAC_DENIED_BODY,
    backoff_delay,
    build_view,
    choose_backend,
    local_head,
    response_headers,
    retry_on_status,
    retry_plan,
    upstream_protocol,
    upstream_request,
)
from waypoint.proxy.headers import prepare_request_headers
from waypoint.proxy.interfaces import (
    Destination,
    Normalizer,
    RefusedRequest,
    RequestObserver,
    RequestRecord,
)
from waypoint.proxy.limits import ProxyLimits
from waypoint.proxy.message import (
    NoHealthyUpstream,
    ProxyError,
    ProxyResponse,
    RequestHead,
    ResponseHead,
    UpstreamConnectFailure,
    UpstreamOverflow,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamResponse,
    UpstreamTimeout,
)
from waypoint.proxy.upstream import UpstreamPools

logger = logging.getLogger("waypoint.proxy")


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """What every request on one HBONE tunnel shares."""

    peer: Peer  # the client's identity (mTLS) and address
    destination: Destination  # what the CONNECT target resolved to
    destination_ip: str  # the VIP or workload IP from the CONNECT
    destination_port: int
    loop: asyncio.AbstractEventLoop  # the serving loop (looked up once per tunnel, not per request)

    def refused(
        self, protocol: str, status: int, details: str, head: RequestHead | None = None
    ) -> RefusedRequest:
        """A request on this tunnel answered locally at parse time, for the observer."""
        return RefusedRequest(
            start_time=time.time(),
            protocol=protocol,
            status=status,
            details=details,
            peer_address=self.peer.address,
            destination=format_address(self.destination_ip, self.destination_port),
            method=head.method if head is not None else "",
            path=head.target if head is not None else "",
            authority=head.authority if head is not None else "",
        )


@dataclass(slots=True)
class _Outcome:
    """What the record of one request collects while it runs."""

    view: RequestView
    wall_start: float
    started: float
    loop: asyncio.AbstractEventLoop
    flags: str = "-"
    details: str = "via_upstream"
    route: str = ""
    authz: AuthzDecision | None = None
    backend: ServiceRef | None = None
    endpoint: Endpoint | None = None
    attempts: int = 0
    upstream_protocol: str = ""
    grpc_status: str | None = None


class RequestPipeline:
    """See the module docstring; one per waypoint, shared by every connection."""

    def __init__(
        self,
        *,
        router: Router,
        authorizer: Authorizer,
        picker: EndpointPicker,
        pools: UpstreamPools,
        observer: RequestObserver,
        normalize: Normalizer,
        rng: random.Random,
        limits: ProxyLimits,
    ) -> None:
        self.router = router
        self.authorizer = authorizer
        self.picker = picker
        self.pools = pools
        self.observer = observer
        self.normalize = normalize
        self.rng = rng
        self.limits = limits

    async def handle(self, ctx: ConnectionContext, head: RequestHead, body: RequestBody) -> ProxyResponse:
        started = ctx.loop.time()
        wall_start = time.time()
        prepare_request_headers(head.headers)
        try:
            path, query = self.normalize(head.target)
        except ValueError as e:
            refusal = ctx.refused(head.protocol, 400, "path_normalization_failed", head)
            self.observer.refused("bad_path", refusal)
            logger.info(
                "request path refused", extra={"fields": {"target": head.target[:200], "error": str(e)}}
            )
            body.cancel()
            status_head, content = local_head(400, b"bad request: " + str(e).encode()[:200], grpc=False)
            return ProxyResponse(status_head, content=content)
        view = build_view(head, path, query, ctx.peer, ctx.destination, ctx.destination_ip)
        outcome = _Outcome(view, wall_start, started, ctx.loop)
        try:
            decision = self.authorizer.check(view)
        except Exception:
            logger.exception("authorizer failed; denying the request")
            decision = AuthzDecision(False, reason="the authorizer failed")
        outcome.authz = decision
        if not decision.allowed:
            outcome.details = f"rbac_access_denied_matched_policy[{decision.policy or 'none'}]"
            return self._local(outcome, body, 403, RBAC_DENIED_BODY)
        try:
            action = self.router.route(view)
        except Exception:
            logger.exception("router failed")
            outcome.details = "route_error"
            return self._local(outcome, body, 500, b"internal error: no route")
        if isinstance(action, Redirect):
            outcome.route, outcome.details = action.route, "redirect"
            return self._local(outcome, body, action.status, b"", extra=[("location", action.location)])
        if isinstance(action, DirectResponse):
            outcome.route, outcome.details = action.route, "direct_response"
            return self._local(outcome, body, action.status, action.body)
        outcome.route = action.route
        return await self._forward(ctx, head, body, path, query, action, outcome)

    # ------------------------------------------------------------------ local answers and records

    def _local(
        self,
        outcome: _Outcome,
        body: RequestBody,
        status: int,
        content: bytes,
        *,
        extra: list[tuple[str, str]] | None = None,
    ) -> ProxyResponse:
        body.cancel()  # never read: the session closes (HTTP/1.1) or resets (HTTP/2) if it was coming
        response_head, payload = local_head(status, content, grpc=outcome.view.grpc, extra=extra or ())
        if outcome.view.grpc:
            outcome.grpc_status = next((v for n, v in response_head.headers if n == "grpc-status"), None)
        response = ProxyResponse(response_head, content=payload)
        response.on_complete = lambda sent, error: self._record(outcome, body, response_head, sent, error)
        return response

    def _error(self, outcome: _Outcome, body: RequestBody, error: ProxyError) -> ProxyResponse:
        outcome.flags = error.flags
        outcome.details = error.details
        logger.info(
            "request failed",
            extra={
                "fields": {"authority": outcome.view.authority, "flags": error.flags, "error": str(error)}
            },
        )
        return self._local(outcome, body, error.status, LOCAL_BODIES.get(error.flags, b"upstream error"))

    def _record(
        self, outcome: _Outcome, body: RequestBody, head: ResponseHead, sent: int, error: str | None
    ) -> None:
        flags = outcome.flags
        if error is not None and flags == "-":
            flags = "DC"  # the client went away (or reset) before the whole response was sent
        loop = outcome.loop
        record = RequestRecord(
            view=outcome.view,
            start_time=outcome.wall_start,
            duration=max(0.0, loop.time() - outcome.started),
            response_code=head.status,
            response_flags=flags,
            response_code_details=outcome.details,
            request_bytes=body.received,
            response_bytes=sent,
            route=outcome.route,
            authz=outcome.authz,
            backend=outcome.backend,
            endpoint=outcome.endpoint,
            attempts=outcome.attempts,
            grpc_status=outcome.grpc_status,
            upstream_protocol=outcome.upstream_protocol,
        )
        try:
            self.observer.record(record)
        except Exception:
            logger.exception("request observer failed")

    # ------------------------------------------------------------------ forwarding

    def _endpoint(self, ctx: ConnectionContext, service: ServiceRef, tried: set[str]) -> Endpoint | None:
        pinned = ctx.destination.endpoint
        if pinned is not None and service == ctx.destination.service:
            return pinned
        try:
            endpoint = self.picker.pick(service, frozenset(tried))
            if endpoint is None and tried:
                endpoint = self.picker.pick(service, frozenset())
        except Exception:
            logger.exception("endpoint picker failed", extra={"fields": {"service": service.hostname}})
            return None
        return endpoint

    def _report(self, endpoint: Endpoint, success: bool) -> None:
        try:
            self.picker.report(endpoint, success)
        except Exception:
            logger.exception("endpoint picker report failed")

    async def _forward(
        self,
        ctx: ConnectionContext,
        head: RequestHead,
        body: RequestBody,
        path: str,
        query: str,
        action: Forward,
        outcome: _Outcome,
    ) -> ProxyResponse:
        loop = ctx.loop
        backend = choose_backend(action.backends, self.rng)
        if backend is None:
            outcome.flags, outcome.details = "NC", "route_has_no_backends"
            return self._local(outcome, body, 500, b"no backend for this route")
        service = backend.service
        outcome.backend = service
        protocol = upstream_protocol(service.protocol)
        outcome.upstream_protocol = protocol
        upstream_head = upstream_request(head, action, path, query, protocol)
        plan = retry_plan(head.method, action.retry)
        policy = plan.policy
        timeout = action.timeout if action.timeout is not None else self.limits.default_response_timeout
        deadline = outcome.started + timeout
        # A Deadline rather than wait_for: Python 3.11's wait_for wraps the awaitable in a new Task per
        # call (measurable per request) and can lose a cancellation; asyncio.timeout costs system calls
        # (see waypoint.proxy.deadline).
        try:
            if body.pipe is not None:
                async with Deadline(loop, deadline):
                    await body.prefetch()
        except TimeoutError:
            outcome.details = "request_body_timeout"
            return self._local(outcome, body, 408, b"request body timeout")
        except BodyAborted:
            outcome.flags, outcome.details = "DC", "downstream_body_aborted"
            return self._local(outcome, body, 400, b"the request body failed")
        tried: set[str] = set()
        retries = 0
        idempotent = head.method in IDEMPOTENT_METHODS
        resent = False
        last_error: ProxyError | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                last_error = UpstreamTimeout("no response within the route timeout")
                break
            endpoint = self._endpoint(ctx, service, tried)
            if endpoint is None:
                if last_error is None:
                    last_error = NoHealthyUpstream(f"no healthy endpoint of {service.hostname}")
                break
            try:
                attempt_body = body.attempt() if body.pipe is not None else None
            except BodyNotReplayable as e:
                logger.info("request not retried", extra={"fields": {"reason": str(e)}})
                break
            outcome.attempts += 1
            outcome.endpoint = endpoint
            per_try = min(policy.per_try_timeout or remaining, remaining)
            route_bound = per_try >= remaining  # a timeout now is the route's, not just this try's
            retriable = False
            try:
                async with Deadline(loop, loop.time() + per_try):
                    response = await self.pools.exchange(endpoint, protocol, upstream_head, attempt_body)
            except TimeoutError:
                self._report(endpoint, False)
                tried.add(endpoint.ip)
                if route_bound:
                    last_error = UpstreamTimeout("no response within the route timeout")
                    break
                last_error = UpstreamTimeout(f"no response within the per-try timeout of {per_try:g} s")
                retriable = policy.on_reset or 504 in policy.on_status
            except UpstreamOverflow as e:
                last_error = e
                break
            except UpstreamConnectFailure as e:
                self._report(endpoint, False)
                tried.add(endpoint.ip)
                last_error = e
                retriable = policy.on_connect_failure
            except UpstreamReset as e:
                if (e.refused or (e.stale and idempotent)) and not resent and body.replayable:
                    # Not processed by the backend (or a keep-alive race): once more, not a retry.
                    resent = True
                    last_error = e
                    continue
                self._report(endpoint, False)
                tried.add(endpoint.ip)
                last_error = e
                retriable = policy.on_reset
            except UpstreamProtocolError as e:
                self._report(endpoint, False)
                last_error = e
                break
            else:
                status = response.head.status
                self._report(endpoint, status < 500)
                more = retries + 1 < plan.attempts and body.replayable and response.upgraded is None
                if retry_on_status(plan, status) and more:
                    if response.body is not None:
                        response.body.cancel()
                    tried.add(endpoint.ip)
                    last_error = ProxyError(f"the backend answered {status}", status=status)
                    retriable = True
                else:
                    if retries and retry_on_status(plan, status):
                        outcome.flags = "URX"
                    return self._commit(outcome, body, response, action, deadline)
            if not retriable or retries + 1 >= plan.attempts:
                break
            retries += 1
            delay = min(backoff_delay(policy, retries, self.rng), max(0.0, deadline - loop.time()))
            if delay > 0:
                await asyncio.sleep(delay)
        return self._error(outcome, body, last_error or ProxyError("the request body can no longer be sent"))

    def _commit(
        self,
        outcome: _Outcome,
        body: RequestBody,
        response: UpstreamResponse,
        action: Forward,
        deadline: float,
    ) -> ProxyResponse:
        head = response_headers(response.head, action)
        if response.trailers_only:
            outcome.grpc_status = next((v for n, v in head.headers if n == "grpc-status"), None)
        pipe = response.body
        proxy_response = ProxyResponse(
            head,
            body=pipe,
            upgraded=response.upgraded,
            deadline=deadline if action.timeout is not None else None,
        )

        def complete(sent: int, error: str | None) -> None:
            if pipe is not None:
                if outcome.grpc_status is None and outcome.view.grpc:
                    outcome.grpc_status = next((v for n, v in pipe.trailers if n == "grpc-status"), None)
                if pipe.error is not None and outcome.flags == "-":
                    outcome.flags = "UC"  # the backend failed mid-body
                    outcome.details = "upstream_reset_after_response_started"
                if not pipe.done:
                    pipe.cancel()
            self._record(outcome, body, head, sent, error)

        proxy_response.on_complete = complete
        return proxy_response
