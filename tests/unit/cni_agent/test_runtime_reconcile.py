"""Runtime enrolment: the NodeAgent's reconcile against configuration changes, with a recording
redirection backend, recording node rules and annotator, and a real ZDS server + ztunnel InpodClient
(no root: the "pod namespace" is the test's own /proc/self/ns/net, no listeners are opened)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cni.agent.agent import CapturedStore, NodeAgent, StaticPodDirectory
from cni.agent.annotations import AnnotationError, AnnotationSync
from cni.agent.host_rules import IPAddress
from cni.agent.metrics import AgentMetrics
from cni.agent.reconcile import REDIRECTION_ANNOTATION, RetryPolicy
from cni.agent.redirect import RedirectionError
from cni.agent.zds_server import ZdsServer
from cni.events import AgentRequest, Outcome, PodAttachment, RequestKind
from loom.resources.model import LABEL_DATAPLANE_MODE, Namespace, ObjectMeta, Pod, PodTemplate
from loom.testing.inpod_agent import RecordingProxyManager
from loom.testing.waiting import eventually
from tests.unit.cni_agent.test_zds_server import NETNS, WAIT, ztunnel

AMBIENT = {LABEL_DATAPLANE_MODE: "ambient"}
OPT_OUT = {LABEL_DATAPLANE_MODE: "none"}
POD_IP = ipaddress.ip_address("10.80.1.7")
UID = "uid-web"


class RecordingBackend:
    """Remembers installed namespaces and, per call, whether ztunnel was serving the pod at that moment
    (so the tests can check the order of rules and ZDS messages)."""

    def __init__(self, manager: RecordingProxyManager | None = None) -> None:
        self.manager = manager
        self.installed: set[str] = set()
        self.calls: list[tuple[str, bool]] = []  # (operation, ztunnel served the pod then)
        self.fail_apply = 0
        self.fail_remove = 0

    def _serving(self) -> bool:
        return self.manager is not None and UID in self.manager.running

    async def apply(self, netns_path: str) -> None:
        self.calls.append(("apply", self._serving()))
        if self.fail_apply:
            self.fail_apply -= 1
            raise RedirectionError(f"iptables-restore in {netns_path} failed (injected)")
        self.installed.add(netns_path)

    async def remove(self, netns_path: str) -> None:
        self.calls.append(("remove", self._serving()))
        if self.fail_remove:
            self.fail_remove -= 1
            raise RedirectionError(f"iptables-restore in {netns_path} failed (injected)")
        self.installed.discard(netns_path)

    async def verify(self, netns_path: str) -> tuple[str, ...]:
        return () if netns_path in self.installed else ("nat: table has none of our rules",)


class RecordingHostRules:
    def __init__(self) -> None:
        self.current: frozenset[IPAddress] = frozenset()
        self.syncs = 0

    async def sync(self, pod_ips: Iterable[IPAddress], *, force: bool = False) -> bool:
        wanted = frozenset(pod_ips)
        changed = force or wanted != self.current
        self.current = wanted
        self.syncs += changed
        return changed


class RecordingAnnotator:
    """Fails the first `failures` writes; with `world`, a successful write changes the configuration
    the agent watches (like the lab store), so the agent sees its own annotation come back."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: list[tuple[str, str, str | None]] = []
        self.world: World | None = None
        self.agent: NodeAgent | None = None

    async def annotate(self, namespace: str, name: str, changes: Mapping[str, str | None]) -> bool:
        value = changes[REDIRECTION_ANNOTATION]
        self.calls.append((namespace, name, value))
        if self.failures:
            self.failures -= 1
            raise AnnotationError(f"store is locked (pod {namespace}/{name})")
        if self.world is not None and self.agent is not None:
            self.world.annotation = value
            self.agent.set_directory(self.world.directory())
        return True


@dataclass
class World:
    """The configuration the agent sees: namespace `shop` with pod `web` on node n1."""

    namespace_labels: dict[str, str] = field(default_factory=dict)
    pod_labels: dict[str, str] = field(default_factory=dict)
    phase: str = "Running"
    pod_present: bool = True
    pod_uid: str = UID
    annotation: str | None = None

    def directory(self) -> StaticPodDirectory:
        annotations = {REDIRECTION_ANNOTATION: self.annotation} if self.annotation else {}
        objects: list[Pod | Namespace] = [
            Namespace(meta=ObjectMeta("shop", "", labels=self.namespace_labels))
        ]
        if self.pod_present:
            meta = ObjectMeta(
                "web", "shop", labels=self.pod_labels, annotations=annotations, uid=self.pod_uid
            )
            objects.append(
                Pod(meta=meta, spec=PodTemplate(service_account="sa-web", node_name="n1"), phase=self.phase)
            )
        return StaticPodDirectory(objects)


async def settles(value: Callable[[], float | None], quiet: float = 0.25, within: float = WAIT) -> None:
    """Wait until `value()` stays unchanged for `quiet` seconds; TimeoutError if it keeps changing
    (an endless reconcile churn) for `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last, since = value(), loop.time()
    while loop.time() - since < quiet:
        if loop.time() > deadline:
            raise TimeoutError(f"still changing after {within} s (now {last})")
        await asyncio.sleep(0.02)
        current = value()
        if current != last:
            last, since = current, loop.time()


def attachment(netns: str = NETNS, container: str = "c1") -> PodAttachment:
    return PodAttachment("shop", "web", UID, container, netns, "eth0", (POD_IP,))


def pods_gauge(metrics: AgentMetrics, state: str) -> float | None:
    return metrics.registry.get_sample_value("loom_cni_agent_pods", {"state": state})


@pytest.fixture
def zds_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="zdsr", dir="/tmp")
    try:
        yield os.path.join(directory, "ztunnel.sock")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Rig:
    agent: NodeAgent
    backend: RecordingBackend
    host: RecordingHostRules
    annotator: RecordingAnnotator
    sync: AnnotationSync
    manager: RecordingProxyManager | None

    async def add(self, pod: PodAttachment | None = None) -> tuple[Outcome, str]:
        reply = await self.agent.handle(AgentRequest(RequestKind.ADD, pod or attachment()))
        return reply.outcome, reply.message

    async def settle_annotations(self) -> None:
        self.sync.update(*self.agent._desired_annotations())
        await self.sync.write_due()


@contextlib.asynccontextmanager
async def rig(
    zds_path: str,
    world: World,
    *,
    with_ztunnel: bool = True,
    annotator: RecordingAnnotator | None = None,
    store: CapturedStore | None = None,
    unknown_pod_wait: float = 0.05,
) -> AsyncIterator[Rig]:
    annotator = annotator or RecordingAnnotator()
    metrics = AgentMetrics()
    sync = AnnotationSync(
        annotator, retry=RetryPolicy(initial=0.01, maximum=0.05), on_error=metrics.redirection_errors.inc
    )
    async with ZdsServer(zds_path) as server, contextlib.AsyncExitStack() as stack:
        manager: RecordingProxyManager | None = None
        if with_ztunnel:
            _, manager = await stack.enter_async_context(ztunnel(zds_path))
            await server.wait_ready(WAIT)
        backend = RecordingBackend(manager)
        host = RecordingHostRules()
        agent = NodeAgent(
            world.directory(),
            backend,
            server,
            store,
            host_rules=host,
            annotations=sync,
            metrics=metrics,
            node="n1",
            retry=RetryPolicy(initial=0.01, maximum=0.05),
            unknown_pod_wait=unknown_pod_wait,
        )
        yield Rig(agent, backend, host, annotator, sync, manager)


@dataclass(frozen=True)
class Change:
    name: str
    before: World
    after: World
    enrolled_before: bool
    enrolled_after: bool


CHANGES = [
    Change("namespace labelled", World(), World(AMBIENT), False, True),
    Change("namespace label removed", World(AMBIENT), World(), True, False),
    Change("pod opts out with dataplane-mode=none", World(AMBIENT), World(AMBIENT, OPT_OUT), True, False),
    Change("pod opts in in an unlabelled namespace", World(), World({}, AMBIENT), False, True),
    Change("pod succeeded", World(AMBIENT), World(AMBIENT, phase="Succeeded"), True, False),
    Change("pod failed", World(AMBIENT), World(AMBIENT, phase="Failed"), True, False),
    Change(
        "pod deleted from the configuration", World(AMBIENT), World(AMBIENT, pod_present=False), True, False
    ),
    Change(
        "pod recreated under the same name", World(AMBIENT), World(AMBIENT, pod_uid="uid-new"), True, False
    ),
    Change("unrelated label added", World(AMBIENT), World(AMBIENT, {"tier": "web"}), True, True),
    Change("still not enrolled", World(), World({}, {"tier": "web"}), False, False),
]


@pytest.mark.parametrize("change", CHANGES, ids=[c.name for c in CHANGES])
async def test_configuration_change_enrols_or_releases_the_running_pod(zds_path: str, change: Change) -> None:
    async with rig(zds_path, change.before) as r:
        assert r.manager is not None
        outcome, _ = await r.add()
        assert outcome is (Outcome.ENROLLED if change.enrolled_before else Outcome.NOT_ENROLLED)
        assert "c1" in r.agent.known, "every attachment is remembered, enrolled or not"
        calls_before = len(r.backend.calls)

        after = change.after
        # The store shows what the agent wrote for the pod before the change.
        after.annotation = "enabled" if change.enrolled_before else None
        r.agent.set_directory(after.directory())
        result = await r.agent.reconcile()

        assert result == "ok"
        assert ("c1" in r.agent.captured) is change.enrolled_after
        assert (UID in r.manager.running) is change.enrolled_after
        assert (NETNS in r.backend.installed) is change.enrolled_after
        assert r.host.current == (frozenset({POD_IP}) if change.enrolled_after else frozenset())
        assert pods_gauge(r.agent.metrics, "enrolled") == (1 if change.enrolled_after else 0)
        new_calls = r.backend.calls[calls_before:]
        if change.enrolled_after and not change.enrolled_before:
            # ztunnel first: its listeners exist before the rules send traffic to them
            assert new_calls == [("apply", True)]
        elif change.enrolled_before and not change.enrolled_after:
            # rules out first, while ztunnel still serves the connections in flight
            assert new_calls == [("remove", True)]
        else:
            assert new_calls == []
        # Reconciling again changes nothing.
        assert await r.agent.reconcile() == "ok"
        assert r.backend.calls[calls_before:] == new_calls

        await r.settle_annotations()
        if change.enrolled_after and not change.enrolled_before:
            assert r.annotator.calls == [("shop", "web", "enabled")]
        elif change.enrolled_before and not change.enrolled_after and after.pod_present:
            # Also for a recreated pod of the same name: it is not captured (yet).
            assert r.annotator.calls == [("shop", "web", None)]
        else:
            assert r.annotator.calls == []


async def test_ztunnel_missing_then_arriving(zds_path: str) -> None:
    async with rig(zds_path, World(), with_ztunnel=False) as r:
        assert (await r.add())[0] is Outcome.NOT_ENROLLED
        r.agent.set_directory(World(AMBIENT).directory())
        assert await r.agent.reconcile() == "pending"
        # Fail closed: the rules are in although no ztunnel serves the pod.
        assert NETNS in r.backend.installed and r.agent.pending == {"c1"}
        assert pods_gauge(r.agent.metrics, "pending") == 1
        await r.settle_annotations()
        assert r.annotator.calls[-1] == ("shop", "web", "pending")
        # The plugin asking again gets Istio's "partial add": retry.
        outcome, message = await r.add()
        assert outcome is Outcome.ERROR and "redirection installed but no ztunnel" in message

        loop = asyncio.create_task(r.agent.run())
        try:
            async with ztunnel(zds_path) as (_, manager):
                await eventually(lambda: r.agent.pending == set(), within=WAIT, what="pod enrolled")
                assert UID in manager.running
                assert pods_gauge(r.agent.metrics, "enrolled") == 1
                assert r.agent.metrics.registry.get_sample_value("loom_cni_agent_ztunnel_connected") == 1
                await r.settle_annotations()
                assert r.annotator.calls[-1] == ("shop", "web", "enabled")
                assert (await r.add())[0] is Outcome.ENROLLED
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop


async def test_rules_that_cannot_be_written_are_withdrawn_and_retried(zds_path: str) -> None:
    async with rig(zds_path, World()) as r:
        assert r.manager is not None
        await r.add()
        r.backend.fail_apply = 1
        r.agent.set_directory(World(AMBIENT).directory())
        assert await r.agent.reconcile() == "error"
        assert r.agent.captured == {} and UID not in r.manager.running, "no half-enrolled pod"
        assert await r.agent.reconcile() == "ok"
        assert "c1" in r.agent.captured and UID in r.manager.running


async def test_rules_that_cannot_be_removed_keep_the_pod_served(zds_path: str) -> None:
    async with rig(zds_path, World(AMBIENT)) as r:
        assert r.manager is not None
        await r.add()
        r.backend.fail_remove = 1
        r.agent.set_directory(World().directory())
        assert await r.agent.reconcile() == "error"
        # Its traffic is still redirected, so ztunnel must keep serving it.
        assert "c1" in r.agent.captured and UID in r.manager.running
        assert await r.agent.reconcile() == "ok"
        assert r.agent.captured == {} and UID not in r.manager.running


async def test_annotation_failures_never_block_enrolment(zds_path: str) -> None:
    annotator = RecordingAnnotator(failures=3)
    async with rig(zds_path, World(AMBIENT), annotator=annotator) as r:
        writer = asyncio.create_task(r.sync.run())
        try:
            assert (await r.add())[0] is Outcome.ENROLLED
            errors = "loom_cni_agent_redirection_errors_total"
            await eventually(lambda: r.sync.writes == 1, within=WAIT, what="annotation written")
            assert r.agent.metrics.registry.get_sample_value(errors) == 3
            assert annotator.calls == [("shop", "web", "enabled")] * 4
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer


async def test_own_annotation_write_does_not_loop(zds_path: str) -> None:
    world = World()
    annotator = RecordingAnnotator()
    async with rig(zds_path, world, annotator=annotator) as r:
        annotator.world, annotator.agent = world, r.agent
        tasks = [asyncio.create_task(r.agent.run()), asyncio.create_task(r.sync.run())]
        try:
            await r.add()
            world.namespace_labels = dict(AMBIENT)
            r.agent.set_directory(world.directory())
            await eventually(lambda: world.annotation == "enabled", within=WAIT, what="annotation observed")
            passes = r.agent.metrics.registry.get_sample_value(
                "loom_cni_agent_reconciles_total", {"result": "ok"}
            )
            await asyncio.sleep(0.3)  # long enough for any churn to show (each step takes milliseconds)
            after = r.agent.metrics.registry.get_sample_value(
                "loom_cni_agent_reconciles_total", {"result": "ok"}
            )
            assert after == passes, "the agent's own annotation write must not keep it reconciling"
            assert annotator.calls == [("shop", "web", "enabled")]
            assert len(r.backend.calls) == 1
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def test_add_waits_briefly_for_the_configuration_to_learn_the_pod(zds_path: str) -> None:
    world = World(AMBIENT, pod_present=False)
    async with rig(zds_path, world, unknown_pod_wait=WAIT) as r:
        pending = asyncio.create_task(r.add())
        await asyncio.sleep(0.05)
        assert not pending.done()
        world.pod_present = True
        r.agent.set_directory(world.directory())
        assert (await asyncio.wait_for(pending, WAIT))[0] is Outcome.ENROLLED
    async with rig(zds_path, World(AMBIENT, pod_present=False)) as r:
        outcome, message = await r.add()
        assert outcome is Outcome.ERROR and "not known to the node agent yet" in message


async def test_vanished_sandbox_is_forgotten(zds_path: str, tmp_path: Path) -> None:
    sandbox = tmp_path / "netns"
    sandbox.write_text("")
    async with rig(zds_path, World(AMBIENT), with_ztunnel=False) as r:
        outcome, _ = await r.add(attachment(str(sandbox)))
        assert outcome is Outcome.ERROR and "c1" in r.agent.captured  # pending: no ztunnel
        sandbox.unlink()
        await r.agent.reconcile()
        assert r.agent.known == {} and r.agent.captured == {} and r.agent.zds.pods == {}
        assert r.backend.calls[-1][0] == "remove"
        assert r.agent.transitions[-1].action == "forgotten"


async def test_gc_and_del_forget_known_pods(zds_path: str) -> None:
    async with rig(zds_path, World()) as r:
        await r.add(attachment(container="c1"))
        await r.add(attachment(container="c2"))
        assert set(r.agent.known) == {"c1", "c2"}
        gc = AgentRequest(RequestKind.GC, valid_attachments=())
        assert (await r.agent.handle(gc)).outcome is Outcome.DONE
        assert r.agent.known == {}
        await r.add()
        reply = await r.agent.handle(AgentRequest(RequestKind.DEL, attachment()))
        assert reply.outcome is Outcome.DONE and r.agent.known == {}
        assert (
            r.agent.metrics.registry.get_sample_value(
                "loom_cni_agent_events_total", {"kind": "add", "outcome": "not-enrolled"}
            )
            == 3
        )


async def test_restart_releases_pods_no_longer_enrolled_and_reads_the_old_state_format(
    zds_path: str, tmp_path: Path
) -> None:
    state = tmp_path / "captured.json"
    old_format = {
        "pods": [
            {
                "uid": UID,
                "service_account": "sa-web",
                "attachment": {
                    "namespace": "shop",
                    "name": "web",
                    "uid": UID,
                    "container_id": "c1",
                    "netns": NETNS,
                    "ifname": "eth0",
                    "ips": [str(POD_IP)],
                },
            },
            {"uid": "broken", "attachment": {"namespace": "shop"}},  # one bad entry does not lose the rest
        ]
    }
    state.write_text(json.dumps(old_format))
    async with rig(zds_path, World(), with_ztunnel=False, store=CapturedStore(state)) as r:
        assert await r.agent.restore() == 1
        assert r.agent.acked == {"c1"} and r.host.current == frozenset({POD_IP})
        assert r.agent.zds.pods[UID].netns_path == NETNS
        # The label went away while the agent was down: the first reconcile releases the pod.
        await r.agent.reconcile()
        assert r.agent.captured == {} and "c1" in r.agent.known and r.host.current == frozenset()
    saved = json.loads(state.read_text())
    assert saved["version"] == 2
    assert saved["pods"] == [
        {
            "attachment": {
                "namespace": "shop",
                "name": "web",
                "uid": UID,
                "container_id": "c1",
                "netns": NETNS,
                "ifname": "eth0",
                "ips": [str(POD_IP)],
            },
            "captured": None,
        }
    ]
    async with rig(zds_path, World(AMBIENT), store=CapturedStore(state)) as r:
        assert await r.agent.restore() == 0 and set(r.agent.known) == {"c1"}
        # Known from before the restart, enrolled at runtime without a new plugin event.
        await r.agent.reconcile()
        assert r.agent.acked == {"c1"}
