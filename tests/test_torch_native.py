"""The C kernel of ``Nero(fused=True)`` on CPU (``nero_torch/_native.c``) against the core rule's float64
transcription (``tests/reference.py``), on the rows its closed form cannot trust, on tensors large enough for its
threads, and built for the instruction sets users have (AVX2 as well as this machine's).

Each case takes the kernel's steady-state step from a known state (step count, ``v``, ``sigma``) and compares the
parameters with the reference's step from the same state.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import nero_torch
from nero_torch import _native
from reference import ReferenceNero

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def has_c_compiler() -> bool:
    """Whether the compiler ``_native.library`` would use is there (``$CC``, else ``cc`` or ``gcc``)."""
    named = os.environ.get("CC")
    return shutil.which(named) is not None if named else bool(shutil.which("cc") or shutil.which("gcc"))


def c_kernel():
    """The C kernel, or a skip where this machine has no C compiler (``Nero(fused=True)`` then runs its torch
    kernels); where there is one, the kernel must build."""
    if not has_c_compiler():
        pytest.skip("no C compiler: Nero(fused=True) uses its torch kernels")
    lib = _native.library()
    assert lib is not None, "a C compiler is there, but the kernel did not build"
    return lib


@pytest.fixture
def kernel_steps(monkeypatch) -> list[int]:
    """The C kernel, and the count of its calls (one per step it takes)."""
    c_kernel()
    calls: list[int] = []
    step = _native._step
    monkeypatch.setattr(_native, "_step", lambda *a: calls.append(1) or step(*a))
    return calls


def steady_state(params: list[torch.nn.Parameter], vs: list[np.ndarray], t: int, **options) -> nero_torch.Nero:
    """``Nero(fused=True)`` over ``params`` as after ``t`` updates, with states ``vs`` and ``sigma`` 1."""
    opt = nero_torch.Nero(params, fused=True, **options)
    for p, v in zip(params, vs):
        opt.state[p] = {"step": torch.tensor(float(t)), "v": torch.tensor(v, dtype=p.dtype),
                        "sigma": torch.ones((), dtype=p.dtype)}
    return opt


def kernel_step(w: np.ndarray, g: np.ndarray, v: np.ndarray, dtype: torch.dtype, *, t: int = 3, lr: float = 0.01,
                **options) -> tuple[torch.Tensor, torch.Tensor]:
    """One steady-state step of ``Nero(fused=True)`` from ``t`` updates taken, ``v`` and ``sigma`` 1: the new
    parameter and ``v``."""
    p = torch.nn.Parameter(torch.tensor(w, dtype=dtype))
    opt = steady_state([p], [v], t, lr=lr, **options)
    p.grad = torch.tensor(g, dtype=dtype)
    opt.step()
    return p.detach(), opt.state[p]["v"]


def reference_step(w: np.ndarray, g: np.ndarray, v: np.ndarray, *, t: int = 3, lr: float = 0.01,
                   centre: bool = True, normalise: bool = True) -> np.ndarray:
    ref = ReferenceNero([w.shape], [0], lr=lr, centre=centre, normalise=normalise)
    ref.t, ref.v, ref.sigma = [t], [v.astype(np.float64)], [1.0]
    return ref.step([w], [g])[0]


def balanced(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(axis=1, keepdims=True)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def crafted_rows(case: str, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(w, g, v, lr)``: 6 rows of 70 (two vectors' worth and a tail), the first three crafted, the rest
    balanced, each stored in ``dtype`` as the kernel sees it."""
    rng = np.random.default_rng(0)
    w, g = balanced(rng.standard_normal((6, 70))), rng.standard_normal((6, 70)) * 1e-3
    v, lr = (g * g).sum(axis=1) * 2.0, 0.01
    if case == "near-constant":  # a constant row plus a spread far below its rounding in |w|^2
        w[:3] = 10.0 + 1e-3 * rng.standard_normal((3, 70))
    elif case == "common offset":  # unit spread around a mean of 1000
        w[:3] = 1000.0 + rng.standard_normal((3, 70))
    elif case == "zero rows":  # a zero row; a zero gradient; both
        w[0], g[1], w[2], g[2] = 0.0, 0.0, 0.0, 0.0
    elif case == "tiny v":  # v and |g|^2 a few decades above float32's smallest normal number: c is ~1e16
        g[:3] *= 1e-15
        v[:3] = (g[:3] * g[:3]).sum(axis=1) * 2.0
    elif case == "step cancels the row":  # lr 0.999 along the gradient: 0.1% of each row is left
        g[:3] = w[:3] * 1e-3
        v[:3], lr = (g[:3] * g[:3]).sum(axis=1), 0.999
    else:
        raise ValueError(case)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    return w.astype(np_dtype), g.astype(np_dtype), v.astype(np_dtype), lr


CASES = ["near-constant", "common offset", "zero rows", "tiny v", "step cancels the row"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("skip_nonfinite", ["step", "neuron"])
def test_rows_the_closed_form_cannot_trust_match_the_core_rule(case, dtype, skip_nonfinite, kernel_steps):
    """A near-constant row, or one with a large common offset, has a spread far below the rounding of its |y|^2:
    the kernel must take its mean and norm from y itself, as the core does, not zero the row or misjudge its
    norm. Near-constant float32 rows (10 +- 1e-3) are held to 1e-3: y = w - c*g rounds to float32 by up to 5e-7,
    which normalising by the row's spread (~8e-3) makes ~6e-5 per element (the core rule in float32 is 2.4e-4
    off the float64 reference there)."""
    w, g, v, lr = crafted_rows(case, dtype)
    got = kernel_step(w, g, v, dtype, lr=lr, skip_nonfinite=skip_nonfinite)[0].numpy()
    expected = reference_step(w, g, v, lr=lr)
    assert len(kernel_steps) == 1
    tolerance = 1e-3 if dtype == torch.float32 and case == "near-constant" else TOLERANCE[dtype]
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)
    unit = np.linalg.norm(expected, axis=1) > 0  # a zero row with a zero gradient stays zero
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), unit.astype(float), rtol=0, atol=10 * TOLERANCE[dtype])


@pytest.mark.parametrize("options", [dict(centre=False), dict(normalise=False), dict(centre=False, normalise=False)])
def test_crafted_rows_with_one_constraint_or_none(options, kernel_steps):
    for case in CASES:
        w, g, v, lr = crafted_rows(case, torch.float64)
        got = kernel_step(w, g, v, torch.float64, lr=lr, **options)[0].numpy()
        np.testing.assert_allclose(got, reference_step(w, g, v, lr=lr, **options), rtol=0, atol=1e-12, err_msg=case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threads_match_the_core_rule_and_the_single_thread_bits(dtype, kernel_steps):
    """A step over the kernel's threading threshold (65536 elements) runs on two threads, each taking a block of
    every large tensor's rows (here a neuron tensor and a bias-like one) and the small tensors whole: 5 steps
    against the reference, and bit for bit what one thread gives (each row's arithmetic does not depend on which
    thread takes it)."""
    rng = np.random.default_rng(1)
    shapes = [(301, 257), (5, 7), (70001,), (64, 33), (9,)]  # 257 = whole vectors and a tail
    start = [balanced(rng.standard_normal(s)) if len(s) == 2 else rng.standard_normal(s) for s in shapes]
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    grads = [[(rng.standard_normal(s) * 10.0 ** -rng.integers(2, 5)).astype(np_dtype) for s in shapes]
             for _ in range(5)]
    runs = {}
    for threads in (2, 1):
        params = [torch.nn.Parameter(torch.tensor(w, dtype=dtype)) for w in start]
        opt = steady_state(params, [np.zeros(s[:1]) for s in shapes], 1)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = torch.from_numpy(g)
                opt.step()
        finally:
            torch.set_num_threads(before)
        runs[threads] = [p.detach().clone() for p in params]
    ref = ReferenceNero(shapes, [0] * len(shapes))
    ref.t, ref.v, ref.sigma = [1] * len(shapes), [np.zeros(s[:1]) for s in shapes], [1.0] * len(shapes)
    expected = start
    for step_grads in grads:
        expected = ref.step(expected, step_grads)
    assert len(kernel_steps) == 10
    for got, one_thread, want in zip(runs[2], runs[1], expected):
        np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=TOLERANCE[dtype] * 5)
        assert torch.equal(got, one_thread)


def _cpu_flags() -> set[str]:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64", "prebuilt"], ids=["avx2", "sse2", "prebuilt"])
def test_kernel_built_for_avx2_and_sse2_matches_the_core_rule(march, kernel_steps, monkeypatch):
    """The kernel as a machine with AVX2 (or only SSE2) builds it, and the wheel's prebuilt one (setup.py, for AVX2:
    what a machine without a compiler runs): the same maths, within the reference's tolerance. Where this machine
    has AVX (256-bit vectors, as the AVX2 builds use), the AVX2 builds give the same bits as this machine's own."""
    from nero_core._kernels import load_library

    if march != "x86-64" and not {"avx2", "fma", "bmi2"} <= _cpu_flags():
        pytest.skip("this CPU cannot run an AVX2 build")
    if march == "prebuilt":
        if _native.PREBUILT is None:
            pytest.skip("no prebuilt kernel here (setup.py builds it on x86-64 Linux with a C compiler)")
        variant = _native.prebuilt()
        assert variant is not None, (f"{_native.PREBUILT} does not load, or was built from another _native.c "
                                     "(pip install -e . builds it again)")
    else:
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        flags = [f"-march={march}" if f == "-march=native" else f for f in _native.FLAGS]
        built = load_library(_native.SOURCE, compiler, flags, libs=["-lm"], who="test", fallback="nothing")
        assert built is not None
        variant = _native.declared(built)
    rng = np.random.default_rng(2)
    w = balanced(rng.standard_normal((40, 203)))
    g, v = rng.standard_normal(w.shape) * 1e-2, np.full(40, 1e-3)
    expected = reference_step(w, g, v)
    results = {}
    for name, lib in (("native", _native.library()), (march, variant)):
        monkeypatch.setattr(_native, "library", lambda lib=lib: lib)
        for dtype in (torch.float32, torch.float64):
            np_dtype = np.float32 if dtype == torch.float32 else np.float64
            got, _ = kernel_step(w.astype(np_dtype), g.astype(np_dtype), v.astype(np_dtype), dtype)
            np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=TOLERANCE[dtype])
            results[name, dtype] = got
            for case in CASES:
                w_case, g_case, v_case, lr = crafted_rows(case, dtype)
                results[name, dtype, case] = kernel_step(w_case, g_case, v_case, dtype, lr=lr)[0]
    if march != "x86-64" and "avx" in _cpu_flags():
        assert all(torch.equal(results[("native", *key[1:])], value) for key, value in results.items()
                   if key[0] == march)


def test_a_prebuilt_kernel_built_from_another_source_is_not_loaded(monkeypatch, tmp_path):
    """As an in-place build left behind by an edit of _native.c: the library's digest of its source tells."""
    if _native.PREBUILT is None or torch.backends.cpu.get_cpu_capability() not in _native.PREBUILT_CPUS:
        pytest.skip("no prebuilt kernel for this machine")
    changed = tmp_path / "_native.c"
    changed.write_text(_native.SOURCE.read_text() + "\n/* an edit */\n")
    _native.prebuilt.cache_clear()
    try:
        assert _native.prebuilt() is not None
        monkeypatch.setattr(_native, "SOURCE", changed)
        _native.prebuilt.cache_clear()
        assert _native.prebuilt() is None
    finally:
        monkeypatch.undo()
        _native.prebuilt.cache_clear()


def test_kernel_tests_skip_without_a_c_compiler(monkeypatch):
    """Where no C compiler is installed, the kernel's tests skip, as documented, rather than fail on the warning
    that Nero(fused=True) gives there (pytest turns RuntimeWarnings into errors)."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.setattr(_native, "prebuilt", lambda: None)  # (a wheel without its prebuilt kernel)
    _native.library.cache_clear()
    try:
        with pytest.raises(pytest.skip.Exception, match="no C compiler"):
            c_kernel()
    finally:
        _native.library.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_kernel_per_row_maths_agree_with_the_core_s_row_factors(case, dtype, kernel_steps):
    """The kernel's per-row maths (the new v, c, mean and norm of y from the old row's five sums) against the core's
    :func:`nero_core._closed_form.row_factors` on the same sums: the same rows, to the dtype's tolerance, wherever
    the closed form is trusted (``recompute`` False); where it is not, the kernel's rows are the reference's."""
    from nero_core import _closed_form as closed_form
    w, g, v, lr = crafted_rows(case, dtype)
    got, got_v = kernel_step(w, g, v, dtype, lr=lr)
    w64, g64 = w.astype(np.float64), g.astype(np.float64)
    sums = w64.sum(1), (w64 * w64).sum(1), g64.sum(1), (g64 * g64).sum(1), (w64 * g64).sum(1)
    f = closed_form.row_factors(*sums, v.astype(np.float64), np.float64(1.0), np.float64(3), fan_in=w.shape[1], lr=lr,
                                beta=0.999, centre=True, normalise=True, xp=np)
    from_factors = f.scale[:, None] * w64 - f.step[:, None] * g64 - f.shift[:, None]
    expected = np.where(f.recompute[:, None], reference_step(w, g, v, lr=lr), from_factors)
    tolerance = 1e-3 if dtype == torch.float32 and case == "near-constant" else TOLERANCE[dtype]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=tolerance)
    np.testing.assert_allclose(got_v.numpy(), f.v, rtol=TOLERANCE[dtype], atol=0)
