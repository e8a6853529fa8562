"""bench.rss_floor really measures: one fresh interpreter, a row per layer, and the table names them."""

from __future__ import annotations

from bench.rss_floor import LAYERS, measure, report


def test_each_layer_is_measured_in_one_interpreter_and_reported() -> None:
    rows = measure()
    assert len(rows) == len(LAYERS)
    for row in rows:
        assert row["VmRSS"] > 0
        # VmRSS is the sum of its anonymous, file-backed and shared-memory parts.
        assert row["RssAnon"] + row["RssFile"] <= row["VmRSS"]
    # Imports only add: the node proxy's modules sit on top of every library layer.
    assert rows[-1]["VmRSS"] > rows[0]["VmRSS"]
    table = report(rows)
    for label, _ in LAYERS:
        assert label in table
    assert "libraries alone (before loom's own modules)" in table
