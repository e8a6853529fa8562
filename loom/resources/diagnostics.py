"""Errors and warnings about configuration, each naming where the problem is.

Rendered as `<file> doc <n> <Kind> <namespace>/<name>: <field path>: <message>`, e.g.
`policy.yaml doc 2 AuthorizationPolicy default/deny-legacy: spec.rules[0].from[0].source.namespaces:
expected a list of strings, got int`. Parts that are unknown are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from loom.resources.model import Origin, ResourceKey


class Severity(StrEnum):
    ERROR = "error"  # the object was rejected; nothing of it is used
    WARNING = "warning"  # the object is used, but not (entirely) as the user may expect


@dataclass(frozen=True, slots=True)
class Diagnostic:
    severity: Severity
    message: str
    origin: Origin | None = None
    key: ResourceKey | None = None
    field: str = ""  # dotted path with list indexes, e.g. spec.rules[0].to[0].operation.ports

    def __str__(self) -> str:
        where = []
        if self.origin is not None:
            where.append(str(self.origin))
        if self.key is not None:
            obj = f"{self.key.namespace}/{self.key.name}" if self.key.namespace else self.key.name
            where.append(f"{self.key.kind} {obj}")
        prefix = " ".join(where)
        parts = [p for p in (prefix, self.field, self.message) if p]
        return ": ".join(parts)

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR
