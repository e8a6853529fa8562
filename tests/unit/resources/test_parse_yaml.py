"""The YAML reader: Kubernetes' view of YAML, document numbering, and hostile input."""

from __future__ import annotations

import gc
import importlib.util
import sys

import pytest
import yaml

from loom.resources import parse_yaml
from loom.resources.parse_yaml import MAX_DEPTH, YamlError, read_documents


def values(text: str) -> list[object]:
    read = read_documents(text)
    assert read.error is None, read.error
    return [d.value for d in read.documents]


def error(text: str) -> str:
    read = read_documents(text)
    assert read.error is not None
    return str(read.error)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: yes\nb: off\nc: 'yes'\n", {"a": True, "b": False, "c": "yes"}),
        ("a: 0755\nb: 0x1F\nc: 1_000\nd: -7\ne: '7'\n", {"a": 493, "b": 31, "c": 1000, "d": -7, "e": "7"}),
        ("a: 1.5\nb: .inf\nc: 1e3\nd: 1.0e+3\n", {"a": 1.5, "b": float("inf"), "c": "1e3", "d": 1000.0}),
        ("a: ~\nb: null\nc:\nd: ''\n", {"a": None, "b": None, "c": None, "d": ""}),
        # Timestamps stay strings, as in the Kubernetes API's YAML to JSON conversion.
        ("t: 2026-01-01T00:00:00Z\nd: 2026-01-01\n", {"t": "2026-01-01T00:00:00Z", "d": "2026-01-01"}),
        ("a: !!str 5\nb: !!int '6'\nc: !!float 1\nd: ! 7\n", {"a": "5", "b": 6, "c": 1.0, "d": "7"}),
        ("8080: {mode: STRICT}\n", {8080: {"mode": "STRICT"}}),
        (
            "a: |\n  line 1\n  line 2\nb: >\n  folded\n  text\n",
            {"a": "line 1\nline 2\n", "b": "folded text\n"},
        ),
    ],
    ids=["bools", "ints", "floats", "nulls", "timestamps", "explicit tags", "int keys", "block scalars"],
)
def test_scalars_resolve_like_kubectl(text: str, expected: dict[object, object]) -> None:
    assert values(text) == [expected]


def test_matches_pyyaml_for_ordinary_documents() -> None:
    text = """apiVersion: v1
kind: Pod
metadata: {name: p, labels: {a: "1", b: 'x'}}
spec:
  containers:
  - name: c
    args: [--port, "8080", -v]
    ports: [{containerPort: 8080}]
---
- [1, 2, [3, {x: y}]]
- {}
- []
"""
    assert values(text) == list(yaml.safe_load_all(text))


def test_document_numbers_and_lines() -> None:
    read = read_documents("# header\n---\na: 1\n---\n---\nb: 2\n...\n---\nc: 3\n")
    assert [(d.number, d.value, d.line) for d in read.documents] == [
        (1, {"a": 1}, 2),
        (2, None, 4),
        (3, {"b": 2}, 5),
        (4, {"c": 3}, 8),
    ]
    assert read_documents("").documents == ()
    assert [d.number for d in read_documents("a: 1\n").documents] == [1]


def test_merge_key_outside_key_position_is_a_string() -> None:
    assert values("a: <<\nb: [<<, x]\nc: &m <<\nd: *m\n") == [
        {"a": "<<", "b": ["<<", "x"], "c": "<<", "d": "<<"}
    ]
    assert values("<<\n") == ["<<"]


def test_reused_anchor_names_refer_to_the_latest_definition() -> None:
    (doc,) = values("a: &x\n  b: &x 1\n  c: *x\nd: *x\n")
    assert doc == {"a": {"b": 1, "c": 1}, "d": 1}  # an alias means the latest anchor of its name


def test_anchors_aliases_and_merge_keys() -> None:
    text = """base: &base {app: web, tier: front}
copy: *base
merged:
  <<: *base
  tier: back
many:
  <<: [{a: 1, b: 1}, {b: 2, c: 2}]
  c: 3
"""
    (doc,) = values(text)
    assert isinstance(doc, dict)
    assert doc["copy"] is doc["base"]  # aliases share, they do not copy
    assert doc["merged"] == {"app": "web", "tier": "back"}
    assert doc["many"] == {"a": 1, "b": 1, "c": 3}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("action: ALLOW\naction: DENY\n", "line 2 column 1: duplicate key 'action'"),
        ("a:\n  b: 1\n  c: 2\n  b: 3\n", "line 4 column 3: duplicate key 'b'"),
        ("a: b: c\n", "line 1 column 5: mapping values are not allowed here"),
        ("a: [1, 2\n", "line 2 column 1: did not find expected ',' or ']'"),
        ("a: *missing\n", "line 1 column 4: found undefined alias *missing"),
        ("a: &x [1, *x]\n", "line 1 column 11: recursive alias *x"),
        ("a: &x 1\n---\nb: *x\n", "line 3 column 4: found undefined alias *x"),
        ("a: !Ref thing\n", "line 1 column 4: unsupported YAML tag !Ref"),
        ("a: !!binary aGVsbG8=\n", "line 1 column 4: unsupported YAML tag tag:yaml.org,2002:binary"),
        ("a: !!set {x}\n", "line 1 column 4: unsupported YAML tag tag:yaml.org,2002:set"),
        (
            "a: !!int abc\n",
            "line 1 column 4: 'abc' is not a valid int: invalid literal for int() with base 10: 'abc'",
        ),
        ("? [a, b]\n: c\n", "line 1 column 3: mapping keys must be scalars"),
        ("a:\n  <<: 5\n", "line 2 column 3: a merge key (<<) needs a mapping or a list of mappings"),
    ],
    ids=[
        "duplicate key",
        "nested duplicate key",
        "mapping in a plain scalar",
        "unterminated flow",
        "undefined alias",
        "recursive alias",
        "anchors end with their document",
        "local tag",
        "binary",
        "set",
        "bad explicit int",
        "complex key",
        "bad merge",
    ],
)
def test_errors_name_line_and_column(text: str, message: str) -> None:
    assert error(text) == message


def test_documents_before_an_error_are_kept() -> None:
    read = read_documents("a: 1\n---\nb: 2\n---\nc: [\n")
    assert [d.value for d in read.documents] == [{"a": 1}, {"b": 2}]
    assert read.error is not None and read.error.line == 6


def test_control_characters_and_bad_unicode() -> None:
    assert "unacceptable character" in error("a: b\x07\n")
    assert "not valid Unicode" in error("a: \ud800\n")


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    # libyaml's own composer recurses in C and takes the process down on input like this.
    depth = 200_000
    assert (
        error("[" * depth + "]" * depth)
        == f"line 1 column {MAX_DEPTH + 1}: nesting deeper than {MAX_DEPTH} levels"
    )
    assert values("[" * 50 + "]" * 50) != []


def test_billion_laughs_is_rejected() -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(8):
        this, prev = chr(ord("b") + level), chr(ord("a") + level)
        lines.append(f"{this}: &{this} [" + ", ".join([f"*{prev}"] * 9) + "]")
    message = error("\n".join(lines) + "\n")
    assert message.endswith("aliases expand the document far beyond its size (a YAML bomb?)")
    # Moderate reuse of anchors is ordinary YAML and stays accepted.
    assert values("x: &x {a: 1}\n" + "".join(f"y{i}: *x\n" for i in range(1000)))


def test_yaml_error_renders_without_position_when_unknown() -> None:
    assert str(YamlError("boom")) == "boom"
    assert str(YamlError("boom", 3, 4)) == "line 3 column 4: boom"


def test_pure_python_parser_fallback_reads_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libyaml's C extension the reader falls back to PyYAML's Python parser."""
    monkeypatch.setitem(sys.modules, "yaml._yaml", None)
    spec = importlib.util.spec_from_file_location("parse_yaml_without_libyaml", parse_yaml.__file__)
    assert spec is not None and spec.loader is not None
    fallback = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fallback)  # dataclasses look their module up there
    spec.loader.exec_module(fallback)
    assert vars(fallback)["_Parser"] is not vars(parse_yaml)["_Parser"]
    text = "a: &x {b: [1, yes, ~, 2026-01-01]}\nc: *x\n---\nd:\n  <<: {e: 1}\n  f: 2\n"
    slow = [(d.number, d.value, d.line) for d in fallback.read_documents(text).documents]
    assert slow == [(d.number, d.value, d.line) for d in read_documents(text).documents]
    assert len(slow) == 2
    bad = fallback.read_documents("a: 1\na: 2\n")
    assert bad.error is not None and str(bad.error) == "line 2 column 1: duplicate key 'a'"


def test_garbage_collector_state_is_restored() -> None:
    assert gc.isenabled()
    read_documents("a: 1\n")
    read_documents("a: [\n")  # an error inside the paused section
    assert gc.isenabled()
    gc.disable()
    try:
        read_documents("a: 1\n")
        assert not gc.isenabled()
    finally:
        gc.enable()
