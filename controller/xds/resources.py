"""Resource versions and the prepared, shareable form of what the xDS server serves.

Theory of operation: every resource is serialized exactly once per distinct content, with protobuf's
deterministic serialization, and wrapped in an `Any`. Its version is a short hash of those bytes, so
the same content always has the same version, across pushes, streams and controller restarts. That is
what makes `initial_resource_versions` useful: a node proxy that reconnects (even to a restarted
controller) announces the versions it holds and receives exactly the resources whose bytes differ.

A `ResourceSet` is immutable once built and is shared by every stream; the per-stream delta state
(`delta.py`) only holds names and version strings.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from google.protobuf import any_pb2
from google.protobuf.message import Message

from controller.translate import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Translation

# Authorization first: a new workload or service must never become known to a node proxy before the
# policies that govern it, or there is a window in which a DENY it is subject to is not yet enforced.
SERVED_TYPE_URLS: tuple[str, ...] = (AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL)

# 12 bytes of SHA-256 (16 base64url characters): collisions are out of reach for any realistic
# number of versions of one resource name, and versions stay short on the wire and in logs.
_VERSION_BYTES = 12


class VersionedResource(NamedTuple):
    """One resource as served: its content version and the pre-serialized `Any`."""

    version: str
    body: any_pb2.Any

    @property
    def size(self) -> int:
        return len(self.body.value)


# type URL -> resource name -> versioned resource.
ResourcesByType = Mapping[str, Mapping[str, VersionedResource]]


def content_version(serialized: bytes) -> str:
    """Stable short version of a serialized resource (same bytes, same version, in every process)."""
    digest = hashlib.sha256(serialized).digest()[:_VERSION_BYTES]
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def version_resource(type_url: str, message: Message) -> VersionedResource:
    serialized = message.SerializeToString(deterministic=True)
    return VersionedResource(content_version(serialized), any_pb2.Any(type_url=type_url, value=serialized))


@dataclass(frozen=True, slots=True)
class ResourceSet:
    """Everything served at one point in time, keyed by type URL and name."""

    resources: ResourcesByType = field(default_factory=dict)
    # The translated messages the versions were computed from, by type and name. Kept so that the next
    # preparation can skip serializing messages that are the very same (unchanged) objects.
    sources: Mapping[str, Mapping[str, Message]] = field(default_factory=dict, repr=False)

    def count(self, type_url: str) -> int:
        return len(self.resources.get(type_url, {}))

    def versions(self, type_url: str) -> dict[str, str]:
        return {name: r.version for name, r in self.resources.get(type_url, {}).items()}


def prepare(translation: Translation, previous: ResourceSet | None = None) -> ResourceSet:
    """Version and serialize a translation, reusing `previous` for messages that are the same objects.

    The identity shortcut relies on the Translation contract that published messages are never mutated
    (an incremental translator hands back the same object for an unchanged resource). Everything else
    is serialized, so a translator that builds fresh messages each time is merely slower, never wrong.
    """
    by_type: dict[str, Mapping[str, Message]] = {
        AUTHORIZATION_TYPE_URL: translation.authorizations,
        ADDRESS_TYPE_URL: translation.addresses,
    }
    resources: dict[str, dict[str, VersionedResource]] = {}
    for type_url, messages in by_type.items():
        old_sources = previous.sources.get(type_url, {}) if previous else {}
        old_resources = previous.resources.get(type_url, {}) if previous else {}
        prepared: dict[str, VersionedResource] = {}
        for name, message in messages.items():
            reused = old_resources.get(name)
            if reused is not None and old_sources.get(name) is message:
                prepared[name] = reused
            else:
                prepared[name] = version_resource(type_url, message)
        resources[type_url] = prepared
    return ResourceSet(resources=resources, sources={t: dict(m) for t, m in by_type.items()})


def changed_names(old: ResourceSet, new: ResourceSet) -> dict[str, frozenset[str]]:
    """Per type, the names added, removed or with a different version from `old` to `new`."""
    changes: dict[str, frozenset[str]] = {}
    for type_url in set(old.resources) | set(new.resources):
        before = old.resources.get(type_url, {})
        after = new.resources.get(type_url, {})
        names = {n for n in before.keys() ^ after.keys()}
        names.update(n for n, r in after.items() if n in before and before[n].version != r.version)
        changes[type_url] = frozenset(names)
    return changes
