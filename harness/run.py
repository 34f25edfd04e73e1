"""One evaluation job: results/<model>/<task>/<method>/<budget>/{result.json, samples.jsonl}.

Nothing is lost when a run dies: each finished sample is appended (and fsync'ed) to samples.jsonl, a rerun of the
same configuration resumes after the last complete line, and result.json is written atomically at the end. Rerunning
a finished configuration is skipped unless `force=true`. Jobs that map to one directory (a method that ignores the
budget, swept over budgets by a parallel launcher) run one at a time: the later one finds the run finished.
A configuration the method refuses (e.g. a budget its schedule cannot reach on this model) leaves `refused.json`, its
config and the reason, where its result would have gone, so that a sweep's leaderboard lists it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness import flops
from harness.config import Refusal, validate
from harness.evaluate import Evaluation, evaluate
from harness.lmms import Prunebench
from harness.results import REFUSED, RESULT, SAMPLES, STARTED, read_samples, write_json_atomic, write_record
from harness.tracking import log_run
from methods.base import ConfigError, TokenPruner

# Keys that change where or whether a run happens, or what it writes down, not what it computes.
NON_RESULT_KEYS = ("force", "output_dir", "wandb", "record_selections")
ADDED_KEYS = ("retain", "budget_per")


def result_dir(cfg: DictConfig, pruner: TokenPruner) -> Path:
    """`label` tells apart configs of one method (e.g. VisiPruner's ablations); budgets a method ignores are `none`."""
    budget = pruner.budget.label if pruner.uses_budget else "none"
    return Path(cfg.output_dir) / cfg.model.name / cfg.task.name / cfg.method.get("label", cfg.method.name) / budget


def config_key(config: dict) -> str:
    # Keys added after runs were made count only when set, so those runs keep their keys.
    defining = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS and not (k in ADDED_KEYS and v is None)}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def one_job_at_a_time(out: Path, world: int) -> Iterator[None]:
    """Holds `out`'s lock while a job runs in it (the ranks of one `accelerate launch` share it by design)."""
    out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        yield
        return
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        yield


def run(cfg: DictConfig) -> Path:
    try:
        pruner = validate(cfg)
    except Refusal as refusal:
        record_refusal(cfg, refusal)
        raise
    config = OmegaConf.to_container(cfg, resolve=True)
    if not pruner.uses_budget:  # a budget the method ignores changes nothing: one run serves every budget
        config["budget"], config["budget_convention"] = None, "exact"
    # Under `accelerate launch` each rank appends to its own shard; rank 0 merges them once lmms-eval has gathered.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = result_dir(cfg, pruner)
    with one_job_at_a_time(out, world):
        return run_in(out, cfg, pruner, config, rank, world)


def record_refusal(cfg: DictConfig, refusal: Refusal) -> None:
    """`refused.json` in the configuration's result directory, unless a finished run already holds it."""
    out = result_dir(cfg, refusal.pruner)
    if (out / RESULT).exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / REFUSED, {"method": cfg.method.get("label", cfg.method.name), "model": cfg.model.name,
                                      "task": cfg.task.name, "reason": str(refusal),
                                      "config": OmegaConf.to_container(cfg, resolve=True)})


def run_in(out: Path, cfg: DictConfig, pruner: TokenPruner, config: dict, rank: int, world: int) -> Path:
    key = config_key(config)
    finished = out / RESULT
    if finished.exists() and not cfg.force:
        previous = json.loads(finished.read_text())
        if previous.get("config_key") == key:
            print(f"skipped: {out} is already finished (force=true reruns it)")
            return out
        raise ConfigError(f"{out} holds a finished run of a different configuration; pass force=true to replace it")
    started = out / STARTED
    if cfg.force or (started.exists() and json.loads(started.read_text()).get("config_key") != key):
        if not cfg.force:
            raise ConfigError(f"{out} holds an unfinished run of a different configuration; pass force=true to "
                              "discard it")
        for name in (RESULT, SAMPLES, STARTED):
            (out / name).unlink(missing_ok=True)
    write_json_atomic(started, {"config_key": key, "config": config})
    (out / REFUSED).unlink(missing_ok=True)  # this configuration runs: an earlier one's refusal no longer holds
    shard = out / (SAMPLES if world == 1 else f"samples.rank{rank}.jsonl")
    done = {r["id"]: r for r in read_samples(shard, repair=True)}
    for other in [out / SAMPLES, *out.glob("samples.rank*.jsonl")]:
        if other != shard:
            done.update((r["id"], r) for r in read_samples(other))
    if done:
        print(f"resuming {out}: {len(done)} samples already done")
    with open(shard, "a") as handle:
        model = Prunebench.for_run(cfg, pruner, done, write_record(handle))
        evaluation = evaluate(model, cfg.task, out)  # ranks other than 0 stop here
    for other in out.glob("samples.rank*.jsonl"):
        model.records.update((r["id"], r) for r in read_samples(other))
    records = scored_records(model.records, evaluation)
    with open(out / SAMPLES, "w") as handle:  # the same lines, now with each sample's score
        handle.writelines(json.dumps(r) + "\n" for r in records)
    for other in out.glob("samples.rank*.jsonl"):
        other.unlink()
    result = summarize(records, evaluation, cfg, pruner, config, key)
    write_json_atomic(finished, result)
    log_run(result, cfg, out)
    print(summary_table(result, out))
    return out


def scored_records(records: dict[str, dict], evaluation: Evaluation) -> list[dict]:
    """The run's records in task order, each with its score (the task's first metric, where it is per sample)."""
    scored = []
    for sample in evaluation.samples:
        record = dict(records[f"{evaluation.task}/{sample['doc_id']}"])
        value = sample.get(evaluation.primary_metric)
        record["score"] = float(value) if isinstance(value, int | float) else None
        scored.append(record)
    return scored


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _mean_of(records: list[dict], key: str) -> dict:
    """Mean of a per-sample method number over the samples where it is defined (None: e.g. no filtering layer)."""
    values = [r[key] for r in records if r.get(key) is not None]
    return {"mean": statistics.fmean(values) if values else None, "defined": len(values), "of": len(records)}


def summarize(records: list[dict], evaluation: Evaluation, cfg: DictConfig, pruner: TokenPruner, config: dict,
              key: str) -> dict:
    by_category: dict[str, list[float]] = {}
    for r in records:
        if r.get("category") is not None and r["score"] is not None:
            by_category.setdefault(r["category"], []).append(r["score"])
    layers = len(records[0]["vision_tokens_per_layer"]) if records else 0
    per_layer = [statistics.fmean(r["vision_tokens_per_layer"][i] for r in records) for i in range(layers)]
    return {
        "method": cfg.method.get("label", cfg.method.name),
        "model": cfg.model.name,
        "task": cfg.task.name,
        "budget": {"tokens": pruner.budget.tokens, "convention": pruner.budget.convention,
                   "per": pruner.budget.per, "used": pruner.uses_budget},
        "n_samples": len(records),
        "config_key": key,
        "config": config,
        "metrics": {**evaluation.metrics,
                    "by_category": {c: statistics.fmean(s) for c, s in sorted(by_category.items())}},
        "primary_metric": evaluation.primary_metric,
        "higher_is_better": evaluation.higher_is_better,
        "method_stats": {key: _mean_of(records, key) for key in pruner.record_keys},
        "tokens": {"per_layer": per_layer, "mean_vision_tokens": statistics.fmean(per_layer) if per_layer else None,
                   # T̄_in over each sample's own unpruned count: comparable across image sizes
                   "mean_vision_fraction": _mean_of(records, "mean_vision_fraction")["mean"]},
        "cost": {
            "prefill_ms": _median([r["prefill_ms"] for r in records]),
            "decode_ms_per_token": _median([r["decode_ms_per_token"] for r in records]),
            "peak_memory_bytes": max((r["peak_memory_bytes"] for r in records), default=None),
            "kv_cache_bytes": statistics.fmean(r["kv_cache_bytes"] for r in records) if records else None,
            "selection_ms": _median([r["selection_ms"] for r in records]),
            **flops.cost_fields(records, cfg.flops),
        },
    }


def summary_table(result: dict, out: Path) -> str:
    """What a finished run prints: accuracy overall and per category, T̄_in, FLOPs and prefill latency."""
    metrics, tokens, cost = result["metrics"], result["tokens"], result["cost"]
    primary = result["primary_metric"]
    columns = {primary: metrics[primary], **metrics["by_category"]}
    widths = [max(len(name), 6) for name in columns]
    budget, retain = result["budget"], result["config"].get("retain")
    budget = ("none" if not budget["used"] else (f"retain {retain:g}" if retain is not None else str(budget["tokens"]))
              + (" per view" if budget.get("per") == "view" else ""))
    return "\n".join([
        f"{result['method']} on {result['model']} / {result['task']} (budget {budget}), {result['n_samples']} samples",
        "  " + "  ".join(name.rjust(w) for name, w in zip(columns, widths, strict=True)),
        "  " + "  ".join(f"{value:.3f}".rjust(w) for value, w in zip(columns.values(), widths, strict=True)),
        f"  T̄_in {tokens['mean_vision_tokens']:.1f} vision tokens per layer  |  "
        f"{cost['flops_total'] / 1e9:.3f} GFLOPs per sample ({cost['flops_prefill'] / 1e9:.3f} prefill)  |  "
        f"prefill {cost['prefill_ms']:.1f} ms (median)",
        f"  -> {out}",
    ])
