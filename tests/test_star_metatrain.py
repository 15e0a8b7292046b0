"""STAR's meta-training loop: an interrupted run resumed from its checkpoint takes exactly the steps of an
uninterrupted one, and the task families build and train."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("sklearn")

import nero_optax.metatrain.__main__ as metatrain_main  # noqa: E402
from nero_optax.metatrain import FAMILIES, SMOKE_FAMILIES, load_dataset  # noqa: E402

SMOKE = ["--families", "smoke", "--pairs", "2", "--truncation", "2", "--horizon", "4", "--nqm-steps", "10",
         "--nqm-every", "100", "--variant", "star"]


def run(tmp_path, name, steps):
    out = tmp_path / name
    metatrain_main.main(SMOKE + ["--outer-steps", str(steps), "--out-dir", str(out), "--log", str(out / "log.jsonl")])
    with np.load(out / "star_v2.npz") as f:
        theta = {k: f[k] for k in f.files}
    return theta, [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    # One family: the unroll's compilation is most of the test's time.
    monkeypatch.setattr(metatrain_main, "families", lambda name: SMOKE_FAMILIES[:1])
    whole, whole_log = run(tmp_path, "whole", 8)
    run(tmp_path, "cut", 4)  # stops after one episode (4 outer steps of 2 truncations of 2 inner steps... twice)
    cut_dir = tmp_path / "cut"
    with (cut_dir / "log.jsonl").open("a") as log:  # a step logged after the checkpoint, then the process died
        log.write(json.dumps({"variant": "star", "step": 5, "meta_loss": -1.0}) + "\n")
    resumed, resumed_log = run(tmp_path, "cut", 8)
    for k in whole:
        np.testing.assert_array_equal(resumed[k], whole[k])
    assert [r["step"] for r in resumed_log] == list(range(1, 9))
    assert [r["meta_loss"] for r in resumed_log] == [r["meta_loss"] for r in whole_log]
    record = json.loads((cut_dir / "star_v2.json").read_text())
    assert record["outer_steps_done"] == 8 and record["wall_seconds"] > 0


@functools.lru_cache(maxsize=None)
def dataset(name):
    return load_dataset(name)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_initial_loss_is_near_chance(family, data_dir):
    data = dataset(family.dataset)

    @jax.jit  # one compilation, not one per operation
    def initial_loss(x, y):
        params = family.init(jax.random.key(0), data.x.shape[-1], data.classes)
        return family.loss(params, *family.sample(jax.random.key(1), x, y))

    loss = initial_loss(data.x, data.y)
    assert 0.5 * np.log(data.classes) < float(loss) < 2.5 * np.log(data.classes)
