"""asv benchmarks: one optimizer step per backend, optimizer and shape set.

Per backend, ``<Backend>.time_step`` times a step (synchronised on GPU) and ``<Backend>Memory`` measures it:

* ``peakmem_step``: asv's peak resident set of the process (imports, parameters, gradients and state included);
* ``track_state_bytes``: bytes of optimizer state;
* ``track_step_extra_bytes``: the peak during one step above what was resident before it (see ``memory.py``);
* ``track_peak_cuda_bytes`` (GPU backends): peak device memory in use during a step.

Memory runs in its own classes because the host measurement switches glibc's malloc to map every large block,
which would change the timings. A backend, device or optimizer this machine lacks is skipped: ``setup`` raises
``NotImplementedError`` (``cases.Unavailable``), asv's way to skip a benchmark.
"""

from __future__ import annotations

from . import memory
from .cases import BACKENDS, make_case
from .shapes import SHAPE_SETS

SHAPES = list(SHAPE_SETS)


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


def _params(backend: str) -> list[list[str]]:
    return [SHAPES, list(BACKENDS[backend])]


class NumPy(_Step):
    backend = "numpy"
    params = _params(backend)


class NumPyMemory(_Memory):
    backend = "numpy"
    params = _params(backend)


class TorchCPU(_Step):
    backend = "torch-cpu"
    params = _params(backend)


class TorchCPUMemory(_Memory):
    backend = "torch-cpu"
    params = _params(backend)


class JaxCPU(_Step):
    backend = "jax-cpu"
    params = _params(backend)


class JaxCPUMemory(_Memory):
    backend = "jax-cpu"
    params = _params(backend)


class TorchCUDA(_Step):
    backend = "torch-cuda"
    params = _params(backend)


class TorchCUDAMemory(_GpuMemory):
    backend = "torch-cuda"
    params = _params(backend)


class JaxGPU(_Step):
    backend = "jax-gpu"
    params = _params(backend)


class JaxGPUMemory(_GpuMemory):
    backend = "jax-gpu"
    params = _params(backend)


class CuPy(_Step):
    backend = "cupy"
    params = _params(backend)


class CuPyMemory(_GpuMemory):
    backend = "cupy"
    params = _params(backend)
