"""Parameter shapes of the models users train, generated from their architectures alone (no framework import).

Each tensor is given in both layouts, with the neuron axis of each:

* torch: ``Linear`` ``(out, in)``, ``Conv2d`` ``(out, in, kh, kw)``: neurons on axis 0;
* Flax: ``Dense`` ``(in, out)``, ``Conv`` ``(kh, kw, in, out)``: neurons on the last axis;
* ``Embedding``/``Embed`` is ``(vocab, d)`` in both: one neuron per token, axis 0;
* biases and norm gains are bias-like (neuron axis None).

``role`` says how Muon users split a model: ``hidden`` matrices go to Muon, everything else (``input`` and
``output`` layers, ``embedding``, ``vector``) to Adam.

Shape sets (parameter counts are checked in tests/test_bench_shapes.py):

* ``mlp``: a 5-layer MLP on MNIST, 784 wide: 784 -> 784 x4 -> 10, 2,469,610 parameters;
* ``resnet18``: torchvision's ResNet-18 for ImageNet (1000 classes), 11,689,512 parameters;
* ``gpt2``: a GPT-2-like transformer, d=512, 8 layers, 8 heads, vocab 8192, context 1024, tied head:
  12*L*d^2 + V*d = 29.4M in the matrices, 29,938,688 in all.

Sets that show a per-tensor cost, and a kernel's speed where memory is not the limit:

* ``resnet50``: torchvision's ResNet-50 (1000 classes): 161 tensors, 25,557,032 parameters;
* ``transformer24``: the GPT-2-like block stack 24 layers deep at d=256 (vocab 8192, context 512): 292 tensors,
  21,182,976 parameters;
* ``toy194``: 97 ``Linear(8, 8)`` layers, 97 8x8 weights and 97 biases: 194 tensors, 6,984 parameters, where a
  step is nothing but per-tensor overhead;
* ``single-2048x512``: one 2048x512 float32 weight (4 MiB, inside a server CPU's L2 or L3 cache): a kernel's
  arithmetic, not memory, sets its speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SHAPE_SETS", "Tensor", "largest_tensor", "parameter_count", "shape_set"]


@dataclass(frozen=True)
class Tensor:
    """One parameter tensor in both layouts."""

    name: str
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]
    torch_axis: int | None
    flax_axis: int | None
    role: str

    @property
    def size(self) -> int:
        return math.prod(self.torch_shape)

    @property
    def fan_in(self) -> int:
        return self.size // self.torch_shape[0] if self.torch_axis is not None else 1


def _vector(name: str, n: int) -> Tensor:
    return Tensor(name, (n,), (n,), None, None, "vector")


def _linear(name: str, fan_in: int, fan_out: int, role: str, bias: bool = True) -> list[Tensor]:
    weight = Tensor(f"{name}.weight", (fan_out, fan_in), (fan_in, fan_out), 0, 1, role)
    return [weight, _vector(f"{name}.bias", fan_out)] if bias else [weight]


def _conv(name: str, fan_in: int, fan_out: int, k: int, role: str) -> list[Tensor]:
    return [Tensor(f"{name}.weight", (fan_out, fan_in, k, k), (k, k, fan_in, fan_out), 0, 3, role)]


def _norm(name: str, n: int) -> list[Tensor]:
    return [_vector(f"{name}.weight", n), _vector(f"{name}.bias", n)]


def _embedding(name: str, vocab: int, d: int) -> list[Tensor]:
    return [Tensor(f"{name}.weight", (vocab, d), (vocab, d), 0, 0, "embedding")]


def mlp(width: int = 784, depth: int = 5, classes: int = 10) -> list[Tensor]:
    """``depth`` Linear layers: ``width -> width`` (depth - 1 times), then ``width -> classes``."""
    tensors = []
    for i in range(depth):
        role = "input" if i == 0 else "output" if i == depth - 1 else "hidden"
        tensors += _linear(f"layers.{i}", width, classes if i == depth - 1 else width, role)
    return tensors


def resnet18(classes: int = 1000) -> list[Tensor]:
    """torchvision's ``resnet18``: BasicBlocks [2, 2, 2, 2], widths 64..512, in its parameter order."""
    tensors = _conv("conv1", 3, 64, 7, "input") + _norm("bn1", 64)
    fan_in = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            name = f"layer{stage}.{block}"
            tensors += _conv(f"{name}.conv1", fan_in, width, 3, "hidden") + _norm(f"{name}.bn1", width)
            tensors += _conv(f"{name}.conv2", width, width, 3, "hidden") + _norm(f"{name}.bn2", width)
            if block == 0 and fan_in != width:
                tensors += _conv(f"{name}.downsample.0", fan_in, width, 1, "hidden")
                tensors += _norm(f"{name}.downsample.1", width)
            fan_in = width
    return tensors + _linear("fc", 512, classes, "output")


def resnet50(classes: int = 1000) -> list[Tensor]:
    """torchvision's ``resnet50``: Bottlenecks [3, 4, 6, 3], widths 64..512 (x4 out), in its parameter order."""
    tensors = _conv("conv1", 3, 64, 7, "input") + _norm("bn1", 64)
    fan_in = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            tensors += _conv(f"{name}.conv1", fan_in, width, 1, "hidden") + _norm(f"{name}.bn1", width)
            tensors += _conv(f"{name}.conv2", width, width, 3, "hidden") + _norm(f"{name}.bn2", width)
            tensors += _conv(f"{name}.conv3", width, 4 * width, 1, "hidden") + _norm(f"{name}.bn3", 4 * width)
            if block == 0:
                tensors += _conv(f"{name}.downsample.0", fan_in, 4 * width, 1, "hidden")
                tensors += _norm(f"{name}.downsample.1", 4 * width)
            fan_in = 4 * width
    return tensors + _linear("fc", fan_in, classes, "output")


def gpt2(d: int = 512, layers: int = 8, vocab: int = 8192, context: int = 1024) -> list[Tensor]:
    """A GPT-2 block stack (pre-norm, 4x MLP, biases) with the output head tied to the token embedding."""
    tensors = _embedding("wte", vocab, d) + _embedding("wpe", context, d)
    for i in range(layers):
        name = f"h.{i}"
        tensors += _norm(f"{name}.ln_1", d)
        tensors += _linear(f"{name}.attn.c_attn", d, 3 * d, "hidden")
        tensors += _linear(f"{name}.attn.c_proj", d, d, "hidden")
        tensors += _norm(f"{name}.ln_2", d)
        tensors += _linear(f"{name}.mlp.c_fc", d, 4 * d, "hidden")
        tensors += _linear(f"{name}.mlp.c_proj", 4 * d, d, "hidden")
    return tensors + _norm("ln_f", d)


def transformer24() -> list[Tensor]:
    """The GPT-2-like stack, 24 layers deep and 256 wide: many small tensors, as in the deep models people train."""
    return gpt2(d=256, layers=24, vocab=8192, context=512)


def toy194() -> list[Tensor]:
    """97 ``Linear(8, 8)`` layers: 194 tiny tensors."""
    return [t for i in range(97) for t in _linear(f"layers.{i}", 8, 8, "hidden")]


def single_2048x512() -> list[Tensor]:
    """One 2048x512 weight (2048 neurons of fan-in 512): 4 MiB in float32."""
    return _linear("layer", 512, 2048, "hidden", bias=False)


SHAPE_SETS = {
    "mlp": mlp,
    "resnet18": resnet18,
    "gpt2": gpt2,
    "resnet50": resnet50,
    "transformer24": transformer24,
    "toy194": toy194,
    "single-2048x512": single_2048x512,
}


def shape_set(name: str) -> list[Tensor]:
    """The tensors of a shape set by name (a key of ``SHAPE_SETS``)."""
    try:
        return SHAPE_SETS[name]()
    except KeyError:
        raise ValueError(f"unknown shape set {name!r}; choose from {sorted(SHAPE_SETS)}") from None


def parameter_count(name: str) -> int:
    return sum(t.size for t in shape_set(name))


def largest_tensor(name: str) -> Tensor:
    return max(shape_set(name), key=lambda t: t.size)
