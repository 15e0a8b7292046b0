"""Checkpoints: a run stopped, saved, reloaded in a new process and continued matches the uninterrupted run bit
for bit (torch and optax), and a checkpoint that does not fit fails with a clear error, changing nothing."""

from __future__ import annotations

import math
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest

import checkpoint_worker

WORKER = Path(__file__).with_name("checkpoint_worker.py")


def run_worker(framework: str, phase: str, directory: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(WORKER), framework, phase, str(directory)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]


def assert_bitwise(a, b, where: str = "") -> None:
    """Equal containers, and arrays of equal dtype, shape and bytes (so -0.0 and 0.0 differ)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(_bytes(a), _bytes(b)), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for key in a:
            assert_bitwise(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (where, a, b)


def _bytes(t):
    import torch

    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)


# ---- resumed in a new process, bit for bit ---------------------------------------------------------------------


def test_torch_run_resumed_in_a_new_process_matches_the_uninterrupted_run(tmp_path):
    torch = pytest.importorskip("torch")
    checkpoint_worker.torch_phase("first", tmp_path)  # here; the resumed run in a new process
    run_worker("torch", "resume", tmp_path)
    names = list(checkpoint_worker.torch_variants())
    for name in names:
        whole = torch.load(tmp_path / f"{name}-uninterrupted.pt")
        resumed = torch.load(tmp_path / f"{name}-resumed.pt")
        stopped = torch.load(tmp_path / f"{name}-checkpoint.pt")
        assert_bitwise(resumed, whole, name)  # model, optimizer (state, groups, skipped count) and scheduler
        # The runs did what they should: two NaN steps skipped and counted, one on each side of the stop.
        assert int(stopped["opt"]["skipped_steps"]) == 1 and int(whole["opt"]["skipped_steps"]) == 2, name
        steps = {s["step"].item() for s in whole["opt"]["state"].values()}
        assert steps == {checkpoint_worker.STEPS - 2}, name
        assert any(not torch.equal(whole["model"][k], stopped["model"][k]) for k in whole["model"]), name


def test_optax_run_resumed_in_a_new_process_matches_the_uninterrupted_run(tmp_path):
    pytest.importorskip("jax")
    serialization = pytest.importorskip("flax.serialization")
    checkpoint_worker.optax_phase("first", tmp_path)  # here (conftest enables x64, as the worker does)
    run_worker("optax", "resume", tmp_path)
    for name in checkpoint_worker.optax_variants():
        whole, resumed, stopped = (
            serialization.msgpack_restore((tmp_path / f"{name}-{label}.msgpack").read_bytes())
            for label in ("uninterrupted", "resumed", "checkpoint")
        )
        assert_bitwise(resumed, whole, name)
        ran, stopped_at = _nero_states(whole["state"]), _nero_states(stopped["state"])
        assert [(int(n["count"]), int(n["skipped"])) for n in ran] == [(checkpoint_worker.STEPS - 2, 2)], name
        assert [int(n["skipped"]) for n in stopped_at] == [1], name
        assert not np.array_equal(whole["params"]["dense"]["kernel"], stopped["params"]["dense"]["kernel"]), name


def _nero_states(tree):
    """The Nero states in a state dict (the dicts that hold a ``skipped`` count), wherever the chain put them."""
    if not isinstance(tree, dict):
        return []
    if "skipped" in tree:
        return [tree]
    return [found for value in tree.values() for found in _nero_states(value)]


# ---- torch: a checkpoint that does not fit ---------------------------------------------------------------------


def _snapshot(opt):
    import torch

    return {
        "groups": deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        "params": [[id(p) for p in g["params"]] for g in opt.param_groups],
        "state": {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
        "skipped": opt.skipped_steps,
        "tensors": {id(p): {k: v.data_ptr() for k, v in s.items() if isinstance(v, torch.Tensor)}
                    for p, s in opt.state.items()},
    }


def _trained_nero(model, steps=2, **options):
    import torch

    import nero_torch

    opt = nero_torch.Nero(model.parameters(), **options)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).to(model[0].weight.dtype)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    model[0].weight.grad[0, 0] = float("inf")
    opt.step()  # one skipped step, so the count is part of what must not change
    return opt


def _other_optimizer(kind):
    """A state dict from a model like the one under test (Linear(3, 4), Linear(4, 2))."""
    import torch
    from torch import nn

    import nero_torch

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    if kind == "nero-other-shapes":
        model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    if kind.startswith("nero"):
        return _trained_nero(model).state_dict()
    opt = {
        "adam": lambda: torch.optim.Adam(model.parameters()),
        "adam-fresh": lambda: torch.optim.Adam(model.parameters()),
        "sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "agd": lambda: nero_torch.AGD(model.parameters()),
        "star": lambda: nero_torch.Star(model.parameters()),
    }[kind]()
    if kind != "adam-fresh":
        model(torch.randn(2, 3)).pow(2).sum().backward()
        opt.step()
    return opt.state_dict()


def _state_edit(key, change):
    """Replace parameter 0's saved ``key`` by ``change(torch, old)``."""

    def edit(torch, state_dict):
        state_dict["state"][0][key] = change(torch, state_dict["state"][0][key])
        return state_dict

    return edit


def _state_drop(key):
    """Parameter 0's saved state without ``key``, its groups still Nero's."""

    def edit(torch, state_dict):
        del state_dict["state"][0][key]
        return state_dict

    return edit


def _group_edit(key, value):
    def edit(torch, state_dict):
        state_dict["param_groups"][0][key] = value(torch)
        return state_dict

    return edit


def _skipped_edit(value):
    def edit(torch, state_dict):
        state_dict["skipped_steps"] = value
        return state_dict

    return edit


def _two_groups(torch, state_dict):
    return {**state_dict, "param_groups": state_dict["param_groups"] * 2}


P0 = r"parameter 0 \(shape \(4, 3\), dtype torch.float32\)"
NOT_NEROS = (r"not Nero's: its parameter group 0 lacks \['beta', 'centre', 'neuron_axis', 'normalise'\] "
             r"\(a state dict of another optimizer\?\)")
TORCH_BAD_CHECKPOINTS = {  # name: (where the state dict comes from, how it is then edited, the error's message)
    "adam": ("adam", None, NOT_NEROS),
    "adam-no-state-yet": ("adam-fresh", None, NOT_NEROS),
    "sgd": ("sgd", None, NOT_NEROS),
    "agd": ("agd", None, NOT_NEROS),
    "star": ("star", None, NOT_NEROS),
    "state-lacks-v": ("nero", _state_drop("v"), rf"state for {P0} lacks \['v'\]: it is not Nero's state"),
    "other-shapes": ("nero-other-shapes", None, r"'v' for parameter 0 \(shape \(4, 3\).* has shape \(5,\), but "
                     r"this parameter needs \(4,\) \(a state dict from a model of different shapes\?\)"),
    "v-2d": ("nero", _state_edit("v", lambda torch, v: v[:, None]),
             rf"'v' for {P0} has shape \(4, 1\), but this parameter needs \(4,\)"),
    "v-int64": ("nero", _state_edit("v", lambda torch, v: v.to(torch.int64)),
                rf"'v' for {P0} has dtype torch.int64, not a real float"),
    "v-complex": ("nero", _state_edit("v", lambda torch, v: v.to(torch.complex64)),
                  rf"'v' for {P0} has dtype torch.complex64, not a real float"),
    "v-nan": ("nero", _state_edit("v", lambda torch, v: v * float("nan")),
              rf"'v' for {P0} holds NaN or Inf: the checkpoint is corrupt"),
    "sigma-inf": ("nero", _state_edit("sigma", lambda torch, s: s * float("inf")),
                  rf"'sigma' for {P0} holds NaN or Inf"),
    "step-negative": ("nero", _state_edit("step", lambda torch, s: -s),
                      rf"saved step for {P0} is -2.0, but a step count is >= 0"),
    "skipped-text": ("nero", _skipped_edit("x"), r"skipped_steps must be a count >= 0, got 'x'"),
    "skipped-negative": ("nero", _skipped_edit(-1), r"skipped_steps must be a count >= 0, got -1"),
    "skipped-float": ("nero", _skipped_edit(1.5), r"skipped_steps must be a count >= 0, got 1.5"),
    "lr-nan": ("nero", _group_edit("lr", lambda torch: float("nan")), r"Invalid learning rate: nan \(a finite number"),
    "lr-tensor-negative": ("nero", _group_edit("lr", lambda torch: torch.tensor(-0.1)),
                           r"Invalid learning rate: tensor\(-0.1000\) \(a finite number >= 0\)"),
    "two-groups": ("nero", _two_groups, r"loaded state dict has a different number of parameter groups"),
}


@pytest.mark.parametrize("case", list(TORCH_BAD_CHECKPOINTS))
def test_torch_checkpoint_that_does_not_fit_fails_clearly_and_changes_nothing(case):
    torch = pytest.importorskip("torch")
    from torch import nn

    source, edit, message = TORCH_BAD_CHECKPOINTS[case]
    saved = _other_optimizer(source)
    if edit is not None:
        saved = edit(torch, saved)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = _trained_nero(model)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    after = _snapshot(opt)
    assert after["groups"] == before["groups"] and after["params"] == before["params"]
    assert after["tensors"] == before["tensors"]  # the same tensor objects, not replacements
    assert_bitwise(after["state"], before["state"])
    assert after["skipped"] == before["skipped"] == 1


def test_torch_float64_checkpoint_loads_into_a_float32_model_as_float32_state():
    """torch's convention for optimizer state: floating state follows its parameter's (compute) dtype."""
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    saved = _trained_nero(wide).state_dict()
    narrow = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    narrow.load_state_dict(wide.state_dict())
    opt = _trained_nero(narrow, steps=0)
    opt.load_state_dict(saved)
    for i, p in enumerate(narrow.parameters()):
        state, source = opt.state[p], saved["state"][i]
        assert state["v"].dtype == torch.float32 and state["sigma"].dtype == torch.float32
        assert torch.equal(state["v"], source["v"].float()) and torch.equal(state["step"], source["step"])
    assert opt.skipped_steps == 1


# ---- optax: restore_state ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def optax_setup():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import nero_optax

    def params(dtype=jnp.float32, wide=4):
        rng = np.random.default_rng(0)
        return {"dense": {"kernel": jnp.asarray(rng.normal(size=(6, wide)), dtype),
                          "bias": jnp.asarray(rng.normal(size=wide), dtype)},
                "scale": jnp.asarray(1.5, dtype)}

    opt = nero_optax.nero()
    p = params()
    grads = jax.tree.map(lambda x: x * 0.5 + 0.1, p)
    update = jax.jit(opt.update)
    _, state = update(grads, opt.init(p), p)
    return opt, params, p, grads, update, state


def _saved(state):
    from flax import serialization

    return serialization.msgpack_restore(serialization.to_bytes(state))


def test_restore_state_rebuilds_a_nero_state_that_jits_like_the_original(optax_setup):
    import jax

    import nero_optax

    opt, _, p, grads, update, state = optax_setup
    loaded = _saved(state)
    kept = deepcopy(loaded)
    restored = nero_optax.restore_state(opt.init(p), loaded)
    assert isinstance(restored, nero_optax.NeroState)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert_bitwise(loaded, kept)  # the loaded tree is not changed
    expected = update(grads, state, p)
    got = update(grads, restored, p)
    assert update._cache_size() == 1  # same types, placement and weak types: no recompile
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_restore_state_takes_the_template_containers_and_abstract_templates(optax_setup):
    import jax
    from flax import serialization

    import nero_optax

    opt, _, p, _, _, state = optax_setup
    template = jax.eval_shape(opt.init, p)
    by_target = serialization.from_bytes(opt.init(p), serialization.to_bytes(state))
    for loaded in (by_target, state):
        restored = nero_optax.restore_state(template, loaded)
        assert jax.tree.structure(restored) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _adam_state(p):
    import optax

    return optax.adam(0.1).init(p)


OPTAX_BAD_CHECKPOINTS = {
    "adam-state-dict": (lambda s, params, p: _saved(_adam_state(p)),
                        r"does not match this optimizer's NeroState: it lacks count, v/dense/bias, v/dense/kernel, "
                        r"v/scale and 4 more and has 0/count, 0/mu/dense/bias, .* \(a state saved by another "
                        r"optimizer"),
    "adam-state-object": (lambda s, params, p: _adam_state(p),
                          r"checkpoint holds a tuple where this optimizer's state is a NeroState: a state saved by "
                          r"another optimizer\?"),
    "other-shapes": (lambda s, params, p: _saved(_state_for(params(wide=5))),
                     r"checkpoint leaf .v\['dense'\]\['bias'\] has shape \(5,\) but this state needs \(4,\)"),
    "other-dtype": (lambda s, params, p: _saved(_state_for(params(dtype=np.float64))),
                    r"checkpoint leaf .v\['dense'\]\['bias'\] has dtype float64 but this state needs float32"),
    "missing-leaf": (lambda s, params, p: _without(_saved(s), "sigma", "scale"),
                     r"it lacks sigma/scale \(a state saved by another optimizer, or for other params\?\)"),
    "extra-leaf": (lambda s, params, p: _with(_saved(s), "v", "head", np.zeros(3, np.float32)),
                   r"it has v/head, which this state does not"),
    "nan": (lambda s, params, p: _with(_saved(s), "sigma", "scale", np.array(np.nan, np.float32)),
            r"checkpoint leaf .sigma\['scale'\] holds NaN or Inf: the checkpoint is corrupt"),
    "count-int64": (lambda s, params, p: {**_saved(s), "count": np.array(1, np.int64)},
                    r"checkpoint leaf .count has dtype int64 but this state needs int32"),
}


def _state_for(params):
    import nero_optax

    return nero_optax.nero().init(params)


def _without(tree, field, key):
    tree[field] = {k: v for k, v in tree[field].items() if k != key}
    return tree


def _with(tree, field, key, value):
    tree[field] = {**tree[field], key: value}
    return tree


@pytest.mark.parametrize("case", list(OPTAX_BAD_CHECKPOINTS))
def test_restore_state_names_what_does_not_fit(optax_setup, case):
    import jax

    import nero_optax

    opt, params, p, _, _, state = optax_setup
    template = opt.init(p)
    kept = [np.asarray(x).copy() for x in jax.tree.leaves(template)]
    loaded = OPTAX_BAD_CHECKPOINTS[case][0](state, params, p)
    with pytest.raises(ValueError, match=OPTAX_BAD_CHECKPOINTS[case][1]):
        nero_optax.restore_state(template, loaded)
    for a, b in zip(jax.tree.leaves(template), kept, strict=True):
        assert np.asarray(a).tobytes() == b.tobytes()


def test_restore_state_keeps_an_inf_that_init_itself_gives(optax_setup):
    """``reduce_on_plateau`` starts its best loss at Inf: a checkpoint holding it is not corrupt; a NaN is."""
    import jax
    import jax.numpy as jnp
    import optax

    import nero_optax

    _, _, p, grads, _, _ = optax_setup
    opt = optax.chain(nero_optax.nero(), optax.contrib.reduce_on_plateau())
    state = opt.init(p)
    _, state = opt.update(grads, state, p, value=jnp.asarray(1.0))
    loaded = _saved(opt.init(p))  # best_value is still Inf here
    restored = nero_optax.restore_state(opt.init(p), loaded)
    assert jnp.isinf(restored[1].best_value)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(opt.init(p))))
    loaded["1"]["best_value"] = np.float32("nan")
    with pytest.raises(ValueError, match=r"best_value holds NaN or Inf: the checkpoint is corrupt"):
        nero_optax.restore_state(opt.init(p), loaded)
