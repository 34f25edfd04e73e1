"""Weights & Biases: one W&B run per job (resolved config and every metric, grouped by sweep), and the leaderboard
table with its Pareto plot. `wandb.mode=disabled` (default) touches nothing; `offline` writes the run under the job's
results directory with no network and no API key; `online` syncs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = value
    return flat


def sweep_group() -> str | None:
    """The multirun's directory name, so that one sweep's jobs form one W&B group."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return Path(hydra.sweep.dir).name if hydra.mode.name == "MULTIRUN" else None


def log_run(result: dict, cfg: DictConfig, out: Path) -> None:
    if cfg.wandb.mode == "disabled":
        return
    import wandb

    name = f"{result['model']}/{result['task']}/{result['method']}/{out.name}"
    run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode, dir=str(out),
                     name=name, group=cfg.wandb.group or sweep_group(), config=result["config"], job_type="eval",
                     reinit="finish_previous")
    metrics = flatten({"metrics": result["metrics"], "tokens": {"mean_vision_tokens": result["tokens"][
        "mean_vision_tokens"]}, "cost": result["cost"], "method_stats": result.get("method_stats", {})})
    run.log(metrics)
    run.summary.update(metrics)
    run.finish()


def log_leaderboard(header: list[str], rows: list[dict], pareto: Path, mode: str, project: str, entity: str | None,
                    out: Path) -> None:
    import wandb

    run = wandb.init(project=project, entity=entity, mode=mode, job_type="leaderboard", dir=str(out),
                     name="leaderboard", reinit="finish_previous")
    run.log({"leaderboard": wandb.Table(columns=header, data=[[row.get(k) for k in header] for row in rows]),
             "pareto": wandb.Image(str(pareto))})
    run.finish()
