"""The committed generated code must be exactly what the .proto files produce today."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom.api import generate


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    fresh = sorted((tmp_path / "loom" / "api").glob("*_pb2*.py*"))
    assert fresh, "protoc produced nothing"
    committed = sorted(generate.API_DIR.glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == [p.name for p in committed], (
        "generated file set differs; run `make protos` and commit"
    )
    stale = [p.name for p in fresh if p.read_bytes() != (generate.API_DIR / p.name).read_bytes()]
    assert not stale, f"stale generated code {stale}; run `make protos` and commit"


@pytest.mark.parametrize(
    ("module", "full_name"),
    [
        ("workload_pb2", "istio.workload.Address"),
        ("authorization_pb2", "istio.security.Authorization"),
        ("discovery_pb2", "envoy.service.discovery.v3.DeltaDiscoveryRequest"),
        ("ca_pb2", "istio.v1.auth.IstioCertificateRequest"),
        ("zds_pb2", "istio.workload.zds.WorkloadRequest"),
    ],
)
def test_wire_names_match_istio(module: str, full_name: str) -> None:
    """Package names are part of the wire contract (type URLs, gRPC method paths)."""
    import importlib

    mod = importlib.import_module(f"loom.api.{module}")
    message = full_name.rsplit(".", 1)[1]
    assert getattr(mod, message).DESCRIPTOR.full_name == full_name


def test_field_numbers_match_istio_workload_api() -> None:
    """Spot-check field numbers that interoperability with Istio's workload API depends on."""
    from loom.api import authorization_pb2, workload_pb2

    workload = workload_pb2.Workload.DESCRIPTOR.fields_by_name
    assert {n: workload[n].number for n in ("uid", "addresses", "waypoint", "services", "node")} == {
        "uid": 20,
        "addresses": 3,
        "waypoint": 8,
        "services": 22,
        "node": 9,
    }
    match = authorization_pb2.Match.DESCRIPTOR.fields_by_name
    assert match["service_accounts"].number == 11
    assert match["not_destination_ports"].number == 10
