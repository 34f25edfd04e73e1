"""The local leaderboard: `python -m harness.leaderboard [results_dir] [--wandb offline|online]`.

Reads one results tree, `results_dir/<model>/<task>/<method>/<budget>/` (as `python -m harness output_dir=...`
writes it; trees nested deeper, e.g. results/first_comparison, are named and left to their own leaderboard), and
writes there:
- `leaderboard.md` and `leaderboard.csv`: one row per model × method × budget; each task's metric, the mean accuracy
  relative to the dense (`none`) run of the same model and task, T̄_in, the FLOPs ratio to dense, prefill latency,
  KV-cache bytes, loyalty to the dense run, and a note: configurations the method refused (with the reason),
  unfinished runs, and runs not compared because they answered other questions than the dense run;
- `pareto.png`: relative accuracy against the FLOPs ratio, one line per method, one panel per model.

Like for like: a run is compared with a dense run only over the same questions (the same sample ids: the same
`task.limit` and data). A missing dense run is reported with the command that computes it, and no dense point is
drawn for it.

Loyalty compares a run's samples with the dense run's, by sample: **agreement** is the fraction of identical outputs;
**KL** is the mean KL(P_dense || P_run) of the first generated token's distribution, computed over the dense run's
stored top-64 tokens plus one bucket for the rest (a token the run did not store takes its 64th probability). It is
exact when the stored tokens hold the mass and otherwise a lower bound.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from harness.results import REFUSED, RESULT, SAMPLES, STARTED, read_samples
from harness.tracking import log_leaderboard

LAYOUT_DEPTH = 4  # <model>/<task>/<method>/<budget>/ below the tree's root, as `harness.run.result_dir` lays it out


def load_runs(results_dir: Path) -> list[dict]:
    """Every configuration of the results tree at `results_dir`: finished runs (result.json, with the ids of their
    questions), refused ones (refused.json) and unfinished ones (config.json and the samples done so far)."""
    runs = []
    for directory in sorted(results_dir.glob("/".join("*" * LAYOUT_DEPTH))):
        if not directory.is_dir() or _hidden(directory, results_dir):
            continue
        if (directory / RESULT).is_file():
            run = json.loads((directory / RESULT).read_text())
            run["status"], run["ids"] = "finished", frozenset(samples_by_id(directory))
        elif (directory / REFUSED).is_file():
            run = json.loads((directory / REFUSED).read_text())
            run["status"] = "refused"
        elif (directory / STARTED).is_file():
            config = json.loads((directory / STARTED).read_text())["config"]
            run = {"method": config["method"].get("label", config["method"]["name"]), "model": config["model"]["name"],
                   "task": config["task"]["name"], "config": config, "status": "unfinished",
                   "done": sum(len(read_samples(path)) for path in directory.glob("samples*.jsonl"))}
        else:
            continue
        run["dir"], run["budget_label"] = directory, directory.name
        runs.append(run)
    return runs


def other_trees(results_dir: Path) -> list[Path]:
    """Results trees nested deeper in `results_dir` (e.g. results/first_comparison), which its leaderboard leaves
    out: one leaderboard reads one tree, so that no two runs of one configuration meet in a row."""
    return sorted({path.parents[LAYOUT_DEPTH] for path in results_dir.rglob(RESULT)
                   if len(path.relative_to(results_dir).parts) > LAYOUT_DEPTH + 1 and not _hidden(path, results_dir)})


def _hidden(path: Path, root: Path) -> bool:
    """Under a hidden directory, e.g. a sweep's `.multirun` logs."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


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
    """Leaderboard rows, the task columns, and warnings (missing dense runs, comparisons that are not like for like).

    A run is compared with the dense run of the same model and task only where both answered the same questions;
    otherwise its relative numbers stay empty and its note says why. Refused and unfinished configurations get a row
    that says so."""
    dense = {(r["model"], r["task"]): r for r in runs if r["method"] == "none" and r["status"] == "finished"}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run["model"], run["method"], run["budget_label"])].append(run)
    tasks = sorted({r["task"] for r in runs})
    rows, warnings = [], []
    for (model, method, budget), group in sorted(groups.items(), key=lambda item: _row_order(*item[0])):
        row = {"model": model, "method": method, "budget": budget, **dict.fromkeys(COLUMNS)}
        finished = [run for run in group if run["status"] == "finished"]
        notes, ratios, flops, agreements, kls = [], [], [], [], []
        for run in group:
            if run["status"] == "refused":
                notes.append(f"refused: {run['reason']}")
                continue
            if run["status"] == "unfinished":
                notes.append(f"unfinished ({run['done']} questions done): rerun its command to resume")
                continue
            metric = run["metrics"][run["primary_metric"]]
            row[run["task"]] = metric
            reference = dense.get((model, run["task"]))
            if reference is None:
                warnings.append(f"no dense run of {model} / {run['task']} to compare with: {dense_command(run)}")
                continue
            if run["ids"] != reference["ids"]:
                limits = f"task.limit={_limit(run)} against the dense run's task.limit={_limit(reference)}"
                notes.append(f"not compared: {len(run['ids'])} questions, the dense run {len(reference['ids'])}")
                warnings.append(f"{method} / {budget} on {model} / {run['task']} answered other questions than the "
                                f"dense run ({limits}): not compared; rerun one of them with the other's task.limit "
                                "(force=true replaces a finished run)")
                continue
            ratios.append(relative(metric, reference["metrics"][reference["primary_metric"]],
                                   run.get("higher_is_better", True)))
            if run["cost"].get("flops_total") and reference["cost"].get("flops_total"):
                flops.append(run["cost"]["flops_total"] / reference["cost"]["flops_total"])
            agreement, kl = loyalty(reference["dir"], run["dir"])
            agreements.append(agreement)
            kls.append(kl)
        if finished:
            row.update({
                "relative_accuracy": _mean(ratios),
                "mean_vision_tokens": _mean([r["tokens"]["mean_vision_tokens"] for r in finished]),
                "flops_ratio": _mean(flops),
                "prefill_ms": _mean([r["cost"]["prefill_ms"] for r in finished]),
                "kv_cache_bytes": _mean([r["cost"]["kv_cache_bytes"] for r in finished]),
                "agreement": _mean(agreements),
                "first_token_kl": _mean(kls),
            })
        row["note"] = "; ".join(dict.fromkeys(notes)) or None
        rows.append(row)
    return rows, tasks, sorted(set(warnings))


def dense_command(run: dict) -> str:
    """The command that runs the dense reference of `run`: same model, task and questions, into the same tree."""
    limit = f" task.limit={_limit(run)}" if _limit(run) is not None else ""
    return (f"python -m harness method=none model={run['model']} task={run['task']}{limit} "
            f"output_dir={run['dir'].parents[LAYOUT_DEPTH - 1]}")


def _limit(run: dict) -> int | None:
    return run["config"]["task"].get("limit")


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
    return ["model", "method", "budget", *tasks, *COLUMNS, "note"]


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
    return str(value).replace("|", "\\|")  # a reason or note must not split the Markdown row


@dataclass
class Panel:
    """What the Pareto plot draws for one model: one line of (x, y, budget) points per method, and the dense point
    where a dense run exists to stand behind it."""

    model: str
    x_key: str
    y_key: str
    lines: dict[str, list[tuple[float, float, str]]]
    dense: tuple[float, float] | None


def pareto_panels(rows: list[dict]) -> list[Panel]:
    """Only runs compared with a dense run over the same questions are drawn. Relative accuracy against the FLOPs
    ratio; where a model's dense accuracy is 0 (an untrained model) relative accuracy is undefined, and the panel
    plots the answer agreement with the dense run instead."""
    panels = []
    for model in sorted({row["model"] for row in rows}):
        compared = [row for row in rows if row["model"] == model and row["agreement"] is not None]
        pruned = [row for row in compared if row["method"] != "none"]
        x_key = "flops_ratio" if all(r["flops_ratio"] is not None for r in compared) else "mean_vision_tokens"
        y_key = "relative_accuracy" if all(r["relative_accuracy"] is not None for r in pruned) else "agreement"
        lines: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for row in pruned:
            lines[row["method"]].append((row[x_key], row[y_key], row["budget"]))
        dense = next(((r[x_key], r[y_key]) for r in compared if r["method"] == "none" and r[y_key] is not None), None)
        panels.append(Panel(model, x_key, y_key, {m: sorted(p) for m, p in sorted(lines.items())}, dense))
    return panels


def write_pareto(rows: list[dict], out: Path) -> Path:
    """`pareto.png`: one panel per model (see `pareto_panels`), points labelled with their budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = pareto_panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(8.5 * len(panels), 4.8), squeeze=False)
    methods = sorted({method for panel in panels for method in panel.lines})
    # tab20's colours with a marker cycle of another length: every method keeps one distinct style in every panel
    styles = {method: {"color": plt.cm.tab20(i % 20), "marker": "osD^vPX"[i % 7]} for i, method in enumerate(methods)}
    for ax, panel in zip(axes[0], panels, strict=True):
        for method, points in panel.lines.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=method, **styles[method])
            for x, y, budget in points:
                ax.annotate(budget, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
        if panel.dense is not None:
            ax.plot(*panel.dense, marker="*", markersize=12, color="black", linestyle="none", label="dense")
        if not panel.lines:
            ax.text(0.5, 0.5, "no run compared with a dense run over the same questions\n(the leaderboard's "
                    "warnings give the command)", transform=ax.transAxes, ha="center", va="center", fontsize=9)
        ax.set_title(panel.model)
        ax.set_xlabel("FLOPs / dense FLOPs" if panel.x_key == "flops_ratio"
                      else "T̄_in (vision tokens entering a layer, mean)")
        ax.set_ylabel("accuracy / dense accuracy" if panel.y_key == "relative_accuracy"
                      else "answers equal to dense (dense accuracy is 0)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if panel.lines or panel.dense:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
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
    runs, nested = load_runs(args.results_dir), other_trees(args.results_dir)
    elsewhere = "".join(f"\n  python -m harness.leaderboard {tree}" for tree in nested)
    if not runs:
        raise SystemExit(f"no runs in the results tree {args.results_dir} (<model>/<task>/<method>/<budget>/"
                         f"{RESULT}){'; trees below it:' if nested else ''}{elsewhere}")
    rows, tasks, warnings = build(runs)
    md, csv_path = write_tables(rows, tasks, args.results_dir)
    pareto = write_pareto(rows, args.results_dir)
    for warning in warnings:
        print(f"warning: {warning}")
    if nested:
        print(f"note: results trees below {args.results_dir} have leaderboards of their own:{elsewhere}")
    print(md.read_text())
    print(f"wrote {md}, {csv_path}, {pareto}")
    if args.wandb != "disabled":
        log_leaderboard(header(tasks), rows, pareto, args.wandb, args.project, args.entity, args.results_dir)


if __name__ == "__main__":
    main()
