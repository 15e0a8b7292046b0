"""The documentation: every Python block in docs/ runs, the site builds in strict mode, and it renders in a browser.

* Each page's ```python blocks run in order in one fresh namespace (later blocks build on earlier ones). A block
  runs unless the line before it is a marker: ``<!-- skip: reason -->`` never runs it, ``<!-- requires: module -->``
  runs it only where ``module`` imports (CuPy: a GPU). README.md is not run: its "Use" blocks are fragments
  (``params``, ``model`` come from the reader's code); the quickstarts here are their runnable versions.
* ``mkdocs build --strict`` must pass with no warning at all.
* Headless Chromium (Debian's ``chromium``; ``make test`` installs it), offline and from disk, opens the built
  index.html and must show every navigation title and the index page's first heading; a page's equations must be
  typeset by MathJax (served by the site); and the benchmark dashboard (asv's site, from the committed results)
  must draw a benchmark's graph with a point for every commit measured. ``NERO_DOCS_SKIP_BROWSER=1`` skips these.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("mkdocs")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<lang>[\w+-]*)[^\n]*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>skip|requires):\s*(?P<arg>.+?)\s*-->\s*$")
PYTHON = {"python", "py", "python3"}


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the first code line
    code: str
    skip: str | None  # why it is not run, or None
    requires: str | None  # a module it needs, or None


def python_blocks(path: Path) -> list[Block]:
    """Every fenced Python block of a Markdown file, with the marker on the line before its fence."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: unclosed code fence")
        if opening["lang"].lower() in PYTHON:
            marker = MARKER.match(lines[i - 1]) if i else None
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]]
            blocks.append(Block(
                line=i + 2,
                code="\n".join(body) + "\n",
                skip=marker["arg"] if marker and marker["kind"] == "skip" else None,
                requires=marker["arg"] if marker and marker["kind"] == "requires" else None,
            ))
        i = end + 1
    return blocks


def test_the_block_parser_reads_markers_and_indented_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n```python\nx = 1\n```\n\n<!-- skip: needs a GPU -->\n```python\nboom()\n```\n\n"
        "!!! note\n    <!-- requires: cupy -->\n    ```python\n    import cupy\n    ```\n\n```bash\nls\n```\n"
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.skip, b.requires) for b in blocks] == [
        (4, "x = 1\n", None, None),
        (9, "boom()\n", "needs a GPU", None),
        (15, "import cupy\n", None, "cupy"),
    ]


def test_every_page_is_in_the_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = set(nav_files(config["nav"]))
    assert {p.relative_to(DOCS).as_posix() for p in PAGES} == in_nav


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_code_runs(page):
    if not python_blocks(page):
        pytest.skip("no Python blocks on this page")
    # A fresh process per page: nothing a page sets (seeds, thread counts, imports) reaches another page or test.
    # One OpenMP thread: on a shared 2-core machine more threads only contend (and inflate CPU time tenfold).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, str(page)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{page.relative_to(ROOT)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-8000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not report["ran"]:
        pytest.skip("every block is marked: " + "; ".join(report["not_run"]))
    missing = [n for n in report["not_run"] if "not installed" in n]
    if missing:
        pytest.skip(f"{report['ran']} blocks ran and passed; not run: " + "; ".join(missing))


def run_page(page: Path) -> dict:
    """Run a page's blocks in order in one namespace, from the repository root; say which were not run."""
    namespace = {"__name__": "__docs__"}
    not_run, ran = [], 0
    for block in python_blocks(page):
        where = f"{page.relative_to(ROOT)}:{block.line}"
        if block.skip:
            not_run.append(f"{where} ({block.skip})")
            continue
        if block.requires and not importable(block.requires):
            not_run.append(f"{where} (needs {block.requires}, which is not installed)")
            continue
        # Padded so that a traceback names the Markdown file's own line numbers.
        exec(compile("\n" * (block.line - 1) + block.code, str(page), "exec"), namespace)
        ran += 1
    return {"ran": ran, "not_run": not_run}


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def nav_files(nav) -> list[str]:
    out = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        out += nav_files(value) if isinstance(value, list) else [value]
    return out


def nav_titles(nav) -> list[str]:
    out = []
    for entry in nav:
        if isinstance(entry, dict):
            title, value = next(iter(entry.items()))
            out.append(title)
            if isinstance(value, list):
                out += nav_titles(value)
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # Not --quiet: mkdocs then stops counting warnings, and --strict passes whatever they say.
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml")]
    done = subprocess.run(command + ["-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert "WARNING" not in log and "ERROR" not in log, log
    return out


def test_site_builds_strictly_with_every_page(site):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for page in nav_files(config["nav"]):
        assert (site / page).with_suffix(".html").is_file(), page


def test_study_figures_and_tables_come_from_the_committed_results(site):
    results = ROOT / "examples" / "results"
    for figure in results.rglob("*.png"):
        served = site / "results" / figure.relative_to(results)
        assert served.read_bytes() == figure.read_bytes(), figure
    studies = unescape((site / "studies.html").read_text())
    compare = json.loads((results / "compare" / "compare.json").read_text())
    for row in compare["table"]:
        assert f"<td>{row['test accuracy (%)']}</td>" in studies, row
    for line in (results / "table1" / "table1.md").read_text().splitlines():
        if line.startswith("| ") and "task" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert "<td>" + "</td>\n<td>".join(cells) + "</td>" in studies, line
    assert 'src="results/table1/mlp_mnist_lr.png"' in studies


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_or_skip() -> str:
    if os.environ.get("NERO_DOCS_SKIP_BROWSER") == "1":
        pytest.skip("NERO_DOCS_SKIP_BROWSER=1")
    browser = chromium()
    assert browser, "chromium is not installed: `make test` installs it (apt-get install chromium)"
    return browser


def chromium_flags(profile: Path) -> list[str]:
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # offline on purpose: the page must not need the network
        f"--user-data-dir={profile}",
    ]


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: the browser
    reads commands from fd 3 and writes replies to fd 4, each a JSON message ended by a NUL byte)."""

    def __init__(self, browser: str, profile: Path) -> None:
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()

        def onto_3_and_4() -> None:
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(
            [browser, *chromium_flags(profile), "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=onto_3_and_4, pass_fds=(3, 4),
        )
        os.close(to_browser)
        os.close(from_browser)
        self._next, self._buffer, self._session = 0, b"", None

    def call(self, method: str, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if self._session:
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._replies, 1 << 16)
                assert chunk, "chromium closed the DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def wait_for(self, expression: str, timeout: float = 60.0):
        """The value of the JavaScript ``expression`` once it is truthy (None after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")
            if value:
                return value
            time.sleep(0.25)
        return None

    def close(self) -> None:
        self._session = None
        try:
            self.call("Browser.close")
        except (AssertionError, OSError):
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._commands)
        os.close(self._replies)


@pytest.fixture
def devtools(tmp_path):
    browser = DevTools(browser_or_skip(), tmp_path / "profile")
    yield browser
    browser.close()


class RenderedPage(HTMLParser):
    """The parts of a rendered Material page the browser check reads: the text of the primary navigation, the
    first ``<h1>`` (without its permalink), and the ``<html>`` element's classes."""

    def __init__(self) -> None:
        super().__init__()
        self.nav, self.h1, self.html_classes = [], None, ""
        self._nav_depth, self._h1, self._skip = 0, None, 0

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if tag == "html":
            self.html_classes = " ".join(classes)
        if tag == "nav" and (self._nav_depth or "md-nav--primary" in classes):
            self._nav_depth += 1
        if tag == "h1" and self.h1 is None and self._h1 is None:
            self._h1 = []
        if tag == "a" and "headerlink" in classes:
            self._skip += 1

    def handle_endtag(self, tag):
        if tag == "nav" and self._nav_depth:
            self._nav_depth -= 1
        if tag == "h1" and self._h1 is not None and self.h1 is None:
            self.h1, self._h1 = "".join(self._h1).strip(), None
        if tag == "a" and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if self._nav_depth:
            self.nav.append(data.strip())
        if self._h1 is not None and not self._skip:
            self._h1.append(data)


def test_index_renders_navigation_and_first_page_in_chromium(site, tmp_path):
    command = [
        browser_or_skip(), *chromium_flags(tmp_path / "profile"), "--virtual-time-budget=5000",
        "--dump-dom", (site / "index.html").as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "</html>" in done.stdout, done.stderr[-2000:]
    page = RenderedPage()
    page.feed(done.stdout)
    # Material's script bundle ran: it marks the document (its focus-visible polyfill) once it has loaded.
    assert "js-focus-visible" in page.html_classes.split(), page.html_classes
    nav = [text for text in page.nav if text]
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for title in nav_titles(config["nav"]):
        assert title in nav, f"the rendered navigation lacks {title!r}: {nav}"
    heading = next(ln[2:].strip() for ln in (DOCS / "index.md").read_text().splitlines() if ln.startswith("# "))
    assert page.h1 == heading


def test_equations_render_offline(site, devtools):
    """MathJax comes with the site: opened from disk with no network, the maths is typeset, not left as LaTeX."""
    devtools.open((site / "algorithms" / "nero.html").as_uri())
    typeset = devtools.wait_for("document.querySelectorAll('.arithmatex mjx-container').length")
    assert typeset, "no equation on algorithms/nero.html was typeset by MathJax"
    raw = devtools.wait_for("[...document.querySelectorAll('.arithmatex')].filter(e => !e.querySelector("
                            "'mjx-container')).map(e => e.textContent).join(' | ') || 'none'")
    assert raw == "none", f"equations left as LaTeX source: {raw[:300]}"


# One series of the dashboard, and how many commits the committed results measured it at.
DASHBOARD_BENCHMARK = "bench_step.TorchCPURatio.track_x_adam"
DASHBOARD_PARAMS = {"shapes": "mlp", "optimizer": "nero"}


def measured_commits(benchmark: str, params: dict[str, str]) -> list[int]:
    """For each machine and environment of the committed asv results (a series of the dashboard's graph), how many
    commits have a value for ``benchmark`` at ``params`` (given in the benchmark's parameter order)."""
    wanted = tuple(repr(v) for v in params.values())  # asv stores parameter values as their repr
    commits: dict[tuple[str, str], set[str]] = {}
    for path in (ROOT / "asv_bench" / "results").glob("*/*.json"):
        record = json.loads(path.read_text())
        if path.name == "machine.json" or benchmark not in record.get("results", {}):
            continue
        result = dict(zip(record["result_columns"], record["results"][benchmark]))
        for combo, value in zip(itertools.product(*result["params"]), result["result"]):
            if combo == wanted and value is not None and math.isfinite(value):
                commits.setdefault((path.parent.name, record["env_name"]), set()).add(record["commit_hash"])
    return sorted(len(c) for c in commits.values())


def test_benchmark_dashboard_draws_its_points_offline(site, devtools):
    """The Benchmarks page links the dashboard; opened from disk, a benchmark's graph has a point per commit."""
    benchmarks_page = (site / "benchmarks.html").read_text()
    assert 'href="benchmarks-dashboard/index.html' in benchmarks_page
    expected = measured_commits(DASHBOARD_BENCHMARK, DASHBOARD_PARAMS)
    assert expected and max(expected) >= 2, "the committed results should hold a history (asv_bench/history.py)"
    selection = "&".join(f"p-{k}='{v}'" for k, v in DASHBOARD_PARAMS.items())
    devtools.open((site / "benchmarks-dashboard" / "index.html").as_uri() + f"#{DASHBOARD_BENCHMARK}?{selection}")
    points = devtools.wait_for(
        "(() => { const plot = window.jQuery && jQuery('#main-graph').data('plot'); if (!plot) return null;"
        " const series = plot.getData().map(s => s.data.filter(p => p[1] !== null).length);"
        " return series.length ? series : null; })()"
    )
    assert sorted(points) == expected, f"the graph's series have {points} points; the results measured {expected}"
    drawn = devtools.wait_for("jQuery('#main-graph canvas.flot-base')[0].toDataURL().length")
    blank = devtools.wait_for("(() => { const c = document.createElement('canvas');"
                              " const f = jQuery('#main-graph canvas.flot-base')[0];"
                              " c.width = f.width; c.height = f.height; return c.toDataURL().length; })()")
    assert drawn > blank, "the graph's canvas is blank"


if __name__ == "__main__":  # the subprocess of test_page_code_runs: python tests/test_docs.py docs/<page>.md
    result = run_page(Path(sys.argv[1]).resolve())
    print("\n" + json.dumps(result))
