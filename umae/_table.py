"""The one table formatter of the printed tables (`umae bench`'s, its loader and traffic tables, the
kernel audit's): rows of dicts, a list of columns. Imports nothing: any layer may use it.

    format_table(rows, [Col("op", "op", width=16, align="<"), Col("ms", "ms", ".3f", width=9)])

Text tables (the default): each cell is `format(value, f"{align}{width}{fmt}")`, cells joined by
one space (a column's `gap` sets the spaces before it), a header line, then a line of dashes as long
as the header. `markdown=True`: a GitHub table (`| a | b |`, `|---|---|`), cells unpadded.
`note(row)`: a row it returns a string for shows its first `note_after` cells, then that string
(a skipped or failed row's reason)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Col:
    """One column: its header, the cell's value (a row key, or a function of the row), the format
    spec of the value (e.g. ".3f", ".0%"; "" for str()), the width (default: the header's) and the
    alignment ("<" or ">"), and the spaces before it (text tables)."""
    head: str
    value: str | Callable[[dict], object]
    fmt: str = ""
    width: int | None = None
    align: str = ">"
    gap: int = 1

    def get(self, row: dict):
        return self.value(row) if callable(self.value) else row[self.value]

    def cell(self, value, markdown: bool = False, fmt: str | None = None) -> str:
        fmt = self.fmt if fmt is None else fmt
        if markdown:
            return format(value, fmt)
        return format(value, f"{self.align}{len(self.head) if self.width is None else self.width}{fmt}")


def format_table(rows: Sequence[dict], columns: Sequence[Col], *, markdown: bool = False,
                 note: Callable[[dict], str | None] | None = None, note_after: int = 0) -> str:
    """The table of `rows` (one line each) under `columns`' headers; see the module's docstring."""
    if markdown:
        lines = ["| " + " | ".join(c.head for c in columns) + " |", "|" + "---|" * len(columns)]
    else:
        head = _join([c.cell(c.head, fmt="") for c in columns], columns)
        lines = [head, "-" * len(head)]
    for r in rows:
        text = note(r) if note else None
        cols = columns[:note_after] if text is not None else columns
        cells = [c.cell(c.get(r), markdown) for c in cols]
        if text is not None:
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |" if markdown else _join(cells, list(cols) + [Col("", "")]))
    return "\n".join(lines)


def _join(cells: list[str], columns: Sequence[Col]) -> str:
    out = cells[0]
    for cell, c in zip(cells[1:], columns[1:]):
        out += " " * c.gap + cell
    return out
