"""The ClusterRoles in deploy/kubernetes grant exactly what the processes do, observed, not listed.

The controller and the node agent run against the stand-in API server (`loom.testing.fake_apiserver`,
real HTTP) with the arguments their manifests give them; every request they make is turned into the
(API group, resource, verb) the API server's RBAC would check. Each one must be allowed by the role
bound to the process's service account, and each permission the role grants must have been used: a
new call the code starts making fails here until the role allows it, and a grant the code no longer
needs fails here until it is removed. A rule limited to `resourceNames` allows only requests for those
names, as in the API server. The scenario makes every kind of call happen: a policy whose status the
controller writes, a node proxy's CSR (TokenReview; the certificate it gets verifies against the root of
the install's CA), the root certificate ConfigMap created in every namespace and replaced where it is
outdated, waypoint objects created, replaced where they drifted and deleted where their Gateway is gone,
Gateway status, and a pod the agent annotates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from manifest_index import Document, Obj, agent_environment, container, env_of, find, installed

from cni.agent.app import NodeAgentApp
from cni.agent.main import config_from_args, parse_args
from cni.agent.reconcile import REDIRECTION_ANNOTATION
from controller.config import Config as ControllerConfig
from controller.rootcert import CONFIGMAP_NAME, LABEL_MANAGED_BY, MANAGED_BY, ROOT_CERT_KEY
from controller.sources.kubernetes import WATCHED_RESOURCES, KubernetesSource, KubernetesSourceSettings
from controller.translate.waypoints import LABEL_GATEWAY_NAME
from controller.waypoints.desired import LABEL_MANAGED
from controller.waypoints.desired import MANAGED_BY as WAYPOINT_MANAGED_BY
from deploy.tools.make_cacerts import ROOT_CERT, make_authorities, write_cacerts
from loom.api import ca_pb2
from loom.identity import Identity
from loom.testing import manifests as m
from loom.testing.controller import running_controller
from loom.testing.fake_apiserver import FakeApiServer, FakeToken, RecordedRequest
from loom.testing.waiting import eventually
from ztunnel.identity.caclient import verify_issued

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
CA_METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
ZTUNNEL_USER = "system:serviceaccount:istio-system:ztunnel"
# The settings the project's own Kubernetes tests use: fast retries, short debounce.
FAST = KubernetesSourceSettings(debounce=0.005, backoff_initial=0.01, backoff_max=0.1)

Permission = tuple[str, str, str]  # (API group, resource[/subresource], verb)


def permission_of(request: RecordedRequest) -> Permission:
    """The RBAC attributes of one API request (as the API server derives them from method and path)."""
    parts = [p for p in request.path.split("/") if p]
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        raise AssertionError(f"not a resource path: {request.path}")
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        rest = rest[2:]  # /namespaces/<ns>/<resource>/...: a namespaced resource
    resource, name, subresource = rest[0], rest[1] if len(rest) > 1 else "", rest[2] if len(rest) > 2 else ""
    method = request.method
    if method == "GET":
        verb = "get" if name else ("watch" if request.is_watch else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
    return group, f"{resource}/{subresource}" if subresource else resource, verb


def name_of(request: RecordedRequest) -> str:
    """The object name the API server checks against `resourceNames` ("" for collections and create)."""
    parts = [p for p in request.path.split("/") if p]
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        rest = rest[2:]
    return rest[1] if len(rest) > 1 else ""


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """One (group, resource, verb) of a rule, with the rule's resourceNames (empty: any object)."""

    permission: Permission
    names: frozenset[str]

    def allows(self, permission: Permission, name: str) -> bool:
        return permission == self.permission and (not self.names or name in self.names)


def grants(role: Obj) -> set[Grant]:
    return {
        Grant((group, resource, verb), frozenset(rule.get("resourceNames", ())))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def granted(role: Obj) -> set[Permission]:
    return {grant.permission for grant in grants(role)}


def role_of(docs: list[Document], workload: Obj) -> Obj:
    """The ClusterRole bound to the workload's service account."""
    account = (workload["metadata"]["namespace"], workload["spec"]["template"]["spec"]["serviceAccountName"])
    names = [
        d.obj["roleRef"]["name"]
        for d in docs
        if d.obj["kind"] == "ClusterRoleBinding"
        and any((s["namespace"], s["name"]) == account for s in d.obj["subjects"])
    ]
    assert len(names) == 1, f"{account} should be bound to exactly one ClusterRole"
    return find(docs, "ClusterRole", names[0])


def unused_grants(role: Obj, requests: Iterable[RecordedRequest]) -> set[Grant]:
    unused = grants(role)
    for request in requests:
        permission, name = permission_of(request), name_of(request)
        unused -= {g for g in unused if g.allows(permission, name)}
    return unused


def assert_exactly(role: Obj, requests: Iterable[RecordedRequest]) -> None:
    made = list(requests)
    role_grants = grants(role)
    refused = sorted(
        {
            (*permission_of(r), name_of(r))
            for r in made
            if not any(g.allows(permission_of(r), name_of(r)) for g in role_grants)
        }
    )
    assert not refused, f"{role['metadata']['name']} lacks (group, resource, verb, name) {refused}"
    unused = sorted((g.permission, sorted(g.names)) for g in unused_grants(role, made))
    assert not unused, f"{role['metadata']['name']} grants unused {unused}"


def test_request_attributes_follow_the_api_servers_rules() -> None:
    table = [
        ("GET", "/api/v1/pods", {}, ("", "pods", "list")),
        ("GET", "/api/v1/pods", {"watch": "true"}, ("", "pods", "watch")),
        ("GET", "/api/v1/namespaces", {}, ("", "namespaces", "list")),
        ("GET", "/api/v1/namespaces/shop", {}, ("", "namespaces", "get")),
        ("PATCH", "/api/v1/namespaces/shop/pods/web", {}, ("", "pods", "patch")),
        (
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            {},
            ("authentication.k8s.io", "tokenreviews", "create"),
        ),
        (
            "PATCH",
            "/apis/security.istio.io/v1/namespaces/a/authorizationpolicies/p/status",
            {},
            ("security.istio.io", "authorizationpolicies/status", "patch"),
        ),
        ("PUT", "/apis/apps/v1/namespaces/a/deployments/w", {}, ("apps", "deployments", "update")),
        ("DELETE", "/api/v1/namespaces/a/services/w", {}, ("", "services", "delete")),
    ]
    for method, path, query, expected in table:
        assert permission_of(RecordedRequest(method, path, query)) == expected, (method, path)


def test_resource_names_limit_a_rule_to_those_objects() -> None:
    role = {
        "metadata": {"name": "example"},
        "rules": [
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": ["a"],
                "verbs": ["get", "update"],
            },
        ],
    }
    cases = [
        ("GET", "/api/v1/namespaces/x/configmaps/a", True),
        ("PUT", "/api/v1/namespaces/x/configmaps/a", True),
        ("GET", "/api/v1/namespaces/x/configmaps/b", False),
        ("PUT", "/api/v1/namespaces/x/configmaps/b", False),
        ("POST", "/api/v1/namespaces/x/configmaps", True),  # create carries no name to check
        ("GET", "/api/v1/namespaces/x/configmaps", False),  # list is not granted
    ]
    for method, path, allowed in cases:
        request = RecordedRequest(method, path, {})
        verdict = any(g.allows(permission_of(request), name_of(request)) for g in grants(role))
        assert verdict is allowed, (method, path)
    with pytest.raises(AssertionError, match="lacks"):
        assert_exactly(role, [RecordedRequest("GET", "/api/v1/namespaces/x/configmaps/b", {})])
    with pytest.raises(AssertionError, match="unused"):
        assert_exactly(role, [RecordedRequest("GET", "/api/v1/namespaces/x/configmaps/a", {})])


def _csr(key: ec.EllipticCurvePrivateKey) -> str:
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(CLIENT)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    csr = builder.add_extension(san, critical=True)
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


async def _request_certificate(
    port: int, root_pem: str, token: str, key: ec.EllipticCurvePrivateKey
) -> list[str]:
    """One CreateCertificate call as a node proxy makes it (with its token, for a workload of its node)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=root_pem.encode())
    request = ca_pb2.IstioCertificateRequest(csr=_csr(key), validity_duration=3600)
    request.metadata.update({"ImpersonatedIdentity": CLIENT})
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        call = channel.unary_unary(
            CA_METHOD,
            request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
            response_deserializer=ca_pb2.IstioCertificateResponse.FromString,
        )
        response = await call(request, metadata=[("authorization", f"Bearer {token}")], timeout=WAIT)
    return list(response.cert_chain)


def _waypoint_labels(gateway: str) -> dict[str, str]:
    return {LABEL_GATEWAY_NAME: gateway, LABEL_MANAGED: WAYPOINT_MANAGED_BY}


def _labelled(manifest: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    return {**manifest, "metadata": {**manifest["metadata"], "labels": labels}}


def _waypoint_objects(namespace: str, gateway: str) -> list[dict[str, Any]]:
    """A waypoint's ServiceAccount, Service and Deployment carrying loom's labels, but not what loom
    would write (no owner, another port, another pod template): replaced, or deleted without a Gateway."""
    labels = _waypoint_labels(gateway)
    return [
        _labelled(m.service_account(namespace, gateway), labels),
        _labelled(m.service(namespace, gateway, port=8080), labels),
        _labelled(m.deployment(namespace, gateway), labels),
    ]


def _cluster(api: FakeApiServer) -> None:
    """Namespaces, a workload, a ztunnel pod with its token, an L4 policy, a new waypoint Gateway, one
    whose objects drifted, objects of a waypoint whose Gateway is gone, and an outdated root ConfigMap."""
    api.add(m.namespace("istio-system"))
    api.add(m.namespace("shop"))
    api.add(m.waypoint_gateway("shop"))
    for obj in [*_waypoint_objects("shop", "waypoint"), *_waypoint_objects("default", "retired")]:
        api.add(obj)
    api.add(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": CONFIGMAP_NAME,
                "namespace": "shop",
                "labels": {LABEL_MANAGED_BY: MANAGED_BY},
            },
            "data": {ROOT_CERT_KEY: "an outdated root\n"},
        }
    )
    api.add(m.namespace("default", {"istio.io/dataplane-mode": "ambient"}))
    api.add(m.service_account("default", "client"))
    api.add(m.pod("default", "client-1", service_account="client", node="node-a", ip="10.244.1.20"))
    api.add(m.service("default", "client"))
    api.add(m.authorization_policy("default", "allow-client"))
    api.add(m.waypoint_gateway("default"))
    ztunnel = m.pod("istio-system", "ztunnel-a", service_account="ztunnel", node="node-a", ip="10.0.0.1")
    uid = api.add(ztunnel)["metadata"]["uid"]
    api.tokens["ztunnel-a"] = FakeToken(ZTUNNEL_USER, ("istio-ca",), "ztunnel-a", uid, "node-a")


def _watching(api: FakeApiServer, paths: set[str]) -> bool:
    watched = {r.path for r in api.requests if r.is_watch}
    return paths <= watched


async def test_controller_role_is_exactly_what_the_controller_calls(tmp_path: Path) -> None:
    docs = installed()
    deployment = find(docs, "Deployment", "loom-controller")
    c = container(deployment, "controller")
    root, intermediate = make_authorities("cluster.local", root_days=3650, ca_days=30)
    write_cacerts(tmp_path / "cacerts", root, intermediate)
    # The manifest's arguments; only where files live and which ports it listens on differ here (the
    # later occurrence of a flag wins).
    argv = [
        *c["args"],
        *("--cacerts-dir", str(tmp_path / "cacerts"), "--state-dir", str(tmp_path / "state")),
        *("--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--debounce", "5ms"),
    ]
    config = ControllerConfig.from_args(argv, env_of(c))
    assert config.kubernetes
    async with FakeApiServer() as api:
        _cluster(api)
        # What the controller builds in a pod (KubernetesSource.from_environment(), the watched
        # resources by default), pointed at the stand-in.
        source = KubernetesSource.from_url(api.url, settings=FAST)
        async with running_controller(config, source=source) as app:
            paths = {r.collection_path() for r in WATCHED_RESOURCES}
            await eventually(lambda: _watching(api, paths), within=WAIT, what="every informer watching")
            await api.wait_for_request(lambda r: r.path.endswith("/status"), within=WAIT)
            # The node proxy of node-a asks for its workload's certificate, as ztunnel would; the
            # answer verifies against the root the ConfigMap istio-ca-root-cert carries.
            key = ec.generate_private_key(ec.SECP256R1())
            root_pem = (tmp_path / "cacerts" / ROOT_CERT).read_text()
            chain = await _request_certificate(app.grpc_port, root_pem, "ztunnel-a", key)
            verify_issued(Identity.parse(CLIENT), key, chain, root_pem, dt.datetime.now(dt.UTC))
            # The waypoints and the root certificate ConfigMaps: everything else the role allows.
            role = role_of(docs, deployment)
            try:
                await eventually(lambda: not unused_grants(role, api.requests), within=WAIT)
            except TimeoutError:
                pass  # assert_exactly below names what was never used
            # A moment for anything else a change of state makes it do (e.g. more status writes).
            await asyncio.sleep(0.2)
            # What ztunnel and the waypoints mount holds the install's root, in every namespace.
            for namespace in ("istio-system", "default", "shop"):
                published = api.get("ConfigMap", namespace, CONFIGMAP_NAME)
                assert published is not None and published["data"][ROOT_CERT_KEY] == root_pem, namespace
            for namespace, name in [("shop", "waypoint"), ("default", "waypoint")]:
                waypoint = api.get("Deployment", namespace, name)
                assert waypoint is not None and waypoint["metadata"]["ownerReferences"], (namespace, name)
            assert api.get("Deployment", "default", "retired") is None
        assert_exactly(role_of(docs, deployment), list(api.requests))


async def test_agent_role_is_exactly_what_the_agent_calls(tmp_path: Path) -> None:
    docs = installed()
    daemonset = find(docs, "DaemonSet", "loom-cni-agent")
    c = container(daemonset, "agent")
    with agent_environment(env_of(c)):
        args = parse_args(c["args"])
    settings = config_from_args(args)
    assert settings.kubernetes
    async with FakeApiServer() as api:
        _cluster(api)
        config = dataclasses.replace(
            settings,
            kubernetes_url=api.url,
            plugin_socket=str(tmp_path / "plugin.sock"),
            zds_socket=str(tmp_path / "zds.sock"),
            state_file=tmp_path / "state.json",
            http_host="127.0.0.1",
            http_port=0,
        )
        # The agent's own source and annotator, as its app builds them; the data path (iptables,
        # namespaces) is not started, it makes no API calls.
        app = NodeAgentApp(config)
        try:
            source = app.kubernetes
            annotations = app.annotations
            assert source is not None and annotations is not None
            changes: list[Any] = []
            task = asyncio.create_task(source.run(lambda snapshot, diagnostics: changes.append(snapshot)))
            try:
                await eventually(lambda: bool(changes), within=WAIT, what="the agent's first snapshot")
                listed = {r.path for r in api.requests if r.is_list}
                await eventually(lambda: _watching(api, listed), within=WAIT, what="every informer watching")
                change = {REDIRECTION_ANNOTATION: "enabled"}
                assert await annotations.annotator.annotate("default", "client-1", change)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            await app.stop()
        pod = api.get("pods", "default", "client-1")
        assert pod is not None and pod["metadata"]["annotations"][REDIRECTION_ANNOTATION] == "enabled"
        assert_exactly(role_of(docs, daemonset), list(api.requests))


def test_roles_grant_nothing_cluster_wide_beyond_reading_and_these_writes() -> None:
    """No wildcard, no secrets, no escalation verbs: the roles stay reviewable at a glance."""
    docs = installed()
    for doc in docs:
        if doc.obj["kind"] != "ClusterRole":
            continue
        for group, resource, verb in granted(doc.obj):
            assert "*" not in (group, resource, verb), str(doc)
            assert resource not in ("secrets", "clusterroles", "roles", "rolebindings", "clusterrolebindings")
            assert verb not in ("escalate", "bind", "impersonate", "deletecollection"), str(doc)
