"""Nero's default eager path over buckets of tensors (nero_torch._grouped), against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nero_torch
from nero_torch import _grouped
from reference import ReferenceNero

STEPS = 5
# Several tensors of each kind, so that buckets hold more than one: three fan-in-12 weights (one of them conv),
# a tensor with its neurons on axis 1, biases and gains, two tensors past SMALL with rows of different lengths
# (streamed in place, one bucket for their per-row maths), a fan-in-6 tensor alone in its bucket and a 0-d scalar.
SHAPES = [(7, 12), (5, 12), (3, 4, 3), (12, 9), (7,), (5,), (9,), (300, 257), (2, 6), (), (230, 300)]
AXES = [0, 0, 0, 1, None, None, None, 0, 0, None, 0]


def problem(seed: int, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s) for s in SHAPES]
    grads = [[rng.normal(size=s) * rng.uniform(0.1, 3) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


AXIS_1 = [3]
DEFAULT_GROUPS = [dict(params=[i for i in range(len(SHAPES)) if i not in AXIS_1]), dict(params=AXIS_1, neuron_axis=1)]


def run(params, grads, dtype=torch.float64, groups=DEFAULT_GROUPS, **options):
    """Nero over ``groups`` (parameter indices, options); the history in the parameters' own order."""
    tensors = [torch.tensor(p, dtype=dtype, requires_grad=True) for p in params]
    options = {"fused": False, **options}  # torch's kernels (by default the C kernel takes CPU tensors that fit)
    opt = nero_torch.Nero([{**g, "params": [tensors[i] for i in g["params"]]} for g in groups], **options)
    history = []
    for gs in grads:
        for t, g in zip(tensors, gs):
            t.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        history.append([t.detach().to(torch.float64).numpy().copy() for t in tensors])
    return history, opt, tensors


def reference(params, grads, indices=None, **options):
    indices = range(len(params)) if indices is None else indices
    ref = ReferenceNero([SHAPES[i] for i in indices], [AXES[i] for i in indices], **options)
    ps, history = [np.asarray(params[i], np.float64) for i in indices], []
    for gs in grads:
        ps = ref.step(ps, [gs[i] for i in indices])
        history.append(ps)
    return history


def deviation(history, expected, indices=None):
    indices = range(len(history[0])) if indices is None else indices
    return max(float(np.max(np.abs(step[i] - e), initial=0.0)) for step, exp in zip(history, expected)
               for i, e in zip(indices, exp))


@pytest.fixture
def grouped_steps(monkeypatch):
    """How many steps the grouped path took, and the number of buckets of each."""
    calls = []
    step = _grouped.step
    monkeypatch.setattr(_grouped, "step", lambda buckets: calls.append(len(buckets)) or step(buckets))
    return calls


@pytest.mark.parametrize("options", [{}, dict(lr=0.1, beta=0.9), dict(centre=False), dict(normalise=False)],
                         ids=["default", "lr0.1-beta0.9", "no-centre", "no-normalise"])
def test_grouped_path_matches_the_float64_reference(options, grouped_steps):
    params, grads = problem(0)
    history, _, _ = run(params, grads, **options)
    assert deviation(history, reference(params, grads, **options)) <= 1e-12
    # every step after the first (the core rule's projection); buckets: the fan-in-12 rows, the biases, the
    # axis-1 tensor (fan-in 9), the fan-in-6 tensor, the two large tensors
    assert grouped_steps == [5] * (STEPS - 1)


def test_param_groups_keep_their_own_hyperparameters_in_the_grouped_path(grouped_steps):
    params, grads = problem(1)
    first, second = [0, 1, 4, 7], [2, 5, 6, 8, 9]
    groups = [dict(params=first, lr=0.05), dict(params=second, lr=0.002, beta=0.99, centre=False, maximize=True),
              dict(params=AXIS_1, neuron_axis=1)]
    history, _, _ = run(params, grads, groups=groups)
    assert deviation(history, reference(params, grads, first, lr=0.05), first) <= 1e-12
    ascent = [[-g for g in gs] for gs in grads]  # maximize: the reference descends the negated gradient
    assert deviation(history, reference(params, ascent, second, lr=0.002, beta=0.99, centre=False), second) <= 1e-12
    assert deviation(history, reference(params, grads, AXIS_1), AXIS_1) <= 1e-12
    assert len(grouped_steps) == STEPS - 1


def test_float32_and_bfloat16_follow_the_reference():
    params, grads = problem(2)
    history, _, _ = run(params, grads, dtype=torch.float32)
    assert deviation(history, reference(params, grads)) <= 1e-5
    low, opt, _ = run(params, grads, dtype=torch.bfloat16)
    assert all(s["v"].dtype == torch.float32 for s in opt.state.values())
    rows = low[-1][0]  # a balanced bfloat16 neuron tensor: zero-mean, unit-norm rows to bfloat16's rounding
    assert np.allclose(rows.mean(1), 0, atol=2e-2) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=2e-2)


def test_a_model_of_many_small_tensors_runs_in_two_buckets(grouped_steps):
    layers = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(40)])
    opt = nero_torch.Nero(layers.parameters(), fused=False)
    for _ in range(3):
        layers(torch.randn(4, 8)).square().sum().backward()
        opt.step()
    assert grouped_steps == [2, 2]  # the 40 weights, the 40 biases


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e200])  # 1e200: its square overflows
def test_a_nonfinite_gradient_skips_the_whole_step_in_the_grouped_path(bad, grouped_steps):
    params, grads = problem(3)
    _, opt, tensors = run(params, grads[:2])
    state = {id(p): {k: t.clone() for k, t in s.items()} for p, s in opt.state.items()}
    before = [t.detach().clone() for t in tensors]
    for t, g in zip(tensors, grads[2]):
        t.grad = torch.tensor(g)
    tensors[1].grad[2, 3] = bad
    opt.step()
    assert opt.skipped_steps == 1 and len(grouped_steps) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, tensors))
    for p, s in opt.state.items():
        assert all(torch.equal(state[id(p)][k], t) for k, t in s.items())


def test_neuron_policy_holds_back_only_the_bad_neuron_after_the_grouped_check():
    params, grads = problem(4)
    grads[3][0][2, 5] = float("nan")
    history, opt, _ = run(params, grads, skip_nonfinite="neuron")
    expected = reference(params, grads, skip_nonfinite="neuron")
    assert opt.skipped_steps == 1
    assert deviation(history, expected) <= 1e-12


MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from benchmarks.memory import host_step_peak
import nero_torch
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(1024, 2048).to(torch.bfloat16)) for _ in range(8)]
opt = nero_torch.Nero(params)
for _ in range(2):
    for p in params:
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
    opt.step()
print(host_step_peak(opt.step)[1])
"""


def test_large_bfloat16_tensors_are_not_all_held_in_float32_at_once(tmp_path):
    # Eight 1024x2048 bfloat16 weights (4 MiB each; their float32 rows and gradients 16 MiB a tensor): the step's
    # extra memory stays near one tensor's float32 copies, not all eight's (128 MiB).
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "asv_bench"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(bench)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    extra = int(done.stdout.split()[-1])
    assert extra < 48 * 2**20, f"{extra / 2**20:.0f} MiB"


def test_eager_blocks_are_sized_per_torch_thread_on_cpu_and_large_on_a_gpu():
    from array_api_compat import torch as xp_torch

    from nero_core._neurons import BLOCK_BYTES, GPU_BLOCK_BYTES, _block_rows

    row_bytes = 512 * 4
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _block_rows(torch.empty(4096, 512), row_bytes, xp_torch)
        torch.set_num_threads(2)
        two = _block_rows(torch.empty(4096, 512), row_bytes, xp_torch)
    finally:
        torch.set_num_threads(threads)
    assert (one, two) == (BLOCK_BYTES // row_bytes, 2 * BLOCK_BYTES // row_bytes)
    # a tensor on another device (meta here, a GPU in use): blocks of 64 MiB, not a few launches per 256 KiB
    assert _block_rows(torch.empty(4096, 512, device="meta"), row_bytes, xp_torch) == GPU_BLOCK_BYTES // row_bytes
