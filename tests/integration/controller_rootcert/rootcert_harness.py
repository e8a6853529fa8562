"""Shared helpers of the root certificate tests: the stand-in API server's ConfigMaps, a plugged-in CA
made the way deploy/tools/make_cacerts makes it, and the settings the project's Kubernetes tests use."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from controller.rootcert import CONFIGMAP_NAME, ROOT_CERT_KEY
from controller.sources.kubernetes import KubernetesSourceSettings
from deploy.tools.make_cacerts import ROOT_CERT, make_authorities, write_cacerts
from loom.testing.fake_apiserver import FakeApiServer

# Fast retries and a short debounce, as everywhere in the project's Kubernetes tests.
FAST = KubernetesSourceSettings(debounce=0.005, backoff_initial=0.01, backoff_max=0.1)
WAIT = 10.0

ROOT_A = "-----BEGIN CERTIFICATE-----\nQUFBQQ==\n-----END CERTIFICATE-----\n"
ROOT_B = "-----BEGIN CERTIFICATE-----\nQkJCQg==\n-----END CERTIFICATE-----\n"


def config_map(api: FakeApiServer, namespace: str) -> dict[str, Any] | None:
    return api.get("ConfigMap", namespace, CONFIGMAP_NAME)


def root_in(api: FakeApiServer, namespace: str) -> str | None:
    """The root-cert.pem the namespace's ConfigMap holds, None without a ConfigMap."""
    found = config_map(api, namespace)
    return None if found is None else found.get("data", {}).get(ROOT_CERT_KEY)


def foreign_config_map(namespace: str, pem: str = "hand-made\n") -> dict[str, Any]:
    """A ConfigMap of the same name made by someone else (e.g. `kubectl create configmap`)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIGMAP_NAME, "namespace": namespace},
        "data": {ROOT_CERT_KEY: pem},
    }


def configmap_writes(api: FakeApiServer, after: int = 0) -> list[tuple[str, str]]:
    """(method, path) of every ConfigMap request except reads, from request number `after` on."""
    return [(r.method, r.path) for r in api.requests[after:] if "/configmaps" in r.path and r.method != "GET"]


def configmap_requests(api: FakeApiServer, after: int = 0) -> int:
    return sum(1 for r in api.requests[after:] if "/configmaps" in r.path)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a log call passed as `extra={"fields": ...}`."""
    found = record.__dict__.get("fields", {})
    assert isinstance(found, dict)
    return found


def make_cacerts(directory: Path) -> str:
    """A plugged-in CA (Istio's cacerts layout) in `directory`; returns its root (PEM)."""
    root, intermediate = make_authorities("cluster.local", root_days=3650, ca_days=30)
    write_cacerts(directory, root, intermediate)
    return (directory / ROOT_CERT).read_text()
