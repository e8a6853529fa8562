"""The NodeAgent: captures the pods of its node that should be in the mesh and hands them to ztunnel.

Theory of operation
-------------------
State (persisted by `CapturedStore` after every change, so a restarted agent continues where it was):

* ``known``: every pod attachment the CNI plugin told the agent about (ADD), enrolled or not, keyed by
  container ID, until the runtime deletes it (DEL, GC) or its network namespace disappears;
* ``captured``: the known pods whose redirection is installed; ztunnel's snapshots list exactly these;
* ``acked``: the captured pods a ztunnel acknowledged: *enrolled*. Captured but not acked is *pending*
  (rules in place, so the pod's traffic fails closed until a ztunnel serves it).

Inputs: plugin events (`handle`), configuration changes (`set_directory`: the pods and namespaces, from
which `cni.agent.enrolment` decides), ztunnel snapshots (`ZdsServer.on_snapshot`) and retry timers. Each
pass of `reconcile` plans per pod with `cni.agent.reconcile.plan` and carries the steps out; plugin
events and reconcile passes run one at a time under one lock, so the steps of two pods never
interleave. `run` reconciles whenever something changed (bursts coalesce), when a retry falls due and
every `resync_interval` as a safety net (sandboxes deleted without a DEL).

Order of the steps, chosen so that no NEW connection fails while a running pod changes mode:

* capture: when a ztunnel is connected, ``add`` goes to it first, so its listeners exist inside the
  pod before the rules send traffic to them; then the rules. Without a ztunnel, or when it rejects the
  pod, the rules go in anyway (fail closed: the pod is meant to be in the mesh) and the pod is pending,
  retried with bounded backoff; a ztunnel that connects later takes it over through its snapshot.
  Rules that cannot be written undo the ``add`` (nothing half-enrolled stays behind) and are retried;
* release: the rules go first (new connections leave directly at once), then ``del`` to every ztunnel,
  which ends the connections it was still carrying. When the rules cannot be removed from a live pod
  the pod stays captured and served, and the release is retried. When the sandbox is gone (DEL, GC,
  a vanished namespace) the pod is forgotten in any case.

Plugin ADD for a pod that should be enrolled answers ``enrolled`` only once ztunnel acknowledged it; a
pending pod is an error with retry (Istio's "partial add"), so the runtime tries again and no container
of an enrolled pod starts unmeshed. A pod the configuration does not know yet is waited for briefly
(the runtime usually writes the Pod just before calling the plugin), then answered with retry.

The node side follows the same state: `HostRules` (`HostRulesApplier`) keeps the probe SNAT rules equal to the
captured pods' IPs, and `AnnotationSync` moves each pod's ``ambient.istio.io/redirection`` annotation to
``enabled``/``pending``/absent without ever holding up enrolment.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from cni.agent.annotations import AnnotationSync, PodRef
from cni.agent.enrolment import EnrolmentDecision, decide_enrolment
from cni.agent.host_rules import HostRules, IPAddress
from cni.agent.metrics import AgentMetrics
from cni.agent.reconcile import (
    Action,
    ActionKind,
    PodView,
    RetryPolicy,
    RetrySchedule,
    plan,
    plan_pod,
    redirection_value,
)
from cni.agent.redirect import RedirectionBackend, RedirectionError
from cni.agent.zds_server import ZdsPod, ZdsServer, ZtunnelUnavailable
from cni.events import AgentReply, AgentRequest, Outcome, PodAttachment, RequestKind
from loom.resources.model import ANNOTATION_REDIRECTION, ConfigSnapshot, Namespace, Pod
from ztunnel.inpod.protocol import WorkloadInfo

log = logging.getLogger(__name__)

STATE_VERSION: Final = 2
# How long a plugin ADD waits for the configuration to learn a pod it does not know yet; well inside
# the plugin's default 10 s agent timeout.
DEFAULT_UNKNOWN_POD_WAIT: Final = 3.0
DEFAULT_RESYNC_INTERVAL: Final = 30.0
# Recent transitions kept for inspection (tests, debugging); a bounded ring.
TRANSITION_HISTORY: Final = 256
_HOST_RULES: Final = "host-rules"


class PodDirectory(Protocol):
    """What the agent knows about the cluster: pods and namespaces by name."""

    def pod(self, namespace: str, name: str) -> Pod | None: ...

    def namespace(self, name: str) -> Namespace | None: ...

    def pods(self) -> Iterable[Pod]: ...


class StaticPodDirectory:
    """A `PodDirectory` over objects given up front and updated with `put`/`remove`."""

    def __init__(self, objects: Iterable[Pod | Namespace] = ()) -> None:
        self._pods: dict[tuple[str, str], Pod] = {}
        self._namespaces: dict[str, Namespace] = {}
        for obj in objects:
            self.put(obj)

    def put(self, obj: Pod | Namespace) -> None:
        if isinstance(obj, Pod):
            self._pods[(obj.namespace, obj.meta.name)] = obj
        else:
            self._namespaces[obj.meta.name] = obj

    def remove(self, obj: Pod | Namespace) -> None:
        if isinstance(obj, Pod):
            self._pods.pop((obj.namespace, obj.meta.name), None)
        else:
            self._namespaces.pop(obj.meta.name, None)

    def pod(self, namespace: str, name: str) -> Pod | None:
        return self._pods.get((namespace, name))

    def namespace(self, name: str) -> Namespace | None:
        return self._namespaces.get(name)

    def pods(self) -> Iterable[Pod]:
        return list(self._pods.values())


class SnapshotDirectory(StaticPodDirectory):
    """A `PodDirectory` over a configuration snapshot: every namespace, and the pods scheduled on `node`
    plus unscheduled ones (all pods when `node` is empty). Unscheduled pods are kept because a plugin
    ADD for one proves it runs here, whatever the configuration has caught up with."""

    def __init__(self, snapshot: ConfigSnapshot, node: str = "") -> None:
        super().__init__()
        for namespace in snapshot.of_kind(Namespace):
            self.put(namespace)
        for pod in snapshot.of_kind(Pod):
            if not node or pod.spec.node_name in (node, ""):
                self.put(pod)


@dataclass(frozen=True, slots=True)
class CapturedPod:
    uid: str
    attachment: PodAttachment
    service_account: str = "default"

    @property
    def info(self) -> WorkloadInfo:
        return WorkloadInfo(self.attachment.name, self.attachment.namespace, self.service_account)


@dataclass(frozen=True, slots=True)
class AgentState:
    """What `CapturedStore` persists: known attachments, captured pods, acknowledged container IDs."""

    known: dict[str, PodAttachment]
    captured: dict[str, CapturedPod]
    acked: frozenset[str]


def _attachment_to_json(attachment: PodAttachment) -> dict[str, Any]:
    raw = asdict(attachment)
    raw["ips"] = [str(ip) for ip in attachment.ips]
    return raw


def _attachment_from_json(raw: Mapping[str, Any]) -> PodAttachment:
    fields = dict(raw)
    fields["ips"] = tuple(ipaddress.ip_address(ip) for ip in fields.get("ips", ()))
    return PodAttachment(**fields)


class CapturedStore:
    """The agent's pod state, persisted so that a restarted agent gives ztunnel the same snapshot and
    still knows every pod it may have to enrol later.

    Without it a restarted agent would send an empty snapshot and ztunnel would drain every proxy: the
    pods' rules stay (traffic fails closed) but their traffic stops. Written atomically (temp file +
    rename) after every change; a missing file is an empty state, an unreadable file or entry is
    reported in the log and skipped.

    Format (version 2)::

        {"version": 2, "pods": [{"attachment": {...}, "captured": null |
                                 {"uid": "...", "serviceAccount": "...", "acked": true}}]}

    The version-1 file of earlier agents (``{"pods": [{"uid", "service_account", "attachment"}]}``,
    captured pods only) is still read: every entry is a known, captured and acknowledged pod (it was
    written only after ztunnel accepted the pod or as a pending one that the restart's snapshot will
    settle), and the next save writes version 2."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> AgentState:
        known: dict[str, PodAttachment] = {}
        captured: dict[str, CapturedPod] = {}
        acked: set[str] = set()
        try:
            raw = json.loads(self.path.read_text())
            entries = raw["pods"]
            if not isinstance(entries, list):
                raise TypeError(f"'pods' is a {type(entries).__name__}, expected a list")
            version = raw.get("version", 1)
        except FileNotFoundError:
            return AgentState({}, {}, frozenset())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("pod state %s is unreadable (%s); starting without it", self.path, exc)
            return AgentState({}, {}, frozenset())
        for index, entry in enumerate(entries):
            try:
                attachment = _attachment_from_json(entry["attachment"])
                cid = attachment.container_id
                if version == 1:
                    captured[cid] = CapturedPod(
                        entry["uid"], attachment, entry.get("service_account", "default")
                    )
                    acked.add(cid)
                else:
                    capture = entry.get("captured")
                    if capture is not None:
                        captured[cid] = CapturedPod(
                            capture["uid"], attachment, capture.get("serviceAccount", "default")
                        )
                        if capture.get("acked", False):
                            acked.add(cid)
                known[cid] = attachment
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("pod state %s: entry %d is unreadable (%s); skipped", self.path, index, exc)
        return AgentState(known, captured, frozenset(acked))

    def save(
        self, known: Mapping[str, PodAttachment], captured: Mapping[str, CapturedPod], acked: Iterable[str]
    ) -> None:
        acked_set = set(acked)
        pods = []
        for cid, attachment in known.items():
            pod = captured.get(cid)
            capture = (
                None
                if pod is None
                else {"uid": pod.uid, "serviceAccount": pod.service_account, "acked": cid in acked_set}
            )
            pods.append({"attachment": _attachment_to_json(attachment), "captured": capture})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": STATE_VERSION, "pods": pods}, indent=1))
        os.replace(tmp, self.path)


def pod_uid(attachment: PodAttachment, pod: Pod) -> str:
    """The ZDS uid: the Kubernetes UID when known, otherwise a stable namespace/name key."""
    return attachment.uid or pod.meta.uid or f"{attachment.namespace}/{attachment.name}"


class PodState(enum.Enum):
    ENROLLED = "enrolled"
    PENDING = "pending"
    NOT_ENROLLED = "not-enrolled"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class PodResult:
    state: PodState
    message: str


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of a pod's capture, for inspection: `at` is time.monotonic()."""

    at: float
    action: str  # "captured" | "enrolled" | "released" | "forgotten"
    pod: str  # namespace/name


class NodeAgent:
    """See the module docstring. `handle` is the `cni.events.serve_plugin_events` handler; `run` is the
    reconcile loop (a task for the agent's lifetime)."""

    def __init__(
        self,
        directory: PodDirectory | None,
        backend: RedirectionBackend,
        zds: ZdsServer,
        store: CapturedStore | None = None,
        *,
        host_rules: HostRules | None = None,
        annotations: AnnotationSync | None = None,
        metrics: AgentMetrics | None = None,
        node: str = "",
        retry: RetryPolicy | None = None,
        unknown_pod_wait: float = DEFAULT_UNKNOWN_POD_WAIT,
        resync_interval: float = DEFAULT_RESYNC_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`directory` None: no configuration yet (`set_directory` brings it; until then nothing is
        reconciled and ADDs wait for it)."""
        self.directory: PodDirectory = directory if directory is not None else StaticPodDirectory()
        self.config_loaded = directory is not None
        self.backend = backend
        self.zds = zds
        self.store = store
        self.host_rules = host_rules
        self.annotations = annotations
        self.metrics = metrics if metrics is not None else AgentMetrics()
        self.node = node
        self.unknown_pod_wait = unknown_pod_wait
        self.resync_interval = resync_interval
        self._clock = clock
        self.known: dict[str, PodAttachment] = {}  # by container ID
        self.captured: dict[str, CapturedPod] = {}  # by container ID
        self.acked: set[str] = set()  # container IDs
        self.transitions: collections.deque[Transition] = collections.deque(maxlen=TRANSITION_HISTORY)
        self._retry: RetrySchedule[str] = RetrySchedule(retry or RetryPolicy())
        self._lock = asyncio.Lock()  # one pod event or reconcile pass at a time
        self._wake = asyncio.Event()
        self._config_event = asyncio.Event()
        self._snapshot_results: list[dict[str, str]] = []
        zds.on_snapshot = self._on_snapshot
        self.metrics.follow_ztunnel_connections(lambda: self.zds.ready_connections)

    # -- inputs -------------------------------------------------------------------------------------

    def set_directory(self, directory: PodDirectory) -> None:
        """A new configuration: reconcile soon (bursts coalesce into one pass)."""
        self.directory = directory
        self.config_loaded = True
        event, self._config_event = self._config_event, asyncio.Event()
        event.set()  # wakes ADDs waiting for a pod to appear
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def _on_snapshot(self, results: Mapping[str, str]) -> None:
        # Applied by the next pass, under the lock: this runs inside the ZDS server's own task.
        self._snapshot_results.append(dict(results))
        self.wake()

    # -- state helpers ------------------------------------------------------------------------------

    @property
    def pending(self) -> set[str]:
        return set(self.captured) - self.acked

    def _persist(self) -> None:
        if self.store is not None:
            try:
                self.store.save(self.known, self.captured, self.acked)
            except OSError as exc:  # losing the state file only costs a restart's snapshot
                log.error("cannot save the pod state to %s: %s", self.store.path, exc)

    def _note(self, action: str, attachment: PodAttachment) -> None:
        self.transitions.append(
            Transition(self._clock(), action, f"{attachment.namespace}/{attachment.name}")
        )

    def _pod_for(self, attachment: PodAttachment) -> Pod | None:
        """The configuration's Pod for an attachment; None when unknown or when the configuration holds
        a newer pod of the same name (another UID: this attachment belongs to a deleted incarnation)."""
        pod = self.directory.pod(attachment.namespace, attachment.name)
        if pod is not None and attachment.uid and pod.meta.uid and attachment.uid != pod.meta.uid:
            return None
        return pod

    def _decide(self, attachment: PodAttachment) -> EnrolmentDecision:
        pod = self._pod_for(attachment)
        if pod is None:
            return EnrolmentDecision(
                False, f"pod {attachment.namespace}/{attachment.name} is not in the configuration"
            )
        return decide_enrolment(pod, self.directory.namespace(attachment.namespace))

    def _view(self, cid: str, sandbox_exists: bool, *, force_retry: bool = False) -> PodView:
        return PodView(
            container_id=cid,
            sandbox_exists=sandbox_exists,
            captured=cid in self.captured,
            acked=cid in self.acked,
            decision=self._decide(self.known[cid]),
            retry_due=force_retry or self._retry.due(cid, self._clock()),
        )

    def _result_now(self, cid: str) -> PodResult:
        attachment = self.known.get(cid)
        if cid in self.acked and cid in self.captured:
            return PodResult(PodState.ENROLLED, "")
        if cid in self.captured:
            return PodResult(PodState.PENDING, "no ztunnel has acknowledged it yet")
        reason = self._decide(attachment).reason if attachment is not None else "unknown attachment"
        return PodResult(PodState.NOT_ENROLLED, reason)

    def _apply_snapshot_results(self) -> None:
        results, self._snapshot_results = self._snapshot_results, []
        changed = False
        now = self._clock()
        for outcome in results:
            for cid, pod in self.captured.items():
                if pod.uid not in outcome:
                    continue
                error = outcome[pod.uid]
                if not error and cid not in self.acked:
                    self.acked.add(cid)
                    self._retry.succeeded(cid)
                    self._note("enrolled", pod.attachment)
                    changed = True
                elif error and cid in self.acked:
                    self.acked.discard(cid)
                    self._retry.failed(cid, now)
                    changed = True
        if changed:
            self._persist()

    # -- restart ------------------------------------------------------------------------------------

    async def restore(self) -> int:
        """Take back the pods known before a restart; call before the ZDS server starts listening.

        A pod whose network namespace still exists keeps its rules (re-applied if they drifted) and is
        listed in ztunnel's snapshot with its netns, so ztunnel keeps that proxy (same netns inode: a
        no-op); a pod whose namespace is gone was deleted while the agent was down and is dropped. The
        node's probe rules are rebuilt from the restored set (stale ones vanish). Pods that are no
        longer to be enrolled are released by the first reconcile, once the configuration is loaded.
        Returns the number of captured pods restored."""
        if self.store is not None:
            state = self.store.load()
            for cid, attachment in state.known.items():
                netns = attachment.netns
                if not netns or not await asyncio.to_thread(os.path.exists, netns):
                    log.info("dropping %s/%s: its sandbox is gone", attachment.namespace, attachment.name)
                    continue
                self.known[cid] = attachment
                pod = state.captured.get(cid)
                if pod is None:
                    continue
                try:
                    if await self.backend.verify(netns):
                        await self.backend.apply(netns)
                except RedirectionError as exc:
                    log.error("restoring %s/%s: %s", attachment.namespace, attachment.name, exc)
                self.captured[cid] = pod
                if cid in state.acked:
                    self.acked.add(cid)
                self.zds.pods[pod.uid] = ZdsPod(pod.uid, pod.info, netns)
            self._persist()
        await self._sync_host_rules(force=True)
        self._update_metrics()
        return len(self.captured)

    # -- plugin events ------------------------------------------------------------------------------

    async def handle(self, request: AgentRequest) -> AgentReply:
        try:
            reply = await self._handle(request)
        except Exception:
            self.metrics.event(request.kind.value, Outcome.ERROR.value)
            raise
        self.metrics.event(request.kind.value, reply.outcome.value)
        return reply

    async def _handle(self, request: AgentRequest) -> AgentReply:
        if request.kind is RequestKind.STATUS:
            if self.zds.ready:
                return AgentReply(Outcome.DONE, "ztunnel connected")
            return AgentReply(Outcome.ERROR, "no ztunnel connection yet", retry=True)
        if request.kind is RequestKind.GC:
            valid = {a.container_id for a in request.valid_attachments}
            async with self._lock:
                for cid in [c for c in self.known if c not in valid]:
                    await self._forget(cid, "the runtime no longer has it (GC)")
                await self._after_change()
            return AgentReply(Outcome.DONE, "")
        assert request.pod is not None  # AgentRequest guarantees a pod for add/del/check
        if request.kind is RequestKind.ADD:
            return await self._add(request.pod)
        if request.kind is RequestKind.DEL:
            async with self._lock:
                was_captured = request.pod.container_id in self.captured
                await self._forget(request.pod.container_id, "deleted by the runtime")
                await self._after_change()
            return AgentReply(Outcome.DONE, "released" if was_captured else "pod was not captured")
        async with self._lock:
            return await self._check(request.pod)

    async def _wait_for_pod(self, attachment: PodAttachment) -> None:
        """Wait (bounded) until the configuration knows the pod."""
        deadline = self._clock() + self.unknown_pod_wait
        while not self.config_loaded or self._pod_for(attachment) is None:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation that
            # arrives as the awaited event fires, and the task would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._config_event.wait()

    async def _add(self, attachment: PodAttachment) -> AgentReply:
        where = f"pod {attachment.namespace}/{attachment.name}"
        if not attachment.netns:
            return AgentReply(Outcome.ERROR, f"{where}: the runtime gave no network namespace path")
        await self._wait_for_pod(attachment)
        async with self._lock:
            cid = attachment.container_id
            previous = self.known.get(cid)
            if previous is not None and previous != attachment and cid in self.captured:
                # The same container ID with another sandbox: whatever was captured belongs to the old one.
                await self._forget(cid, "its sandbox was replaced")
            self.known[cid] = attachment
            self._persist()
            known_pod = self._pod_for(attachment) is not None
            # The runtime asked again: a pending pod is retried now, not after its backoff.
            result = await self._reconcile_pod(cid, force_retry=True)
            await self._after_change()
        if result.state is PodState.ENROLLED:
            log.info("enrolled %s (%s)", where, result.message)
            return AgentReply(Outcome.ENROLLED, result.message)
        if result.state is PodState.PENDING:
            return AgentReply(
                Outcome.ERROR, f"{where}: redirection installed but {result.message}", retry=True
            )
        if result.state is PodState.FAILED:
            return AgentReply(Outcome.ERROR, f"{where}: {result.message}", retry=True)
        if not known_pod:
            return AgentReply(
                Outcome.ERROR, f"{where} is not known to the node agent yet ({result.message})", retry=True
            )
        if cid not in self.known:  # forgotten: the namespace it named does not exist
            return AgentReply(Outcome.ERROR, f"{where}: {result.message}")
        log.info("not enrolling: %s", result.message)
        return AgentReply(Outcome.NOT_ENROLLED, result.message)

    async def _check(self, attachment: PodAttachment) -> AgentReply:
        where = f"pod {attachment.namespace}/{attachment.name}"
        cid = attachment.container_id
        captured = self.captured.get(cid)
        should = self._decide(attachment).enrolled
        if captured is None:
            if should:
                return AgentReply(Outcome.ERROR, f"{where} should be enrolled but is not captured")
            return AgentReply(Outcome.NOT_ENROLLED, "")
        try:
            problems = await self.backend.verify(captured.attachment.netns)
        except RedirectionError as exc:
            return AgentReply(Outcome.ERROR, f"{where}: {exc}")
        if problems:
            return AgentReply(Outcome.ERROR, f"{where}: redirection incomplete: " + "; ".join(problems))
        if captured.uid not in self.zds.pods:
            return AgentReply(Outcome.ERROR, f"{where} is not registered with ztunnel")
        if cid not in self.acked:
            return AgentReply(Outcome.ERROR, f"{where}: no ztunnel has acknowledged it yet", retry=True)
        return AgentReply(Outcome.ENROLLED, "")

    # -- reconcile ----------------------------------------------------------------------------------

    async def reconcile(self) -> str:
        """One pass over every known pod (see the module docstring); the result for the metrics:
        "ok", "pending" (some pod waits for ztunnel) or "error" (a step failed and is retried)."""
        async with self._lock:
            self._apply_snapshot_results()
            if not self.config_loaded:
                return "ok"
            exists = await asyncio.to_thread(self._sandboxes_exist)
            failed: set[str] = set()
            for action in plan(self._view(cid, exists[cid]) for cid in list(self.known)):
                result = await self._execute(action)
                if result.state is PodState.FAILED:
                    failed.add(action.container_id)
            host_ok = await self._after_change()
            # Backoff state only for what is still to be retried: a due entry that no step would act on
            # would otherwise wake the loop for nothing, again and again.
            self._retry.keep_only(failed | self.pending | (set() if host_ok else {_HOST_RULES}))
            outcome = "error" if failed or not host_ok else ("pending" if self.pending else "ok")
            self.metrics.reconciled(outcome)
            return outcome

    def _sandboxes_exist(self) -> dict[str, bool]:
        return {cid: bool(a.netns) and os.path.exists(a.netns) for cid, a in self.known.items()}

    async def _reconcile_pod(self, cid: str, *, force_retry: bool = False) -> PodResult:
        netns = self.known[cid].netns
        exists = bool(netns) and await asyncio.to_thread(os.path.exists, netns)
        action = plan_pod(self._view(cid, exists, force_retry=force_retry))
        if action is None:
            return self._result_now(cid)
        return await self._execute(action)

    async def _execute(self, action: Action) -> PodResult:
        cid = action.container_id
        if action.kind is ActionKind.CAPTURE:
            return await self._capture(cid, action.reason)
        if action.kind is ActionKind.RETRY:
            return await self._offer(cid)
        if action.kind is ActionKind.RELEASE:
            return await self._release(cid, action.reason, forced=False)
        await self._forget(cid, action.reason)
        return PodResult(PodState.NOT_ENROLLED, action.reason)

    async def _to_ztunnel(self, pod: CapturedPod) -> tuple[bool, str]:
        """Offer the pod to ztunnel: (acknowledged, why not). The ZDS server records the pod for future
        snapshots either way."""
        try:
            error = await self.zds.add(pod.uid, pod.info, pod.attachment.netns)
        except ZtunnelUnavailable as exc:
            return False, f"no ztunnel took it yet ({exc})"
        if error:
            return False, f"ztunnel rejected it: {error}"
        return True, ""

    def _record_ack(self, cid: str, acked: bool) -> None:
        if acked:
            self.acked.add(cid)
            self._retry.succeeded(cid)
        else:
            self.acked.discard(cid)
            self._retry.failed(cid, self._clock())

    async def _capture(self, cid: str, reason: str) -> PodResult:
        attachment = self.known[cid]
        where = f"pod {attachment.namespace}/{attachment.name}"
        pod = self._pod_for(attachment)
        if pod is None:  # the plan only captures pods the configuration wants; it changed meanwhile
            return PodResult(PodState.NOT_ENROLLED, f"{where} is not in the configuration")
        captured = CapturedPod(pod_uid(attachment, pod), attachment, pod.spec.service_account)
        offered = self.zds.ready
        acked, why = await self._to_ztunnel(captured) if offered else (False, "")
        try:
            await self.backend.apply(attachment.netns)
        except RedirectionError as exc:
            if offered:
                for problem in await self.zds.delete(captured.uid):
                    log.warning("withdrawing %s from ztunnel: %s", where, problem)
            else:
                self.zds.pods.pop(captured.uid, None)
            self._retry.failed(cid, self._clock())
            log.error("cannot capture %s: %s", where, exc)
            return PodResult(PodState.FAILED, str(exc))
        # From here on the pod is captured (fail closed); remember it so DEL/release remove the rules.
        self.captured[cid] = captured
        self._note("captured", attachment)
        if not offered:
            acked, why = await self._to_ztunnel(captured)
        self._record_ack(cid, acked)
        self._persist()
        if acked:
            self._note("enrolled", attachment)
            log.info("captured %s (%s)", where, reason)
            return PodResult(PodState.ENROLLED, reason)
        log.warning("captured %s, pending: %s", where, why)
        return PodResult(PodState.PENDING, why)

    async def _offer(self, cid: str) -> PodResult:
        pod = self.captured[cid]
        acked, why = await self._to_ztunnel(pod)
        self._record_ack(cid, acked)
        self._persist()
        if acked:
            self._note("enrolled", pod.attachment)
            log.info("ztunnel took over pending pod %s/%s", pod.attachment.namespace, pod.attachment.name)
            return PodResult(PodState.ENROLLED, "")
        return PodResult(PodState.PENDING, why)

    async def _release(self, cid: str, reason: str, *, forced: bool) -> PodResult:
        """Rules out first, then `del` to every ztunnel (see the module docstring). Not `forced`: a live
        pod whose rules cannot be removed stays captured (and served) and is retried."""
        pod = self.captured[cid]
        where = f"pod {pod.attachment.namespace}/{pod.attachment.name}"
        problems: list[str] = []
        if pod.attachment.netns:  # the backend treats a namespace that no longer exists as nothing to remove
            try:
                await self.backend.remove(pod.attachment.netns)
            except RedirectionError as exc:
                if not forced:
                    self._retry.failed(cid, self._clock())
                    log.error("cannot release %s (retrying): %s", where, exc)
                    return PodResult(PodState.FAILED, str(exc))
                problems.append(str(exc))
        del self.captured[cid]
        self.acked.discard(cid)
        self._retry.forget(cid)
        self._persist()
        problems += await self.zds.delete(pod.uid)
        for problem in problems:
            log.warning("releasing %s: %s", where, problem)
        self._note("released", pod.attachment)
        log.info("released %s (%s)", where, reason)
        return PodResult(PodState.NOT_ENROLLED, reason)

    async def _forget(self, cid: str, reason: str) -> None:
        if cid in self.captured:
            await self._release(cid, reason, forced=True)
        attachment = self.known.pop(cid, None)
        self._retry.forget(cid)
        if attachment is not None:
            self._note("forgotten", attachment)
            self._persist()

    # -- node side ----------------------------------------------------------------------------------

    def _pod_ips(self) -> set[IPAddress]:
        ips: set[IPAddress] = set()
        for pod in self.captured.values():
            if pod.attachment.ips:
                ips.update(pod.attachment.ips)
                continue
            configured = self.directory.pod(pod.attachment.namespace, pod.attachment.name)
            for text in configured.ips if configured is not None else ():
                with contextlib.suppress(ValueError):
                    ips.add(ipaddress.ip_address(text))
        return ips

    async def _sync_host_rules(self, *, force: bool = False) -> bool:
        if self.host_rules is None:
            return True
        if not force and not self._retry.due(_HOST_RULES, self._clock()):
            return False
        try:
            await self.host_rules.sync(self._pod_ips(), force=force)
        except RedirectionError as exc:
            due = self._retry.failed(_HOST_RULES, self._clock())
            log.error("%s (retrying in %.1fs)", exc, max(0.0, due - self._clock()))
            return False
        self._retry.succeeded(_HOST_RULES)
        return True

    def _desired_annotations(self) -> tuple[dict[PodRef, str | None], dict[PodRef, str | None]]:
        desired: dict[PodRef, str | None] = {}
        observed: dict[PodRef, str | None] = {}
        rank = {None: 0, "pending": 1, "enabled": 2}
        for cid, attachment in self.known.items():
            pod = self._pod_for(attachment)
            if pod is None:
                continue
            ref = (attachment.namespace, attachment.name)
            value = redirection_value(cid in self.captured, cid in self.acked)
            # Two attachments of one pod (an old sandbox not yet deleted): the more enrolled one wins.
            if ref not in desired or rank.get(value, 0) > rank.get(desired[ref], 0):
                desired[ref] = value
            observed[ref] = pod.meta.annotations.get(ANNOTATION_REDIRECTION)
        if self.node:
            # A pod of this node the agent does not know (state lost, or a crash before the release
            # finished) must not keep claiming to be captured.
            for pod in self.directory.pods():
                ref = (pod.namespace, pod.meta.name)
                current = pod.meta.annotations.get(ANNOTATION_REDIRECTION)
                if pod.spec.node_name == self.node and ref not in desired and current is not None:
                    desired[ref] = None
                    observed[ref] = current
        return desired, observed

    def _update_metrics(self) -> None:
        enrolled = len(self.acked & set(self.captured))
        self.metrics.set_pods(enrolled, len(self.captured) - enrolled)

    async def _after_change(self) -> bool:
        """Bring the node side in line with `captured`; False when the host rules could not be written."""
        ok = await self._sync_host_rules()
        if self.annotations is not None and self.config_loaded:
            self.annotations.update(*self._desired_annotations())
        self._update_metrics()
        return ok

    # -- loop ---------------------------------------------------------------------------------------

    def _next_wake_in(self) -> float:
        delay = self.resync_interval
        next_due = self._retry.next_due()
        if next_due is not None:
            delay = min(delay, next_due - self._clock())
        return max(0.0, delay)

    async def run(self) -> None:
        """Reconcile on every change, retry and resync, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see _wait_for_pod
                async with asyncio.timeout(self._next_wake_in()):
                    await self._wake.wait()
            self._wake.clear()
            if not self.config_loaded:
                continue
            try:
                await self.reconcile()
            except Exception:  # a bug in one pass must not end reconciling for the node
                log.exception("reconcile pass failed")
                self.metrics.reconciled("error")
                await asyncio.sleep(1.0)
