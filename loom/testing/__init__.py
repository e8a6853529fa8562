"""Test helpers that ship with loom, so that every component (and users' own tests) can run against
realistic stand-ins instead of mocks: `FakeApiServer` speaks the Kubernetes API's list/watch HTTP protocol
on loopback, including its failure modes (410 Gone, dropped streams, missing CRDs, 5xx).
"""

from loom.testing.fake_apiserver import (
    DEFAULT_RESOURCES,
    FakeApiServer,
    FakeResource,
    FakeToken,
    RecordedRequest,
    json_merge_patch,
)
from loom.testing.waiting import eventually

__all__ = [
    "DEFAULT_RESOURCES",
    "FakeApiServer",
    "FakeResource",
    "FakeToken",
    "RecordedRequest",
    "eventually",
    "json_merge_patch",
]
