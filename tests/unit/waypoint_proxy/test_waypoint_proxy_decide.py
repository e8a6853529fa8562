"""The pipeline's pure decisions: weighted backends, retries and backoff, upstream requests, local
answers (and their gRPC form), and the sliding-window flood counter."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from waypoint.model import AppProtocol, Forward, HeaderEdits, RetryPolicy, ServiceRef, WeightedBackend
from waypoint.proxy.decide import (
    backoff_delay,
    choose_backend,
    grpc_status_for,
    is_grpc,
    local_head,
    retry_on_status,
    retry_plan,
    upstream_protocol,
    upstream_request,
)
from waypoint.proxy.flood import WindowedCounter
from waypoint.proxy.message import HTTP2, HTTP11, RequestHead


def svc(name: str, protocol: AppProtocol = AppProtocol.HTTP) -> ServiceRef:
    return ServiceRef("default", name, f"{name}.default.svc.cluster.local", 80, 8080, protocol)


V1, V2, V3 = svc("reviews-v1"), svc("reviews-v2"), svc("reviews-v3")


def test_weighted_split_follows_the_weights() -> None:
    rng = random.Random(42)
    backends = (WeightedBackend(V1, 90), WeightedBackend(V2, 10), WeightedBackend(V3, 0))
    chosen = [choose_backend(backends, rng) for _ in range(10_000)]
    counts = Counter(b.service.name for b in chosen if b is not None)
    assert set(counts) == {"reviews-v1", "reviews-v2"}  # weight 0 is never chosen
    assert 8_800 <= counts["reviews-v1"] <= 9_200  # 90 % within ~7 standard deviations


@pytest.mark.parametrize(
    "backends", [(), (WeightedBackend(V1, 0),), (WeightedBackend(V1, -1), WeightedBackend(V2, 0))]
)
def test_no_positive_weight_chooses_nothing(backends: tuple[WeightedBackend, ...]) -> None:
    assert choose_backend(backends, random.Random(1)) is None


def test_single_backend_is_always_chosen() -> None:
    assert choose_backend((WeightedBackend(V1, 1),), random.Random(3)) == WeightedBackend(V1, 1)


@pytest.mark.parametrize(
    ("method", "attempts"),
    [("GET", 3), ("HEAD", 3), ("PUT", 3), ("DELETE", 3), ("OPTIONS", 3), ("POST", 1), ("PATCH", 1)],
)
def test_only_idempotent_methods_are_retried(method: str, attempts: int) -> None:
    assert retry_plan(method, RetryPolicy(attempts=2)).attempts == attempts


def test_retry_on_status() -> None:
    plan = retry_plan("GET", RetryPolicy(attempts=1, on_status=frozenset({503})))
    assert retry_on_status(plan, 503) and not retry_on_status(plan, 500)


def test_backoff_doubles_is_jittered_and_capped() -> None:
    rng = random.Random(5)
    policy = RetryPolicy(backoff=0.1)
    for number, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = [backoff_delay(policy, number, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered
    assert backoff_delay(RetryPolicy(backoff=0.0), 3, rng) == 0.0


def test_upstream_protocol() -> None:
    assert upstream_protocol(AppProtocol.HTTP) == HTTP11
    assert upstream_protocol(AppProtocol.HTTP2) == upstream_protocol(AppProtocol.GRPC) == HTTP2


def head(**kwargs: object) -> RequestHead:
    values: dict[str, object] = {
        "method": "GET",
        "authority": "web",
        "target": "//a/./b?q=1",
        "headers": [("expect", "100-continue"), ("x-a", "1")],
        "protocol": HTTP11,
        "upgrade": "websocket",
    }
    values.update(kwargs)
    return RequestHead(**values)  # type: ignore[arg-type]


def test_upstream_request_uses_the_normalized_path_and_route_edits() -> None:
    forward = Forward((WeightedBackend(V1, 1),), request_headers=HeaderEdits(add=(("x-b", "2"),)))
    request = upstream_request(head(), forward, "/a/b", "q=1", HTTP11)
    assert request.target == "/a/b?q=1" and request.authority == "web"
    assert request.headers == [("x-a", "1"), ("x-b", "2")]  # Expect is the waypoint's to answer
    assert request.upgrade == "websocket"
    rewritten = Forward((WeightedBackend(V1, 1),), rewrite_path="/v2", rewrite_authority="internal")
    request = upstream_request(head(), rewritten, "/a/b", "", HTTP2)
    assert (request.target, request.authority, request.upgrade) == ("/v2", "internal", None)
    assert upstream_request(head(target="*"), forward, "*", "", HTTP11).target == "*"


def test_local_answers() -> None:
    response, body = local_head(403, b"RBAC: access denied", grpc=False)
    assert (response.status, response.content_length, body) == (403, 19, b"RBAC: access denied")
    assert ("content-type", "text/plain") in response.headers
    response, body = local_head(503, b"no healthy upstream \xe2\x9c\x97 100%", grpc=True)
    headers = dict(response.headers)
    assert (response.status, body) == (200, b"")
    assert headers["grpc-status"] == "14" and headers["content-type"] == "application/grpc"
    assert headers["grpc-message"] == "no healthy upstream %E2%9C%97 100%25"
    redirect, _ = local_head(301, b"", grpc=False, extra=[("location", "/new")])
    assert redirect.headers == [("location", "/new")] and redirect.content_length == 0


@pytest.mark.parametrize(
    ("status", "grpc"), [(400, 13), (401, 16), (403, 7), (404, 12), (503, 14), (504, 14), (418, 2)]
)
def test_grpc_status_mapping(status: int, grpc: int) -> None:
    assert grpc_status_for(status) == grpc


def test_is_grpc() -> None:
    assert is_grpc([("content-type", "application/grpc+proto")])
    assert not is_grpc([("content-type", "application/json")])


def test_windowed_counter() -> None:
    counter = WindowedCounter(limit=3, window=10.0)
    assert not counter.add(0.0) and not counter.add(1.0) and not counter.add(2.0)
    assert counter.add(3.0)  # the 4th within 10 s
    assert not counter.add(20.0)  # the old ones left the window
    assert counter.add(21.0, count=1000)  # bulk adds count too, memory stays at limit + 1
    assert len(counter) == 4
    with pytest.raises(ValueError, match="limit"):
        WindowedCounter(0, 1.0)
