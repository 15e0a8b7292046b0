"""No silent misconfiguration: the role audit (``describe``), errors for names that match nothing, and one
``ConfigWarning`` per suspicious tensor, naming it and the fix, in torch and optax."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import nero_core
from nero_core._audit import ConfigWarning


def config_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ConfigWarning)]


@pytest.fixture
def caught():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record


# ---- the core --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xp", [None, np])
def test_the_core_given_a_dict_says_it_wants_a_sequence_of_arrays(xp):
    params = {"w": np.ones((3, 2)), "b": np.zeros(2)}
    with pytest.raises(TypeError, match=r"params must be a sequence of arrays.*list\(params.values\(\)\)"):
        nero_core.nero().init(params, xp=xp)


# ---- torch -----------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
nn = torch.nn
import nero_torch  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)


def names_of(groups, **where):
    return sorted(n for g in groups if all(g.get(k) == v for k, v in where.items()) for n, _ in g["params"])


@pytest.mark.parametrize("entry, closest", [("fcc", "fc"), ("haed", "head"), ("fc.wieght", "fc.weight")])
def test_an_unconstrained_name_matching_nothing_is_an_error_naming_the_closest(entry, closest):
    with pytest.raises(ValueError, match=rf"unconstrained entry '{entry}' matches no module or parameter.*'{closest}'"):
        nero_torch.param_groups(Net(), unconstrained=[entry])


def test_unconstrained_takes_module_and_parameter_names():
    groups = nero_torch.param_groups(Net(), unconstrained=["head", "fc.weight"])
    assert names_of(groups, normalise=False) == ["fc.weight", "head.weight"]
    with pytest.raises(TypeError, match="a list of names"):
        nero_torch.param_groups(Net(), unconstrained="head")


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_a_wrapped_model_has_the_names_of_the_model_inside(wrap):
    model = Net()
    wrapped = torch.compile(model, backend="eager") if wrap == "compile" else nn.DataParallel(model)
    prefix = "_orig_mod." if wrap == "compile" else "module."
    assert [n for n, _ in wrapped.named_parameters()][0].startswith(prefix)  # what the user sees from torch
    plain = nero_torch.param_groups(model, unconstrained=["head"])
    for entry in ["head", prefix + "head"]:
        groups = nero_torch.param_groups(wrapped, unconstrained=[entry])
        assert [(g["neuron_axis"], g.get("normalise"), [n for n, _ in g["params"]]) for g in groups] == [
            (g["neuron_axis"], g.get("normalise"), [n for n, _ in g["params"]]) for g in plain
        ]


def test_neuron_axes_names_a_tensor_axis_and_an_unknown_name_is_an_error():
    groups = nero_torch.param_groups(Net(), neuron_axes={"fc": None, "emb.weight": 1})
    axes = {n: g["neuron_axis"] for g in groups for n, _ in g["params"]}
    assert axes["fc.weight"] is None and axes["emb.weight"] == 1 and axes["conv.weight"] == 0
    with pytest.raises(ValueError, match=r"neuron_axes entry 'embb' matches no module.*'emb'"):
        nero_torch.param_groups(Net(), neuron_axes={"embb": 1})


def test_describe_a_model_and_an_optimizer(capsys):
    rows = nero_torch.describe(Net(), unconstrained=["head"])
    table = capsys.readouterr().out
    by_name = {r.name: r for r in rows}
    assert len(rows) == 7 and "why" in table.splitlines()[0] and "conv.weight" in table
    conv = by_name["conv.weight"]
    assert (conv.shape, conv.role, conv.neuron_axis, conv.neurons, conv.fan_in) == (
        (8, 3, 3, 3), "neuron tensor", 0, 8, 27
    )
    assert "Conv2d" in conv.why
    head = by_name["head.weight"]
    assert (head.role, head.neurons, head.fan_in) == ("unconstrained", 3, 4) and "unconstrained" in head.why
    assert by_name["fc.bias"].role == "bias-like" and by_name["fc.bias"].neurons is None
    opt = nero_torch.Nero(nero_torch.param_groups(Net(), unconstrained=["head"]))
    rows = nero_torch.describe(opt)
    assert {r.name: (r.role, r.neuron_axis) for r in rows} == {
        r.name: (r.role, r.neuron_axis) for r in by_name.values()
    }
    plain = nero_torch.describe(nero_torch.Nero(Net().parameters()))
    assert plain[0].name == "params[0]" and plain[0].why == "group 0: neuron_axis=0"


class WithPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 5, 8))  # a raw (1, T, d) positional embedding
        self.rel_bias = nn.Parameter(torch.zeros(4, 4))  # an attention bias table
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)  # one output


def test_warnings_name_each_suspicious_tensor_once_with_the_fix(caught):
    nero_torch.Nero(nero_torch.param_groups(WithPositions()))
    messages = config_warnings(caught)
    assert len(messages) == 2, messages  # pos (two reasons, one warning) and out.weight; rel_bias is bias-like
    pos, out = messages
    assert "'pos' of shape (1, 5, 8)" in pos and "positional embedding" in pos and "one neuron" in pos
    assert "neuron_axes={'pos': 1}" in pos
    assert "'out.weight'" in out and "one neuron" in out and "unconstrained=['out']" in out
    assert caught[0].filename == __file__  # shown at the user's line, so the default filter shows it once


def test_the_fixes_the_warnings_name_silence_them(caught):
    groups = nero_torch.param_groups(WithPositions(), neuron_axes={"pos": 1}, unconstrained=["out"])
    opt = nero_torch.Nero(groups)
    assert config_warnings(caught) == []
    pos = next(r for r in nero_torch.describe(opt) if r.name == "pos")
    assert (pos.neuron_axis, pos.neurons, pos.fan_in) == (1, 5, 8)


def test_named_parameters_warn_for_a_bias_named_neuron_tensor(caught):
    nero_torch.Nero(list(WithPositions().named_parameters()))
    bias = [m for m in config_warnings(caught) if "rel_bias" in m]
    assert len(bias) == 1 and "named like a bias" in bias[0] and "neuron_axes={'rel_bias': None}" in bias[0]


def test_a_kernel_sized_neuron_axis_warns(caught):
    conv = nn.Conv2d(3, 16, 3)
    nero_torch.Nero(conv.parameters(), neuron_axis=-1)
    (message,) = config_warnings(caught)
    assert "params[0] of shape (16, 3, 3, 3)" in message and "kernel size" in message and "neuron_axis=0" in message
    nero_torch.Nero(nn.Conv2d(3, 16, 3).parameters())
    nero_torch.Nero(nero_torch.param_groups(nn.ConvTranspose2d(16, 3, 5)))  # (in, out, k, k): axis 1, 3 neurons
    assert len(config_warnings(caught)) == 1


def test_add_param_group_takes_groups_from_param_groups():
    model, more = Net(), nn.Linear(3, 5)
    plain = nero_torch.Nero(model.parameters())
    for group in nero_torch.param_groups(more):
        plain.add_param_group(group)
    assert len(plain.param_groups) == 3 and "param_names" not in plain.param_groups[-1]
    named = nero_torch.Nero(nero_torch.param_groups(model))
    named.add_param_group(nero_torch.param_groups(more)[0])
    assert named.param_groups[-1]["param_names"] == ["weight"]
    with pytest.raises(ValueError, match=r"parameter groups carry names.*param_groups\(module\)"):
        named.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))]})


def test_agd_takes_torch_lr_schedulers_as_a_gain_schedule():
    """AGD's gain is its group's lr: StepLR halving it each step gives the steps of the gains set by hand."""

    def trained(how):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Tanh(), nn.Linear(8, 2, bias=False))
        opt = nero_torch.AGD(net.parameters(), gain=1.0)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if how == "scheduler" else None
        x = torch.randn(16, 4)
        for step in range(3):
            if how == "by hand":
                opt.param_groups[0]["lr"] = 0.5**step
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()]), opt

    scheduled, opt = trained("scheduler")
    assert opt.param_groups[0]["lr"] == 0.125
    torch.testing.assert_close(scheduled, trained("by hand")[0], rtol=0, atol=0)
    assert not torch.equal(scheduled, trained("constant")[0])
    saved = opt.state_dict()  # one saved when the gain was the group's "gain" still loads
    saved["param_groups"][0]["gain"] = saved["param_groups"][0].pop("lr")
    net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Tanh(), nn.Linear(8, 2, bias=False))
    resumed = nero_torch.AGD(net.parameters())
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 0.125 and "gain" not in resumed.param_groups[0]


# ---- optax -----------------------------------------------------------------------------------------------------


def _optax():
    pytest.importorskip("optax")
    import jax
    import jax.numpy as jnp
    import optax

    import nero_optax

    return jax, jnp, optax, nero_optax


def test_equinox_weights_under_the_flax_default_warn_and_neuron_axis_0_does_not(caught):
    eqx = pytest.importorskip("equinox")
    jax, _, _, nero_optax = _optax()
    model = eqx.nn.MLP(4, 3, width_size=8, depth=1, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    nero_optax.nero().init(params)
    messages = config_warnings(caught)
    assert len(messages) == 2 and all("named 'weight'" in m and "neuron_axis=0" in m for m in messages)
    assert ".layers[0].weight of shape (8, 4)" in messages[0]
    caught.clear()
    nero_optax.nero(neuron_axis=0).init(params)
    assert config_warnings(caught) == []


def test_flax_kernels_with_axis_0_and_shape_mistakes_warn(caught):
    jax, jnp, _, nero_optax = _optax()
    params = {
        "Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
        "conv": jnp.ones((3, 3, 2, 16)),  # Flax conv layout, not named kernel
        "pos_embedding": jnp.ones((1, 5, 8)),
        "out": {"kernel": jnp.ones((8, 1))},
    }
    nero_optax.nero(neuron_axis=0).init({"Dense_0": params["Dense_0"], "conv": params["conv"]})
    kernel, conv = config_warnings(caught)
    assert "['Dense_0']['kernel']" in kernel and "named 'kernel'" in kernel and "neuron_axis=-1" in kernel
    assert "['conv'] of shape (3, 3, 2, 16)" in conv and "kernel size" in conv
    caught.clear()
    nero_optax.nero().init({"pos_embedding": params["pos_embedding"], "out": params["out"]})
    out, pos = config_warnings(caught)  # in leaf order
    assert "positional embedding" in pos and "give it axis 1" in pos
    assert "['out']['kernel'] of shape (8, 1)" in out and "one neuron" in out and "optax.partition" in out


def test_nnx_attention_biases_are_bias_like_under_flax_neuron_axis(caught):
    nnx = pytest.importorskip("flax.nnx")
    jax, jnp, _, nero_optax = _optax()

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
            self.embed = nnx.Embed(11, 8, rngs=rngs)

    block = Block(nnx.Rngs(0))
    nnx.Optimizer(block, nero_optax.nero(), wrt=nnx.Param)  # the Flax default -1: (heads, head_dim) biases
    biases = config_warnings(caught)
    assert len(biases) == 3 and all("named like a bias" in m and ".value" in m for m in biases)
    caught.clear()
    optimizer = nnx.Optimizer(block, nero_optax.nero(neuron_axis=nero_optax.flax_neuron_axis), wrt=nnx.Param)
    assert config_warnings(caught) == []
    v = optimizer.opt_state.v
    assert v["attention"]["query"]["bias"].shape == (2, 4)  # elementwise, like any bias
    assert v["embed"]["embedding"].shape == (11,)  # one neuron per token
    rows = nero_optax.describe(nnx.state(block, nnx.Param), nero_optax.flax_neuron_axis)
    query_bias = next(r for r in rows if r.name == "['attention']['query']['bias'].value")
    assert query_bias.role == "bias-like" and "Flax rule: a bias" in query_bias.why


def test_describe_a_pytree(capsys):
    jax, jnp, _, nero_optax = _optax()
    params = {"w": jax.ShapeDtypeStruct((6, 4), jnp.float32), "b": jnp.zeros(4), "w1": jnp.zeros((1, 6))}
    rows = nero_optax.describe(params)
    assert "neurons" in capsys.readouterr().out
    assert [(r.name, r.role, r.neuron_axis, r.neurons, r.fan_in) for r in rows] == [
        ("['b']", "bias-like", None, None, None),
        ("['w']", "neuron tensor", 1, 4, 6),
        ("['w1']", "bias-like", None, None, None),
    ]
    assert rows[1].why == "neuron_axis=-1 for every leaf" and rows[2].why.startswith("fan-in 1")
    free = nero_optax.describe(params, lambda path, leaf: 0, centre=False, normalise=False)
    assert free[1].role == "unconstrained" and free[1].why == "<lambda>(path, leaf) gave 0"


@pytest.mark.parametrize("after", ["clip_by_global_norm", "scale"])
def test_a_transformation_after_nero_in_a_chain_warns_at_the_second_update(caught, after):
    jax, jnp, optax, nero_optax = _optax()
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), "b": jnp.zeros(8, jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    later = optax.clip_by_global_norm(1.0) if after == "clip_by_global_norm" else optax.scale(0.5)

    def warnings_in_three_steps(opt):
        state, p, step = opt.init(params), params, jax.jit(opt.update)
        for _ in range(3):
            updates, state = step(grads, state, p)
            p = optax.apply_updates(p, updates)
        jax.effects_barrier()
        return config_warnings(caught)

    assert warnings_in_three_steps(optax.chain(later, nero_optax.nero())) == []
    (message,) = warnings_in_three_steps(optax.chain(nero_optax.nero(), later))
    assert "['w']" in message and "not balanced" in message and "put nero last" in message.lower()
