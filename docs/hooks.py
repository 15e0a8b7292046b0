"""MkDocs hooks: the docs show the committed study results themselves, so they cannot drift from them.

* ``on_files``: every figure under ``examples/results/`` is served at ``results/<study>/<name>.png`` (nothing is
  copied into ``docs/``).
* ``on_page_markdown``: a line ``<!-- results: examples/results/<study>/<file> -->`` becomes that record's table:
  a Markdown file as it is, a JSON record's ``table`` (rows of formatted values, or Markdown text) or ``rows``.
  A marker naming a missing file or an unknown record fails the build.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "examples" / "results"
MARKER = re.compile(r"^<!-- results: (\S+) -->[ \t]*$", re.MULTILINE)


def on_files(files: Any, config: Any) -> Any:
    for figure in sorted(RESULTS.rglob("*.png")):
        uri = "results/" + figure.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(figure)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return MARKER.sub(lambda match: results_table(match.group(1), page.file.src_uri), markdown)


def results_table(relative: str, where: str) -> str:
    path = ROOT / relative
    if not path.is_file():
        raise PluginError(f"{where}: results marker names {relative}, which does not exist")
    if path.suffix == ".md":
        return path.read_text().strip()
    record = json.loads(path.read_text())
    table = record.get("table", record.get("rows"))
    if isinstance(table, str):
        return table.strip()
    if isinstance(table, list) and table and all(isinstance(row, dict) for row in table):
        return markdown_table(table)
    raise PluginError(f"{where}: {relative} has no 'table' or 'rows' to show")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
