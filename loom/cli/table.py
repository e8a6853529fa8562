"""Tables the way istioctl prints them (Go tabwriter): left-aligned columns, each as wide as its
longest cell, separated by `padding` spaces, upper-case headers, no borders. Plain text on purpose:
users pipe these into grep, awk and column, so nothing is truncated or decorated."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], padding: int = 1) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, the table has {len(headers)} columns")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for cells in [headers, *rows]:
        text = (" " * padding).join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        lines.append(text.rstrip())
    return "\n".join(lines)
