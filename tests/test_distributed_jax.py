"""nero_optax.nero on arrays sharded with ``NamedSharding`` over 8 CPU devices, against the same steps unsharded.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only works before jax is first imported, and conftest imports
it, so the checks run in a subprocess (this file is its script) that prints a JSON report; the tests assert on it.
Each layout shards a Flax-layout model (kernels ``(in, out)`` and ``(kh, kw, in, out)``, neurons on the last axis)
on a ``(4, 2)`` mesh, takes three jitted steps and compares with the unsharded run; the compiled update's
all-reduces are read from its HLO. Reproduce the numbers: ``python tests/test_distributed_jax.py --launch``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

STEPS = 3
DEVICES = 8
# layout -> (spec of a kernel's fan-in axis, spec of its neuron axis); biases follow the neuron axis.
LAYOUTS = {
    "replicated": (None, None),
    "neurons": (None, "model"),
    "neurons_8way": (None, ("data", "model")),
    "fan_in": ("data", None),
    "both": ("data", "model"),
}


def launch(timeout: float = 300) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report(tmp_path_factory, worker_id) -> dict:
    # One subprocess per test session: pytest-xdist workers share it through a lock in their session's temp folder.
    if worker_id == "master":
        return launch()
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "nero-distributed-jax"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared / "lock")):
        done = shared / "report.json"
        if not done.exists():
            done.write_text(json.dumps(launch()))
    return json.loads(done.read_text())


# Explicit-sharding meshes (jax.sharding.AxisType.Explicit), with the fused kernel and the core rule (both sum over
# the other axes in place: explicit sharding refuses a reshape that merges a sharded fan-in axis of a conv).
CASES = {
    True: [(layout, "auto") for layout in LAYOUTS] + [(layout, "explicit") for layout in ("neurons", "fan_in", "both")],
    False: [(layout, "auto") for layout in LAYOUTS] + [("neurons", "explicit"), ("fan_in", "explicit")],
}


@pytest.mark.parametrize("layout, mesh, fused", [
    (layout, mesh, fused) for fused, cases in CASES.items() for layout, mesh in cases
])
def test_sharded_update_matches_unsharded_and_keeps_shardings(report, layout, mesh, fused):
    case = report["cases"][f"{layout}/{mesh}/fused={fused}"]
    assert "error" not in case, case["error"]
    assert case["devices"] == DEVICES
    assert case["max_deviation"] <= 1e-6, case
    assert case["params_keep_sharding"], case
    assert case["state_v_sharding"] == case["expected_v_sharding"], case
    assert case["sigma_replicated"]


def test_neurons_on_one_device_need_only_scalar_reductions(report):
    """With the neuron axis sharded, no row sum crosses devices: the all-reduces left are 0-d (the skip verdict,
    sigma of sharded bias-like leaves, the fused kernel's test for rows that never moved)."""
    for fused in (True, False):
        for layout in ("neurons", "neurons_8way"):
            reductions = report["cases"][f"{layout}/auto/fused={fused}"]["all_reduce_sizes"]
            assert reductions and max(reductions) == 1, (layout, fused, reductions)
        assert report["cases"][f"replicated/auto/fused={fused}"]["all_reduce_sizes"] == []


def test_split_rows_reduce_row_sums(report):
    """With the fan-in sharded, every row's sums are all-reduced (one value per neuron)."""
    for fused in (True, False):
        for layout in ("fan_in", "both"):
            reductions = report["cases"][f"{layout}/auto/fused={fused}"]["all_reduce_sizes"]
            assert max(reductions) >= 4, (layout, fused, reductions)  # 8 neurons (4 per device in "both")


# ---- the script (runs in the subprocess) ---------------------------------------------------------------------------


def _all_reduce_sizes(hlo: str) -> list[int]:
    """For every all-reduce of a compiled module, the element count of its largest operand."""
    sizes = []
    for line in hlo.splitlines():
        head = re.search(r"=\s*(.*?)\s*all-reduce(?:-start)?\(", line)
        if head:
            dims = re.findall(r"\w+\[([\d,]*)\]", head.group(1))
            sizes.append(max(math.prod(int(n) for n in d.split(",") if n) for d in dims))
    return sorted(sizes)


def _spec(spec, ndim: int) -> list[str]:
    """A PartitionSpec as strings, padded with None to ``ndim`` entries (equal specs print alike)."""
    return [str(s) for s in (tuple(spec) + (None,) * ndim)[:ndim]]


def run() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    import nero_optax

    rng = np.random.default_rng(0)
    shapes = {"dense": {"kernel": (16, 8), "bias": (8,)}, "conv": {"kernel": (3, 3, 4, 8)}}
    params = jax.tree.map(
        lambda s: rng.standard_normal(s).astype(np.float32), shapes, is_leaf=lambda s: isinstance(s, tuple)
    )
    grads = [jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params) for _ in range(STEPS)]
    devices = np.array(jax.devices()).reshape(4, 2)
    meshes = {
        "auto": Mesh(devices, ("data", "model")),
        "explicit": Mesh(devices, ("data", "model"), axis_types=(AxisType.Explicit,) * 2),
    }

    def specs(layout: str) -> dict:
        fan_in, neurons = LAYOUTS[layout]
        return {"dense": {"kernel": P(fan_in, neurons), "bias": P(neurons)},
                "conv": {"kernel": P(None, None, fan_in, neurons)}}

    def put(tree, shardings):
        return jax.device_put(tree, shardings)

    def train(opt, params, grads):
        # One compiled executable for every step: a state or parameter that changed sharding would not fit it.
        state = opt.init(params)
        update = jax.jit(opt.update).lower(grads[0], state, params).compile()
        apply = jax.jit(optax.apply_updates)
        for g in grads:
            updates, state = update(g, state, params)
            params = apply(params, updates)
        return params, state, update.as_text()

    cases = {}
    for fused in (True, False):
        opt = nero_optax.nero(0.05, fused=fused)
        expected, _, _ = train(opt, jax.tree.map(jnp.asarray, params), [jax.tree.map(jnp.asarray, g) for g in grads])
        for layout, mesh_name in CASES[fused]:
            key = f"{layout}/{mesh_name}/fused={fused}"
            shardings = jax.tree.map(lambda s: NamedSharding(meshes[mesh_name], s), specs(layout))
            try:
                got, state, hlo = train(opt, put(params, shardings), [put(g, shardings) for g in grads])
            except Exception as exc:  # reported, and asserted on by the tests
                cases[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
                continue
            flat_got, flat_sh = jax.tree.leaves(got), jax.tree.leaves(shardings)
            expected_v = [  # neurons on the last axis: v follows its spec; bias-like leaves keep theirs
                _spec(sh.spec, p.ndim)[-1:] if p.ndim >= 2 else _spec(sh.spec, p.ndim)
                for p, sh in zip(jax.tree.leaves(params), flat_sh)
            ]
            cases[key] = {
                "devices": len(flat_got[0].sharding.device_set),
                "max_deviation": max(float(jnp.max(jnp.abs(a - b)))
                                     for a, b in zip(flat_got, jax.tree.leaves(expected))),
                "params_keep_sharding": all(a.sharding.is_equivalent_to(sh, a.ndim)
                                            for a, sh in zip(flat_got, flat_sh)),
                "state_v_sharding": [_spec(v.sharding.spec, v.ndim) for v in jax.tree.leaves(state.v)],
                "expected_v_sharding": expected_v,
                "sigma_replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.sigma)),
                "all_reduce_sizes": _all_reduce_sizes(hlo),
            }
    return {"jax": jax.__version__, "cases": cases}


if __name__ == "__main__":
    if sys.argv[1:] == ["--launch"]:
        print(json.dumps(launch(), indent=1))
    else:
        print(json.dumps(run()))
