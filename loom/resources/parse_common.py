"""Shared machinery of the per-kind parsers: the error types, a problem collector, typed field readers.

Theory of operation: a parser walks one manifest (a JSON-like tree of dicts, lists and scalars) and
reads only the fields loom uses. Every read goes through a reader below that checks the type (and the
range or syntax where the API defines one) and, on a problem, records it in a `Problems` collector
under the dotted field path (`spec.rules[0].from[0].source.namespaces`) and returns a neutral default,
so parsing continues and one pass reports *every* problem of the object. The caller turns a non-empty
error list into one `ObjectInvalid`.

Paths are only formatted when something is wrong, so the readers stay cheap on the happy path: they
take the path of the enclosing mapping plus the key. JSON `null` counts as "not set", as it does for
the Kubernetes API server.

The checks mirror what the Kubernetes API server, Istio's validation webhook or the Gateway API CRD
rules would reject, because a config directory is loom's admission control: an object accepted here
must be one the real API would have accepted too.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from loom.resources.model import LabelSelector, ObjectMeta, Resource, ResourceKey


class ValidationError(Exception):
    """One problem with one field of an object."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field  # dotted path with list indexes, e.g. spec.rules[0].to[0].operation.ports
        self.message = message


class ObjectInvalid(ValidationError):
    """Every problem found in one object; `field`/`message` are those of the first problem."""

    def __init__(
        self,
        errors: Sequence[ValidationError],
        key: ResourceKey | None = None,
        stand_in: Resource | None = None,
    ) -> None:
        if not errors:
            raise ValueError("ObjectInvalid needs at least one error")
        super().__init__(errors[0].field, errors[0].message)
        self.args = ("; ".join(str(e) for e in errors),)
        self.errors = list(errors)
        self.key = key  # the object's key, when its kind and name could be read
        # What to use in place of the rejected object when dropping it would weaken security
        # (an invalid AuthorizationPolicy: see AuthorizationPolicy.invalid); None for other kinds.
        self.stand_in = stand_in


class UnsupportedKind(ValidationError):
    """The object is of a kind (or an API group/version of a kind) loom does not read."""

    def __init__(self, api_version: str, kind: str, message: str, field: str = "") -> None:
        super().__init__(field, message)
        self.api_version = api_version
        self.kind = kind


class Problems:
    """Collects the errors and warnings of one object. `prefix` is prepended to every field path (it
    locates an item inside a `kind: List` document)."""

    __slots__ = ("errors", "prefix", "warnings")

    def __init__(self, prefix: str = "") -> None:
        self.errors: list[ValidationError] = []
        self.warnings: list[ValidationError] = []
        self.prefix = prefix

    def _full(self, path: str) -> str:
        if not self.prefix:
            return path
        return f"{self.prefix}.{path}" if path else self.prefix

    def error(self, path: str, message: str) -> None:
        self.errors.append(ValidationError(self._full(path), message))

    def warning(self, path: str, message: str) -> None:
        self.warnings.append(ValidationError(self._full(path), message))


# ---------------------------------------------------------------------------------------------------
# Type checks and names for messages


_TYPE_NAMES: dict[type, str] = {
    str: "string",
    int: "int",
    bool: "bool",
    float: "float",
    dict: "mapping",
    list: "list",
    tuple: "list",
    type(None): "null",
}


def type_name(value: object) -> str:
    """The YAML/JSON name of a value's type, for messages ("got int")."""
    name = _TYPE_NAMES.get(type(value))
    if name is not None:
        return name
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


def is_mapping(value: object) -> TypeGuard[Mapping[Any, Any]]:
    return type(value) is dict or isinstance(value, Mapping)


def is_list(value: object) -> TypeGuard[list[Any] | tuple[Any, ...]]:
    return type(value) is list or isinstance(value, (list, tuple))


def is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass in Python but not an integer in YAML/JSON.
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


def join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def quote(value: str) -> str:
    """A value inside a message, quoted like Go's %q so blanks and odd characters stay visible."""
    if len(value) > 80:
        value = value[:77] + "..."
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def one_of(allowed: Sequence[str]) -> str:
    return ", ".join(allowed)


# ---------------------------------------------------------------------------------------------------
# Field readers. Each takes the enclosing mapping `m`, the `key` and the path of `m`.


def get_mapping(p: Problems, m: Mapping[Any, Any], key: str, path: str) -> Mapping[Any, Any] | None:
    value = m.get(key)
    if value is None or is_mapping(value):
        return value
    p.error(join(path, key), f"expected a mapping, got {type_name(value)}")
    return None


def get_list(p: Problems, m: Mapping[Any, Any], key: str, path: str) -> Sequence[Any] | None:
    value = m.get(key)
    if value is None or is_list(value):
        return value
    p.error(join(path, key), f"expected a list, got {type_name(value)}")
    return None


def get_str(
    p: Problems, m: Mapping[Any, Any], key: str, path: str, default: str = "", *, required: bool = False
) -> str:
    value = m.get(key)
    if isinstance(value, str):
        if required and not value:
            p.error(join(path, key), "must not be empty")
        return value
    if value is None:
        if required:
            p.error(join(path, key), "required field is missing")
        return default
    p.error(join(path, key), f"expected a string, got {type_name(value)}")
    return default


def get_int(
    p: Problems,
    m: Mapping[Any, Any],
    key: str,
    path: str,
    default: int,
    low: int,
    high: int | None = None,
    *,
    required: bool = False,
) -> int:
    value = m.get(key)
    if value is None:
        if required:
            p.error(join(path, key), "required field is missing")
        return default
    if not is_int(value):
        p.error(join(path, key), f"expected an integer, got {type_name(value)}")
        return default
    if value < low or (high is not None and value > high):
        p.error(join(path, key), range_message(low, high, value))
        return default
    return value


def range_message(low: int, high: int | None, value: object) -> str:
    if high is None:
        return f"must be at least {low}, got {value}"
    return f"must be between {low} and {high}, got {value}"


def get_port(p: Problems, m: Mapping[Any, Any], key: str, path: str, *, required: bool = False) -> int:
    return get_int(p, m, key, path, 0, 1, 65535, required=required)


def get_bool(p: Problems, m: Mapping[Any, Any], key: str, path: str, default: bool = False) -> bool:
    value = m.get(key)
    if type(value) is bool:
        return value
    if value is None:
        return default
    p.error(join(path, key), f"expected a boolean, got {type_name(value)}")
    return default


def get_enum(
    p: Problems,
    m: Mapping[Any, Any],
    key: str,
    path: str,
    allowed: Sequence[str],
    default: str,
    *,
    required: bool = False,
) -> str:
    value = get_str(p, m, key, path, "", required=required)
    if not value:
        return default
    if value not in allowed:
        p.error(join(path, key), f"must be one of {one_of(allowed)}, got {quote(value)}")
        return default
    return value


def get_strs(
    p: Problems, m: Mapping[Any, Any], key: str, path: str, *, non_empty_items: bool = False
) -> tuple[str, ...]:
    """A list of strings; absent or null gives ()."""
    value = m.get(key)
    if value is None:
        return ()
    if not is_list(value):
        p.error(join(path, key), f"expected a list of strings, got {type_name(value)}")
        return ()
    for i, item in enumerate(value):
        if not isinstance(item, str):
            p.error(f"{join(path, key)}[{i}]", f"expected a string, got {type_name(item)}")
            return ()
        if non_empty_items and not item:
            p.error(f"{join(path, key)}[{i}]", "must not be empty")
            return ()
    return tuple(value)


def get_str_map(p: Problems, m: Mapping[Any, Any], key: str, path: str) -> dict[str, str] | None:
    """A string-to-string map; absent or null gives None. Keys are reported at `<path>.<key>.<k>`."""
    value = m.get(key)
    if value is None:
        return None
    here = join(path, key)
    if not is_mapping(value):
        p.error(here, f"expected a mapping of strings to strings, got {type_name(value)}")
        return None
    result: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            p.error(f"{here}.{k}", f"keys must be strings, got {type_name(k)}")
        elif not isinstance(v, str):
            p.error(f"{here}.{k}", f"expected a string, got {type_name(v)}")
        else:
            result[k] = v
    return result


def check_fields(p: Problems, m: Mapping[Any, Any], known: frozenset[str], path: str) -> None:
    """Warn (kubectl's field validation does too) about fields the API does not define: they are
    usually typos, and a typo'd field is silently ignored otherwise."""
    if known.issuperset(m):
        return
    for k in m:
        if k in known:
            continue
        close = difflib.get_close_matches(str(k), known, n=1) if isinstance(k, str) else []
        hint = f" (did you mean {quote(close[0])}?)" if close else ""
        p.warning(join(path, k), f"unknown field, ignored{hint}")


def items_of(p: Problems, m: Mapping[Any, Any], key: str, path: str) -> list[tuple[str, Mapping[Any, Any]]]:
    """The entries of a list of mappings with their paths; entries that are not mappings are errors."""
    seq = get_list(p, m, key, path)
    if not seq:
        return []
    here = join(path, key)
    result = []
    for i, item in enumerate(seq):
        item_path = f"{here}[{i}]"
        if is_mapping(item):
            result.append((item_path, item))
        else:
            p.error(item_path, f"expected a mapping, got {type_name(item)}")
    return result


# ---------------------------------------------------------------------------------------------------
# Syntax of names, labels and addresses (the Kubernetes apimachinery rules)

_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*\Z")
_DNS_1035_LABEL = re.compile(r"[a-z](?:[-a-z0-9]*[a-z0-9])?\Z")
_QUALIFIED_NAME_PART = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?\Z")
_IANA_SVC_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?\Z")
_HAS_LETTER = re.compile(r"[a-z]")

MAX_LABEL_VALUE = 63
MAX_SUBDOMAIN = 253
MAX_ANNOTATIONS_BYTES = 256 * 1024  # the API server's limit on all annotations of one object


def dns_label_problem(value: str) -> str | None:
    if len(value) <= 63 and _DNS_LABEL.match(value):
        return None
    return (
        f"invalid name {quote(value)}: must be at most 63 characters of lowercase letters, digits and '-', "
        "starting and ending with a letter or digit"
    )


def dns_subdomain_problem(value: str) -> str | None:
    if len(value) <= MAX_SUBDOMAIN and _DNS_SUBDOMAIN.match(value):
        return None
    return (
        f"invalid name {quote(value)}: must be at most 253 characters of lowercase letters, digits, '-' "
        "and '.', starting and ending with a letter or digit"
    )


def dns_1035_problem(value: str) -> str | None:
    if len(value) <= 63 and _DNS_1035_LABEL.match(value):
        return None
    return (
        f"invalid name {quote(value)}: must be at most 63 characters of lowercase letters, digits and '-', "
        "starting with a letter and ending with a letter or digit"
    )


def iana_svc_name_problem(value: str) -> str | None:
    """Container port names and named targetPorts (IANA service names)."""
    if len(value) <= 15 and _IANA_SVC_NAME.match(value) and "--" not in value and _HAS_LETTER.search(value):
        return None
    return (
        f"invalid port name {quote(value)}: must be at most 15 characters of lowercase letters, digits "
        "and '-', contain a letter, and neither start nor end with '-' nor contain '--'"
    )


def label_key_problem(key: str) -> str | None:
    """Label and annotation keys: an optional DNS-subdomain prefix and '/', then a name of at most 63."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or dns_subdomain_problem(prefix) is not None):
        return f"invalid key {quote(key)}: the prefix before '/' must be a DNS subdomain"
    if len(name) <= 63 and _QUALIFIED_NAME_PART.match(name):
        return None
    return (
        f"invalid key {quote(key)}: the name part must be at most 63 characters of letters, digits, "
        "'-', '_' and '.', starting and ending with a letter or digit"
    )


def label_value_problem(value: str) -> str | None:
    if not value or (len(value) <= MAX_LABEL_VALUE and _QUALIFIED_NAME_PART.match(value)):
        return None
    return (
        f"invalid label value {quote(value)}: must be empty or at most 63 characters of letters, digits, "
        "'-', '_' and '.', starting and ending with a letter or digit"
    )


def ip_problem(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"invalid IP address {quote(value)}"
    return None


def ip_or_cidr_problem(value: str) -> str | None:
    try:
        if "/" in value:
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        return f"invalid IP address or CIDR range {quote(value)}"
    return None


def check_name(p: Problems, value: str, path: str, rule: str) -> None:
    """Check `value` with one of the naming rules: "label", "subdomain", "1035"."""
    if rule == "label":
        problem = dns_label_problem(value)
    elif rule == "1035":
        problem = dns_1035_problem(value)
    else:
        problem = dns_subdomain_problem(value)
    if problem is not None:
        p.error(path, problem)


# ---------------------------------------------------------------------------------------------------
# metadata and selectors

DEFAULT_NAMESPACE = "default"  # what kubectl apply uses for namespaced objects without a namespace
OBJECT_META_FIELDS = frozenset(
    {
        "annotations", "creationTimestamp", "deletionGracePeriodSeconds", "deletionTimestamp",
        "finalizers", "generateName", "generation", "labels", "managedFields", "name", "namespace",
        "ownerReferences", "resourceVersion", "selfLink", "uid",
    }
)  # fmt: skip


def read_labels(p: Problems, m: Mapping[Any, Any], key: str, path: str) -> dict[str, str]:
    labels = get_str_map(p, m, key, path)
    if not labels:
        return {}
    here = join(path, key)
    for k, v in labels.items():
        problem = label_key_problem(k) or label_value_problem(v)
        if problem is not None:
            p.error(f"{here}.{k}", problem)
    return labels


def read_annotations(p: Problems, m: Mapping[Any, Any], key: str, path: str) -> dict[str, str]:
    annotations = get_str_map(p, m, key, path)
    if not annotations:
        return {}
    here = join(path, key)
    size = 0
    for k, v in annotations.items():
        problem = label_key_problem(k)
        if problem is not None:
            p.error(f"{here}.{k}", problem)
        size += len(k) + len(v)
    if size > MAX_ANNOTATIONS_BYTES // 4:  # only count bytes exactly when characters could exceed it
        size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
        if size > MAX_ANNOTATIONS_BYTES:
            p.error(here, f"annotations total {size} bytes, more than the limit of {MAX_ANNOTATIONS_BYTES}")
    return annotations


def read_metadata(
    p: Problems, doc: Mapping[Any, Any], *, namespaced: bool, name_rule: str
) -> tuple[ObjectMeta, bool]:
    """ObjectMeta of an object; the bool says whether it has a (non-empty string) name."""
    meta = get_mapping(p, doc, "metadata", "")
    if meta is None:
        if "metadata" not in doc or doc.get("metadata") is None:
            p.error("metadata.name", "required field is missing")
        return ObjectMeta(name="", namespace=DEFAULT_NAMESPACE if namespaced else ""), False
    # A misspelt field here is dangerous (a typo in "namespace" moves a policy to another namespace).
    check_fields(p, meta, OBJECT_META_FIELDS, "metadata")
    name = get_str(p, meta, "name", "metadata", required=True)
    if name:
        check_name(p, name, "metadata.name", name_rule)
    namespace = ""
    if namespaced:
        namespace = get_str(p, meta, "namespace", "metadata") or DEFAULT_NAMESPACE
        check_name(p, namespace, "metadata.namespace", "label")
    elif meta.get("namespace"):
        p.warning("metadata.namespace", "ignored: this kind is cluster-scoped")
    return (
        ObjectMeta(
            name=name,
            namespace=namespace,
            labels=read_labels(p, meta, "labels", "metadata"),
            annotations=read_annotations(p, meta, "annotations", "metadata"),
            uid=get_str(p, meta, "uid", "metadata"),
            resource_version=get_str(p, meta, "resourceVersion", "metadata"),
            generation=get_int(p, meta, "generation", "metadata", 0, 0),
        ),
        bool(name),
    )


_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_LABEL_SELECTOR_FIELDS = frozenset({"matchLabels", "matchExpressions"})
_EXPRESSION_FIELDS = frozenset({"key", "operator", "values"})


def read_label_selector(
    p: Problems, m: Mapping[Any, Any], key: str, path: str, *, expressions: bool
) -> LabelSelector | None:
    """A metav1.LabelSelector (expressions=True) or Istio's WorkloadSelector (matchLabels only)."""
    sel = get_mapping(p, m, key, path)
    if sel is None:
        return None
    here = join(path, key)
    match_labels = read_labels(p, sel, "matchLabels", here)
    exprs: list[tuple[str, str, tuple[str, ...]]] = []
    if expressions:
        check_fields(p, sel, _LABEL_SELECTOR_FIELDS, here)
        for item_path, expr in items_of(p, sel, "matchExpressions", here):
            check_fields(p, expr, _EXPRESSION_FIELDS, item_path)
            label = get_str(p, expr, "key", item_path, required=True)
            if label:
                problem = label_key_problem(label)
                if problem is not None:
                    p.error(join(item_path, "key"), problem)
            op = get_enum(p, expr, "operator", item_path, _SELECTOR_OPERATORS, "", required=True)
            values = get_strs(p, expr, "values", item_path)
            if op in ("In", "NotIn") and not values:
                p.error(join(item_path, "values"), f"must not be empty for operator {op}")
            elif op in ("Exists", "DoesNotExist") and values:
                p.error(join(item_path, "values"), f"must be empty for operator {op}")
            exprs.append((label, op, values))
    else:
        # Istio's WorkloadSelector: matchLabels only. Wildcards ("*") fail the label syntax check.
        check_fields(p, sel, frozenset({"matchLabels"}), here)
    return LabelSelector(match_labels=match_labels, match_expressions=tuple(exprs))


def int_keys(
    p: Problems, value: Mapping[Any, Any], path: str, low: int, high: int
) -> list[tuple[int, str, Any]]:
    """Keys of a map keyed by number (ints, or numeric strings since JSON keys are strings)."""
    result = []
    for k, v in value.items():
        number: int | None = None
        if is_int(k):
            number = k
        elif isinstance(k, str) and k.isascii() and k.isdecimal():
            number = int(k)
        if number is None:
            shown = quote(k) if isinstance(k, str) else repr(k)
            p.error(f"{path}.{k}", f"key must be a port number, got {type_name(k)} {shown}")
        elif not low <= number <= high:
            p.error(f"{path}.{k}", range_message(low, high, number))
        else:
            result.append((number, f"{path}.{k}", v))
    return result
