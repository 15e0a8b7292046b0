"""The array-API AGD rule on every backend: against a float64 transcription of the maths, and its identities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nero_core._agd import AGDState, agd, agd_init, weight_axes

# torch layout, forward order: a bias before any weight, a matrix and its bias, a conv and its bias, a scalar,
# a zero-gradient matrix followed by its bias, a 1-d conv, a fan-in-1 matrix.
SHAPES = [(5,), (6, 5), (6,), (4, 6, 3, 3), (4,), (), (3, 4), (3,), (2, 3, 5), (7, 1)]
ZERO_GRAD = {6}  # the whole weight: its bias must not move either
ZERO_SLICE = (3, (slice(None), slice(None), 1, 2))  # one kernel slice of the conv: that slice must not move
STEPS = 4


# ----------------------------------------------------------------------------------------------------------------
# The maths of docs/design.md in float64, slice by slice, with none of nero_core's helpers.


def reference_step(params, grads, axes, gain=1.0):
    """One AGD step. ``axes[i]`` is the (out, in) axes of a weight, or None; a non-weight follows the nearest
    weight before it (the first weight when none is before). Returns (new params, eta)."""
    weights = [i for i, a in enumerate(axes) if a is not None]
    num = len(weights)

    def slices(x, a):  # (out, in, k), kernel slices in C order
        y = np.moveaxis(np.asarray(x, np.float64), a, (0, 1))
        return y.reshape(y.shape[0], y.shape[1], -1)

    def sv(shape, a):
        k = math.prod(n for j, n in enumerate(shape) if j not in a)
        return math.sqrt(shape[a[0]] / shape[a[1]]) / math.sqrt(k)

    G = 0.0
    for i in weights:
        g = slices(grads[i], axes[i])
        G += sv(grads[i].shape, axes[i]) * sum(float(np.linalg.norm(g[:, :, s])) for s in range(g.shape[2]))
    G /= num
    eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
        if axes[i] is not None:
            a = axes[i]
            w, gw = slices(p, a).copy(), slices(g, a)
            for s in range(gw.shape[2]):
                n = float(np.linalg.norm(gw[:, :, s]))
                if n > 0:
                    w[:, :, s] -= gain * eta / num * sv(p.shape, a) * gw[:, :, s] / n
            moved = tuple(p.shape[j] for j in a) + tuple(n for j, n in enumerate(p.shape) if j not in a)
            out.append(np.moveaxis(w.reshape(moved), (0, 1), a))
        else:
            before = [w for w in weights if w < i]
            owner = before[-1] if before else weights[0]
            n = float(np.linalg.norm(np.asarray(grads[owner], np.float64)))
            scale = gain * eta / num * sv(grads[owner].shape, axes[owner])
            out.append(p - scale * g / n if n > 0 else p.copy())
    return out, eta


# ----------------------------------------------------------------------------------------------------------------


def to_flax(x):
    """torch (out, in, *kernel) -> flax (*kernel, in, out)."""
    return np.moveaxis(x, (0, 1), (-1, -2)) if x.ndim >= 2 else x


def make_problem(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s).astype(dtype) for s in SHAPES]
    grads = []
    for _ in range(STEPS):
        gs = [rng.normal(size=s) * rng.uniform(0.01, 10) for s in SHAPES]
        for i in ZERO_GRAD:
            gs[i] = np.zeros(SHAPES[i])
        index, where = ZERO_SLICE
        gs[index][where] = 0.0
        grads.append([g.astype(dtype) for g in gs])
    return params, grads


def run_backend(backend, params, grads, **options):
    opt = agd(**options)
    update = backend.jit(opt.update)
    ps = [backend.asarray(p) for p in params]
    state = opt.init(ps)
    history, etas = [], []
    for gs in grads:
        ps, state = update([backend.asarray(g) for g in gs], state, ps)
        history.append([backend.to_numpy(p) for p in ps])
        etas.append(float(backend.to_numpy(state.eta)))
    return history, etas, state


def run_reference(params, grads, axes, gain=1.0):
    ps, history, etas = params, [], []
    for gs in grads:
        ps, eta = reference_step(ps, gs, axes, gain)
        history.append(ps)
        etas.append(eta)
    return history, etas


def max_deviation(history, reference):
    return max(
        float(np.max(np.abs(np.asarray(a, np.float64) - b), initial=0.0))
        for step_a, step_b in zip(history, reference)
        for a, b in zip(step_a, step_b)
    )


TORCH_AXES = [(0, 1) if len(s) >= 2 else None for s in SHAPES]


@pytest.mark.parametrize("gain", [1.0, 0.3])
def test_matches_float64_reference(backend, gain):
    params, grads = make_problem(1)
    history, etas, state = run_backend(backend, params, grads, gain=gain)
    ref_history, ref_etas = run_reference(params, grads, TORCH_AXES, gain)
    assert max_deviation(history, ref_history) <= 1e-12
    np.testing.assert_allclose(etas, ref_etas, rtol=1e-13)
    assert int(backend.to_numpy(state.count)) == STEPS and int(backend.to_numpy(state.skipped)) == 0


def test_flax_layout_is_the_transposed_torch_layout(backend):
    params, grads = make_problem(2)
    flax_params = [to_flax(p) for p in params]
    flax_grads = [[to_flax(g) for g in gs] for gs in grads]
    history, etas, _ = run_backend(backend, flax_params, flax_grads, layout="flax")
    ref_history, ref_etas = run_reference(params, grads, TORCH_AXES)
    assert max_deviation(history, [[to_flax(p) for p in ps] for ps in ref_history]) <= 1e-12
    np.testing.assert_allclose(etas, ref_etas, rtol=1e-13)


def test_per_tensor_axes_and_explicit_attach(backend):
    # a ConvTranspose-like (in, out, k) weight, a matrix marked as not a weight, and a bias attached by index.
    shapes = [(4, 6, 3), (6,), (2, 6), (3, 2)]
    layout = [(1, 0), None, None, (0, 1)]
    rng = np.random.default_rng(3)
    params = [rng.normal(size=s) for s in shapes]
    grads = [[rng.normal(size=s) for s in shapes] for _ in range(2)]
    history, etas, _ = run_backend(backend, params, grads, layout=layout, attach=[None, 3, None, None])
    # Reference: reorder so that the attached bias comes right after its weight, then map back.
    order = [0, 2, 3, 1]
    ref_axes = [(1, 0), None, (0, 1), None]
    ref_history, ref_etas = run_reference([params[j] for j in order], [[g[j] for j in order] for g in grads], ref_axes)
    back = [order.index(i) for i in range(4)]
    assert max_deviation(history, [[ps[j] for j in back] for ps in ref_history]) <= 1e-12
    np.testing.assert_allclose(etas, ref_etas, rtol=1e-13)


def test_float32_matches_reference(backend):
    params, grads = make_problem(4, np.float32)
    history, etas, state = run_backend(backend, params, grads)
    assert all(h.dtype == np.float32 for h in history[-1])
    assert backend.to_numpy(state.eta).dtype == np.float32
    ref_history, ref_etas = run_reference(params, grads, TORCH_AXES)
    assert max_deviation(history, ref_history) <= 1e-5
    np.testing.assert_allclose(etas, ref_etas, rtol=1e-5)


def test_half_precision_keeps_dtype(backend):
    if not backend.has_bfloat16:
        pytest.skip("no bfloat16")
    xp, bf16, f32 = backend.xp, backend.dtype("bfloat16"), backend.dtype("float32")
    params, grads = make_problem(5, np.float32)
    ps = [xp.astype(backend.asarray(p), bf16) for p in params]
    gs = [xp.astype(backend.asarray(g), bf16) for g in grads[0]]
    opt = agd()
    new, state = backend.jit(opt.update)(gs, opt.init(ps), ps)
    assert all(p.dtype == bf16 for p in new)
    assert state.eta.dtype == f32  # the maths runs in float32
    _, eta = reference_step(*([backend.to_numpy(xp.astype(x, f32)) for x in xs] for xs in (ps, gs)), TORCH_AXES)
    np.testing.assert_allclose(float(backend.to_numpy(state.eta)), eta, rtol=1e-5)


def slice_step_norms(old, new, axes):
    moved = np.moveaxis(np.asarray(new, np.float64) - np.asarray(old, np.float64), axes, (0, 1))
    return np.sqrt(np.sum(moved.reshape(moved.shape[0], moved.shape[1], -1) ** 2, axis=(0, 1)))


@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_step_norm_identity(backend, gain):
    """||dW[:, :, s]||_F = gain * eta / L * sv(W) exactly, on every slice with a gradient."""
    params, grads = make_problem(6)
    opt = agd(gain)
    ps = [backend.asarray(p) for p in params]
    new, state = backend.jit(opt.update)([backend.asarray(g) for g in grads[0]], opt.init(ps), ps)
    eta = float(backend.to_numpy(state.eta))
    weights = [i for i, a in enumerate(TORCH_AXES) if a is not None]
    for i in weights:
        shape = SHAPES[i]
        k = math.prod(shape[2:])
        expected = gain * eta / len(weights) * math.sqrt(shape[0] / shape[1]) / math.sqrt(k)
        norms = slice_step_norms(params[i], backend.to_numpy(new[i]), (0, 1))
        has_grad = slice_step_norms(np.zeros(shape), grads[0][i], (0, 1)) > 0
        np.testing.assert_allclose(norms[has_grad], expected, rtol=1e-12)
        np.testing.assert_array_equal(norms[~has_grad], 0.0)
    assert np.any(slice_step_norms(np.zeros(SHAPES[3]), grads[0][3], (0, 1)) == 0)  # the guarded slice exists


def test_zero_gradients_give_zero_eta_and_no_step(backend):
    params, _ = make_problem(7)
    opt = agd()
    ps = [backend.asarray(p) for p in params]
    new, state = backend.jit(opt.update)([backend.asarray(np.zeros(s)) for s in SHAPES], opt.init(ps), ps)
    assert float(backend.to_numpy(state.eta)) == 0.0
    for a, b in zip(new, params):
        np.testing.assert_array_equal(backend.to_numpy(a), b)


def test_gain_as_array_matches_float(backend):
    params, grads = make_problem(8)
    as_float, _, _ = run_backend(backend, params, grads[:1], gain=0.5)
    as_array, _, _ = run_backend(backend, params, grads[:1], gain=backend.asarray(np.asarray(0.5)))
    assert max_deviation(as_array, [[np.asarray(p, np.float64) for p in ps] for ps in as_float]) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
@pytest.mark.parametrize("where", [(2, (1,)), (3, (0, 1, 2, 0)), (5, ())], ids=["bias", "conv", "scalar"])
def test_nonfinite_gradient_skips_the_step(backend, bad, where):
    """A step is skipped when a gradient holds NaN or Inf, or is so large that its squared norm overflows (the
    step itself would be NaN)."""
    params, grads = make_problem(9)
    opt = agd()
    update = backend.jit(opt.update)
    ps = [backend.asarray(p) for p in params]
    ps, state = update([backend.asarray(g) for g in grads[0]], opt.init(ps), ps)
    before = [backend.to_numpy(p) for p in ps]
    eta = float(backend.to_numpy(state.eta))
    poisoned = [np.array(g) for g in grads[1]]
    index, at = where
    poisoned[index][at] = bad  # a bias or scalar does not enter G, but the step is skipped all the same
    with np.errstate(over="ignore", invalid="ignore"):  # NumPy warns of the overflow and inf * 0 it meets
        ps, state = update([backend.asarray(g) for g in poisoned], state, ps)
    for a, b in zip(ps, before):
        np.testing.assert_array_equal(backend.to_numpy(a), b)
    assert float(backend.to_numpy(state.eta)) == eta
    assert int(backend.to_numpy(state.count)) == 1 and int(backend.to_numpy(state.skipped)) == 1
    # ...and the next finite step is the reference's step from there.
    ps, state = update([backend.asarray(g) for g in grads[2]], state, ps)
    ref, _ = reference_step(before, grads[2], TORCH_AXES)
    assert max_deviation([[backend.to_numpy(p) for p in ps]], [ref]) <= 1e-12
    assert int(backend.to_numpy(state.count)) == 2


def test_nonfinite_propagates_when_not_skipped(backend):
    params, grads = make_problem(10)
    opt = agd(skip_nonfinite=False)
    ps = [backend.asarray(p) for p in params]
    poisoned = [g.copy() for g in grads[0]]
    poisoned[1][0, 0] = np.nan
    new, state = opt.update([backend.asarray(g) for g in poisoned], opt.init(ps), ps)
    assert math.isnan(float(backend.to_numpy(state.eta)))
    assert np.isnan(backend.to_numpy(new[1])).all()


# ----------------------------------------------------------------------------------------------------------------
# Initialisation.


def singular_values(x, axes):
    moved = np.moveaxis(np.asarray(x, np.float64), axes, (-2, -1))
    return np.linalg.svd(moved.reshape((-1,) + moved.shape[-2:]), compute_uv=False)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_init_singular_values_are_sv(backend, dtype):
    shapes = [(6, 5), (6,), (4, 6, 3, 3), (5, 9), (2, 3, 5), (7, 1), (1, 7)]
    params = [backend.asarray(np.ones(s, dtype)) for s in shapes]
    new = agd_init(params, seed=3)
    tol = 1e-12 if dtype == "float64" else 1e-6
    for p, q, s in zip(params, new, shapes):
        assert q.dtype == p.dtype and tuple(q.shape) == s
        if len(s) < 2:
            assert q is p  # not a weight: returned as it is
            continue
        sv = math.sqrt(s[0] / s[1]) / math.sqrt(math.prod(s[2:]))
        values = singular_values(backend.to_numpy(q), (0, 1))
        assert values.shape[-1] == min(s[0], s[1])
        np.testing.assert_allclose(values, sv, rtol=tol)


def test_init_is_the_same_on_every_backend_and_layout(backend):
    shapes = [(6, 5), (6,), (4, 6, 3, 3), (5, 9)]
    expected = agd_init([np.zeros(s) for s in shapes], seed=11)
    got = agd_init([backend.asarray(np.zeros(s)) for s in shapes], seed=11)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(backend.to_numpy(a), b)
    flax = agd_init([backend.asarray(to_flax(np.zeros(s))) for s in shapes], seed=11, layout="flax")
    for a, b in zip(flax, expected):
        np.testing.assert_array_equal(backend.to_numpy(a), to_flax(b))
    other = agd_init([np.zeros(s) for s in shapes], seed=12)
    assert not np.allclose(other[0], expected[0])


def test_init_draws_are_haar_like():
    # Averaged over many draws a Haar orthogonal matrix has mean zero: the sign fix is in place.
    mean = np.mean([agd_init([np.zeros((3, 3))], seed=s)[0] for s in range(2000)], axis=0)
    assert np.max(np.abs(mean)) < 0.05


# ----------------------------------------------------------------------------------------------------------------
# Layouts, attachments, arguments.


def test_weight_axes_forms():
    shapes = [(3, 4), (5,), (2, 3, 4, 5), ()]
    assert weight_axes(shapes) == ((0, 1), None, (0, 1), None)
    assert weight_axes(shapes, "flax") == ((1, 0), None, (3, 2), None)
    assert weight_axes(shapes, (1, 0)) == ((1, 0), None, (1, 0), None)
    assert weight_axes(shapes, [(-1, 0), None, "flax", None]) == ((1, 0), None, (3, 2), None)
    assert weight_axes(shapes, lambda s: (1, 0) if len(s) == 4 else "torch") == ((0, 1), None, (1, 0), None)


def test_empty_weight_does_not_move_or_break(backend):
    shapes = [(0, 4), (3, 4), (4, 0)]
    params = [backend.asarray(np.ones(s)) for s in shapes]
    grads = [backend.asarray(np.ones(s)) for s in shapes]
    opt = agd()
    new, state = opt.update(grads, opt.init(params), params)
    # Only the (3, 4) weight has a gradient: G = sv / L with L = 3.
    sv = math.sqrt(3 / 4)
    eta = math.log((1 + math.sqrt(1 + 4 * sv * math.sqrt(12) / 3)) / 2)
    np.testing.assert_allclose(float(backend.to_numpy(state.eta)), eta, rtol=1e-13)
    assert [tuple(p.shape) for p in new] == shapes
    assert [tuple(p.shape) for p in agd_init(params)] == shapes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(gain=-0.1), r"gain must be a finite number in \[0.0, inf\], got -0.1"),
        (dict(gain=math.nan), r"gain must be a finite number in \[0.0, inf\], got nan"),
        (dict(gain=math.inf), r"gain must be a finite number in \[0.0, inf\], got inf"),
    ],
)
def test_bad_gain(kwargs, message):
    with pytest.raises(ValueError, match=message):
        agd(**kwargs)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(layout="jax"), ValueError, r"layout for params\[0\] must be one of \['flax', 'torch'\], got 'jax'"),
        (dict(layout=(0, 0)), ValueError, r"layout \(0, 0\) for params\[0\] of shape \(3, 4\) needs two distinct"),
        (dict(layout=(0, 2)), ValueError, r"layout \(0, 2\) for params\[0\] of shape \(3, 4\) needs two distinct"),
        (dict(layout=[(0, 1)]), ValueError, r"layout has 1 entries but there are 2 parameters"),
        (dict(layout=[(0.0, 1), None]), TypeError, r"layout for params\[0\] must be 'torch', 'flax', \(out_axis"),
        (dict(layout=None), ValueError, r"AGD needs at least one weight tensor"),
        (dict(attach=[None, 1]), ValueError, r"attach\[1\] must be the index of a weight tensor, got 1"),
        (dict(attach=[1, None]), ValueError, r"params\[0\] is a weight: attach\[0\] must be None or 0, got 1"),
        (dict(attach=[None]), ValueError, r"attach has 1 entries but there are 2 parameters"),
    ],
)
def test_bad_layout_and_attach(backend, options, error, message):
    params = [backend.asarray(np.ones((3, 4))), backend.asarray(np.ones(3))]
    with pytest.raises(error, match=message):
        agd(**options).init(params)


def test_state_of_another_optimizer_is_refused(backend):
    import nero_core

    params = [backend.asarray(np.ones((3, 4)))]
    state = nero_core.nero().init(params)
    with pytest.raises(TypeError, match=r"state must be an AGDState \(from agd\(...\).init\), got NeroState"):
        agd().update([backend.asarray(np.ones((3, 4)))], state, params)


def test_state_fields():
    state = agd().init([np.ones((3, 4))])
    assert isinstance(state, AGDState) and state._fields == ("eta", "count", "skipped")
    assert float(state.eta) == 0.0 and state.eta.dtype == np.float64
