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
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from cni.agent.enrolment import decide_enrolment
from cni.agent.redirect import RedirectionBackend, RedirectionError
from cni.agent.zds_server import ZdsServer, ZtunnelUnavailable
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


def pod_uid(attachment: PodAttachment, pod: Pod) -> str:
    """The ZDS uid: the Kubernetes UID when known, otherwise a stable namespace/name key."""
    return attachment.uid or pod.meta.uid or f"{attachment.namespace}/{attachment.name}"


class NodeAgent:
    """See the module docstring. `handle` is the `cni.events.serve_plugin_events` handler."""

    def __init__(self, directory: PodDirectory, backend: RedirectionBackend, zds: ZdsServer) -> None:
        self.directory = directory
        self.backend = backend
        self.zds = zds
        self.captured: dict[str, CapturedPod] = {}  # by container ID
        self._lock = asyncio.Lock()  # one pod event at a time: enrolment steps must not interleave

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
        self.captured[attachment.container_id] = CapturedPod(uid, attachment)
        info = WorkloadInfo(attachment.name, attachment.namespace, pod.spec.service_account)
        try:
            error = await self.zds.add(uid, info, attachment.netns)
        except ZtunnelUnavailable as exc:
            return AgentReply(Outcome.ERROR, f"{where}: redirection installed but {exc}", retry=True)
        if error:
            return AgentReply(Outcome.ERROR, f"{where}: ztunnel rejected the pod: {error}", retry=True)
        log.info("enrolled %s (%s)", where, decision.reason)
        return AgentReply(Outcome.ENROLLED, decision.reason)

    async def _release(self, captured: CapturedPod) -> list[str]:
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
