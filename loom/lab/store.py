"""The lab's object store: the lab's stand-in for the Kubernetes API server, as a directory of YAML files.

Theory of operation
-------------------
Every object is one file, `root/<kind lowercase>/<namespace or _cluster>/<name>.yaml`, holding exactly
one YAML document written with `yaml.safe_dump`. The directory is therefore valid loom configuration as
it stands: the controller reads it with `--config-dir` (controller/sources/directory.py), node agents
with `--manifests`, and `snapshot()` is literally the loader run over it. Everything else the store
keeps is hidden (its name starts with "."), and the loader skips hidden entries, so none of it ever
shows up as configuration:

* `root/.lock` — the lock file. Several processes write (loomctl, the lab, node agents writing the
  redirection annotation), so every mutation is a read-modify-write under `fcntl.flock(LOCK_EX)` on it
  (bounded: a writer that cannot get the lock within `lock_timeout` seconds gets a StoreError naming
  the lock instead of hanging). Within one process a re-entrant thread lock sits in front of it.
* `.<name>.yaml.<random>.tmp` — a file being written. Writes go to a temporary file in the target
  directory and are renamed over the target, so a reader (which takes no lock) sees the old or the new
  object, never half of one. The store lives under /var/run (tmpfs), so files are not fsynced: the
  rename is about readers, not about surviving a power cut.
* `.<name>.last-applied.yaml` — the configuration last given to `apply` for that object (what kubectl
  keeps in its last-applied-configuration annotation, kept beside the object so that the object
  itself stays exactly as written).

Admission (`admit`), i.e. what the API server's validation would do:

* Kinds loom reads are validated with the loader (`check_object`). An object with any error is refused
  with the loader's diagnostics (file, document, kind, namespace/name, field); the other objects of the
  same apply are still stored. Namespaced objects without a namespace get `metadata.namespace: default`
  written in, and cluster-scoped ones lose a stray `metadata.namespace` (with the loader's warning),
  as the API server does.
* Objects loom does not read (another kind, e.g. an Istio VirtualService, or a known kind name in
  another API group, e.g. Istio's networking.istio.io Gateway) are stored as given, with a warning,
  so that the lab loses nothing kubectl would have kept — but only when they carry apiVersion, kind and
  a valid metadata.name (DNS subdomain; namespace a DNS label; labels and annotations valid). Their
  scope is unknown (there is no discovery), so their namespace is kept exactly as written: none
  written means cluster-scoped. Their `StoredKey.kind` carries the API group ("VirtualService.
  networking.istio.io"), so that same-named kinds of different groups never share a file.
* A kind loom reads, in its own API group but at a version loom does not read (security.istio.io/
  v1alpha1 AuthorizationPolicy), is refused: stored, it would look applied while loom silently ignored
  it, and for a policy that is a hole. A kind that differs from a known kind only in letter case
  ("pod") is refused too (it would share the known kind's directory).

`apply` is kubectl's client-side apply: a three-way merge (`merge_applied`) of the stored object, the
last-applied configuration and the new configuration. Fields the user removed since the last apply are
removed; fields set by others (the lab's spec.clusterIP, a node agent's annotation, `label`) survive a
re-apply; lists are replaced as a whole. The result is validated again before it is written, and an
object whose merged text equals the stored text is "unchanged" and not rewritten (watchers see no event).

`delete` of a Namespace also deletes every object in it (the namespace controller's job in Kubernetes);
default, kube-system and kube-public cannot be deleted, as in Kubernetes. `label` of a Namespace that
does not exist creates it (`create_namespace=True`, the default); `apply` never creates namespaces
(the lab creates those its pods need).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import yaml

from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.loader import (
    CONFIG_SUFFIXES,
    MAX_FILE_BYTES,
    JsonInputError,
    LoadResult,
    check_object,
    load_paths,
    parse_json,
)
from loom.resources.model import KINDS, ConfigSnapshot, Origin, ResourceKey
from loom.resources.parse_common import (
    Problems,
    is_list,
    is_mapping,
    label_key_problem,
    label_value_problem,
    quote,
    read_metadata,
    type_name,
)
from loom.resources.parse_yaml import read_documents

__all__ = [
    "CONFIG_SUBDIR",
    "DEFAULT_LAB_DIR",
    "LAB_DIR_ENV",
    "PROTECTED_NAMESPACES",
    "Action",
    "Admission",
    "ApplyReport",
    "LabStore",
    "LabelConflict",
    "LabelOutcome",
    "NotFound",
    "Outcome",
    "StoreError",
    "StoredKey",
    "admit",
    "default_lab_dir",
    "lab_store",
    "merge_applied",
    "qualified_kind",
]

log = logging.getLogger(__name__)

LAB_DIR_ENV: Final = "LOOM_LAB_DIR"
# /var/run is tmpfs: a lab does not survive a reboot, and neither should its state.
DEFAULT_LAB_DIR: Final = Path("/var/run/loom-lab")
CONFIG_SUBDIR: Final = "config"
LOCK_NAME: Final = ".lock"
# Not a valid namespace name (underscore), so it can never collide with one.
CLUSTER_SCOPED_DIR: Final = "_cluster"
# Kubernetes refuses to delete these; deleting "default" here would cascade to all of Bookinfo.
PROTECTED_NAMESPACES: Final = frozenset({"default", "kube-system", "kube-public"})
# Mutations take milliseconds; 30 s means another process is stuck, not busy.
DEFAULT_LOCK_TIMEOUT: Final = 30.0

_LAST_APPLIED_SUFFIX: Final = ".last-applied.yaml"
_KIND_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,62}\Z")
_GROUP = r"[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?"
_API_VERSION = re.compile(rf"(?:{_GROUP}/)?[a-z0-9]+\Z")
_STORED_KIND = re.compile(rf"[A-Za-z][A-Za-z0-9]{{0,62}}(?:\.{_GROUP})?\Z")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*\Z")


def default_lab_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The lab's state directory: $LOOM_LAB_DIR, else /var/run/loom-lab."""
    value = env.get(LAB_DIR_ENV, "")
    return Path(value) if value else DEFAULT_LAB_DIR


def lab_store(lab_dir: Path) -> LabStore:
    """The object store of the lab whose state directory is `lab_dir`."""
    return LabStore(Path(lab_dir) / CONFIG_SUBDIR)


# ---------------------------------------------------------------------------------------------------
# Errors, keys, reports


class StoreError(Exception):
    """A store operation failed; the message names the file, object and field concerned."""


class NotFound(StoreError):
    def __init__(self, key: StoredKey) -> None:
        super().__init__(f"{key} not found")
        self.key = key


class LabelConflict(StoreError):
    """`label` without overwrite met a label that already has a different value (kubectl's rule)."""

    def __init__(self, key: StoredKey, label: str, current: str, wanted: str) -> None:
        super().__init__(
            f"{key}: metadata.labels.{label}: already has the value {quote(current)}, not replaced by "
            f"{quote(wanted)} because overwrite is off"
        )
        self.key = key
        self.label = label
        self.current = current
        self.wanted = wanted


def _api_group(api_version: str) -> str:
    group, _, _ = api_version.rpartition("/")
    return group


def qualified_kind(kind: str, api_version: str) -> str:
    """The store's name for a kind: the kind itself for kinds loom reads (in their own API group) and
    for the core group, else "<Kind>.<group>" (kubectl's resource.group spelling)."""
    group = _api_group(api_version)
    known = KINDS.get(kind)
    if not group or (known is not None and group == known.API_GROUP):
        return kind
    return f"{kind}.{group}"


@dataclass(frozen=True, slots=True, order=True)
class StoredKey:
    """One stored object. `kind` is a kind loom reads ("Deployment") or a group-qualified kind it does
    not ("VirtualService.networking.istio.io"); `namespace` is "" for cluster-scoped objects."""

    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, key: ResourceKey) -> StoredKey:
        return cls(key.kind, key.namespace, key.name)

    @property
    def resource_key(self) -> ResourceKey:
        return ResourceKey(self.kind, self.namespace, self.name)

    @property
    def resource(self) -> str:
        """kubectl's resource name: "deployment.apps", "service", "virtualservice.networking.istio.io"."""
        known = KINDS.get(self.kind)
        if known is not None and known.API_GROUP:
            return f"{self.kind.lower()}.{known.API_GROUP}"
        return self.kind.lower()

    @property
    def ref(self) -> str:
        """What kubectl prints: "deployment.apps/reviews-v1"."""
        return f"{self.resource}/{self.name}"

    def __str__(self) -> str:
        return f"{self.ref} in namespace {self.namespace}" if self.namespace else self.ref


class Action(StrEnum):
    CREATED = "created"
    CONFIGURED = "configured"
    UNCHANGED = "unchanged"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class Outcome:
    key: StoredKey
    action: Action

    @property
    def line(self) -> str:
        return f"{self.key.ref} {self.action}"


@dataclass(frozen=True, slots=True)
class ApplyReport:
    """What an apply or delete did: one outcome per object acted on (in input order), and every error
    (objects refused or not found, unreadable files) and warning."""

    outcomes: tuple[Outcome, ...]
    diagnostics: tuple[Diagnostic, ...]

    @property
    def lines(self) -> tuple[str, ...]:
        """kubectl's output lines: "deployment.apps/reviews-v1 created"."""
        return tuple(o.line for o in self.outcomes)

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.is_error)

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if not d.is_error)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __add__(self, other: ApplyReport) -> ApplyReport:
        return ApplyReport(self.outcomes + other.outcomes, self.diagnostics + other.diagnostics)


@dataclass(frozen=True, slots=True)
class LabelOutcome:
    manifest: dict[str, Any]  # the object as stored after the change
    created: bool  # it was a Namespace that did not exist and was created for this change
    changed: bool  # its labels differ from before (kubectl's "labeled" versus "not labeled")
    missing: tuple[str, ...]  # labels asked to be removed that were not there


# ---------------------------------------------------------------------------------------------------
# Admission: the validation an API server would do


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of admitting one manifest: the key and the manifest to store, or None when refused;
    every error and warning about it either way."""

    key: StoredKey | None
    manifest: dict[str, Any] | None
    diagnostics: tuple[Diagnostic, ...]

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.is_error)


def _join(prefix: str, field: str) -> str:
    if prefix and field:
        return f"{prefix}.{field}"
    return prefix or field


def _plain(value: Any) -> Any:
    """A deep copy as fresh dicts and lists: YAML aliases share values, and a shared value mutated
    through one path must not change another."""
    if is_mapping(value):
        return {k: _plain(v) for k, v in value.items()}
    if is_list(value):
        return [_plain(v) for v in value]
    return value


def _normalized(doc: Mapping[Any, Any], namespace: str) -> dict[str, Any]:
    manifest: dict[str, Any] = _plain(doc)
    meta = manifest["metadata"]  # admission checked it is a mapping with a name
    if namespace:
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)
    return manifest


def admit(doc: object, origin: Origin | None = None, *, field_prefix: str = "") -> Admission:
    """Validate one manifest for the store (see the module docstring); never raises for bad input."""
    check = check_object(doc, origin, field_prefix=field_prefix)
    if check.unsupported is not None and is_mapping(doc):
        return _admit_unsupported(doc, origin, field_prefix, check.key, check.unsupported.api_version)
    diagnostics = tuple(check.diagnostics(origin))
    if check.errors or check.key is None or not is_mapping(doc):
        return Admission(None, None, diagnostics)
    key = StoredKey.of(check.key)
    return Admission(key, _normalized(doc, key.namespace), diagnostics)


def _admit_unsupported(
    doc: Mapping[Any, Any], origin: Origin | None, prefix: str, loose: ResourceKey | None, api_version: str
) -> Admission:
    kind = str(doc.get("kind"))
    group = _api_group(api_version)

    def refuse(field: str, message: str) -> Admission:
        return Admission(
            None, None, (Diagnostic(Severity.ERROR, message, origin, loose, _join(prefix, field)),)
        )

    known = KINDS.get(kind)
    if known is not None and group == known.API_GROUP:
        return refuse(
            "apiVersion",
            f"{api_version} {kind} is not an API version loom reads; refused, because loom acts on "
            f"{kind} objects and would silently ignore this one",
        )
    for name, cls in KINDS.items():
        if name != kind and name.lower() == kind.lower() and group == cls.API_GROUP:
            return refuse(
                "kind", f"unknown kind {quote(kind)}: kinds are case-sensitive (did you mean {name}?)"
            )
    if not _KIND_NAME.match(kind):
        return refuse(
            "kind", f"invalid kind {quote(kind)}: must be letters and digits, starting with a letter"
        )
    if not _API_VERSION.match(api_version):
        return refuse(
            "apiVersion", f"invalid apiVersion {quote(api_version)}: expected GROUP/VERSION or VERSION"
        )
    p = Problems(prefix)
    meta_doc = doc.get("metadata")
    # Scope is unknown: a written namespace makes it namespaced (and checks it), none cluster-scoped.
    namespaced = is_mapping(meta_doc) and meta_doc.get("namespace") not in (None, "")
    meta, named = read_metadata(p, doc, namespaced=namespaced, name_rule="subdomain")
    key = ResourceKey(kind, meta.namespace, meta.name) if named else loose
    found = [Diagnostic(Severity.ERROR, e.message, origin, key, e.field) for e in p.errors]
    warnings = [Diagnostic(Severity.WARNING, w.message, origin, key, w.field) for w in p.warnings]
    if found or not named:
        return Admission(None, None, (*found, *warnings))
    stored = Diagnostic(
        Severity.WARNING,
        f"{api_version} {kind} is not a kind loom reads; stored as given, loom ignores it",
        origin,
        key,
        prefix,
    )
    stored_key = StoredKey(qualified_kind(kind, api_version), meta.namespace, meta.name)
    return Admission(stored_key, _normalized(doc, meta.namespace), (stored, *warnings))


def merge_applied(
    live: Mapping[Any, Any], last_applied: Mapping[Any, Any] | None, config: Mapping[Any, Any]
) -> dict[Any, Any]:
    """kubectl apply's three-way merge, for JSON-like mappings: start from the live object, drop the
    keys the last applied configuration had and the new one does not, then set every key of the new
    configuration (mappings merge recursively, anything else — lists too — is replaced; null deletes).
    `last_applied` None (the object was never applied) deletes nothing."""
    result: dict[Any, Any] = {k: _plain(v) for k, v in live.items()}
    if last_applied is not None:
        for k in last_applied:
            if k not in config:
                result.pop(k, None)
    for k, v in config.items():
        if v is None:
            result.pop(k, None)
            continue
        current = result.get(k)
        if is_mapping(v) and is_mapping(current):
            previous = last_applied.get(k) if last_applied is not None else None
            result[k] = merge_applied(current, previous if is_mapping(previous) else None, v)
        else:
            result[k] = _plain(v)
    return result


# ---------------------------------------------------------------------------------------------------
# Files


class _Dumper(yaml.SafeDumper):
    # Anchors and aliases are valid YAML but make a stored object hard to read and edit by hand.
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(manifest: Mapping[Any, Any]) -> str:
    # allow_unicode=False: with it, PyYAML writes U+0085 (NEL) raw into a quoted scalar, where every
    # YAML reader takes it for a line break and folds it into a space. Escaping all non-ASCII keeps
    # every string exact, at the cost of "\xE9" for "é" in the file.
    return yaml.dump(
        dict(manifest), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=False
    )


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        # mkstemp creates 0600; configuration is not secret and other lab processes read it.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_stored(path: Path) -> dict[str, Any] | None:
    """The one object in a stored file; None when there is no such file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StoreError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from exc
    read = read_documents(text)
    if read.error is not None:
        raise StoreError(f"{path}: {read.error}")
    values = [d.value for d in read.documents if d.value is not None]
    if len(values) != 1 or not is_mapping(values[0]):
        raise StoreError(f"{path}: expected exactly one object (a mapping), found {len(values)} documents")
    manifest: dict[str, Any] = _plain(values[0])
    return manifest


def _kind_of(manifest: Mapping[Any, Any]) -> str:
    kind, api_version = manifest.get("kind"), manifest.get("apiVersion")
    if not isinstance(kind, str) or not isinstance(api_version, str):
        return ""
    return qualified_kind(kind, api_version)


# ---------------------------------------------------------------------------------------------------
# Reading what the user gives to apply/delete


@dataclass(frozen=True, slots=True)
class _InputObject:
    value: object
    origin: Origin
    field_prefix: str  # "items[3]" for an object inside a `kind: List` document


_Input = _InputObject | Diagnostic


def _error(message: str, source: str, field: str = "") -> Diagnostic:
    return Diagnostic(Severity.ERROR, message, Origin(source), None, field)


def _config_files(directory: Path) -> list[Path]:
    """Config files under a directory, by the loader's rules: recursive, hidden entries skipped,
    *.yaml/*.yml/*.json, ordered by relative path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath, f)
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(CONFIG_SUFFIXES)
        )
    return sorted(found, key=lambda f: f.relative_to(directory).parts)


def _read_inputs(paths: Sequence[Path]) -> list[_Input]:
    items: list[_Input] = []
    for path in paths:
        if path.is_dir():
            for file in _config_files(path):
                items.extend(_read_input_file(file))
        elif path.exists():
            items.extend(_read_input_file(path))
        else:
            items.append(_error("no such file or directory", str(path)))
    return items


def _read_input_file(file: Path) -> list[_Input]:
    source = str(file)
    try:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            return [_error(f"file is {size} bytes, more than the limit of {MAX_FILE_BYTES}", source)]
        data = file.read_bytes()
    except OSError as exc:
        return [_error(f"cannot read: {exc.strerror or exc}", source)]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [_error(f"not UTF-8 text (invalid byte at offset {exc.start})", source)]
    return _text_inputs(text, source, is_json=file.name.lower().endswith(".json"))


def _text_inputs(text: str, source: str, *, is_json: bool) -> list[_Input]:
    documents: list[tuple[object, Origin]] = []
    failure: Diagnostic | None = None
    if is_json:
        parsed = _parse_json(text, source)
        if isinstance(parsed, Diagnostic):
            failure = parsed
        else:
            documents.append((parsed, Origin(source, 1)))
    else:
        read = read_documents(text)
        documents.extend((d.value, Origin(source, d.number)) for d in read.documents)
        if read.error is not None:  # the documents before a syntax error still count, like the loader
            failure = _error(str(read.error), source)
    items: list[_Input] = []
    for value, origin in documents:
        if value is None:
            continue  # an empty document, e.g. after a trailing ---
        if is_mapping(value) and value.get("kind") == "List":
            entries = value.get("items")
            if entries is None:
                continue
            if not is_list(entries):
                items.append(
                    Diagnostic(
                        Severity.ERROR, f"expected a list, got {type_name(entries)}", origin, None, "items"
                    )
                )
                continue
            items.extend(_InputObject(entry, origin, f"items[{i}]") for i, entry in enumerate(entries))
        else:
            items.append(_InputObject(value, origin, ""))
    if failure is not None:
        items.append(failure)
    return items


def _parse_json(text: str, source: str) -> object:
    try:
        return parse_json(text)
    except JsonInputError as exc:
        return _error(str(exc), source)


# ---------------------------------------------------------------------------------------------------
# The lock


class _StoreLock:
    """flock on the lock file, re-entrant within a process (a second flock on another open file of
    the same process would deadlock against the first), bounded in time."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._path = path
        self._timeout = timeout
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd = -1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if not self._thread_lock.acquire(timeout=self._timeout):
            raise StoreError(f"{self._path}: still locked by another thread after {self._timeout:g} s")
        try:
            if self._depth == 0:
                self._fd = self._acquire()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fd, self._fd = self._fd, -1
                    os.close(fd)  # closing the only descriptor of the open file releases the flock
        finally:
            self._thread_lock.release()

    def _acquire(self) -> int:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"{self._path}: cannot open the lock file: {exc.strerror or exc}") from exc
        deadline = time.monotonic() + self._timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreError(
                        f"{self._path}: still locked by another process after {self._timeout:g} s "
                        "(a stuck loomctl, lab or node agent?)"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            except OSError as exc:
                os.close(fd)
                raise StoreError(f"{self._path}: cannot lock: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------------------------------------------
# The store


class LabStore:
    """The object store rooted at `root` (LAB_DIR/config). See the module docstring."""

    def __init__(self, root: Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.root = Path(root)
        self._lock = _StoreLock(self.root / LOCK_NAME, lock_timeout)

    # -- paths -------------------------------------------------------------------------------------------

    def path_of(self, key: StoredKey) -> Path:
        """The file of an object (whether or not it exists). Raises StoreError for a key that is not a
        valid object name, so that no key can point outside the store."""
        if not _STORED_KIND.match(key.kind):
            raise StoreError(f"invalid kind {quote(key.kind)}")
        if key.namespace and not (len(key.namespace) <= 63 and _DNS_LABEL.match(key.namespace)):
            raise StoreError(f"invalid namespace {quote(key.namespace)}")
        if not (len(key.name) <= 253 and _DNS_SUBDOMAIN.match(key.name)):
            raise StoreError(f"invalid name {quote(key.name)}")
        return self.root / key.kind.lower() / (key.namespace or CLUSTER_SCOPED_DIR) / f"{key.name}.yaml"

    def _last_applied_path(self, key: StoredKey) -> Path:
        path = self.path_of(key)
        return path.with_name(f".{key.name}{_LAST_APPLIED_SUFFIX}")

    # -- reads (no lock: files are replaced atomically) ------------------------------------------------

    def get(self, key: StoredKey) -> dict[str, Any] | None:
        """The stored manifest, or None."""
        manifest = _read_stored(self.path_of(key))
        if manifest is not None and _kind_of(manifest) != key.kind:
            return None  # another kind whose name differs only in case shares the directory
        return manifest

    def last_applied(self, key: StoredKey) -> dict[str, Any] | None:
        """The configuration last applied to the object, or None if it was never applied."""
        return _read_stored(self._last_applied_path(key))

    def list(self, kind: str | None = None, namespace: str | None = None) -> builtins.list[dict[str, Any]]:
        """Stored manifests, optionally of one kind (a StoredKey kind) and/or namespace ("" for
        cluster-scoped), ordered by kind, namespace and name. Unreadable files are logged and skipped."""
        return [manifest for _, manifest in self._entries(kind, namespace)]

    def list_keys(self, kind: str | None = None, namespace: str | None = None) -> builtins.list[StoredKey]:
        """The keys of the stored objects, filtered and ordered like `list`."""
        return [key for key, _ in self._entries(kind, namespace)]

    def _entries(
        self, kind: str | None, namespace: str | None
    ) -> builtins.list[tuple[StoredKey, dict[str, Any]]]:
        if kind is not None and not _STORED_KIND.match(kind):
            raise StoreError(f"invalid kind {quote(kind)}")
        if namespace and not _DNS_LABEL.match(namespace):
            raise StoreError(f"invalid namespace {quote(namespace)}")
        kind_dirs = [kind.lower()] if kind is not None else _visible_dirs(self.root)
        found: builtins.list[tuple[StoredKey, dict[str, Any]]] = []
        for kind_dir in kind_dirs:
            kind_path = self.root / kind_dir
            ns_dirs = _visible_dirs(kind_path) if namespace is None else [namespace or CLUSTER_SCOPED_DIR]
            for ns_dir in ns_dirs:
                for file in _visible_yaml_files(kind_path / ns_dir):
                    try:
                        manifest = _read_stored(file)
                    except StoreError as exc:
                        log.warning("skipping a stored object: %s", exc)
                        continue
                    if manifest is None:
                        continue  # removed since the directory was listed
                    key = StoredKey(
                        _kind_of(manifest), "" if ns_dir == CLUSTER_SCOPED_DIR else ns_dir, file.stem
                    )
                    if kind is not None and key.kind != kind:
                        continue
                    found.append((key, manifest))
        return found

    def load(self) -> LoadResult:
        """The loader's reading of the store, diagnostics included: what the controller sees."""
        if not self.root.is_dir():
            return LoadResult((), ())
        return load_paths([self.root], root=self.root)

    def snapshot(self) -> ConfigSnapshot:
        """The parsed model of every stored object of a kind loom reads."""
        return self.load().snapshot

    # -- apply and delete ------------------------------------------------------------------------------

    def apply_paths(self, paths: Sequence[Path]) -> ApplyReport:
        """kubectl apply -f: every object of the files and directories (recursively, hidden entries
        skipped), in order. Refused objects are reported and the others stored."""
        return self._apply_inputs(_read_inputs(paths))

    def apply_text(self, text: str, source: str) -> ApplyReport:
        """apply for YAML text (e.g. stdin); `source` names it in diagnostics."""
        return self._apply_inputs(_text_inputs(text, source, is_json=False))

    def delete_paths(self, paths: Sequence[Path], *, ignore_not_found: bool = False) -> ApplyReport:
        """kubectl delete -f: removes the objects the files name (only kind, namespace and name are
        read, so an object that fails validation can still be deleted)."""
        return self._delete_inputs(_read_inputs(paths), ignore_not_found)

    def delete_text(self, text: str, source: str, *, ignore_not_found: bool = False) -> ApplyReport:
        return self._delete_inputs(_text_inputs(text, source, is_json=False), ignore_not_found)

    def _apply_inputs(self, items: Sequence[_Input]) -> ApplyReport:
        outcomes: builtins.list[Outcome] = []
        diagnostics: builtins.list[Diagnostic] = []
        for item in items:
            if isinstance(item, Diagnostic):
                diagnostics.append(item)
                continue
            admission = admit(item.value, item.origin, field_prefix=item.field_prefix)
            diagnostics.extend(admission.diagnostics)
            if admission.key is None or admission.manifest is None:
                continue
            try:
                action, errors = self._apply_one(admission.key, admission.manifest, item)
            except StoreError as exc:
                diagnostics.append(
                    Diagnostic(
                        Severity.ERROR, str(exc), item.origin, admission.key.resource_key, item.field_prefix
                    )
                )
                continue
            diagnostics.extend(errors)
            if action is not None:
                outcomes.append(Outcome(admission.key, action))
        return ApplyReport(tuple(outcomes), tuple(diagnostics))

    def _apply_one(
        self, key: StoredKey, config: dict[str, Any], item: _InputObject
    ) -> tuple[Action | None, tuple[Diagnostic, ...]]:
        path = self.path_of(key)
        with self._lock.held():
            live = self._live(key, path)
            last = self.last_applied(key) if live is not None else None
            merged = merge_applied(live or {}, last, config)
            recheck = admit(merged, item.origin, field_prefix=item.field_prefix)
            if recheck.errors:
                # The configuration was valid alone; merged with fields others set it is not.
                return None, tuple(
                    Diagnostic(
                        d.severity, f"merged with the stored object: {d.message}", d.origin, d.key, d.field
                    )
                    for d in recheck.errors
                )
            assert recheck.manifest is not None
            text = _dump(recheck.manifest)
            applied_path = self._last_applied_path(key)
            applied_text = _dump(config)
            if _read_text(applied_path) != applied_text:
                _write_atomic(applied_path, applied_text)  # first: a crash here leaves an older object
            if live is not None and text == _dump(live):
                return Action.UNCHANGED, ()
            _write_atomic(path, text)
            return (Action.CREATED if live is None else Action.CONFIGURED), ()

    def _live(self, key: StoredKey, path: Path) -> dict[str, Any] | None:
        live = _read_stored(path)
        if live is not None and _kind_of(live) != key.kind:
            raise StoreError(
                f"{path} holds a {_kind_of(live) or 'malformed object'}, not a {key.kind}: "
                "kinds differing only in letter case cannot be stored together"
            )
        return live

    def _delete_inputs(self, items: Sequence[_Input], ignore_not_found: bool) -> ApplyReport:
        outcomes: builtins.list[Outcome] = []
        diagnostics: builtins.list[Diagnostic] = []
        for item in items:
            if isinstance(item, Diagnostic):
                diagnostics.append(item)
                continue
            found = _key_to_delete(item)
            if not isinstance(found, StoredKey):
                diagnostics.extend(found)
                continue
            if found.kind == "Namespace" and found.name in PROTECTED_NAMESPACES:
                diagnostics.append(
                    Diagnostic(
                        Severity.ERROR,
                        "this namespace may not be deleted",
                        item.origin,
                        found.resource_key,
                        item.field_prefix,
                    )
                )
                continue
            try:
                removed = self.remove(found)
            except StoreError as exc:
                diagnostics.append(
                    Diagnostic(Severity.ERROR, str(exc), item.origin, found.resource_key, item.field_prefix)
                )
                continue
            if removed:
                outcomes.append(Outcome(found, Action.DELETED))
            elif not ignore_not_found:
                diagnostics.append(
                    Diagnostic(
                        Severity.ERROR, "not found", item.origin, found.resource_key, item.field_prefix
                    )
                )
        return ApplyReport(tuple(outcomes), tuple(diagnostics))

    # -- single objects --------------------------------------------------------------------------------

    def put(self, manifest: Mapping[str, Any]) -> StoredKey:
        """Create or replace one object exactly as given (validated; no merge). Raises StoreError
        naming every problem when it is refused."""
        admission = admit(manifest)
        if admission.key is None or admission.manifest is None:
            raise StoreError("; ".join(str(d) for d in admission.errors) or "refused")
        path = self.path_of(admission.key)
        with self._lock.held():
            live = self._live(admission.key, path)
            text = _dump(admission.manifest)
            if live is None or text != _dump(live):
                _write_atomic(path, text)
        return admission.key

    def update(self, key: StoredKey, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
        """Read-modify-write of one object under the lock: `mutate` changes a copy of the stored
        manifest in place; the result is validated and stored. None when the object does not exist."""
        path = self.path_of(key)
        with self._lock.held():
            live = self._live(key, path)
            if live is None:
                return None
            candidate = _plain(live)
            mutate(candidate)
            return self._store_changed(key, path, live, candidate)

    def _store_changed(
        self, key: StoredKey, path: Path, live: Mapping[str, Any] | None, candidate: dict[str, Any]
    ) -> dict[str, Any]:
        admission = admit(candidate, Origin(str(path.relative_to(self.root))))
        if admission.key is None or admission.manifest is None:
            raise StoreError("; ".join(str(d) for d in admission.errors) or f"{key}: refused")
        if admission.key != key:
            raise StoreError(f"{key}: a change may not move the object (it would become {admission.key})")
        text = _dump(admission.manifest)
        if live is None or text != _dump(live):
            _write_atomic(path, text)
        return admission.manifest

    def remove(self, key: StoredKey) -> bool:
        """Delete one object (a Namespace with everything in it); False when it did not exist."""
        path = self.path_of(key)
        if key.kind == "Namespace" and key.name in PROTECTED_NAMESPACES:
            raise StoreError(f"{key}: this namespace may not be deleted")
        with self._lock.held():
            if self._live(key, path) is None:
                return False
            for victim in (self._last_applied_path(key), path):
                with contextlib.suppress(FileNotFoundError):
                    victim.unlink()
            if key.kind == "Namespace":
                self._remove_namespace_contents(key.name)
            _remove_empty_dirs(path.parent, self.root)
            return True

    def _remove_namespace_contents(self, namespace: str) -> None:
        for kind_dir in _visible_dirs(self.root):
            ns_path = self.root / kind_dir / namespace
            if not ns_path.is_dir():
                continue
            for entry in os.scandir(ns_path):
                if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
            _remove_empty_dirs(ns_path, self.root)

    # -- labels and annotations ------------------------------------------------------------------------

    def change_labels(
        self,
        key: StoredKey,
        changes: Mapping[str, str | None],
        *,
        overwrite: bool = True,
        create_namespace: bool = True,
    ) -> LabelOutcome:
        """Set (value) or remove (None) labels of one object, kubectl label's way: with overwrite off a
        label that has a different value is a LabelConflict and nothing changes. A Namespace that does
        not exist is created when `create_namespace`; any other missing object is NotFound."""
        problems = [
            f"metadata.labels.{k}: {problem}"
            for k, v in changes.items()
            if (problem := label_key_problem(k) or (label_value_problem(v) if v is not None else None))
        ]
        if problems:
            raise StoreError(f"{key}: " + "; ".join(problems))
        path = self.path_of(key)
        with self._lock.held():
            live = self._live(key, path)
            created = False
            if live is None:
                if key.kind != "Namespace" or not create_namespace:
                    raise NotFound(key)
                created = True
            candidate: dict[str, Any] = (
                _plain(live)
                if live is not None
                else {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": key.name}}
            )
            before = _string_map(key, candidate, "labels")
            labels = dict(before)
            missing: builtins.list[str] = []
            for label, value in changes.items():
                current = labels.get(label)
                if value is None:
                    if current is None:
                        missing.append(label)
                    labels.pop(label, None)
                elif current is not None and current != value and not overwrite:
                    raise LabelConflict(key, label, current, value)
                else:
                    labels[label] = value
            _set_string_map(candidate, "labels", labels)
            changed = labels != before
            manifest = self._store_changed(key, path, live, candidate) if changed or created else candidate
            return LabelOutcome(manifest, created, changed, tuple(missing))

    def label(
        self,
        key: StoredKey,
        changes: Mapping[str, str | None],
        *,
        create_namespace: bool = True,
        overwrite: bool = True,
    ) -> dict[str, Any]:
        """Set (value) or remove (None) labels; returns the stored manifest. See change_labels."""
        return self.change_labels(
            key, changes, overwrite=overwrite, create_namespace=create_namespace
        ).manifest

    def annotate(self, key: StoredKey, changes: Mapping[str, str | None]) -> dict[str, Any] | None:
        """Set (value) or remove (None) annotations, always overwriting; returns the stored manifest,
        or None when the object does not exist."""
        problems = [f"metadata.annotations.{k}: {p}" for k in changes if (p := label_key_problem(k))]
        if problems:
            raise StoreError(f"{key}: " + "; ".join(problems))

        def change(manifest: dict[str, Any]) -> None:
            annotations = dict(_string_map(key, manifest, "annotations"))
            for name, value in changes.items():
                if value is None:
                    annotations.pop(name, None)
                else:
                    annotations[name] = value
            _set_string_map(manifest, "annotations", annotations)

        return self.update(key, change)


def _string_map(key: StoredKey, manifest: Mapping[str, Any], field: str) -> dict[str, str]:
    meta = manifest.get("metadata")
    value = meta.get(field) if is_mapping(meta) else None
    if value is None:
        return {}
    if not is_mapping(value):
        raise StoreError(f"{key}: metadata.{field}: expected a mapping, got {type_name(value)}")
    return dict(value)


def _set_string_map(manifest: dict[str, Any], field: str, values: dict[str, str]) -> None:
    meta = manifest.setdefault("metadata", {})
    if values:
        meta[field] = values
    else:
        meta.pop(field, None)  # the API server omits empty maps too


def _key_to_delete(item: _InputObject) -> StoredKey | builtins.list[Diagnostic]:
    check = check_object(item.value, item.origin, field_prefix=item.field_prefix)
    if check.unsupported is not None:
        admission = admit(item.value, item.origin, field_prefix=item.field_prefix)
        return admission.key if admission.key is not None else builtins.list(admission.errors)
    if check.key is None:
        return [d for d in check.diagnostics(item.origin) if d.is_error]
    return StoredKey.of(check.key)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _visible_dirs(path: Path) -> builtins.list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if not e.name.startswith(".") and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _visible_yaml_files(path: Path) -> builtins.list[Path]:
    try:
        names = sorted(
            e.name
            for e in os.scandir(path)
            if not e.name.startswith(".") and e.name.endswith(".yaml") and e.is_file()
        )
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [path / name for name in names]


def _remove_empty_dirs(directory: Path, root: Path) -> None:
    """Remove `directory` and its parents up to (not including) `root` while they are empty."""
    current = directory
    while current != root and root in current.parents:
        try:
            current.rmdir()
        except OSError:  # not empty (or already gone): stop
            return
        current = current.parent
