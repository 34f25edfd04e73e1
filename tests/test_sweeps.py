"""Sweeps through lmms-eval, the leaderboard with loyalty, W&B offline, the lmms-eval CLI, and killed sweeps."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ["-m", "model=tiny", "method=none,random", "budget=64,128", "task.limit=3"]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_sweep(results: Path) -> None:
    base = results / "tiny" / "synthetic"
    assert sorted(p.parent.relative_to(base).as_posix() for p in base.rglob("result.json")) == [
        "none/none", "random/128", "random/64"]  # `none` ignores the budget: it ran once
    board = run("-m", "harness.leaderboard", str(results))
    with open(results / "leaderboard.csv") as f:
        rows = {(r["method"], r["budget"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("none", "none"), ("random", "64"), ("random", "128")}
    assert float(rows[("none", "none")]["agreement"]) == 1.0 and float(rows[("none", "none")]["first_token_kl"]) == 0
    assert float(rows[("random", "64")]["mean_vision_tokens"]) == 64.0
    assert 0 <= float(rows[("random", "64")]["agreement"]) <= 1 and float(rows[("random", "64")]["first_token_kl"]) >= 0
    markdown = (results / "leaderboard.md").read_text().splitlines()
    assert len(markdown) == 2 + 3 and "| tiny | random | 64 |" in "\n".join(markdown)
    assert (results / "pareto.png").stat().st_size > 10_000
    assert "wrote" in board.stdout


def test_a_2x2_sweep_then_the_leaderboard(tmp_path):
    run("-m", "harness", *SWEEP, f"output_dir={tmp_path}")
    check_sweep(tmp_path)


def test_the_same_sweep_with_the_submitit_local_launcher(tmp_path):
    run("-m", "harness", *SWEEP, f"output_dir={tmp_path}", "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10")
    check_sweep(tmp_path)


def test_every_registered_method_sweeps_at_the_published_budgets_into_the_leaderboard(tmp_path):
    from methods import METHODS

    names = sorted(METHODS)  # each method's config is conf/method/<name>.yaml
    # 8 layers: cheaper than the tiny model's 16, and PDrop's stages cannot reach 64 there (a refusal to account for)
    sweep = run("-m", "harness", "-m", "model=tiny", "model.num_layers=8", f"method={','.join(names)}",
                "budget=192,128,64", "task.limit=1", f"output_dir={tmp_path}", timeout=1200)
    run("-m", "harness.leaderboard", str(tmp_path))
    with open(tmp_path / "leaderboard.csv") as f:
        rows = {(r["method"], r["budget"]): r for r in csv.DictReader(f)}
    missing = 0
    for name in names:
        budgets = {budget for method, budget in rows if method == name}
        assert budgets == {"none"} or budgets <= {"192", "128", "64"}, (name, budgets)
        missing += 0 if budgets == {"none"} else 3 - len(budgets)
    # A configuration a method refuses is reported and the sweep goes on, and the leaderboard lists it as refused;
    # no method may vanish without a word.
    refused = sorted(key for key, row in rows.items() if row["note"].startswith("refused:"))
    assert refused == [("pdrop", "64")]
    assert sweep.stderr.count("prunebench: error:") == missing + len(refused)
    assert all(float(row["mean_vision_tokens"]) > 0 for key, row in rows.items() if key not in refused)  # T̄_in


def test_two_jobs_of_one_result_directory_run_one_after_the_other(tmp_path):
    # What a parallel launcher does with `none` at two budgets: without the directory's lock both would evaluate,
    # appending to one samples file; with it the later one finds the run finished.
    args = [sys.executable, "-m", "harness", "model=tiny", "method=none", "task.limit=3", f"output_dir={tmp_path}"]
    jobs = [subprocess.Popen([*args, f"budget={budget}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT) for budget in (64, 128)]
    outputs = [job.communicate(timeout=600) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-3000:] for _, err in outputs]
    assert sorted("skipped" in out for out, _ in outputs) == [False, True]
    samples = (tmp_path / "tiny" / "synthetic" / "none" / "none" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3


def test_the_lmms_eval_cli_runs_prunebench(tmp_path):
    lmms_eval = Path(sys.executable).parent / "lmms-eval"
    command = [str(lmms_eval), "--model", "prunebench", "--model_args", "model=tiny,method=random,budget=64",
               "--tasks", "synthetic_vqa", "--include_path", "tasks", "--limit", "2", "--output_path", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exact_match" in proc.stdout + proc.stderr
    assert list(tmp_path.rglob("*results.json"))


def test_wandb_offline_keeps_the_metrics_and_the_table(tmp_path):
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    proc = subprocess.run([sys.executable, "-m", "harness", "model=tiny", "method=random", "budget=64", "task.limit=2",
                           f"output_dir={tmp_path}", "wandb.mode=offline"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env_free)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (log,) = (tmp_path / "tiny" / "synthetic" / "random" / "64" / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()  # wandb's protobuf log stores the keys verbatim
    for key in (b"metrics/exact_match", b"tokens/mean_vision_tokens", b"cost/prefill_ms", b"cost/kv_cache_bytes"):
        assert key in data, key
    run("-m", "harness", "model=tiny", "method=none", "task.limit=2", f"output_dir={tmp_path}")
    run("-m", "harness.leaderboard", str(tmp_path), "--wandb", "offline")
    (table,) = (tmp_path / "wandb").rglob("leaderboard_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"][:3] == ["model", "method", "budget"] and len(content["data"]) == 2


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def test_a_killed_sweep_restarts_without_redoing_finished_samples(tmp_path):
    args = [sys.executable, "-m", "harness", "-m", "model=tiny", "method=random", "budget=64,128", "task.limit=6",
            f"output_dir={tmp_path}"]
    first = tmp_path / "tiny" / "synthetic" / "random" / "64"
    second = first.parent / "128"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while lines(second / "samples.jsonl") < 2:  # the first config done, the second half-way
        assert proc.poll() is None, "the sweep finished before it could be killed"
        assert time.monotonic() < deadline, "the sweep made no progress"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = lines(second / "samples.jsonl")
    assert (first / "result.json").is_file() and not (second / "result.json").is_file()
    first_samples = (first / "samples.jsonl").read_text()

    restart = run(*args[1:])
    assert "skipped" in restart.stdout  # the finished config
    assert f"resuming {second}: {finished_before} samples already done" in restart.stdout
    assert (first / "samples.jsonl").read_text() == first_samples
    ids = [json.loads(line)["id"] for line in (second / "samples.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6
