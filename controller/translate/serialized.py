"""A read-only name -> protobuf message mapping that keeps each message serialized.

Why: with protobuf's upb backend a live message costs an order of magnitude more memory than its
serialized form (a typical Workload Address: ~3 KB of arena and wrapper objects against ~160 bytes on
the wire), and even a message parsed back from bytes keeps most of that cost. The controller holds
every translated resource for as long as it is served -- 10,000 pods are 10,000 Addresses -- so it
keeps the bytes, and builds messages only transiently: the translator builds one, serializes it at
once and drops it; the xDS layer sends the bytes as they are.

`SerializedMessages` stores each message's deterministic serialization (`serialize`), the same bytes
the xDS layer versions and sends, so nothing is serialized twice. Reading an entry
(`messages[name]`, `.values()`, `.items()`) decodes a fresh message every time: treat it as a value --
mutating it changes nothing stored, and two reads never return the same object. Code that only needs
names, counts or the bytes uses `in`, `len`, iteration, `serialized(name)` or `blobs`, which decode
nothing.

Equality is the equality of the messages: deterministic serialization maps equal messages to equal
bytes, so two mappings of the same message type compare their bytes without decoding.

A mapping never changes once built. The incremental translator builds a new one per update from a
copied dict in which every unchanged entry is the very same `bytes` object as before, which is what
lets `controller.xds.resources.prepare` skip hashing unchanged resources.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def serialize(message: Message) -> bytes:
    """The deterministic serialization: equal messages give equal bytes (map entries sorted by key)."""
    return message.SerializeToString(deterministic=True)


class SerializedMessages(Mapping[str, M], Generic[M]):
    """Read-only name -> message mapping stored as deterministic serializations (see module docs)."""

    __slots__ = ("_blobs", "message_type")

    def __init__(self, message_type: type[M], blobs: Mapping[str, bytes] | None = None) -> None:
        """`blobs`: name -> `serialize(message)`. It is taken over, not copied: the caller must not
        modify it afterwards (the translator hands over a dict it built for this mapping alone)."""
        self.message_type = message_type
        self._blobs: Mapping[str, bytes] = blobs if blobs is not None else {}

    @classmethod
    def of(cls, message_type: type[M], messages: Mapping[str, M]) -> SerializedMessages[M]:
        """Serialize `messages` (each once). A mapping that already is SerializedMessages of the same
        message type is returned as is."""
        if isinstance(messages, SerializedMessages) and messages.message_type is message_type:
            return messages
        for name, message in messages.items():
            if not isinstance(message, message_type):
                raise TypeError(
                    f"resource {name!r} is of type {type(message).__name__}, expected {message_type.__name__}"
                )
        return cls(message_type, {name: serialize(message) for name, message in messages.items()})

    def __getitem__(self, name: str) -> M:
        return self.message_type.FromString(self._blobs[name])

    def __contains__(self, name: object) -> bool:
        return name in self._blobs

    def __iter__(self) -> Iterator[str]:
        return iter(self._blobs)

    def __len__(self) -> int:
        return len(self._blobs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SerializedMessages) and other.message_type is self.message_type:
            return self._blobs == other._blobs
        return super().__eq__(other)

    # Mutable-looking but value-compared: like dict, not hashable.
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SerializedMessages({self.message_type.__name__}, {len(self._blobs)} entries)"

    def serialized(self, name: str) -> bytes:
        """The stored bytes of one entry (KeyError if absent); the same object on every call."""
        return self._blobs[name]

    @property
    def blobs(self) -> Mapping[str, bytes]:
        """Every entry's bytes by name (a read-only view), without decoding anything."""
        return MappingProxyType(self._blobs)
