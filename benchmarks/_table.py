"""Markdown tables for the benchmarks' output: one format that people read and ``run.py`` parses.

Every benchmark prints its results as GitHub-flavoured pipe tables, each preceded by a
``### title`` line; :func:`parse_tables` reads them back into rows for ``run.py``'s JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def format_cell(value: object) -> str:
    """A table cell: floats to 4 significant digits, integers with thousands separators."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(
    columns: Sequence[str], rows: Iterable[Sequence[object]], *, title: str | None = None
) -> str:
    """A pipe table (with an optional ``### title`` line above it)."""
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row has {len(row)} cells for {len(columns)} columns: {row!r}")
        lines.append("| " + " | ".join(format_cell(cell) for cell in row) + " |")
    return "\n".join(lines)


def print_table(
    columns: Sequence[str], rows: Iterable[Sequence[object]], *, title: str | None = None
) -> None:
    print(markdown_table(columns, rows, title=title) + "\n", flush=True)


def parse_tables(text: str) -> list[dict[str, Any]]:
    """Every pipe table in ``text``: ``{"title", "columns", "rows"}`` with rows as dicts of strings.

    The title is the nearest ``###`` heading above the table (``None`` without one).
    """
    tables: list[dict[str, Any]] = []
    title: str | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("### "):
            title = line[4:].strip()
        is_header = line.startswith("|") and i + 1 < len(lines)
        if is_header and set(lines[i + 1].strip()) <= set("|-: ") and "-" in lines[i + 1]:
            columns = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = _cells(lines[i].strip())
                rows.append(dict(zip(columns, cells, strict=False)))
                i += 1
            tables.append({"title": title, "columns": columns, "rows": rows})
            title = None
            continue
        i += 1
    return tables


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]
