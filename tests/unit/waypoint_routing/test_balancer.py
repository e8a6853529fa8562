"""Endpoint balancing: rotation, exclusion for retries, and outlier ejection on a fake clock."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tests.unit.waypoint_routing.builders import endpoint, svc
from waypoint.balancer import EndpointBalancer, OutlierPolicy, service_key
from waypoint.model import Endpoint, ServiceRef

WEB = svc("web")
IPS = ("10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def balancer_with(
    ips: tuple[str, ...] = IPS, *, clock: FakeClock | None = None, service: ServiceRef = WEB, seed: int = 0
) -> EndpointBalancer:
    balancer = EndpointBalancer(clock=clock or FakeClock(), rng=random.Random(seed))
    balancer.update(service_key(service), [endpoint(ip) for ip in ips])
    return balancer


def fail(balancer: EndpointBalancer, target: Endpoint, times: int) -> None:
    for _ in range(times):
        balancer.report(target, success=False)


def picked_ips(balancer: EndpointBalancer, count: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    ips = []
    for _ in range(count):
        chosen = balancer.pick(WEB, exclude)
        assert chosen is not None
        ips.append(chosen.ip)
    return ips


def test_round_robin_visits_every_endpoint_once_per_round() -> None:
    balancer = balancer_with()
    picks = picked_ips(balancer, 12)
    for start in range(0, 12, 4):
        assert sorted(picks[start : start + 4]) == sorted(IPS)
    assert picks[:4] == picks[4:8]  # a stable order (sorted by address, from a random start)


def test_rotation_start_depends_on_the_rng() -> None:
    starts = {picked_ips(balancer_with(seed=seed), 1)[0] for seed in range(20)}
    assert len(starts) > 1


def test_update_keeps_the_rotation_and_deduplicates() -> None:
    balancer = balancer_with()
    first = picked_ips(balancer, 2)
    balancer.update(service_key(WEB), [endpoint(ip) for ip in (*IPS, *IPS)])
    assert len(balancer.endpoints(service_key(WEB))) == 4
    following = picked_ips(balancer, 2)
    assert sorted(first + following) == sorted(IPS)


def test_unknown_service_and_emptied_service_give_none() -> None:
    balancer = balancer_with()
    assert balancer.pick(svc("other")) is None
    assert balancer.pick(svc("web", 8080)) is None  # endpoints are per Service port
    balancer.update(service_key(WEB), [])
    assert balancer.pick(WEB) is None


def test_exclude_skips_addresses_already_tried() -> None:
    balancer = balancer_with()
    tried = frozenset(IPS[:3])
    assert set(picked_ips(balancer, 5, tried)) == {IPS[3]}
    assert balancer.pick(WEB, frozenset(IPS)) is None


def test_ejection_after_consecutive_failures() -> None:
    clock = FakeClock()
    balancer = balancer_with(clock=clock)
    bad = endpoint(IPS[0])
    fail(balancer, bad, 4)
    assert not balancer.is_ejected(bad)
    balancer.report(bad, success=True)  # a success resets the streak
    fail(balancer, bad, 4)
    assert not balancer.is_ejected(bad)
    balancer.report(bad, success=False)
    assert balancer.is_ejected(bad)
    assert balancer.stats.ejections == 1
    assert IPS[0] not in picked_ips(balancer, 30)
    assert balancer.stats.recent[-1].until == clock.now + 30.0


def test_ejection_time_grows_with_each_ejection_and_ends_on_the_clock() -> None:
    clock = FakeClock()
    balancer = balancer_with(clock=clock)
    bad = endpoint(IPS[1])
    fail(balancer, bad, 5)
    clock.advance(29.9)
    assert balancer.is_ejected(bad)
    clock.advance(0.1)
    assert not balancer.is_ejected(bad)  # back after 30 s, without a probe
    assert IPS[1] in picked_ips(balancer, 4)
    fail(balancer, bad, 5)  # second ejection right away: 2 x 30 s
    clock.advance(59.0)
    assert balancer.is_ejected(bad)
    clock.advance(1.0)
    assert not balancer.is_ejected(bad)
    assert [event.ejections for event in balancer.stats.recent] == [1, 2]


def test_ejection_count_decays_while_in_service() -> None:
    clock = FakeClock()
    balancer = balancer_with(clock=clock)
    bad = endpoint(IPS[2])
    fail(balancer, bad, 5)
    clock.advance(30.0)
    assert not balancer.is_ejected(bad)
    clock.advance(10.0)  # one decay interval in service: back to a first-time ejection
    fail(balancer, bad, 5)
    assert balancer.stats.recent[-1].ejections == 1
    clock.advance(29.0)
    assert balancer.is_ejected(bad)
    clock.advance(1.0)
    assert not balancer.is_ejected(bad)


def test_ejection_time_is_capped() -> None:
    clock = FakeClock()
    policy = OutlierPolicy(consecutive_failures=1, base_ejection_time=30.0, max_ejection_time=75.0)
    balancer = EndpointBalancer(clock=clock, rng=random.Random(0), policy=policy)
    balancer.update(service_key(WEB), [endpoint(ip) for ip in IPS])
    bad = endpoint(IPS[0])
    durations = []
    for _ in range(4):
        balancer.report(bad, success=False)
        durations.append(balancer.stats.recent[-1].until - clock.now)
        clock.advance(durations[-1])
    assert durations == [30.0, 60.0, 75.0, 75.0]


def test_at_most_half_of_the_endpoints_are_ejected() -> None:
    balancer = balancer_with()
    for ip in IPS:
        fail(balancer, endpoint(ip), 5)
    ejected = [ip for ip in IPS if balancer.is_ejected(endpoint(ip))]
    assert ejected == list(IPS[:2])
    assert balancer.stats.ejections == 2
    assert balancer.stats.ejections_prevented == 2
    assert set(picked_ips(balancer, 8)) == set(IPS[2:])


def test_the_cap_applies_to_every_service_an_endpoint_backs() -> None:
    small = svc("small")
    balancer = balancer_with()
    balancer.update(service_key(small), [endpoint(IPS[0]), endpoint(IPS[1])])
    fail(balancer, endpoint(IPS[0]), 5)  # 1 of 2 in "small", 1 of 4 in "web": allowed
    fail(balancer, endpoint(IPS[1]), 5)  # would be 2 of 2 in "small": refused
    assert balancer.is_ejected(endpoint(IPS[0]))
    assert not balancer.is_ejected(endpoint(IPS[1]))


def test_a_single_endpoint_is_never_ejected() -> None:
    balancer = balancer_with(IPS[:1])
    fail(balancer, endpoint(IPS[0]), 50)
    assert not balancer.is_ejected(endpoint(IPS[0]))
    assert picked_ips(balancer, 1) == [IPS[0]]


def test_cap_refusal_keeps_the_streak_so_ejection_follows_once_allowed() -> None:
    clock = FakeClock()
    balancer = balancer_with(IPS[:2], clock=clock)
    fail(balancer, endpoint(IPS[0]), 5)
    fail(balancer, endpoint(IPS[1]), 5)  # refused: 1 of 2 already out
    clock.advance(30.0)  # IPS[0] is back
    balancer.report(endpoint(IPS[1]), success=False)
    assert balancer.is_ejected(endpoint(IPS[1]))


def test_all_remaining_endpoints_ejected_falls_back_to_them() -> None:
    balancer = balancer_with(IPS[:2])
    fail(balancer, endpoint(IPS[0]), 5)
    # The only other endpoint was tried already: take the ejected one rather than fail outright.
    chosen = balancer.pick(WEB, frozenset({IPS[1]}))
    assert chosen is not None and chosen.ip == IPS[0]
    assert balancer.stats.panic_picks == 1


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    clock = FakeClock()
    balancer = balancer_with(clock=clock)
    bad = endpoint(IPS[0])
    fail(balancer, bad, 5)
    fail(balancer, bad, 20)  # late reports of attempts made before the ejection
    assert balancer.stats.ejections == 1
    clock.advance(30.0)
    assert not balancer.is_ejected(bad)


def test_removed_endpoints_are_forgotten() -> None:
    balancer = balancer_with()
    gone = endpoint(IPS[3])
    fail(balancer, gone, 4)
    balancer.update(service_key(WEB), [endpoint(ip) for ip in IPS[:3]])
    fail(balancer, gone, 10)  # reports for an endpoint no longer configured are ignored
    balancer.update(service_key(WEB), [endpoint(ip) for ip in IPS])
    balancer.report(gone, success=False)
    assert not balancer.is_ejected(gone)  # its old streak did not survive
    assert balancer.stats.ejections == 0


def test_health_survives_a_config_push_that_keeps_the_endpoint() -> None:
    balancer = balancer_with()
    bad = endpoint(IPS[0])
    fail(balancer, bad, 5)
    balancer.update(service_key(WEB), [endpoint(ip) for ip in IPS])
    assert balancer.is_ejected(bad)


def test_even_spread_among_healthy_endpoints() -> None:
    balancer = balancer_with()
    fail(balancer, endpoint(IPS[0]), 5)
    counts = Counter(picked_ips(balancer, 300))
    assert set(counts) == set(IPS[1:])
    assert set(counts.values()) == {100}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive_failures": 0},
        {"base_ejection_time": 0.0},
        {"max_ejection_time": -1.0},
        {"decay_interval": 0.0},
        {"max_ejection_percent": 101},
    ],
)
def test_policy_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        OutlierPolicy(**kwargs)  # type: ignore[arg-type]
