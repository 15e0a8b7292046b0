"""``examples/star_eval.py``'s bookkeeping: a task interrupted between optimizers (on a tiny task) resumes without
running again what it had done, and processes that share one results file keep each other's tasks, with the verdict
over the finished ones only; and the CNN's im2col convolution is XLA's own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import star_eval  # noqa: E402

SEEDS = [0]


def tiny_task(name: str = "tiny") -> star_eval.Task:
    """A 4-class softmax regression on 6 features, 3 steps."""
    w_true = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
    x_test = jax.random.normal(jax.random.PRNGKey(2), (32, 6))

    def logits(p, x):
        return x @ p["w"] + p["b"]

    def batch(key):
        x = jax.random.normal(key, (8, 6))
        return x, jnp.argmax(x @ w_true, -1)

    def heldout(p):
        out, y = logits(p, x_test), jnp.argmax(x_test @ w_true, -1)
        return {"test_loss": star_eval._xent(out, y), "test_acc": jnp.mean(jnp.argmax(out, -1) == y)}

    return star_eval.Task(name, 3, lambda key: {"w": 0.1 * jax.random.normal(key, (6, 4)), "b": jnp.zeros(4)},
                          lambda p, x, y: star_eval._xent(logits(p, x), y), batch, heldout, float(np.log(4)))


class Interrupted(Exception):
    pass


def test_an_interrupted_task_resumes_without_running_again_what_it_had_done(monkeypatch):
    runs = []
    run_group = star_eval.run_group
    monkeypatch.setattr(star_eval, "run_group", lambda *args: runs.append(1) or run_group(*args))
    written = []

    def interrupt_after_three(result):
        written.append(json.loads(json.dumps(result)))  # as the results file has it
        if len(written) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        star_eval.evaluate(tiny_task(), SEEDS, "star_v1", partial=interrupt_after_three)
    kept = written[-1]
    assert len(runs) == 3 and not star_eval.complete(kept, nonom=True)
    resumed = star_eval.evaluate(tiny_task(), SEEDS, "star_v1", done=kept)
    assert len(runs) == 3 + 7 - 3  # three STAR sets and four Adam rates in all, each once
    assert star_eval.complete(resumed, nonom=True) and "adam_runs" not in resumed
    assert all(resumed[k] == v for k, v in kept.items() if k not in ("wall_seconds", "adam_runs"))
    assert sorted(resumed["adam_grid"]) == sorted(str(lr) for lr in star_eval.ADAM_LRS)
    best = min(resumed["adam_grid"], key=resumed["adam_grid"].get)
    assert resumed["adam_best"]["lr"] == float(best)


def summary(accuracy: float) -> dict:
    return {"final_train_loss": [0.5], "initial_train_loss": [1.0], "diverged": [False], "test_acc": [accuracy],
            "test_loss": [0.4]}


def test_processes_sharing_a_file_keep_each_other_s_tasks(tmp_path):
    out = tmp_path / "eval.json"
    run = {"quick": False, "seeds": SEEDS, "meta_params": "star_v1", "steps": 3, "meta_training_horizon": 200,
           "command": "python examples/star_eval.py", "tasks": {}}
    done = {name: summary(0.9) for name in ("star", "star_nonom", "adam_aggmo", "adam_1e-3")}
    done.update(adam_best=dict(summary(0.9), lr=1e-3), chance=np.log(4), steps=3)
    partial = {"star": summary(0.5), "chance": np.log(4), "steps": 3}
    star_eval.save(out, dict(run, tasks={"a": done}), ["a", "b"], 2.0)
    merged = star_eval.save(out, dict(run, tasks={"b": partial}), ["a", "b"], 3.0)
    assert list(merged["tasks"]) == ["a", "b"] and merged["wall_seconds"] == 5.0
    assert list(merged["verdict"]["tasks"]) == ["a"]  # a task under way is not judged
    assert json.loads(out.read_text()) == json.loads(json.dumps(merged))
    assert merged["verdict"]["never_diverges"]
    other = star_eval.save(out, dict(run, steps=4, tasks={"b": partial}), ["a", "b"], 1.0)  # another configuration
    assert list(other["tasks"]) == ["b"]
    diverged = dict(partial, star=dict(summary(0.5), diverged=[True]))  # counts though the task is not judged
    assert not star_eval.save(out, dict(run, tasks={"b": diverged}), ["a", "b"], 1.0)["verdict"]["never_diverges"]


def test_the_cnn_s_im2col_convolution_is_lax_s_same_convolution():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
    expected = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(star_eval.conv3x3(x, w), expected, rtol=1e-5, atol=1e-5)


def test_a_share_of_the_optimizers_runs_only_that_share(monkeypatch):
    runs = []
    run_group = star_eval.run_group
    monkeypatch.setattr(star_eval, "run_group", lambda *args: runs.append(1) or run_group(*args))
    result = star_eval.evaluate(tiny_task(), SEEDS, "star_v1", only=("star",))
    assert len(runs) == 1 and "star" in result and not {"star_nonom", "adam_aggmo", "adam_runs"} & set(result)
    assert star_eval.complete(result, nonom=True, only=("star",)) and not star_eval.complete(result, nonom=True)
    with pytest.raises(SystemExit):
        star_eval.main(["--optimizers", "star,sgd"])
