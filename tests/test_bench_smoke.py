"""The asv suite runs: every benchmark's setup and body in this process, then asv itself on a small subset.

Speed is not checked here (CI's machine is shared; the regression gate, ``make bench-gate``, checks it). The timing
code is checked against steps of known duration, and the machine record for the fields every table carries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "asv_bench"
sys.path.insert(0, str(BENCH))

from benchmarks import bench_step, machine, timing  # noqa: E402
from benchmarks.cases import BACKENDS, RATIO_OPTIMIZERS, Unavailable, make_case  # noqa: E402
from benchmarks.shapes import parameter_count, shape_set  # noqa: E402

# Backends every CI machine has (their libraries are test dependencies): nothing may be skipped on them except
# Nero from an adapter that is not importable yet.
CPU_BACKENDS = ("numpy", "torch-cpu", "jax-cpu")
ADAPTERS = {"torch-cpu": ("nero_torch", "Nero"), "jax-cpu": ("nero_optax", "nero")}


def _adapter_missing(backend: str, optimizer: str) -> bool:
    if not optimizer.startswith("nero") or optimizer == "nero-core" or backend not in ADAPTERS:
        return False
    module, name = ADAPTERS[backend]
    return importlib.util.find_spec(module) is None or not hasattr(importlib.import_module(module), name)


def _classes() -> list[type]:
    return [c for c in vars(bench_step).values() if isinstance(c, type) and not c.__name__.startswith("_")
            and getattr(c, "backend", "")]


def test_every_backend_has_a_time_a_ratio_and_a_memory_class() -> None:
    backends = [c.backend for c in _classes()]
    assert sorted(backends) == sorted(list(BACKENDS) * 3)
    gpu = [c.__name__ for c in _classes() if hasattr(c, "track_peak_cuda_bytes")]
    assert sorted(gpu) == ["CuPyMemory", "JaxGPUMemory", "TorchCUDAMemory"]
    ratio = {c.backend: c.params[1] for c in _classes() if hasattr(c, "track_x_adam")}
    assert ratio == {b: list(RATIO_OPTIMIZERS[b]) for b in BACKENDS}
    assert ratio["torch-cpu"] == ["nero", "nero-torch-kernels", "nero-fused", "nero-fused-neuron", "star"]
    assert ratio["jax-cpu"] == ["nero", "star"]


def _pair(backend: str) -> tuple[type, type]:
    classes = [c for c in _classes() if c.backend == backend]
    time_class = next(c for c in classes if hasattr(c, "time_step"))
    return time_class, next(c for c in classes if hasattr(c, "peakmem_step"))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_benchmark_runs_on_the_mlp(backend: str) -> None:
    """Every optimizer's setup and every benchmark body on the smallest shape set; GPU backends skip without a GPU.

    The memory class's setup only adds ``map_large_blocks`` (not called here: it would change this process's
    malloc), so its benchmarks run on the time class's case; asv runs its setup in test_asv_quick_run.
    """
    time_class, memory_class = _pair(backend)
    methods = [m for m in dir(memory_class) if m.startswith(("peakmem_", "track_"))]
    assert time_class.params[1] == memory_class.params[1] == list(BACKENDS[backend])
    for optimizer in time_class.params[1]:
        bench = time_class()
        try:
            bench.setup("mlp", optimizer)
        except Unavailable as exc:
            on_cpu = backend in CPU_BACKENDS
            assert not on_cpu or _adapter_missing(backend, optimizer), f"{backend} {optimizer}: {exc}"
            continue
        bench.time_step("mlp", optimizer)
        measure = memory_class()
        measure.case = bench.case
        for method in methods:
            value = getattr(measure, method)("mlp", optimizer)
            if method.startswith("track_"):
                assert isinstance(value, int) and value >= 0, (method, value)


def _sleeper(seconds: float):
    return lambda: time.sleep(seconds)


def test_interleaved_ratio_of_steps_of_known_length() -> None:
    """A 20 ms step against a 10 ms one: ratio 2 (sleeps overshoot a little on a loaded machine, alike for both)."""
    samples = timing.interleave({"slow": _sleeper(0.02), "fast": _sleeper(0.01)}, rounds=5, block_seconds=0.04)
    assert [len(s) for s in samples.values()] == [5, 5]
    assert 1.6 < timing.ratio(samples, "slow", "fast") < 2.4
    assert 0.019 < timing.seconds(samples, "slow") < 0.03


def test_interleave_stops_at_its_budget_after_the_minimum_rounds() -> None:
    samples = timing.interleave({"step": _sleeper(0.01)}, rounds=50, block_seconds=0.01, budget_seconds=0.0)
    assert len(samples["step"]) == timing.MIN_ROUNDS


def test_ratio_benchmark_on_numpy() -> None:
    """NumPy's Nero (the core rule) as asv runs it: setup builds three cases, the tracks give positive ratios."""
    bench = bench_step.NumPyRatio()
    bench.setup("single-2048x512", "nero")
    assert set(bench.steps) == {"nero", "adam", "sgd"}
    samples = timing.interleave(bench.steps, rounds=3, block_seconds=0.02)
    found = bench_step.ratios("numpy", "nero", samples)
    assert found["sgd"] > found["adam"] > 0  # SGD is the cheapest step of the three


def test_machine_record() -> None:
    info = machine.describe(bandwidth=False)
    assert {"cpu", "caches", "cpus", "threads", "memory_gib", "load_average"} <= set(info)
    assert 0.1e9 < machine.copy_bandwidth(mib=16, repeats=2) < 1e13
    line = machine.summary({**info, "copy_gb_per_s": 12.5})
    assert str(info["cpu"]) in line and "copy bandwidth 12.5 GB/s" in line


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shapes", ["resnet18", "gpt2"])
def test_large_shape_sets_set_up(backend: str, shapes: str) -> None:
    case = make_case(backend, "sgd", shapes, warmup=1)
    case.step()
    assert case.state_bytes() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_bytes_against_formulas(backend: str) -> None:
    """Adam keeps two floats per weight; Nero one per neuron and bias element, plus a count and a scale per tensor."""
    adam = "adam-fused" if backend == "torch-cpu" else "adam"
    weights = parameter_count("mlp") * 4
    assert weights * 2 <= make_case(backend, adam, "mlp", warmup=1).state_bytes() <= weights * 2 + 4 * 20
    tensors = shape_set("mlp")
    per_neuron = sum(t.torch_shape[0] if t.torch_axis is not None else t.size for t in tensors) * 4
    nero = make_case(backend, "nero-core" if backend != "numpy" else "nero", "mlp", warmup=1).state_bytes()
    assert per_neuron + 8 * len(tensors) <= nero <= per_neuron + 8 * len(tensors) + 4


def test_host_peak_sees_a_temporary() -> None:
    """A 32 MiB temporary during the step shows as 32 MiB of extra memory (in a process that maps large blocks)."""
    code = (
        "import numpy as np; from benchmarks import memory\n"
        "print(memory.host_step_peak(lambda: np.ones(8 * 2**20, dtype=np.float32).sum())[1])"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, env=env, capture_output=True, text=True, check=True)
    assert 31 * 2**20 <= int(out.stdout) < 34 * 2**20  # the kernel's RSS counters lag by up to a few hundred KiB


# One benchmark of each kind on each CPU backend, and a GPU one (a skip without a GPU): about a minute.
SMOKE = (
    r"NumPy(Memory)?\..*\('mlp', 'nero'\)|NumPyRatio\.track_x_sgd\('single-2048x512', 'nero'\)"
    r"|Machine\.track_copy"
    r"|(TorchCPU|JaxCPU|TorchCUDA)\.time_step\('mlp', 'nero'\)"
    r"|TorchCPUMemory\.track_state_bytes\('mlp', 'nero'\)"
    r"|JaxCPUMemory\.track_step_extra_bytes\('mlp', 'nero'\)"
)


def test_asv_quick_run(tmp_path: Path) -> None:
    """``asv run --quick --python=same`` on a subset, with results, environments and machine file in tmp_path."""
    pytest.importorskip("asv")
    from asv.util import load_json

    conf = load_json(str(BENCH / "asv.conf.json"), js_comments=True)
    conf.update(repo=str(BENCH.parent), benchmark_dir=str(BENCH / "benchmarks"), results_dir=str(tmp_path / "results"),
                html_dir=str(tmp_path / "html"), env_dir=str(tmp_path / "env"))
    (tmp_path / "asv.conf.json").write_text(json.dumps(conf))
    env = dict(os.environ, HOME=str(tmp_path))  # asv keeps its machine description in ~/.asv-machine.json
    asv = [sys.executable, "-m", "asv"]
    subprocess.run([*asv, "machine", "--yes"], env=env, cwd=tmp_path, check=True, capture_output=True)
    run = subprocess.run(
        [*asv, "run", "--quick", "--python=same", "--show-stderr", "--config", str(tmp_path / "asv.conf.json"),
         "--bench", SMOKE],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "failed" not in run.stdout, run.stdout[-4000:]
    finished = [line for line in run.stdout.splitlines() if line.rstrip().endswith(" ok")]
    # NumPy: time_step, 3 memory benchmarks and a ratio; 3 time_step and 2 memory benchmarks
    assert len(finished) == 10, run.stdout[-4000:]
    bandwidth = next(ln for ln in run.stdout.splitlines() if "Machine.track_copy_gb_per_s" in ln)
    assert float(bandwidth.split()[-1]) > 0.1, bandwidth  # GB/s, printed as the benchmark's value
    skips = [line for line in run.stdout.splitlines() if "asv: skipped" in line]
    assert all("CUDA" in line or "is not importable" in line for line in skips), skips
    discovered = json.loads((tmp_path / "results" / "benchmarks.json").read_text())
    assert "bench_step.JaxCPUMemory.track_step_extra_bytes" in discovered


def test_ratios_script(tmp_path: Path) -> None:
    """ratios.py end to end on NumPy: ratios against its own references, and a probe that sees SGD's temporary."""
    out = tmp_path / "ratios"
    subprocess.run(
        [sys.executable, str(BENCH / "ratios.py"), "--quick", "--shapes", "mlp", "--backends", "numpy", "--out", str(out)],
        check=True, capture_output=True, text=True,
    )
    rows = {r["optimizer"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"nero", "adam", "sgd"}
    assert rows["adam"]["x_adam"] == rows["sgd"]["x_sgd"] == rows["adam"]["state_x_adam"] == 1
    assert rows["nero"]["state_x_adam"] < 0.005
    # `p -= lr * g` makes one temporary the size of each tensor in turn: the largest is the peak.
    assert 0.85 < rows["sgd"]["extra_x_largest"] < 1.15
    assert "| mlp | numpy | nero |" in out.with_suffix(".md").read_text()
