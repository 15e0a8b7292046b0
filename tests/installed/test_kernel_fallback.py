"""The installed package's CPU kernels: every way one can be unavailable falls back to the framework's own kernels
with one warning naming the cause and the fix (and the same maths), the cache's location and key, and concurrent
first use. Torch's kernel has a step between: where it cannot be built, the wheel's prebuilt one (``setup.py``) runs,
without a word; the causes below are tested both with it (it runs) and without it (as in a wheel built without a
compiler, or on a CPU without AVX2: the torch kernels, with the warning).

These run against the installed wheel: ``make wheel-check`` runs them with the fresh virtual environment's Python
(``NERO_TEST_INSTALLED=1``), from a directory outside the checkout; elsewhere they skip. Each case runs three steps
of ``nero_torch.Nero(fused=True)`` and of ``nero_optax.nero()`` against the core rule (``kernel_steps.py``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("NERO_TEST_INSTALLED") != "1",
                                reason="runs against the installed wheel: make wheel-check")
pytest.importorskip("torch")
pytest.importorskip("optax")

import jax  # noqa: E402
import kernel_steps  # noqa: E402
import torch  # noqa: E402

import nero_core  # noqa: E402
from nero_core._kernels import _seal  # noqa: E402
from nero_optax import _native as optax_native  # noqa: E402
from nero_torch import _native as torch_native  # noqa: E402

FRAMEWORKS = ["torch", "jax"]
NATIVE = {"torch": torch_native, "jax": optax_native}
COMPILER_VARIABLE = {"torch": "CC", "jax": "CXX"}
SCRIPT = Path(kernel_steps.__file__)


def forget_kernels() -> None:
    """As in a new process: no kernel loaded or registered yet."""
    torch_native.library.cache_clear()
    torch_native.built.cache_clear()
    optax_native._registered.cache_clear()


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """An empty kernel cache, no kernel loaded yet, and no prebuilt torch kernel (see :func:`with_prebuilt`)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("NERO_KERNEL_CACHE", str(path))
    monkeypatch.setattr(torch_native, "prebuilt", lambda: None)
    forget_kernels()
    yield path
    forget_kernels()


@pytest.fixture
def with_prebuilt(cache, monkeypatch):
    """The cache fixture's empty cache, with the wheel's prebuilt torch kernel, which the wheel must carry on
    x86-64 Linux where the CPU has AVX2."""
    monkeypatch.undo()  # (the cache variable, set again below, and the prebuilt kernel, back)
    monkeypatch.setenv("NERO_KERNEL_CACHE", str(cache))
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        pytest.skip("the wheel carries a prebuilt kernel on x86-64 Linux only")
    assert torch_native.PREBUILT is not None, "the wheel carries no prebuilt kernel"
    if torch.backends.cpu.get_cpu_capability() not in torch_native.PREBUILT_CPUS:
        pytest.skip("this CPU has no AVX2: the prebuilt kernel is not for it")
    assert torch_native.prebuilt() is not None
    return cache


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Each framework's kernel, built once into a cache of its own: ``{framework: library path}``."""
    path = tmp_path_factory.mktemp("built")
    old = os.environ.get("NERO_KERNEL_CACHE")
    os.environ["NERO_KERNEL_CACHE"] = str(path)
    forget_kernels()
    try:
        for framework in FRAMEWORKS:
            if not kernel_steps.RUNS[framework]()["kernel_ran"]:
                pytest.skip(f"{framework}'s kernel cannot be built here")
    finally:
        os.environ.pop("NERO_KERNEL_CACHE") if old is None else os.environ.update(NERO_KERNEL_CACHE=old)
        forget_kernels()
    return {framework: library_in(path, framework) for framework in FRAMEWORKS}


def library_in(cache: Path, framework: str) -> Path:
    [path] = cache.glob(f"{'nero_torch' if framework == 'torch' else 'nero_optax'}_native-*.so")
    return path


def run(framework: str) -> dict[str, Any]:
    return kernel_steps.RUNS[framework]()


def ours(result: dict[str, Any]) -> list[str]:
    """The RuntimeWarnings (torch.compile's first use gives DeprecationWarnings of its own)."""
    return [w for w in result["warnings"] if w.startswith("RuntimeWarning")]


def assert_kernel_ran(result: dict[str, Any]) -> None:
    assert result["kernel_ran"] and not ours(result), result
    assert result["deviation"] <= kernel_steps.TOLERANCE[result["framework"]], result


def assert_fell_back(result: dict[str, Any], *phrases: str) -> None:
    """The framework's own kernels ran, gave the core rule's numbers, and one warning said each of ``phrases``."""
    assert not result["kernel_ran"], result
    assert result["deviation"] <= kernel_steps.TOLERANCE[result["framework"]], result
    [warning] = ours(result)
    for phrase in phrases:
        assert phrase in warning, warning


def compiler() -> str:
    found = shutil.which("cc") or shutil.which("gcc")
    if found is None:
        pytest.skip("needs a C compiler")
    return found


def test_the_package_under_test_is_the_installed_one():
    sites = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    for path in (nero_core.__file__, torch_native.__file__, optax_native.__file__, torch_native.PREBUILT):
        if path is not None:
            assert any(Path(path).resolve().is_relative_to(site) for site in sites), path


# ---- the causes, one by one -----------------------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("source", ["missing", "a directory"])
def test_an_unreadable_source_falls_back(framework, source, cache, monkeypatch, tmp_path):
    path = tmp_path / NATIVE[framework].SOURCE.name
    if source == "a directory":  # unreadable even by root, unlike a file without read permission
        path.mkdir()
    monkeypatch.setattr(NATIVE[framework], "SOURCE", path)
    assert_fell_back(run(framework), "cannot read its source", str(path), "Reinstall nero-core")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_cache_that_cannot_be_created_falls_back(framework, cache, monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("NERO_KERNEL_CACHE", str(tmp_path / "a-file" / "kernels"))
    assert_fell_back(run(framework), "kernel cache", "is not writable", "Set NERO_KERNEL_CACHE to a writable")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_compiler_that_does_not_run_falls_back(framework, cache, monkeypatch, tmp_path):
    monkeypatch.setenv(COMPILER_VARIABLE[framework], str(tmp_path / "no-such-compiler"))
    assert_fell_back(run(framework), "no-such-compiler' does not run", f"Set {COMPILER_VARIABLE[framework]} to a")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_compiler_that_fails_falls_back(framework, cache, monkeypatch, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "fakecc 1.0"; exit 0; }\n'
                    'echo "fakecc: error: builds nothing" >&2; exit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv(COMPILER_VARIABLE[framework], str(fake))
    assert_fell_back(run(framework), "could not build the CPU kernel", "fakecc: error: builds nothing",
                     f"Set {COMPILER_VARIABLE[framework]} to a GCC or Clang")


def assert_prebuilt_ran(result: dict[str, Any]) -> None:
    assert result["prebuilt"] and not ours(result), result
    assert_kernel_ran(result)


@pytest.mark.parametrize("cause", ["no source", "no compiler", "a failing compiler", "no cache"])
def test_where_the_kernel_cannot_be_built_the_prebuilt_one_runs_without_a_word(cause, with_prebuilt, monkeypatch,
                                                                              tmp_path):
    if cause == "no source":
        monkeypatch.setattr(torch_native, "SOURCE", tmp_path / "missing.c")
    elif cause == "no compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    elif cause == "a failing compiler":
        fake = tmp_path / "fakecc"
        fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "fakecc 1.0"; exit 0; }\nexit 1\n')
        fake.chmod(0o755)
        monkeypatch.setenv("CC", str(fake))
    else:
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("NERO_KERNEL_CACHE", str(tmp_path / "a-file" / "kernels"))
    assert_prebuilt_ran(run("torch"))


def test_where_the_kernel_builds_it_is_built_not_the_prebuilt_one(with_prebuilt):
    result = run("torch")
    assert_kernel_ran(result)
    assert not result["prebuilt"], result
    library_in(with_prebuilt, "torch")


def test_jaxlib_without_its_headers_falls_back(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(jax.ffi, "include_dir", lambda: str(tmp_path / "include"))
    assert_fell_back(run("jax"), "XLA FFI headers are not in", "Reinstall jaxlib")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_truncated_library_in_the_cache_is_rebuilt(framework, built, cache):
    """A truncated library can load and then crash when called: its checksum tells, and it is built again."""
    # A copy under the same name in another cache: a new file (dlopen reuses an already loaded one by identity).
    path = cache / built[framework].name
    cache.mkdir()
    path.write_bytes(built[framework].read_bytes()[:4096])
    assert_kernel_ran(run(framework))
    assert path.stat().st_size == built[framework].stat().st_size


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_library_whose_runtime_library_is_gone_falls_back(framework, built, cache, tmp_path):
    """As when libgomp is uninstalled after the kernel was built: the library names one that is not there."""
    cc = compiler()
    (tmp_path / "gone.c").write_text("int nero_gone(void) { return 0; }\n")
    (tmp_path / "stub.c").write_text("int nero_gone(void);\nint nero_stub(void) { return nero_gone(); }\n")
    subprocess.run([cc, "-shared", "-fPIC", str(tmp_path / "gone.c"), "-o", str(tmp_path / "libnero_gone.so")],
                   check=True)
    cache.mkdir()
    path = cache / built[framework].name
    subprocess.run([cc, "-shared", "-fPIC", str(tmp_path / "stub.c"), "-o", str(path), f"-L{tmp_path}",
                    "-lnero_gone"], check=True)
    _seal(path)  # as a build leaves it: the library is whole, but needs one that is gone
    (tmp_path / "libnero_gone.so").unlink()
    assert_fell_back(run(framework), f"could not load the CPU kernel {path}", "libnero_gone.so",
                     "install the runtime library")


# ---- in other processes: no compiler, a read-only cache, concurrent first use ---------------------------------


def run_processes(count: int, env: dict[str, str], cwd: Path, prefix: list[str] = (),
                  frameworks: list[str] = FRAMEWORKS) -> list[list[dict[str, Any]]]:
    """``count`` processes at once, each running kernel_steps.py for ``frameworks``: their results."""
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    procs = [subprocess.Popen([*prefix, sys.executable, str(SCRIPT), *frameworks], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(count)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append([json.loads(line) for line in out.splitlines()])
    return results


@pytest.mark.parametrize("variables", ["PATH", "PATH, CC and CXX"])
def test_without_any_compiler_each_framework_falls_back_with_one_warning(variables, tmp_path):
    """No C or C++ compiler on PATH (and CC, CXX naming none), as in a container without build tools: torch runs
    the wheel's prebuilt kernel, without a word (where the wheel has none, or the CPU no AVX2: its eager kernels,
    with one warning, since torch.compile needs a C++ compiler on CPU too); JAX runs XLA's reductions."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty), NERO_KERNEL_CACHE=str(tmp_path / "cache"))
    if variables == "PATH":
        env.pop("CC", None), env.pop("CXX", None)
    else:
        env.update(CC=str(empty / "cc"), CXX=str(empty / "c++"))
    [(torch_result, jax_result)] = run_processes(1, env, tmp_path)
    if torch_native.prebuilt() is not None:
        assert_prebuilt_ran(torch_result)
    else:
        assert_fell_back(torch_result, "torch.compile finds no C++ compiler", "the eager torch kernels", "install",
                         "set CXX", "CC")
    cause = "no C++ compiler found" if variables == "PATH" else "does not run"
    assert_fell_back(jax_result, cause, "XLA's reductions", "CXX")


def read_only_prefix(directory: Path) -> list[str]:
    """A command prefix under which ``directory`` is read-only, for root too (a read-only bind mount)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    prefix = ["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(directory)]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("root, and unshare cannot mount the cache read-only here")
    return prefix


def test_a_read_only_cache_falls_back(tmp_path):
    """(JAX's kernel only: torch's is built by the same code, and a cache that cannot be written is tested for
    both above.)"""
    cache = tmp_path / "cache"
    cache.mkdir()
    env = dict(os.environ, NERO_KERNEL_CACHE=str(cache))
    [[result]] = run_processes(1, env, tmp_path, read_only_prefix(cache), ["jax"])
    assert_fell_back(result, "is not writable", "Read-only file system" if os.geteuid() == 0 else "denied",
                     "Set NERO_KERNEL_CACHE")
    assert not any(cache.iterdir())


def test_four_processes_on_an_empty_cache_all_run_the_kernels(tmp_path):
    """DDP ranks or pytest-xdist workers building at once: each builds in its own temporary directory and renames
    the result into place, so every process loads a whole library and none is left half-written."""
    cache = tmp_path / "cache"
    for results in run_processes(4, dict(os.environ, NERO_KERNEL_CACHE=str(cache)), tmp_path):
        for result in results:
            assert_kernel_ran(result)
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["nero_optax_native", "nero_torch_native"]


# ---- where the cache is, and what it is keyed by ----------------------------------------------------------------


def test_the_cache_honours_xdg_cache_home_and_nero_kernel_cache(cache, monkeypatch, tmp_path):
    monkeypatch.delenv("NERO_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert_kernel_ran(run("torch"))
    library_in(tmp_path / "xdg" / "nero-core" / "kernels", "torch")
    monkeypatch.setenv("NERO_KERNEL_CACHE", str(cache))  # the project's variable wins
    forget_kernels()
    assert_kernel_ran(run("torch"))
    library_in(cache, "torch")


def test_the_cache_key_follows_source_compiler_version_and_flags(cache, monkeypatch, tmp_path):
    cc = compiler()
    names = set()

    def build() -> None:
        forget_kernels()
        assert_kernel_ran(run("torch"))
        names.update(p.name for p in cache.iterdir())

    build()
    for version in ("1", "2"):  # the same compiler, as two versions would answer --version
        wrapper = tmp_path / f"cc{version}"
        wrapper.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "cc {version}"; exit 0; }}\nexec {cc} "$@"\n')
        wrapper.chmod(0o755)
        monkeypatch.setenv("CC", str(wrapper))
        build()
    monkeypatch.setattr(torch_native, "FLAGS", [*torch_native.FLAGS, "-DNERO_FLAG_KEY"])
    build()
    source = tmp_path / "_native.c"
    source.write_text(torch_native.SOURCE.read_text() + "\n/* a changed source */\n")
    monkeypatch.setattr(torch_native, "SOURCE", source)
    build()
    assert len(names) == 5


def test_the_jax_kernel_key_follows_jax_version(cache, monkeypatch):
    assert_kernel_ran(run("jax"))
    monkeypatch.setattr(jax, "__version__", jax.__version__ + ".test")
    forget_kernels()
    assert_kernel_ran(run("jax"))
    assert len(list(cache.glob("nero_optax_native-*.so"))) == 2
