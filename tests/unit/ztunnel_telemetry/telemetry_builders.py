"""Telemetry-test helpers: policies, log capture with a fixed time. The workload API builders are the
shared ones from loom.testing.workload_api (re-exported here for the tests' imports)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from loom.api import authorization_pb2
from loom.testing.workload_api import (  # noqa: F401 - re-exported
    CLUSTER,
    apply_policies,
    by_name,
    hostname,
    name_of,
    packed,
    service,
    service_key,
    state_with,
    uid,
    waypoint_ref,
    workload,
)

FIXED_CREATED = 1714816745.028709  # 2024-05-04T09:59:05.028709Z


def deny_from_namespace(name: str, namespace: str, source_namespace: str) -> authorization_pb2.Authorization:
    """A namespace-wide DENY of every connection from `source_namespace`."""
    policy = authorization_pb2.Authorization(
        name=name, namespace=namespace, scope=authorization_pb2.NAMESPACE, action=authorization_pb2.DENY
    )
    match = policy.groups.add().rules.add().matches.add()
    match.namespaces.add(exact=source_namespace)
    return policy


def strict_mtls(namespace: str) -> authorization_pb2.Authorization:
    """What a STRICT PeerAuthentication becomes: DENY anything without a principal."""
    policy = authorization_pb2.Authorization(
        name="istio_converted_static_strict",
        namespace=namespace,
        scope=authorization_pb2.NAMESPACE,
        action=authorization_pb2.DENY,
    )
    match = policy.groups.add().rules.add().matches.add()
    match.not_principals.add(presence={})
    return policy


class RecordCollector(logging.Handler):
    """Keeps every record it sees (the test formats them itself, with a fixed time)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def collect(logger_name: str, level: int = logging.DEBUG) -> Iterator[RecordCollector]:
    """Collect the records of one logger (and its children), restoring its level afterwards."""
    target = logging.getLogger(logger_name)
    collector = RecordCollector()
    old_level = target.level
    target.addHandler(collector)
    target.setLevel(level)
    try:
        yield collector
    finally:
        target.removeHandler(collector)
        target.setLevel(old_level)


def fixed_time(record: logging.LogRecord) -> logging.LogRecord:
    record.created = FIXED_CREATED
    return record
