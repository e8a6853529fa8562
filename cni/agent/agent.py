"""The NodeAgent: answers the CNI plugin's events by capturing pods and handing them to ztunnel.

Theory of operation
-------------------
The agent knows the pods of its node and their namespaces through a `PodDirectory` (the controller's
configuration or a Kubernetes watch feeds it; tests fill an in-memory one). For each plugin request:

* ``add``: decide enrolment (`cni.agent.enrolment`). Not enrolled -> ``not-enrolled``. Enrolled ->
  install the redirection in the pod's netns FIRST (so even if the rest fails, the pod's traffic goes
  to ports where only ztunnel listens: fail closed), then send `add` with the netns fd to ztunnel and
  wait for the ack; only then answer ``enrolled``. Without a ready ztunnel, or when ztunnel rejects the
  pod, answer ``error`` with retry=true: the runtime retries and the pod never starts uncaptured.
* ``del``: send `del` to every ztunnel, remove the redirection (if the namespace still exists), forget.
* ``check``: an enrolled pod must have its redirection verifiably in place and be known to ztunnel.
* ``status``: ``done`` once a ztunnel is ready, else retry. ``gc``: drop pods whose attachment is gone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from cni.agent.enrolment import decide_enrolment
from cni.agent.redirect import RedirectionBackend, RedirectionError
from cni.agent.zds_server import ZdsPod, ZdsServer, ZtunnelUnavailable
from cni.events import AgentReply, AgentRequest, Outcome, PodAttachment, RequestKind
from loom.resources.model import Namespace, Pod
from ztunnel.inpod.protocol import WorkloadInfo

log = logging.getLogger(__name__)


class PodDirectory(Protocol):
    """What the agent knows about the cluster: pods and namespaces by name."""

    def pod(self, namespace: str, name: str) -> Pod | None: ...

    def namespace(self, name: str) -> Namespace | None: ...


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

    def pod(self, namespace: str, name: str) -> Pod | None:
        return self._pods.get((namespace, name))

    def namespace(self, name: str) -> Namespace | None:
        return self._namespaces.get(name)


@dataclass(frozen=True, slots=True)
class CapturedPod:
    uid: str
    attachment: PodAttachment
    service_account: str = "default"

    @property
    def info(self) -> WorkloadInfo:
        return WorkloadInfo(self.attachment.name, self.attachment.namespace, self.service_account)


class CapturedStore:
    """The captured pods, persisted so that a restarted agent gives ztunnel the same snapshot.

    Without it a restarted agent would send an empty snapshot and ztunnel would drain every proxy: the
    pods' rules stay (traffic fails closed) but their traffic stops. Written atomically (temp file +
    rename) after every change; a missing or unreadable file is an empty set, reported in the log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, CapturedPod]:
        try:
            raw = json.loads(self.path.read_text())
            pods: dict[str, CapturedPod] = {}
            for entry in raw["pods"]:
                attachment = dict(entry["attachment"])
                attachment["ips"] = tuple(ipaddress.ip_address(ip) for ip in attachment.get("ips", ()))
                pods[entry["attachment"]["container_id"]] = CapturedPod(
                    entry["uid"], PodAttachment(**attachment), entry.get("service_account", "default")
                )
            return pods
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("captured-pod state %s is unreadable (%s); starting without it", self.path, exc)
            return {}

    def save(self, captured: Mapping[str, CapturedPod]) -> None:
        pods = []
        for pod in captured.values():
            attachment = asdict(pod.attachment)
            attachment["ips"] = [str(ip) for ip in pod.attachment.ips]
            pods.append({"uid": pod.uid, "service_account": pod.service_account, "attachment": attachment})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"pods": pods}, indent=1))
        os.replace(tmp, self.path)


def pod_uid(attachment: PodAttachment, pod: Pod) -> str:
    """The ZDS uid: the Kubernetes UID when known, otherwise a stable namespace/name key."""
    return attachment.uid or pod.meta.uid or f"{attachment.namespace}/{attachment.name}"


class NodeAgent:
    """See the module docstring. `handle` is the `cni.events.serve_plugin_events` handler."""

    def __init__(
        self,
        directory: PodDirectory,
        backend: RedirectionBackend,
        zds: ZdsServer,
        store: CapturedStore | None = None,
    ) -> None:
        self.directory = directory
        self.backend = backend
        self.zds = zds
        self.store = store
        self.captured: dict[str, CapturedPod] = {}  # by container ID
        self._lock = asyncio.Lock()  # one pod event at a time: enrolment steps must not interleave

    async def restore(self) -> int:
        """Take back the pods captured before a restart; call before the ZDS server starts listening.

        A pod whose network namespace still exists keeps its rules (re-applied if they drifted) and is
        listed in ztunnel's snapshot with its netns, so ztunnel keeps that proxy (same netns inode: a
        no-op); a pod whose namespace is gone was deleted while the agent was down and is dropped."""
        if self.store is None:
            return 0
        for container_id, pod in self.store.load().items():
            netns = pod.attachment.netns
            if not netns or not await asyncio.to_thread(os.path.exists, netns):
                log.info("dropping %s/%s: its sandbox is gone", pod.attachment.namespace, pod.attachment.name)
                continue
            try:
                if await self.backend.verify(netns):
                    await self.backend.apply(netns)
            except RedirectionError as exc:
                log.error("restoring %s/%s: %s", pod.attachment.namespace, pod.attachment.name, exc)
            self.captured[container_id] = pod
            self.zds.pods[pod.uid] = ZdsPod(pod.uid, pod.info, netns)
        self._persist()
        return len(self.captured)

    def _persist(self) -> None:
        if self.store is not None:
            try:
                self.store.save(self.captured)
            except OSError as exc:  # losing the state file only costs a restart's snapshot
                log.error("cannot save captured-pod state to %s: %s", self.store.path, exc)

    async def handle(self, request: AgentRequest) -> AgentReply:
        async with self._lock:
            if request.kind is RequestKind.STATUS:
                if self.zds.ready:
                    return AgentReply(Outcome.DONE, "ztunnel connected")
                return AgentReply(Outcome.ERROR, "no ztunnel connection yet", retry=True)
            if request.kind is RequestKind.GC:
                valid = {a.container_id for a in request.valid_attachments}
                for container_id in [c for c in self.captured if c not in valid]:
                    await self._release(self.captured.pop(container_id))
                return AgentReply(Outcome.DONE, "")
            assert request.pod is not None  # AgentRequest guarantees a pod for add/del/check
            if request.kind is RequestKind.ADD:
                return await self._add(request.pod)
            if request.kind is RequestKind.DEL:
                return await self._delete(request.pod)
            return await self._check(request.pod)

    async def _add(self, attachment: PodAttachment) -> AgentReply:
        where = f"pod {attachment.namespace}/{attachment.name}"
        pod = self.directory.pod(attachment.namespace, attachment.name)
        if pod is None:
            return AgentReply(Outcome.ERROR, f"{where} is not known to the node agent yet", retry=True)
        decision = decide_enrolment(pod, self.directory.namespace(attachment.namespace))
        if not decision.enrolled:
            log.info("not enrolling: %s", decision.reason)
            return AgentReply(Outcome.NOT_ENROLLED, decision.reason)
        if not attachment.netns:
            return AgentReply(Outcome.ERROR, f"{where}: the runtime gave no network namespace path")
        uid = pod_uid(attachment, pod)
        try:
            await self.backend.apply(attachment.netns)
        except RedirectionError as exc:
            return AgentReply(Outcome.ERROR, f"{where}: {exc}", retry=True)
        # From here on the pod is captured (fail closed); remember it so DEL/GC remove the rules.
        captured = CapturedPod(uid, attachment, pod.spec.service_account)
        self.captured[attachment.container_id] = captured
        self._persist()
        try:
            error = await self.zds.add(uid, captured.info, attachment.netns)
        except ZtunnelUnavailable as exc:
            return AgentReply(Outcome.ERROR, f"{where}: redirection installed but {exc}", retry=True)
        if error:
            return AgentReply(Outcome.ERROR, f"{where}: ztunnel rejected the pod: {error}", retry=True)
        log.info("enrolled %s (%s)", where, decision.reason)
        return AgentReply(Outcome.ENROLLED, decision.reason)

    async def _release(self, captured: CapturedPod) -> list[str]:
        self._persist()  # the caller already removed it from `captured`
        problems = list(await self.zds.delete(captured.uid))
        netns = captured.attachment.netns
        if netns:  # the backend treats a namespace that no longer exists as nothing to remove
            try:
                await self.backend.remove(netns)
            except RedirectionError as exc:
                problems.append(str(exc))
        return problems

    async def _delete(self, attachment: PodAttachment) -> AgentReply:
        captured = self.captured.pop(attachment.container_id, None)
        if captured is None:
            return AgentReply(Outcome.DONE, "pod was not captured")
        # DEL must succeed for the runtime to free the sandbox; problems are logged, not returned.
        for problem in await self._release(captured):
            log.warning("releasing pod %s/%s: %s", attachment.namespace, attachment.name, problem)
        return AgentReply(Outcome.DONE, "released")

    async def _check(self, attachment: PodAttachment) -> AgentReply:
        where = f"pod {attachment.namespace}/{attachment.name}"
        captured = self.captured.get(attachment.container_id)
        pod = self.directory.pod(attachment.namespace, attachment.name)
        should = (
            pod is not None and decide_enrolment(pod, self.directory.namespace(attachment.namespace)).enrolled
        )
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
        return AgentReply(Outcome.ENROLLED, "")
