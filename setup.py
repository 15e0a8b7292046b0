"""The wheel's prebuilt CPU kernel; everything else is in pyproject.toml.

``nero_torch/_native.c`` is compiled at first use with this machine's C compiler, for its CPU (``-march=native``).
A machine with no compiler (a slim container, a locked-down cluster node) would then run Nero on its eager torch
kernels, at about 2x fused Adam's step time on the GPT-2-like set instead of 0.8x; so the wheel carries one build of
the same source for x86-64 CPUs with AVX2 (2013 and later), ``nero_torch/_native_prebuilt*.so``, which
:mod:`nero_torch._native` loads where it builds none. It is a plain shared library (no Python API, loaded with
ctypes). Optional: where it cannot be built (no compiler where the wheel is built, another architecture), the wheel
is built without it and Nero compiles at first use or takes the torch kernels, as before.
"""

import hashlib
import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class _PlainLibrary(build_ext):
    """Links the kernel as a plain shared library: no ``PyInit_`` export is looked for."""

    def get_export_symbols(self, ext):
        return []


FLAGS = ["-O3", "-mavx2", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
SOURCE = "adapters/nero_torch/_native.c"

ext_modules = []
if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
    digest = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()[:16]  # see _native.c
    ext_modules.append(Extension(
        "nero_torch._native_prebuilt", [SOURCE], extra_compile_args=FLAGS, extra_link_args=["-fopenmp", "-lm"],
        define_macros=[("NERO_SOURCE_DIGEST", f'"{digest}"')], optional=True,
    ))

setup(ext_modules=ext_modules, cmdclass={"build_ext": _PlainLibrary})
