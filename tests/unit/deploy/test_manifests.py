"""The Kubernetes manifests in deploy/kubernetes, checked against the code they run.

Nothing here is a second copy of the code's settings: environment variable names, flags, ports, paths,
the token audience, the trusted node account and the TLS name are all taken from the modules that use
them (ztunnel.config, controller.config and controller.auth, cni.agent.main, cni.plugin), so a change on
either side that breaks an install fails here first. Plus the structural mistakes the API server or the
kubelet would only report on a live cluster: selectors that select nothing, mounts without a volume,
probes on undeclared ports, RBAC bound to a missing account.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from manifest_index import (
    KUBERNETES,
    NAMESPACE,
    NODE_NAME,
    Document,
    Obj,
    RecordingEnv,
    agent_environment,
    console_scripts,
    container,
    containers,
    documents,
    env_of,
    find,
    flag_values,
    installed,
    kustomization,
    mount_of,
    pod_spec,
    ports_by_name,
    probe_port,
    project_version,
    volume,
    yaml_files,
)

from cni import plugin as cni_plugin
from cni.agent.main import ENV_PREFIX, config_from_args, config_problems, parse_args
from controller.app import CONTROLLER_SERVICE_ACCOUNT
from controller.auth import DEFAULT_AUDIENCES
from controller.config import Config as ControllerConfig
from controller.rootcert import CONFIGMAP_NAME, ROOT_CERT_KEY
from controller.sources.kubernetes import WATCHED_RESOURCES
from controller.waypoints.desired import DesiredWaypoint, WaypointSettings, plan
from deploy.tools import install_cni
from loom.resources.loader import check_object, parse_object
from loom.resources.model import Gateway
from loom.testing import manifests as m
from waypoint.xds import ENV_ROOT_CERT, ENV_XDS_ADDRESS
from ztunnel.config import DEFAULT_INPOD_UDS, parse_duration
from ztunnel.config import Config as ZtunnelConfig

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
WORKLOAD_KINDS = {"Deployment", "DaemonSet"}
# Istio's drain margin: the grace period leaves this long after the drain deadline for the final close.
DRAIN_MARGIN_SECONDS = 5.0


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return installed()


@pytest.fixture(scope="module")
def ztunnel(docs: list[Document]) -> Obj:
    return find(docs, "DaemonSet", "ztunnel")


@pytest.fixture(scope="module")
def agent(docs: list[Document]) -> Obj:
    return find(docs, "DaemonSet", "loom-cni-agent")


@pytest.fixture(scope="module")
def controller(docs: list[Document]) -> Obj:
    return find(docs, "Deployment", "loom-controller")


def ztunnel_config(ztunnel: Obj) -> ZtunnelConfig:
    return ZtunnelConfig.from_env(env_of(container(ztunnel, "istio-proxy")))


def controller_config(controller: Obj) -> ControllerConfig:
    c = container(controller, "controller")
    return ControllerConfig.from_args(c["args"], env_of(c))


def agent_args(agent: Obj) -> tuple[Any, RecordingEnv]:
    c = container(agent, "agent")
    with agent_environment(env_of(c)) as env:
        args = parse_args(c["args"])
    return args, env


# ---------------------------------------------------------------------------------------------------
# every file


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_every_manifest_parses_into_named_objects(path: Path) -> None:
    found = documents(path)
    assert found, f"{path} holds no document"
    for doc in found:
        obj = doc.obj
        assert isinstance(obj, dict), doc
        if obj.get("kind") == "Kustomization":
            continue
        assert obj.get("apiVersion") and obj.get("kind"), doc
        assert obj.get("metadata", {}).get("name"), doc
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == NAMESPACE, (
                f"{doc}: every namespaced object is in {NAMESPACE}"
            )


def test_kustomization_lists_every_manifest_in_install_order() -> None:
    resources = kustomization()["resources"]
    top_level = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert resources == top_level, "the numbered files are the install order, each listed once"
    kinds = [d.obj["kind"] for d in installed()]
    assert kinds[0] == "Namespace"
    # The node proxy needs the agent's ZDS socket and the controller; both come before it.
    order = [d.obj["metadata"]["name"] for d in installed() if d.obj["kind"] in WORKLOAD_KINDS]
    assert order == ["loom-controller", "loom-cni-agent", "ztunnel"]


@pytest.mark.parametrize("directory", [KUBERNETES, KUBERNETES / "uninstall"], ids=["install", "uninstall"])
def test_every_container_runs_the_image_the_kustomization_sets(directory: Path) -> None:
    (image,) = kustomization(directory)["images"]
    # newName is the user's registry; the tag follows the project's version.
    assert image["name"] == "loom" and image["newTag"] == project_version()
    for doc in installed(directory):
        if doc.obj["kind"] in WORKLOAD_KINDS:
            for c in containers(doc.obj):
                assert c["image"] == f"loom:{project_version()}", f"{doc} {c['name']}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", [KUBERNETES, KUBERNETES / "uninstall"], ids=["install", "uninstall"])
def test_kubectl_kustomize_builds_the_same_objects(directory: Path) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    built = {(o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(result.stdout) if o}
    assert built == {(d.obj["kind"], d.obj["metadata"]["name"]) for d in installed(directory)}


def test_the_objects_an_install_needs_are_there(docs: list[Document]) -> None:
    for kind, name in [
        ("Namespace", NAMESPACE),
        ("ServiceAccount", "loom-controller"),
        ("ClusterRole", "loom-controller"),
        ("ClusterRoleBinding", "loom-controller"),
        ("Deployment", "loom-controller"),
        ("Service", "loom-controller"),
        ("ServiceAccount", "loom-cni-agent"),
        ("ClusterRole", "loom-cni-agent"),
        ("ClusterRoleBinding", "loom-cni-agent"),
        ("ConfigMap", "loom-cni-config"),
        ("DaemonSet", "loom-cni-agent"),
        ("ServiceAccount", "ztunnel"),
        ("DaemonSet", "ztunnel"),
    ]:
        find(docs, kind, name)


def test_loom_reads_the_objects_it_knows_without_complaint(docs: list[Document]) -> None:
    """The namespace, service accounts, Service and Deployment are kinds loom's own loader reads (the
    lab and `loomctl validate` see these files too): no error and no warning."""
    read = 0
    for doc in docs:
        check = check_object(doc.obj)
        if check.unsupported is not None:
            continue
        assert not check.errors and not check.warnings, f"{doc}: {check.errors} {check.warnings}"
        read += 1
    assert read >= 5  # Namespace, 3 ServiceAccounts, Service, Deployment at least


# ---------------------------------------------------------------------------------------------------
# structure the API server or kubelet would only reject on a cluster


def workloads() -> list[tuple[str, Obj]]:
    found = []
    for directory in (KUBERNETES, KUBERNETES / "uninstall"):
        for doc in installed(directory):
            if doc.obj["kind"] in WORKLOAD_KINDS:
                found.append((str(doc), doc.obj))
    return found


@pytest.mark.parametrize(("where", "workload"), workloads(), ids=[w for w, _ in workloads()])
def test_workload_is_internally_consistent(where: str, workload: Obj) -> None:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    for key, value in workload["spec"]["selector"]["matchLabels"].items():
        assert labels.get(key) == value, f"{where}: the selector does not select its own pods"
    volumes = {v["name"] for v in pod_spec(workload).get("volumes", [])}
    names = [c["name"] for c in containers(workload)]
    assert len(names) == len(set(names))
    for c in containers(workload):
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where} {c['name']}: mount of an undeclared volume"
        port_names = [p["name"] for p in c.get("ports", [])]
        assert len(port_names) == len(set(port_names))
        assert all(len(n) <= 15 for n in port_names), "port names are IANA service names (<= 15 chars)"
        for probe_kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.get(probe_kind)
            if probe is not None and "httpGet" in probe:
                assert probe_port(c, probe) in ports_by_name(c).values(), f"{where} {c['name']} {probe_kind}"
        security = c.get("securityContext", {})
        if security.get("allowPrivilegeEscalation") is False:
            # The API server refuses no_new_privs together with privileged or CAP_SYS_ADMIN.
            assert not security.get("privileged"), f"{where} {c['name']}"
            added = {
                f"CAP_{a}".replace("CAP_CAP_", "CAP_")
                for a in security.get("capabilities", {}).get("add", [])
            }
            assert "CAP_SYS_ADMIN" not in added, f"{where} {c['name']}"
        assert c["imagePullPolicy"] == "IfNotPresent"
        command = c["command"]
        if command[0] == "python":
            assert command[1:3] == ["-m", command[2]] and command[2].startswith("deploy.tools.")
            module = command[2].removeprefix("deploy.tools.")
            assert (KUBERNETES.parent / "tools" / f"{module}.py").is_file(), f"{where}: no tool {module}"
        else:
            assert command == [command[0]] and command[0] in console_scripts(), f"{where}: {command}"


def test_rbac_binds_existing_roles_to_existing_accounts(docs: list[Document]) -> None:
    accounts = {
        (d.obj["metadata"]["namespace"], d.obj["metadata"]["name"])
        for d in docs
        if d.obj["kind"] == "ServiceAccount"
    }
    roles = {d.obj["metadata"]["name"] for d in docs if d.obj["kind"] == "ClusterRole"}
    bindings = [d.obj for d in docs if d.obj["kind"] == "ClusterRoleBinding"]
    assert {b["roleRef"]["name"] for b in bindings} == roles, (
        "every role is bound, every binding has its role"
    )
    for binding in bindings:
        for subject in binding["subjects"]:
            assert (subject["namespace"], subject["name"]) in accounts
    for doc in docs:
        if doc.obj["kind"] in WORKLOAD_KINDS:
            spec = pod_spec(doc.obj)
            assert (NAMESPACE, spec["serviceAccountName"]) in accounts, str(doc)


def test_controller_service_selects_the_controller_and_its_ports(
    docs: list[Document], controller: Obj
) -> None:
    service = find(docs, "Service", "loom-controller")
    labels = controller["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    named = ports_by_name(container(controller, "controller"))
    config = controller_config(controller)
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert named[by_name["grpc-xds"]["targetPort"]] == config.grpc_addr.port == by_name["grpc-xds"]["port"]
    assert named[by_name["http-monitoring"]["targetPort"]] == config.http_addr.port
    assert by_name["http-monitoring"]["port"] == config.http_addr.port


# ---------------------------------------------------------------------------------------------------
# the controller


def test_controller_arguments_are_accepted_and_select_kubernetes(controller: Obj) -> None:
    config = controller_config(controller)
    assert config.kubernetes and not config.config_dirs
    # The namespace loom is installed in is the root namespace of mesh-wide policy.
    assert config.root_namespace == NAMESPACE
    assert pod_spec(controller)["serviceAccountName"] == CONTROLLER_SERVICE_ACCOUNT


def test_controller_only_reads_variables_it_knows(controller: Obj) -> None:
    c = container(controller, "controller")
    env = RecordingEnv(env_of(c))
    ControllerConfig.from_args(c["args"], env)
    assert set(env.entries) <= env.asked


def test_controller_mounts_its_ca_and_a_writable_state_directory(controller: Obj) -> None:
    config = controller_config(controller)
    c = container(controller, "controller")
    assert config.cacerts_dir is not None
    mount, cacerts, inside = mount_of(controller, c, str(config.cacerts_dir))
    assert inside == "." and mount.get("readOnly") is True
    assert cacerts["secret"]["secretName"] == "cacerts"
    # Mounted for a non-root user: group-readable, with the pod's fsGroup as the group.
    assert cacerts["secret"]["defaultMode"] == 0o440
    security = pod_spec(controller)["securityContext"]
    assert security["fsGroup"] == security["runAsGroup"] and security["runAsNonRoot"] is True
    _, state, _ = mount_of(controller, c, str(config.state_dir))
    assert "emptyDir" in state
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "add" not in c["securityContext"]["capabilities"]


def test_controller_readiness_and_metrics_use_its_http_port(controller: Obj) -> None:
    config = controller_config(controller)
    c = container(controller, "controller")
    probe = c["readinessProbe"]
    assert probe["httpGet"]["path"] == "/ready" and probe_port(c, probe) == config.http_addr.port
    annotations = controller["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.http_addr.port
    assert set(ports_by_name(c).values()) == {config.grpc_addr.port, config.http_addr.port}


def test_no_manifest_ships_the_root_configmap_the_controller_publishes(docs: list[Document]) -> None:
    """The controller writes istio-ca-root-cert (controller/rootcert.py); a copy in the install would be
    an object without loom's label, which the controller leaves alone forever."""
    assert not [
        d for d in docs if d.obj["kind"] == "ConfigMap" and d.obj["metadata"]["name"] == CONFIGMAP_NAME
    ]


# ---------------------------------------------------------------------------------------------------
# waypoints (--deploy-waypoints)


def waypoint_deployment(controller: Obj) -> Obj:
    """The Deployment the controller, as the manifest configures it, makes for a waypoint Gateway."""
    config = controller_config(controller)
    assert config.waypoint_xds_address is not None
    settings = WaypointSettings(
        xds_address=str(config.waypoint_xds_address),
        image=config.waypoint_image,
        trust_domain=config.trust_domain,
        cluster_id=config.cluster_id,
        root_namespace=config.root_namespace,
    )
    gateway = parse_object(m.waypoint_gateway("shop"))
    assert isinstance(gateway, Gateway)
    planned = plan(gateway, settings)
    assert isinstance(planned, DesiredWaypoint), planned
    (deployment,) = [d for d in planned.manifests if d["kind"] == "Deployment"]
    return dict(deployment)


def test_controller_runs_waypoints_with_its_own_image(controller: Obj) -> None:
    config = controller_config(controller)
    assert config.deploy_waypoints
    assert config.waypoint_image == container(controller, "controller")["image"]
    (c,) = containers(waypoint_deployment(controller))
    assert c["image"] == container(controller, "controller")["image"]


def test_waypoints_dial_the_controller_where_ztunnel_does(controller: Obj, ztunnel: Obj) -> None:
    (c,) = containers(waypoint_deployment(controller))
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env[ENV_XDS_ADDRESS] == ztunnel_config(ztunnel).xds_address


def test_waypoints_mount_the_root_the_controller_publishes(controller: Obj) -> None:
    deployment = waypoint_deployment(controller)
    (c,) = containers(deployment)
    root_path = next(e["value"] for e in c["env"] if e["name"] == ENV_ROOT_CERT)
    _, root_volume, inside = mount_of(deployment, c, root_path)
    assert root_volume["configMap"]["name"] == CONFIGMAP_NAME and inside == ROOT_CERT_KEY


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_gives_waypoints_the_image_the_user_sets(tmp_path: Path) -> None:
    """`kustomize edit set image loom=...` changes the containers' image; the kustomization's replacement
    carries it into LOOM_WAYPOINT_IMAGE too, so waypoints never run another build than the controller."""
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    settings = kustomization(copy)
    settings["images"] = [{"name": "loom", "newName": "registry.example.com/mesh/loom", "newTag": "9.9.9"}]
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(settings))
    result = subprocess.run(
        ["kubectl", "kustomize", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    built = [o for o in yaml.safe_load_all(result.stdout) if o]
    (deployment,) = [
        o for o in built if o["kind"] == "Deployment" and o["metadata"]["name"] == "loom-controller"
    ]
    c = container(deployment, "controller")
    assert c["image"] == "registry.example.com/mesh/loom:9.9.9"
    assert ControllerConfig.from_args(c["args"], env_of(c)).waypoint_image == c["image"]


# ---------------------------------------------------------------------------------------------------
# ztunnel


def test_ztunnel_sets_only_variables_ztunnel_reads(ztunnel: Obj) -> None:
    names = set(env_of(container(ztunnel, "istio-proxy")))
    read = RecordingEnv({})
    with pytest.raises(ValueError):  # NODE_NAME is required; what matters is what was looked up
        ZtunnelConfig.from_env(read)
    assert names <= read.asked, f"ztunnel does not read {sorted(names - read.asked)}"
    assert "NODE_NAME" in names


def test_ztunnel_environment_is_valid(ztunnel: Obj) -> None:
    config = ztunnel_config(ztunnel)
    assert config.node_name == NODE_NAME


def test_ztunnel_is_not_privileged_and_has_exactly_its_capabilities(ztunnel: Obj) -> None:
    spec = pod_spec(ztunnel)
    assert not spec.get("hostNetwork") and not spec.get("hostPID")
    security = container(ztunnel, "istio-proxy")["securityContext"]
    assert security["privileged"] is False and security["runAsUser"] == 0
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]}
    assert security["readOnlyRootFilesystem"] is True


def test_ztunnel_ports_probes_and_metrics_match_its_configuration(ztunnel: Obj) -> None:
    config = ztunnel_config(ztunnel)
    c = container(ztunnel, "istio-proxy")
    probe = c["readinessProbe"]
    assert probe["httpGet"]["path"] == "/healthz/ready" and probe_port(c, probe) == config.readiness_addr[1]
    annotations = ztunnel["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.metrics_addr[1]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert set(ports_by_name(c).values()) == {config.metrics_addr[1], config.readiness_addr[1]}
    # Admin stays on loopback: it is not a container port.
    assert config.admin_addr[0] == "127.0.0.1"


def test_ztunnel_dials_the_controller_by_the_name_in_its_certificate(
    docs: list[Document], ztunnel: Obj, controller: Obj
) -> None:
    config = ztunnel_config(ztunnel)
    controller_settings = controller_config(controller)
    service = find(docs, "Service", "loom-controller")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc-xds")
    expected = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    for address in (config.xds_address, config.ca_address):
        host, _, port = address.rpartition(":")
        assert host == expected and int(port) == grpc_port
        assert host in controller_settings.tls_dns_names
    assert config.cluster_id == controller_settings.cluster_id


def test_ztunnel_credential_is_a_projected_token_for_the_controllers_audience(
    ztunnel: Obj, controller: Obj
) -> None:
    config = ztunnel_config(ztunnel)
    c = container(ztunnel, "istio-proxy")
    mount, token_volume, inside = mount_of(ztunnel, c, str(config.node_token_file))
    assert mount.get("readOnly") is True
    (source,) = token_volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["path"] == inside
    assert token["audience"] in DEFAULT_AUDIENCES
    assert token["expirationSeconds"] >= 600  # the API server's minimum
    # The account the token names is one the controller trusts to request other identities.
    account = (ztunnel["metadata"]["namespace"], pod_spec(ztunnel)["serviceAccountName"])
    assert account in controller_config(controller).trusted_node_accounts
    assert pod_spec(ztunnel)["automountServiceAccountToken"] is False


def test_ztunnel_root_certificate_comes_from_the_configmap_the_controller_publishes(ztunnel: Obj) -> None:
    config = ztunnel_config(ztunnel)
    c = container(ztunnel, "istio-proxy")
    _, root_volume, inside = mount_of(ztunnel, c, str(config.root_cert))
    assert root_volume["configMap"]["name"] == CONFIGMAP_NAME == "istio-ca-root-cert"
    # Required, not optional: a ztunnel without the mesh root must wait for it, not start without.
    assert root_volume["configMap"].get("optional") is not True
    items = root_volume["configMap"].get("items")
    assert items is None or inside in {i["path"] for i in items}
    assert inside == ROOT_CERT_KEY == "root-cert.pem"


def test_ztunnel_grace_period_covers_its_drain_deadline(ztunnel: Obj) -> None:
    deadline = ztunnel_config(ztunnel).connection_termination_deadline.total_seconds()
    grace = pod_spec(ztunnel)["terminationGracePeriodSeconds"]
    assert deadline + DRAIN_MARGIN_SECONDS <= grace
    # Rolling updates start the new proxy before the old one stops (SO_REUSEPORT hand-over).
    rolling = ztunnel["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 1, "maxUnavailable": 0}
    assert parse_duration(env_of(container(ztunnel, "istio-proxy"))["CONNECTION_TERMINATION_DEADLINE"])


# ---------------------------------------------------------------------------------------------------
# the node agent


def test_agent_sets_only_variables_and_flags_it_reads(agent: Obj) -> None:
    c = container(agent, "agent")
    args, env = agent_args(agent)
    names = set(env.entries)
    assert all(n.startswith(ENV_PREFIX) for n in names)
    assert names <= env.asked, f"loom-cni-agent does not read {sorted(names - env.asked)}"
    config = config_from_args(args)
    assert config_problems(config) == []
    assert config.kubernetes and not config.manifests, "pods and namespaces come from the API"
    assert config.node == NODE_NAME
    assert config.annotate_store is None, "the annotation goes to the Pod, not to a lab store"
    assert flag_values(c["args"], "--http-addr") == [f"{config.http_host}:{config.http_port}"]


def test_agent_probes_and_metrics_use_its_http_port(agent: Obj) -> None:
    args, _ = agent_args(agent)
    config = config_from_args(args)
    c = container(agent, "agent")
    assert config.http_host == "0.0.0.0", "the kubelet and Prometheus reach it at the node's address"
    assert (
        probe_port(c, c["readinessProbe"]) == config.http_port
        and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    )
    assert (
        probe_port(c, c["livenessProbe"]) == config.http_port
        and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
    annotations = agent["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.http_port


def test_agent_runs_in_the_nodes_namespaces_with_root_privileges(agent: Obj) -> None:
    spec = pod_spec(agent)
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    security = container(agent, "agent")["securityContext"]
    assert security["privileged"] is True and security["runAsUser"] == 0
    # One agent per node: sockets and the host port cannot be shared during an update.
    assert agent["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 1}


def test_zds_socket_is_one_host_directory_shared_by_both_daemonsets(agent: Obj, ztunnel: Obj) -> None:
    ztunnel_socket = ztunnel_config(ztunnel).inpod_uds
    args, _ = agent_args(agent)
    agent_socket = config_from_args(args).zds_socket
    assert ztunnel_socket == agent_socket == DEFAULT_INPOD_UDS
    directory = str(PurePosixPath(DEFAULT_INPOD_UDS).parent)
    host_paths = set()
    for workload, name in ((ztunnel, "istio-proxy"), (agent, "agent")):
        _, host_volume, inside = mount_of(workload, container(workload, name), directory)
        assert inside == "."
        host_paths.add(host_volume["hostPath"]["path"])
    assert host_paths == {directory}


def test_agent_state_and_netns_directories_are_the_nodes(agent: Obj) -> None:
    args, _ = agent_args(agent)
    config = config_from_args(args)
    c = container(agent, "agent")
    for path in (config.plugin_socket, str(config.state_file)):
        _, host_volume, inside = mount_of(agent, c, path)
        assert str(PurePosixPath(host_volume["hostPath"]["path"]) / inside) == path
    mount, netns, inside = mount_of(agent, c, "/var/run/netns/cni-0000")
    assert netns["hostPath"]["path"] == "/var/run/netns" and inside == "cni-0000"
    assert mount["mountPropagation"] == "HostToContainer"


# ---------------------------------------------------------------------------------------------------
# the CNI plugin and its installer


def plugin_entry(docs: list[Document]) -> dict[str, Any]:
    text = find(docs, "ConfigMap", "loom-cni-config")["data"]["plugin.json"]
    return install_cni.read_plugin_entry(text, "ConfigMap loom-cni-config plugin.json")


def cni_stdin(entry: Mapping[str, Any], namespace: str) -> tuple[dict[str, str], bytes]:
    """What libcni hands the last plugin of a list on ADD: the entry plus the list's name and version
    and the previous plugin's result."""
    request = {
        **entry,
        "name": "k8s-pod-network",
        "cniVersion": "1.0.0",
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
            "ips": [{"address": "10.244.1.7/24", "interface": 0}],
        },
    }
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/var/run/netns/cni-1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=p;K8S_POD_UID=u",
        "CNI_PATH": "/opt/cni/bin",
    }
    return env, json.dumps(request).encode()


def test_plugin_configuration_is_accepted_by_the_plugin(docs: list[Document], agent: Obj) -> None:
    entry = plugin_entry(docs)
    env, stdin = cni_stdin(entry, "default")
    invocation = cni_plugin.parse_invocation(env, stdin)
    args, _ = agent_args(agent)
    assert invocation.config.agent_socket == config_from_args(args).plugin_socket
    # loom's own pods start even while their node's agent is down; the cluster's never wait on it.
    own_namespaces = {d.obj["metadata"]["namespace"] for d in installed() if d.obj["kind"] in WORKLOAD_KINDS}
    assert own_namespaces | {"kube-system"} <= invocation.config.excluded_namespaces


def install_cni_args(workload: Obj, name: str) -> Any:
    c = container(workload, name)
    return install_cni.argument_parser().parse_args(c["args"])


def test_install_cni_is_configured_with_the_nodes_directories_and_the_configmap(
    docs: list[Document], agent: Obj
) -> None:
    args = install_cni_args(agent, "install-cni")
    assert args.command == "install" and args.watch and args.interval > 0
    c = container(agent, "install-cni")
    for path, host in ((args.cni_bin_dir, "/opt/cni/bin"), (args.cni_net_dir, "/etc/cni/net.d")):
        _, host_volume, inside = mount_of(agent, c, str(path))
        assert host_volume["hostPath"]["path"] == host and inside == "."
    _, config_volume, key = mount_of(agent, c, str(args.plugin_config))
    assert config_volume["configMap"]["name"] == "loom-cni-config"
    assert key in find(docs, "ConfigMap", "loom-cni-config")["data"]
    # The readiness check looks at exactly what the installer maintains.
    probe_args = install_cni.argument_parser().parse_args(c["readinessProbe"]["exec"]["command"][3:])
    assert probe_args.command == "check"
    for key in ("bundle", "plugin_config", "cni_bin_dir", "cni_net_dir"):
        assert getattr(probe_args, key) == getattr(args, key)


def test_uninstall_cleans_the_directories_install_uses(agent: Obj) -> None:
    installed_args = install_cni_args(agent, "install-cni")
    (cleanup,) = [d.obj for d in installed(KUBERNETES / "uninstall") if d.obj["kind"] == "DaemonSet"]
    for name in ("uninstall-cni", "done"):
        args = install_cni_args(cleanup, name)
        assert args.command == "uninstall"
        assert (args.cni_bin_dir, args.cni_net_dir) == (
            installed_args.cni_bin_dir,
            installed_args.cni_net_dir,
        )
        c = container(cleanup, name)
        for path in (args.cni_bin_dir, args.cni_net_dir):
            _, cleanup_volume, _ = mount_of(cleanup, c, str(path))
            _, agent_volume, _ = mount_of(agent, container(agent, "install-cni"), str(path))
            assert cleanup_volume["hostPath"] == agent_volume["hostPath"]
    assert pod_spec(cleanup)["initContainers"][0]["name"] == "uninstall-cni"


# ---------------------------------------------------------------------------------------------------
# the optional CRDs


def test_optional_crds_define_what_the_controller_watches_with_a_status_subresource() -> None:
    crds = {
        d.obj["metadata"]["name"]: d.obj for d in documents(KUBERNETES / "crds" / "security-istio-io.yaml")
    }
    wanted = [r for r in WATCHED_RESOURCES if r.group == "security.istio.io"]
    assert set(crds) == {r.qualified_name for r in wanted}
    for resource in wanted:
        spec = crds[resource.qualified_name]["spec"]
        assert spec["group"] == resource.group and spec["names"]["kind"] == resource.kind
        assert spec["names"]["plural"] == resource.plural and spec["scope"] == "Namespaced"
        versions = {v["name"]: v for v in spec["versions"]}
        assert versions[resource.version]["served"] and versions[resource.version]["storage"]
        assert sum(1 for v in versions.values() if v["storage"]) == 1
        for v in versions.values():
            assert v["subresources"] == {"status": {}}
            assert v["schema"]["openAPIV3Schema"]["properties"]["spec"][
                "x-kubernetes-preserve-unknown-fields"
            ]


def test_volume_helper_names_a_missing_volume(ztunnel: Obj) -> None:
    with pytest.raises(AssertionError, match="no single volume"):
        volume(ztunnel, "no-such-volume")
