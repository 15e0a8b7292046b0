"""Smoke test of an installed nero-core, run by ``make wheel-check`` with the fresh virtual environment's Python
from a directory outside the checkout:

    python tests/installed/smoke.py

It checks that everything comes from the installed distribution (the kernel sources, the prebuilt C kernel on
x86-64 Linux, py.typed, LICENSE and the STAR meta-parameters are in it) and runs each optimizer a few steps:
``nero_core`` on NumPy; ``nero_torch.Nero`` by default and with ``fused=True``, ``AGD`` and ``Star``;
``nero_optax.nero``, ``agd`` and ``star``. The two kernels must really run: a new kernel cache gains each
library, the C kernel's update is called, the XLA custom call is in the compiled update, and nothing warns. Prints
one line per check and ``N passed, N failed``; exits 1 on a failure.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import sysconfig
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernel_steps
CHECKS: list[Callable[[], str]] = []


def check(fn: Callable[[], str]) -> Callable[[], str]:
    CHECKS.append(fn)
    return fn


@check
def installed_files() -> str:
    import nero_core

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(nero_core.__file__).resolve().is_relative_to(site), f"nero_core comes from {nero_core.__file__}"
    files = {str(f) for f in importlib.metadata.files("nero-core") or []}
    needed = {"nero_torch/_native.c", "nero_optax/_native.cc", "nero_core/py.typed", "nero_torch/py.typed",
              "nero_optax/py.typed", "nero_core/data/star_v2.npz", "nero_core/data/star_v2.json",
              "nero_core/data/star_v1.npz", "nero_core/data/star_v1.json"}
    assert needed <= files, f"missing from the wheel: {sorted(needed - files)}"
    assert any(f.endswith("licenses/LICENSE") for f in files), "no LICENSE in the dist-info"
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):  # setup.py's prebuilt kernel
        assert any(f.startswith("nero_torch/_native_prebuilt") for f in files), "no prebuilt C kernel in the wheel"
    meta = importlib.metadata.metadata("nero-core")
    assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
    assert meta["Version"] == nero_core.__version__
    return f"nero-core {meta['Version']} from {site}, {len(files)} files"


@check
def nero_core_on_numpy() -> str:
    import nero_core

    rng = np.random.default_rng(0)
    params = [rng.normal(size=(8, 5)), rng.normal(size=(8,))]
    opt = nero_core.nero(lr=0.01)
    state = opt.init(params)
    for _ in range(3):
        params, state = opt.update([rng.normal(size=p.shape) for p in params], state, params)
    w = params[0]
    assert np.allclose(w.mean(axis=1), 0, atol=1e-12) and np.allclose(np.linalg.norm(w, axis=1), 1, atol=1e-12)
    return "3 steps; every neuron zero-mean and unit-norm"


def kernel_check(framework: str, cache: Path, library: str) -> str:
    import kernel_steps

    result = kernel_steps.RUNS[framework]()
    assert result["kernel_ran"], f"the {framework} kernel did not run: {result['warnings']}"
    assert not result["warnings"], result["warnings"]
    assert result["deviation"] <= kernel_steps.TOLERANCE[framework], result
    built = sorted(p.name for p in cache.glob(f"{library}-*.so"))
    assert built, f"the kernel cache {cache} has no {library}"
    return f"kernel ran ({built[0]} built), {result['deviation']:.1e} from the core rule"


@check
def nero_torch_default() -> str:
    import nero_torch

    return train_torch(lambda params: nero_torch.Nero(params), "Nero()")


@check
def nero_torch_fused_kernel() -> str:
    return kernel_check("torch", CACHE, "nero_torch_native")


@check
def nero_torch_agd() -> str:
    import nero_torch

    return train_torch(lambda params: nero_torch.AGD(params), "AGD")


@check
def nero_torch_star() -> str:
    import nero_core
    import nero_torch

    shipped = nero_core.load_star_params()  # the meta-parameters in the installed package
    assert set(shipped) == {"w1", "b1", "w2", "b2", "w3", "b3"} and shipped["w1"].shape[0] == 39, shipped.keys()
    return train_torch(lambda params: nero_torch.Star(params), "Star (shipped star_v2)")


def train_torch(make: Callable, name: str) -> str:
    """20 steps on a fixed regression with a small MLP: the loss must fall."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 6)
    y = x[:, :1] - x[:, 1:2] ** 2
    opt = make(list(model.parameters()))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    return f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@check
def nero_optax_nero_kernel() -> str:
    return kernel_check("jax", CACHE, "nero_optax_native")


@check
def nero_optax_agd() -> str:
    import nero_optax

    return train_jax(nero_optax.agd(), "agd")


@check
def nero_optax_star() -> str:
    import nero_optax

    return train_jax(nero_optax.star(), "star")


def train_jax(opt, name: str) -> str:
    """20 jitted steps on a fixed regression with a small MLP (Flax layout): the loss must fall."""
    import jax
    import jax.numpy as jnp
    import optax

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w1": jax.random.normal(k1, (6, 16)) / 6**0.5, "b1": jnp.zeros(16),
              "w2": jax.random.normal(k2, (16, 1)) / 4.0, "b2": jnp.zeros(1)}
    x = jax.random.normal(k3, (64, 6))
    y = x[:, :1] - x[:, 1:2] ** 2

    def loss_fn(p):
        return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y) ** 2)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = opt.init(params)
    losses = []
    for _ in range(20):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    return f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NERO_KERNEL_CACHE"] = tmp  # an empty cache: the kernels are built from the installed sources
        CACHE = Path(tmp)
        failed = 0
        for fn in CHECKS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", RuntimeWarning)  # a kernel that falls back warns: fail on it
                    print(f"ok    {fn.__name__}: {fn()}", flush=True)
            except Exception:
                failed += 1
                print(f"FAIL  {fn.__name__}:\n{traceback.format_exc()}", flush=True)
        print(f"smoke: {len(CHECKS) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
