"""nero_torch's errors name the parameter and the problem; a failed load leaves the optimizer as it was."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from torch import nn

import nero_torch


def trained(model: nn.Module, steps: int = 2, **options) -> nero_torch.Nero:
    opt = nero_torch.Nero(nero_torch.param_groups(model), **options)
    x = torch.randn(4, model[0].in_features, dtype=model[0].weight.dtype)
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    return opt


def test_sparse_gradient_names_the_parameter():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = nero_torch.Nero([("emb.weight", emb.weight)])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients: parameter 'emb.weight' \(shape \(10, 4\)"):
        opt.step()


def test_a_parameter_on_the_meta_device_is_named_at_the_step():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 3))
    opt = nero_torch.Nero(nero_torch.param_groups(model))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"Nero cannot step parameter '0.weight' \(shape \(3, 2\).*meta device"):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize(
    ("param", "message"),
    [
        (torch.zeros(3, 2, dtype=torch.complex64), "complex parameters: parameter 'w' .shape .3, 2., .*complex64"),
        (torch.zeros(3, 2, dtype=torch.int32), "floating-point parameters: parameter 'w' .shape .3, 2., dtype .*int32"),
    ],
)
def test_unsupported_dtypes_name_the_parameter(param, message):
    with pytest.raises(TypeError, match=message):
        nero_torch.Nero([("w", param)])


def test_neuron_axis_out_of_range_names_the_parameter_and_leaves_groups_alone():
    opt = nero_torch.Nero([nn.Parameter(torch.zeros(3, 4))])
    with pytest.raises(ValueError, match=r"neuron_axis 3 is out of range for parameter 1 \(shape \(2, 5, 6\).* 3 dim"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 5, 6))], "neuron_axis": 3})
    assert len(opt.param_groups) == 1


def test_bad_hyperparameters_in_a_group_are_refused():
    with pytest.raises(ValueError, match="Invalid beta"):
        nero_torch.Nero([{"params": [nn.Parameter(torch.zeros(2, 3))], "beta": 1.5}])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        nero_torch.Nero([nn.Parameter(torch.zeros(2, 3))], lr=float("nan"))


def test_loading_state_of_other_shapes_names_the_parameter_and_changes_nothing():
    torch.manual_seed(0)
    small, large = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    saved = trained(small).state_dict()
    opt = trained(large)
    before = deepcopy(opt.state_dict())
    message = r"'v' for parameter '0.weight' \(shape \(5, 3\).*has shape \(4,\).*needs \(5,\)"
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    torch.testing.assert_close(after["state"], before["state"])


def test_loading_a_state_dict_that_is_not_neros_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4))
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    adam.step()
    opt = nero_torch.Nero(model.parameters())
    with pytest.raises(ValueError, match=r"not Nero's: its parameter group 0 lacks \['beta', 'centre', 'neuron_axis'"):
        opt.load_state_dict(adam.state_dict())
    assert len(opt.state) == 0


def test_half_precision_state_stays_float32_through_a_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).to(torch.bfloat16)
    opt = trained(model)
    saved = deepcopy(opt.state_dict())
    fresh = nero_torch.Nero(nero_torch.param_groups(model))
    fresh.load_state_dict(saved)
    for state, original in zip(fresh.state.values(), opt.state.values()):
        assert state["v"].dtype == torch.float32 and state["sigma"].dtype == torch.float32
        torch.testing.assert_close(state["v"], original["v"], rtol=0, atol=0)
