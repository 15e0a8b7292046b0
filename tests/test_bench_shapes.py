"""The benchmark shape sets: parameter counts of the models they stand for, and both layouts agreeing."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "asv_bench"))

from benchmarks.shapes import SHAPE_SETS, largest_tensor, parameter_count, shape_set  # noqa: E402

# Independent counts: torchvision's resnet18() has 11,689,512 parameters (62 tensors) and resnet50() 25,557,032
# (161 tensors); the MLPs and the GPT-2-like models are counted here by formula.
D, L, V, CONTEXT = 512, 8, 8192, 1024


def gpt2_count(d: int, layers: int, vocab: int, context: int) -> int:
    return 12 * layers * d * d + vocab * d + context * d + layers * (4 * d + 3 * d + d + 4 * d + d) + 2 * d


GPT2 = gpt2_count(D, L, V, CONTEXT)
MLP = 4 * (784 * 784 + 784) + 784 * 10 + 10


@pytest.mark.parametrize(
    ("name", "count", "tensors"),
    [
        ("mlp", MLP, 10),
        ("resnet18", 11_689_512, 62),
        ("gpt2", GPT2, 2 + 12 * L + 2),
        ("resnet50", 25_557_032, 161),
        ("transformer24", gpt2_count(256, 24, 8192, 512), 2 + 12 * 24 + 2),
        ("toy194", 97 * (8 * 8 + 8), 194),
        ("single-2048x512", 2048 * 512, 1),
    ],
)
def test_parameter_counts(name: str, count: int, tensors: int) -> None:
    assert parameter_count(name) == count
    assert len(shape_set(name)) == tensors


def test_documented_sizes() -> None:
    assert parameter_count("mlp") == 2_469_610
    assert 29e6 < parameter_count("gpt2") < 30e6  # "about 29M": 12*L*d^2 + V*d = 29.36M, plus positions and biases
    assert largest_tensor("gpt2").torch_shape == (V, D)
    assert largest_tensor("resnet18").torch_shape == (512, 512, 3, 3)


@pytest.mark.parametrize("name", list(SHAPE_SETS))
def test_layouts_agree(name: str) -> None:
    for t in shape_set(name):
        assert sorted(t.torch_shape) == sorted(t.flax_shape), t.name
        assert math.prod(t.flax_shape) == t.size
        if t.torch_axis is None:
            assert t.flax_axis is None and len(t.torch_shape) == 1, t.name
        else:  # the same neurons, with the same fan-in, in both layouts
            assert t.torch_shape[t.torch_axis] == t.flax_shape[t.flax_axis], t.name
            assert t.fan_in == t.size // t.flax_shape[t.flax_axis] >= 2, t.name


def test_flax_kernels_put_neurons_last() -> None:
    conv = next(t for t in shape_set("resnet18") if t.name == "layer2.0.conv1.weight")
    assert (conv.torch_shape, conv.torch_axis) == ((128, 64, 3, 3), 0)
    assert (conv.flax_shape, conv.flax_axis) == ((3, 3, 64, 128), 3)
    embedding = next(t for t in shape_set("gpt2") if t.name == "wte.weight")
    assert embedding.flax_axis == embedding.torch_axis == 0  # Embed is (vocab, d) in Flax too: a neuron per token


def test_muon_roles() -> None:
    hidden = [t.name for t in shape_set("gpt2") if t.role == "hidden"]
    assert len(hidden) == 4 * L and all(".attn." in n or ".mlp." in n for n in hidden)
    roles = [t.role for t in shape_set("mlp") if len(t.torch_shape) == 2]
    assert roles == ["input", "hidden", "hidden", "hidden", "output"]


def test_unknown_shape_set() -> None:
    with pytest.raises(ValueError, match="unknown shape set 'vgg'"):
        shape_set("vgg")
