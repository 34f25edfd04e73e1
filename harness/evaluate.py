"""Running a task through lmms-eval, and checking beforehand that its data is on this machine.

Task configs (`conf/task/*.yaml`) name an lmms-eval task. `source: local` tasks live in `tasks/` with their data
(the data file's path is passed absolute, whatever the process's working directory); `source: hub` tasks are
lmms-eval's own, whose datasets must already be in the Hugging Face cache: runs never download data unless
`task.download=true`, and a missing dataset stops the run in seconds with what to download.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

from methods.base import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = ROOT / "tasks"
BUILDERS = ("parquet", "json", "csv", "imagefolder", "arrow")


@dataclass
class Evaluation:
    task: str  # the lmms-eval task name
    metrics: dict[str, float]  # aggregated metrics, e.g. {"exact_match": 0.61}
    primary_metric: str
    higher_is_better: bool
    samples: list[dict]  # lmms-eval's per-sample entries (doc_id, metric fields), in task order


def quiet_lmms_eval() -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def task_manager(task: DictConfig):
    return _task_manager(task.source)


@functools.cache
def _task_manager(source: str):
    """One TaskManager per process and source: indexing lmms-eval's own tasks takes seconds, and checking a task and
    then running it (or a sweep's jobs) reuse it."""
    from lmms_eval.tasks import TaskManager

    if source == "local":
        return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return TaskManager(include_defaults=True)


def check_task(task: DictConfig) -> None:
    """Fail fast, before any model loads, when a task's data is not on this machine."""
    if task.source == "local":
        data = ROOT / task.data
        if not data.is_file():
            raise ConfigError(f"task {task.name}: data file {data} is missing (python -m harness.tasks rebuilds it)")
        return
    if task.get("download", False):
        return
    quiet_lmms_eval()
    from lmms_eval.utils import load_yaml_config

    manager = task_manager(task)
    if task.lmms_task not in manager.task_index:
        raise ConfigError(f"lmms-eval has no task {task.lmms_task!r}")
    config = load_yaml_config(yaml_path=manager.task_index[task.lmms_task]["yaml_path"], mode="full")
    path = config.get("dataset_path", "")
    if path in BUILDERS or os.path.isdir(os.path.expanduser(path)) or _in_hf_cache(path):
        return
    raise ConfigError(
        f"task {task.name} needs the dataset {path!r}, which is not in this machine's Hugging Face cache, and runs "
        f"never download data.\n  Download it once:  huggingface-cli download --repo-type dataset {path}\n"
        f"  or allow this run to:  task.download=true  (needs network; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset)")


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    hub_dir = Path(HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    datasets_dir = Path(os.environ.get("HF_DATASETS_CACHE", Path(HF_HUB_CACHE).parent / "datasets"))
    return (hub_dir / "snapshots").is_dir() or any(datasets_dir.glob(f"{repo_id.replace('/', '___')}*"))


def evaluate(model, task: DictConfig) -> Evaluation:
    """Run `task` on `model` (a `harness.lmms.Prunebench`) with lmms-eval."""
    quiet_lmms_eval()
    from lmms_eval.evaluator import simple_evaluate

    spec = task.lmms_task
    if task.source == "local":  # merges over the registered YAML
        spec = {"task": task.lmms_task, "dataset_kwargs": {"data_files": {"test": str(ROOT / task.data)}}}
    results = simple_evaluate(
        model=model, tasks=[spec], task_manager=task_manager(task), limit=task.limit, log_samples=True,
        bootstrap_iters=0, verbosity="WARNING", datetime_str=datetime.now().strftime("%Y%m%d_%H%M%S"),
    )
    if results is None:  # a data-parallel rank other than 0
        raise SystemExit(0)
    name = task.lmms_task
    metrics = {key.split(",")[0]: value for key, value in results["results"][name].items()
               if "," in key and "_stderr" not in key and isinstance(value, int | float)}
    primary = next(iter(metrics))
    return Evaluation(task=name, metrics=metrics, primary_metric=primary,
                      higher_is_better=bool(results["higher_is_better"][name].get(primary, True)),
                      samples=sorted(results["samples"][name], key=lambda s: s["doc_id"]))
