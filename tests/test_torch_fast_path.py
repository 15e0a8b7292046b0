"""nero_torch's fast paths against the core rule (``foreach=False`` calls nero_core.nero on the tensors).

Each model trains for 50 steps from the same start on the same batches; after every step the parameters of
the fast path must stay within 1e-6 (float32) / 1e-12 (float64) of the reference path's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nero_torch

STEPS = 50
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16, context: int = 8) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        # No biases: the key bias has an exactly-zero gradient (softmax ignores it), whose rounding noise
        # Nero's normalised step would turn into O(lr) moves that differ between any two exact implementations.
        self.block = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True, bias=False
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.norm(self.block(h)) @ self.tok.weight.T  # tied head


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5))


def cnn() -> nn.Module:
    # No bias before BatchNorm: its gradient is rounding noise, which Nero's normalised step would amplify.
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.ConvTranspose2d(6, 4, 2, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 12 * 12, 5),
    )


MODELS = {
    "mlp": (mlp, lambda g: torch.randn(16, 12, generator=g), 5),
    "cnn": (cnn, lambda g: torch.randn(8, 3, 8, 8, generator=g), 5),
    "transformer": (TinyTransformer, lambda g: torch.randint(0, 32, (4, 8), generator=g), 32),
}


def train(name: str, dtype: torch.dtype, steps: int = STEPS, **options) -> list[list[torch.Tensor]]:
    make, inputs, classes = MODELS[name]
    torch.manual_seed(0)
    model = make().to(dtype)
    opt = nero_torch.Nero(nero_torch.param_groups(model), **options)
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        x = inputs(gen)
        x = x.to(dtype) if x.is_floating_point() else x
        out = model(x).reshape(-1, classes)
        target = torch.randint(0, classes, (out.shape[0],), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(out, target).backward()
        opt.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def max_deviation(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> float:
    return max((x - y).abs().max().item() for step_a, step_b in zip(a, b) for x, y in zip(step_a, step_b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model", list(MODELS))
def test_fast_path_matches_core_rule(model, dtype):
    # fused=False: torch's kernels (the default takes the C kernel on CPU where it builds, tested below)
    assert max_deviation(train(model, dtype, fused=False), train(model, dtype, foreach=False)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_default_takes_the_c_kernel_on_cpu_where_it_builds(model, native_calls):
    got = train(model, torch.float64)
    assert len(native_calls) == STEPS - 1  # every step after the first (the core rule's projection)
    assert max_deviation(got, train(model, torch.float64, foreach=False)) <= TOLERANCE[torch.float64]


def test_default_without_a_compiler_takes_the_prebuilt_kernel_without_a_warning(monkeypatch, tmp_path, recwarn,
                                                                               native_calls):
    """What a machine without build tools runs: the wheel's prebuilt C kernel (setup.py), the same maths."""
    from nero_torch import _native

    if _native.prebuilt() is None:
        pytest.skip("no prebuilt kernel here (setup.py builds it on x86-64 Linux with a C compiler, for AVX2)")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("NERO_KERNEL_CACHE", str(tmp_path))
    _native.built.cache_clear()
    try:
        assert _native.built() is _native.prebuilt()
        got = train("mlp", torch.float64)
    finally:
        _native.built.cache_clear()
    assert len(native_calls) == STEPS - 1
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert not list(tmp_path.iterdir())  # nothing was built
    assert max_deviation(got, train("mlp", torch.float64, foreach=False)) <= TOLERANCE[torch.float64]


def test_default_without_a_compiler_takes_torch_kernels_without_a_warning(monkeypatch, tmp_path, recwarn):
    """The same without a prebuilt kernel (a wheel built without a compiler, or a CPU without AVX2)."""
    from nero_torch import _native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("NERO_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "prebuilt", lambda: None)
    monkeypatch.setattr(_native, "apply", lambda *a, **k: pytest.fail("the C kernel ran"))
    _native.built.cache_clear()
    try:
        got = train("mlp", torch.float64)
    finally:
        _native.built.cache_clear()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert max_deviation(got, train("mlp", torch.float64, foreach=False)) <= TOLERANCE[torch.float64]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_compiled_kernel_matches_core_rule(dtype):
    assert max_deviation(train("cnn", dtype, fused=True), train("cnn", dtype, foreach=False)) <= TOLERANCE[dtype]


@pytest.fixture
def native_calls(monkeypatch):
    """How many steps the C kernel of ``fused=True`` took (skipped where no C compiler can build it)."""
    from nero_torch import _native
    from test_torch_native import c_kernel

    c_kernel()
    calls = []
    apply = _native.apply
    monkeypatch.setattr(_native, "apply", lambda *a, **k: calls.append(1) or apply(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_native_cpu_kernel_matches_core_rule(model, dtype, native_calls):
    assert max_deviation(train(model, dtype, fused=True), train(model, dtype, foreach=False)) <= TOLERANCE[dtype]
    assert len(native_calls) == STEPS - 1  # every step after the first (the core rule's projection)


@pytest.mark.parametrize("options", [dict(centre=False), dict(normalise=False), dict(centre=False, normalise=False),
                                     dict(maximize=True), dict(lr=torch.tensor(0.03), beta=0.9)])
def test_native_cpu_kernel_options(options, native_calls):
    expected = train("mlp", torch.float64, foreach=False, **options)
    assert max_deviation(train("mlp", torch.float64, fused=True, **options), expected) <= TOLERANCE[torch.float64]
    assert native_calls


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 3e30])  # 3e30: its square overflows
def test_native_cpu_kernel_skips_a_nonfinite_step_whole(bad, native_calls):
    torch.manual_seed(0)
    model = mlp()
    opt = nero_torch.Nero(model.parameters(), fused=True)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: t.clone() for n, t in s.items()} for k, s in enumerate(opt.state.values())}
    model[2].weight.grad[3, 5] = bad  # one entry of one gradient; the others are fine
    opt.step()
    assert opt.skipped_steps == 1 and len(native_calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for k, s in enumerate(opt.state.values()):
        assert all(torch.equal(state[k][n], t) for n, t in s.items())


def test_without_a_compiler_fused_takes_the_prebuilt_kernel(monkeypatch, tmp_path, recwarn):
    from nero_torch import _native

    if _native.prebuilt() is None:
        pytest.skip("no prebuilt kernel here (setup.py builds it on x86-64 Linux with a C compiler, for AVX2)")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("NERO_KERNEL_CACHE", str(tmp_path))
    _native.library.cache_clear()
    _native.built.cache_clear()
    try:
        assert _native.library() is _native.prebuilt()
    finally:
        _native.library.cache_clear()
        _native.built.cache_clear()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_without_a_compiler_fused_falls_back_to_torch_kernels(monkeypatch, tmp_path):
    """Without a prebuilt kernel either: the torch kernels, with one warning."""
    from nero_torch import _native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("NERO_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "prebuilt", lambda: None)
    _native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"Nero\(fused=True\): could not build the CPU kernel"):
            assert _native.library() is None
        monkeypatch.setattr(_native, "apply", lambda *a, **k: pytest.fail("the C kernel ran"))
        got = train("mlp", torch.float64, fused=True)  # the compiled torch kernels instead
    finally:
        _native.library.cache_clear()
    assert max_deviation(got, train("mlp", torch.float64, foreach=False)) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("foreach", [False, None])
def test_bfloat16_parameters_keep_float32_state_and_track_float32(foreach):
    torch.manual_seed(0)
    model = mlp()
    low = mlp().to(torch.bfloat16)
    low.load_state_dict(model.state_dict())
    opts = [nero_torch.Nero(m.parameters(), foreach=foreach) for m in (model, low)]
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    for _ in range(10):
        for m, opt in zip((model, low), opts):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x.to(m[0].weight.dtype)).float(), y).backward()
            opt.step()
    assert all(s["v"].dtype == torch.float32 and s["sigma"].dtype == torch.float32 for s in opts[1].state.values())
    for p, q in zip(model.parameters(), low.parameters()):
        assert q.dtype == torch.bfloat16
        torch.testing.assert_close(q.float(), p, atol=0.05, rtol=0.05)


def test_maximize_ascends_exactly_as_minimizing_the_negative():
    def run(maximize: bool, foreach):
        torch.manual_seed(0)
        model = mlp()
        fast = dict(fused=True) if foreach == "fused" else dict(foreach=foreach)
        opt = nero_torch.Nero(model.parameters(), maximize=maximize, **fast)
        x = torch.randn(16, 12)
        for _ in range(5):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            (-loss if maximize else loss).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    for foreach in (False, None, "fused"):
        for a, b in zip(run(True, foreach), run(False, foreach)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fast", [dict(fused=False), dict(fused=True)], ids=["torch-kernels", "fused"])
def test_fast_paths_stay_finite_when_a_row_s_v_is_subnormal(fast):
    """A dead neuron in a deep net: one gradient of 1e-21 leaves that row's v at a float32 subnormal (~1e-45), so
    later steps' ``c = lr/sqrt(v_hat)`` is ~1e20, whose square is past float32's range although the row's gradient
    is 0. Subnormals carry a few bits, so the paths agree only roughly there; the other rows agree to 1e-6."""
    def run(**options):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4, 6))
        opt = nero_torch.Nero([weight], **options)
        gen = torch.Generator().manual_seed(1)
        for step in range(12):
            weight.grad = torch.randn(4, 6, generator=gen)
            weight.grad[0] = 0.0
            if step == 1:
                weight.grad[0, 0] = 1e-21
            opt.step()
        assert opt.skipped_steps == 0
        return weight.detach().clone(), opt.state[weight]["v"].clone()

    (got, v), (expected, _) = run(**fast), run(foreach=False)
    assert 0 < v[0] < 1e-40 and torch.isfinite(got).all()
    torch.testing.assert_close(got.norm(dim=1), torch.ones(4))
    assert got.mean(dim=1).abs().max() < 1e-6
    assert (got[1:] - expected[1:]).abs().max().item() <= 1e-6
    assert (got[0] - expected[0]).abs().max().item() <= 1e-2


def test_foreach_false_stays_the_core_rule_even_with_fused(monkeypatch):
    from nero_torch import _native

    monkeypatch.setattr(_native, "apply", lambda *a, **k: pytest.fail("the C kernel ran for foreach=False"))
    got = train("mlp", torch.float64, fused=True, foreach=False)
    assert max_deviation(got, train("mlp", torch.float64, foreach=False)) == 0.0


def test_a_kernel_that_fails_to_load_falls_back(monkeypatch, tmp_path):
    import ctypes

    from nero_torch import _native

    def refuse(path, *args, **kwargs):
        raise OSError(f"{path}: file too short")

    monkeypatch.setenv("NERO_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(ctypes, "CDLL", refuse)
    monkeypatch.setattr(_native, "prebuilt", lambda: None)  # (it would load in its place)
    _native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"could not load the CPU kernel .*file too short.*torch kernels"):
            assert _native.library() is None
    finally:
        _native.library.cache_clear()


def test_native_one_pass_equals_the_two_pass_kernel_bit_for_bit(native_calls):
    """``skip_nonfinite="neuron"`` runs the one-pass kernel: with finite gradients, exactly the two-pass step."""
    for model in ("mlp", "transformer"):
        for dtype in (torch.float32, torch.float64):
            one_pass = train(model, dtype, fused=True, skip_nonfinite="neuron")
            assert max_deviation(one_pass, train(model, dtype, fused=True)) == 0.0
            assert max_deviation(one_pass, train(model, dtype, foreach=False)) <= TOLERANCE[dtype]


# A neuron row, a bias element, a row of a 3-D tensor: each made non-finite at some steps, the first included.
NONFINITE_SHAPES = [(6, 5), (7,), (4, 3, 3)]
NONFINITE_AT = {0: [(0, (1, 2)), (1, (3,))], 3: [(2, (2, 0, 1)), (0, (5, 4))], 4: [(1, (0,)), (1, (6,))]}


def run_with_nonfinite(bad: float, steps: int = 8, **options):
    """Parameters after every step, and the optimizer, for random gradients with NaN/Inf at NONFINITE_AT."""
    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in NONFINITE_SHAPES]
    opt = nero_torch.Nero(params, skip_nonfinite="neuron", **options)
    history = []
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        for tensor, index in NONFINITE_AT.get(step, []):
            params[tensor].grad[index] = bad
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e200])  # 1e200: its square overflows
def test_skip_nonfinite_neuron_holds_back_only_those_neurons_on_every_path(bad, native_calls, monkeypatch):
    import numpy as np

    import nero_core
    from nero_torch import _native

    one_pass = []
    kernel = _native.step
    monkeypatch.setattr(_native, "step", lambda *a: one_pass.append(1) or kernel(*a))

    gen = torch.Generator().manual_seed(3)  # the core rule on NumPy arrays, fed the same gradients
    rule = nero_core.nero(skip_nonfinite="neuron")
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).numpy() for s in NONFINITE_SHAPES]
    state, expected = rule.init(ps), []
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(8):
            gs = [torch.randn(s, generator=gen, dtype=torch.float64).numpy() for s in NONFINITE_SHAPES]
            for tensor, index in NONFINITE_AT.get(step, []):
                gs[tensor][index] = bad
            ps, state = rule.update(gs, state, ps)
            expected.append([torch.from_numpy(p) for p in ps])
    for options in (dict(fused=True), dict(fused=False), dict(foreach=False)):  # C kernel, torch's, the core rule
        history, opt = run_with_nonfinite(bad, **options)
        assert max_deviation(history, expected) <= TOLERANCE[torch.float64], options
        assert opt.skipped_steps == int(state.skipped) == 3
        assert all(float(s["step"]) == 8 for s in opt.state.values())
        assert all(torch.isfinite(p).all() for step in history for p in step)
        assert torch.equal(history[3][2][2], history[2][2][2])  # held back at step 3: row 2 of the 3-D tensor
        assert not torch.equal(history[3][2][1], history[2][2][1])  # while its other rows moved
    assert len(native_calls) == 0 and len(one_pass) == 7  # fused: the one-pass kernel after the first step


def test_skip_nonfinite_takes_step_or_neuron():
    params = [nn.Parameter(torch.randn(3, 4))]
    with pytest.raises(ValueError, match=r"^Nero\(skip_nonfinite=False\) is not offered: a step never writes NaN or "
                                         r"Inf; skip_nonfinite='neuron' holds back only the neurons concerned, in one "
                                         r"pass$"):
        nero_torch.Nero(params, skip_nonfinite=False)
    with pytest.raises(ValueError, match=r"^skip_nonfinite must be True, False, 'step' or 'neuron', got 'row'$"):
        nero_torch.Nero(params, skip_nonfinite="row")


# ---- where the fast path's closed form is weak, and heads that learn ----------------------------------------------


def test_fast_path_step_that_nearly_cancels_a_row_matches_reference():
    """A gradient along the row and lr = 1 - 1e-4: the step leaves 1e-4 of each row, whose norm from the old row's
    sums cancels eight digits; the fast path balances the actual rows instead."""
    from reference import ReferenceNero

    gen = torch.Generator().manual_seed(3)
    layer = nn.Linear(16, 6, bias=False).double()
    opt = nero_torch.Nero(layer.parameters(), lr=1 - 1e-4, fused=False)  # (the C kernel: test_torch_native.py)
    first = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    first /= first.norm(dim=1, keepdim=True)  # |g| = 1 at both steps: the second step is then exactly lr long
    ref = ReferenceNero([(6, 16)], [0], lr=1 - 1e-4)
    expected = [layer.weight.detach().numpy().copy()]
    for step in range(2):
        grad = first if step == 0 else layer.weight.detach().clone()
        expected = ref.step(expected, [grad.numpy()])
        layer.weight.grad = grad
        opt.step()
    assert opt.state[layer.weight]["step"].item() == 2  # the second step took the fast path
    # One rounding of c (1e-16) is amplified by |w| / |w - c g| = 1e4 in any implementation (2e-12 here); the
    # closed form from the old row's sums would be off by about 1e-8.
    assert (layer.weight.detach() - torch.from_numpy(expected[0])).abs().max().item() <= 1e-10


def test_fast_path_row_norms_stay_at_rounding():
    """The fast path reads the old rows' sums at every step (assumed balanced, float32 rows random-walk away from
    unit norm); over 10k steps its worst row norm stays within rounding of 1, as the core rule's does (3e-7 in
    tests/test_optax_nero.py's 100k steps)."""
    gen = torch.Generator().manual_seed(4)
    layer = nn.Linear(8, 16, bias=False)
    opt = nero_torch.Nero(layer.parameters(), lr=0.01, fused=False)
    worst = 0.0
    for _ in range(10_000):
        layer.weight.grad = torch.randn(16, 8, generator=gen)
        opt.step()
        worst = max(worst, (layer.weight.detach().norm(dim=1) - 1).abs().max().item())
    assert worst <= 1e-6


def test_zero_initialised_unconstrained_head_gets_a_unit_row_scale():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    opt = nero_torch.Nero(nero_torch.param_groups(model, unconstrained=["2"]))
    model(torch.randn(5, 6)).pow(2).sum().backward()
    model[2].weight.grad += 1  # (a zero head's own gradient is zero until the layer before it moves)
    opt.step()
    assert opt.state[model[2].weight]["sigma"].item() == 1.0
    assert opt.state[model[2].bias]["sigma"].item() == pytest.approx(0.01)
