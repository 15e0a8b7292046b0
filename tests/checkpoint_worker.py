"""Runs for tests/test_checkpoint.py: ``python checkpoint_worker.py FRAMEWORK PHASE DIR`` (or the phase functions).

FRAMEWORK is ``torch`` or ``optax``. PHASE ``first`` (the test runs it in its own process) runs every variant
uninterrupted for STEPS steps (saving its final parameters and optimizer state) and, separately, for STOP steps
(saving a checkpoint there, the way users do: ``torch.save`` of the state dicts; ``flax.serialization.to_bytes``
of params and optimizer state). PHASE ``resume`` (in a fresh process) builds each model and optimizer anew from
another seed, loads the checkpoint and runs on to STEPS. Gradients depend only on the step number and the
parameters, so both runs see the same data; step 1 and step STOP + 1 have a NaN in one gradient, so a skipped step
is saved, restored and counted on both sides.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

STEPS, STOP = 6, 3
BAD_STEPS = {1, STOP + 1}


# ---- torch ---------------------------------------------------------------------------------------------------


def torch_variants():
    import torch
    from torch import nn

    import nero_torch

    class Net(nn.Module):  # neurons on axis 0 (emb, conv, linear), axis 1 (transposed conv), bias-like tensors
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.conv = nn.Conv1d(4, 5, 3)
            self.up = nn.ConvTranspose1d(5, 3, 2)
            self.norm = nn.LayerNorm(3)
            self.head = nn.Linear(3, 2)

        def forward(self, tokens):
            x = self.conv(self.emb(tokens).transpose(1, 2))
            return self.head(self.norm(self.up(torch.tanh(x)).transpose(1, 2))).mean(1)

    def net():
        return Net()

    def mlp():
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))

    def tokens(step, dtype):
        return torch.randint(0, 7, (4, 9), generator=torch.Generator().manual_seed(step))

    def floats(step, dtype):
        return torch.randn(4, 5, generator=torch.Generator().manual_seed(step)).to(dtype)

    def groups(model, **options):
        return nero_torch.Nero(nero_torch.param_groups(model, unconstrained=["head"]), **options)

    def two_lrs(model, **options):
        return nero_torch.Nero([{"params": model[0].parameters(), "lr": 0.03}, {"params": model[2].parameters()}],
                               **options)

    # name: (model, inputs, dtype, optimizer, options, scheduler)
    return {
        "net-f32": (net, tokens, torch.float32, groups, {}, None),
        "net-f64-core": (net, tokens, torch.float64, groups, dict(foreach=False), None),
        "mlp-bf16": (mlp, floats, torch.bfloat16, two_lrs, {}, None),
        "mlp-f32-fused": (mlp, floats, torch.float32, two_lrs, dict(fused=True), None),
        "mlp-f32-tensor-lr-cosine": (
            mlp, floats, torch.float32, lambda model: two_lrs(model, lr=torch.tensor(0.02)), {},
            lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
        ),
    }


def torch_run(name, spec, seed, start, stop, checkpoint=None):
    import torch

    make_model, inputs, dtype, make_opt, options, make_scheduler = spec
    torch.manual_seed(seed)
    model = make_model().to(dtype)
    opt = make_opt(model, **options)
    scheduler = make_scheduler(opt) if make_scheduler else None
    if checkpoint is not None:
        saved = torch.load(checkpoint)  # weights_only: plain tensors and containers
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
    for step in range(start, stop):
        opt.zero_grad()
        model(inputs(step, dtype)).float().pow(2).mean().backward()
        if step in BAD_STEPS:
            next(model.parameters()).grad.view(-1)[step] = float("nan")
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return {
        "model": model.state_dict(), "opt": opt.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }


def torch_phase(phase, out):
    import torch

    for name, spec in torch_variants().items():
        if phase == "first":
            torch.save(torch_run(name, spec, 0, 0, STEPS), out / f"{name}-uninterrupted.pt")
            torch.save(torch_run(name, spec, 0, 0, STOP), out / f"{name}-checkpoint.pt")
        else:
            torch.save(torch_run(name, spec, 1, STOP, STEPS, out / f"{name}-checkpoint.pt"), out / f"{name}-resumed.pt")


# ---- optax ---------------------------------------------------------------------------------------------------


def optax_variants():
    import jax.numpy as jnp
    import optax

    import nero_optax

    def scheduled_in_a_chain(**options):
        schedule = optax.cosine_decay_schedule(0.05, STEPS)
        nero = optax.inject_hyperparams(nero_optax.nero, static_args="neuron_axis")(learning_rate=schedule, **options)
        return optax.chain(optax.clip_by_global_norm(1.0), nero)

    # name: (optimizer, dtype, options, restore by from_bytes into the template rather than msgpack_restore)
    return {
        "fused-f32": (nero_optax.nero, jnp.float32, {}, False),
        "core-f64": (nero_optax.nero, jnp.float64, dict(fused=False), True),
        "chain-inject-bf16": (scheduled_in_a_chain, jnp.bfloat16, {}, False),
    }


def optax_params(seed, dtype):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    shapes = {"dense": {"kernel": (6, 4), "bias": (4,)}, "conv": {"kernel": (3, 2, 5)}, "scale": ()}
    return {
        "dense": {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes["dense"].items()},
        "conv": {"kernel": jnp.asarray(rng.normal(size=shapes["conv"]["kernel"]), dtype)},
        "scale": jnp.asarray(rng.normal(size=()), dtype),
    }


def optax_grads(params, step):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(100 + step)
    targets = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    grads = jax.tree.map(lambda p, t: (p - t) * jnp.sin(p), params, targets)
    if step in BAD_STEPS:
        grads["conv"]["kernel"] = grads["conv"]["kernel"].at[0, 1, step].set(jnp.nan)
    return grads


def optax_run(opt, update, params, state, start, stop):
    import optax

    state = opt.init(params) if state is None else state
    for step in range(start, stop):
        updates, state = update(optax_grads(params, step), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def optax_phase(phase, out):
    import jax
    from flax import serialization

    import nero_optax

    for name, (make, dtype, options, by_target) in optax_variants().items():
        opt = make(**options)
        update = jax.jit(opt.update)
        if phase == "first":
            for stop, label in ((STEPS, "uninterrupted"), (STOP, "checkpoint")):
                params, state = optax_run(opt, update, optax_params(0, dtype), None, 0, stop)
                data = serialization.to_bytes({"params": params, "state": state})
                (out / f"{name}-{label}.msgpack").write_bytes(data)
            continue
        template_params = optax_params(1, dtype)
        template = {"params": template_params, "state": opt.init(template_params)}
        data = (out / f"{name}-checkpoint.msgpack").read_bytes()
        loaded = serialization.from_bytes(template, data) if by_target else serialization.msgpack_restore(data)
        params = serialization.from_state_dict(template_params, serialization.to_state_dict(loaded["params"]))
        state = nero_optax.restore_state(template["state"], loaded["state"])
        params, state = optax_run(opt, update, params, state, STOP, STEPS)
        (out / f"{name}-resumed.msgpack").write_bytes(serialization.to_bytes({"params": params, "state": state}))


if __name__ == "__main__":
    framework, phase, directory = sys.argv[1:]
    if framework == "optax":
        import jax

        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_platforms", "cpu")
        optax_phase(phase, Path(directory))
    else:
        torch_phase(phase, Path(directory))
