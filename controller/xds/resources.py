"""Resource versions and the prepared, shareable form of what the xDS server serves.

Theory of operation: every resource is held as its deterministic serialization -- the very bytes the
translation produced (`controller.translate.serialized`), never a live message -- and its version is a
short hash of those bytes, so the same content always has the same version, across pushes, streams
and controller restarts. That is what makes `initial_resource_versions` useful: a node proxy that
reconnects (even to a restarted controller) announces the versions it holds and receives exactly the
resources whose bytes differ.

Per resource a `ResourceSet` keeps only (version, bytes). The discovery `Resource`/`Any` messages are
built when a response is built (`delta.py`, directly inside the response message) and dropped with
it: with the upb backend a live message costs about twenty times its serialized size, and 11,000
prepared messages would cost more memory than all the rest of the served state.

Hashing is skipped for unchanged resources: the incremental translator hands back the very same
`bytes` object for a resource it did not recompute, and any resource whose bytes equal the previous
ones keeps the previous version without being hashed again.

A `ResourceSet` is immutable once built and is shared by every stream; the per-stream delta state
(`delta.py`) only holds names and version strings.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from google.protobuf.message import Message

from controller.translate import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Translation
from controller.translate.serialized import serialize

# The L7 configuration of one waypoint (loom/api/waypoint.proto), named "<namespace>/<name>".
WAYPOINT_CONFIG_TYPE_URL = "type.googleapis.com/loom.waypoint.v1.WaypointConfig"
# Authorization first: a new workload or service must never become known to a node proxy before the
# policies that govern it, or there is a window in which a DENY it is subject to is not yet enforced.
NODE_PROXY_TYPE_URLS: tuple[str, ...] = (AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL)
# A waypoint's configuration first, for the same reason: its policies before the addresses it serves.
WAYPOINT_TYPE_URLS: tuple[str, ...] = (WAYPOINT_CONFIG_TYPE_URL, ADDRESS_TYPE_URL)
# Every type the server holds; which of them one stream may see depends on who it is (server.py).
SERVED_TYPE_URLS: tuple[str, ...] = (AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL, WAYPOINT_CONFIG_TYPE_URL)

# 12 bytes of SHA-256 (16 base64url characters): collisions are out of reach for any realistic
# number of versions of one resource name, and versions stay short on the wire and in logs.
_VERSION_BYTES = 12


class VersionedResource(NamedTuple):
    """One resource as served: its content version and its serialized message (the `Any` value)."""

    version: str
    serialized: bytes

    @property
    def size(self) -> int:
        return len(self.serialized)


# type URL -> resource name -> versioned resource.
ResourcesByType = Mapping[str, Mapping[str, VersionedResource]]


def content_version(serialized: bytes) -> str:
    """Stable short version of a serialized resource (same bytes, same version, in every process)."""
    digest = hashlib.sha256(serialized).digest()[:_VERSION_BYTES]
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def versioned(serialized: bytes) -> VersionedResource:
    """A resource from its deterministic serialization."""
    return VersionedResource(content_version(serialized), serialized)


def version_resource(message: Message) -> VersionedResource:
    """A resource from a message (serialized deterministically, as the translation does)."""
    return versioned(serialize(message))


@dataclass(frozen=True, slots=True)
class ResourceSet:
    """Everything served at one point in time, keyed by type URL and name."""

    resources: ResourcesByType = field(default_factory=dict)

    def count(self, type_url: str) -> int:
        return len(self.resources.get(type_url, {}))

    def versions(self, type_url: str) -> dict[str, str]:
        return {name: r.version for name, r in self.resources.get(type_url, {}).items()}


def prepare(
    translation: Translation,
    previous: ResourceSet | None = None,
    extra: Mapping[str, Mapping[str, bytes]] | None = None,
) -> ResourceSet:
    """Version a translation, reusing `previous`'s version of every resource whose bytes are unchanged.

    Unchanged resources of an incremental translation are the very same `bytes` objects, for which the
    comparison is an identity check; equal bytes from a fresh translation are compared (far cheaper
    than hashing them again). Either way the version is a function of the bytes only.

    `extra`: serialized resources of other types, by type URL then name (the waypoint configurations).
    """
    by_type: dict[str, Mapping[str, bytes]] = {
        AUTHORIZATION_TYPE_URL: translation.serialized_authorizations.blobs,
        ADDRESS_TYPE_URL: translation.serialized_addresses.blobs,
    }
    for type_url, blobs in (extra or {}).items():
        if type_url in by_type:
            raise ValueError(f"{type_url} comes from the translation; it cannot be given as extra")
        by_type[type_url] = blobs
    resources: dict[str, dict[str, VersionedResource]] = {}
    for type_url, blobs in by_type.items():
        old_resources = previous.resources.get(type_url, {}) if previous else {}
        prepared: dict[str, VersionedResource] = {}
        for name, serialized in blobs.items():
            reused = old_resources.get(name)
            if reused is not None and reused.serialized == serialized:
                prepared[name] = reused
            else:
                prepared[name] = versioned(serialized)
        resources[type_url] = prepared
    return ResourceSet(resources=resources)


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
