"""The incremental Translator gives what a full translation gives, and reuses what did not change."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.translate import Translator, translate
from controller.translate.context import TranslationContext
from controller.translate.workloads import PodTranslation, translate_pod
from loom.resources.model import (
    ConfigSnapshot,
    Deployment,
    ObjectMeta,
    Pod,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    Resource,
    ResourceKey,
    ServicePort,
)

from .builders import AMBIENT, MESH, authz, namespace, peer_auth, pod, service, waypoint, workload_of

USE = "istio.io/use-waypoint"

BASE: list[Resource] = [
    namespace("default", {**AMBIENT, USE: "waypoint"}),
    namespace("other"),
    namespace("istio-system"),
    waypoint("waypoint", waypoint_for="all"),
    waypoint("sa1-wp", for_sa="sa1"),
    waypoint("wl", "other", waypoint_for="workload"),
    service("s-a", selector={"app": "a"}, ports=(ServicePort(80, name="http", target_port="web"),)),
    service("s-b", selector={"app": "b"}, cluster_ips=("172.16.0.2",)),
    service("s-ab", selector={"tier": "x"}, cluster_ips=("172.16.0.3",)),
    service("s-a", "other", selector={"app": "a"}, cluster_ips=("172.16.0.4",)),
    authz(
        "allow-a",
        selector={"app": "a"},
        rules=(PolicyRule(sources=(PolicySource(namespaces=("default",)),)),),
    ),
    authz("deny-web", action="DENY", rules=(PolicyRule(operations=(PolicyOperation(ports=("8080",)),)),)),
    authz("root", "istio-system", selector={"app": "b"}, rules=(PolicyRule(),)),
    peer_auth("strict", mode="STRICT"),
    peer_auth("b-open", selector={"app": "b"}, ports={9090: "PERMISSIVE"}),
]

pod_names = st.sampled_from([f"p{i}" for i in range(8)])
pods = st.builds(
    lambda name, ns, app, tier, use, sa, ips, phase, ready, ports: pod(
        name,
        ns,
        labels={k: v for k, v in (("app", app), ("tier", tier), (USE, use)) if v},
        sa=sa,
        ips=ips,
        phase=phase,
        ready=ready,
        ports=ports,
    ),
    pod_names,
    st.sampled_from(["default", "default", "other"]),
    st.sampled_from(["a", "b", "c", ""]),
    st.sampled_from(["x", ""]),
    st.sampled_from(["", "", "", "none", "waypoint", "ghost"]),
    st.sampled_from(["default", "sa1", "sa1", "sa2"]),
    st.sampled_from([("10.0.0.1",), ("10.0.0.2", "fd00::2"), (), ("bogus",)]),
    st.sampled_from(["Running", "Running", "Pending", "Failed"]),
    st.booleans(),
    st.sampled_from([{}, {"web": 9080}, {"web": 7070}]),
)
# ("upsert", a Pod) or ("delete", the key of a Pod)
operations: st.SearchStrategy[tuple[str, Pod | ResourceKey]] = st.one_of(
    pods.map(lambda p: ("upsert", p)),
    st.builds(
        lambda name, ns: ("delete", ResourceKey("Pod", ns, name)),
        pod_names,
        st.sampled_from(["default", "other"]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    initial=st.lists(pods, max_size=6),
    steps=st.lists(operations, min_size=1, max_size=12),
    hint=st.booleans(),
)
def test_incremental_equals_full_after_random_pod_changes(
    initial: list[Pod], steps: list[tuple[str, Pod | ResourceKey]], hint: bool
) -> None:
    snapshot = ConfigSnapshot.of([*BASE, *initial])
    translator = Translator(MESH)
    assert translator.update(snapshot) == translate(snapshot, MESH)
    for operation, target in steps:
        if isinstance(target, Pod):
            changed = {target.key}
            following = snapshot.with_changes(upserts=[target])
        else:
            changed = {target}
            following = snapshot.with_changes(deletes=(target,))
        previous = translator.translation
        result = translator.update(following, changed if hint else None)
        assert result == translate(following, MESH), operation
        assert previous is not None
        assert result.authorizations is previous.authorizations  # only pods changed
        snapshot = following


def bookinfo_like() -> ConfigSnapshot:
    objects = [
        *BASE,
        *(
            pod(f"a{i}", labels={"app": "a"}, sa="sa1", ips=(f"10.0.1.{i}",), ports={"web": 9080})
            for i in range(5)
        ),
        *(pod(f"b{i}", labels={"app": "b"}, ips=(f"10.0.2.{i}",)) for i in range(5)),
    ]
    return ConfigSnapshot.of(objects)


def test_a_pod_change_reuses_every_other_output_object() -> None:
    snapshot = bookinfo_like()
    translator = Translator(MESH)
    first = translator.update(snapshot)
    changed = pod("b0", labels={"app": "b"}, ips=("10.0.2.0",), ready=False)
    second = translator.update(snapshot.with_changes(upserts=[changed]))
    assert workload_of(second, "b0").status != workload_of(first, "b0").status
    # Unchanged resources are the very same serialized bytes (what lets the xDS layer skip them).
    before, after = first.serialized_addresses, second.serialized_addresses
    reused = [name for name in after if name in before and after.serialized(name) is before.serialized(name)]
    assert sorted(set(second.addresses) - set(reused)) == [f"{MESH.cluster_id}//Pod/default/b0"]
    assert second.authorizations is first.authorizations
    assert dict(first.addresses) != dict(second.addresses)  # the first Translation was not modified


def test_a_pod_change_updates_the_per_service_account_binding_of_its_services() -> None:
    snapshot = bookinfo_like()
    translator = Translator(MESH)
    host = "default/s-a.default.svc.cluster.local"
    first = translator.update(snapshot)
    assert first.addresses[host].service.waypoint.hostname.hostname == "sa1-wp.default.svc.cluster.local"
    # A pod of another account joins: the service is mixed, falls back to the namespace waypoint.
    intruder = pod("a9", labels={"app": "a"}, sa="sa2", ips=("10.0.1.9",))
    mixed = translator.update(snapshot.with_changes(upserts=[intruder]))
    assert mixed.addresses[host].service.waypoint.hostname.hostname == "waypoint.default.svc.cluster.local"
    assert [d.key.name for d in mixed.diagnostics if d.key is not None and d.key.kind == "Service"] == ["s-a"]
    # It leaves again: back to the per-service-account waypoint, without the warning.
    back = translator.update(snapshot)
    assert back == first
    assert back.addresses[host].service.waypoint.hostname.hostname == "sa1-wp.default.svc.cluster.local"


def test_kinds_translation_does_not_read_return_the_previous_translation() -> None:
    snapshot = bookinfo_like()
    translator = Translator(MESH)
    first = translator.update(snapshot)
    deployment = Deployment(meta=ObjectMeta(name="d", namespace="default"), replicas=3)
    assert translator.update(snapshot.with_changes(upserts=[deployment])) is first
    assert translator.update(snapshot.with_changes(upserts=[deployment]), changed=()) is first


@pytest.mark.parametrize(
    "change",
    [
        namespace("default"),
        waypoint("sa1-wp", for_sa="sa2"),
        service("s-b", selector={"app": "a"}),
        authz("allow-a", selector={"app": "b"}, rules=(PolicyRule(),)),
        peer_auth("strict", mode="PERMISSIVE"),
    ],
    ids=["namespace", "gateway", "service", "authorization policy", "peer authentication"],
)
def test_other_kinds_translate_in_full(change: Resource) -> None:
    snapshot = bookinfo_like()
    translator = Translator(MESH)
    translator.update(snapshot)
    following = snapshot.with_changes(upserts=[change])
    assert translator.update(following) == translate(following, MESH)


def test_an_internal_error_on_one_pod_leaves_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    def flaky(p: Pod, ctx: TranslationContext) -> PodTranslation:
        if p.name == "b1":
            raise ValueError("unexpected")
        return translate_pod(p, ctx)

    monkeypatch.setattr("controller.translate.translator.translate_pod", flaky)
    translation = translate(bookinfo_like(), MESH)
    assert f"{MESH.cluster_id}//Pod/default/b1" not in translation.addresses
    assert f"{MESH.cluster_id}//Pod/default/b2" in translation.addresses
    [error] = [d for d in translation.diagnostics if d.is_error]
    assert error.key == ResourceKey("Pod", "default", "b1") and "ValueError: unexpected" in error.message


def test_translation_is_deterministic() -> None:
    objects = list(bookinfo_like().values())
    assert translate(ConfigSnapshot.of(objects), MESH) == translate(ConfigSnapshot.of(objects[::-1]), MESH)
    assert dataclasses.asdict(MESH)["require_redirection_annotation"] is False
