"""The example studies: the data loaders' fetch and checksum path, and each study's smoke run.

Each study runs in-process at its hidden ``--smoke`` scale (seconds) and must write a JSON record whose numbers
can fail: Nero at its default lr must beat chance on digits and MNIST.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from harness import data  # noqa: E402


def smoke(module: str, tmp_path: Path, data_dir: Path, *extra: str) -> dict:
    """Run ``examples/<module>.py --smoke`` in-process and return its JSON record."""
    import torch

    study = importlib.import_module(module)
    threads = str(torch.get_num_threads())  # leave the worker's thread count as it was
    study.main(["--smoke", "--out", str(tmp_path), "--no-progress", "--data-dir", str(data_dir),
                "--threads", threads, *extra])
    records = sorted(tmp_path.glob("*.json"))
    assert records, f"{module} wrote no record"
    return json.loads(records[-1].read_text())


def check_record(record: dict, study: str) -> None:
    assert record["study"] == study and record["scale"] == "smoke"
    assert record["command"].startswith("python ") and "--smoke" in record["command"]
    assert record["versions"]["torch"] and record["versions"]["python"]
    assert record["wall_seconds"] > 0
    assert record["runs"], "no runs recorded"
    for run in record["runs"]:
        assert {"optimizer", "lr", "seed", "score", "diverged", "loss_curve", "seconds"} <= run.keys()


# --- data -------------------------------------------------------------------------------------------------------


def test_data_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("NERO_DATA_DIR", str(tmp_path / "env"))
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("NERO_DATA_DIR")
    assert data.resolve_data_dir() == Path.home() / ".cache" / "nero-core"


def test_fetch_from_canonical_url_checks_sha256(monkeypatch, tmp_path, data_dir):
    source = data_dir / "tinyshakespeare.txt"
    if not source.is_file():
        pytest.skip(f"{source} is not there")
    file = dataclasses.replace(data.FILES["tinyshakespeare.txt"], url=source.as_uri())
    monkeypatch.setitem(data.FILES, file.name, file)
    monkeypatch.delenv("NERO_DATA_URL", raising=False)
    path = data.data_path(file.name, tmp_path / "cache")
    assert path == tmp_path / "cache" / file.name
    assert path.read_bytes() == source.read_bytes()
    assert data.sha256_of(path) == file.sha256


def test_fetch_from_mirror_rejects_a_wrong_checksum(monkeypatch, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "mnist.npz").write_bytes(b"not mnist")
    monkeypatch.setenv("NERO_DATA_URL", mirror.as_uri())
    with pytest.raises(OSError, match=r"mnist\.npz.*sha256 .*expected 06af5dfe"):
        data.data_path("mnist.npz", tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir()), "a file that failed its checksum was kept"


def test_missing_file_without_a_source_names_it(monkeypatch, tmp_path):
    monkeypatch.delenv("NERO_DATA_URL", raising=False)
    with pytest.raises(FileNotFoundError, match=r"cifar10_jpeg\.npz is not in .*empty.*NERO_DATA_DIR"):
        data.data_path("cifar10_jpeg.npz", tmp_path / "empty")


def test_unreachable_source_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("NERO_DATA_URL", (tmp_path / "nowhere").as_uri())
    with pytest.raises(FileNotFoundError, match=r"tinyshakespeare\.txt: could not download it from file:"):
        data.data_path("tinyshakespeare.txt", tmp_path / "cache")


def test_loaders(data_dir):
    x, y, x_test, y_test = data.mnist(data_dir, train_size=100, test_size=50, flat=False)
    assert x.shape == (100, 1, 28, 28) and x_test.shape == (50, 1, 28, 28) and int(y.max()) <= 9
    assert abs(float(data.mnist(data_dir, train_size=5000)[0].mean())) < 0.1  # standardised
    x, y, x_test, y_test = data.cifar10(data_dir, train_size=200, test_size=100)
    assert x.shape == (200, 3, 32, 32) and len(set(y.tolist())) > 5  # a random draw, not one class
    train, val, vocabulary = data.shakespeare(data_dir)
    assert len(vocabulary) == 65 and len(train) + len(val) == 1_115_394
    x, y, x_test, y_test = data.digits()
    assert x.shape[1] == 64 and len(x) + len(x_test) == 1797


# --- studies ----------------------------------------------------------------------------------------------------


def test_compare_nero_beats_chance_on_digits(tmp_path, data_dir):
    record = smoke("compare", tmp_path, data_dir)
    check_record(record, "compare")
    nero = [r for r in record["runs"] if r["optimizer"] == "nero"]
    assert nero and all(r["lr"] == 0.01 and r["score"] > 50 for r in nero)  # chance is 10%
    assert (tmp_path / "compare.png").stat().st_size > 0


def study_runs(module: str, tmp_path: Path, data_dir: Path, *extra: str) -> list[dict]:
    """Run a record-per-run study (``examples/<module>.py --smoke``) in-process; return its run records."""
    import torch
    from harness.report import load_runs

    study = importlib.import_module(module)
    study.main(["--smoke", "--out", str(tmp_path), "--no-progress", "--data-dir", str(data_dir),
                "--threads", str(torch.get_num_threads()), "--workers", "1", *extra])
    return load_runs(tmp_path / "runs")


def check_runs(runs: list[dict], optimizers: set[str], seeds: set[int]) -> None:
    for run in runs:
        assert {"key", "optimizer", "lr", "seed", "score", "diverged", "loss_curve", "cpu_seconds", "settings",
                "schedule", "metric", "goal"} <= run.keys()
    assert {r["optimizer"] for r in runs} == optimizers
    assert {r["seed"] for r in runs} == seeds


def check_table1(runs: list[dict], tmp_path: Path, task: str) -> None:
    check_runs(runs, {"nero", "sgd", "adam", "lamb", "muon"}, {0, 1})
    table = (tmp_path / "table1.md").read_text()
    assert table.count(f"| {task} |") == 8  # five optimizers, Nero at 0.01, Nero against the baselines, budget
    assert (tmp_path / f"{task}_lr.png").stat().st_size > 0 and (tmp_path / f"{task}_curves.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("task", ["cnn_cifar10", "char_lm_shakespeare", "cgan_mnist", "ppo_cartpole"])
def test_table1(task, tmp_path, data_dir):
    runs = study_runs("table1", tmp_path, data_dir, "--task", task)
    check_table1(runs, tmp_path, task)
    if task == "cgan_mnist":
        assert all(r["classifier_test_accuracy"] > 50 for r in runs)
    if task == "char_lm_shakespeare":  # the probe (validation loss) at every step, for steps to target
        assert all([p[0] for p in r["probe_curve"]] == list(range(1, 11)) for r in runs)
        assert "Mann-Whitney U" in (tmp_path / "steps_to_target.md").read_text()


def test_a_record_made_after_a_run_counts_as_done_when_the_study_restarts(data_dir):
    """The settings a record stores (after its run) match those a restarted study computes (before any run): a
    task's caches filled by the run are no setting. (The cGAN's trained scoring classifier was one: every restart
    ran every cGAN run again.)"""
    from harness.runner import settings
    from harness.tasks import ConditionalGAN

    fresh = settings(ConditionalGAN(data_dir, steps=4, classifier_steps=2, train_size=256))
    task = ConditionalGAN(data_dir, steps=4, classifier_steps=2, train_size=256)
    task._prepare()
    assert json.loads(json.dumps(settings(task), default=float)) == fresh


@pytest.mark.slow
def test_table1_resumes_after_a_kill(tmp_path, data_dir):
    """A study killed (SIGKILL) after 3 runs, with a record cut off half-written, finishes when run again, on two
    worker processes, without running the 3 finished runs again."""
    import table1

    command = [sys.executable, str(EXAMPLES / "table1.py"), "--smoke", "--task", "mlp_mnist", "--out", str(tmp_path),
               "--no-progress", "--data-dir", str(data_dir), "--workers", "1", "--kill-after", "3"]
    killed = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    finished = {path: path.read_bytes() for path in (tmp_path / "runs").rglob("*.json")}
    assert len(finished) == 3 and not (tmp_path / "table1.md").exists()
    half = tmp_path / "runs" / "mlp_mnist" / ".sgd_lr0.01_epoch0.9_seed1.json.999.tmp"
    half.write_text('{"key": "mlp_mnist/sgd_lr0.01_epoch0.9_seed1", "sco')
    import torch

    table1.main(["--smoke", "--task", "mlp_mnist", "--out", str(tmp_path), "--no-progress", "--data-dir",
                 str(data_dir), "--threads", str(torch.get_num_threads()), "--workers", "2"])
    assert all(path.read_bytes() == text for path, text in finished.items()), "a finished run was run again"
    assert not half.exists()
    from harness.report import load_runs

    runs = load_runs(tmp_path / "runs")
    assert len(runs) == 10  # five optimizers from seeds 0 and 1
    assert all(r["pid"] != os.getpid() for r in runs)  # the 7 left ran in the worker processes
    check_table1(runs, tmp_path, "mlp_mnist")
    assert all(r["score"] > 50 for r in runs if r["optimizer"] == "nero")  # chance is 10%


def test_protocol_extends_refines_and_seeds_the_best():
    """The plan on made-up scores: a best lr on the grid's edge takes the next decade, then the half-decade
    neighbours of the best; only then the best lr's seeds, and Muon's runs once Adam's search is done."""
    from harness.protocol import Protocol, tuning_plan

    peaks = {"nero": 1e-2, "adam": 0.2, "muon": 5e-4}  # each score falls by 10 per decade away from its peak
    protocol = Protocol(("nero", "adam", "muon"), (1e-3, 1e-2, 1e-1), (0, 1, 2), refine=True)
    records, rounds = {}, []
    while True:
        new = [s for s in tuning_plan("t", "max", "s", protocol, records).ready if s.key not in records]
        if not new:
            break
        rounds.append({(s.optimizer, s.lr, s.seed) for s in new})
        for s in new:
            score = 100 - 10 * abs(math.log10(s.lr / peaks[s.optimizer]))
            records[s.key] = {"task": "t", "optimizer": s.optimizer, "lr": s.lr, "seed": s.seed, "score": score}
    assert ("adam", 1.0, 0) in rounds[1] and ("adam", 0.316, 0) in rounds[2]  # the edge, then x sqrt(10)
    assert not any(name == "muon" for round in rounds[:3] for name, _, _ in round)
    muon = [r for r in records.values() if r["optimizer"] == "muon"]
    assert {r["lr"] for r in muon} == {1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2, 1e-1}
    assert all("adam_lr0.316" in key for key in records if key.startswith("t/muon"))
    seeded = {(r["optimizer"], r["lr"]) for r in records.values() if r["seed"] > 0}
    assert seeded == {("nero", 0.01), ("adam", 0.316), ("muon", 3.16e-4)}


def test_schedule_factors():
    from harness.schedule import Schedule

    warm = Schedule(warmup=0.1, decay="cosine")
    assert [warm.factor(i, 100) for i in (0, 9, 10)] == [0.1, 1.0, 1.0]
    assert warm.factor(55, 100) == pytest.approx(0.5) and warm.factor(99, 100) < 1e-3
    assert Schedule(decay="linear").factor(75, 100) == pytest.approx(0.25)
    epochs = Schedule(decay="epoch", gamma=0.9, epoch=10)
    assert [epochs.factor(i, 100) for i in (9, 10, 25)] == pytest.approx([1.0, 0.9, 0.81])
    assert (warm.name, epochs.name) == ("warmup10-cosine", "epoch0.9")
    with pytest.raises(ValueError, match="decay must be one of"):
        Schedule(decay="step")


@pytest.mark.slow
def test_deep_mlp(tmp_path, data_dir):
    runs = study_runs("deep_mlp", tmp_path, data_dir)
    check_runs(runs, {"nero", "sgd", "adam", "lamb", "muon"}, {0})
    assert {r["task"] for r in runs} == {"mlp_depth4", "mlp_depth8"}
    nero4 = next(r for r in runs if r["task"] == "mlp_depth4" and r["optimizer"] == "nero")
    assert nero4["lr"] == 0.01 and nero4["score"] > 20  # a 4-layer MLP trains with Nero at lr 0.01
    assert "Depths that train" in (tmp_path / "deep_mlp.md").read_text()
    assert (tmp_path / "deep_mlp.png").stat().st_size > 0


@pytest.mark.slow
def test_ablation(tmp_path, data_dir):
    record = smoke("ablation", tmp_path, data_dir)
    check_record(record, "ablation")
    variants = {(r["options"]["centre"], r["options"]["normalise"]) for r in record["runs"]}
    assert variants == {(True, True), (True, False), (False, True), (False, False)}


@pytest.mark.slow
def test_pitfall(tmp_path, data_dir):
    record = smoke("pitfall", tmp_path, data_dir)
    check_record(record, "pitfall")
    nero = {r["task"]: r["score"] for r in record["runs"] if r["optimizer"] == "nero" and r["lr"] == 0.01}
    # Nero projects the raw weights onto balanced rows at its first step: sigma cannot change the result
    assert nero["cwn_mlp_sigma1"] == pytest.approx(nero["cwn_mlp_sigma100"], abs=1.0)


@pytest.mark.slow
def test_agd_depth(tmp_path, data_dir):
    record = smoke("agd_depth", tmp_path, data_dir)
    check_record(record, "agd_depth")
    runs = {(r["task"], r["optimizer"], r["lr"]) for r in record["runs"]}
    for task in ("mnist_depth2", "mnist_depth4", "cifar10_depth2", "cifar10_depth4"):
        assert {(task, "agd", 1.0), (task, "adam", 1e-3), (task, "sgd", 0.1)} <= runs
    agd = {r["task"]: r["score"] for r in record["runs"] if r["optimizer"] == "agd"}
    assert agd["mnist_depth2"] > 30  # AGD, untuned, beats chance (10%) within 20 steps
    assert [row["dataset"] for row in record["table"]] == ["mnist", "mnist", "cifar10", "cifar10"]
    assert (tmp_path / "agd_depth.png").stat().st_size > 0


def test_agd_network_starts_from_agd_init():
    import agd_depth
    import torch

    torch.manual_seed(0)
    model = agd_depth.network(12, 8, depth=3)
    weights = [m.weight.detach().double() for m in model if isinstance(m, torch.nn.Linear)]
    assert [tuple(w.shape) for w in weights] == [(8, 12), (8, 8), (10, 8)]
    for w in weights:  # orthogonal times sv(W) = sqrt(out / in): every singular value equals it
        expected = (w.shape[0] / w.shape[1]) ** 0.5
        assert torch.allclose(torch.linalg.svdvals(w), torch.full((min(w.shape),), expected, dtype=w.dtype))
    assert all(m.bias is None for m in model if isinstance(m, torch.nn.Linear))


def test_muon_takes_the_hidden_matrices_only():
    from harness.models import CharTransformer, cnn, mlp
    from harness.optim import hidden_matrices, muon

    net = mlp(10, 8, 3, depth=4)
    assert [p.shape for p in hidden_matrices(net)] == [(8, 8), (8, 8)]  # not the input and output layers
    assert hidden_matrices(cnn()) == []  # conv filters are not matrices; the classifier is the output layer
    lm = CharTransformer(65, 16, width=8, layers=1)
    assert {p.shape for p in hidden_matrices(lm)} == {(24, 8), (8, 8), (32, 8), (8, 32)}
    chained = muon(net, lr=0.02, adam_lr=1e-3)
    muon_params, adam_params = ([p for g in opt.param_groups for p in g["params"]] for opt in chained.optimizers)
    assert len(muon_params) == 2 and len(adam_params) == len(list(net.parameters())) - 2
