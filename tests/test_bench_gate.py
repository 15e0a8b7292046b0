"""The speed regression gate (asv_bench/gate.py): its verdicts, its baseline, and a planted slowdown it must catch.

The gate itself runs in CI (``make bench-gate``) on the torch and JAX cases; here it runs on NumPy's Nero (the core
rule) for speed, against a copy of HEAD whose rule sleeps after every update.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "asv_bench"
sys.path.insert(0, str(BENCH))

import gate  # noqa: E402
from revisions import exported, git, stored_commits  # noqa: E402

NAME = "bench_step.TorchCPURatio.track_x_adam('mlp', 'nero-fused-neuron')"


def test_verdicts_fail_only_past_the_threshold_and_name_both_ratios() -> None:
    samples = {
        "before": {NAME: [0.50, 0.52, 0.51], "steady": [2.0, 2.0, 2.0]},
        "after": {NAME: [0.70, 0.69, 0.71], "steady": [2.1, 2.0, 2.2], "brand-new": [1.0]},
    }
    lines, failures = gate.verdicts(samples, {}, default=0.25)
    assert failures == [f"{NAME}: ratio 0.510 before, 0.700 after (+37.3%; fails above +25%)"]
    assert any(line.startswith("  ok       steady: ratio 2.000 before, 2.100 after") for line in lines)
    assert any("brand-new: 1.000 (no baseline" in line for line in lines)
    assert gate.verdicts(samples, {NAME: 0.40}, default=0.25)[1] == []
    assert gate.verdicts(samples, {"steady": 0.01}, default=0.40)[1] == [
        "steady: ratio 2.000 before, 2.100 after (+5.0%; fails above +1%)"]


def test_the_steadier_of_a_cases_two_ratios_decides() -> None:
    """A slower Nero step raises both ratios alike: the one with the lower threshold decides, the other is shown."""
    adam, sgd = NAME, NAME.replace("track_x_adam", "track_x_sgd")
    limits = {adam: 0.20, sgd: 0.60}
    assert gate.deciding([adam, sgd, "other"], limits, default=0.30) == {adam, "other"}
    noisy_sgd = {"before": {adam: [0.50], sgd: [1.0]}, "after": {adam: [0.55], sgd: [1.8]}}
    lines, failures = gate.verdicts(noisy_sgd, limits, default=0.30)
    assert failures == [] and any(line.startswith(f"  info     {sgd}: ratio 1.000 before, 1.800 after") for line in lines)
    slower = {"before": {adam: [0.50], sgd: [1.0]}, "after": {adam: [0.70], sgd: [1.4]}}
    assert gate.verdicts(slower, limits, default=0.30)[1] == [
        f"{adam}: ratio 0.500 before, 0.700 after (+40.0%; fails above +20%)"]


def test_thresholds_are_three_spreads_and_at_least_the_floor(tmp_path: Path) -> None:
    spread = tmp_path / "spread.json"
    spread.write_text('{"rows": [{"benchmark": "a", "cv": 0.02}, {"benchmark": "b", "cv": 0.10}]}')
    assert gate.thresholds(spread) == {"a": gate.MIN_THRESHOLD, "b": pytest.approx(3 * 0.10)}
    assert gate.thresholds(tmp_path / "missing.json") == {}


def test_the_default_baseline_is_the_newest_measured_ancestor() -> None:
    baseline = gate.default_baseline()
    assert baseline in stored_commits()
    assert subprocess.run(["git", "merge-base", "--is-ancestor", baseline, "HEAD"], cwd=BENCH).returncode == 0
    newer = git("rev-list", f"{baseline}..HEAD").split()
    assert not set(newer) & stored_commits()


def test_cases_option_is_checked() -> None:
    assert gate.parse_cases("numpy:mlp:nero,jax-cpu:mlp:nero") == (("numpy", "mlp", "nero"), ("jax-cpu", "mlp", "nero"))
    with pytest.raises(Exception, match="backend:shapes:optimizer"):
        gate.parse_cases("numpy:mlp")


SLOWDOWN = '''

# Planted by tests/test_bench_gate.py: every update of the rule is computed twice (it is pure), twice the work.
_planted_nero = nero


def nero(*args, **kwargs):
    rule = _planted_nero(*args, **kwargs)

    class Slow:
        init = staticmethod(rule.init)

        @staticmethod
        def update(*a, **k):
            rule.update(*a, **k)
            return rule.update(*a, **k)

    return Slow
'''


def test_the_gate_catches_a_planted_slowdown(tmp_path: Path) -> None:
    """HEAD against a copy of HEAD whose Nero does its work twice a step: the gate fails, naming the benchmark and
    both ratios; the copy was imported (the gate checks where each process imported the project from)."""
    with exported(git("rev-parse", "HEAD")) as tree:
        planted = tmp_path / "planted"
        subprocess.run(["cp", "-r", str(tree), str(planted)], check=True)
    init = planted / "nero_core" / "__init__.py"
    init.write_text(init.read_text() + SLOWDOWN)
    run = subprocess.run(
        [sys.executable, str(BENCH / "gate.py"), "--baseline", "HEAD", "--code", str(planted),
         "--cases", "numpy:single-2048x512:nero", "--processes", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    failed = run.stdout.split("speed gate FAILED", 1)[1]
    line = next(ln for ln in failed.splitlines() if "NumPyRatio.track_x_adam('single-2048x512', 'nero')" in ln)
    before, after = (float(line.split("ratio ")[1].split()[0]), float(line.split(" before, ")[1].split()[0]))
    assert after > 1.25 * before, line
