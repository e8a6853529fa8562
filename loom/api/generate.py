"""Regenerate the committed protobuf and gRPC code from loom/api/*.proto.

Run as `python -m loom.api.generate` (or `make protos`). `generate(out_dir)` writes into another
directory so the staleness test can compare a fresh generation with what is committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
REPO_ROOT = API_DIR.parent.parent
# Files that declare a gRPC service get *_pb2_grpc.py as well.
SERVICE_PROTOS = ("ca.proto", "discovery.proto")


def proto_files() -> list[Path]:
    return sorted(API_DIR.glob("*.proto"))


def generate(out_root: Path) -> None:
    """Write loom/api/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py below out_root."""
    import grpc_tools
    from grpc_tools import protoc  # test extra: only needed to regenerate

    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in proto_files():
        rel = proto.relative_to(REPO_ROOT)
        args = [
            "protoc",
            f"-I{REPO_ROOT}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
        ]
        if proto.name in SERVICE_PROTOS:
            args.append(f"--grpc_python_out={out_root}")
        if protoc.main([*args, str(rel)]) != 0:
            raise RuntimeError(f"protoc failed for {rel}")


if __name__ == "__main__":
    generate(REPO_ROOT)
    sys.exit(0)
