"""Parsers for the core Kubernetes kinds: Namespace, ServiceAccount, Pod, Deployment (apps/v1), Service.

Each `parse_<kind>(p, doc, meta, origin)` reads the fields loom models from an already type-checked
manifest, records problems in `p` (see `parse_common`) and returns the dataclass; the caller drops the
object if `p` holds errors. Pods are read with their status (IPs, phase, readiness) and owner, because
the same parser serves objects read from the Kubernetes API.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loom.resources.model import (
    DATAPLANE_MODE_AMBIENT,
    DATAPLANE_MODE_NONE,
    LABEL_DATAPLANE_MODE,
    Container,
    ContainerPort,
    Deployment,
    LabelSelector,
    Namespace,
    ObjectMeta,
    Origin,
    Pod,
    PodTemplate,
    Service,
    ServiceAccount,
    ServicePort,
)
from loom.resources.parse_common import (
    OBJECT_META_FIELDS,
    Problems,
    check_fields,
    check_name,
    get_bool,
    get_enum,
    get_int,
    get_mapping,
    get_port,
    get_str,
    get_str_map,
    get_strs,
    iana_svc_name_problem,
    ip_problem,
    is_int,
    items_of,
    join,
    label_key_problem,
    label_value_problem,
    quote,
    read_annotations,
    read_label_selector,
    read_labels,
    type_name,
)

PROTOCOLS = ("TCP", "UDP", "SCTP")
POD_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")
CONDITION_STATUSES = ("True", "False", "Unknown")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
CLUSTER_IP_NONE = "None"  # spec.clusterIP of a headless Service
POD_TEMPLATE_HASH_LABEL = "pod-template-hash"

# The fields the Kubernetes API defines, so that only real typos get an "unknown field" warning.
POD_SPEC_FIELDS = frozenset(
    {
        "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers", "dnsConfig",
        "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork",
        "hostPID", "hostUsers", "hostname", "hostnameOverride", "imagePullSecrets", "initContainers",
        "nodeName", "nodeSelector", "os", "overhead", "preemptionPolicy", "priority", "priorityClassName",
        "readinessGates", "resourceClaims", "resources", "restartPolicy", "runtimeClassName",
        "schedulerName", "schedulingGates", "securityContext", "serviceAccount", "serviceAccountName",
        "setHostnameAsFQDN", "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds",
        "tolerations", "topologySpreadConstraints", "volumes", "workloadRef",
    }
)  # fmt: skip
CONTAINER_FIELDS = frozenset(
    {
        "args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe",
        "name", "ports", "readinessProbe", "resizePolicy", "resources", "restartPolicy",
        "restartPolicyRules", "securityContext", "startupProbe", "stdin", "stdinOnce",
        "terminationMessagePath", "terminationMessagePolicy", "tty", "volumeDevices", "volumeMounts",
        "workingDir",
    }
)  # fmt: skip
CONTAINER_PORT_FIELDS = frozenset({"containerPort", "hostIP", "hostPort", "name", "protocol"})
DEPLOYMENT_SPEC_FIELDS = frozenset(
    {
        "minReadySeconds", "paused", "progressDeadlineSeconds", "replicas", "revisionHistoryLimit",
        "selector", "strategy", "template",
    }
)  # fmt: skip
POD_TEMPLATE_FIELDS = frozenset({"metadata", "spec"})
SERVICE_SPEC_FIELDS = frozenset(
    {
        "allocateLoadBalancerNodePorts", "clusterIP", "clusterIPs", "externalIPs", "externalName",
        "externalTrafficPolicy", "healthCheckNodePort", "internalTrafficPolicy", "ipFamilies",
        "ipFamilyPolicy", "loadBalancerClass", "loadBalancerIP", "loadBalancerSourceRanges", "ports",
        "publishNotReadyAddresses", "selector", "sessionAffinity", "sessionAffinityConfig",
        "trafficDistribution", "type",
    }
)  # fmt: skip
SERVICE_PORT_FIELDS = frozenset({"appProtocol", "name", "nodePort", "port", "protocol", "targetPort"})


def check_dataplane_mode(p: Problems, labels: Mapping[str, str], path: str) -> None:
    """A misspelt enrolment label silently leaves workloads out of the mesh; say so."""
    mode = labels.get(LABEL_DATAPLANE_MODE)
    if mode is not None and mode not in (DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_NONE):
        p.warning(
            f"{path}.{LABEL_DATAPLANE_MODE}",
            f"unknown value {quote(mode)} has no effect (expected {DATAPLANE_MODE_AMBIENT} or "
            f"{DATAPLANE_MODE_NONE})",
        )


# ---------------------------------------------------------------------------------------------------
# Namespace, ServiceAccount


def parse_namespace(
    p: Problems, doc: Mapping[Any, Any], meta: ObjectMeta, origin: Origin | None
) -> Namespace:
    check_dataplane_mode(p, meta.labels, "metadata.labels")
    return Namespace(meta=meta, origin=origin, raw=doc)


def parse_service_account(
    p: Problems, doc: Mapping[Any, Any], meta: ObjectMeta, origin: Origin | None
) -> ServiceAccount:
    return ServiceAccount(meta=meta, origin=origin, raw=doc)


# ---------------------------------------------------------------------------------------------------
# Pod spec (also a Deployment's template.spec)


def read_container(p: Problems, c: Mapping[Any, Any], path: str) -> Container:
    check_fields(p, c, CONTAINER_FIELDS, path)
    name = get_str(p, c, "name", path, required=True)
    if name:
        check_name(p, name, join(path, "name"), "label")
    ports: list[ContainerPort] = []
    for port_path, port in items_of(p, c, "ports", path):
        check_fields(p, port, CONTAINER_PORT_FIELDS, port_path)
        number = get_port(p, port, "containerPort", port_path, required=True)
        port_name = get_str(p, port, "name", port_path)
        if port_name:
            problem = iana_svc_name_problem(port_name)
            if problem is not None:
                p.error(join(port_path, "name"), problem)
        protocol = get_enum(p, port, "protocol", port_path, PROTOCOLS, "TCP")
        ports.append(ContainerPort(container_port=number, name=port_name, protocol=protocol))
    return Container(
        name=name,
        image=get_str(p, c, "image", path),
        ports=tuple(ports),
        command=get_strs(p, c, "command", path),
        args=get_strs(p, c, "args", path),
    )


def read_pod_spec(p: Problems, spec: Mapping[Any, Any], path: str) -> PodTemplate:
    check_fields(p, spec, POD_SPEC_FIELDS, path)
    account = get_str(p, spec, "serviceAccountName", path)
    account_field = "serviceAccountName"
    legacy = get_str(p, spec, "serviceAccount", path)  # deprecated alias, still accepted by the API
    if not account and legacy:
        account, account_field = legacy, "serviceAccount"
    elif account and legacy and legacy != account:
        p.warning(join(path, "serviceAccount"), f"ignored: differs from serviceAccountName {quote(account)}")
    if account:
        # The account name becomes part of the workload's SPIFFE identity: it must not smuggle in '/'.
        check_name(p, account, join(path, account_field), "subdomain")
    node = get_str(p, spec, "nodeName", path)
    if node:
        check_name(p, node, join(path, "nodeName"), "subdomain")
    host_network = get_bool(p, spec, "hostNetwork", path)
    containers: list[Container] = []
    seen: set[str] = set()
    for container_path, c in items_of(p, spec, "containers", path):
        container = read_container(p, c, container_path)
        if container.name and container.name in seen:
            p.error(join(container_path, "name"), f"duplicate container name {quote(container.name)}")
        seen.add(container.name)
        containers.append(container)
    return PodTemplate(
        service_account=account or "default",
        node_name=node,
        host_network=host_network,
        containers=tuple(containers),
    )


def read_pod_status(p: Problems, doc: Mapping[Any, Any]) -> tuple[tuple[str, ...], str, bool]:
    """(ips, phase, ready). Without a status a pod is not scheduled yet: Pending and not ready."""
    status = get_mapping(p, doc, "status", "")
    if status is None:
        return (), "Pending", False
    ips: list[str] = []
    pod_ip = get_str(p, status, "podIP", "status")
    if pod_ip:
        problem = ip_problem(pod_ip)
        if problem is None:
            ips.append(pod_ip)
        else:
            p.error("status.podIP", problem)
    for ip_path, entry in items_of(p, status, "podIPs", "status"):
        ip = get_str(p, entry, "ip", ip_path, required=True)
        if ip:
            problem = ip_problem(ip)
            if problem is not None:
                p.error(join(ip_path, "ip"), problem)
            elif ip not in ips:
                ips.append(ip)
    phase = get_enum(p, status, "phase", "status", POD_PHASES, "Pending")
    ready: bool | None = None
    for cond_path, cond in items_of(p, status, "conditions", "status"):
        cond_type = get_str(p, cond, "type", cond_path, required=True)
        cond_status = get_enum(p, cond, "status", cond_path, CONDITION_STATUSES, "Unknown", required=True)
        if cond_type == "Ready":
            ready = cond_status == "True"
    if ready is None:
        # Hand-written manifests often give only a phase; the API server always reports the condition.
        ready = phase == "Running"
    return tuple(ips), phase, ready


def read_owner_deployment(p: Problems, doc: Mapping[Any, Any], labels: Mapping[str, str]) -> str:
    """The Deployment behind a pod: its controlling ReplicaSet is named `<deployment>-<template hash>`."""
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping):
        return ""
    owner = ""
    for ref_path, ref in items_of(p, meta, "ownerReferences", "metadata"):
        kind = get_str(p, ref, "kind", ref_path, required=True)
        name = get_str(p, ref, "name", ref_path, required=True)
        controller = get_bool(p, ref, "controller", ref_path)
        get_str(p, ref, "apiVersion", ref_path)
        get_str(p, ref, "uid", ref_path)
        if kind == "ReplicaSet" and name and (controller or not owner):
            owner = name
    if not owner:
        return ""
    template_hash = labels.get(POD_TEMPLATE_HASH_LABEL, "")
    if template_hash and owner.endswith("-" + template_hash):
        return owner[: -len(template_hash) - 1]
    head, dash, _ = owner.rpartition("-")
    return head if dash else ""


def parse_pod(p: Problems, doc: Mapping[Any, Any], meta: ObjectMeta, origin: Origin | None) -> Pod:
    check_dataplane_mode(p, meta.labels, "metadata.labels")
    spec = get_mapping(p, doc, "spec", "")
    template = read_pod_spec(p, spec, "spec") if spec is not None else PodTemplate()
    ips, phase, ready = read_pod_status(p, doc)
    return Pod(
        meta=meta,
        origin=origin,
        raw=doc,
        spec=template,
        ips=ips,
        phase=phase,
        ready=ready,
        owner_deployment=read_owner_deployment(p, doc, meta.labels),
    )


# ---------------------------------------------------------------------------------------------------
# Deployment


def parse_deployment(
    p: Problems, doc: Mapping[Any, Any], meta: ObjectMeta, origin: Origin | None
) -> Deployment:
    spec = get_mapping(p, doc, "spec", "")
    if spec is None:
        if doc.get("spec") is None:
            p.error("spec", "required field is missing")
        return Deployment(meta=meta, origin=origin, raw=doc)
    check_fields(p, spec, DEPLOYMENT_SPEC_FIELDS, "spec")
    replicas = get_int(p, spec, "replicas", "spec", 1, 0)
    errors_before_selector = len(p.errors)
    selector = read_label_selector(p, spec, "selector", "spec", expressions=True)
    if selector is None:
        if spec.get("selector") is None:
            p.error("spec.selector", "required field is missing")
    elif selector.empty:
        p.error("spec.selector", "must not be empty (it would select every pod)")
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    pod_spec = PodTemplate()
    template = get_mapping(p, spec, "template", "spec")
    if template is None:
        if spec.get("template") is None:
            p.error("spec.template", "required field is missing")
    else:
        check_fields(p, template, POD_TEMPLATE_FIELDS, "spec.template")
        template_meta = get_mapping(p, template, "metadata", "spec.template")
        if template_meta is not None:
            check_fields(p, template_meta, OBJECT_META_FIELDS, "spec.template.metadata")
            labels = read_labels(p, template_meta, "labels", "spec.template.metadata")
            annotations = read_annotations(p, template_meta, "annotations", "spec.template.metadata")
            check_dataplane_mode(p, labels, "spec.template.metadata.labels")
        template_spec = get_mapping(p, template, "spec", "spec.template")
        if template_spec is not None:
            pod_spec = read_pod_spec(p, template_spec, "spec.template.spec")
    selector_ok = len(p.errors) == errors_before_selector
    if selector is not None and not selector.empty and selector_ok and not selector.matches(labels):
        p.error("spec.selector", "does not match the template labels (spec.template.metadata.labels)")
    return Deployment(
        meta=meta,
        origin=origin,
        raw=doc,
        replicas=replicas,
        selector=selector if selector is not None else LabelSelector(),
        template_labels=labels,
        template_annotations=annotations,
        template=pod_spec,
    )


# ---------------------------------------------------------------------------------------------------
# Service


def read_target_port(p: Problems, port: Mapping[Any, Any], path: str) -> int | str:
    value = port.get("targetPort")
    if value is None:
        return 0
    here = join(path, "targetPort")
    if is_int(value):
        if 1 <= value <= 65535:
            return value
        p.error(here, f"must be between 1 and 65535, got {value}")
    elif isinstance(value, str):
        problem = iana_svc_name_problem(value)
        if problem is None:
            return value
        p.error(here, problem)
    else:
        p.error(here, f"expected a port number or a port name, got {type_name(value)}")
    return 0


def read_service_ports(p: Problems, spec: Mapping[Any, Any]) -> tuple[ServicePort, ...]:
    entries = items_of(p, spec, "ports", "spec")
    ports: list[ServicePort] = []
    names: set[str] = set()
    numbers: set[tuple[int, str]] = set()
    for port_path, port in entries:
        check_fields(p, port, SERVICE_PORT_FIELDS, port_path)
        number = get_port(p, port, "port", port_path, required=True)
        name = get_str(p, port, "name", port_path)
        if name:
            check_name(p, name, join(port_path, "name"), "label")
            if name in names:
                p.error(join(port_path, "name"), f"duplicate port name {quote(name)}")
            names.add(name)
        elif len(entries) > 1:
            p.error(join(port_path, "name"), "required when a Service has more than one port")
        protocol = get_enum(p, port, "protocol", port_path, PROTOCOLS, "TCP")
        if number:
            if (number, protocol) in numbers:
                p.error(join(port_path, "port"), f"duplicate port {number}/{protocol}")
            numbers.add((number, protocol))
        ports.append(
            ServicePort(
                port=number,
                name=name,
                protocol=protocol,
                target_port=read_target_port(p, port, port_path),
                app_protocol=get_str(p, port, "appProtocol", port_path),
            )
        )
    return tuple(ports)


def read_cluster_ips(p: Problems, spec: Mapping[Any, Any]) -> tuple[tuple[str, ...], bool]:
    cluster_ip = get_str(p, spec, "clusterIP", "spec")
    cluster_ips = get_strs(p, spec, "clusterIPs", "spec")
    if cluster_ip and cluster_ips and cluster_ips[0] != cluster_ip:
        p.error("spec.clusterIPs[0]", f"must equal spec.clusterIP {quote(cluster_ip)}")
    headless = cluster_ip == CLUSTER_IP_NONE or (bool(cluster_ips) and cluster_ips[0] == CLUSTER_IP_NONE)
    if headless:
        if len(cluster_ips) > 1:
            p.error("spec.clusterIPs", 'must hold only "None" for a headless Service')
        return (), True
    if cluster_ip:
        problem = ip_problem(cluster_ip)
        if problem is not None:
            p.error("spec.clusterIP", problem + ' (or "None" for a headless Service)')
    for i, ip in enumerate(cluster_ips):
        problem = ip_problem(ip)
        if problem is not None:
            p.error(f"spec.clusterIPs[{i}]", problem)
    if cluster_ips:
        return cluster_ips, False
    return ((cluster_ip,) if cluster_ip else ()), False


def parse_service(p: Problems, doc: Mapping[Any, Any], meta: ObjectMeta, origin: Origin | None) -> Service:
    spec = get_mapping(p, doc, "spec", "")
    if spec is None:
        return Service(meta=meta, origin=origin, raw=doc)
    check_fields(p, spec, SERVICE_SPEC_FIELDS, "spec")
    selector = get_str_map(p, spec, "selector", "spec")
    if selector:
        for k, v in selector.items():
            problem = label_key_problem(k) or label_value_problem(v)
            if problem is not None:
                p.error(f"spec.selector.{k}", problem)
    cluster_ips, headless = read_cluster_ips(p, spec)
    return Service(
        meta=meta,
        origin=origin,
        raw=doc,
        selector=selector,
        ports=read_service_ports(p, spec),
        cluster_ips=cluster_ips,
        headless=headless,
        type=get_enum(p, spec, "type", "spec", SERVICE_TYPES, "ClusterIP"),
    )
