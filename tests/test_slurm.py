"""SLURM for real: a one-node cluster (scripts/slurm_local.sh), a sweep through `hydra/launcher=slurm`, one of its
jobs cancelled with scancel mid-run, and the sweep submitted again."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.slurm import OneSacctWarning

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
CANNOT_INSTALL = 2  # the script's exit status where SLURM cannot be installed (not root, no apt-get, install failed)
# One job at a time (array_parallelism=1): the first has finished when the second is killed.
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.account=prunebench",
            "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=10", "hydra.launcher.array_parallelism=1"]


def slurm_local(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True, env=env, timeout=600)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a one-node SLURM brought up for these tests; its daemons are stopped afterwards."""
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_CONF": str(state / "slurm.conf")}
    up = slurm_local("up", env)
    if up.returncode == CANNOT_INSTALL:
        pytest.skip(f"no SLURM here: {up.stderr.strip()}")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:  # also where `up` failed half-way: stop what it started, and check that nothing is left
        started = {p.stem: int(p.read_text()) for p in state.glob("*.pid")}
        down = slurm_local("down", env)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not [name for name, pid in started.items() if alive(pid)], f"left running: {started}"


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def squeue(env: dict[str, str], *options: str) -> list[str]:
    return subprocess.run(["squeue", "--noheader", "--format=%i", *options], capture_output=True, text=True,
                          env=env, check=True).stdout.split()


def job_logs(sweep_dir: Path) -> str:
    return "".join(log.read_text() for log in sorted(sweep_dir.glob(".submitit/*/*_log.out")))


# Enough questions that the second job is still running when the test has seen its first sample and cancels it
# (with 6, and once with 60 on CI, an idle machine finished the job in between: scancel goes through slurmctld).
QUESTIONS = 300


def test_a_sweep_on_slurm_survives_a_cancelled_job(slurm, tmp_path):
    results = tmp_path / "results"
    sweep = [sys.executable, "-m", "harness", "-m", "model=tiny", "method=random", "budget=64,128",
             f"task.limit={QUESTIONS}",
             f"output_dir={results}", *LAUNCHER]
    first = results / "tiny" / "synthetic" / "random" / "64"
    second = first.parent / "128"
    with open(tmp_path / "first.log", "w") as log:
        launcher = subprocess.Popen([*sweep, f"hydra.sweep.dir={tmp_path / 'sweep1'}"], cwd=ROOT, env=slurm,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (first / "result.json").is_file():
            assert launcher.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the sweep made no progress"
            time.sleep(0.2)
        # The submitting command dies (a lost terminal) while the second job is still to come. Not Ctrl-C: submitit
        # notices SIGINT only at its next poll, and meanwhile an idle machine finished the second job; and a submitter
        # still polling when its job is killed waits for good on a cluster without accounting.
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=60)
        # It starts all the same. Its id is asked for before it writes anything, to cancel it without delay.
        while not (running := [job for job in squeue(slurm, "--states=RUNNING") if job.endswith("_1")]):
            assert time.monotonic() < deadline, "the second job did not start"
            time.sleep(0.05)
        (job,) = running
        while lines(second / "samples.jsonl") < 1:
            assert time.monotonic() < deadline, "the second job made no progress"
            time.sleep(0.01)
        # SIGKILL at once (plain scancel's SIGTERM leaves the job KillWait seconds, in which it could finish)
        subprocess.run(["scancel", "--signal=KILL", "--full", job], env=slurm, check=True)
        while squeue(slurm):
            assert time.monotonic() < deadline, "the cancelled job did not end"
            time.sleep(0.2)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    (submission,) = (tmp_path / "sweep1").glob(".submitit/*/*_submission.sh")
    for option in ("--partition=debug", "--account=prunebench", "--time=10", "--array=0-1%1"):
        assert f"#SBATCH {option}\n" in submission.read_text()  # the launcher keys a user sets reach sbatch
    killed_at = ids(second / "samples.jsonl")
    assert (first / "result.json").is_file() and not (second / "result.json").is_file()
    assert 1 <= len(killed_at) < QUESTIONS
    first_samples = (first / "samples.jsonl").read_text()

    # The same sweep submitted again; both jobs at once this time, as nothing is left to kill.
    again = subprocess.run([*sweep, f"hydra.sweep.dir={tmp_path / 'sweep2'}", "hydra.launcher.array_parallelism=2"],
                           cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    logs = job_logs(tmp_path / "sweep2")
    assert f"skipped: {first} is already finished" in logs
    assert f"resuming {second}: {len(killed_at)} samples already done" in logs
    assert (first / "samples.jsonl").read_text() == first_samples
    assert ids(second / "samples.jsonl")[: len(killed_at)] == killed_at
    assert sorted(ids(second / "samples.jsonl")) == sorted(f"synthetic_vqa/{i}" for i in range(QUESTIONS))
    assert sorted(p.parent.name for p in results.rglob("result.json")) == ["128", "64"]
    for output in ((tmp_path / "first.log").read_text(), again.stdout + again.stderr):
        assert "Bypassing sacct error" not in output  # submitit's warning per poll, where the cluster has no sacct
        assert output.count("sacct fails on this cluster") == 1


def test_sacct_failures_are_explained_once_and_not_repeated(caplog):
    submitit = logging.getLogger("test_slurm.submitit")  # stands in for submitit's logger
    submitit.addFilter(OneSacctWarning())
    failure = "Call #{} - Bypassing sacct error Command '['sacct', ...]' returned non-zero exit status 1."
    with caplog.at_level(logging.INFO):
        submitit.warning(failure.format(1))
        submitit.info("Submitted job 7")
        submitit.warning(failure.format(2))
    assert [(r.name, r.getMessage()[:27]) for r in caplog.records] == [
        ("harness.slurm", "sacct fails on this cluster"), ("test_slurm.submitit", "Submitted job 7")]
