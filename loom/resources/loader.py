"""The validating loader: Kubernetes-format YAML/JSON (files, directories, text, API objects) to the model.

Theory of operation, in three layers:

1. Text to documents (`parse_yaml.read_documents`, or `json` for *.json): a syntax error is reported
   with its line and column and ends that file; the documents before it, and other files, still load.
2. Document to object (`check_object`): the kind and API version select a parser from `_KIND_SPECS`
   (kinds and versions loom does not read are skipped with a warning, never guessed at); the parser
   reads and type-checks every field loom uses and reports *all* problems of the object at once, each
   with its dotted field path. An object with any error is rejected as a whole (nothing of it is used);
   warnings (unknown spec fields, likely mistakes) leave it usable. `parse_object` is the same step for
   callers that want an exception, e.g. the Kubernetes API source.
3. Objects to a result (`_Loader`): `kind: List` documents are unpacked, empty documents skipped, and
   a second object with an already-seen `ResourceKey` is rejected with an error that names where the
   first one is (first wins, so adding a file can never silently replace existing config).

Every problem becomes a `Diagnostic` naming file, document, kind/namespace/name and field; the valid
objects of a file are returned even when others in it are invalid.

The lab helpers at the end turn a Deployment into its pods (`expand_deployment`, deterministic names
like the ReplicaSet controller's) and a Pod back into a manifest (`pod_to_manifest`), which
`parse_object` reads back to an equal Pod.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.model import (
    KINDS,
    AuthorizationPolicy,
    ConfigSnapshot,
    Deployment,
    ObjectMeta,
    Origin,
    Pod,
    Resource,
    ResourceKey,
)
from loom.resources.parse_common import (
    ObjectInvalid,
    Problems,
    UnsupportedKind,
    ValidationError,
    check_fields,
    is_list,
    is_mapping,
    read_metadata,
    type_name,
)
from loom.resources.parse_core import (
    POD_TEMPLATE_HASH_LABEL,
    parse_deployment,
    parse_namespace,
    parse_pod,
    parse_service,
    parse_service_account,
)
from loom.resources.parse_gateway import parse_gateway, parse_http_route
from loom.resources.parse_istio import parse_authorization_policy, parse_peer_authentication
from loom.resources.parse_yaml import MAX_DEPTH, read_documents

__all__ = [
    "CONFIG_SUFFIXES",
    "MAX_FILE_BYTES",
    "LoadResult",
    "ObjectCheck",
    "ObjectInvalid",
    "UnsupportedKind",
    "ValidationError",
    "check_object",
    "expand_deployment",
    "load_json",
    "load_paths",
    "load_text",
    "parse_object",
    "pod_template_hash",
    "pod_to_manifest",
]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# A config file larger than this is almost certainly not hand-written config (a log, a dump); reading
# it whole could exhaust memory. 10,000 pod manifests are about 5 MiB.
MAX_FILE_BYTES = 64 * 1024 * 1024

KindParser = Callable[[Problems, Mapping[Any, Any], ObjectMeta, Origin | None], Resource]


@dataclass(frozen=True, slots=True)
class _KindSpec:
    api_versions: tuple[str, ...]  # apiVersion values loom reads for this kind
    namespaced: bool
    name_rule: str  # "label" | "subdomain" | "1035" (see parse_common.check_name)
    parse: KindParser
    # Top-level fields besides apiVersion/kind/metadata/status. Others get a warning: a misspelt
    # `spec` would otherwise silently turn an AuthorizationPolicy into "allow nothing".
    fields: frozenset[str] = frozenset({"spec"})


_ISTIO_SECURITY = ("security.istio.io/v1", "security.istio.io/v1beta1")
_GATEWAY_API = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
_KIND_SPECS: dict[str, _KindSpec] = {
    "Namespace": _KindSpec(("v1",), False, "label", parse_namespace),
    "ServiceAccount": _KindSpec(
        ("v1",),
        True,
        "subdomain",
        parse_service_account,
        frozenset({"secrets", "imagePullSecrets", "automountServiceAccountToken"}),
    ),
    "Pod": _KindSpec(("v1",), True, "subdomain", parse_pod),
    "Deployment": _KindSpec(("apps/v1",), True, "subdomain", parse_deployment),
    "Service": _KindSpec(("v1",), True, "1035", parse_service),
    "AuthorizationPolicy": _KindSpec(_ISTIO_SECURITY, True, "subdomain", parse_authorization_policy),
    "PeerAuthentication": _KindSpec(_ISTIO_SECURITY, True, "subdomain", parse_peer_authentication),
    "Gateway": _KindSpec(_GATEWAY_API, True, "subdomain", parse_gateway),
    "HTTPRoute": _KindSpec(_GATEWAY_API, True, "subdomain", parse_http_route),
}
assert set(_KIND_SPECS) == set(KINDS), "every modelled kind needs a parser"
_COMMON_FIELDS = frozenset({"apiVersion", "kind", "metadata", "status"})


# ---------------------------------------------------------------------------------------------------
# One object


@dataclass(frozen=True, slots=True)
class ObjectCheck:
    """The outcome of reading one object and its problems. `obj` is None when the object was skipped or
    rejected, except for a rejected object that stands in fail-closed (see `fail_closed_stand_in`)."""

    obj: Resource | None
    key: ResourceKey | None  # known when the kind and name could be read
    errors: tuple[ValidationError, ...] = ()
    warnings: tuple[ValidationError, ...] = ()
    unsupported: UnsupportedKind | None = None  # set when skipped because loom does not read the kind

    def diagnostics(self, origin: Origin | None) -> list[Diagnostic]:
        found = [Diagnostic(Severity.ERROR, e.message, origin, self.key, e.field) for e in self.errors]
        if self.unsupported is not None:
            unsupported = self.unsupported
            found.append(
                Diagnostic(Severity.WARNING, unsupported.message, origin, self.key, unsupported.field)
            )
        found.extend(
            Diagnostic(Severity.WARNING, w.message, origin, self.key, w.field) for w in self.warnings
        )
        return found


def _read_type_field(p: Problems, doc: Mapping[Any, Any], key: str) -> str:
    value = doc.get(key)
    if isinstance(value, str) and value:
        return value
    if value is None:
        p.error(key, "required field is missing")
    elif isinstance(value, str):
        p.error(key, "must not be empty")
    else:
        p.error(key, f"expected a string, got {type_name(value)}")
    return ""


def _loose_key(kind: str, doc: Mapping[Any, Any]) -> ResourceKey | None:
    """A key for messages about objects that are not parsed (skipped kinds): name and namespace as
    written, since the kind's scope is unknown."""
    meta = doc.get("metadata")
    if not is_mapping(meta):
        return None
    name = meta.get("name")
    namespace = meta.get("namespace")
    if not isinstance(name, str) or not name:
        return None
    return ResourceKey(kind, namespace if isinstance(namespace, str) else "", name)


def check_object(doc: object, origin: Origin | None = None, *, field_prefix: str = "") -> ObjectCheck:
    """Read one manifest: never raises for bad input; every problem is in the result.

    `field_prefix` is prepended to field paths (e.g. "items[2]" for an object inside a List)."""
    p = Problems(field_prefix)
    if not is_mapping(doc):
        p.error("", f"expected a mapping (a Kubernetes object), got {type_name(doc)}")
        return ObjectCheck(None, None, tuple(p.errors))
    api_version = _read_type_field(p, doc, "apiVersion")
    kind = _read_type_field(p, doc, "kind")
    if not kind:  # without a kind nothing else can be read
        return ObjectCheck(None, None, tuple(p.errors))
    spec = _KIND_SPECS.get(kind)
    if spec is None or (api_version and api_version not in spec.api_versions):
        key = _loose_key(kind, doc)
        if p.errors:  # apiVersion missing or not a string
            return ObjectCheck(None, key, tuple(p.errors))
        if spec is None:
            message = f"{api_version} {kind} is not a kind loom reads; skipped"
        else:
            message = (
                f"{api_version} {kind} is not an API version loom reads "
                f"(it reads {' and '.join(spec.api_versions)}); skipped"
            )
        return ObjectCheck(None, key, unsupported=UnsupportedKind(api_version, kind, message, field_prefix))
    # A known kind with a missing apiVersion is still read, to report all of its problems at once.
    check_fields(p, doc, _COMMON_FIELDS | spec.fields, "")
    meta, named = read_metadata(p, doc, namespaced=spec.namespaced, name_rule=spec.name_rule)
    key = ResourceKey(kind, meta.namespace, meta.name) if named else None
    obj = spec.parse(p, doc, meta, origin)
    if not obj.KEEP_RAW:
        obj = replace(obj, raw={})
    if p.errors:
        stand_in = fail_closed_stand_in(obj, p.errors) if key is not None else None
        return ObjectCheck(stand_in, key, tuple(p.errors), tuple(p.warnings))
    return ObjectCheck(obj, key, (), tuple(p.warnings))


def fail_closed_stand_in(obj: Resource, errors: Sequence[ValidationError]) -> Resource | None:
    """What replaces a rejected object whose absence would weaken security, or None.

    An invalid AuthorizationPolicy becomes a DENY of everything in its scope. The scope is widened
    when the part that defines it could not be read: a bad selector means the whole namespace, and
    bad targetRefs mean no targetRefs (the node proxies enforce it)."""
    if not isinstance(obj, AuthorizationPolicy):
        return None
    fields = [e.field for e in errors]
    selector_bad = any(f.startswith("spec.selector") for f in fields)
    targets_bad = any(f.startswith(("spec.targetRef", "spec.targetRefs")) for f in fields)
    return replace(
        obj,
        invalid=True,
        action="DENY",
        rules=None,
        provider="",
        selector=None if selector_bad else obj.selector,
        target_refs=() if targets_bad or selector_bad else obj.target_refs,
    )


def parse_object(doc: Mapping[str, Any], origin: Origin | None = None) -> Resource:
    """Read one manifest (from a file or the Kubernetes API) into its model dataclass.

    Raises ObjectInvalid listing every error of the object, or UnsupportedKind when loom does not read
    the kind/API version. Warnings are dropped; use `check_object` to see them."""
    check = check_object(doc, origin)
    if check.errors:
        raise ObjectInvalid(check.errors, check.key, stand_in=check.obj)
    if check.unsupported is not None:
        raise check.unsupported
    assert check.obj is not None  # no errors and not skipped means parsed
    return check.obj


# ---------------------------------------------------------------------------------------------------
# Many objects


@dataclass(frozen=True, slots=True)
class LoadResult:
    objects: tuple[Resource, ...]  # the valid objects, in file and document order
    diagnostics: tuple[Diagnostic, ...]  # every error and warning, in the same order

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.is_error)

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if not d.is_error)

    @property
    def snapshot(self) -> ConfigSnapshot:
        return ConfigSnapshot.of(self.objects)


class _Loader:
    """Accumulates objects and diagnostics over documents and files; the first object of a key wins."""

    def __init__(self) -> None:
        self.objects: dict[ResourceKey, Resource] = {}
        self.diagnostics: list[Diagnostic] = []

    def result(self) -> LoadResult:
        return LoadResult(tuple(self.objects.values()), tuple(self.diagnostics))

    def error(
        self, message: str, origin: Origin | None, key: ResourceKey | None = None, field: str = ""
    ) -> None:
        self.diagnostics.append(Diagnostic(Severity.ERROR, message, origin, key, field))

    def add_yaml(self, text: str, source: str) -> None:
        read = read_documents(text)
        for document in read.documents:
            self.add_document(document.value, Origin(source, document.number))
        if read.error is not None:
            self.error(str(read.error), Origin(source))

    def add_json(self, text: str, source: str) -> None:
        try:
            value = parse_json(text)
        except JsonInputError as exc:
            self.error(str(exc), Origin(source))
            return
        self.add_document(value, Origin(source, 1))

    def add_document(self, value: object, origin: Origin) -> None:
        if value is None:
            return  # an empty document (e.g. after a trailing ---)
        if is_mapping(value) and value.get("kind") == "List":
            items = value.get("items")
            if items is None:
                return
            if not is_list(items):
                self.error(f"expected a list, got {type_name(items)}", origin, None, "items")
                return
            for i, item in enumerate(items):
                self.add_object(item, origin, f"items[{i}]")
            return
        self.add_object(value, origin, "")

    def add_object(self, doc: object, origin: Origin, prefix: str) -> None:
        check = check_object(doc, origin, field_prefix=prefix)
        self.diagnostics.extend(check.diagnostics(origin))
        obj = check.obj
        if obj is None:
            return
        key = obj.key
        first = self.objects.get(key)
        if first is not None:
            where = str(first.origin) if first.origin is not None else "another source"
            self.error(f"already defined in {where}; this definition is ignored", origin, key, prefix)
            return
        self.objects[key] = obj


class JsonInputError(ValueError):
    """A JSON text loom refuses; the message says why (and where, for syntax errors)."""


class _DuplicateJsonKey(Exception):
    pass


def parse_json(text: str) -> object:
    """JSON with loom's input rules: duplicate keys are errors (a silently dropped duplicate could be
    `action: DENY`), and nesting is bounded by MAX_DEPTH. Raises JsonInputError."""
    try:
        value = json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as exc:
        raise JsonInputError(f"line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except _DuplicateJsonKey as exc:
        raise JsonInputError(f"duplicate key {exc.args[0]!r}") from exc
    except RecursionError as exc:
        raise JsonInputError(f"nesting deeper than {MAX_DEPTH} levels") from exc
    except ValueError as exc:  # e.g. an integer longer than Python's int parsing limit
        raise JsonInputError(str(exc)) from exc
    if _depth_exceeds(value, MAX_DEPTH):
        raise JsonInputError(f"nesting deeper than {MAX_DEPTH} levels")
    return value


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for k, v in pairs:
        if k in result:
            raise _DuplicateJsonKey(k)
        result[k] = v
    return result


def _depth_exceeds(value: object, limit: int) -> bool:
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


def load_text(text: str, source: str) -> LoadResult:
    """Load a multi-document YAML text; `source` names it in diagnostics (usually a file name)."""
    loader = _Loader()
    loader.add_yaml(text, source)
    return loader.result()


def load_json(text: str, source: str) -> LoadResult:
    """Load one JSON document (an object or a `kind: List`); `source` names it in diagnostics."""
    loader = _Loader()
    loader.add_json(text, source)
    return loader.result()


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _config_files(directory: Path) -> list[Path]:
    """Config files under a directory, recursively, skipping hidden files and directories (editor
    swap files, `.git`, and the `..data` symlinks of mounted ConfigMaps), in a stable order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found.extend(
            Path(dirpath, f) for f in filenames if not _is_hidden(f) and f.lower().endswith(CONFIG_SUFFIXES)
        )
    return sorted(found, key=lambda f: f.relative_to(directory).parts)


def _source_name(file: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return file.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(file)


def _read_file(loader: _Loader, file: Path, source: str) -> None:
    try:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            loader.error(f"file is {size} bytes, more than the limit of {MAX_FILE_BYTES}", Origin(source))
            return
        data = file.read_bytes()
    except OSError as exc:
        loader.error(f"cannot read: {exc.strerror or exc}", Origin(source))
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        loader.error(f"not UTF-8 text (invalid byte at offset {exc.start})", Origin(source))
        return
    if file.name.lower().endswith(".json"):
        loader.add_json(text, source)
    else:
        loader.add_yaml(text, source)


def load_paths(paths: Sequence[Path], root: Path | None = None) -> LoadResult:
    """Load files and directories (recursively: *.yaml, *.yml, *.json, hidden entries skipped).

    Diagnostics name files relative to `root` when given, else as given. A file named explicitly is
    read whatever its suffix."""
    loader = _Loader()
    for path in paths:
        if path.is_dir():
            for file in _config_files(path):
                _read_file(loader, file, _source_name(file, root))
        elif path.exists():
            _read_file(loader, path, _source_name(path, root))
        else:
            loader.error("no such file or directory", Origin(_source_name(path, root)))
    return loader.result()


# ---------------------------------------------------------------------------------------------------
# The lab's pods: Deployment -> Pods, Pod -> manifest

# The ReplicaSet controller's alphabet for generated names: digits and consonants only, so generated
# names never spell words.
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_TEMPLATE_HASH_LENGTH = 10
_SUFFIX_LENGTH = 5
# Kubernetes truncates a generateName prefix to this length so that prefix + 5 random characters
# still fit a 63-character label.
_MAX_GENERATED_PREFIX = 58


def _encode(material: str, length: int) -> str:
    number = int.from_bytes(hashlib.sha256(material.encode()).digest(), "big")
    chars = []
    for _ in range(length):
        number, index = divmod(number, len(_NAME_ALPHABET))
        chars.append(_NAME_ALPHABET[index])
    return "".join(chars)


def pod_template_hash(dep: Deployment) -> str:
    """A 10-character hash of the pod template (labels, annotations, spec): it changes exactly when
    the template does, like the pod-template-hash of a ReplicaSet."""
    material = repr(
        (sorted(dep.template_labels.items()), sorted(dep.template_annotations.items()), dep.template)
    )
    return _encode(material, _TEMPLATE_HASH_LENGTH)


def expand_deployment(dep: Deployment) -> list[Pod]:
    """The deployment's pods for the lab, identical on every run: named
    `<deployment>-<template hash>-<suffix>`, labelled with the template labels plus pod-template-hash,
    not scheduled yet (no node, no IPs, phase Pending). Raises ValueError if the selector does not
    match the template labels (the parser rejects such Deployments)."""
    if not dep.selector.matches(dep.template_labels):
        raise ValueError(f"{dep.key}: spec.selector does not match the template labels")
    template_hash = pod_template_hash(dep)
    prefix = f"{dep.name}-{template_hash}-"[:_MAX_GENERATED_PREFIX]
    labels = {**dep.template_labels, POD_TEMPLATE_HASH_LABEL: template_hash}
    pods: list[Pod] = []
    used: set[str] = set()
    for index in range(dep.replicas):
        attempt = 0
        while True:  # a suffix collision among 27**5 values is rare; the next attempt resolves it
            suffix = _encode(f"{dep.namespace}/{dep.name}/{template_hash}/{index}/{attempt}", _SUFFIX_LENGTH)
            if suffix not in used:
                break
            attempt += 1
        used.add(suffix)
        pod = Pod(
            meta=ObjectMeta(
                name=prefix + suffix,
                namespace=dep.namespace,
                labels=dict(labels),
                annotations=dict(dep.template_annotations),
            ),
            origin=dep.origin,
            spec=dep.template,
            ips=(),
            phase="Pending",
            ready=False,
            owner_deployment=dep.name,
        )
        pods.append(replace(pod, raw=pod_to_manifest(pod)))
    return pods


def pod_to_manifest(pod: Pod) -> dict[str, Any]:
    """A Pod manifest (apiVersion v1) that `parse_object` reads back to an equal Pod."""
    meta: dict[str, Any] = {"name": pod.name, "namespace": pod.namespace}
    if pod.meta.labels:
        meta["labels"] = dict(pod.meta.labels)
    if pod.meta.annotations:
        meta["annotations"] = dict(pod.meta.annotations)
    if pod.meta.uid:
        meta["uid"] = pod.meta.uid
    if pod.meta.resource_version:
        meta["resourceVersion"] = pod.meta.resource_version
    if pod.meta.generation:
        meta["generation"] = pod.meta.generation
    if pod.owner_deployment:
        template_hash = pod.meta.labels.get(POD_TEMPLATE_HASH_LABEL) or _encode(
            pod.owner_deployment, _TEMPLATE_HASH_LENGTH
        )
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": f"{pod.owner_deployment}-{template_hash}",
                "controller": True,
            }
        ]
    spec: dict[str, Any] = {"serviceAccountName": pod.spec.service_account}
    if pod.spec.node_name:
        spec["nodeName"] = pod.spec.node_name
    if pod.spec.host_network:
        spec["hostNetwork"] = True
    containers = []
    for c in pod.spec.containers:
        container: dict[str, Any] = {"name": c.name}
        if c.image:
            container["image"] = c.image
        if c.ports:
            container["ports"] = [
                {"containerPort": port.container_port, "protocol": port.protocol}
                | ({"name": port.name} if port.name else {})
                for port in c.ports
            ]
        if c.command:
            container["command"] = list(c.command)
        if c.args:
            container["args"] = list(c.args)
        containers.append(container)
    spec["containers"] = containers
    status: dict[str, Any] = {
        "phase": pod.phase,
        "conditions": [{"type": "Ready", "status": "True" if pod.ready else "False"}],
    }
    if pod.ips:
        status["podIP"] = pod.ips[0]
        status["podIPs"] = [{"ip": ip} for ip in pod.ips]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}
