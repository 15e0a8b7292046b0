"""One backend fixture drives every cross-backend test.

A backend converts NumPy arrays in and out, names its namespace, and says how it runs an update (eagerly, or
under ``jax.jit``). Backends whose library is not installed are skipped; CuPy is skipped without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

DATA_DIR = Path(os.environ.get("NERO_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

if importlib.util.find_spec("jax") is not None:
    import jax

    # float64 tests need x64; float32 tests ask for float32 explicitly.
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_platforms", "cpu")

# The Triton kernels' tests (test_torch_triton.py) run them on CPU tensors in Triton's interpreter, which must be on
# before triton.language is imported (torch._dynamo imports it): for the whole session, where torch has no CUDA.
if "TRITON_INTERPRET" not in os.environ and importlib.util.find_spec("torch") is not None:
    import torch

    if torch.version.cuda is None:
        os.environ["TRITON_INTERPRET"] = "1"


@dataclass(frozen=True)
class Backend:
    name: str
    xp: Any
    asarray: Callable[[np.ndarray], Any]
    jit: Callable[[Callable], Callable] = staticmethod(lambda f: f)
    has_bfloat16: bool = False

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.name.startswith("torch"):
            return x.detach().cpu().numpy()
        if self.name == "cupy":
            return self.xp.asnumpy(x)
        return np.asarray(x)

    def dtype(self, name: str) -> Any:
        return getattr(self.xp, name)


def _numpy() -> Backend:
    import array_api_compat.numpy as xp

    return Backend("numpy", xp, np.asarray)


def _strict() -> Backend:
    import array_api_strict as xp

    return Backend("array_api_strict", xp, lambda a: xp.asarray(np.asarray(a)))


def _torch() -> Backend:
    import array_api_compat.torch as xp
    import torch

    return Backend("torch", xp, lambda a: torch.from_numpy(np.array(a)), has_bfloat16=True)


def _jax(jitted: bool) -> Callable[[], Backend]:
    def make() -> Backend:
        import jax
        import jax.numpy as jnp

        return Backend("jax-jit" if jitted else "jax", jnp, jnp.asarray, jax.jit if jitted else (lambda f: f), True)

    return make


def _cupy() -> Backend:
    import array_api_compat.cupy as xp
    import cupy

    if cupy.cuda.runtime.getDeviceCount() == 0:  # pragma: no cover - GPU only
        raise RuntimeError("no GPU")
    return Backend("cupy", xp, cupy.asarray)


BACKENDS: dict[str, tuple[str, Callable[[], Backend]]] = {
    "numpy": ("numpy", _numpy),
    "array_api_strict": ("array_api_strict", _strict),
    "torch": ("torch", _torch),
    "jax": ("jax", _jax(False)),
    "jax-jit": ("jax", _jax(True)),
    "cupy": ("cupy", _cupy),
}


@pytest.fixture(params=list(BACKENDS), scope="session")
def backend(request: pytest.FixtureRequest) -> Backend:
    module, make = BACKENDS[request.param]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    try:
        return make()
    except Exception as exc:  # pragma: no cover - cupy without a device
        pytest.skip(f"{request.param} unavailable: {exc}")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR
