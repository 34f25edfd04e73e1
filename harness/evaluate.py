"""Running a task through lmms-eval, and checking beforehand that its data is on this machine.

Task configs (`conf/task/*.yaml`) name an lmms-eval task. `source: local` tasks live in `tasks/` with their data
(the data file's path is passed absolute, whatever the process's working directory); `source: hub` tasks are
lmms-eval's own, whose datasets are read from the Hugging Face cache or, with `task.data=<dir>`, from a local copy of
the dataset's repository (its parquet files, as clusters without internet keep them; `task.data_files` says where in
it the task's split lies). Runs never download data unless `task.download=true`, and a missing dataset stops the run
in seconds with what to download or which files were expected.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

from omegaconf import DictConfig, OmegaConf

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
    step = task.get("limit_step")
    if task.limit is not None and step and task.limit % step:
        raise ConfigError(f"task {task.name} scores its questions in groups of {step}: task.limit must be a multiple "
                          f"of {step} (got {task.limit}), or null")
    if task.get("data"):
        local_files(task)
        return
    if task.get("download", False):
        return
    path = registered_config(task).get("dataset_path", "")
    if path in BUILDERS or os.path.isdir(os.path.expanduser(path)) or _in_hf_cache(path):
        return
    raise ConfigError(
        f"task {task.name} needs the dataset {path!r}, which is not in this machine's Hugging Face cache, and runs "
        f"never download data.\n  Download it once:  hf download --repo-type dataset {path}\n"
        f"  or point the task at a local copy of it:  task.data=<directory>  (docs/tasks.md: the layout)\n"
        f"  or allow this run to:  task.download=true  (needs network; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset)")


def registered_config(task: DictConfig) -> dict:
    """lmms-eval's own config of a hub task (its YAML, includes and functions resolved)."""
    quiet_lmms_eval()
    from lmms_eval.utils import load_yaml_config

    manager = task_manager(task)
    if task.lmms_task not in manager.task_index:
        raise ConfigError(f"lmms-eval has no task {task.lmms_task!r}")
    return load_yaml_config(yaml_path=manager.task_index[task.lmms_task]["yaml_path"], mode="full")


@dataclass
class LocalFiles:
    """Where a local copy keeps what a hub task reads: its split's parquet files, and GQA's images config."""

    split: str  # lmms-eval's test_split, the key the files are loaded under
    docs: list[str]
    images: list[str] | None


def local_files(task: DictConfig) -> LocalFiles:
    """The files of `task.data` that `task.data_files` (and `task.image_files`) name; a clear error when absent."""
    root = Path(task.data).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"task {task.name}: task.data={task.data} is not a directory (a local copy of the dataset's "
                          f"repository, with {task.data_files})")
    patterns = [task.data_files, *([task.image_files] if task.get("image_files") else [])]
    found = [sorted(str(p) for p in root.glob(pattern)) for pattern in patterns]
    missing = [pattern for pattern, files in zip(patterns, found, strict=True) if not files]
    if missing:
        raise ConfigError(
            f"task {task.name}: {root} has no {' and no '.join(missing)}; a local copy keeps the Hugging Face "
            f"repository's layout (docs/tasks.md), e.g. hf download --repo-type dataset "
            f"{registered_config(task).get('dataset_path')} --local-dir {root}; other layouts: set task.data_files")
    return LocalFiles(registered_config(task)["test_split"], found[0], found[1] if len(found) > 1 else None)


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    hub_dir = Path(HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    datasets_dir = Path(os.environ.get("HF_DATASETS_CACHE", Path(HF_HUB_CACHE).parent / "datasets"))
    return (hub_dir / "snapshots").is_dir() or any(datasets_dir.glob(f"{repo_id.replace('/', '___')}*"))


def task_spec(task: DictConfig) -> str | dict:
    """What lmms-eval runs: its registered task, or a dict merged over the registered YAML (top-level keys replace
    the YAML's) that reads the data from elsewhere or keeps only some documents."""
    if task.source == "local":
        return {"task": task.lmms_task, "dataset_kwargs": {"data_files": {"test": str(ROOT / task.data)}}}
    spec: dict = {"task": task.lmms_task}
    if task.get("data"):  # the parquet builder reads the copy offline; the YAML's own dataset_kwargs ask the hub
        files = local_files(task)
        spec.update(dataset_path="parquet", dataset_name=None, dataset_kwargs={"data_files": {files.split: files.docs}})
        if files.images is not None:  # lmms-eval's GQA process_docs would load the images config from the hub
            spec["process_docs"] = functools.partial(attach_images, image_files=files.images)
    if task.get("prompt"):  # options of lmms-eval's default (LLaVA) prompt, e.g. TextVQA's OCR tokens
        options = registered_config(task)["lmms_eval_specific_kwargs"]
        prompt = {**options["default"], **OmegaConf.to_container(task.prompt)}
        spec["lmms_eval_specific_kwargs"] = {**options, "default": prompt}
    if task.get("where"):
        steps = [spec.get("process_docs", registered_config(task).get("process_docs")),
                 functools.partial(keep_where, where=OmegaConf.to_container(task.where))]
        spec["process_docs"] = functools.partial(_chain, steps=[step for step in steps if step is not None])
    return spec if len(spec) > 1 else task.lmms_task


def attach_images(docs, image_files: list[str]):
    """GQA's documents name their image by `imageId`; the images are a second config of rows (`id`, `image`). Each
    document gets its image's stored bytes: 398 images serve 12,578 questions, none needs decoding here."""
    from datasets import Features, Image, load_dataset

    images = load_dataset("parquet", data_files={"images": image_files}, split="images")
    encoded = dict(zip(images["id"], images.cast_column("image", Image(decode=False))["image"], strict=True))
    features = Features({**docs.features, "image": Image()})
    return docs.map(lambda doc: {"image": encoded[doc["imageId"]]}, features=features)


def keep_where(docs, where: dict):
    """The documents whose columns hold the given values (SEED-Bench: `data_type: image`, LLaVA-1.5's SEED-I)."""
    return docs.filter(lambda *values: list(values) == list(where.values()), input_columns=list(where))


def _chain(docs, steps: list):
    for step in steps:
        docs = step(docs)
    return docs


def evaluate(model, task: DictConfig, output_dir: Path | None = None) -> Evaluation:
    """Run `task` on `model` (a `harness.lmms.Prunebench`) with lmms-eval. Files a task writes besides its metrics
    (e.g. TextVQA's and MMBench's submission files) go under `output_dir`/submissions (default: the working
    directory's)."""
    quiet_lmms_eval()
    from lmms_eval.evaluator import simple_evaluate

    # lmms-eval's aggregation functions read output_path from the CLI's arguments; process_with_media is its default.
    cli_args = SimpleNamespace(output_path=str(output_dir), process_with_media=True) if output_dir else None
    results = simple_evaluate(
        model=model, tasks=[task_spec(task)], task_manager=task_manager(task), limit=task.limit, log_samples=True,
        bootstrap_iters=0, verbosity="WARNING", datetime_str=datetime.now().strftime("%Y%m%d_%H%M%S"),
        cli_args=cli_args,
    )
    if results is None:  # a data-parallel rank other than 0
        raise SystemExit(0)
    name = task.lmms_task
    metrics = {key.split(",")[0]: value for key, value in results["results"][name].items()
               if "," in key and "_stderr" not in key and isinstance(value, int | float)}
    # The task's headline metric; tasks whose metrics depend on the questions asked (MMStar's per category) may lack
    # it on a few questions, and then report their first.
    primary = task.metric if task.get("metric") in metrics else next(iter(metrics))
    return Evaluation(task=name, metrics=metrics, primary_metric=primary,
                      higher_is_better=bool(results["higher_is_better"][name].get(primary, True)),
                      samples=sorted(results["samples"][name], key=lambda s: s["doc_id"]))
