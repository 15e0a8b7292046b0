"""nero_torch.Nero's state through torch's own machinery: load_state_dict hooks, older state dicts, the step count's
dtype, copies of the optimizer."""

from __future__ import annotations

import pickle
from copy import deepcopy

import pytest
import torch
from torch import nn

import nero_torch


def trained(steps: int = 3, **options) -> tuple[nn.Module, nero_torch.Nero]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = nero_torch.Nero(nero_torch.param_groups(model), **options)
    train(model, opt, steps)
    return model, opt


def train(model: nn.Module, opt: nero_torch.Nero, steps: int) -> None:
    x = torch.linspace(-1, 1, 20).reshape(5, 4)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_a_load_pre_hooks_returned_state_is_the_one_loaded():
    model, opt = trained()
    saved = opt.state_dict()

    def halve_v(optimizer, state_dict):
        edited = deepcopy(state_dict)
        for state in edited["state"].values():
            state["v"] = state["v"] / 2
        return edited

    opt.register_load_state_dict_pre_hook(halve_v)
    opt.load_state_dict(saved)
    for key, p in enumerate(p for group in opt.param_groups for p in group["params"]):
        torch.testing.assert_close(opt.state[p]["v"], saved["state"][key]["v"] / 2, rtol=0, atol=0)


def test_a_load_pre_hooks_result_is_checked_too():
    _, opt = trained()

    def corrupt(optimizer, state_dict):
        edited = deepcopy(state_dict)
        edited["state"][0]["v"][0] = float("nan")
        return edited

    before = deepcopy(opt.state_dict())
    opt.register_load_state_dict_pre_hook(corrupt)
    with pytest.raises(ValueError, match=r"'v' for parameter '0.weight' .* holds NaN or Inf"):
        opt.load_state_dict(before)
    torch.testing.assert_close(opt.state_dict()["state"], before["state"], rtol=0, atol=0)


def test_a_load_post_hooks_edits_are_kept():
    model, opt = trained()

    def reset_sigma(optimizer):
        for state in optimizer.state.values():
            state["sigma"] = torch.full_like(state["sigma"], 0.5)

    opt.register_load_state_dict_post_hook(reset_sigma)
    opt.load_state_dict(opt.state_dict())
    assert all(opt.state[p]["sigma"].item() == 0.5 for p in model.parameters())


def test_a_state_dict_without_maximize_foreach_or_fused_loads_and_steps_as_the_defaults():
    model, opt = trained()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        for option in ("maximize", "foreach", "fused"):
            del group[option]
    twin_model, twin = trained(steps=0)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(saved)
    assert all((g["maximize"], g["foreach"], g["fused"]) == (False, None, None) for g in twin.param_groups)
    train(model, opt, 2)
    train(twin_model, twin, 2)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_the_step_count_follows_the_default_dtype_as_torchs_optimizers(default):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        _, opt = trained()
        adam = torch.optim.Adam([nn.Parameter(torch.zeros(2))])
        adam.param_groups[0]["params"][0].grad = torch.ones(2)
        adam.step()
        expected = next(iter(adam.state.values()))["step"].dtype
        reloaded = nero_torch.Nero(nero_torch.param_groups(trained(steps=0)[0]))
        reloaded.load_state_dict(opt.state_dict())
    finally:
        torch.set_default_dtype(previous)
    assert expected == default
    assert {s["step"].dtype for s in opt.state.values()} == {default}
    assert {s["step"].dtype for s in reloaded.state.values()} == {default}


@pytest.mark.parametrize("copy", [deepcopy, lambda opt: pickle.loads(pickle.dumps(opt))], ids=["deepcopy", "pickle"])
def test_a_copy_keeps_the_skip_policy_and_count_and_steps(copy):
    model, opt = trained(skip_nonfinite="neuron")
    model[0].weight.grad[1, 0] = float("nan")
    opt.step()
    twin = copy(opt)
    assert twin.skipped_steps == 1
    weight = twin.param_groups[0]["params"][0]  # the copy of 0.weight, shape (3, 4)
    for group in twin.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    weight.grad[1, 0] = float("nan")
    before = weight.detach().clone()
    twin.step()
    assert twin.skipped_steps == 2 and opt.skipped_steps == 1
    assert [not torch.equal(weight[i], before[i]) for i in range(3)] == [True, False, True]  # neuron 1 held back
