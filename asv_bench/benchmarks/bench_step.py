"""asv benchmarks: one optimizer step per backend, optimizer and shape set.

Per backend, ``<Backend>.time_step`` times a step (synchronised on GPU); ``<Backend>Ratio`` gives Nero's and
STAR's step time as ratios:

* ``track_x_adam``, ``track_x_sgd``: the step time over the framework's best Adam's (``cases.ADAM``) and over
  SGD's, the three measured in interleaved rounds in one process (``timing.py``): stable where absolute times swing
  with the machine's load, and what the regression gate (``asv_bench/gate.py``) compares.

``<Backend>Memory`` measures a step's memory:

* ``peakmem_step``: asv's peak resident set of the process (imports, parameters, gradients and state included);
* ``track_state_bytes``: bytes of optimizer state;
* ``track_step_extra_bytes``: the peak during one step above what was resident before it (see ``memory.py``);
* ``track_peak_cuda_bytes`` (GPU backends): peak device memory in use during a step.

Memory runs in its own classes because the host measurement switches glibc's malloc to map every large block,
which would change the timings. ``Machine.track_copy_gb_per_s`` records the memory bandwidth of the machine
the run was on (``machine.py``). A backend, device or optimizer this machine lacks is skipped: ``setup`` raises
``NotImplementedError`` (``cases.Unavailable``), asv's way to skip a benchmark.
"""

from __future__ import annotations

from collections.abc import Callable

from . import memory, timing
from .cases import ADAM, BACKENDS, RATIO_OPTIMIZERS, make_case
from .machine import copy_bandwidth
from .shapes import SHAPE_SETS

SHAPES = list(SHAPE_SETS)


def ratio_steps(backend: str, optimizer: str, shapes: str) -> dict[str, Callable[[], None]]:
    """The steps a ratio benchmark interleaves: ``optimizer``, the backend's best Adam and SGD."""
    return {name: make_case(backend, name, shapes).step for name in (optimizer, ADAM[backend], "sgd")}


def ratios(backend: str, optimizer: str, samples: timing.Samples) -> dict[str, float]:
    """``{"adam": x, "sgd": y}``: ``optimizer``'s step time over Adam's and over SGD's, round by round."""
    return {"adam": timing.ratio(samples, optimizer, ADAM[backend]), "sgd": timing.ratio(samples, optimizer, "sgd")}


class _Case:
    backend = ""
    param_names = ["shapes", "optimizer"]
    timeout = 600  # seconds; the GPT-2-like set with a compiled step takes a while to set up

    def setup(self, shapes: str, optimizer: str) -> None:
        self.case = make_case(self.backend, optimizer, shapes)


class _Step(_Case):
    def time_step(self, shapes: str, optimizer: str) -> None:
        self.case.step()


class _Memory(_Case):
    def setup(self, shapes: str, optimizer: str) -> None:
        memory.map_large_blocks()  # before anything is allocated; this process only measures memory
        super().setup(shapes, optimizer)

    def peakmem_step(self, shapes: str, optimizer: str) -> None:
        self.case.step()

    def track_state_bytes(self, shapes: str, optimizer: str) -> int:
        return self.case.state_bytes()

    track_state_bytes.unit = "bytes"  # type: ignore[attr-defined]

    def track_step_extra_bytes(self, shapes: str, optimizer: str) -> int:
        return self.case.step_peak()[1]

    track_step_extra_bytes.unit = "bytes"  # type: ignore[attr-defined]


class _GpuMemory(_Memory):
    def track_peak_cuda_bytes(self, shapes: str, optimizer: str) -> int:
        return self.case.step_peak()[0]

    track_peak_cuda_bytes.unit = "bytes"  # type: ignore[attr-defined]


class _Ratio:
    backend = ""
    param_names = ["shapes", "optimizer"]
    timeout = 900  # seconds: three cases to set up, then 15 rounds (STAR on a large set: fewer, by the budget)
    processes = 1  # each value is already the median of 15 interleaved rounds; the spread across processes is
    # measured by `asv_bench/gate.py spread`

    def setup(self, shapes: str, optimizer: str) -> None:
        self.steps = ratio_steps(self.backend, optimizer, shapes)

    def track_x_adam(self, shapes: str, optimizer: str) -> float:
        return ratios(self.backend, optimizer, timing.interleave(self.steps))["adam"]

    track_x_adam.unit = "ratio"  # type: ignore[attr-defined]

    def track_x_sgd(self, shapes: str, optimizer: str) -> float:
        return ratios(self.backend, optimizer, timing.interleave(self.steps))["sgd"]

    track_x_sgd.unit = "ratio"  # type: ignore[attr-defined]


class Machine:
    """The machine's memory bandwidth, recorded with every run: step times scale with it across machines."""

    def track_copy_gb_per_s(self) -> float:
        return copy_bandwidth() / 1e9

    track_copy_gb_per_s.unit = "GB/s"  # type: ignore[attr-defined]


def _params(backend: str) -> list[list[str]]:
    return [SHAPES, list(BACKENDS[backend])]


def _ratio_params(backend: str) -> list[list[str]]:
    return [SHAPES, list(RATIO_OPTIMIZERS[backend])]


class NumPy(_Step):
    backend = "numpy"
    params = _params(backend)


class NumPyRatio(_Ratio):
    backend = "numpy"
    params = _ratio_params(backend)


class NumPyMemory(_Memory):
    backend = "numpy"
    params = _params(backend)


class TorchCPU(_Step):
    backend = "torch-cpu"
    params = _params(backend)


class TorchCPURatio(_Ratio):
    backend = "torch-cpu"
    params = _ratio_params(backend)


class TorchCPUMemory(_Memory):
    backend = "torch-cpu"
    params = _params(backend)


class JaxCPU(_Step):
    backend = "jax-cpu"
    params = _params(backend)


class JaxCPURatio(_Ratio):
    backend = "jax-cpu"
    params = _ratio_params(backend)


class JaxCPUMemory(_Memory):
    backend = "jax-cpu"
    params = _params(backend)


class TorchCUDA(_Step):
    backend = "torch-cuda"
    params = _params(backend)


class TorchCUDARatio(_Ratio):
    backend = "torch-cuda"
    params = _ratio_params(backend)


class TorchCUDAMemory(_GpuMemory):
    backend = "torch-cuda"
    params = _params(backend)


class JaxGPU(_Step):
    backend = "jax-gpu"
    params = _params(backend)


class JaxGPURatio(_Ratio):
    backend = "jax-gpu"
    params = _ratio_params(backend)


class JaxGPUMemory(_GpuMemory):
    backend = "jax-gpu"
    params = _params(backend)


class CuPy(_Step):
    backend = "cupy"
    params = _params(backend)


class CuPyRatio(_Ratio):
    backend = "cupy"
    params = _ratio_params(backend)


class CuPyMemory(_GpuMemory):
    backend = "cupy"
    params = _params(backend)
