"""MkDocs hooks: the site serves every front-end file it uses, so that it works offline, opened from disk.

* MathJax (the maths) comes from the pinned npm package, not a CDN: ``javascripts/mathjax/tex-mml-chtml.js`` with
  its fonts and TeX extensions.
* The benchmark dashboard: ``asv publish`` renders the results the repository carries (``asv_bench/results``)
  into ``benchmarks-dashboard/``. asv's page loads jQuery, flot and Bootstrap from CDNs; each is served from the
  pinned npm package of the version the page names. It also reads its JSON with XMLHttpRequest, which a browser
  refuses for a page opened from disk, so the JSON files are embedded in ``asv-offline.js`` and handed to jQuery
  from memory.

The npm packages are pinned in ``docs/vendor/package-lock.json`` and installed with ``npm ci`` on first use into
``~/.cache/nero-core/docs-vendor/<hash of the lock file>`` (``$NERO_DOCS_VENDOR_CACHE`` to move it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "docs" / "vendor"
ASV_CONFIG = ROOT / "asv_bench" / "asv.conf.json"
DASHBOARD = "benchmarks-dashboard"
MATHJAX = ("tex-mml-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions")  # under mathjax/es5

# What asv's index.html loads from CDNs, and the file of the pinned npm package that stands in for each.
ASV_CDN = {
    "https://code.jquery.com/jquery-3.3.1.min.js": "jquery/dist/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js": "flot/jquery.flot.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js": "flot/jquery.flot.time.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js": "flot/jquery.flot.selection.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js":
        "flot/jquery.flot.categories.js",
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js":
        "flot-orderbars/js/jquery.flot.orderBars.js",
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js":
        "stupid-table-plugin/stupidtable.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": "blueimp-md5/js/md5.min.js",
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js": "bootstrap/dist/js/bootstrap.min.js",
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css": "bootstrap/dist/css/bootstrap.min.css",
}
ASV_VENDOR_EXTRA = ("bootstrap/dist/fonts",)  # bootstrap.min.css names its glyph fonts relative to itself
REMOTE_TAG = re.compile(r'<(script|link)\b[^>]*?(?:src|href)="(https?://[^"]+)"[^>]*>(?:</script>)?')
OFFLINE_SCRIPT = "asv-offline.js"

_built: list[Path] = []  # temporary directories of this build, removed after it


def node_modules() -> Path:
    """The pinned npm packages, installed once per lock file (``npm ci``) into a cache outside the repository."""
    lock = (VENDOR / "package-lock.json").read_bytes()
    cache = Path(os.environ.get("NERO_DOCS_VENDOR_CACHE", Path.home() / ".cache" / "nero-core" / "docs-vendor"))
    home = cache / hashlib.sha256(lock).hexdigest()[:16]
    done = home / "node_modules" / ".installed"
    if done.is_file():
        return done.parent
    npm = shutil.which("npm")
    if npm is None:
        raise PluginError("the docs serve MathJax and the dashboard's libraries from npm packages: install npm "
                          "(Node.js), then build again")
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lockfile:  # two builds at once (pytest -n 2) install once
        fcntl.flock(lockfile, fcntl.LOCK_EX)
        if not done.is_file():
            for name in ("package.json", "package-lock.json"):
                shutil.copyfile(VENDOR / name, home / name)
            command = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
            run = subprocess.run(command, cwd=home, capture_output=True, text=True, timeout=600)
            if run.returncode != 0:
                raise PluginError(f"npm ci in {home} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
            done.touch()
    return done.parent


def on_files(files: Any, config: Any) -> Any:
    modules = node_modules()
    es5 = modules / "mathjax" / "es5"
    for part in MATHJAX:
        for path in _walk(es5 / part):
            _add(files, config, "javascripts/mathjax/" + path.relative_to(es5).as_posix(), path)
    site = publish_dashboard(modules)
    for path in _walk(site):
        _add(files, config, f"{DASHBOARD}/{path.relative_to(site).as_posix()}", path)
    return files


def on_post_build(config: Any) -> None:
    while _built:
        shutil.rmtree(_built.pop(), ignore_errors=True)


def _walk(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _add(files: Any, config: Any, uri: str, path: Path) -> None:
    files.append(File.generated(config, uri, abs_src_path=str(path)))


def publish_dashboard(modules: Path) -> Path:
    """``asv publish`` of the committed results into a temporary directory, made to work offline; its path."""
    out = Path(tempfile.mkdtemp(prefix="nero-dashboard-"))
    _built.append(out)
    from asv.util import load_json  # asv comes with the docs extra

    conf = load_json(str(ASV_CONFIG), js_comments=True)
    conf.update(repo=str(ROOT), results_dir=str(ROOT / "asv_bench" / "results"), html_dir=str(out / "html"),
                benchmark_dir=str(ROOT / "asv_bench" / "benchmarks"), env_dir=str(out / "env"))
    (out / "asv.conf.json").write_text(json.dumps(conf))
    run = subprocess.run([sys.executable, "-m", "asv", "publish", "--config", str(out / "asv.conf.json")],
                         cwd=out, capture_output=True, text=True, timeout=600)
    site = out / "html"
    if run.returncode != 0 or not (site / "index.json").is_file():
        raise PluginError(f"asv publish failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    _serve_libraries_locally(site, modules)
    _embed_json(site)
    return site


def _serve_libraries_locally(site: Path, modules: Path) -> None:
    """Point asv's page at local copies of the libraries it loads from CDNs; fail on one this does not know."""
    index = site / "index.html"
    unknown = []

    def local(match: re.Match[str]) -> str:
        tag, url = match.group(1), match.group(2)
        if url not in ASV_CDN:
            unknown.append(url)
            return match.group(0)
        src = "vendor/" + ASV_CDN[url]
        if tag == "link":
            return f'<link rel="stylesheet" href="{src}">'
        script = f'<script src="{src}"></script>'
        # The data shim needs jQuery and must run before asv.js asks for its first file.
        return script + f'\n    <script src="{OFFLINE_SCRIPT}"></script>' if "jquery/" in src else script

    html = REMOTE_TAG.sub(local, index.read_text())
    if unknown:
        raise PluginError(f"asv's index.html loads {unknown} from the network: add each to ASV_CDN (docs/vendor "
                          "pins the npm packages)")
    index.write_text(html)
    for relative in [*ASV_CDN.values(), *ASV_VENDOR_EXTRA]:
        for path in _walk(modules / relative):
            target = site / "vendor" / path.relative_to(modules)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def _embed_json(site: Path) -> None:
    """``asv-offline.js``: every JSON file of the site, served to jQuery's ajax from memory (file:// has no XHR)."""
    data = {p.relative_to(site).as_posix(): p.read_text() for p in sorted(site.rglob("*.json"))}
    (site / OFFLINE_SCRIPT).write_text(
        "// Generated by docs/offline_hooks.py: asv's JSON files, so that the dashboard opens from disk.\n"
        "(function () {\n"
        f"  var files = {json.dumps(data)};\n"
        "  $.ajaxTransport('+*', function (options) {\n"
        "    var path = options.url.split('?')[0].split('/').map(decodeURIComponent).join('/');\n"
        "    if (!Object.prototype.hasOwnProperty.call(files, path)) { return undefined; }\n"
        "    return {\n"
        "      send: function (headers, complete) {\n"
        "        setTimeout(function () { complete(200, 'OK', {text: files[path]}); }, 0);\n"
        "      },\n"
        "      abort: function () {}\n"
        "    };\n"
        "  });\n"
        "})();\n"
    )
