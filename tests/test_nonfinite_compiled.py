"""Non-finite gradients, one policy everywhere: a step where any gradient holds NaN, +Inf or -Inf, or is so large
that its square overflows the state's dtype, is skipped for the whole parameter set. Parameters and state (step
counts included) stay bit for bit as they were and the skip is counted; the next finite step proceeds.

Checked on the core (every backend, ``jax.jit`` included), in a ``torch.compile``'d training step and eagerly for
nero_torch (every kernel), and under ``jax.jit`` for nero_optax (fused and core), at the first step and later.
"""

from __future__ import annotations

import numpy as np
import pytest

import nero_core

BAD = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}
HUGE = {"float16": 6e4, "bfloat16": 1e30, "float32": 1e30, "float64": 1e300}  # finite; squares overflow the state
SHAPES = [(4, 5), (3,), (2, 3, 2), ()]


def bad_value(kind: str, dtype: str) -> float:
    return HUGE[dtype] if kind == "overflow" else BAD[kind]


def poisoned(grads: list[np.ndarray], kind: str, dtype: str) -> list[np.ndarray]:
    """The same gradients with one entry of one tensor (of several) made bad."""
    out = [g.copy() for g in grads]
    if kind == "overflow":
        out[0][1, :] = HUGE[dtype]  # a whole row: its squared norm overflows, though every entry is finite
    else:
        out[2].flat[3] = BAD[kind]
    return out


# ---- the core, on every backend ---------------------------------------------------------------------------------


def test_core_skips_the_whole_step_and_counts_it(backend):
    rng = np.random.default_rng(0)
    params = [rng.normal(size=s) for s in SHAPES]
    grads = [[rng.normal(size=s) for s in SHAPES] for _ in range(3)]
    opt = nero_core.nero()
    update = backend.jit(opt.update)
    ps = [backend.asarray(p) for p in params]
    state = opt.init(ps)
    skipped = 0
    for good in grads[:2]:  # bad steps at the first step (no update yet), then after one
        for kind in [*BAD, "overflow"]:
            with np.errstate(over="ignore", invalid="ignore"):  # NumPy warns of the overflow it then skips
                new_ps, new_state = update([backend.asarray(g) for g in poisoned(grads[2], kind, "float64")], state, ps)
            for a, b in zip(new_ps + _state_arrays(new_state), ps + _state_arrays(state), strict=True):
                a, b = backend.to_numpy(a), backend.to_numpy(b)
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), kind
            skipped += 1
            assert int(backend.to_numpy(new_state.skipped)) == skipped, kind
            state = new_state
        ps, state = update([backend.asarray(g) for g in good], state, ps)
    assert all(np.all(np.isfinite(backend.to_numpy(x))) for x in ps + _state_arrays(state))
    assert [int(backend.to_numpy(c)) for c in state.count] == [2] * len(SHAPES)
    assert int(backend.to_numpy(state.skipped)) == 8


def _state_arrays(state):
    return [*state.count, *state.v, *state.sigma]


# ---- nero_torch -------------------------------------------------------------------------------------------------


def _torch_setup(dtype=None, **options):
    torch = pytest.importorskip("torch")
    from torch import nn

    import nero_torch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    if dtype is not None:
        model = model.to(dtype)
    opt = nero_torch.Nero([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}], **options)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    return torch, model, opt, x


def _torch_snapshot(torch, model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state]
    return params, state, opt.skipped_steps


def _assert_torch_unchanged(torch, before, after):
    for a, b in zip(before[0] + [v for s in before[1] for v in s.values()],
                    after[0] + [v for s in after[1] for v in s.values()], strict=True):
        assert a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    assert len(before[1]) == len(after[1])


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_torch_compiled_training_step_skips_and_counts(fused):
    """A compiled step (forward, backward, one bad gradient entry, opt.step) is skipped for NaN, +Inf and -Inf,
    without a graph per outcome: the skip is branch-free, so good and bad steps run the same graph."""
    torch, model, opt, x = _torch_setup(fused=True if fused else None)
    from torch._dynamo.testing import CompileCounterWithBackend

    def train_step(x, poison):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        model[2].bias.grad.add_(poison)  # 0 on good steps; NaN or Inf in one entry of one tensor on bad ones
        opt.step()

    counter = CompileCounterWithBackend("aot_eager")  # dynamo and AOTAutograd: the graph inductor would get
    step = torch.compile(train_step, backend=counter)
    clean, bad = torch.zeros(3), {kind: torch.zeros(3) for kind in BAD}
    for kind, poison in bad.items():
        poison[1] = BAD[kind]
    step(x, bad["nan"])  # a bad first step: the state is not even created
    assert len(opt.state) == 0 and opt.skipped_steps == 1
    step(x, clean)  # the first update (the core rule's projection) runs eagerly
    for kind in BAD:
        for poison in (clean, bad[kind]):
            before = _torch_snapshot(torch, model, opt)
            step(x, poison)
            after = _torch_snapshot(torch, model, opt)
            if poison is clean:
                assert all(not torch.equal(a, b) for a, b in zip(before[0], after[0]))
                assert [s["step"].item() for s in after[1]] == [s["step"].item() + 1 for s in before[1]]
                continue
            _assert_torch_unchanged(torch, before[:2], after[:2])
            assert after[2] == before[2] + 1, kind
    assert opt.skipped_steps == 4
    assert all(s["step"].item() == 4 for s in opt.state.values())
    frames = counter.frame_count
    step(x, bad["-inf"])
    step(x, clean)
    assert counter.frame_count == frames  # no new graph for either outcome


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("options", [dict(), dict(foreach=False), dict(fused=True)], ids=["foreach", "core", "fused"])
def test_torch_gradient_whose_square_overflows_is_skipped(options, dtype):
    torch = pytest.importorskip("torch")
    torch, model, opt, x = _torch_setup(getattr(torch, dtype), **options)
    for _ in range(2):  # the first step (no state yet), then a later one
        opt.zero_grad()
        model(x.to(model[0].weight.dtype)).float().pow(2).mean().backward()
        before = _torch_snapshot(torch, model, opt)
        model[0].weight.grad[1] = HUGE[dtype]  # every entry finite; the row's squared norm is not
        opt.step()
        after = _torch_snapshot(torch, model, opt)
        _assert_torch_unchanged(torch, before[:2], after[:2])
        assert after[2] == before[2] + 1
        opt.zero_grad()
        model(x.to(model[0].weight.dtype)).float().pow(2).mean().backward()
        opt.step()
    assert opt.skipped_steps == 2
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())
    assert all(s["step"].item() == 2 for s in opt.state.values())


# ---- nero_optax -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "core"])
def test_optax_jitted_update_skips_at_the_first_and_later_steps(fused, dtype):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import nero_optax

    jdtype = getattr(jax.numpy, dtype)
    kinds = [*BAD] + (["overflow"] if dtype != "float16" else [])  # float16 squares always fit float32 state
    rng = np.random.default_rng(2)
    names = ["kernel", "bias", "conv", "scale"]
    params = {n: jax.numpy.asarray(rng.normal(size=s), jdtype) for n, s in zip(names, SHAPES)}

    def grads(seed, kind=None):
        r = np.random.default_rng(seed)
        gs = [r.normal(size=s).astype(np.float32) for s in SHAPES]
        if kind is not None:
            gs = poisoned(gs, kind, dtype)
        return {n: jax.numpy.asarray(g, jdtype) for n, g in zip(names, gs)}

    opt = nero_optax.nero(fused=fused)
    update = jax.jit(opt.update)
    state = opt.init(params)
    for step, kind in enumerate(kinds):  # a bad first step, then one bad step after each good one
        updates, new_state = update(grads(10 + step, kind), state, params)
        new_params = optax.apply_updates(params, updates)
        for a, b in zip(jax.tree.leaves((new_params, new_state.count, new_state.v, new_state.sigma)),
                        jax.tree.leaves((params, state.count, state.v, state.sigma)), strict=True):
            assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes(), kind
        assert int(new_state.skipped) == int(state.skipped) + 1, kind
        updates, state = update(grads(20 + step), new_state, params)
        params = optax.apply_updates(params, updates)
        assert int(state.count) == step + 1 and int(state.skipped) == step + 1
    assert all(bool(jax.numpy.all(jax.numpy.isfinite(x))) for x in jax.tree.leaves((params, state)))
    assert update._cache_size() == 1
