"""A loom controller for tests: in-process on loopback, configured from a directory of YAML.

Shared by the controller's own integration tests, the node proxy's control-plane tests and the root
end-to-end tests, so they all start, wait for and stop a controller the same way."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from controller.app import ControllerApp
from controller.config import Config
from controller.sources.base import ConfigSource
from loom.testing.waiting import eventually

WAIT = 10.0  # upper bound of every wait; normal runs take milliseconds


def write_manifests(path: Path, *manifests: Mapping[str, Any]) -> None:
    path.write_text(yaml.safe_dump_all([dict(m) for m in manifests], sort_keys=False))


def controller_config(
    state_dir: Path,
    config_dirs: Sequence[Path] = (),
    *,
    grpc_port: int = 0,
    kubernetes: bool = False,
    extra: Sequence[str] = (),
) -> Config:
    """Loopback ports (gRPC on `grpc_port`, 0 = any; a fixed port lets a test restart it in place) and
    short push timing so tests see changes within milliseconds."""
    argv = [
        *("--state-dir", str(state_dir)),
        *("--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", "127.0.0.1:0"),
        *("--debounce", "5ms", "--max-push-delay", "20ms"),
        *extra,
    ]
    for d in config_dirs:
        argv += ["--config-dir", str(d)]
    if kubernetes:
        argv.append("--kubernetes")
    return Config.from_args(argv, {})


async def start_controller(
    config: Config, *, source: ConfigSource | None = None, wait_ready: bool = True
) -> ControllerApp:
    """Start a controller the test stops itself (e.g. to take it down in the middle of a test)."""
    app = ControllerApp(config, source=source)
    try:
        await app.start()
        if wait_ready:
            await eventually(lambda: app.ready, within=WAIT, what="controller ready")
    except BaseException:
        await app.stop()
        raise
    return app


@contextlib.asynccontextmanager
async def running_controller(
    config: Config, *, source: ConfigSource | None = None, wait_ready: bool = True
) -> AsyncIterator[ControllerApp]:
    app = await start_controller(config, source=source, wait_ready=wait_ready)
    try:
        yield app
    finally:
        await app.stop()


def metric_value(exposition: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The value of one sample in a Prometheus text exposition (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in (labels or {}).items())
    series = f"{name}{{{wanted}}}" if wanted else name
    for line in exposition.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
