"""Where a node proxy's idle RSS comes from: the interpreter and libraries, step by step.

    python -m bench.rss_floor [--json FILE]

One fresh interpreter (this one's executable, so the same venv) imports the node proxy's stack one
layer at a time and reads its own VmRSS / RssAnon / RssFile from /proc after each layer; the last
layer is `ztunnel.main` itself (everything loom's node proxy loads before it starts serving). A
second interpreter does nothing at all, for the bare baseline. The figures are cumulative and in MB
(10^6 bytes, as bench.ztunnel_pair reports RSS), so the row before loom's own modules is the floor any
Python node proxy built on these libraries starts from, before it holds a certificate, a workload or
a connection. Compare the last row with the idle RSS bench.ztunnel_pair measures on a running
ztunnel (the difference is what running adds: state, TLS contexts, connection buffers).

Nothing is started and nothing touches the network: the layers are imports only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Final

MB: Final = 1e6

# (label, modules imported by that layer). In import order: each layer adds to the ones before.
LAYERS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("CPython 3 + site (the venv)", ()),
    ("asyncio + ssl (OpenSSL)", ("asyncio", "ssl")),
    ("uvloop", ("uvloop",)),
    ("h2 + hpack + hyperframe (HBONE framing)", ("h2.connection",)),
    (
        "protobuf (upb) + the xDS, workload, policy, CA, ZDS messages",
        tuple(f"loom.api.{name}_pb2" for name in ("discovery", "workload", "authorization", "ca", "zds")),
    ),
    ("grpclib (xDS and CA client)", ("grpclib.client",)),
    (
        "cryptography (keys, CSRs, certificate checks)",
        ("cryptography.x509", "cryptography.x509.verification"),
    ),
    ("prometheus-client (metrics)", ("prometheus_client",)),
    ("httptools + h11 (admin / metrics / readiness servers)", ("httptools", "h11")),
    ("loom's node proxy (ztunnel.main and all it imports)", ("ztunnel.main",)),
)

_PROBE: Final = """
import importlib, json, sys
def memory():
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                found[key] = int(value.split()[0]) * 1024
    return found
rows = []
for modules in json.loads(sys.argv[1]):
    for name in modules:
        importlib.import_module(name)
    rows.append(memory())
print(json.dumps(rows))
"""


def measure() -> list[dict[str, int]]:
    """Cumulative memory after each layer of LAYERS, in bytes, from one fresh interpreter."""
    layers = json.dumps([list(modules) for _, modules in LAYERS])
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, layers], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"the probe interpreter failed:\n{result.stderr.strip()}")
    rows: list[dict[str, int]] = json.loads(result.stdout)
    return rows


def report(rows: Sequence[dict[str, int]]) -> str:
    lines = [
        f"{'layer (cumulative)':<62} {'RSS MB':>7} {'+MB':>6} {'anon':>6} {'file':>6}",
        "-" * 91,
    ]
    previous = 0
    for (label, _), row in zip(LAYERS, rows, strict=True):
        rss = row["VmRSS"]
        lines.append(
            f"{label:<62} {rss / MB:>7.1f} {(rss - previous) / MB:>+6.1f} "
            f"{row['RssAnon'] / MB:>6.1f} {row['RssFile'] / MB:>6.1f}"
        )
        previous = rss
    floor = rows[-2]["VmRSS"] / MB
    lines += [
        "",
        f"libraries alone (before loom's own modules): {floor:.1f} MB; "
        f"with the node proxy's modules: {rows[-1]['VmRSS'] / MB:.1f} MB",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = measure()
    print(report(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([{"layer": label, **row} for (label, _), row in zip(LAYERS, rows, strict=True)], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
