"""`loomctl ztunnel-config` against a live admin port and against saved dumps: istioctl's tables
exactly, -o json / yaml, aliases, filters, --node through the lab resolver, and clear errors."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import yaml
from ztunnel_admin_harness import AdminHarness, running_admin

from loom.cli import ztunnel_config
from loom.cli.main import main

pytestmark = pytest.mark.timeout(60)

WORKLOADS = """\
NAMESPACE POD NAME           ADDRESS     NODE   WAYPOINT PROTOCOL
default   productpage-v1-aaa 10.244.1.10 node-a None     HBONE
default   reviews-v1-bbb     10.244.1.20 node-a waypoint HBONE
default   reviews-v2-ccc     10.244.2.21 node-b None     HBONE
default   waypoint-ddd       10.244.1.99 node-a None     HBONE
legacy    legacy-eee         10.244.3.5  node-b None     TCP
"""

SERVICES = """\
NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS
default   productpage  10.96.0.20  None     1/1
default   reviews      10.96.0.10  waypoint 1/2
default   waypoint     10.96.0.99  None     1/1
"""

POLICIES = """\
NAMESPACE    POLICY NAME ACTION SCOPE
default      allow-curl  Allow  WorkloadSelector
default      deny-legacy Deny   Namespace
istio-system audit       Deny   Global
"""

CONNECTIONS = """\
WORKLOAD                   DIRECTION LOCAL             REMOTE            REMOTE TARGET    PROTOCOL
productpage-v1-aaa.default Outbound  10.244.1.10:35380 10.244.1.99:15008 10.96.0.10:9080  HBONE
productpage-v1-aaa.default Inbound   10.244.1.10:9080  10.244.2.21:41234 10.244.1.10:9080 HBONE
"""


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[AdminHarness]:
    async with running_admin(tmp_path) as h:
        yield h


async def loomctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run loomctl in a worker thread (it blocks on HTTP while this loop serves the admin port)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def certificates_table(harness: AdminHarness) -> str:
    """The expected certificate rows, from the manager's own view of the minted certificate."""
    (status,) = harness.certificates.snapshot()
    rows = [("Leaf", status.cert_chain[0])]
    rows += [("Intermediate", c) for c in status.cert_chain[1:]]
    rows += [("Root", c) for c in status.root_certs]
    cells = [
        [
            str(status.identity),
            kind,
            "Available",
            "true",
            c.serial_number,
            c.expiration_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            c.valid_from.strftime("%Y-%m-%dT%H:%M:%SZ"),
        ]
        for kind, c in rows
    ]
    headers = ["CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"]
    widths = [max(len(r[i]) for r in [headers, *cells]) for i in range(len(headers))]
    return "".join(
        " ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
        for r in [headers, *cells]
    )


async def test_tables_from_the_live_admin_port(
    harness: AdminHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    address = ["--admin-address", harness.admin_address]
    assert await loomctl(capsys, "ztunnel-config", "workloads", *address) == (0, WORKLOADS, "")
    assert await loomctl(capsys, "ztunnel-config", "services", *address) == (0, SERVICES, "")
    assert await loomctl(capsys, "ztunnel-config", "policies", *address) == (0, POLICIES, "")
    assert await loomctl(capsys, "ztunnel-config", "connections", *address) == (0, CONNECTIONS, "")
    certificates = certificates_table(harness)
    assert await loomctl(capsys, "ztunnel-config", "certificates", *address) == (0, certificates, "")
    expected_all = "\n".join([WORKLOADS, SERVICES, POLICIES, certificates, CONNECTIONS])
    assert await loomctl(capsys, "zc", "all", *address) == (0, expected_all, "")


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("workload", "workloads"),
        ("w", "workloads"),
        ("service", "services"),
        ("s", "services"),
        ("svc", "services"),
        ("policy", "policies"),
        ("p", "policies"),
        ("pol", "policies"),
        ("certificate", "certificates"),
        ("certs", "certificates"),
        ("cert", "certificates"),
        ("cons", "connections"),
    ],
)
async def test_aliases(
    alias: str, name: str, harness: AdminHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    address = ["--admin-address", harness.admin_address]
    assert await loomctl(capsys, "zc", alias, *address) == await loomctl(
        capsys, "ztunnel-config", name, *address
    )


async def test_json_yaml_and_saved_dump(
    harness: AdminHarness, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    address = ["--admin-address", harness.admin_address]
    code, out, _ = await loomctl(capsys, "zc", "all", "-o", "json", *address)
    dump = json.loads(out)
    assert code == 0 and list(dump)[:5] == [
        "workloads",
        "services",
        "policies",
        "certificates",
        "workloadState",
    ]
    saved = tmp_path / "dump.json"
    saved.write_text(out)

    code, out, _ = await loomctl(capsys, "zc", "workloads", "-o", "json", *address)
    assert json.loads(out) == sorted(dump["workloads"], key=lambda w: (w["namespace"], w["name"]))
    code, out, _ = await loomctl(capsys, "zc", "policies", "-o", "yaml", *address)
    assert yaml.safe_load(out) == dump["policies"]
    code, out, _ = await loomctl(
        capsys, "zc", "connections", "-o", "yaml", "--direction", "inbound", *address
    )
    assert [c["direction"] for c in yaml.safe_load(out)] == ["inbound"]

    # The saved file gives the same tables as the live port.
    for command, table in (("workloads", WORKLOADS), ("services", SERVICES), ("policies", POLICIES)):
        assert await loomctl(capsys, "zc", command, "-f", str(saved)) == (0, table, "")
    assert await loomctl(capsys, "zc", "cons", "--file", str(saved)) == (0, CONNECTIONS, "")


def run_offline(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# An Istio ztunnel's dump: keyed-map sections, VIPs with a network, connections only in workloadState.
ISTIO_DUMP = {
    "workloads": {
        "network1/10.244.2.54": {
            "workloadIps": ["10.244.2.54"],
            "waypoint": {"destination": "network1/10.96.65.117", "hboneMtlsPort": 15008},
            "protocol": "HBONE",
            "uid": "Kubernetes//Pod/bookinfo/ratings-v1-7c9bd4b87f-9wf8s",
            "name": "ratings-v1-7c9bd4b87f-9wf8s",
            "namespace": "bookinfo",
            "node": "ambient-worker2",
            "status": "Healthy",
        },
        "network1/10.244.1.7": {
            "workloadIps": ["10.244.1.7"],
            "protocol": "HBONE",
            "uid": "Kubernetes//Pod/bookinfo/waypoint-5d8c9b6f9c-xk2lp",
            "name": "waypoint-5d8c9b6f9c-xk2lp",
            "namespace": "bookinfo",
            "node": "ambient-worker",
            "status": "Unhealthy",
        },
    },
    "services": {
        "bookinfo/waypoint.bookinfo.svc.cluster.local": {
            "name": "waypoint",
            "namespace": "bookinfo",
            "hostname": "waypoint.bookinfo.svc.cluster.local",
            "vips": ["network1/10.96.65.117"],
            "endpoints": {
                "Kubernetes//Pod/bookinfo/waypoint-5d8c9b6f9c-xk2lp": {
                    "workloadUid": "Kubernetes//Pod/bookinfo/waypoint-5d8c9b6f9c-xk2lp"
                }
            },
        },
        "bookinfo/headless.bookinfo.svc.cluster.local": {
            "name": "headless",
            "namespace": "bookinfo",
            "hostname": "headless.bookinfo.svc.cluster.local",
            "vips": [],
            "endpoints": {},
            "waypoint": {"destination": "network1/10.96.0.1"},
        },
    },
    "policies": [{"name": "allow-nothing", "namespace": "default", "action": "Allow", "scope": "Namespace"}],
    "certificates": [
        {
            "identity": "spiffe://cluster.local/ns/bookinfo/sa/ratings",
            "state": "Available",
            "cert_chain": [
                {
                    "serialNumber": "1a2b",
                    "validFrom": "2024-05-04T09:17:47Z",
                    "expirationTime": "2024-05-05T09:17:47Z",
                },
                {
                    "serialNumber": "77",
                    "validFrom": "2024-01-01T00:00:00Z",
                    "expirationTime": "2099-01-01T00:00:00Z",
                },
            ],
            "root_certs": [
                {
                    "serialNumber": "99",
                    "validFrom": "2024-01-01T00:00:00Z",
                    "expirationTime": "2099-01-01T00:00:00Z",
                }
            ],
        },
        {"identity": "spiffe://cluster.local/ns/bookinfo/sa/new", "state": "Initializing", "cert_chain": []},
    ],
    "workloadState": {
        "0b5f0c1e-pod-uid": {
            "state": "Up",
            "info": {"name": "ratings-v1-7c9bd4b87f-9wf8s", "namespace": "bookinfo"},
            "connections": {
                "inbound": [
                    {
                        "src": "10.244.1.7:50000",
                        "originalDst": "10.244.2.54:9080",
                        "actualDst": "10.244.2.54:9080",
                        "protocol": "HBONE",
                    }
                ],
                "outbound": [
                    {
                        "src": "10.244.2.54:40000",
                        "originalDst": "10.96.1.5:3306",
                        "actualDst": "10.244.3.3:15008",
                        "protocol": "HBONE",
                    }
                ],
            },
        }
    },
}


def test_an_istio_dump_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "istio.json"
    path.write_text(json.dumps(ISTIO_DUMP))
    assert run_offline(["zc", "w", "-f", str(path)], capsys) == (
        0,
        "NAMESPACE POD NAME                    ADDRESS     NODE            WAYPOINT PROTOCOL\n"
        "bookinfo  ratings-v1-7c9bd4b87f-9wf8s 10.244.2.54 ambient-worker2 waypoint HBONE\n"
        "bookinfo  waypoint-5d8c9b6f9c-xk2lp   10.244.1.7  ambient-worker  None     HBONE\n",
        "",
    )
    assert run_offline(["zc", "svc", "-f", str(path)], capsys) == (
        0,
        "NAMESPACE SERVICE NAME SERVICE VIP  WAYPOINT ENDPOINTS\n"
        "bookinfo  headless     None         NA       0/0\n"
        "bookinfo  waypoint     10.96.65.117 None     0/1\n",
        "",
    )
    assert run_offline(["zc", "pol", "-f", str(path)], capsys) == (
        0,
        "NAMESPACE POLICY NAME   ACTION SCOPE\ndefault   allow-nothing Allow  Namespace\n",
        "",
    )
    code, out, err = run_offline(["zc", "cons", "-f", str(path)], capsys)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "WORKLOAD                             DIRECTION LOCAL             REMOTE           REMOTE TARGET    PROTOCOL",  # noqa: E501
        "ratings-v1-7c9bd4b87f-9wf8s.bookinfo Inbound   10.244.2.54:9080  10.244.1.7:50000 10.244.2.54:9080 HBONE",  # noqa: E501
        "ratings-v1-7c9bd4b87f-9wf8s.bookinfo Outbound  10.244.2.54:40000 10.244.3.3:15008 10.96.1.5:3306   HBONE",  # noqa: E501
    ]


def test_certificate_rows_and_validity() -> None:
    now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    rows = ztunnel_config.certificate_rows(ISTIO_DUMP["certificates"], now)  # type: ignore[arg-type]
    assert rows == [
        ["spiffe://cluster.local/ns/bookinfo/sa/ratings", "Leaf", "Available", "false", "1a2b",
         "2024-05-05T09:17:47Z", "2024-05-04T09:17:47Z"],
        ["spiffe://cluster.local/ns/bookinfo/sa/ratings", "Intermediate", "Available", "true", "77",
         "2099-01-01T00:00:00Z", "2024-01-01T00:00:00Z"],
        ["spiffe://cluster.local/ns/bookinfo/sa/ratings", "Root", "Available", "true", "99",
         "2099-01-01T00:00:00Z", "2024-01-01T00:00:00Z"],
        ["spiffe://cluster.local/ns/bookinfo/sa/new", "Leaf", "Initializing", "false", "NA", "NA", "NA"],
    ]  # fmt: skip


def offline_out(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = run_offline(argv, capsys)
    assert (code, err) == (0, "")
    return out


def test_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "istio.json")
    Path(path).write_text(json.dumps(ISTIO_DUMP))
    out = offline_out(["zc", "w", "-f", path, "--workload-node", "ambient-worker"], capsys)
    assert out.splitlines()[1:] == [
        "bookinfo  waypoint-5d8c9b6f9c-xk2lp 10.244.1.7 ambient-worker None     HBONE"
    ]
    out = offline_out(["zc", "w", "-f", path, "--address", "10.244.2.54", "-o", "json"], capsys)
    assert [w["name"] for w in json.loads(out)] == ["ratings-v1-7c9bd4b87f-9wf8s"]
    out = offline_out(["zc", "w", "-f", path, "--workload-namespace", "default"], capsys)
    assert out == "NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL\n"
    out = offline_out(["zc", "s", "-f", path, "--service-namespace", "bookinfo", "-o", "json"], capsys)
    assert [s["name"] for s in json.loads(out)] == ["headless", "waypoint"]
    out = offline_out(["zc", "p", "-f", path, "--policy-namespace", "bookinfo"], capsys)
    assert out == "NAMESPACE POLICY NAME ACTION SCOPE\n"
    out = offline_out(["zc", "cons", "-f", path, "--direction", "outbound", "-o", "json"], capsys)
    assert [c["remote"] for c in json.loads(out)] == ["10.244.3.3:15008"]
    out = offline_out(["zc", "cons", "-f", path, "--workload-namespace", "default"], capsys)
    assert out.count("\n") == 1


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_unreachable_admin_address_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code, out, err = run_offline(["zc", "workloads", "--admin-address", f"127.0.0.1:{port}"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"Error: cannot reach the ztunnel admin endpoint at 127.0.0.1:{port}: ")
    assert "refused" in err.lower()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "Error: cannot read {path}: No such file or directory\n"),
        ("{not json", "Error: {path} is not valid JSON: "),
        ("[1, 2]", "Error: {path}: expected a JSON object with workloads, services, ..., got list\n"),
        ('{"workloads": "x"}', "Error: the dump's 'workloads' section must be a list of objects\n"),
    ],
)
def test_bad_dump_files(
    content: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "dump.json"
    if content is not None:
        path.write_text(content)
    code, out, err = run_offline(["zc", "workloads", "-f", str(path)], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(message.format(path=path))


def test_source_flags_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["zc", "w", "-f", "x.json", "--admin-address", "127.0.0.1:1"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def parse_with_resolver(resolver: ztunnel_config.NodeResolver, argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loomctl")
    ztunnel_config.register(parser.add_subparsers(dest="command", required=True), node_resolver=resolver)
    return parser.parse_args(list(argv))


def test_lab_node_resolver(tmp_path: Path) -> None:
    no_lab = {"LOOM_LAB_DIR": str(tmp_path)}
    with pytest.raises(ztunnel_config.ZtunnelConfigError) as raised:
        ztunnel_config.lab_node_resolver("node-a", no_lab)
    assert str(raised.value) == (
        f"--node: no lab is up (no {tmp_path.resolve()}/lab.json); run `loomctl lab up` first "
        "(or use --admin-address)"
    )
    nodes = tmp_path / "nodes.json"
    env = {ztunnel_config.LAB_NODES_ENV: str(nodes)}
    with pytest.raises(ztunnel_config.ZtunnelConfigError, match="cannot read the lab node file"):
        ztunnel_config.lab_node_resolver("node-a", env)
    nodes.write_text('["node-a"]')
    with pytest.raises(ztunnel_config.ZtunnelConfigError, match="must be a JSON object"):
        ztunnel_config.lab_node_resolver("node-a", env)
    nodes.write_text(json.dumps({"node-a": "127.0.0.1:15000", "node-b": "127.0.0.2:15000"}))
    assert ztunnel_config.lab_node_resolver("node-b", env) == "127.0.0.2:15000"
    with pytest.raises(
        ztunnel_config.ZtunnelConfigError,
        match=r"node 'node-c' is not in the lab \(known nodes: node-a, node-b\)",
    ):
        ztunnel_config.lab_node_resolver("node-c", env)


async def test_node_flag_goes_through_the_resolver(
    harness: AdminHarness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"node-a": harness.admin_address}))

    def lab(node: str, _env: object) -> str:
        return ztunnel_config.lab_node_resolver(node, {ztunnel_config.LAB_NODES_ENV: str(nodes)})

    args = parse_with_resolver(lab, ["ztunnel-config", "policies", "--node", "node-a"])
    capsys.readouterr()
    assert await asyncio.to_thread(args.run, args) == 0
    assert capsys.readouterr().out == POLICIES

    without_lab = parse_with_resolver(
        lambda node, _env: ztunnel_config.lab_node_resolver(node, {"LOOM_LAB_DIR": str(tmp_path)}),
        ["zc", "w", "--node", "node-a"],
    )
    assert without_lab.run(without_lab) == 1
    assert capsys.readouterr().err.startswith("Error: --node: no lab is up")


async def test_log_subcommand(harness: AdminHarness, capsys: pytest.CaptureFixture[str]) -> None:
    address = ["--admin-address", harness.admin_address]
    assert await loomctl(capsys, "zc", "log", *address) == (
        0,
        f"{harness.admin_address}:\ncurrent log level is info\n",
        "",
    )
    code, out, _ = await loomctl(capsys, "zc", "log", "--level", "access:debug", *address)
    assert out == f"{harness.admin_address}:\ncurrent log level is info,access:debug\n"
    code, out, err = await loomctl(capsys, "zc", "log", "--level", "nope:debug", *address)
    assert code == 1
    assert err.startswith(f"Error: the ztunnel admin endpoint at {harness.admin_address} answered 400")
    assert "unknown log scope 'nope'" in err
    code, out, _ = await loomctl(capsys, "zc", "log", "-r", *address)
    assert out == f"{harness.admin_address}:\ncurrent log level is info\n"
