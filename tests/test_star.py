"""The array-API STAR rule on every backend: against an independent float64 NumPy transcription of docs/design.md, the
AdamAggMo identity, the shipped meta-parameters, and its state handling."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from nero_core._star import StarState, load_star_config, load_star_params, star

# 2-D, 1-D, 0-D, a size-1 axis, tied axes (zero-initialised), 3-D, empty. Few tensors: each is compiled under jax.
SHAPES = [(6, 5), (7,), (), (5, 1), (4, 4), (3, 2, 4), (0, 4)]
ZERO_INIT = {4}
STEPS = 4
BETAS = (0.9, 0.99, 0.999)


def random_meta(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = (39, 4, 4, 4)
    meta = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        meta[f"w{i}"] = rng.normal(size=(a, b)) * scale / math.sqrt(a)
        meta[f"b{i}"] = rng.normal(size=(b,)) * 0.1
    meta["w3"] = meta["w3"] * 300  # make mu, nu, rho (scaled by 1e-3) matter
    return meta


def make_problem(seed: int, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = [np.zeros(s) if i in ZERO_INIT else rng.normal(size=s) for i, s in enumerate(SHAPES)]
    grads = [[rng.normal(size=s) * rng.uniform(0.01, 3) for s in SHAPES] for _ in range(STEPS)]
    return [p.astype(dtype) for p in params], [[g.astype(dtype) for g in gs] for gs in grads]


# ---------------------------------------------------------------- the float64 transcription, tensor by tensor


def largest_two(shape):
    """(second largest axis, largest axis); ties go to the later axis."""
    order = np.argsort(np.asarray(shape), kind="stable")
    return int(order[-2]), int(order[-1])


class ReferenceStar:
    def __init__(self, shapes, meta, step_mult, nominal, wd):
        self.meta, self.step_mult, self.nominal, self.wd = meta, step_mult, nominal, wd
        self.t = 0
        self.m = [np.zeros((3, *s)) for s in shapes]
        self.v = [np.zeros(s) for s in shapes]
        self.row = [None] * len(shapes)
        self.col = [None] * len(shapes)

    def mlp(self, x):
        relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
        h = relu(x @ self.meta["w1"] + self.meta["b1"])
        h = relu(h @ self.meta["w2"] + self.meta["b2"])
        return h @ self.meta["w3"] + self.meta["b3"]

    def features(self, i, p, g):
        m, v = self.m[i], self.v[i]
        g2 = g * g + 1e-30
        chans_y, chans_row, chans_col, chans_mom = [], [], [], []
        for k, beta in enumerate(BETAS):
            if p.ndim <= 1:
                full = self.row[i][k] = beta * self.row[i][k] + (1 - beta) * g2 if self.row[i] is not None else None
                chans_y.append(g / np.sqrt(np.maximum(full + 1e-9, 1e-9)))
                chans_row.append(full)
                chans_col.append(full)
                chans_mom.append(m[k] / np.sqrt(full + 1e-6))
                continue
            d1, d0 = largest_two(p.shape)
            r = self.row[i][k] = beta * self.row[i][k] + (1 - beta) * g2.mean(axis=d0)
            c = self.col[i][k] = beta * self.col[i][k] + (1 - beta) * g2.mean(axis=d1)
            r_wide, c_wide = np.expand_dims(r, d0), np.expand_dims(c, d1)
            # The mean of the row accumulator over axis d1, broadcast back to the full shape.
            r_mean = np.expand_dims(np.mean(r, axis=d1 if d1 < d0 else d1 - 1, keepdims=True), d0)
            rowfac = 1 / np.sqrt(np.maximum(r_wide / (r_mean + 1e-9), 1e-9))
            colfac = 1 / np.sqrt(np.maximum(c_wide, 1e-9))
            chans_y.append(g * rowfac * colfac)
            chans_row.append(np.broadcast_to(r_wide, p.shape))
            chans_col.append(np.broadcast_to(c_wide, p.shape))
            chans_mom.append(m[k] * rowfac * colfac)
        rs = 1 / np.sqrt(v + 1e-6)
        chans = [g, p, m[0], m[1], m[2], v, m[0] * rs, m[1] * rs, m[2] * rs, rs] + chans_y + chans_row + chans_col
        chans += [1 / np.sqrt(r + 1e-8) for r in chans_row] + [1 / np.sqrt(c + 1e-8) for c in chans_col] + chans_mom
        assert len(chans) == 28
        cols = []
        for c in chans:
            c = np.broadcast_to(c, p.shape).reshape(-1)
            cols.append(c / math.sqrt(float(np.mean(c * c)) + 1e-5))
        taus = [1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5]
        for tau in taus:
            cols.append(np.full(p.size, math.tanh(self.t / tau - 1)))
        return np.stack(cols, axis=1)

    def step(self, params, grads):
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
            if p.size == 0:
                out.append(p)
                continue
            if self.row[i] is None:
                if p.ndim <= 1:
                    self.row[i] = np.zeros((3, *p.shape))
                else:
                    d1, d0 = largest_two(p.shape)
                    self.row[i] = np.zeros((3, *np.delete(p.shape, d0)))
                    self.col[i] = np.zeros((3, *np.delete(p.shape, d1)))
            for k, beta in enumerate(BETAS):
                self.m[i][k] = beta * self.m[i][k] + (1 - beta) * g
            self.v[i] = 0.999 * self.v[i] + 0.001 * g * g
            heads = self.mlp(self.features(i, p, g))
            d, mu, nu, rho = (heads[:, j].reshape(p.shape) for j in range(4))
            direction = self.m[i].mean(axis=0) / np.sqrt(self.v[i] + 1e-6)  # AdamAggMo's, per element
            scale = lambda a: np.exp(np.clip(1e-3 * a, -1.0, 1.0))  # noqa: E731
            s = self.step_mult * np.sqrt(np.mean(direction**2)) * np.tanh(d) * scale(mu)
            n = self.nominal * scale(nu) * direction
            r = 1 - self.wd * scale(rho)
            out.append(r * p - s - n)
        self.t += 1
        return out


def adam_aggmo(params, grads, lr, wd):
    """AdamAggMo without bias correction: ``p <- (1-wd) p - lr * mean_i(m_i) / sqrt(v + 1e-6)``."""
    ms = [np.zeros((3, *np.shape(p))) for p in params]
    vs = [np.zeros(np.shape(p)) for p in params]
    ps, history = [np.asarray(p, np.float64) for p in params], []
    for gs in grads:
        for i, g in enumerate(gs):
            for k, beta in enumerate(BETAS):
                ms[i][k] = beta * ms[i][k] + (1 - beta) * g
            vs[i] = 0.999 * vs[i] + 0.001 * g * g
            ps[i] = (1 - wd) * ps[i] - lr * ms[i].mean(axis=0) / np.sqrt(vs[i] + 1e-6)
        history.append([p.copy() for p in ps])
    return history


# ---------------------------------------------------------------- helpers


_COMPILED: dict[str, Any] = {}


def _update(meta, hyper, grads, state, params):
    return star(meta, **hyper).update(grads, state, params)


def run_backend(backend, params, grads, meta, **options):
    """Meta-parameters and hyperparameters travel as arrays, so one jit compilation serves every test of a dtype."""
    dtype = params[0].dtype
    update = _COMPILED.setdefault(backend.name, backend.jit(_update))
    meta = {k: backend.asarray(np.asarray(v, dtype)) for k, v in meta.items()}
    hyper = {k: backend.asarray(np.asarray(options.get(k, default), dtype))
             for k, default in (("step_mult", 1e-3), ("nominal_stepsize", 1e-3), ("weight_decay", 0.0))}
    ps = [backend.asarray(p) for p in params]
    state = star(meta).init(ps)
    history = []
    for gs in grads:
        ps, state = update(meta, hyper, [backend.asarray(g) for g in gs], state, ps)
        history.append([backend.to_numpy(p) for p in ps])
    return history, state


def run_reference(params, grads, meta, step_mult=1e-3, nominal_stepsize=1e-3, weight_decay=0.0):
    ref = ReferenceStar([p.shape for p in params], meta, step_mult, nominal_stepsize, weight_decay)
    ps, history = [np.asarray(p, np.float64) for p in params], []
    for gs in grads:
        ps = ref.step(ps, gs)
        history.append(ps)
    return history


def max_deviation(history, reference, relative=False):
    worst = 0.0
    for step_a, step_b in zip(history, reference):
        for a, b in zip(step_a, step_b):
            diff = np.abs(a.astype(np.float64) - b)
            if relative:
                diff = diff / (1 + np.abs(b))
            worst = max(worst, float(np.max(diff, initial=0.0)))
    return worst


OPTIONS = dict(step_mult=0.05, nominal_stepsize=0.01, weight_decay=0.01)


# ---------------------------------------------------------------- tests


def test_matches_float64_transcription(backend):
    params, grads = make_problem(1)
    meta = random_meta(0)
    history, state = run_backend(backend, params, grads, meta, **OPTIONS)
    reference = run_reference(params, grads, meta, **OPTIONS)
    assert max_deviation(history, reference) <= 1e-11
    # The learned step is a real part of the update here, not a rounding error on AdamAggMo.
    aggmo = adam_aggmo(params, grads, OPTIONS["nominal_stepsize"], OPTIONS["weight_decay"])
    assert max_deviation(history, aggmo) > 1e-3
    assert int(backend.to_numpy(state.count)) == STEPS


def test_matches_transcription_in_float32(backend):
    params, grads = make_problem(2, np.float32)
    params, grads = params[:4], [gs[:4] for gs in grads]  # 2-D, 1-D, 0-D, size-1 axis: fewer kernels to compile
    meta = random_meta(1)
    options = dict(OPTIONS, step_mult=1e-3)
    history, state = run_backend(backend, params, grads, meta, **options)
    assert all(h.dtype == np.float32 for h in history[-1])
    assert all(backend.to_numpy(m).dtype == np.float32 for m in state.m)
    assert max_deviation(history, run_reference(params, grads, meta, **options), relative=True) <= 1e-4


def test_blas_invalid_flag_on_finite_inputs_is_not_reported(backend, monkeypatch):
    # As tests/test_nero_core.py's test of the same name: OpenBLAS on some CPUs leaves the invalid-operation flag
    # set after a product of finite arrays (numpy#24067). Emulated by a NumPy operation that raises the flag.
    if backend.name not in ("numpy", "array_api_strict"):
        pytest.skip("only NumPy's arrays report the flag")
    import nero_core._star as star_module

    moments = star_module._moments

    def flagging_moments(*args):
        np.sqrt(np.float32(-1.0))
        return moments(*args)

    monkeypatch.setattr(star_module, "_moments", flagging_moments)
    params, grads = make_problem(2, np.float32)
    meta = random_meta(1)
    options = dict(OPTIONS, step_mult=1e-3)
    history, _ = run_backend(backend, params, grads, meta, **options)  # pyproject makes a RuntimeWarning an error
    assert max_deviation(history, run_reference(params, grads, meta, **options), relative=True) <= 1e-4


def zero_output(meta):
    meta = dict(meta)
    meta["w3"] = np.zeros_like(meta["w3"])
    meta["b3"] = np.zeros_like(meta["b3"])
    return meta


def test_zero_output_layer_is_adam_aggmo(backend):
    params, grads = make_problem(3)
    history, _ = run_backend(backend, params, grads, zero_output(random_meta(2)), step_mult=0.1,
                             nominal_stepsize=0.01, weight_decay=0.02)
    assert max_deviation(history, adam_aggmo(params, grads, 0.01, 0.02)) <= 1e-14


def test_zero_step_mult_is_adam_aggmo(backend):
    meta = random_meta(3)
    meta["w3"][:, 2:] = 0.0  # nu and rho off; d and mu stay, but step_mult silences them
    meta["b3"][2:] = 0.0
    params, grads = make_problem(4)
    history, _ = run_backend(backend, params, grads, meta, step_mult=0.0, nominal_stepsize=0.01)
    assert max_deviation(history, adam_aggmo(params, grads, 0.01, 0.0)) <= 1e-14


@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_blocks_match_the_transcription(backend, block_size):
    """Blocks of axis 0 (one row, a few rows, rows that do not divide the axis) give the whole tensor's numbers."""
    if backend.name.startswith("jax"):
        pytest.skip("blocks are for eager backends; under jit each tensor runs whole")
    params, grads = make_problem(1)
    meta = random_meta(0)
    opt = star(meta, block_size=block_size, **OPTIONS)
    ps = [backend.asarray(p) for p in params]
    state = opt.init(ps)
    history = []
    for gs in grads:
        ps, state = opt.update([backend.asarray(g) for g in gs], state, ps)
        history.append([backend.to_numpy(p) for p in ps])
    assert max_deviation(history, run_reference(params, grads, meta, **OPTIONS)) <= 1e-11


def test_learned_step_is_bounded_by_the_nominal_one():
    """Per tensor, rms(learned step) <= e**2 * step_mult / nominal_stepsize * rms(nominal step), whatever the MLP
    says and however small the gradients (where rsqrt(v + 1e-6) is about 1000 and an unbounded learned term swamps
    the nominal one)."""
    meta = random_meta(4)
    meta["w3"] = meta["w3"] * 1e4  # outputs in the thousands: tanh saturates, the log-scales reach their clip
    params, grads = make_problem(6)
    grads = [[g * 1e-5 for g in gs] for gs in grads]
    full, nominal_only = star(meta), star(meta, step_mult=0.0)
    state = full.init(params)
    for gs in grads:
        with_learned, next_state = full.update(gs, state, params)
        without, _ = nominal_only.update(gs, state, params)
        for p, a, b in zip(params, with_learned, without):
            if p.size:
                learned, nominal = np.sqrt(np.mean((b - a) ** 2)), np.sqrt(np.mean((p - b) ** 2))
                assert learned <= math.e**2 * nominal * (1 + 1e-9)
        params, state = with_learned, next_state


def test_state_shapes():
    opt = star(random_meta(0))
    state = opt.init([np.zeros(s) for s in [(6, 5), (4, 3, 3, 3), (7,), (), (4, 4)]])
    assert isinstance(state, StarState)
    assert [m.shape for m in state.m] == [(3, 6, 5), (3, 4, 3, 3, 3), (3, 7), (3,), (3, 4, 4)]
    # Rows average over the largest axis, columns over the second largest (ties: the later axis is larger).
    assert [r.shape for r in state.fac_row] == [(3, 5), (3, 3, 3, 3), (3, 7), (3,), (3, 4)]
    assert [c.shape for c in state.fac_col] == [(3, 6), (3, 4, 3, 3), (3, 0), (3, 0), (3, 4)]


def test_nonfinite_gradient_is_skipped(backend):
    params, grads = make_problem(5)
    grads = grads[:3]
    grads[1] = [g.copy() for g in grads[1]]
    grads[1][1][0] = np.nan
    history, state = run_backend(backend, params, grads, random_meta(0))
    for a, b in zip(history[0], history[1]):
        np.testing.assert_array_equal(a, b)
    # The skipped step leaves the state as it was: the third step equals a two-step run without it.
    clean, _ = run_backend(backend, params, [grads[0], grads[2]], random_meta(0))
    assert max_deviation([history[2]], [[c.astype(np.float64) for c in clean[1]]]) == 0.0
    assert int(backend.to_numpy(state.count)) == 2
    assert int(backend.to_numpy(state.skipped)) == 1


def test_half_precision_keeps_float32_state(backend):
    if not backend.has_bfloat16:
        pytest.skip("no bfloat16")
    xp = backend.xp
    p = xp.astype(backend.asarray(np.ones((4, 3), np.float32)), xp.bfloat16)
    g = xp.astype(backend.asarray(np.full((4, 3), 0.5, np.float32)), xp.bfloat16)
    opt = star(random_meta(0))
    state = opt.init([p])
    (new,), state = backend.jit(opt.update)([g], state, [p])
    assert new.dtype == xp.bfloat16
    assert state.v[0].dtype == xp.float32 and state.m[0].dtype == xp.float32
    assert np.all(np.isfinite(backend.to_numpy(xp.astype(new, xp.float32))))


def test_shipped_meta_parameters_load():
    meta = load_star_params()
    assert {k: v.shape for k, v in meta.items()} == {
        "w1": (39, 4), "b1": (4,), "w2": (4, 4), "b2": (4,), "w3": (4, 4), "b3": (4,)}
    assert all(np.all(np.isfinite(v)) for v in meta.values())
    config = load_star_config()
    assert config["name"] == "star_v2" and config["label"] == "shipped"
    assert config["command"].startswith("python -m nero_optax.metatrain")
    for name in ("star_v1", "star_nonom_v1", "star_nonom_v2"):  # the previous set and the no-nominal baselines
        assert load_star_params(name)["w1"].shape == (39, 4)
    with pytest.raises(FileNotFoundError, match="no shipped STAR"):
        load_star_params("no_such_set")


def test_shipped_star_descends_on_a_quadratic():
    rng = np.random.default_rng(0)
    h = np.logspace(-2, 0, 50)
    x = rng.normal(size=50)
    opt = star()  # the shipped default, star_v2
    state = opt.init([x])
    start = 0.5 * np.sum(h * x * x)
    for _ in range(300):
        (x,), state = opt.update([h * x + 0.01 * rng.normal(size=50)], state, [x])
    assert np.all(np.isfinite(x)) and 0.5 * np.sum(h * x * x) < 0.5 * start


def test_bad_meta_parameters_are_rejected():
    meta = random_meta(0)
    meta["w2"] = np.zeros((5, 4))
    with pytest.raises(ValueError, match="w2"):
        star(meta)
    with pytest.raises(ValueError, match="missing"):
        star({"w1": np.zeros((39, 4))})
