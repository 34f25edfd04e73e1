"""One evaluation job: results/<model>/<task>/<method>/<budget>/{result.json, samples.jsonl}.

Nothing is lost when a run dies: each finished sample is appended (and fsync'ed) to samples.jsonl, a rerun of the
same configuration resumes after the last complete line, and result.json is written atomically at the end. Rerunning
a finished configuration is skipped unless `force=true`.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from harness import flops, models, tasks
from harness.config import validate
from harness.cost import ForwardTimer, peak_memory_bytes
from harness.runtime import prune
from methods.base import ConfigError, TokenPruner

RESULT, SAMPLES, STARTED = "result.json", "samples.jsonl", "config.json"
# Keys that change where or whether a run happens, not what it computes.
NON_RESULT_KEYS = ("force", "output_dir")


def result_dir(cfg: DictConfig, pruner: TokenPruner) -> Path:
    """`label` tells apart configs of one method (e.g. VisiPruner's ablations); budgets a method ignores are `none`."""
    budget = pruner.budget.label if pruner.uses_budget else "none"
    return Path(cfg.output_dir) / cfg.model.name / cfg.task.name / cfg.method.get("label", cfg.method.name) / budget


def config_key(config: dict) -> str:
    defining = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_samples(path: Path) -> list[dict]:
    """Complete lines of samples.jsonl; a line cut short by a killed run is dropped (and redone)."""
    if not path.exists():
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    with open(path, "w") as f:  # rewrite without the torn tail so appends stay line-aligned
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def run(cfg: DictConfig) -> Path:
    pruner = validate(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    key = config_key(config)
    out = result_dir(cfg, pruner)
    finished = out / RESULT
    if finished.exists() and not cfg.force:
        previous = json.loads(finished.read_text())
        if previous.get("config_key") == key:
            print(f"skipped: {out} is already finished (force=true reruns it)")
            return out
        raise ConfigError(f"{out} holds a finished run of a different configuration; pass force=true to replace it")
    out.mkdir(parents=True, exist_ok=True)
    started = out / STARTED
    if cfg.force or (started.exists() and json.loads(started.read_text()).get("config_key") != key):
        if not cfg.force:
            raise ConfigError(f"{out} holds an unfinished run of a different configuration; pass force=true to "
                              "discard it")
        for name in (RESULT, SAMPLES, STARTED):
            (out / name).unlink(missing_ok=True)
    write_json_atomic(started, {"config_key": key, "config": config})

    samples = tasks.load_samples(cfg.task)
    records = read_samples(out / SAMPLES)
    done = {r["id"] for r in records}
    todo = [s for s in samples if s.id not in done]
    if done:
        print(f"resuming {out}: {len(done)} of {len(samples)} samples already done")
    if todo:
        loaded = models.load(cfg.model, cfg.device)
        if loaded.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(loaded.device)
        with open(out / SAMPLES, "a") as sink, tqdm(total=len(todo), desc=f"{cfg.method.name} {out.name}",
                                                     unit="sample") as bar:
            for batch in _batches(todo, cfg.batch_size):
                for record in evaluate_batch(loaded, pruner, batch, cfg.task.max_new_tokens, cfg.flops):
                    record["peak_memory_bytes"] = peak_memory_bytes(loaded.device)
                    sink.write(json.dumps(record) + "\n")
                    records.append(record)
                sink.flush()
                os.fsync(sink.fileno())
                bar.update(len(batch))
    result = summarize(records, cfg, pruner, config, key)
    write_json_atomic(finished, result)
    print(summary_line(result, out))
    return out


def _batches(samples: list[tasks.Sample], size: int):
    """Batches of up to `size`; a sample without an image always runs alone."""
    batch = []
    for sample in samples:
        if sample.image is None:
            yield [sample]
            continue
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def evaluate_batch(loaded: models.LoadedModel, pruner: TokenPruner, batch: list[tasks.Sample],
                   max_new_tokens: int, flops_source: str = "projected") -> list[dict]:
    images = [s.image for s in batch] if batch[0].image is not None else None
    inputs = loaded.inputs(images, [s.question for s in batch])
    with prune(loaded.model, pruner, sample_ids=[s.id for s in batch]) as runtime, \
            ForwardTimer(loaded.model) as timer:
        generated = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    outputs = loaded.decode(generated[:, inputs["input_ids"].shape[1]:])
    per_layer = runtime.vision_tokens_per_layer().tolist() if runtime.active else [[0] * loaded.num_layers] * len(batch)
    method_fields = [pruner.record(row) if runtime.active else {} for row in range(len(batch))]
    schedule = flops.executed_schedule(runtime, timer.decode_steps)
    arch = flops.Architecture.from_config(loaded.model.config)
    if flops_source == "counted":  # an untimed replay, after the timed run (whose method state is read above)
        prefill, decode = flops.count_generation(loaded.model, pruner, inputs, [s.id for s in batch],
                                                 max_new_tokens=max_new_tokens, do_sample=False)
    else:
        prefill, decode = flops.project(arch, schedule)
    records = []
    for row, (sample, output) in enumerate(zip(batch, outputs, strict=True)):
        record = {
            "id": sample.id, "category": sample.category, "question": sample.question, "answer": sample.answer,
            "output": output, "score": tasks.score(output, sample.answer),
            "pruned": runtime.active and pruner.name != "none",
            "vision_tokens_per_layer": per_layer[row],
            "tokens_per_layer": schedule.tokens,
            "mean_vision_tokens": sum(per_layer[row]) / len(per_layer[row]),
            "prefill_ms": 1e3 * timer.prefill_seconds,
            "decode_ms_per_token": 1e3 * timer.decode_seconds / timer.decode_steps if timer.decode_steps else None,
            "kv_cache_bytes": timer.kv_bytes // len(batch),
            "selection_ms": 1e3 * runtime.selection_seconds,
            "batch_size": len(batch),
            "decode_steps": timer.decode_steps,
            "flops": flops.sample_record(prefill, decode, arch, per_layer[row]),
        }
        if not runtime.active:
            record["note"] = "no image tokens in the prompt: ran unpruned"
        elif pruner.budget.tokens is not None and not pruner.uses_budget:
            record["note"] = f"method {pruner.name} has no token budget: budget {pruner.budget.label} ignored"
        record.update(method_fields[row])
        records.append(record)
    return records


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _mean_of(records: list[dict], key: str) -> dict:
    """Mean of a per-sample method number over the samples where it is defined (None: e.g. no filtering layer)."""
    values = [r[key] for r in records if r.get(key) is not None]
    return {"mean": statistics.fmean(values) if values else None, "defined": len(values), "of": len(records)}


def summarize(records: list[dict], cfg: DictConfig, pruner: TokenPruner, config: dict, key: str) -> dict:
    by_category: dict[str, list[float]] = {}
    for r in records:
        by_category.setdefault(r["category"], []).append(r["score"])
    layers = len(records[0]["vision_tokens_per_layer"]) if records else 0
    per_layer = [statistics.fmean(r["vision_tokens_per_layer"][i] for r in records) for i in range(layers)]
    return {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "budget": {"tokens": pruner.budget.tokens, "convention": pruner.budget.convention,
                   "used": pruner.uses_budget},
        "n_samples": len(records),
        "config_key": key,
        "config": config,
        "metrics": {
            "accuracy": statistics.fmean(r["score"] for r in records) if records else None,
            "accuracy_by_category": {c: statistics.fmean(s) for c, s in sorted(by_category.items())},
        },
        "method_stats": {key: _mean_of(records, key) for key in pruner.record_keys},
        "tokens": {"per_layer": per_layer, "mean_vision_tokens": statistics.fmean(per_layer) if per_layer else None},
        "cost": {
            "prefill_ms": _median([r["prefill_ms"] for r in records]),
            "decode_ms_per_token": _median([r["decode_ms_per_token"] for r in records]),
            "peak_memory_bytes": max((r["peak_memory_bytes"] for r in records), default=None),
            "kv_cache_bytes": statistics.fmean(r["kv_cache_bytes"] for r in records) if records else None,
            "selection_ms": _median([r["selection_ms"] for r in records]),
            **flops.cost_fields(records, cfg.flops),
        },
    }


def summary_line(result: dict, out: Path) -> str:
    metrics, tokens, cost = result["metrics"], result["tokens"], result["cost"]
    categories = "  ".join(f"{c}={v:.3f}" for c, v in metrics["accuracy_by_category"].items())
    return (f"{result['method']} {result['model']} {result['task']} budget={out.name}: "
            f"accuracy={metrics['accuracy']:.3f} ({categories})  T̄_in={tokens['mean_vision_tokens']:.1f}  "
            f"prefill={cost['prefill_ms']:.1f} ms  -> {out}")
