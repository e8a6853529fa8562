"""Table tests for the sans-IO delta xDS stream state (controller/xds/delta.py)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.translate import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from controller.xds.delta import (
    Acked,
    DeltaStream,
    Nacked,
    ProtocolError,
    StaleNonce,
    Subscribed,
)
from controller.xds.resources import SERVED_TYPE_URLS, ResourcesByType, VersionedResource, version_resource
from loom.api import authorization_pb2, discovery_pb2

AUTHZ = AUTHORIZATION_TYPE_URL
ADDR = ADDRESS_TYPE_URL


def resource(content: str) -> VersionedResource:
    """A resource whose bytes (and so version) are determined by `content`."""
    return version_resource(authorization_pb2.Authorization(name=content))


def state(**by_type: Mapping[str, str]) -> ResourcesByType:
    """state(authz={"ns/a": "v1"}, addr={...}) -> resources keyed by type URL."""
    urls = {"authz": AUTHZ, "addr": ADDR}
    return {urls[t]: {name: resource(f"{name}@{c}") for name, c in m.items()} for t, m in by_type.items()}


def version(content_name: str, content: str) -> str:
    return resource(f"{content_name}@{content}").version


def request(
    type_url: str = AUTHZ,
    subscribe: tuple[str, ...] = (),
    unsubscribe: tuple[str, ...] = (),
    initial: Mapping[str, str] | None = None,
    nonce: str = "",
    error: str | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=subscribe,
        resource_names_unsubscribe=unsubscribe,
        initial_resource_versions=initial or {},
        response_nonce=nonce,
    )
    if error is not None:
        req.error_detail.code = 3
        req.error_detail.message = error
    return req


def sent(response: discovery_pb2.DeltaDiscoveryResponse) -> dict[str, str]:
    return {r.name: r.version for r in response.resources}


def summary(responses: list[discovery_pb2.DeltaDiscoveryResponse]) -> list[tuple[str, list[str], list[str]]]:
    return [(r.type_url, [x.name for x in r.resources], list(r.removed_resources)) for r in responses]


def stream(resources: ResourcesByType | None = None, **kwargs: int) -> DeltaStream:
    return DeltaStream(SERVED_TYPE_URLS, resources, **kwargs)


# ----------------------------------------------------------------------------------- first request

FIRST_REQUEST_CASES = [
    pytest.param(
        {"a": "1", "b": "1"}, request(), [(AUTHZ, ["a", "b"], [])], True, id="wildcard gets everything sorted"
    ),
    pytest.param({}, request(), [(AUTHZ, [], [])], True, id="wildcard with nothing served still answered"),
    pytest.param(
        {"a": "1", "b": "2", "c": "1"},
        request(initial={"a": version("a", "1"), "b": version("b", "1"), "gone": "x"}),
        [(AUTHZ, ["b", "c"], ["gone"])],
        True,
        id="reconnect gets exactly the difference",
    ),
    pytest.param(
        {"a": "1"},
        request(initial={"a": version("a", "1")}),
        [(AUTHZ, [], [])],
        True,
        id="reconnect with everything current gets an empty answer",
    ),
    pytest.param(
        {"a": "1", "b": "1"},
        request(subscribe=("a", "missing")),
        [(AUTHZ, ["a"], ["missing"])],
        False,
        id="explicit names: existing sent, missing answered as removed",
    ),
    pytest.param(
        {"a": "1", "b": "1"},
        request(subscribe=("a",), initial={"a": version("a", "1"), "b": version("b", "1")}),
        [(AUTHZ, [], [])],
        False,
        id="explicit name already held at current version not resent, unsubscribed initial ignored",
    ),
    pytest.param(
        {"a": "1"},
        request(subscribe=("*",), unsubscribe=("*",)),
        [(AUTHZ, [], [])],
        False,
        id="on-demand start subscribes to nothing",
    ),
    pytest.param(
        {"a": "1"}, request(subscribe=("*", "a")), [(AUTHZ, ["a"], [])], True, id="explicit wildcard"
    ),
    pytest.param(
        {"a": "1"},
        request(unsubscribe=("a",)),
        [(AUTHZ, [], [])],
        False,
        id="only unsubscribe is not wildcard",
    ),
]


@pytest.mark.parametrize(("served", "req", "expected", "wildcard"), FIRST_REQUEST_CASES)
def test_first_request(
    served: Mapping[str, str],
    req: discovery_pb2.DeltaDiscoveryRequest,
    expected: list[tuple[str, list[str], list[str]]],
    wildcard: bool,
) -> None:
    s = stream(state(authz=served))
    responses = s.on_request(req)
    assert summary(responses) == expected
    events = s.pop_events()
    assert len(events) == 1 and isinstance(events[0], Subscribed)
    assert events[0].wildcard is wildcard
    for r in responses:
        for res in r.resources:
            assert res.version == version(res.name, served[res.name])
            assert res.resource.type_url == AUTHZ
            # The Any carries the stored bytes: they decode to the served resource.
            body = authorization_pb2.Authorization.FromString(res.resource.value)
            assert body.name == f"{res.name}@{served[res.name]}"


def test_first_request_carrying_a_nonce_reports_it_stale() -> None:
    s = stream(state(authz={"a": "1"}))
    assert summary(s.on_request(request(nonce="7"))) == [(AUTHZ, ["a"], [])]
    events = s.pop_events()
    assert StaleNonce(AUTHZ, "7", False) in events


# ----------------------------------------------------------------------------------- updates

UPDATE_CASES = [
    pytest.param({"a": "1", "b": "1"}, {"a": "1", "b": "1"}, [], id="no change, no response"),
    pytest.param({"a": "1", "b": "1"}, {"a": "2", "b": "1"}, [(AUTHZ, ["a"], [])], id="changed only"),
    pytest.param({"a": "1"}, {"a": "1", "c": "1"}, [(AUTHZ, ["c"], [])], id="added only"),
    pytest.param({"a": "1", "b": "1"}, {"a": "1"}, [(AUTHZ, [], ["b"])], id="removed only"),
    pytest.param(
        {"a": "1", "b": "1"},
        {"a": "2", "c": "1"},
        [(AUTHZ, ["a", "c"], ["b"])],
        id="change add remove at once",
    ),
    pytest.param({"a": "1"}, {}, [(AUTHZ, [], ["a"])], id="everything removed"),
]


@pytest.mark.parametrize(("before", "after", "expected"), UPDATE_CASES)
@pytest.mark.parametrize("with_hint", [False, True], ids=["full diff", "changed hint"])
def test_update_wildcard(
    before: Mapping[str, str],
    after: Mapping[str, str],
    expected: list[tuple[str, list[str], list[str]]],
    with_hint: bool,
) -> None:
    s = stream(state(authz=before))
    s.on_request(request())
    hint = None
    if with_hint:
        hint = {AUTHZ: {n for n in set(before) | set(after) if before.get(n) != after.get(n)}}
    assert summary(s.on_update(state(authz=after), hint)) == expected


def test_update_never_sends_types_not_asked_for() -> None:
    s = stream(state(authz={"a": "1"}, addr={"w": "1"}))
    s.on_request(request(AUTHZ))
    assert summary(s.on_update(state(authz={"a": "1"}, addr={"w": "2", "x": "1"}))) == []
    assert s.subscribed_types == (AUTHZ,)


def test_update_orders_types_authorization_first() -> None:
    s = stream(state())
    s.on_request(request(ADDR))
    s.on_request(request(AUTHZ))
    responses = s.on_update(state(authz={"p": "1"}, addr={"w": "1"}))
    assert summary(responses) == [(AUTHZ, ["p"], []), (ADDR, ["w"], [])]


def test_changed_hint_limits_comparison_to_named_resources() -> None:
    s = stream(state(authz={"a": "1", "b": "1"}))
    s.on_request(request())
    # The caller vouches that only "a" changed; "b" is not looked at.
    assert summary(s.on_update(state(authz={"a": "2", "b": "2"}), {AUTHZ: {"a"}})) == [(AUTHZ, ["a"], [])]
    # A full comparison later catches up.
    assert summary(s.on_update(state(authz={"a": "2", "b": "2"}))) == [(AUTHZ, ["b"], [])]


def test_explicit_subscription_only_gets_its_names() -> None:
    s = stream(state(authz={"a": "1", "b": "1"}))
    s.on_request(request(subscribe=("a",)))
    assert summary(s.on_update(state(authz={"a": "2", "b": "2", "c": "1"}))) == [(AUTHZ, ["a"], [])]
    assert summary(s.on_update(state(authz={"b": "2"}))) == [(AUTHZ, [], ["a"])]
    # Once removed, a missing subscribed name is not reported again.
    assert summary(s.on_update(state(authz={"b": "3"}))) == []
    assert summary(s.on_update(state(authz={"a": "3", "b": "3"}))) == [(AUTHZ, ["a"], [])]


# ----------------------------------------------------------------------------------- ACK / NACK


def test_ack_settles_the_nonce() -> None:
    s = stream(state(authz={"a": "1"}))
    [first] = s.on_request(request())
    s.pop_events()
    assert s.status(AUTHZ).unacked_nonces == (first.nonce,)  # type: ignore[union-attr]
    assert s.on_request(request(nonce=first.nonce)) == []
    assert s.pop_events() == [Acked(AUTHZ, first.nonce)]
    assert s.status(AUTHZ).unacked_nonces == ()  # type: ignore[union-attr]


def test_ack_of_a_later_nonce_settles_older_ones() -> None:
    s = stream(state(authz={"a": "1"}))
    [r1] = s.on_request(request())
    [r2] = s.on_update(state(authz={"a": "2"}))
    [r3] = s.on_update(state(authz={"a": "3"}))
    s.on_request(request(nonce=r2.nonce))
    assert s.status(AUTHZ).unacked_nonces == (r3.nonce,)  # type: ignore[union-attr]
    # A late ACK of the first response is stale now.
    s.pop_events()
    s.on_request(request(nonce=r1.nonce))
    assert s.pop_events() == [StaleNonce(AUTHZ, r1.nonce, False)]


def test_nack_is_reported_and_the_rejected_version_is_not_resent() -> None:
    s = stream(state(authz={"a": "1", "b": "1"}))
    s.on_request(request())
    [push] = s.on_update(state(authz={"a": "2", "b": "1"}))
    s.pop_events()
    assert s.on_request(request(nonce=push.nonce, error="a: unknown enum value")) == []
    [event] = s.pop_events()
    assert isinstance(event, Nacked)
    assert (event.type_url, event.nonce, event.code, event.message) == (
        AUTHZ,
        push.nonce,
        3,
        "a: unknown enum value",
    )
    assert event.rejected == {"a": version("a", "2")}
    assert s.status(AUTHZ).rejected == {"a": version("a", "2")}  # type: ignore[union-attr]
    # Same version of a: not resent; a change elsewhere still arrives.
    assert summary(s.on_update(state(authz={"a": "2", "b": "2"}))) == [(AUTHZ, ["b"], [])]
    # A new version of a is sent again, and clears the rejection.
    assert summary(s.on_update(state(authz={"a": "3", "b": "2"}))) == [(AUTHZ, ["a"], [])]
    assert s.status(AUTHZ).rejected == {}  # type: ignore[union-attr]


def test_stale_nack_is_ignored_but_subscription_changes_apply() -> None:
    s = stream(state(authz={"a": "1", "b": "1"}))
    s.on_request(request(subscribe=("a",)))
    s.pop_events()
    responses = s.on_request(request(subscribe=("b",), nonce="999", error="old"))
    assert summary(responses) == [(AUTHZ, ["b"], [])]
    assert s.pop_events() == [StaleNonce(AUTHZ, "999", True)]
    assert s.status(AUTHZ).rejected == {}  # type: ignore[union-attr]


def test_nonce_of_another_type_is_stale() -> None:
    s = stream(state(authz={"a": "1"}, addr={"w": "1"}))
    [authz_response] = s.on_request(request(AUTHZ))
    s.on_request(request(ADDR))
    s.pop_events()
    s.on_request(request(ADDR, nonce=authz_response.nonce))
    assert s.pop_events() == [StaleNonce(ADDR, authz_response.nonce, False)]
    assert s.status(AUTHZ).unacked_nonces == (authz_response.nonce,)  # type: ignore[union-attr]


def test_pending_nonces_are_bounded() -> None:
    s = stream(state(authz={"a": "0"}), max_pending_per_type=3)
    s.on_request(request())
    nonces = [s.on_update(state(authz={"a": str(i)}))[0].nonce for i in range(1, 6)]
    assert s.status(AUTHZ).unacked_nonces == tuple(nonces[-3:])  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------- subscription changes


def test_unsubscribe_name_then_resubscribe() -> None:
    s = stream(state(authz={"a": "1", "b": "1"}))
    s.on_request(request(subscribe=("a", "b")))
    assert s.on_request(request(unsubscribe=("a",))) == []
    assert summary(s.on_update(state(authz={"a": "2", "b": "1"}))) == []
    assert s.status(AUTHZ).client_versions == {"b": version("b", "1")}  # type: ignore[union-attr]
    assert summary(s.on_request(request(subscribe=("a",)))) == [(AUTHZ, ["a"], [])]


def test_resubscribing_a_held_name_resends_it() -> None:
    s = stream(state(authz={"a": "1"}))
    s.on_request(request(subscribe=("a",)))
    assert summary(s.on_request(request(subscribe=("a",)))) == [(AUTHZ, ["a"], [])]


def test_explicit_resubscribe_answers_even_a_rejected_version() -> None:
    s = stream(state(authz={"a": "1"}))
    [r] = s.on_request(request(subscribe=("a",)))
    s.on_request(request(nonce=r.nonce, error="bad"))
    assert summary(s.on_request(request(subscribe=("a",)))) == [(AUTHZ, ["a"], [])]


def test_leaving_wildcard_stops_pushes_but_keeps_explicit_names() -> None:
    s = stream(state(authz={"a": "1", "b": "1"}))
    s.on_request(request(subscribe=("*", "a")))
    assert s.on_request(request(unsubscribe=("*",))) == []
    assert s.status(AUTHZ).client_versions == {"a": version("a", "1")}  # type: ignore[union-attr]
    assert summary(s.on_update(state(authz={"a": "2", "b": "2"}))) == [(AUTHZ, ["a"], [])]


def test_joining_wildcard_later_sends_what_is_missing() -> None:
    s = stream(state(authz={"a": "1", "b": "1", "c": "1"}))
    s.on_request(request(subscribe=("a",)))
    assert summary(s.on_request(request(subscribe=("*",)))) == [(AUTHZ, ["b", "c"], [])]


def test_on_demand_lookup_of_unknown_name_is_answered_with_removal() -> None:
    s = stream(state(authz={"a": "1"}))
    s.on_request(request(subscribe=("*",), unsubscribe=("*",)))
    assert summary(s.on_request(request(subscribe=("nope",)))) == [(AUTHZ, [], ["nope"])]
    assert summary(s.on_request(request(subscribe=("a",)))) == [(AUTHZ, ["a"], [])]


def test_initial_versions_after_the_first_request_are_ignored() -> None:
    s = stream(state(authz={"a": "1"}))
    s.on_request(request())
    assert s.on_request(request(initial={"a": "other", "zombie": "1"})) == []
    assert s.status(AUTHZ).client_versions == {"a": version("a", "1")}  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------- errors and chunking


@pytest.mark.parametrize(
    ("req", "message"),
    [
        pytest.param(request(type_url=""), "without type_url", id="missing type url"),
        pytest.param(
            request(type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"),
            "is not served",
            id="unserved type",
        ),
    ],
)
def test_protocol_errors(req: discovery_pb2.DeltaDiscoveryRequest, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        stream().on_request(req)


def test_invalid_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        stream(max_response_bytes=0)


def test_large_pushes_are_split_with_removals_first() -> None:
    before = {f"r{i:02}": "1" for i in range(10)}
    size = resource("r00@1").size
    s = stream(state(authz=before), max_response_bytes=size * 3)
    first = s.on_request(request())
    assert [len(r.resources) for r in first] == [3, 3, 3, 1]
    assert len({r.nonce for r in first}) == 4
    after = {f"r{i:02}": "2" for i in range(1, 10)}
    responses = s.on_update(state(authz=after))
    assert [(len(r.resources), list(r.removed_resources)) for r in responses] == [
        (3, ["r00"]),
        (3, []),
        (3, []),
    ]
    # A single resource larger than the limit is still sent, alone.
    s2 = stream(state(authz={"big": "1", "small": "1"}), max_response_bytes=1)
    assert [len(r.resources) for r in s2.on_request(request())] == [1, 1]


# ----------------------------------------------------------------------------------- property


class _Client:
    """A node proxy's cache: applies responses the way a delta client does."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}

    def apply(self, responses: list[discovery_pb2.DeltaDiscoveryResponse]) -> None:
        for r in responses:
            for name in r.removed_resources:
                self.held.pop(name, None)
            self.held.update(sent(r))


contents = st.dictionaries(st.sampled_from("abcdefgh"), st.sampled_from("123"), max_size=8)


@settings(max_examples=150, deadline=None)
@given(history=st.lists(contents, min_size=1, max_size=8), reconnect_at=st.integers(0, 8))
def test_wildcard_client_always_converges(history: list[dict[str, str]], reconnect_at: int) -> None:
    client = _Client()
    s = stream(state(authz=history[0]))
    client.apply(s.on_request(request()))
    for step, served in enumerate(history[1:], start=1):
        current = state(authz=served)
        if step == reconnect_at:
            s = stream(current)
            responses = s.on_request(request(initial=client.held))
            expected_sent = {n for n, c in served.items() if client.held.get(n) != version(n, c)}
            assert {x.name for r in responses for x in r.resources} == expected_sent
            assert {x for r in responses for x in r.removed_resources} == set(client.held) - set(served)
            client.apply(responses)
        else:
            client.apply(s.on_update(current))
        assert client.held == {n: version(n, c) for n, c in served.items()}
