"""nero_torch in training loops: non-finite gradients, LR schedulers, GradScaler, torch.compile, param_groups."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.optim import lr_scheduler

import nero_torch


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def backward(model: nn.Module, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    loss = model(x).pow(2).mean()
    (loss * scale).backward()
    return loss.detach()


def two_group_optimizer(model: nn.Module, **options) -> nero_torch.Nero:
    return nero_torch.Nero(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}], **options
    )


# ---- non-finite gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, None])
def test_non_finite_gradient_skips_the_whole_step_and_is_counted(foreach):
    model, x = make_model(), torch.randn(5, 6)
    opt = two_group_optimizer(model, foreach=foreach)
    for first in (True, False):  # at the first step (no state yet) and later
        opt.zero_grad()
        backward(model, x)
        model[2].bias.grad[1] = float("nan")  # one entry, in the second group only
        params, state = deepcopy(list(model.parameters())), deepcopy(opt.state_dict())
        opt.step()
        for p, q in zip(model.parameters(), params):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(opt.state_dict()["state"], state["state"], rtol=0, atol=0)
        if first:
            assert len(opt.state) == 0
            opt.zero_grad()
            backward(model, x)
            opt.step()
    assert opt.skipped_steps == 2
    restored = two_group_optimizer(make_model(), foreach=foreach)
    restored.load_state_dict(opt.state_dict())
    assert restored.skipped_steps == 2
    assert all(s["step"].item() == 1 for s in opt.state.values())


def test_infinite_gradient_is_skipped_under_torch_compile_without_a_graph_per_outcome():
    model, x = make_model(), torch.randn(5, 6)
    opt = two_group_optimizer(model, lr=torch.tensor(0.01))
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    backward(model, x)
    opt.step()  # state initialisation, eagerly
    for bad in (False, True, False, True):
        opt.zero_grad()
        backward(model, x)
        if bad:
            model[0].weight.grad[0, 0] = float("inf")
        params, steps = deepcopy(list(model.parameters())), [s["step"].item() for s in opt.state.values()]
        step()
        moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), params)]
        assert not any(moved) if bad else all(moved)
        assert [s["step"].item() for s in opt.state.values()] == [s + (0 if bad else 1) for s in steps]
    assert opt.skipped_steps == 2
    assert counter.frame_count == 1


# ---- learning-rate schedules ---------------------------------------------------------------------------------

SCHEDULES = {
    "one_cycle": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12, cycle_momentum=False),
    "cosine": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=12),
    "plateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=10.0),
}


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedulers_drive_the_step_size(schedule, tensor_lr):
    x = torch.randn(5, 6)
    scheduled_model, manual_model = make_model(), make_model()
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    scheduled = two_group_optimizer(scheduled_model, lr=lr)
    manual = two_group_optimizer(manual_model)
    scheduler = SCHEDULES[schedule](scheduled)
    seen = set()
    for _ in range(12):
        for opt, model in ((scheduled, scheduled_model), (manual, manual_model)):
            opt.zero_grad()
            loss = backward(model, x)
        for group, twin in zip(scheduled.param_groups, manual.param_groups):
            twin["lr"] = float(group["lr"])
            seen.add(round(float(group["lr"]), 8))
        scheduled.step()
        manual.step()
        scheduler.step(loss) if schedule == "plateau" else scheduler.step()
    assert len(seen) > 3
    for p, q in zip(scheduled_model.parameters(), manual_model.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("fast", [dict(foreach=False), dict(), dict(fused=True)], ids=["core", "foreach", "fused"])
def test_a_one_element_tensor_lr_of_any_shape_steps_as_its_float(shape, fast):
    """A 0-d parameter beside a bias and a weight (a (1,) lr once broadcast the 0-d update to (1,) and failed), with
    a scheduler changing the tensor in place: the same steps as the float lr."""
    results = []
    for lr in (2.0**-6, torch.full(shape, 2.0**-6)):  # exact in float32, as the schedule's halvings
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s)) for s in ((), (3,), (3, 4))]
        opt = nero_torch.Nero(params, lr=lr, **fast)
        scheduler = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for step in range(5):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            opt.step()
            scheduler.step()
        if isinstance(lr, torch.Tensor):  # the user's tensor is read, never replaced
            assert opt.param_groups[0]["lr"] is lr
        results.append([p.detach().clone() for p in params])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_cpu_tensor_lr_is_read_in_place_for_parameters_on_another_device():
    """A CPU lr with CUDA parameters stays a 0-d CPU tensor, a view of the user's (no copy, no device sync; kernels
    read a CPU scalar on any device): checked on the step's normalisation itself, as this machine has no GPU."""
    from nero_torch._optimizer import _step_lr

    lr = torch.tensor([[0.01]])
    read = _step_lr(lr, torch.device("cuda"))
    assert read.shape == () and read.device.type == "cpu" and read.data_ptr() == lr.data_ptr()


# ---- GradScaler -----------------------------------------------------------------------------------------------


def test_grad_scaler_unscales_and_skips_overflowing_steps():
    x = torch.randn(5, 6)
    scaled_model, plain_model = make_model(), make_model()
    scaled_opt, plain_opt = nero_torch.Nero(scaled_model.parameters()), nero_torch.Nero(plain_model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for i in range(6):
        scaled_opt.zero_grad()
        loss = scaled_model(x).pow(2).mean()
        if i == 3:
            loss = loss * float("inf")  # an overflow: the scaler skips this step and lowers its scale
        scaler.scale(loss).backward()
        state = deepcopy(scaled_opt.state_dict())
        scaler.step(scaled_opt)
        scaler.update()
        if i == 3:
            torch.testing.assert_close(scaled_opt.state_dict()["state"], state["state"], rtol=0, atol=0)
            assert scaler.get_scale() == 2.0**11
            continue
        plain_opt.zero_grad()
        backward(plain_model, x)
        plain_opt.step()
    for p, q in zip(scaled_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q)


# ---- torch.compile of the training step ----------------------------------------------------------------------


@pytest.mark.parametrize("tensor_lr", [True, False])
def test_compiled_training_step_matches_eager_and_does_not_recompile_on_new_lr(tensor_lr):
    x = torch.randn(5, 6)
    results = []
    for compiled in (False, True):
        model = make_model()
        opt = two_group_optimizer(model, lr=torch.tensor(0.01) if tensor_lr else 0.01)
        scheduler = lr_scheduler.CosineAnnealingLR(opt, T_max=8)
        counter = CompileCounter()

        def train_step():
            opt.zero_grad()
            backward(model, x)
            opt.step()

        run = torch.compile(train_step, backend=counter) if compiled else train_step
        for i in range(8):
            if i == 2:  # the first step initialises state (the core rule, eagerly); the second is the steady graph
                frames = counter.frame_count
            run()
            scheduler.step()
        results.append([p.detach() for p in model.parameters()])
        if compiled:  # a float lr becomes dynamic after its first change: one more graph, then none
            assert counter.frame_count - frames <= (0 if tensor_lr else 1)
    for p, q in zip(*results):
        torch.testing.assert_close(p, q)


def test_a_whole_training_step_compiled_by_inductor_matches_eager():
    """Model, loss, backward and opt.step() in one torch.compile with its default backend, inductor (generated C++
    kernels, not just tracing): the same parameters, state and skip count as eager, to float32 rounding, over steps
    that include a non-finite one; Nero's step compiles into inductor graphs once."""
    from torch._dynamo.testing import CompileCounterWithBackend

    x, poisoned = torch.randn(5, 6), torch.full((5, 6), float("inf"))
    runs = []
    for compiled in (False, True):
        model = make_model()
        opt = two_group_optimizer(model, lr=torch.tensor(0.01))
        counter = CompileCounterWithBackend("inductor")

        def train_step(inputs):
            opt.zero_grad()
            backward(model, inputs)
            opt.step()

        run = torch.compile(train_step, backend=counter) if compiled else train_step
        train_step(x)  # the first step initialises state (the core rule) eagerly, in both runs
        for i in range(4):
            if i == 2:
                frames = counter.frame_count
            run(poisoned if i == 1 else x)
        runs.append((model, opt))
        if compiled:
            assert frames > 0 and counter.frame_count == frames  # compiled, and no recompile after the first steps
    (eager, eager_opt), (inductor, inductor_opt) = runs
    assert inductor_opt.skipped_steps == eager_opt.skipped_steps == 1
    for p, q in zip(eager.parameters(), inductor.parameters()):
        torch.testing.assert_close(q, p)
        for key in ("v", "sigma", "step"):
            torch.testing.assert_close(inductor_opt.state[q][key], eager_opt.state[p][key])


# ---- param_groups -------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.up = nn.ConvTranspose2d(6, 5, 2)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 10)


def test_param_groups_pick_the_neuron_axis_per_module_type():
    groups = nero_torch.param_groups(Net(), unconstrained=["head"], lr=0.02)
    by_name = {name: g for g in groups for name, _ in g["params"]}
    assert by_name["emb.weight"]["neuron_axis"] == 0
    assert by_name["conv.weight"]["neuron_axis"] == 0
    assert by_name["up.weight"]["neuron_axis"] == 1
    for bias_like in ("conv.bias", "bn.weight", "bn.bias", "up.bias", "norm.weight", "norm.bias", "head.bias"):
        assert by_name[bias_like]["neuron_axis"] is None
    head = by_name["head.weight"]
    assert (head["neuron_axis"], head["centre"], head["normalise"]) == (0, False, False)
    assert "centre" not in by_name["conv.weight"]
    assert all(g["lr"] == 0.02 for g in groups)
    opt = nero_torch.Nero(groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(Net().parameters()))


def test_param_groups_leave_a_tied_head_unconstrained():
    model = Net()
    model.head = nn.Linear(4, 10)
    model.head.weight = model.emb.weight  # tied
    groups = nero_torch.param_groups(model, unconstrained=["head"])
    tied = [g for g in groups for name, _ in g["params"] if name == "emb.weight"]
    assert len(tied) == 1 and tied[0]["centre"] is False
    assert sum(p is model.emb.weight for g in groups for _, p in g["params"]) == 1


@pytest.mark.parametrize("fast", [dict(), dict(foreach=False), dict(fused=True)])
def test_a_group_without_gradients_is_left_alone(fast):
    torch.manual_seed(0)
    frozen, trained = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    opt = nero_torch.Nero([{"params": frozen.parameters()}, {"params": trained.parameters()}], **fast)
    before = [p.detach().clone() for p in frozen.parameters()]
    for _ in range(3):
        opt.zero_grad()
        trained(torch.randn(8, 4)).square().mean().backward()  # no gradient reaches ``frozen``
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.parameters()))
    assert not any(p in opt.state for p in frozen.parameters())
    assert all(float(opt.state[p]["step"]) == 3 for p in trained.parameters())
    assert torch.allclose(trained.weight.norm(dim=1), torch.ones(3))
