"""The identity manager with a manual clock and an in-process CA (no network): caching, half-life
refresh, backoff capped at 150 s, keeping a valid certificate through CA failures, failing closed after
expiry, SAN checks, priorities and the concurrency limit, and following the node's workloads."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.ca.authority import CertificateAuthority
from loom.identity import Identity, WorkloadCertificate
from loom.testing.waiting import eventually
from loom.testing.workload_api import by_name, uid, workload
from ztunnel.identity import (
    CaUnavailable,
    CertificateManager,
    CertificateUnavailable,
    CertState,
    ManualClock,
    build_csr,
    verify_issued,
)
from ztunnel.identity.caclient import new_key
from ztunnel.state import ProxyState

pytestmark = pytest.mark.timeout(30)

ALICE = Identity("cluster.local", "default", "alice")
BOB = Identity("cluster.local", "default", "bob")
HOUR = dt.timedelta(hours=1)


class CaSource:
    """A CertificateSource backed by a real CertificateAuthority on the manual clock."""

    def __init__(self, state_dir: Path, clock: ManualClock, ttl: dt.timedelta = HOUR) -> None:
        self.clock = clock
        self.authority = CertificateAuthority.load_or_create(state_dir, "cluster.local", clock=clock.now)
        self.ttl = ttl
        self.calls: list[tuple[Identity, dt.datetime]] = []
        self.fail: Exception | None = None
        self.sign_as: Identity | None = None  # sign for another identity than requested (a bad CA)
        self.hold = False  # park each call until released
        self.parked: list[asyncio.Future[None]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def fetch_certificate(self, identity: Identity) -> WorkloadCertificate:
        self.calls.append((identity, self.clock.now()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold:
                parked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self.parked.append(parked)
                await parked
            if self.fail is not None:
                raise self.fail
            key = new_key()
            chain = self.authority.sign(build_csr(identity, key), self.sign_as or identity, self.ttl)
            return verify_issued(identity, key, chain, self.authority.trust_bundle_pem, self.clock.now())
        finally:
            self.in_flight -= 1

    def release_next(self) -> None:
        self.parked.pop(0).set_result(None)

    def calls_for(self, identity: Identity) -> int:
        return sum(1 for i, _ in self.calls if i == identity)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(dt.datetime.now(dt.UTC).replace(microsecond=0))


@pytest.fixture
def source(tmp_path: Path, clock: ManualClock) -> CaSource:
    return CaSource(tmp_path, clock)


@pytest.fixture
async def manager(source: CaSource, clock: ManualClock) -> AsyncIterator[CertificateManager]:
    m = CertificateManager(source, clock=clock)
    yield m
    await m.close()


async def idle(clock: ManualClock, sleepers: int = 1) -> None:
    """Wait until the workers have gone back to sleep on the clock."""
    await eventually(lambda: clock.sleepers >= sleepers, within=5, what="workers sleeping")


async def test_fetch_once_then_cached(manager: CertificateManager, source: CaSource) -> None:
    first, second = await asyncio.gather(manager.fetch(ALICE), manager.fetch(ALICE))
    assert first is second
    assert source.calls_for(ALICE) == 1
    assert await manager.fetch(ALICE) is first
    assert source.calls_for(ALICE) == 1
    assert first.identity == ALICE
    assert first.chain_pem and "BEGIN CERTIFICATE" in first.roots_pem
    assert manager.certificate(ALICE) is first


async def test_refresh_at_half_life(
    manager: CertificateManager, source: CaSource, clock: ManualClock
) -> None:
    cert = await manager.fetch(ALICE)
    await idle(clock)
    clock.advance(dt.timedelta(minutes=29))
    await asyncio.sleep(0.02)
    assert source.calls_for(ALICE) == 1
    clock.advance(dt.timedelta(minutes=1, seconds=1))
    await eventually(lambda: source.calls_for(ALICE) == 2, what="renewal at half-life")
    await eventually(lambda: manager.certificate(ALICE) is not cert, what="new certificate in use")
    renewed = manager.certificate(ALICE)
    assert renewed is not None and renewed.serial != cert.serial
    assert await manager.fetch(ALICE) is renewed


async def test_short_lived_certificate_is_not_renewed_in_a_loop(tmp_path: Path, clock: ManualClock) -> None:
    """The CA back-dates not_before by a minute: a 4 s certificate is still renewed at about 2 s."""
    source = CaSource(tmp_path, clock, ttl=dt.timedelta(seconds=4))
    manager = CertificateManager(source, clock=clock)
    try:
        await manager.fetch(ALICE)
        await idle(clock)
        assert source.calls_for(ALICE) == 1
        clock.advance(dt.timedelta(seconds=1.9))
        await asyncio.sleep(0.02)
        assert source.calls_for(ALICE) == 1
        clock.advance(dt.timedelta(seconds=0.2))
        await eventually(lambda: source.calls_for(ALICE) == 2, what="renewal")
    finally:
        await manager.close()


async def test_failed_renewal_keeps_the_certificate_until_expiry(
    manager: CertificateManager, source: CaSource, clock: ManualClock
) -> None:
    cert = await manager.fetch(ALICE)
    await idle(clock)
    source.fail = CaUnavailable("controller down")
    start = clock.now()
    # Walk the worker's schedule: each wake-up is a retry until the certificate expires.
    attempts: list[dt.datetime] = []
    while clock.now() < cert.not_after:
        deadline = clock.next_deadline()
        assert deadline is not None
        clock.set(deadline)
        calls = len(source.calls)
        woken = deadline
        await eventually(
            lambda: clock.sleepers >= 1 and clock.next_deadline() != woken,  # noqa: B023 -- awaited here
            what="worker asleep",
        )
        if len(source.calls) > calls:
            attempts.append(clock.now())
        if clock.now() < cert.not_after:
            assert await manager.fetch(ALICE) is cert  # still valid: still served
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(attempts)]
    assert attempts[0] - start == dt.timedelta(minutes=30)  # the first renewal is at half-life
    assert max(gaps) <= 150
    assert gaps[0] < 1  # the first retry is quick
    assert len(gaps) > 10 and min(gaps[-5:]) >= 75  # then capped at 150 s (jitter: [75 s, 150 s])
    # Past expiry: no certificate, connections fail closed.
    assert manager.certificate(ALICE) is None
    with pytest.raises(CertificateUnavailable, match="controller down"):
        await manager.fetch(ALICE)
    (status,) = manager.snapshot()
    assert status.state is CertState.UNAVAILABLE and "controller down" in status.error
    assert status.to_json()["state"].startswith("Unavailable: ")
    # Recovery: the next retry succeeds without a restart.
    source.fail = None
    await idle(clock)
    deadline = clock.next_deadline()
    assert deadline is not None and deadline - clock.now() <= dt.timedelta(seconds=150)
    clock.set(deadline)
    await eventually(lambda: manager.certificate(ALICE) is not None, what="recovered")
    assert manager.snapshot()[0].state is CertState.AVAILABLE


async def test_realtime_fetch_during_backoff_is_rate_limited(
    manager: CertificateManager, source: CaSource, clock: ManualClock
) -> None:
    source.fail = CaUnavailable("no route")
    with pytest.raises(CertificateUnavailable, match="no route"):
        await manager.fetch(ALICE)
    calls = len(source.calls)
    with pytest.raises(CertificateUnavailable, match="no route"):
        await manager.fetch(ALICE)  # within a second of the last attempt: fail fast, no CSR
    assert len(source.calls) == calls
    source.fail = None
    clock.advance(dt.timedelta(seconds=1))
    assert (await manager.fetch(ALICE)).identity == ALICE  # a second later: an early attempt


async def test_certificate_for_another_identity_is_rejected(
    manager: CertificateManager, source: CaSource, clock: ManualClock
) -> None:
    source.sign_as = BOB
    with pytest.raises(
        CertificateUnavailable, match=r"not exactly spiffe://cluster\.local/ns/default/sa/alice"
    ):
        await manager.fetch(ALICE)
    assert manager.certificate(ALICE) is None
    (status,) = manager.snapshot()
    assert status.state is CertState.UNAVAILABLE
    source.sign_as = None
    clock.advance(dt.timedelta(seconds=1))
    assert (await manager.fetch(ALICE)).identity == ALICE


async def test_concurrency_limit_and_realtime_first(manager: CertificateManager, source: CaSource) -> None:
    source.hold = True
    warm = [Identity("cluster.local", "default", f"sa{i}") for i in range(12)]
    for identity in warm:
        manager.prefetch(identity)
    await eventually(lambda: len(source.parked) == 8, what="8 CSRs in flight")
    waiting = asyncio.ensure_future(manager.fetch(ALICE))
    await asyncio.sleep(0.02)
    assert source.max_in_flight == 8
    source.release_next()  # a slot frees: the connection waiting for ALICE goes before 4 prefetches
    await eventually(lambda: len(source.calls) == 9, what="next CSR")
    assert source.calls[8][0] == ALICE
    source.hold = False
    while source.parked:
        source.release_next()
    cert = await asyncio.wait_for(waiting, 5)
    assert cert.identity == ALICE
    await eventually(lambda: all(manager.certificate(i) is not None for i in warm), what="all prefetched")
    assert source.max_in_flight == 8


async def test_tracking_the_node(manager: CertificateManager, source: CaSource) -> None:
    state = ProxyState("node-a")
    state.apply_addresses(
        by_name(
            workload("alice-1", "10.0.0.1", service_account="alice"),
            workload("alice-2", "10.0.0.2", service_account="alice"),
            workload("legacy", "10.0.0.3", service_account="legacy", hbone=False),
            workload("bob-1", "10.0.1.1", service_account="bob", node="node-b"),
        )
    )
    manager.track(state)
    await eventually(lambda: manager.certificate(ALICE) is not None, what="prefetched")
    legacy = Identity("cluster.local", "default", "legacy")
    assert manager.identities == (ALICE,)  # not captured: not prefetched
    with pytest.raises(CertificateUnavailable, match="no workload on node 'node-a' runs as"):
        await manager.fetch(BOB)
    assert source.calls_for(BOB) == 0  # refused without asking the CA
    assert (await manager.fetch(legacy)).identity == legacy  # local, so allowed on demand
    # A new local workload is prefetched as soon as it appears.
    state.apply_addresses(by_name(workload("carol-1", "10.0.0.4", service_account="carol")))
    carol = Identity("cluster.local", "default", "carol")
    await eventually(lambda: manager.certificate(carol) is not None, what="carol prefetched")
    # ALICE stays while one of its pods remains, and is forgotten with the last one.
    state.apply_addresses({}, removals=[uid("alice-1")])
    assert ALICE in manager.identities
    state.apply_addresses({}, removals=[uid("alice-2")])
    assert ALICE not in manager.identities
    with pytest.raises(CertificateUnavailable):
        await manager.fetch(ALICE)


async def test_snapshot_shape(manager: CertificateManager, source: CaSource) -> None:
    manager.prefetch(BOB)
    source.hold = True
    cert = await asyncio.wait_for(_released(manager, source, ALICE), 5)
    snapshot = {s.identity: s for s in manager.snapshot()}
    assert snapshot[BOB].state is CertState.INITIALIZING
    status = snapshot[ALICE]
    assert status.state is CertState.AVAILABLE and status.refresh_at is not None
    dumped = status.to_json()
    assert dumped["identity"] == str(ALICE) and dumped["state"] == "Available"
    leaf = dumped["cert_chain"][0]
    assert leaf["serialNumber"] == format(cert.serial, "x")
    assert leaf["expirationTime"] == cert.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert len(dumped["root_certs"]) == 1 and set(leaf) == {
        "pem",
        "serialNumber",
        "validFrom",
        "expirationTime",
    }


async def _released(manager: CertificateManager, source: CaSource, identity: Identity) -> WorkloadCertificate:
    waiting = asyncio.ensure_future(manager.fetch(identity))
    await eventually(lambda: len(source.parked) == 2, what="both parked")
    for future in list(source.parked):
        if future is source.parked[-1]:
            source.parked.remove(future)
            future.set_result(None)
    return await waiting


async def test_close_fails_waiters(source: CaSource, clock: ManualClock) -> None:
    manager = CertificateManager(source, clock=clock)
    source.hold = True
    waiting = asyncio.ensure_future(manager.fetch(ALICE))
    await eventually(lambda: len(source.parked) == 1, what="parked")
    await manager.close()
    with pytest.raises(CertificateUnavailable):
        await waiting
    with pytest.raises(CertificateUnavailable, match="closed"):
        await manager.fetch(ALICE)


def test_backoff_settings_are_validated(source: CaSource) -> None:
    with pytest.raises(ValueError, match="backoff"):
        CertificateManager(
            source, initial_backoff=dt.timedelta(seconds=5), max_backoff=dt.timedelta(seconds=1)
        )
