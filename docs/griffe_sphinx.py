"""A Griffe extension for the API reference: the few Sphinx constructs in the docstrings, as Markdown.

The docstrings are Google style, with some reStructuredText inside (they are also read by ``help()`` and IDEs):
``.. math::`` blocks become display maths for arithmatex, ``:math:`x``` inline maths, the cross-reference roles
(``:class:`Optimizer```, ``:func:`...```) plain code, a literal block's ``::`` a colon (the indented block stays
code), and the aligned field lists of the state tuples (``count:   0-d int32, ...``) bullet lists.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc):`~?([^`]+)`")
INLINE_MATH = re.compile(r":math:`([^`]+)`")
FIELD = re.compile(r"^(\w+):\s{2,}(\S.*)$")  # "name:" then an aligned description, as in the NamedTuple states


def markdown_maths(text: str) -> str:
    """Every ``.. math::`` directive and its indented body as a ``$$`` block; the rest unchanged."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.strip() != ".. math::":
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        body, i = [], i + 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        depth = min(len(b) - len(b.lstrip()) for b in body if b.strip())
        pad = " " * indent
        out += [pad + "$$", *(pad + b[depth:] for b in body), pad + "$$", ""]
    return "\n".join(out)


def markdown_fields(text: str) -> str:
    """Runs of two or more aligned ``name:   description`` lines (with indented continuations) as a bullet list."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        run, j = [], i
        while j < len(lines) and FIELD.match(lines[j]):
            name, description = FIELD.match(lines[j]).groups()
            j += 1
            while j < len(lines) and lines[j].startswith(" ") and lines[j].strip():
                description += " " + lines[j].strip()
                j += 1
            run.append(f"- `{name}`: {description}")
        if len(run) >= 2:
            out += ([""] if out and out[-1].strip() else []) + run + [""]
            i = j
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out)


class SphinxToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = markdown_fields(markdown_maths(obj.docstring.value))
        text = re.sub(r"(?<=\S)::$", ":", text, flags=re.MULTILINE)
        text = INLINE_MATH.sub(lambda m: f"${m.group(1)}$", text)
        obj.docstring.value = ROLE.sub(lambda m: f"`{m.group(1)}`", text)
