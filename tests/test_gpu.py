"""Checks that need a CUDA GPU, all marked ``gpu`` (``pytest -m gpu``; ``make gpu-check`` runs them before the GPU
comparison) and skipped without one: ``Nero(fused=True)``'s Triton kernels on CUDA tensors against the core rule
(both non-finite policies, wide rows, half dtypes, crafted rows, no host sync), ``nero_optax.nero`` jitted on a GPU
(XLA's reductions, finite where a neuron's ``v`` is subnormal) and ``nero_core`` on CuPy arrays.

The CPU suite runs the same Triton kernels in Triton's interpreter (``test_torch_triton.py``); the tests here are
the ones that only a GPU can answer: the compiled kernels, their rounding, and the device-side decisions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import nero_torch  # noqa: E402
from reference import ReferenceNero  # noqa: E402
from test_torch_native import CASES, crafted_rows, reference_step  # noqa: E402

pytestmark = pytest.mark.gpu
CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}  # 10 steps; rows up to 10,000 wide

# Rows wider than the kernels' block (two stages), narrow ones (several to a program), a conv kernel, fan-in 2,
# bias-like tensors.
SHAPES = [(24, 10000), (300, 3, 3, 3), (500, 512), (40, 3000), (9, 2), (2048,), (5,)]


@pytest.fixture
def triton_steps(monkeypatch) -> list[int]:
    pytest.importorskip("triton")
    from nero_torch import _triton

    calls: list[int] = []
    step = _triton.step
    monkeypatch.setattr(_triton, "step", lambda *a, **k: calls.append(1) or step(*a, **k))
    return calls


def run(shapes, steps: int = 10, dtype=torch.float32, bad_at: dict | None = None, **options):
    """Parameters after every step of Nero on CUDA, random parameters and gradients; ``bad_at``: {step: (tensor,
    index, value)} puts a value into a gradient."""
    gen = torch.Generator("cuda").manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen, device="cuda", dtype=dtype)) for s in shapes]
    opt = nero_torch.Nero(params, **options)
    history = []
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device="cuda", dtype=dtype) * 0.1
        if bad_at and step in bad_at:
            tensor, index, value = bad_at[step]
            params[tensor].grad[index] = value
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


def deviation(a, b) -> float:
    return max((x.double() - y.double()).abs().max().item() for sa, sb in zip(a, b) for x, y in zip(sa, sb))


@cuda
@pytest.mark.parametrize("skip_nonfinite", ["step", "neuron"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_kernel_on_cuda_matches_core_rule(dtype, skip_nonfinite, triton_steps):
    got, _ = run(SHAPES, dtype=dtype, fused=True, skip_nonfinite=skip_nonfinite)
    expected, _ = run(SHAPES, dtype=dtype, foreach=False)
    assert deviation(got, expected) <= TOLERANCE[dtype]
    assert len(triton_steps) == 9


@cuda
@pytest.mark.parametrize("options", [dict(centre=False), dict(normalise=False), dict(maximize=True),
                                     dict(lr=0.03, beta=0.9)])
def test_triton_kernel_on_cuda_options(options, triton_steps):
    got, _ = run(SHAPES, steps=4, fused=True, **options)
    assert deviation(got, run(SHAPES, steps=4, foreach=False, **options)[0]) <= TOLERANCE[torch.float32]
    assert len(triton_steps) == 3


@cuda
@pytest.mark.parametrize("dtype, unit_roundoff", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_triton_kernel_on_cuda_rounds_half_parameters_once(dtype, unit_roundoff, triton_steps):
    """Each step is the float64 reference's step from the same parameters, rounded to nearest once."""
    shapes = [(24, 10000), (40, 300), (7,)]
    gen = torch.Generator("cuda").manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen, device="cuda").to(dtype)) for s in shapes]
    opt = nero_torch.Nero(params, fused=True)
    ref = ReferenceNero(shapes, [0] * len(shapes))
    for step in range(4):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen, device="cuda") * 0.1).to(dtype)
        expected = ref.step([p.detach().double().cpu().numpy() for p in params],
                            [p.grad.double().cpu().numpy() for p in params])
        opt.step()
        if step:
            for p, e in zip(params, expected):
                torch.testing.assert_close(p.detach().double().cpu(), torch.from_numpy(e), rtol=unit_roundoff,
                                           atol=1e-6)
    assert len(triton_steps) == 3


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_on_cuda_on_rows_the_closed_form_cannot_trust(case, dtype, triton_steps):
    """``test_torch_native``'s crafted rows, one steady-state step from a set state, against the reference."""
    w, g, v, lr = crafted_rows(case, dtype)
    p = nn.Parameter(torch.tensor(w, device="cuda"))
    opt = nero_torch.Nero([p], lr=lr, fused=True)
    opt.state[p] = {"step": torch.tensor(3.0, device="cuda"), "v": torch.tensor(v, device="cuda"),
                    "sigma": torch.ones((), dtype=dtype, device="cuda")}
    p.grad = torch.tensor(g, device="cuda")
    opt.step()
    tolerance = 1e-3 if dtype == torch.float32 and case == "near-constant" else {
        torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    np.testing.assert_allclose(p.detach().cpu().numpy(), reference_step(w, g, v, lr=lr), rtol=0, atol=tolerance)
    assert len(triton_steps) == 1


@cuda
@pytest.mark.parametrize("skip_nonfinite", ["step", "neuron"])
def test_triton_kernel_on_cuda_takes_no_host_sync(skip_nonfinite, triton_steps):
    """With a CUDA tensor lr, a step (a skipped one too) syncs nothing: torch's sync debug mode raises on a sync."""
    gen = torch.Generator("cuda").manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen, device="cuda")) for s in SHAPES]
    lr = torch.tensor(0.02, device="cuda")
    opt = nero_torch.Nero(params, lr=lr, fused=True, skip_nonfinite=skip_nonfinite)
    for step in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device="cuda")
        if step == 4:
            params[0].grad[3, 7] = float("nan")
        if step >= 2:  # the first steps initialise the state (the core rule) and place the counters
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_steps == 1 and len(triton_steps) == 4


@cuda
def test_triton_kernel_on_cuda_skips_a_nonfinite_step_whole(triton_steps):
    bad = {5: (0, (3, 9000), float("inf"))}  # one entry of a wide row
    history, opt = run(SHAPES, steps=6, fused=True, bad_at=bad)
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(history[5], history[4]))
    assert all(float(s["step"]) == 5 for s in opt.state.values())


@cuda
def test_triton_kernel_on_cuda_holds_back_nonfinite_neurons(triton_steps):
    bad = {5: (0, (3, 9000), float("nan")), 6: (5, (100,), 1e30)}  # a wide row; a bias element whose square overflows
    history, opt = run(SHAPES, steps=8, fused=True, skip_nonfinite="neuron", bad_at=bad)
    expected, reference = run(SHAPES, steps=8, foreach=False, skip_nonfinite="neuron", bad_at=bad)
    assert deviation(history, expected) <= TOLERANCE[torch.float32]
    assert opt.skipped_steps == reference.skipped_steps == 2
    assert torch.equal(history[5][0][3], history[4][0][3]) and not torch.equal(history[5][0][2], history[4][0][2])
    assert all(torch.isfinite(p).all() for step in history for p in step)


# ---- JAX and CuPy -------------------------------------------------------------------------------------------------

# Run in a child: this suite's conftest.py keeps JAX on the CPU.
JAX_ON_GPU = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    import nero_optax
    from nero_optax import _native
    gpu = jax.devices("gpu")[0]
    keys = jax.random.split(jax.random.PRNGKey(0), 16)
    params = {"dense": jax.random.normal(keys[0], (64, 96)), "conv": jax.random.normal(keys[1], (3, 3, 16, 32)),
              "bias": jax.random.normal(keys[2], (96,))}
    params = jax.device_put(params, gpu)
    out = {"applies": _native.applies(params["dense"], -1), "platform": jax.default_backend()}
    results = {}
    for fused in (True, False):
        opt = nero_optax.nero(0.05, fused=fused)
        state, p = opt.init(params), params
        update = jax.jit(opt.update)
        if fused:
            out["custom_call"] = _native.TARGET in update.lower(params, state, params).as_text()
        for step in range(6):
            grads = jax.tree.map(lambda x, k=keys[3 + step]: jax.random.normal(k, x.shape), params)
            if step >= 1:  # neuron 0 of the dense kernel: one tiny gradient, then none: v goes subnormal
                grads["dense"] = grads["dense"].at[:, 0].set(1e-21 if step == 1 else 0.0)
            updates, state = update(grads, state, p)
            p = optax.apply_updates(p, updates)
        results[fused] = p
    out["finite"] = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(results[True]))
    out["deviation"] = max(float(jnp.abs(results[True][k] - results[False][k])[:, 1:].max()) if k == "dense" else
                           float(jnp.abs(results[True][k] - results[False][k]).max()) for k in params)
    print(json.dumps(out))
""")


@cuda
def test_nero_optax_on_gpu_takes_xla_reductions_and_stays_finite():
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TRITON_INTERPRET")}
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    done = subprocess.run([sys.executable, "-c", JAX_ON_GPU], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parent, check=False)
    if done.returncode != 0 and "Unknown backend" in done.stderr:
        pytest.skip("JAX sees no GPU (its CUDA plugin is not installed?)")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["platform"] == "gpu" and not out["applies"] and not out["custom_call"]
    assert out["finite"] and out["deviation"] <= 1e-5


def test_nero_core_on_cupy_matches_the_reference():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("CuPy sees no GPU")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("CuPy sees no GPU")
    import nero_core

    rng = np.random.default_rng(0)
    shapes = [(64, 96), (32, 3, 3, 3), (96,)]
    params = [rng.standard_normal(s) for s in shapes]
    rule = nero_core.nero(0.05, neuron_axis=0)
    for dtype, tolerance in ((np.float32, 1e-5), (np.float64, 1e-12)):
        ref = ReferenceNero(shapes, [0] * len(shapes), lr=0.05)
        expected = [p.astype(dtype).astype(np.float64) for p in params]
        ps = [cupy.asarray(p.astype(dtype)) for p in params]
        state = rule.init(ps)
        for _ in range(5):
            gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
            expected = ref.step(expected, gs)
            ps, state = rule.update([cupy.asarray(g) for g in gs], state, ps)
        for p, e in zip(ps, expected):
            assert p.dtype == dtype
            np.testing.assert_allclose(cupy.asnumpy(p), e, rtol=0, atol=tolerance)
