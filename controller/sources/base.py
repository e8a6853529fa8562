"""The interface every configuration source implements.

A source owns the authoritative view of the configuration it reads (a directory of YAML files, or the
Kubernetes API) and reports it as whole `ConfigSnapshot`s: each call of `on_change` carries the complete
current state plus the diagnostics of what could not be used. Consumers diff snapshots; a source never
sends partial deltas, so a missed notification can never leave a consumer inconsistent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from loom.resources.diagnostics import Diagnostic
from loom.resources.model import ConfigSnapshot

ChangeCallback = Callable[[ConfigSnapshot, tuple[Diagnostic, ...]], None]


class ConfigSource(Protocol):
    async def run(self, on_change: ChangeCallback) -> None:
        """Load everything, call on_change with the first snapshot, then keep watching and call it
        again after every change, until cancelled. Transient failures are retried, never raised."""
        ...
