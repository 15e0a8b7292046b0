"""Benchmark past commits and publish asv's dashboard: the history of Nero's speed, kept in the repository.

    python asv_bench/history.py                    # main's kernel-changing commits not yet measured on this machine
    python asv_bench/history.py HEAD               # given revisions (any git revision, several allowed)
    python asv_bench/history.py --publish          # only rebuild the dashboard (asv_bench/html/index.html)

Each commit's code is exported (``git archive``) into a temporary directory and measured by ``asv run
--python=same --set-commit-hash`` in this environment, with that directory first on the path
(``ASV_PYTHONPATH``): the benchmarks are this checkout's (``asv_bench/benchmarks``), the code they measure is
the commit's. (asv's own mode builds an environment per commit, reinstalling torch and jax each time: too slow
on a 2-core machine.) A case a commit cannot run, an optimizer or an option it did not have yet, is skipped by
the suite (``cases.Unavailable``), so older commits show fewer lines.

Only a few benchmarks run (``HISTORY``), to keep the store small and a commit to a few minutes: the ratio
benchmarks on the small ``mlp`` set, the default path's per-tensor cost on ``toy194``, and the machine's copy
bandwidth; one process each, one OpenMP thread. Results go to
``asv_bench/results/<machine>/`` (committed: the dashboard's history and the regression gate's baseline); the
machine is named after its CPU (``--machine`` to change). ``asv publish`` then writes ``asv_bench/html``; the
documentation build publishes the same results into its Benchmarks page (docs/offline_hooks.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from revisions import code_path, exported, git, stored_commits

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "asv.conf.json"
KERNELS = (
    "adapters/nero_torch/_native.c", "adapters/nero_torch/_functional.py", "adapters/nero_optax/_fused.py",
    "adapters/nero_optax/_native.cc", "nero_core/_nero.py",
)
HISTORY = "|".join((
    r"Machine\.track_copy_gb_per_s",
    r"TorchCPURatio\.track_x_(adam|sgd)\('mlp', 'nero(-fused|-fused-neuron)?'\)",
    r"TorchCPURatio\.track_x_(adam|sgd)\('toy194', 'nero'\)",
    r"JaxCPURatio\.track_x_(adam|sgd)\('mlp', 'nero'\)",
))


def machine_name() -> str:
    """A name for this kind of machine from its CPU model and CPU count, e.g. ``intel-xeon-processor-2cpu``."""
    from benchmarks.machine import describe

    cpu = str(describe(bandwidth=False)["cpu"])
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", cpu.lower())).strip("-")
    return f"{slug}-{os.cpu_count()}cpu"


def kernel_commits(branch: str = "main") -> list[str]:
    """``branch``'s commits that changed a kernel, oldest first."""
    return git("log", "--reverse", "--format=%H", branch, "--", *KERNELS).split()


def asv(*args: str, env: dict[str, str] | None = None) -> int:
    command = [sys.executable, "-m", "asv", *args, "--config", str(CONFIG)]
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, cwd=HERE, env=env).returncode


def ensure_machine(machine: str) -> None:
    """asv keeps machine descriptions in ~/.asv-machine.json; add this one (named ``machine``) if missing."""
    known = Path.home() / ".asv-machine.json"
    if not known.is_file() or machine not in json.loads(known.read_text()):
        asv("machine", "--machine", machine, "--yes")


def run_commit(commit: str, machine: str, bench: str) -> int:
    with exported(commit) as tree:
        env = dict(os.environ, ASV_PYTHONPATH=code_path(tree), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        return asv("run", "--python=same", "--set-commit-hash", commit, "--machine", machine, "--bench", bench,
                   "--show-stderr", env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revisions", nargs="*", help="git revisions (default: main's kernel-changing commits)")
    parser.add_argument("--machine", default=None, help="asv machine name (default: from the CPU model)")
    parser.add_argument("--bench", default=HISTORY, help="asv benchmark regex (default: the history set)")
    parser.add_argument("--again", action="store_true", help="measure commits that already have results too")
    parser.add_argument("--publish", action="store_true", help="only publish the dashboard")
    args = parser.parse_args(argv)
    machine = args.machine or machine_name()
    if not args.publish:
        ensure_machine(machine)
        commits = [git("rev-parse", f"{rev}^{{commit}}") for rev in args.revisions] or kernel_commits()
        done = set() if args.again else stored_commits(machine)
        todo = [c for c in commits if c not in done]
        print(f"{len(todo)} of {len(commits)} commits to measure on {machine}", flush=True)
        failed = [c for c in todo if run_commit(c, machine, args.bench) != 0]
        if failed:
            print(f"asv run failed for {failed}", file=sys.stderr)
    return asv("publish")


if __name__ == "__main__":
    sys.exit(main())
