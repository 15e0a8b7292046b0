"""Determinism on CPU: two runs from the same inputs give bit-for-bit equal parameters and state, on every core
backend and through each adapter (every torch kernel; optax fused and core, jitted). Each run builds its own
optimizer (and its own jitted or compiled function), so nothing but the inputs is shared.

The torch model's first layer is large enough (more than 65536 elements) for torch and the native kernel to split
rows across threads.
"""

from __future__ import annotations

import numpy as np
import pytest

import nero_core

SHAPES = [(30, 26), (7, 3, 3, 3), (26,)]
STEPS = 4


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s) for s in SHAPES]
    grads = [[rng.normal(size=s) * rng.uniform(0.1, 3) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def as_bytes(arrays) -> list[tuple[str, tuple[int, ...], bytes]]:
    return [(str(a.dtype), a.shape, a.tobytes()) for a in arrays]


def test_core_is_bitwise_deterministic(backend):
    xp, dtype = backend.xp, "float32"
    params, grads = problem()

    def run():
        opt = nero_core.nero(neuron_axis=[0, 1, None])
        update = backend.jit(opt.update)
        ps = [xp.astype(backend.asarray(p), getattr(xp, dtype)) for p in params]
        state = opt.init(ps)
        for gs in grads:
            ps, state = update([xp.astype(backend.asarray(g), getattr(xp, dtype)) for g in gs], state, ps)
        return as_bytes(backend.to_numpy(x) for x in [*ps, *state.count, *state.v, *state.sigma, state.skipped])

    first, second = run(), run()
    assert first == second
    assert first[: len(SHAPES)] != as_bytes(np.asarray(p, dtype) for p in params)  # the runs moved the params


@pytest.mark.parametrize(
    ("options", "dtype"),
    [({}, "float32"), (dict(foreach=False), "float32"), (dict(fused=True), "float32"), (dict(fused=True), "float64"),
     ({}, "bfloat16")],
    ids=["foreach-f32", "core-f32", "fused-f32", "fused-f64", "foreach-bf16"],
)
def test_torch_adapter_is_bitwise_deterministic(options, dtype):
    torch = pytest.importorskip("torch")
    from torch import nn

    import nero_torch

    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(260, 300), nn.Tanh(), nn.Linear(300, 3))
        model = model.to(getattr(torch, dtype))
        opt = nero_torch.Nero(model.parameters(), **options)
        data = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            x = torch.randn(8, 260, generator=data).to(model[0].weight.dtype)
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()
        tensors = [*model.parameters(), *(v for s in opt.state.values() for v in s.values())]
        return [(t.dtype, tuple(t.shape), t.detach().reshape(-1).view(torch.uint8).tolist()) for t in tensors]

    first, second = run(), run()
    assert first == second


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "core"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_optax_adapter_is_bitwise_deterministic(fused, dtype):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import nero_optax

    params, grads = problem(1)

    def run():
        opt = nero_optax.nero(fused=fused, neuron_axis=0)
        update = jax.jit(opt.update)
        ps = [jax.numpy.asarray(p, dtype) for p in params]
        state = opt.init(ps)
        for gs in grads:
            updates, state = update([jax.numpy.asarray(g, dtype) for g in gs], state, ps)
            ps = optax.apply_updates(ps, updates)
        return as_bytes(np.asarray(x) for x in jax.tree.leaves((ps, state)))

    first, second = run(), run()
    assert first == second
