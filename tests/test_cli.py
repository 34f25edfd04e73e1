"""End to end through `python -m harness`: results layout, skipping finished runs, resuming killed ones."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from harness import run as run_module
from harness.config import CONF_DIR, validate
from harness.lmms import Prunebench
from methods import Budget, ConfigError, RandomPruner
from tests.conftest import tiny_model

RESULT_KEYS = {"method", "model", "task", "budget", "n_samples", "config", "metrics", "tokens", "cost"}
COST_KEYS = {"prefill_ms", "decode_ms_per_token", "peak_memory_bytes", "kv_cache_bytes", "selection_ms", "flops_total",
             "flops_attention", "flops_vision_attention", "flops_prefill", "flops_decode", "flops_method",
             "flops_source", "paper_vision_token_flops", "flops"}


def harness(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *overrides], capture_output=True, text=True, timeout=300)


def tiny_run(tmp_path, model: str, method: str, budget: str, directory: str) -> tuple[dict, list[dict]]:
    """`python -m harness model=<model> method=<method> <budget> task.limit=2` on the synthetic task, which must
    succeed: its result.json and samples (in `<model>/synthetic/<method>/<directory>`)."""
    run = harness(f"model={model}", f"method={method}", budget, "task.limit=2", f"output_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    out = tmp_path / model / "synthetic" / method / directory
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return json.loads((out / "result.json").read_text()), samples


def test_run_writes_results_and_a_rerun_is_skipped(tmp_path):
    args = ("model=tiny", "method=random", "budget=64", "task.limit=3", f"output_dir={tmp_path}")
    first = harness(*args)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "tiny" / "synthetic" / "random" / "64"
    result = json.loads((out / "result.json").read_text())
    assert RESULT_KEYS <= set(result) and COST_KEYS <= set(result["cost"])
    assert result["n_samples"] == 3 and result["budget"] == {"tokens": 64, "convention": "exact", "per": "image",
                                                                   "used": True}
    assert result["tokens"]["per_layer"] == [64.0] * 16 and result["tokens"]["mean_vision_tokens"] == 64.0
    assert result["config"]["method"] == {"name": "random", "k": 0, "seed": 0, "positions": "original"}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["vision_tokens_per_layer"] for s in samples] == [[64] * 16] * 3
    assert all(s["kv_cache_bytes"] > 0 and s["prefill_ms"] > 0 for s in samples)
    for s in samples:  # every text token enters every layer
        assert len({n - v for n, v in zip(s["tokens_per_layer"], s["vision_tokens_per_layer"], strict=True)}) == 1
    mean_total = sum(s["flops"]["prefill"]["total"] + s["flops"]["decode"]["total"] for s in samples) / 3
    assert result["cost"]["flops_total"] == pytest.approx(mean_total) and result["cost"]["flops_method"] is None

    second = harness(*args)
    assert second.returncode == 0, second.stderr
    assert "skipped" in second.stdout
    assert json.loads((out / "result.json").read_text()) == result


def config(tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", "model=tiny", "task.limit=4", *overrides])


def test_a_killed_run_resumes_without_redoing_finished_samples(tmp_path, monkeypatch):
    cfg = config(tmp_path, "method=random", "budget=32")
    out = run_module.run(cfg)
    complete = (out / "samples.jsonl").read_text().splitlines()
    # Simulate a kill after two samples, the third line half-written, no result.json yet.
    (out / "result.json").unlink()
    (out / "samples.jsonl").write_text("\n".join(complete[:2]) + "\n" + complete[2][:40])
    generated = []
    real = Prunebench._generate
    monkeypatch.setattr(Prunebench, "_generate",
                        lambda self, batch: generated.extend(item[1] for item in batch) or real(self, batch))
    run_module.run(cfg)
    assert generated == [json.loads(line)["id"] for line in complete[2:]]
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [json.loads(line)["id"] for line in complete]
    assert [r["output"] for r in lines] == [json.loads(line)["output"] for line in complete]
    assert json.loads((out / "result.json").read_text())["n_samples"] == 4


def test_a_different_config_in_the_same_directory_is_refused(tmp_path):
    run_module.run(config(tmp_path, "method=random", "budget=32"))
    with pytest.raises(ConfigError, match="force=true"):
        run_module.run(config(tmp_path, "method=random", "budget=32", "method.seed=1"))
    run_module.run(config(tmp_path, "method=random", "budget=32", "method.seed=1", "force=true"))


def test_docs_and_images_are_read_a_batch_at_a_time(tmp_path, monkeypatch):
    """A large task's images must not all be decoded before the first sample runs: each batch reads only its own
    docs (a prompt without an image still runs alone)."""
    cfg = config(tmp_path, "method=none", "batch_size=2")
    model = Prunebench.for_run(cfg, validate(cfg), {}, None)
    read: list[int] = []

    def doc_to_visual(doc: dict) -> list:
        read.append(doc["n"])
        return [] if doc["n"] == 2 else [Image.new("RGB", (8, 8))]

    model.task_dict = {"t": {"test": [{"n": n, "category": "c"} for n in range(5)]}}
    requests = [SimpleNamespace(args=("q", {"max_new_tokens": 2}, doc_to_visual, n, "t", "test")) for n in range(5)]
    batches = []

    def generate(self, batch: list) -> list[dict]:
        batches.append([item[5]["n"] for item in batch])
        assert max(read) < batches[-1][0] + cfg.batch_size  # nothing beyond this batch's window was read
        return [{"id": item[1], "output": f"answer {item[5]['n']}"} for item in batch]

    monkeypatch.setattr(Prunebench, "_generate", generate)
    results = model.generate_until(requests)
    assert batches == [[0, 1], [2], [3, 4]]
    assert [r.text for r in results] == [f"answer {n}" for n in range(5)]


@torch.no_grad()
def test_a_prompt_without_an_image_runs_unpruned_and_says_so(tmp_path):
    cfg = config(tmp_path, "method=random", "budget=64", "model.num_layers=4")
    model = Prunebench.for_run(cfg, RandomPruner(k=0, budget=Budget(64)), {}, None)
    model.loaded = tiny_model()
    (record,) = model._generate([(0, "text/0", "What is two plus two?", {"max_new_tokens": 4}, [], {})])
    assert record["pruned"] is False
    assert record["vision_tokens_per_layer"] == [0, 0, 0, 0]
    assert "no image tokens" in record["note"]


def test_a_sweep_of_every_baseline_and_budget_completes_offline(tmp_path):
    methods, budgets = ["fastv", "sparsevlm", "pdrop", "visionzip", "random"], ["192", "128", "64"]
    proc = harness("-m", f"method={','.join(methods)}", f"budget={','.join(budgets)}", "model=tiny",
                   "task.limit=2", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "error" not in proc.stderr
    for method in methods:
        for budget in budgets:
            result = json.loads((tmp_path / "tiny" / "synthetic" / method / budget / "result.json").read_text())
            assert result["n_samples"] == 2 and result["tokens"]["mean_vision_tokens"] < 576


@pytest.mark.parametrize(("budget", "config", "label"), [
    ({"tokens": 64, "per": "image", "used": True}, {"retain": None}, "64"),
    ({"tokens": None, "per": "image", "used": True}, {"retain": 0.25}, "retain 0.25"),  # resolved per image (Qwen)
    ({"tokens": 8, "per": "view", "used": True}, {"retain": None}, "8 per view"),
    ({"tokens": 64, "per": "image", "used": False}, {"retain": None}, "none"),
])
def test_the_summary_names_the_budget_the_run_had(budget, config, label, tmp_path):
    result = {"method": "m", "model": "x", "task": "t", "n_samples": 2, "budget": budget, "config": config,
              "metrics": {"acc": 0.5, "by_category": {}}, "primary_metric": "acc",
              "tokens": {"mean_vision_tokens": 8.0},
              "cost": {"flops_total": 2e9, "flops_prefill": 1e9, "prefill_ms": 3}}
    assert run_module.summary_table(result, tmp_path).splitlines()[0] == f"m on x / t (budget {label}), 2 samples"
