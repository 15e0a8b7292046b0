"""The Triton kernels of ``Nero(fused=True)`` (``nero_torch/_triton.py``) in Triton's interpreter, on CPU tensors,
against the core rule: the models, options and tolerances of the C kernel's tests (``test_torch_fast_path.py``,
``test_torch_native.py``), the two-stage path for wide rows (forced with a small block), non-finite gradients under
both policies, float16/bfloat16 parameters, a tensor ``lr``, and the dispatch between the kernels.

Triton reads ``TRITON_INTERPRET=1`` where a kernel is defined (``@triton.jit``, triton.language's own included), so
it must be set before triton is imported: ``conftest.py`` sets it for the session where torch has no CUDA (CI);
elsewhere run ``TRITON_INTERPRET=1 pytest -k triton``, or these tests skip. The ``kernels`` fixture sends CPU tensors
to the kernels for one test. The interpreter runs every program in Python: shapes are tiny and runs a few steps
long. Every test here has "triton" in its name: ``pytest -k triton`` selects them all.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from torch import nn

import nero_torch
from nero_torch import _native, _optimizer
from reference import ReferenceNero
from test_torch_fast_path import TOLERANCE, max_deviation, run_with_nonfinite, train
from test_torch_fast_path import test_fast_paths_stay_finite_when_a_row_s_v_is_subnormal as stays_finite_at_subnormal_v
from test_torch_fast_path import test_maximize_ascends_exactly_as_minimizing_the_negative as maximize_ascends
from test_torch_native import CASES, crafted_rows, kernel_step, reference_step

try:  # the probe kernel below needs triton.language among its globals
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

STEPS = 5  # the first step is the core rule's (projection, sigma); the kernels take the other four


@pytest.fixture
def kernels(monkeypatch):
    """The Triton kernels in the interpreter, with ``Nero(fused=True)`` sending CPU tensors to them."""
    if triton is None:
        pytest.skip("triton is not installed")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.sum, InterpretedFunction):
        pytest.skip("Triton's interpreter is off: TRITON_INTERPRET=1 must be set before triton is imported "
                    "(tests/conftest.py sets it where torch has no CUDA)")
    monkeypatch.setattr(_optimizer, "_TRITON_ON_CPU", True)
    return importlib.import_module("nero_torch._triton")


@pytest.fixture
def triton_calls(kernels, monkeypatch) -> list[int]:
    """How many steps the Triton kernels took."""
    calls: list[int] = []
    step = kernels.step
    monkeypatch.setattr(kernels, "step", lambda *a, **k: calls.append(1) or step(*a, **k))
    return calls


# Rows in one block each, or (blocks of WIDE elements) rows wider than WIDE in chunks of it: the two-stage path.
WIDE = 32
BLOCKS = pytest.mark.parametrize("max_block", [None, WIDE], indirect=True, ids=["one-block", "two-stage"])


@pytest.fixture
def max_block(request, kernels, monkeypatch) -> int | None:
    if request.param:
        monkeypatch.setattr(kernels, "MAX_BLOCK", request.param)
    return request.param


def interpreted_overflow():
    """NumPy's overflow and invalid-value warnings off: the interpreter computes in NumPy, and squares of non-finite
    or huge gradients overflow there as on a GPU (where nothing warns); the tests check what is written."""
    return np.errstate(over="ignore", invalid="ignore")


def random_run(shapes, steps: int = 4, dtype=torch.float64, **options) -> tuple[list[list[torch.Tensor]], object]:
    """Parameters after every step of Nero on random parameters and gradients of ``shapes``, and the optimizer."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    opt = nero_torch.Nero(params, **options)
    history = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_triton_kernel_matches_core_rule(model, dtype, triton_calls):
    assert max_deviation(train(model, dtype, STEPS, fused=True), train(model, dtype, STEPS, foreach=False)) <= (
        TOLERANCE[dtype])
    assert len(triton_calls) == STEPS - 1


# Rows wider than WIDE (45, 40: two chunks and a tail), narrow rows beside them (6), a bias-like tensor.
MIXED = [(3, 5, 9), (2, 40), (4, 6), (5,)]


@pytest.mark.parametrize("max_block", [WIDE], indirect=True, ids=["two-stage"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_two_stage_path_matches_core_rule(dtype, max_block, triton_calls):
    got, _ = random_run(MIXED, dtype=dtype, fused=True)
    assert max_deviation(got, random_run(MIXED, dtype=dtype, foreach=False)[0]) <= TOLERANCE[dtype]
    assert len(triton_calls) == 3


@pytest.mark.parametrize("options", [
    dict(centre=False), dict(normalise=False), dict(centre=False, normalise=False), dict(maximize=True),
    dict(lr=torch.tensor(0.03), beta=0.9), dict(lr=torch.tensor([[0.02]], dtype=torch.float64)),
    dict(lr=torch.tensor(0.02, dtype=torch.bfloat16)),
], ids=["no-centre", "no-normalise", "neither", "maximize", "lr-f32-tensor", "lr-f64-tensor", "lr-bf16-tensor"])
def test_triton_kernel_options(options, triton_calls):
    """Each option against the core rule; a tensor lr is read by the kernels from the tensor's memory."""
    expected = train("mlp", torch.float64, 3, foreach=False, **options)
    assert max_deviation(train("mlp", torch.float64, 3, fused=True, **options), expected) <= TOLERANCE[torch.float64]
    assert len(triton_calls) == 2


def test_triton_kernel_reads_a_tensor_lr_where_it_lies_at_every_step(triton_calls):
    """An lr changed in place between steps (as a scheduler writing into a tensor does) is the one each step uses."""
    def run(**options):
        torch.manual_seed(0)
        weight = nn.Parameter(torch.randn(5, 9, dtype=torch.float64))
        lr = torch.tensor(0.05, dtype=torch.float64)
        opt = nero_torch.Nero([weight], lr=lr, **options)
        gen = torch.Generator().manual_seed(1)
        for step in range(4):
            weight.grad = torch.randn(5, 9, generator=gen, dtype=torch.float64)
            opt.step()
            lr.mul_(0.5)
        return [weight.detach()]

    assert max_deviation([run(fused=True)], [run(foreach=False)]) <= TOLERANCE[torch.float64]
    assert len(triton_calls) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("skip_nonfinite, max_block", [("step", None), ("neuron", None), ("step", WIDE)],
                         indirect=["max_block"], ids=["one-block", "one-block-neuron", "two-stage"])
def test_triton_kernel_on_rows_the_closed_form_cannot_trust(case, dtype, skip_nonfinite, max_block, triton_calls):
    """The C kernel's crafted rows (near-constant, large common offset, zero rows, tiny v, a step that cancels the
    row: ``test_torch_native.crafted_rows``), one steady-state step against the float64 reference, with the C
    kernel's tolerances (float32 near-constant rows to 1e-3: y's rounding, normalised by a spread of ~8e-3)."""
    w, g, v, lr = crafted_rows(case, dtype)
    got = kernel_step(w, g, v, dtype, lr=lr, skip_nonfinite=skip_nonfinite)[0].numpy()
    expected = reference_step(w, g, v, lr=lr)
    assert len(triton_calls) == 1
    tolerance = 1e-3 if dtype == torch.float32 and case == "near-constant" else {
        torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("options", [dict(centre=False), dict(normalise=False), dict(centre=False, normalise=False)])
@BLOCKS
def test_triton_kernel_on_crafted_rows_with_one_constraint_or_none(options, max_block, triton_calls):
    for case in CASES:
        w, g, v, lr = crafted_rows(case, torch.float64)
        got = kernel_step(w, g, v, torch.float64, lr=lr, **options)[0].numpy()
        np.testing.assert_allclose(got, reference_step(w, g, v, lr=lr, **options), rtol=0, atol=1e-12, err_msg=case)


@pytest.mark.parametrize("bad, at", [  # 3e30: its square overflows float32
    (float("nan"), (1, (1, 30))), (float("inf"), (2, (3, 5))), (3e30, (3, (4,))), (3e30, (0, (2, 4, 8))),
], ids=["nan-wide-row", "inf-narrow-row", "huge-bias", "huge-3d-row"])
@BLOCKS
def test_triton_kernel_skips_a_nonfinite_step_whole(bad, at, max_block, triton_calls):
    """One bad entry in one gradient: nothing changes (weights, v, sigma, step counts), and the step is counted,
    all decided on the device (the flag the writing launches read); the next step is taken."""
    history, opt = random_run(MIXED, steps=2, dtype=torch.float32, fused=True)
    params = [p for group in opt.param_groups for p in group["params"]]
    state = [{n: t.clone() for n, t in s.items()} for s in opt.state.values()]
    tensor, index = at
    params[tensor].grad[index] = bad
    with interpreted_overflow():
        opt.step()
    assert opt.skipped_steps == 1 and len(triton_calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(params, history[-1]))
    assert all(torch.equal(old[n], t) for old, s in zip(state, opt.state.values()) for n, t in s.items())
    params[tensor].grad[index] = 0.0
    opt.step()
    assert opt.skipped_steps == 1 and all(float(s["step"]) == 3 for s in opt.state.values())


@pytest.mark.parametrize("bad, max_block", [  # 1e200: its square overflows float64; a block of 4: every row in chunks
    (float("nan"), None), (-float("inf"), None), (1e200, None), (float("nan"), 4),
], indirect=["max_block"], ids=["nan", "-inf", "huge", "nan-two-stage"])
def test_triton_kernel_holds_back_only_nonfinite_neurons(bad, max_block, triton_calls):
    """``skip_nonfinite="neuron"``: a neuron row, a bias element and a row of a 3-D tensor made non-finite at some
    steps (``test_torch_fast_path.NONFINITE_AT``) keep their weights and v; the rest matches the core rule."""
    with interpreted_overflow():
        history, opt = run_with_nonfinite(bad, fused=True)
    expected, reference = run_with_nonfinite(bad, foreach=False)
    assert max_deviation(history, expected) <= TOLERANCE[torch.float64]
    assert opt.skipped_steps == reference.skipped_steps == 3
    assert all(float(s["step"]) == 8 for s in opt.state.values())
    assert all(torch.isfinite(p).all() for step in history for p in step)
    assert len(triton_calls) == 7


# Triton's interpreter converts float32 to bfloat16 by truncation (its GPU code rounds to nearest, as torch does):
# within one ulp of the exact value, 2**-7 relative, not half of one.
@pytest.mark.parametrize("dtype, rounding", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-11)])
@BLOCKS
def test_triton_kernel_on_half_parameters_rounds_the_float32_step(dtype, rounding, max_block, triton_calls):
    """float16/bfloat16 parameters with float32 state: each step of the kernel is the float64 reference's step from
    the same parameters, rounded once to the parameters' dtype (float16: within its unit roundoff)."""
    gen = torch.Generator().manual_seed(0)
    shapes = MIXED
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = nero_torch.Nero(params, fused=True)
    ref = ReferenceNero(shapes, [0] * len(shapes))
    for step in range(4):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(dtype)
        expected = ref.step([p.detach().double().numpy() for p in params], [p.grad.double().numpy() for p in params])
        opt.step()
        if step:  # the first step is the core rule's
            for p, e in zip(params, expected):
                assert p.dtype == dtype
                torch.testing.assert_close(p.detach().double(), torch.from_numpy(e), rtol=rounding, atol=1e-6)
    assert all(s["v"].dtype == torch.float32 and s["sigma"].dtype == torch.float32 for s in opt.state.values())
    assert len(triton_calls) == 3


def test_triton_kernel_stays_finite_when_a_row_s_v_is_subnormal(triton_calls):
    stays_finite_at_subnormal_v(dict(fused=True))  # test_torch_fast_path's test, on the Triton kernels
    assert triton_calls


def test_triton_kernel_maximize_ascends_exactly_as_minimizing_the_negative(triton_calls):
    maximize_ascends()  # test_torch_fast_path's test: its fused=True run takes the Triton kernels
    assert triton_calls


# ---- the dispatch -------------------------------------------------------------------------------------------------


def test_triton_dispatch_leaves_cpu_tensors_to_the_c_kernel(monkeypatch):
    """By default only CUDA tensors go to Triton (CPU ones to the C kernel, without importing Triton)."""
    from test_torch_native import c_kernel

    c_kernel()
    assert not _optimizer._TRITON_ON_CPU
    monkeypatch.setattr(_optimizer, "_triton_kernels", lambda: pytest.fail("the Triton kernels were asked for"))
    calls = []
    apply = _native.apply
    monkeypatch.setattr(_native, "apply", lambda *a, **k: calls.append(1) or apply(*a, **k))
    train("mlp", torch.float64, 3, fused=True)
    assert len(calls) == 2


def test_triton_dispatch_declines_what_the_kernels_do_not_read(triton_calls, monkeypatch):
    """A parameter the kernels cannot read as rows (here, not contiguous) sends the whole step to the torch
    kernels (eager here), the same maths."""
    monkeypatch.setattr(_native, "compiles", lambda device_type: False)
    monkeypatch.setattr(_native, "apply", lambda *a, **k: pytest.fail("the C kernel ran"))

    def run(**options):
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(9, 6, generator=gen, dtype=torch.float64).t()),  # (6, 9), not contiguous
                  nn.Parameter(torch.randn(4, 5, generator=gen, dtype=torch.float64))]
        opt = nero_torch.Nero(params, **options)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        return [[p.detach() for p in params]]

    assert max_deviation(run(fused=True), run(foreach=False)) <= TOLERANCE[torch.float64]
    assert not triton_calls


def test_triton_dispatch_without_triton_warns_once_and_falls_back(kernels, monkeypatch):
    """Where Triton cannot be imported, one warning names the cause and the fix, and the step runs on the other
    kernels."""
    from test_torch_native import c_kernel

    c_kernel()
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    monkeypatch.delitem(sys.modules, "nero_torch._triton")
    _optimizer._triton_imports.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"Nero\(fused=True\): Triton cannot be imported .*pip install triton"):
            got = train("mlp", torch.float64, 3, fused=True)
        train("mlp", torch.float64, 3, fused=True)  # no second warning (warnings are errors here)
    finally:
        _optimizer._triton_imports.cache_clear()
    assert max_deviation(got, train("mlp", torch.float64, 3, foreach=False)) <= TOLERANCE[torch.float64]


# ---- the per-row maths against nero_core's closed form ------------------------------------------------------------


def _row_terms_probe(sums, state, scalars, out, n, k, CENTRE: tl.constexpr, NORMALISE: tl.constexpr,
                     ROWS: tl.constexpr):
    """The kernels' per-row maths (``_new_v``, ``_step_size``, ``_row_terms``, ``_inverse_norm``) on given row
    sums: writes ``v``, ``c``, ``mean``, ``1/norm`` and whether the sums cancel, one row each."""
    rows = tl.arange(0, ROWS)
    live = rows < n
    sw = tl.load(sums + rows, mask=live, other=0.0)
    ww = tl.load(sums + n + rows, mask=live, other=0.0)
    sg = tl.load(sums + 2 * n + rows, mask=live, other=0.0)
    gg = tl.load(sums + 3 * n + rows, mask=live, other=0.0)
    wg = tl.load(sums + 4 * n + rows, mask=live, other=0.0)
    beta, scale_lr, correction = tl.load(scalars), tl.load(scalars + 1), tl.load(scalars + 2)
    dtype = state.dtype.element_ty
    v = kernels_under_test._new_v(tl.load(state + rows, mask=live, other=0.0), gg, beta.to(dtype),
                                  (1.0 - beta).to(dtype))
    c = kernels_under_test._step_size(v, scale_lr, correction).to(dtype)
    mean, spread, cancels = kernels_under_test._row_terms(sw, ww, wg, sg, gg, c, k, CENTRE, NORMALISE)
    scale = kernels_under_test._inverse_norm(spread, NORMALISE).to(dtype)
    for i, x in enumerate((v.to(tl.float64), c.to(tl.float64), mean, scale.to(tl.float64),
                           cancels.to(tl.float64))):
        tl.store(out + i * n + rows, x, mask=live)


kernels_under_test = None  # nero_torch._triton, set by the test (the probe reads it as a global)


def crafted_sums(case: str, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(sums, v, lr)``: the five sums (float64, of the rows as ``dtype`` holds them) of ``crafted_rows``, and a
    case of its own: a row whose gradients died out, its ``v`` a float32 subnormal."""
    if case == "subnormal v":
        w, g, v, lr = crafted_rows("zero rows", dtype)
        g[:3], v[:3] = 0.0, np.float32(1e-45) if dtype == torch.float32 else 1e-320
    else:
        w, g, v, lr = crafted_rows(case, dtype)
    w64, g64 = w.astype(np.float64), g.astype(np.float64)
    sums = np.stack([w64.sum(1), (w64 * w64).sum(1), g64.sum(1), (g64 * g64).sum(1), (w64 * g64).sum(1)])
    return sums.astype(w.dtype), v, lr


@pytest.mark.parametrize("centre, normalise", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [*CASES, "subnormal v"])
def test_triton_per_row_maths_matches_the_core_s_closed_form(case, dtype, centre, normalise, kernels, monkeypatch):
    """The kernels' per-row maths, from a row's five sums, against ``nero_core._closed_form.row_factors`` (the
    core's, in the state dtype) at a steady-state step: the same new ``v``, step size and factors
    ``scale * w - step * g - shift`` wherever neither says the sums cancel, and both saying so on the rows
    ``crafted_rows`` makes cancel (near-constant rows, a large common offset). A zero row keeps a unit scale; a
    subnormal ``v`` gives a finite, huge step (never Inf, whose product with a zero gradient is NaN)."""
    from nero_core._closed_form import row_factors

    monkeypatch.setitem(globals(), "kernels_under_test", kernels)
    sums, v, lr = crafted_sums(case, dtype)
    n, k, t, beta = v.shape[0], 70, 3, 0.999
    correction = 1 - beta ** (t + 1)
    out = torch.zeros(5, n, dtype=torch.float64)
    scalars = torch.tensor([beta, lr * 1.0, correction], dtype=torch.float64)  # sigma 1
    triton.jit(_row_terms_probe)[(1,)](torch.from_numpy(sums), torch.from_numpy(v), scalars, out, n, k,
                                       CENTRE=centre, NORMALISE=normalise, ROWS=8)
    got_v, c, mean, scale, cancels = out.numpy()
    xp = np  # the core on NumPy arrays of the state dtype
    core = row_factors(*sums, v, np.asarray(1.0, v.dtype), np.asarray(t), fan_in=k, lr=lr, beta=beta, centre=centre,
                       normalise=normalise, xp=xp)
    rtol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    np.testing.assert_array_equal(got_v, core.v.astype(np.float64))
    trusted = (cancels == 0) & ~core.recompute
    if case in ("near-constant", "common offset") and centre and normalise:
        assert cancels[:3].all() and core.recompute[:3].all()
    assert trusted[3:].all()  # balanced rows: the closed form holds
    dead = (np.arange(n) < 3) & (case == "subnormal v")
    assert np.isfinite(c).all() and (c[dead] > 1e15).all()
    np.testing.assert_allclose(c[~dead], core.rate[~dead], rtol=rtol)
    for name, mine, theirs in (("scale", scale, core.scale), ("step", scale * c, core.step),
                               ("shift", scale * mean, core.shift)):
        keep = trusted & ~dead if name == "step" else trusted
        np.testing.assert_allclose(mine[keep], theirs[keep], rtol=rtol, atol=rtol * np.abs(theirs[keep]).max(),
                                   err_msg=name)
