"""Markdown rendering of benchmark results and in-place update of sections of docs/benchmarks.md.

Called by ``bench.__main__``. Each section this harness owns sits between marker comments
(``<!-- bench:NAME:begin -->`` / ``<!-- bench:NAME:end -->``); ``write_sections`` replaces only
those, so sections other engineers append to the same file are left untouched. A missing file is
created with a title; a missing section is appended at the end.
"""

from __future__ import annotations

import pathlib
import platform
import re
import sys
from collections.abc import Sequence

from bench.sim import scenarios

TITLE = (
    "# Benchmarks\n\nEvery figure is a ratio measured side by side in one run; absolute numbers are "
    "context.\n"
)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(report: scenarios.Report) -> str:
    """One scenario as markdown: title, table, checks, notes."""
    parts = [f"### {report.title}", "", table(report.header, report.rows)]
    if report.checks:
        parts += [
            "",
            table(
                ("relation", "ratio", "within", "holds"),
                [(c.name, f"{c.ratio:.3f}", f"±{c.tolerance:.0%}", _verdict(c)) for c in report.checks],
            ),
        ]
    if report.notes:
        parts += [""] + [f"- {note}" for note in report.notes]
    return "\n".join(parts)


def _verdict(check: scenarios.Check) -> str:
    if check.ok:
        return "yes"
    return "NO" if check.gating else "no (finding)"


def environment() -> str:
    """Machine and versions, for the record."""
    import numpy
    import pydantic

    return (
        f"{platform.node() or 'unknown host'}, {platform.machine()}, {platform.processor() or 'cpu'}; "
        f"Python {sys.version.split()[0]}, pydantic {pydantic.VERSION}, numpy {numpy.__version__}"
    )


def write_sections(path: pathlib.Path, sections: dict[str, str]) -> None:
    """Replace (or append) each named section of ``path``; other content is kept as it is."""
    text = path.read_text() if path.exists() else TITLE
    for name, body in sections.items():
        begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
        block = f"{begin}\n{body.rstrip()}\n{end}"
        found = re.search(re.escape(begin) + r".*?" + re.escape(end), text, re.DOTALL)
        if found is not None:
            text = text[: found.start()] + block + text[found.end() :]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")
