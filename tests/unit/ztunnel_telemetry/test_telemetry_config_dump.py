"""The /config_dump document (pure): the shape `istioctl ztunnel-config` reads, section by section."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from telemetry_builders import (
    deny_from_namespace,
    service,
    service_key,
    state_with,
    strict_mtls,
    uid,
    waypoint_ref,
    workload,
)

from loom.api import authorization_pb2, workload_pb2
from loom.identity import Identity
from ztunnel.admin import (
    AdminSources,
    DumpError,
    WorkloadRuntimeState,
    config_dump,
    match_json,
    workload_states_from_inpod,
)
from ztunnel.connections import CloseReason, ConnectionInfo, ConnectionRegistry, Direction, Transport
from ztunnel.identity import CertificateInfo, CertificateStatus, CertState

pytestmark = pytest.mark.timeout(30)

WAYPOINT_VIP = "10.96.0.99"


def make_sources(**overrides: object) -> AdminSources:
    state = state_with(
        workload(
            "reviews-v1-abc",
            "10.244.1.20",
            service_account="bookinfo-reviews",
            canonical=("reviews", "v1"),
            workload_name="reviews-v1",
            services={"reviews": [(9080, 9080)]},
            waypoint=waypoint_ref("waypoint"),
            policies=["default/allow-curl"],
        ),
        workload(
            "reviews-v2-def",
            "10.244.2.21",
            node="node-b",
            healthy=False,
            services={"reviews": [(9080, 9080)]},
        ),
        workload("legacy", "10.244.3.5", namespace="legacy", hbone=False, node="node-b"),
        workload("waypoint-xyz", "10.244.1.99", native_tunnel=True, services={"waypoint": [(15008, 15008)]}),
        service("reviews", "10.96.0.10", ports=[(9080, 9080)], waypoint=waypoint_ref("waypoint")),
        service("waypoint", WAYPOINT_VIP, ports=[(15008, 15008)]),
    )
    allow = authorization_pb2.Authorization(
        name="allow-curl",
        namespace="default",
        scope=authorization_pb2.WORKLOAD_SELECTOR,
        action=authorization_pb2.ALLOW,
    )
    match = allow.groups.add().rules.add().matches.add()
    match.principals.add(exact="cluster.local/ns/default/sa/curl")
    match.principals.add(prefix="cluster.local/ns/test/")
    policies = [allow, deny_from_namespace("deny-legacy", "default", "legacy"), strict_mtls("legacy")]
    state.apply_authorizations({f"{p.namespace}/{p.name}": p for p in policies})
    # A resource the proxy refuses: shown under "rejected".
    bad = workload("broken", "10.244.9.9").workload
    bad.uid = "not-the-name"
    state.apply_addresses({uid("broken"): workload_pb2.Address(workload=bad)})
    fields: dict[str, object] = {"state": state, "authorizations": lambda: policies}
    fields.update(overrides)
    return AdminSources(**fields)  # type: ignore[arg-type]


def test_workloads_section() -> None:
    dump = config_dump(make_sources())
    workloads = {w["name"]: w for w in dump["workloads"]}
    assert [w["uid"] for w in dump["workloads"]] == sorted(w["uid"] for w in dump["workloads"])
    assert workloads["reviews-v1-abc"] == {
        "workloadIps": ["10.244.1.20"],
        "waypoint": {"destination": "default/waypoint.default.svc.cluster.local", "port": 15008},
        "protocol": "HBONE",
        "uid": "Kubernetes//Pod/default/reviews-v1-abc",
        "name": "reviews-v1-abc",
        "namespace": "default",
        "trustDomain": "cluster.local",
        "serviceAccount": "bookinfo-reviews",
        "workloadName": "reviews-v1",
        "workloadType": "deployment",
        "canonicalName": "reviews",
        "canonicalRevision": "v1",
        "network": "",
        "node": "node-a",
        "nativeTunnel": False,
        "status": "Healthy",
        "clusterId": "Kubernetes",
        "services": {"default/reviews.default.svc.cluster.local": {"9080": 9080}},
        "authorizationPolicies": ["default/allow-curl"],
        "capacity": 1,
    }
    legacy = workloads["legacy"]
    assert (legacy["protocol"], legacy["serviceAccount"], "waypoint" in legacy) == ("TCP", "default", False)
    assert workloads["reviews-v2-def"]["status"] == "Unhealthy"
    assert workloads["waypoint-xyz"]["nativeTunnel"] is True


def test_services_section() -> None:
    services = {s["name"]: s for s in config_dump(make_sources())["services"]}
    key = service_key("reviews")
    assert services["reviews"] == {
        "name": "reviews",
        "namespace": "default",
        "hostname": "reviews.default.svc.cluster.local",
        "vips": ["/10.96.0.10"],
        "ports": {"9080": 9080},
        "endpoints": {
            uid("reviews-v1-abc"): {
                "workloadUid": uid("reviews-v1-abc"),
                "service": key,
                "port": {"9080": 9080},
            },
            uid("reviews-v2-def"): {
                "workloadUid": uid("reviews-v2-def"),
                "service": key,
                "port": {"9080": 9080},
            },
        },
        "subjectAltNames": [],
        "ipFamilies": "AUTOMATIC",
        "waypoint": {"destination": "default/waypoint.default.svc.cluster.local", "port": 15008},
    }
    assert "waypoint" not in services["waypoint"]


def test_policies_section_has_readable_rules() -> None:
    policies = config_dump(make_sources())["policies"]
    assert [(p["namespace"], p["name"]) for p in policies] == [
        ("default", "allow-curl"),
        ("default", "deny-legacy"),
        ("legacy", "istio_converted_static_strict"),
    ]
    assert policies[0] == {
        "name": "allow-curl",
        "namespace": "default",
        "scope": "WorkloadSelector",
        "action": "Allow",
        "rules": [[[{"principals": ["cluster.local/ns/default/sa/curl", "cluster.local/ns/test/*"]}]]],
    }
    assert (policies[1]["scope"], policies[1]["action"]) == ("Namespace", "Deny")
    assert policies[2]["rules"] == [[[{"notPrincipals": ["*"]}]]]


def test_match_json_renders_every_field_kind() -> None:
    match = authorization_pb2.Match(
        namespaces=[authorization_pb2.StringMatch(suffix="-prod")],
        not_namespaces=[authorization_pb2.StringMatch(exact="kube-system")],
        service_accounts=[authorization_pb2.ServiceAccountMatch(namespace="default", serviceAccount="curl")],
        not_service_accounts=[authorization_pb2.ServiceAccountMatch(namespace="x", serviceAccount="y")],
        source_ips=[authorization_pb2.Address(address=ipaddress.ip_address("10.0.0.0").packed, length=8)],
        not_source_ips=[authorization_pb2.Address(address=ipaddress.ip_address("fd00::").packed, length=16)],
        destination_ips=[authorization_pb2.Address(address=b"\x01\x02", length=8)],
        destination_ports=[80, 443],
        not_destination_ports=[15000],
    )
    assert match_json(match) == {
        "namespaces": ["*-prod"],
        "notNamespaces": ["kube-system"],
        "serviceAccounts": ["default/curl"],
        "notServiceAccounts": ["x/y"],
        "sourceIps": ["10.0.0.0/8"],
        "notSourceIps": ["fd00::/16"],
        "destinationIps": ["(invalid address 0102)/8"],
        "destinationPorts": [80, 443],
        "notDestinationPorts": [15000],
    }


def test_rejected_resources_are_listed() -> None:
    dump = config_dump(make_sources())
    assert list(dump["rejected"]) == [uid("broken")]
    assert "differs from the resource name" in dump["rejected"][uid("broken")]


@dataclass(frozen=True)
class FakeCertificates:
    statuses: Sequence[CertificateStatus]

    def snapshot(self) -> Sequence[CertificateStatus]:
        return self.statuses


def test_certificates_section_is_the_managers_dump() -> None:
    when = dt.datetime(2024, 5, 4, 9, 0, tzinfo=dt.UTC)
    info = CertificateInfo("PEM", "1f", when, when + dt.timedelta(hours=24))
    statuses = [
        CertificateStatus(
            Identity("cluster.local", "default", "curl"), CertState.AVAILABLE, "", (info,), (info,), None
        ),
        CertificateStatus(
            Identity("cluster.local", "default", "x"), CertState.UNAVAILABLE, "CA down", (), (), None
        ),
    ]
    dump = config_dump(make_sources(certificates=FakeCertificates(statuses)))
    assert dump["certificates"] == [s.to_json() for s in statuses]
    assert dump["certificates"][1]["state"] == "Unavailable: CA down"


def connections_registry() -> ConnectionRegistry:
    async def never(reason: CloseReason) -> None:
        raise AssertionError(reason)

    registry = ConnectionRegistry()
    registry.register(
        ConnectionInfo(
            uid("reviews-v1-abc"), "reviews-v1-abc.default", Direction.INBOUND,
            ipaddress.ip_address("10.244.1.20"), 9080, ipaddress.ip_address("10.244.2.21"), 41000,
            "10.244.1.20:9080", Transport.HBONE, Identity("cluster.local", "default", "default"),
        ),
        never,
    )  # fmt: skip
    registry.register(
        ConnectionInfo(
            uid("reviews-v1-abc"), "reviews-v1-abc.default", Direction.OUTBOUND,
            ipaddress.ip_address("10.244.1.20"), 52000, ipaddress.ip_address("10.244.1.99"), 15008,
            "10.96.0.10:9080", Transport.HBONE,
        ),
        never,
    )  # fmt: skip
    return registry


def test_workload_state_without_inpod_lists_local_workloads_up() -> None:
    dump = config_dump(make_sources(connections=connections_registry()))
    assert list(dump["workloadState"]) == [uid("reviews-v1-abc"), uid("waypoint-xyz")]
    assert dump["workloadState"][uid("reviews-v1-abc")] == {
        "state": "Up",
        "info": {"name": "reviews-v1-abc", "namespace": "default", "serviceAccount": "bookinfo-reviews"},
        "connections": {
            "inbound": [
                {
                    "src": "10.244.2.21:41000",
                    "originalDst": "10.244.1.20:9080",
                    "actualDst": "10.244.1.20:9080",
                    "protocol": "HBONE",
                }
            ],
            "outbound": [
                {
                    "src": "10.244.1.20:52000",
                    "originalDst": "10.96.0.10:9080",
                    "actualDst": "10.244.1.99:15008",
                    "protocol": "HBONE",
                }
            ],
        },
    }
    assert [c["direction"] for c in dump["connections"]] == ["inbound", "outbound"]


@dataclass(frozen=True)
class FakeInfo:
    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True)
class FakeInpodStatus:
    info: FakeInfo
    netns_inode: int
    running: bool
    error: str


def test_workload_state_from_the_inpod_layer() -> None:
    statuses = {
        "pod-uid-1": FakeInpodStatus(
            FakeInfo("reviews-v1-abc", "default", "bookinfo-reviews"), 4026532, True, ""
        ),
        "pod-uid-2": FakeInpodStatus(FakeInfo("new-pod", "default", "default"), 4026533, False, "netns gone"),
    }
    sources = make_sources(
        connections=connections_registry(), workload_state=lambda: workload_states_from_inpod(statuses)
    )
    state = config_dump(sources)["workloadState"]
    assert state["pod-uid-1"]["state"] == "Up"
    assert state["pod-uid-1"]["info"] == {
        "name": "reviews-v1-abc",
        "namespace": "default",
        "serviceAccount": "bookinfo-reviews",
        "netnsInode": 4026532,
    }
    assert len(state["pod-uid-1"]["connections"]["outbound"]) == 1
    assert state["pod-uid-2"] == {
        "state": "Pending",
        "info": {
            "name": "new-pod",
            "namespace": "default",
            "serviceAccount": "default",
            "netnsInode": 4026533,
            "error": "netns gone",
        },
        "connections": {"inbound": [], "outbound": []},
    }
    assert WorkloadRuntimeState("Up", "a", "b").info == {}


def test_empty_sources_give_empty_sections() -> None:
    assert config_dump(AdminSources()) == {
        "workloads": [],
        "services": [],
        "policies": [],
        "certificates": [],
        "workloadState": {},
        "connections": [],
        "rejected": {},
    }


def test_a_failing_source_is_named() -> None:
    def broken() -> list[authorization_pb2.Authorization]:
        raise RuntimeError("store unavailable")

    with pytest.raises(DumpError, match="config_dump section 'policies' failed: RuntimeError"):
        config_dump(make_sources(authorizations=broken))
