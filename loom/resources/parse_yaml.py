"""Multi-document YAML to JSON-like values, safely and fast.

Theory of operation: libyaml (through PyYAML's `CParser`, or the pure-Python parser when the C
extension is missing) turns the text into a flat stream of events; `read_documents` builds the values
from those events with an explicit stack. We do not use PyYAML's composer and constructor because:

- the C composer recurses once per nesting level in C and crashes the whole process on a deeply
  nested document (`[[[[...` a few hundred thousand deep); one bad file must never take loom down;
- building from events is faster than the Python constructor, which dominates load time;
- we want Kubernetes' view of YAML, not PyYAML's: timestamps stay strings (the API server's YAML to
  JSON conversion keeps them as strings), duplicate keys are an error (kubectl rejects them too, and a
  silently dropped `action: DENY` would be a security bug), only the JSON-compatible core tags exist.

Scalars resolve with YAML 1.1's implicit rules (the rules kubectl's YAML library uses: `yes` is a
bool, `0755` an octal int). Merge keys (`<<: *anchor`) are supported; explicit keys win over merged
ones. Aliases share the anchored value (no copying), and a document whose aliases expand to far more
nodes than it holds ("billion laughs") is rejected, as is nesting deeper than `MAX_DEPTH`.

A syntax error stops the file at that point: the documents before it are returned together with the
error and its 1-based line and column.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

try:
    from yaml._yaml import CParser as _Parser
except ImportError:  # PyYAML built without libyaml: same events, just slower
    from yaml.parser import Parser as _PyParser
    from yaml.reader import Reader as _PyReader
    from yaml.scanner import Scanner as _PyScanner

    class _Parser(_PyReader, _PyScanner, _PyParser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            _PyReader.__init__(self, stream)
            _PyScanner.__init__(self)
            _PyParser.__init__(self)


__all__ = ["MAX_DEPTH", "YamlDocument", "YamlError", "YamlRead", "read_documents"]

# Kubernetes objects nest a few dozen levels at most (CRD schemas are the deepest); this bound keeps
# every later recursive walk (json.dumps of `raw`, deepcopy) far from Python's recursion limit.
MAX_DEPTH = 200
# Alias expansion limit: a document may expand to at most this many nodes, or this factor of its real
# size, whichever is larger (the same idea as the excessive-aliasing check of Kubernetes' YAML reader).
MAX_EXPANDED_NODES = 1_000_000
MAX_ALIAS_RATIO = 10

_TAG = "tag:yaml.org,2002:"
_STR = _TAG + "str"
_MAP = _TAG + "map"
_SEQ = _TAG + "seq"
_MERGE_TAG = _TAG + "merge"
_AS_STRING_TAGS = frozenset({_STR, _TAG + "timestamp", _TAG + "value", _TAG + "yaml", "!"})
_IMPLICIT = Resolver.yaml_implicit_resolvers
_SCALAR_KEY_TYPES = (str, int, float, bool, type(None))


class _Merge:
    """The `<<` merge key."""

    __slots__ = ()


_MERGE = _Merge()
_NO_KEY = object()


class YamlError(Exception):
    """A problem in the YAML text itself; `line` and `column` are 1-based (0 when unknown)."""

    def __init__(self, message: str, line: int = 0, column: int = 0) -> None:
        super().__init__(f"line {line} column {column}: {message}" if line else message)
        self.message = message
        self.line = line
        self.column = column


@dataclass(frozen=True, slots=True)
class YamlDocument:
    number: int  # 1-based, counting every document of the stream, empty ones too
    value: Any  # None for an empty document
    line: int  # 1-based line where the document starts


@dataclass(frozen=True, slots=True)
class YamlRead:
    documents: tuple[YamlDocument, ...]  # the documents before the first error, or all of them
    error: YamlError | None


# libyaml's wording of its most common error, in the words of PyYAML's (and most YAML tools') message.
_MESSAGES = {"mapping values are not allowed in this context": "mapping values are not allowed here"}

_constructor = SafeConstructor()
_CONSTRUCTORS = {
    _TAG + "int": _constructor.construct_yaml_int,
    _TAG + "float": _constructor.construct_yaml_float,
    _TAG + "bool": _constructor.construct_yaml_bool,
}


def _tagged_scalar(tag: str, value: str, mark: Any) -> Any:
    if tag in _AS_STRING_TAGS:
        return value
    if tag == _TAG + "null":
        return None
    if tag == _MERGE_TAG:
        return _MERGE
    construct = _CONSTRUCTORS.get(tag)
    if construct is None:
        raise _error(f"unsupported YAML tag {tag}", mark)
    try:
        return construct(ScalarNode(tag, value))
    except (ValueError, ConstructorError) as exc:
        raise _error(
            f"{_shorten(repr(value))} is not a valid {tag.removeprefix(_TAG)}: {exc}", mark
        ) from None


def _shorten(text: str) -> str:
    """Keep messages readable when the offending value is huge."""
    return text if len(text) <= 40 else text[:37] + "..."


def _error(message: str, mark: Any) -> YamlError:
    if mark is None:
        return YamlError(message)
    return YamlError(message, mark.line + 1, mark.column + 1)


def _apply_merges(container: dict[Any, Any], merges: list[tuple[Any, Any]]) -> None:
    """`<<` entries: explicit keys win; among merged mappings the first one listed wins."""
    merged: dict[Any, Any] = {}
    for value, mark in merges:
        sources = value if type(value) is list else [value]
        for source in sources:
            if type(source) is not dict:
                raise _error("a merge key (<<) needs a mapping or a list of mappings", mark)
            for k, v in source.items():
                merged.setdefault(k, v)
    explicit = dict(container)
    container.clear()
    container.update(merged)
    container.update(explicit)


class _Document:
    """Anchors and alias accounting of the document being built."""

    __slots__ = ("anchors", "expanded", "open_anchors", "sizes")

    def __init__(self) -> None:
        self.anchors: dict[str, Any] = {}
        self.sizes: dict[str, int] = {}  # expanded node count of each anchored value
        self.open_anchors: set[str] = set()  # anchored collections still being built
        self.expanded = 0  # nodes the aliases add when expanded

    def alias(self, anchor: str, real: int, mark: Any) -> Any:
        if anchor not in self.anchors:
            raise _error(f"found undefined alias *{anchor}", mark)
        if anchor in self.open_anchors:
            raise _error(f"recursive alias *{anchor}", mark)
        self.expanded += self.sizes[anchor]
        total = real + self.expanded
        if total > MAX_EXPANDED_NODES and total > MAX_ALIAS_RATIO * real:
            raise _error("aliases expand the document far beyond its size (a YAML bomb?)", mark)
        return self.anchors[anchor]


def _set_key(frame: list[Any], key: Any, mark: Any) -> None:
    if key is not _MERGE and not isinstance(key, _SCALAR_KEY_TYPES):
        raise _error("mapping keys must be scalars", mark)
    frame[1] = key
    frame[2] = mark


def _add_merge(frame: list[Any], value: Any) -> None:
    frame[1] = _NO_KEY
    if frame[4] is None:
        frame[4] = []
    frame[4].append((value, frame[2]))


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building. The builder allocates hundreds of thousands
    of containers that cannot form cycles (recursive aliases are rejected); letting the collector scan
    them again and again as they are created costs about a quarter of the load time and frees nothing."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def read_documents(text: str) -> YamlRead:
    """All documents of a YAML stream, stopping at the first syntax error."""
    documents: list[YamlDocument] = []
    try:
        with _collector_paused():
            _build(_Parser(text), documents)
    except YamlError as exc:
        return YamlRead(tuple(documents), exc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "invalid YAML"
        return YamlRead(tuple(documents), _error(_MESSAGES.get(message, message), mark))
    except yaml.YAMLError as exc:  # ReaderError: a character YAML does not allow, with no line
        return YamlRead(tuple(documents), YamlError(str(exc).replace("\n", " ")))
    except UnicodeError as exc:  # text that cannot be encoded (lone surrogates)
        return YamlRead(tuple(documents), YamlError(f"text is not valid Unicode: {exc}"))
    return YamlRead(tuple(documents), None)


def _build(parser: Any, documents: list[YamlDocument]) -> None:
    """The event loop. It is one flat function on purpose: it runs once per YAML node, and keeping
    the common case (a plain scalar into a mapping or list) free of calls halves load time."""
    get_event = parser.get_event
    implicit = _IMPLICIT
    number = 0
    start_line = 1
    doc = _Document()
    real = 0  # nodes in the document as written
    root: Any = None
    # One frame per open collection: [container, pending key, key mark, anchor, merges, size at start].
    stack: list[list[Any]] = []
    frame: list[Any] | None = None  # stack[-1]
    container: Any = None  # frame[0]
    while True:
        event = get_event()
        if event is None:
            return
        cls = type(event)
        if cls is ScalarEvent:
            real += 1
            tag = event.tag
            value = event.value
            if tag is None:
                if event.implicit[0]:
                    resolvers = implicit.get(value[:1])
                    if resolvers:
                        for resolved_tag, regexp in resolvers:
                            if regexp.match(value):
                                value = _tagged_scalar(resolved_tag, value, event.start_mark)
                                break
            else:
                value = _tagged_scalar(tag, value, event.start_mark)
            if event.anchor is not None:
                doc.anchors[event.anchor] = "<<" if value is _MERGE else value
                doc.sizes[event.anchor] = 1
                doc.open_anchors.discard(event.anchor)  # a re-used name now means this scalar
        elif cls is MappingStartEvent or cls is SequenceStartEvent:
            real += 1
            if cls is MappingStartEvent:
                if event.tag not in (None, _MAP, "!"):
                    raise _error(f"unsupported YAML tag {event.tag}", event.start_mark)
                value = {}
            else:
                if event.tag not in (None, _SEQ, "!"):
                    raise _error(f"unsupported YAML tag {event.tag}", event.start_mark)
                value = []
            if len(stack) >= MAX_DEPTH:
                raise _error(f"nesting deeper than {MAX_DEPTH} levels", event.start_mark)
            if event.anchor is not None:
                doc.anchors[event.anchor] = value
                doc.open_anchors.add(event.anchor)
        elif cls is MappingEndEvent or cls is SequenceEndEvent:
            if frame is None:  # the parser only ends collections it started; never trust that blindly
                raise _error("end of a collection that was never started", event.start_mark)
            stack.pop()
            if frame[4] is not None:
                _apply_merges(frame[0], frame[4])
            anchor = frame[3]
            if anchor is not None and doc.anchors.get(anchor) is frame[0]:  # not re-used inside
                doc.open_anchors.discard(anchor)
                doc.sizes[anchor] = real + doc.expanded - frame[5] + 1
            frame = stack[-1] if stack else None
            container = frame[0] if frame is not None else None
            continue
        elif cls is AliasEvent:
            value = doc.alias(event.anchor, real, event.start_mark)
        elif cls is DocumentStartEvent:
            number += 1
            start_line = event.start_mark.line + 1 if event.start_mark is not None else 1
            doc = _Document()
            real = 0
            root = None
            continue
        elif cls is DocumentEndEvent:
            documents.append(YamlDocument(number, root, start_line))
            continue
        else:  # StreamStart/StreamEnd
            continue

        # Attach `value` to the open collection (or make it the document's root). `<<` is a merge
        # only as a mapping key; anywhere else it is just the string.
        if value is _MERGE and (frame is None or type(container) is list or frame[1] is not _NO_KEY):
            value = "<<"
        if frame is None:
            root = value
        elif type(container) is list:
            container.append(value)
        else:
            key = frame[1]
            if key is _NO_KEY:
                if type(value) is str:
                    frame[1] = value
                    frame[2] = event.start_mark
                else:
                    _set_key(frame, value, event.start_mark)
            elif key is _MERGE:
                _add_merge(frame, value)
            else:
                if key in container:
                    raise _error(f"duplicate key {_shorten(repr(key))}", frame[2])
                container[key] = value
                frame[1] = _NO_KEY
        if cls is MappingStartEvent or cls is SequenceStartEvent:
            frame = [value, _NO_KEY, None, event.anchor, None, real + doc.expanded]
            stack.append(frame)
            container = value
