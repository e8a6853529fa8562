"""The loader on real configuration: the Istio samples, files and directories, documents and objects
from the Kubernetes API, duplicates, Lists, and the lab's Deployment expansion and Pod round-trip."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from loom.resources.diagnostics import Severity
from loom.resources.loader import (
    LoadResult,
    ObjectInvalid,
    UnsupportedKind,
    ValidationError,
    check_object,
    expand_deployment,
    load_json,
    load_paths,
    load_text,
    parse_object,
    pod_template_hash,
    pod_to_manifest,
)
from loom.resources.model import (
    AuthorizationPolicy,
    Container,
    ContainerPort,
    Deployment,
    Gateway,
    HTTPRoute,
    LabelSelector,
    Namespace,
    ObjectMeta,
    Origin,
    PeerAuthentication,
    Pod,
    PodTemplate,
    PolicySource,
    PolicyTargetRef,
    ResourceKey,
    Service,
    ServiceAccount,
)
from tests.samples import samples_dir


def load_samples() -> LoadResult:
    root = samples_dir()
    return load_paths([root], root=root)


def sample_files() -> list[Path]:
    root = samples_dir()
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


# ---------------------------------------------------------------------------------------------------
# The samples load unchanged, with no errors and no warnings


def test_every_sample_file_loads_without_diagnostics() -> None:
    files = sample_files()
    names = {f.relative_to(samples_dir()).as_posix() for f in files}
    assert {
        "istio/bookinfo.yaml",
        "istio/bookinfo-versions.yaml",
        "istio/route-reviews-90-10.yaml",
        "ambient/namespace.yaml",
        "ambient/waypoint-reviews-sa.yaml",
        "ambient/l4-policy.yaml",
        "ambient/l7-policy.yaml",
        "ambient/peer-authentication.yaml",
    } <= names
    for file in files:
        result = load_text(file.read_text(), file.name)
        assert [str(d) for d in result.diagnostics] == [], file
        assert result.objects, file


def test_samples_directory_loads_with_relative_sources() -> None:
    result = load_samples()
    assert result.diagnostics == ()
    assert len(result.objects) == 25
    sources = {o.origin.source for o in result.objects if o.origin is not None}
    assert "istio/bookinfo.yaml" in sources
    assert "ambient/l4-policy.yaml" in sources
    snapshot = result.snapshot
    assert len(snapshot) == 25
    assert len(snapshot.of_kind(Deployment)) == 6
    assert len(snapshot.of_kind(Service)) == 7
    assert len(snapshot.of_kind(ServiceAccount)) == 4


def test_bookinfo_values() -> None:
    snapshot = load_samples().snapshot
    reviews_v2 = snapshot.get_obj(Deployment, "default", "reviews-v2")
    assert reviews_v2 is not None
    assert reviews_v2.template.service_account == "bookinfo-reviews"
    assert reviews_v2.replicas == 1
    assert reviews_v2.selector == LabelSelector(match_labels={"app": "reviews", "version": "v2"})
    assert reviews_v2.template_labels == {"app": "reviews", "version": "v2"}
    assert reviews_v2.template.containers == (
        Container(
            name="reviews",
            image="docker.io/istio/examples-bookinfo-reviews-v2:1.20.1",
            ports=(ContainerPort(container_port=9080),),
        ),
    )
    assert reviews_v2.origin == Origin("istio/bookinfo.yaml", 10)
    assert reviews_v2.raw["spec"]["template"]["spec"]["volumes"][0]["name"] == "wlp-output"

    productpage = snapshot.get_obj(Deployment, "default", "productpage-v1")
    assert productpage is not None
    assert productpage.template_annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9080",
        "prometheus.io/path": "/metrics",
    }

    reviews = snapshot.get_obj(Service, "default", "reviews")
    assert reviews is not None
    assert reviews.selector == {"app": "reviews"}
    assert [(p.port, p.name, p.protocol, p.target_port) for p in reviews.ports] == [(9080, "http", "TCP", 0)]
    assert reviews.cluster_ips == ()
    assert not reviews.headless
    assert reviews.type == "ClusterIP"
    assert reviews.meta.labels == {"app": "reviews", "service": "reviews"}

    v3 = snapshot.get_obj(Service, "default", "reviews-v3")
    assert v3 is not None and v3.selector == {"app": "reviews", "version": "v3"}

    account = snapshot.get_obj(ServiceAccount, "default", "bookinfo-productpage")
    assert account is not None and account.meta.labels == {"account": "productpage"}


def test_route_weights_90_10() -> None:
    route = load_samples().snapshot.get_obj(HTTPRoute, "default", "reviews")
    assert route is not None
    (parent,) = route.parent_refs
    # A Service parent without a group means the core group (there is no Gateway API Service kind).
    assert (parent.kind, parent.group, parent.name, parent.port, parent.namespace) == (
        "Service",
        "",
        "reviews",
        9080,
        "",
    )
    (rule,) = route.rules
    assert [(b.name, b.port, b.weight, b.kind, b.group) for b in rule.backend_refs] == [
        ("reviews-v1", 9080, 90, "Service", ""),
        ("reviews-v2", 9080, 10, "Service", ""),
    ]
    assert rule.matches == ()
    assert rule.timeout_request is None and rule.retry == {}


def test_ambient_policies() -> None:
    snapshot = load_samples().snapshot
    l4 = snapshot.get_obj(AuthorizationPolicy, "default", "reviews-from-productpage")
    assert l4 is not None
    assert l4.action == "ALLOW"
    assert l4.selector == LabelSelector(match_labels={"app": "reviews"})
    assert l4.target_refs == ()
    assert l4.rules is not None
    (rule,) = l4.rules
    assert rule.sources == (PolicySource(principals=("cluster.local/ns/default/sa/bookinfo-productpage",)),)
    assert [op.ports for op in rule.operations] == [("9080",)]

    deny = snapshot.get_obj(AuthorizationPolicy, "default", "ratings-deny-legacy")
    assert deny is not None and deny.action == "DENY"
    assert deny.rules is not None and deny.rules[0].sources[0].namespaces == ("legacy",)

    l7 = snapshot.get_obj(AuthorizationPolicy, "default", "reviews-get-only")
    assert l7 is not None
    assert l7.selector is None
    assert l7.target_refs == (PolicyTargetRef(kind="Service", name="reviews", group=""),)
    assert l7.rules is not None
    assert l7.rules[0].operations[0].methods == ("GET",)
    assert l7.rules[0].operations[0].paths == ("/reviews/*",)

    peer = snapshot.get_obj(PeerAuthentication, "default", "default")
    assert peer is not None and peer.mode == "STRICT" and peer.selector is None and peer.port_level_mtls == {}

    namespace = snapshot.get_obj(Namespace, "", "default")
    assert namespace is not None and namespace.meta.labels == {"istio.io/dataplane-mode": "ambient"}


def test_waypoints() -> None:
    snapshot = load_samples().snapshot
    per_sa = snapshot.get_obj(Gateway, "default", "bookinfo-reviews")
    assert per_sa is not None
    assert per_sa.is_waypoint
    assert per_sa.for_service_account == "bookinfo-reviews"
    assert [(li.name, li.port, li.protocol) for li in per_sa.listeners] == [("mesh", 15008, "HBONE")]
    current = snapshot.get_obj(Gateway, "default", "waypoint")
    assert current is not None and current.waypoint_for == "service" and current.for_service_account == ""


# ---------------------------------------------------------------------------------------------------
# Documents, Lists, duplicates


NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"
ACCOUNT = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {name}\n"


def test_document_numbers_count_every_document_and_skip_empty_ones() -> None:
    text = (
        "# comment only\n---\n"
        + NAMESPACE.format(name="a")
        + "---\n---\n~\n---\n"
        + NAMESPACE.format(name="b")
        + "---\n"
    )
    result = load_text(text, "ns.yaml")
    assert result.diagnostics == ()
    assert [(o.name, o.origin) for o in result.objects] == [
        ("a", Origin("ns.yaml", 1)),
        ("b", Origin("ns.yaml", 4)),
    ]


def test_valid_objects_of_a_file_are_kept_next_to_invalid_ones() -> None:
    text = "---\n".join(
        [
            NAMESPACE.format(name="good"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bad\n  labels:\n    team: 5\n",
            ACCOUNT.format(name="also-good"),
        ]
    )
    result = load_text(text, "mixed.yaml")
    assert [o.name for o in result.objects] == ["good", "also-good"]
    assert [str(d) for d in result.errors] == [
        "mixed.yaml doc 2 Namespace bad: metadata.labels.team: expected a string, got int"
    ]
    (error,) = result.errors
    assert error.key == ResourceKey("Namespace", "", "bad")
    assert error.field == "metadata.labels.team"
    assert error.severity is Severity.ERROR


def test_every_problem_of_an_object_is_reported() -> None:
    text = """apiVersion: v1
kind: Pod
metadata:
  name: p
spec:
  hostNetwork: "yes"
  containers:
  - name: app
    ports:
    - containerPort: 0
      protocol: HTTP
"""
    assert [str(d) for d in load_text(text, "pod.yaml").diagnostics] == [
        "pod.yaml doc 1 Pod default/p: spec.hostNetwork: expected a boolean, got string",
        "pod.yaml doc 1 Pod default/p: spec.containers[0].ports[0].containerPort: must be between 1 and "
        "65535, got 0",
        "pod.yaml doc 1 Pod default/p: spec.containers[0].ports[0].protocol: must be one of TCP, UDP, SCTP, "
        'got "HTTP"',
    ]


def test_list_kind_is_unpacked() -> None:
    text = """apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: one}
- apiVersion: v1
  kind: ServiceAccount
  metadata: {name: sa, namespace: one, labels: {x: 1}}
- apiVersion: v1
  kind: ServiceAccount
  metadata: {name: sa2, namespace: one}
"""
    result = load_text(text, "list.yaml")
    assert [o.key for o in result.objects] == [
        ResourceKey("Namespace", "", "one"),
        ResourceKey("ServiceAccount", "one", "sa2"),
    ]
    assert all(o.origin == Origin("list.yaml", 1) for o in result.objects)
    assert [str(d) for d in result.diagnostics] == [
        "list.yaml doc 1 ServiceAccount one/sa: items[1].metadata.labels.x: expected a string, got int"
    ]
    skipped = load_text(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.istio.io/v1\n  kind: VirtualService\n"
        "  metadata: {name: r}\n- 5\n",
        "list.yaml",
    )
    assert [str(d) for d in skipped.diagnostics] == [
        "list.yaml doc 1 VirtualService r: items[0]: networking.istio.io/v1 VirtualService is not a kind "
        "loom reads; skipped",
        "list.yaml doc 1: items[1]: expected a mapping (a Kubernetes object), got int",
    ]
    bad = load_text("apiVersion: v1\nkind: List\nitems: 5\n", "list.yaml")
    assert [str(d) for d in bad.diagnostics] == ["list.yaml doc 1: items: expected a list, got int"]
    assert load_text("apiVersion: v1\nkind: List\nitems: []\n", "list.yaml").diagnostics == ()


def test_duplicate_keys_first_wins_and_the_error_names_the_first() -> None:
    text = "---\n".join([NAMESPACE.format(name="a"), ACCOUNT.format(name="sa"), NAMESPACE.format(name="a")])
    result = load_text(text, "dup.yaml")
    assert [o.origin for o in result.objects] == [Origin("dup.yaml", 1), Origin("dup.yaml", 2)]
    assert [str(d) for d in result.errors] == [
        "dup.yaml doc 3 Namespace a: already defined in dup.yaml doc 1; this definition is ignored"
    ]


def test_duplicate_keys_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(ACCOUNT.format(name="sa"))
    (tmp_path / "b.yaml").write_text(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: sa\n  namespace: default\n"
    )
    result = load_paths([tmp_path], root=tmp_path)
    assert len(result.objects) == 1 and result.objects[0].origin == Origin("a.yaml", 1)
    assert [str(d) for d in result.errors] == [
        "b.yaml doc 1 ServiceAccount default/sa: already defined in a.yaml doc 1; this definition is ignored"
    ]


def test_same_name_in_different_namespaces_or_kinds_is_not_a_duplicate() -> None:
    text = "---\n".join(
        [
            ACCOUNT.format(name="x"),
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x, namespace: other}\n",
            NAMESPACE.format(name="x"),
        ]
    )
    assert len(load_text(text, "x.yaml").objects) == 3


def test_unknown_kinds_are_skipped_with_a_warning() -> None:
    text = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: default
spec:
  hosts: [reviews]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: ingress
---
apiVersion: example.com/v1
kind: Widget
metadata: {}
"""
    result = load_text(text, "istio.yaml")
    assert result.objects == ()
    assert result.errors == ()
    assert [str(d) for d in result.warnings] == [
        "istio.yaml doc 1 VirtualService default/reviews: networking.istio.io/v1 VirtualService is not a "
        "kind loom reads; skipped",
        "istio.yaml doc 2 Gateway ingress: networking.istio.io/v1 Gateway is not an API version loom reads "
        "(it reads gateway.networking.k8s.io/v1 and gateway.networking.k8s.io/v1beta1); skipped",
        "istio.yaml doc 3: example.com/v1 Widget is not a kind loom reads; skipped",
    ]


def test_yaml_syntax_error_keeps_earlier_documents_and_other_files(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        NAMESPACE.format(name="before")
        + "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: b\n  labels: a: b\n"
        "---\n" + NAMESPACE.format(name="after")
    )
    (tmp_path / "good.yaml").write_text(NAMESPACE.format(name="other"))
    result = load_paths([tmp_path], root=tmp_path)
    assert [o.name for o in result.objects] == ["before", "other"]
    assert [str(d) for d in result.diagnostics] == [
        "bad.yaml: line 10 column 12: mapping values are not allowed here"
    ]
    assert result.diagnostics[0].origin == Origin("bad.yaml")


def test_a_document_that_is_not_a_mapping() -> None:
    result = load_text("- a\n- b\n---\nplain words\n", "x.yaml")
    assert [str(d) for d in result.errors] == [
        "x.yaml doc 1: expected a mapping (a Kubernetes object), got list",
        "x.yaml doc 2: expected a mapping (a Kubernetes object), got string",
    ]


# ---------------------------------------------------------------------------------------------------
# Files and directories


def test_directories_are_walked_sorted_skipping_hidden_entries(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "z.yaml").write_text(NAMESPACE.format(name="z"))
    (tmp_path / "a.yml").write_text(NAMESPACE.format(name="a"))
    (tmp_path / "sub" / "m.json").write_text(
        '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "m"}}'
    )
    (tmp_path / "sub" / "deeper" / "d.yaml").write_text(NAMESPACE.format(name="d"))
    (tmp_path / ".hidden.yaml").write_text(NAMESPACE.format(name="hidden"))
    (tmp_path / ".git" / "x.yaml").write_text(NAMESPACE.format(name="git"))
    (tmp_path / "notes.txt").write_text("not: config")
    (tmp_path / "README.md").write_text("# docs")
    result = load_paths([tmp_path], root=tmp_path)
    assert result.diagnostics == ()
    assert [(o.name, o.origin) for o in result.objects] == [
        ("a", Origin("a.yml", 1)),
        ("d", Origin("sub/deeper/d.yaml", 1)),
        ("m", Origin("sub/m.json", 1)),
        ("z", Origin("z.yaml", 1)),
    ]


def test_files_given_explicitly_are_named_as_given(tmp_path: Path) -> None:
    file = tmp_path / "config.txt"
    file.write_text(NAMESPACE.format(name="explicit"))
    result = load_paths([file])
    assert [(o.name, o.origin) for o in result.objects] == [("explicit", Origin(str(file), 1))]


def test_unreadable_and_missing_paths_are_errors(tmp_path: Path) -> None:
    (tmp_path / "latin1.yaml").write_bytes(b"apiVersion: v1\nkind: Namespace\nmetadata: {name: caf\xe9}\n")
    (tmp_path / "broken.json").write_text('{"apiVersion": "v1",\n "kind": }')
    (tmp_path / "twice.json").write_text('{"kind": "Namespace", "kind": "Pod"}')
    (tmp_path / "ok.yaml").write_text(NAMESPACE.format(name="ok"))
    result = load_paths([tmp_path, tmp_path / "missing.yaml"], root=tmp_path)
    assert [o.name for o in result.objects] == ["ok"]
    assert [str(d) for d in result.errors] == [
        "broken.json: line 2 column 10: Expecting value",
        "latin1.yaml: not UTF-8 text (invalid byte at offset 51)",
        "twice.json: duplicate key 'kind'",
        "missing.yaml: no such file or directory",
    ]


def test_json_list_and_deep_nesting(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(
        '{"apiVersion": "v1", "kind": "List", "items": [{"apiVersion": "v1", "kind": "Namespace", '
        '"metadata": {"name": "j"}}]}'
    )
    (tmp_path / "deep.json").write_text("[" * 300 + "]" * 300)
    result = load_paths([tmp_path], root=tmp_path)
    assert [o.name for o in result.objects] == ["j"]
    assert [str(d) for d in result.errors] == ["deep.json: nesting deeper than 200 levels"]


def test_load_json_text() -> None:
    result = load_json(
        '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n", "labels": {"a": 1}}}', "n.json"
    )
    assert result.objects == ()
    assert [str(d) for d in result.diagnostics] == [
        "n.json doc 1 Namespace n: metadata.labels.a: expected a string, got int"
    ]
    assert [str(d) for d in load_json("[1,", "x.json").diagnostics] == [
        "x.json: line 1 column 4: Expecting value"
    ]
    huge = "1" * 5000  # beyond Python's limit for parsing integers from text
    (json_error,) = load_json('{"a": ' + huge + "}", "big.json").errors
    assert json_error.message.startswith("Exceeds the limit")
    (yaml_error,) = load_text("a: " + huge + "\n", "big.yaml").errors
    assert str(yaml_error).startswith("big.yaml: line 1 column 4: '1111")
    assert "1111... is not a valid int: Exceeds the limit" in yaml_error.message
    assert len(yaml_error.message) < 300


def test_load_result_views() -> None:
    result = load_text(
        NAMESPACE.format(name="a")
        + "---\napiVersion: v1\nkind: Thing\nmetadata: {name: t}\n---\nkind: Namespace\n",
        "v.yaml",
    )
    assert [(d.field, d.message) for d in result.errors] == [
        ("apiVersion", "required field is missing"),
        ("metadata.name", "required field is missing"),
    ]
    assert len(result.warnings) == 1
    assert result.errors[0].is_error and not result.warnings[0].is_error
    assert list(result.snapshot) == [ResourceKey("Namespace", "", "a")]


# ---------------------------------------------------------------------------------------------------
# parse_object: the API used by the Kubernetes source


API_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "reviews-v2-5b667bcbf8-x7k2p",
        "generateName": "reviews-v2-5b667bcbf8-",
        "namespace": "bookinfo",
        "uid": "0a1b2c3d-0000-4000-8000-000000000001",
        "resourceVersion": "12345",
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "labels": {"app": "reviews", "version": "v2", "pod-template-hash": "5b667bcbf8"},
        "annotations": {"ambient.istio.io/redirection": "enabled"},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "reviews-v2-5b667bcbf8",
                "uid": "0a1b2c3d-0000-4000-8000-000000000002",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
        "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}],
    },
    "spec": {
        "serviceAccountName": "bookinfo-reviews",
        "serviceAccount": "bookinfo-reviews",
        "nodeName": "worker-1",
        "containers": [
            {
                "name": "reviews",
                "image": "docker.io/istio/examples-bookinfo-reviews-v2:1.20.1",
                "ports": [{"containerPort": 9080, "protocol": "TCP"}],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
            }
        ],
        "dnsPolicy": "ClusterFirst",
        "restartPolicy": "Always",
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}],
    },
    "status": {
        "phase": "Running",
        "podIP": "10.244.1.7",
        "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00:10:244:1::7"}],
        "hostIP": "172.18.0.3",
        "conditions": [
            {"type": "Initialized", "status": "True", "lastProbeTime": None},
            {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:05Z"},
        ],
    },
}


def test_pod_from_the_kubernetes_api() -> None:
    origin = Origin("kubernetes")
    check = check_object(API_POD, origin)
    assert check.errors == () and check.warnings == ()
    pod = parse_object(API_POD, origin)
    assert isinstance(pod, Pod)
    assert pod.key == ResourceKey("Pod", "bookinfo", "reviews-v2-5b667bcbf8-x7k2p")
    assert pod.meta.uid == "0a1b2c3d-0000-4000-8000-000000000001"
    assert pod.meta.resource_version == "12345"
    assert pod.ips == ("10.244.1.7", "fd00:10:244:1::7")
    assert pod.phase == "Running"
    assert pod.ready is False
    assert pod.owner_deployment == "reviews-v2"
    assert pod.spec.node_name == "worker-1"
    assert pod.spec.service_account == "bookinfo-reviews"
    assert pod.origin == origin
    assert pod.raw == {}  # pods do not keep their manifest (Resource.KEEP_RAW): memory per workload


@pytest.mark.parametrize(
    ("owner", "labels", "expected"),
    [
        ({"kind": "ReplicaSet", "name": "web-7d4b9c", "controller": True}, {}, "web"),
        ({"kind": "ReplicaSet", "name": "my-web-app-7d4b9c"}, {}, "my-web-app"),
        ({"kind": "ReplicaSet", "name": "web-a-b"}, {"pod-template-hash": "a-b"}, "web"),
        ({"kind": "ReplicaSet", "name": "nodash"}, {}, ""),
        ({"kind": "StatefulSet", "name": "db"}, {}, ""),
    ],
    ids=[
        "controller replicaset",
        "dashes in the deployment name",
        "hash label",
        "no dash",
        "not a replicaset",
    ],
)
def test_owner_deployment_from_owner_references(
    owner: dict[str, object], labels: dict[str, str], expected: str
) -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "labels": labels, "ownerReferences": [owner]},
    }
    pod = parse_object(doc)
    assert isinstance(pod, Pod) and pod.owner_deployment == expected


def test_pod_status_defaults() -> None:
    bare = parse_object({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})
    assert isinstance(bare, Pod)
    assert (bare.phase, bare.ready, bare.ips, bare.spec) == ("Pending", False, (), PodTemplate())
    assert bare.namespace == "default"
    running = parse_object(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }
    )
    assert isinstance(running, Pod) and running.ready and running.ips == ("10.0.0.1",)


def test_services_from_the_kubernetes_api() -> None:
    headless = parse_object(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db", "namespace": "data", "uid": "u1"},
            "spec": {
                "clusterIP": "None",
                "clusterIPs": ["None"],
                "ports": [{"port": 5432, "targetPort": "postgres", "protocol": "TCP", "name": "pg"}],
                "selector": {"app": "db"},
                "type": "ClusterIP",
                "sessionAffinity": "None",
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "internalTrafficPolicy": "Cluster",
            },
            "status": {"loadBalancer": {}},
        }
    )
    assert isinstance(headless, Service)
    assert headless.headless and headless.cluster_ips == ()
    assert headless.ports[0].target_port == "postgres"
    dual = parse_object(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10", "fd00:10:96::a"],
                "ports": [{"port": 80, "targetPort": 8080, "appProtocol": "http"}],
            },
        }
    )
    assert isinstance(dual, Service)
    assert dual.cluster_ips == ("10.96.0.10", "fd00:10:96::a") and not dual.headless
    assert dual.selector is None
    assert dual.ports[0].target_port == 8080 and dual.ports[0].app_protocol == "http"


def test_parse_object_raises_every_error_at_once() -> None:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"action": "PERMIT", "rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
    }
    with pytest.raises(ObjectInvalid) as info:
        parse_object(doc)
    err = info.value
    assert isinstance(err, ValidationError)
    assert [(e.field, e.message) for e in err.errors] == [
        ("spec.action", 'must be one of ALLOW, DENY, AUDIT, CUSTOM, got "PERMIT"'),
        ("spec.rules[0].to[0].operation.ports[0]", 'must be a port number between 1 and 65535, got "http"'),
    ]
    assert err.field == "spec.action"
    assert err.key == ResourceKey("AuthorizationPolicy", "default", "bad")
    assert "spec.rules[0].to[0].operation.ports[0]" in str(err)


def test_parse_object_unsupported_kind() -> None:
    with pytest.raises(UnsupportedKind) as info:
        parse_object({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"}})
    assert (info.value.api_version, info.value.kind) == ("apps/v1", "StatefulSet")
    assert isinstance(info.value, ValidationError)


def test_parse_object_keeps_raw_and_origin() -> None:
    doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "namespace": "ignored"}}
    check = check_object(doc, Origin("f.yaml", 3))
    assert check.obj is not None and check.obj.origin == Origin("f.yaml", 3)
    assert check.obj.raw == {}  # namespaces do not keep their manifest; policies do (below)
    assert check.obj.namespace == ""
    assert [(w.field, w.message) for w in check.warnings] == [
        ("metadata.namespace", "ignored: this kind is cluster-scoped")
    ]


# ---------------------------------------------------------------------------------------------------
# The lab: Deployment expansion and the Pod manifest round-trip


def bookinfo_deployment(name: str) -> Deployment:
    deployment = load_samples().snapshot.get_obj(Deployment, "default", name)
    assert deployment is not None
    return deployment


POD_NAME = re.compile(r"(?P<deploy>.+)-(?P<hash>[a-z0-9]{10})-(?P<suffix>[a-z0-9]{5})\Z")


def test_expand_deployment_names_labels_and_state() -> None:
    dep = bookinfo_deployment("reviews-v2")
    (pod,) = expand_deployment(dep)
    match = POD_NAME.match(pod.name)
    assert match is not None and match["deploy"] == "reviews-v2"
    assert match["hash"] == pod_template_hash(dep)
    assert pod.meta.labels == {"app": "reviews", "version": "v2", "pod-template-hash": match["hash"]}
    assert pod.meta.annotations == {}
    assert pod.namespace == "default"
    assert pod.spec == dep.template and pod.spec.service_account == "bookinfo-reviews"
    assert pod.owner_deployment == "reviews-v2"
    assert (pod.ips, pod.spec.node_name, pod.phase, pod.ready) == ((), "", "Pending", False)
    assert dep.selector.matches(pod.meta.labels)
    assert pod.raw == pod_to_manifest(pod)

    productpage = bookinfo_deployment("productpage-v1")
    (page_pod,) = expand_deployment(productpage)
    assert page_pod.meta.annotations == productpage.template_annotations


def test_expand_deployment_is_deterministic() -> None:
    dep = replace(bookinfo_deployment("ratings-v1"), replicas=5)
    first = expand_deployment(dep)
    second = expand_deployment(replace(bookinfo_deployment("ratings-v1"), replicas=5))  # a fresh load
    assert [p.name for p in first] == [p.name for p in second]
    assert first == second
    assert len({p.name for p in first}) == 5
    # Scaling keeps the names of the pods that stay: suffixes derive from the replica index.
    assert [p.name for p in expand_deployment(replace(dep, replicas=2))] == [p.name for p in first[:2]]
    assert expand_deployment(replace(dep, replicas=0)) == []
    # A template change is a new pod-template-hash, hence new names.
    changed = replace(dep, template=replace(dep.template, service_account="other"))
    assert pod_template_hash(changed) != pod_template_hash(dep)
    assert not {p.name for p in expand_deployment(changed)} & {p.name for p in first}
    for pod in first:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", pod.name)


def test_expand_deployment_long_names_are_truncated_like_kubernetes() -> None:
    name = "a" * 60
    dep = Deployment(
        meta=ObjectMeta(name=name, namespace="default"),
        selector=LabelSelector(match_labels={"app": "x"}),
        template_labels={"app": "x"},
    )
    (pod,) = expand_deployment(dep)
    assert len(pod.name) == 63 and pod.name.startswith(name[:58])


def test_expand_deployment_rejects_a_selector_that_does_not_match() -> None:
    dep = Deployment(
        meta=ObjectMeta(name="d", namespace="default"),
        selector=LabelSelector(match_labels={"app": "x"}),
        template_labels={"app": "y"},
    )
    with pytest.raises(ValueError, match="selector does not match"):
        expand_deployment(dep)


def scheduled(pod: Pod) -> Pod:
    return replace(
        pod,
        meta=replace(
            pod.meta, uid="6d0c0a53-1c1f-4a8e-9a59-2d9e3c4b5a61", resource_version="7", generation=2
        ),
        spec=replace(pod.spec, node_name="node-2", host_network=False),
        ips=("10.10.2.7", "fd00:10:10:2::7"),
        phase="Running",
        ready=True,
    )


def test_pod_manifest_round_trip() -> None:
    pods = [
        p for name in ("reviews-v1", "productpage-v1") for p in expand_deployment(bookinfo_deployment(name))
    ]
    custom = Pod(
        meta=ObjectMeta(name="tool", namespace="lab", labels={"istio.io/dataplane-mode": "none"}),
        spec=PodTemplate(
            service_account="tools",
            host_network=True,
            containers=(
                Container(
                    name="echo",
                    image="loom/echo",
                    ports=(ContainerPort(8080, "http"), ContainerPort(5353, "dns", "UDP")),
                    command=("loom-echo",),
                    args=("--port", "8080"),
                ),
            ),
        ),
        ips=("192.168.10.2",),
        phase="Succeeded",
        ready=False,
        owner_deployment="tool-deploy",
    )
    for pod in [*pods, *(scheduled(p) for p in pods), custom]:
        manifest = pod_to_manifest(pod)
        assert manifest["apiVersion"] == "v1" and manifest["kind"] == "Pod"
        assert parse_object(manifest) == pod
        # The lab writes scheduled pods as YAML: the text round-trips too.
        text = yaml.safe_dump(manifest, sort_keys=False)
        result = load_text(text, "pods.yaml")
        assert result.diagnostics == ()
        assert result.objects == (pod,)


def test_pod_manifest_shape() -> None:
    (pod,) = expand_deployment(bookinfo_deployment("details-v1"))
    manifest = pod_to_manifest(scheduled(pod))
    assert manifest["spec"]["serviceAccountName"] == "bookinfo-details"
    assert manifest["spec"]["nodeName"] == "node-2"
    assert manifest["spec"]["containers"][0]["ports"] == [{"containerPort": 9080, "protocol": "TCP"}]
    assert manifest["status"] == {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
        "podIP": "10.10.2.7",
        "podIPs": [{"ip": "10.10.2.7"}, {"ip": "fd00:10:10:2::7"}],
    }
    (owner,) = manifest["metadata"]["ownerReferences"]
    assert (
        owner["kind"] == "ReplicaSet"
        and owner["name"] == f"details-v1-{pod.meta.labels['pod-template-hash']}"
    )


def test_kinds_with_status_writes_keep_their_manifest() -> None:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {},
    }
    check = check_object(doc, Origin("f.yaml", 1))
    assert check.obj is not None and check.obj.raw is doc
