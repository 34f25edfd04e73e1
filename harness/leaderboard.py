"""The local leaderboard: `python -m harness.leaderboard [results_dir] [--wandb offline|online]`.

Reads every `result.json` under `results_dir` and writes there:
- `leaderboard.md` and `leaderboard.csv`: one row per model × method × budget; each task's metric, the mean accuracy
  relative to the dense (`none`) run of the same model and task, T̄_in, the FLOPs ratio to dense, prefill latency,
  KV-cache bytes, and loyalty to the dense run;
- `pareto.png`: relative accuracy against the FLOPs ratio, one line per method, one panel per model.

Loyalty compares a run's samples with the dense run's, by sample: **agreement** is the fraction of identical outputs;
**KL** is the mean KL(P_dense || P_run) of the first generated token's distribution, computed over the dense run's
stored top-64 tokens plus one bucket for the rest (a token the run did not store takes its 64th probability). It is
exact when the stored tokens hold the mass and otherwise a lower bound. A missing dense run is reported, with the
command that computes it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from harness.results import RESULT, SAMPLES, read_samples
from harness.tracking import log_leaderboard


def load_runs(results_dir: Path) -> list[dict]:
    runs = []
    for path in sorted(results_dir.rglob(RESULT)):
        if ".multirun" in path.parts:
            continue
        result = json.loads(path.read_text())
        result["dir"] = path.parent
        result["budget_label"] = path.parent.name
        runs.append(result)
    return runs


def samples_by_id(run_dir: Path) -> dict[str, dict]:
    return {record["id"]: record for record in read_samples(run_dir / SAMPLES)}


def first_token_kl(dense: dict, run: dict) -> float:
    p_ids, p_logprobs = dense["ids"], dense["logprobs"]
    q = dict(zip(run["ids"], run["logprobs"], strict=True))
    q_floor = min(run["logprobs"])
    p = [math.exp(v) for v in p_logprobs]
    qs = [math.exp(q.get(i, q_floor)) for i in p_ids]
    kl = sum(pi * (lp - math.log(qi)) for pi, lp, qi in zip(p, p_logprobs, qs, strict=True))
    p_rest, q_rest = max(1 - sum(p), 0.0), max(1 - sum(qs), 1e-12)
    return kl + (p_rest * math.log(p_rest / q_rest) if p_rest > 1e-12 else 0.0)


def loyalty(dense_dir: Path, run_dir: Path) -> tuple[float, float]:
    """(answer agreement, mean first-token KL) of a run against the dense run, over their common samples."""
    dense, run = samples_by_id(dense_dir), samples_by_id(run_dir)
    common = [i for i in run if i in dense]
    agreement = statistics.fmean(run[i]["output"] == dense[i]["output"] for i in common)
    kl = statistics.fmean(first_token_kl(dense[i]["first_token_top"], run[i]["first_token_top"]) for i in common)
    return agreement, kl


def relative(value: float | None, dense: float | None, higher_is_better: bool) -> float | None:
    if value is None or not dense:
        return None
    return value / dense if higher_is_better else dense / value if value else None


def build(runs: list[dict]) -> tuple[list[dict], list[str], list[str]]:
    """Leaderboard rows, the task columns, and warnings (missing dense runs)."""
    dense = {(r["model"], r["task"]): r for r in runs if r["method"] == "none"}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run["model"], run["method"], run["budget_label"])].append(run)
    tasks = sorted({r["task"] for r in runs})
    rows, warnings = [], []
    for (model, method, budget), group in sorted(groups.items(), key=lambda item: _row_order(*item[0])):
        row = {"model": model, "method": method, "budget": budget}
        ratios, flops, agreements, kls = [], [], [], []
        for run in group:
            metric = run["metrics"][run["primary_metric"]]
            row[run["task"]] = metric
            reference = dense.get((model, run["task"]))
            if reference is None:
                warnings.append(f"no dense run for {model} / {run['task']}: "
                                f"python -m harness method=none model={model} task={run['task']}")
                continue
            ratios.append(relative(metric, reference["metrics"][reference["primary_metric"]],
                                   run.get("higher_is_better", True)))
            if run["cost"].get("flops_total") and reference["cost"].get("flops_total"):
                flops.append(run["cost"]["flops_total"] / reference["cost"]["flops_total"])
            agreement, kl = loyalty(reference["dir"], run["dir"])
            agreements.append(agreement)
            kls.append(kl)
        row.update({
            "relative_accuracy": _mean(ratios),
            "mean_vision_tokens": _mean([r["tokens"]["mean_vision_tokens"] for r in group]),
            "flops_ratio": _mean(flops),
            "prefill_ms": _mean([r["cost"]["prefill_ms"] for r in group]),
            "kv_cache_bytes": _mean([r["cost"]["kv_cache_bytes"] for r in group]),
            "agreement": _mean(agreements),
            "first_token_kl": _mean(kls),
        })
        rows.append(row)
    return rows, tasks, sorted(set(warnings))


def _row_order(model: str, method: str, budget: str) -> tuple:
    """Dense first, then methods by name, budgets from the largest (e.g. 192, 128, 64, then 64-average)."""
    tokens = budget.split("-")[0]
    return model, method != "none", method, -int(tokens) if tokens.isdigit() else 0, budget


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


COLUMNS = ["relative_accuracy", "mean_vision_tokens", "flops_ratio", "prefill_ms", "kv_cache_bytes", "agreement",
           "first_token_kl"]


def header(tasks: list[str]) -> list[str]:
    return ["model", "method", "budget", *tasks, *COLUMNS]


def write_tables(rows: list[dict], tasks: list[str], out: Path) -> tuple[Path, Path]:
    header_row = header(tasks)
    csv_path, md_path = out / "leaderboard.csv", out / "leaderboard.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header_row)
        writer.writeheader()
        writer.writerows({k: row.get(k) for k in header_row} for row in rows)
    lines = ["| " + " | ".join(header_row) + " |", "|" + "---|" * len(header_row)]
    lines += ["| " + " | ".join(_cell(row.get(k)) for k in header_row) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def write_pareto(rows: list[dict], out: Path) -> Path:
    """Relative accuracy against the FLOPs ratio, one line per method (points labelled with their budget), one
    panel per model. Where a model's dense accuracy is 0 (an untrained model) relative accuracy is undefined, and the
    panel plots the answer agreement with the dense run instead, saying so on its axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({row["model"] for row in rows})
    use_flops = any(row["flops_ratio"] is not None for row in rows)
    x_key = "flops_ratio" if use_flops else "mean_vision_tokens"
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        model_rows = [row for row in rows if row["model"] == model and row[x_key] is not None]
        pruned = [row for row in model_rows if row["method"] != "none"]
        y_key = "relative_accuracy" if all(r["relative_accuracy"] is not None for r in pruned) else "agreement"
        by_method: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for row in pruned:
            if row[y_key] is not None:
                by_method[row["method"]].append((row[x_key], row[y_key], row["budget"]))
        for method, points in sorted(by_method.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
            for x, y, budget in points:
                ax.annotate(budget, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
        if use_flops:
            ax.plot([1.0], [1.0], marker="*", markersize=12, color="black", linestyle="none", label="dense")
        ax.set_title(model)
        ax.set_xlabel("FLOPs / dense FLOPs" if use_flops else "T̄_in (vision tokens entering a layer, mean)")
        ax.set_ylabel("accuracy / dense accuracy" if y_key == "relative_accuracy"
                      else "answers equal to dense (dense accuracy is 0)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", type=Path, default=Path("results"))
    parser.add_argument("--wandb", choices=["disabled", "offline", "online"], default="disabled")
    parser.add_argument("--project", default="prunebench")
    parser.add_argument("--entity", default=None)
    args = parser.parse_args()
    runs = load_runs(args.results_dir)
    if not runs:
        raise SystemExit(f"no {RESULT} under {args.results_dir}")
    rows, tasks, warnings = build(runs)
    md, csv_path = write_tables(rows, tasks, args.results_dir)
    pareto = write_pareto(rows, args.results_dir)
    for warning in warnings:
        print(f"warning: {warning}")
    print(md.read_text())
    print(f"wrote {md}, {csv_path}, {pareto}")
    if args.wandb != "disabled":
        log_leaderboard(header(tasks), rows, pareto, args.wandb, args.project, args.entity, args.results_dir)


if __name__ == "__main__":
    main()
