"""The nine hub tasks end to end on fabricated local copies of their datasets (tests/hub_fixtures.py): documents
load from the parquet layout of the Hugging Face repository, prompts are LLaVA-1.5's as lmms-eval asks them, and
scripted answers in LLaVA-1.5's format are parsed and scored by lmms-eval's own functions into result.json."""

from __future__ import annotations

import functools
import json
import shutil

import lmms_eval.evaluator
import pytest

from harness import run as run_module
from harness.config import compose, validate
from harness.models import LoadedModel
from methods import ConfigError
from tests.hub_fixtures import FABRICATE, PROMPTS

# What the model answers to the first two documents (the decoded text replaces the tiny model's), and the metrics
# lmms-eval's scoring makes of them.
ANSWERS = {
    "gqa": (["Red", "no"], {"exact_match": 0.5}),  # case-insensitive exact match; the answer is "yes"
    "mme": (["Yes", "Yes"], {"mme_perception_score": 50.0}),  # one of the pair right: accuracy 50, accuracy+ 0
    # VQA accuracy after EvalAI's normalisation: "coca cola" agrees with 3 of 10 annotators (0.9), "23." with all.
    "textvqa": (["Coca cola", "23."], {"exact_match": 0.95}),
    "pope": (["Yes", "Yes"], {"pope_accuracy": 0.5, "pope_precision": 0.5, "pope_recall": 1.0,
                              "pope_f1_score": 2 / 3, "pope_yes_ratio": 0.5}),
    "mmbench_en": (["A", "B"], {"gpt_eval_score": 50.0}),  # the option letter, matched without GPT
    "scienceqa_img": (["A. duck", "B"], {"exact_match": 0.5}),  # LLaVA's "X. option" form counts as X
    "mmstar": (["B", "A"], {"coarse perception": 1.0, "fine-grained perception": 0.0, "average": 0.5}),
    "vqav2": (["Skateboard.", "two"], {"exact_match": 1.0}),  # punctuation dropped, number words as digits
    "seedbench": (["B", "B"], {"seed_image": 0.5, "seed_all": 0.5}),  # the video question is not asked
}
# The headline metric each task's config names (what the leaderboard compares).
PRIMARY = {"gqa": "exact_match", "mme": "mme_perception_score", "textvqa": "exact_match", "pope": "pope_f1_score",
           "mmbench_en": "gpt_eval_score", "scienceqa_img": "exact_match", "mmstar": "average", "vqav2": "exact_match",
           "seedbench": "seed_image"}


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("datasets")
    for name, fabricate in FABRICATE.items():
        fabricate(root / name)
    return {name: root / name for name in FABRICATE}


@pytest.mark.parametrize("name", list(FABRICATE))
def test_a_hub_task_runs_from_a_local_copy(name, copies, tmp_path, monkeypatch):
    prompts, answers = [], list(ANSWERS[name][0])
    inputs, decode = LoadedModel.inputs, LoadedModel.decode
    monkeypatch.setattr(LoadedModel, "inputs", lambda self, images, questions: prompts.extend(questions)
                        or inputs(self, images, questions))
    monkeypatch.setattr(LoadedModel, "decode", lambda self, ids: [answers.pop(0) for _ in decode(self, ids)])
    # A tiny random model rambles: cap its answers (the text scored is the scripted one).
    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate",
                        functools.partial(lmms_eval.evaluator.simple_evaluate, gen_kwargs="max_new_tokens=2"))
    monkeypatch.chdir((tmp_path / "cwd").mkdir() or tmp_path / "cwd")
    cfg = compose([f"output_dir={tmp_path}", "model=tiny", "model.num_layers=4", "method=none", f"task={name}",
                   f"task.data={copies[name]}", "task.limit=2"])
    out = run_module.run(cfg)

    assert prompts == PROMPTS[name]
    result = json.loads((out / "result.json").read_text())
    assert result["n_samples"] == 2 and result["primary_metric"] == PRIMARY[name]
    metrics = {key: value for key, value in result["metrics"].items() if key != "by_category"}
    assert metrics == pytest.approx(ANSWERS[name][1])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["output"] for s in samples] == ANSWERS[name][0]
    # Submission files (TextVQA's answers, MMBench's tables) go with the run, not into the working directory.
    assert not list((tmp_path / "cwd").iterdir())
    assert (out / "submissions").is_dir() == (name in ("textvqa", "mmbench_en"))



def test_a_local_copy_without_the_task_files_is_refused_before_loading(copies, tmp_path):
    def check(name: str, data) -> None:
        validate(compose(["model=tiny", f"task={name}", f"task.data={data}"]))

    check("gqa", copies["gqa"])  # the complete copy passes
    with pytest.raises(ConfigError, match=r"is not a directory .*testdev_balanced_instructions/testdev-\*\.parquet"):
        check("gqa", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"has no testdev_balanced_instructions/testdev-\*\.parquet and no "
                                          r"testdev_balanced_images/testdev-\*\.parquet; .*--local-dir"):
        check("gqa", (tmp_path / "empty").mkdir() or tmp_path / "empty")
    images_only = tmp_path / "images_only"
    shutil.copytree(copies["gqa"] / "testdev_balanced_images", images_only / "testdev_balanced_images")
    with pytest.raises(ConfigError, match=r"has no testdev_balanced_instructions/testdev-\*\.parquet;"):
        check("gqa", images_only)
    with pytest.raises(ConfigError, match=r"has no data/test-\*\.parquet;.*lmms-lab-encoder/POPE.*task\.data_files"):
        check("pope", images_only)


def test_mme_refuses_a_limit_that_splits_a_question_pair(copies):
    with pytest.raises(ConfigError, match=r"task mme scores its questions in groups of 2: task\.limit must be a "):
        validate(compose(["model=tiny", "task=mme", f"task.data={copies['mme']}", "task.limit=3"]))


def test_a_hub_task_without_a_copy_or_cache_names_every_way_to_get_its_data(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=r"hf download --repo-type dataset lmms-lab-encoder/POPE(.|\n)*"
                                          r"task\.data=<directory>(.|\n)*task\.download=true"):
        validate(compose(["model=tiny", "task=pope"]))
