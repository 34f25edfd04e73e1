"""Bad input fails before any model loads, with a message naming what is valid."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir

from harness.config import CONF_DIR, check_overrides
from methods import ConfigError

CASES = [
    (["method=bogus"], "unknown method 'bogus'; valid choices: cdpruner, dart, divprune, fastv, holov, none, pdrop, "
                       "prumerge, prumerge_plus, random, sparsevlm, visionzip, visipruner, visipruner_middle, "
                       "visipruner_middle_deep, vispruner"),
    (["model=llava70b"], "valid choices: llava13b, llava7b, tiny"),
    (["task=gqa_full"], "unknown task 'gqa_full'; valid choices: gqa, mmbench_en, mme, mmstar, pope, scienceqa_img, "
                        "seedbench, synthetic, textvqa, vqav2"),
    (["task=gqa"], "needs the dataset 'lmms-lab-encoder/GQA', which is not in this machine's Hugging Face cache"),
    (["bogus_key=1"], "unknown key 'bogus_key'; valid keys at the top level: batch_size, budget, budget_convention"),
    (["model.widht=3"], "unknown key 'model.widht'; valid keys under 'model'"),
    (["method=random", "budget=64", "method.bogus=1"], "unknown option 'bogus' for method random; valid options: k, "
                                                        "positions, seed"),
    (["method=random", "budget=0"], "budget must be in 1..576"),
    (["method=random", "budget=-3"], "budget must be in 1..576"),
    (["method=random", "budget=577"], "budget must be in 1..576"),
    (["method=random", "budget=abc"], "budget must be a whole number"),
    (["method=random", "budget=64", "budget_convention=median"], "budget_convention must be one of exact, average"),
    (["method=random"], "method random needs a budget"),
    (["method=random", "budget=64", "method.k=8"], "k must be in 0..7"),  # the default model has 8 layers
    (["method=random", "budget=64", "method.k=two"], "method random option k must be int"),
    (["method=random", "budget=64", "method.positions=shuffled"], "positions must be 'original' or 'compact'"),
    (["method=random", "budget=192", "budget_convention=average", "method.k=7"], "unreachable"),
    (["batch_size=0"], "batch_size must be a positive whole number"),
    (["method=visipruner", "batch_size=4"], "method visipruner supports batch size 1 only (it decides per sample); "
                                            "set batch_size=1, got 4"),
    (["method=sparsevlm", "budget=64", "batch_size=2"], "method sparsevlm supports batch size 1 only"),
    (["model=llava7b"], "hf download llava-hf/llava-1.5-7b-hf"),
    (["model=llava13b", "model.path=/nonexistent/dir"], "are not on this machine"),
    (["model=tiny_trained", "model.path=./no/such/dir"], "Make it with: python -m harness.train_tiny"),
]


@pytest.mark.parametrize(("overrides", "message"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_refused_with_the_valid_choices(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_overrides(overrides)
    assert message in str(error.value)


@pytest.mark.parametrize("present", [[], ["tokenizer.json"]])
def test_a_checkpoint_directory_without_processor_files_is_refused_before_loading(tmp_path, present):
    # Weights and config only, as converted checkpoints often come: AutoProcessor would fail after the weights loaded.
    for name in ["config.json", *present]:
        (tmp_path / name).write_text("{}")
    with pytest.raises(ConfigError) as error:
        check_overrides(["model=llava7b", f"model.path={tmp_path}"])
    missing = ["an image processor config (preprocessor_config.json or processor_config.json)"]
    if not present:
        missing.insert(0, "a tokenizer (tokenizer.json or tokenizer.model)")
    assert str(error.value) == (
        f"model.path={tmp_path} has no processor files: {', '.join(missing)} missing. Save the processor of the "
        "checkpoint it was converted from into it, e.g.:\n  python -c \"from transformers import AutoProcessor; "
        f"AutoProcessor.from_pretrained('llava-hf/llava-1.5-7b-hf').save_pretrained('{tmp_path}')\"")


def test_good_input_passes():
    check_overrides(["method=random", "budget=192", "method.k=1", "budget_convention=average"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        default = compose("config")
    assert (default.method.name, default.model.name, default.task.name) == ("visipruner", "tiny_trained", "synthetic")


def test_cli_reports_bad_input_fast_and_without_a_traceback(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness", "model=llava7b", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "prunebench: error:" in proc.stderr and "hf download" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - start < 60
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused run"


def test_the_synthetic_generator_is_deterministic_and_consistent():
    from harness.tasks import CATEGORIES, synthetic_samples

    first, again, other = synthetic_samples(25, 7), synthetic_samples(25, 7), synthetic_samples(25, 8)
    assert [(s.question, s.answer) for s in first] == [(s.question, s.answer) for s in again]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, again, strict=True))
    assert [s.image.tobytes() for s in first] != [s.image.tobytes() for s in other]
    assert [s.category for s in first] == list(CATEGORIES) * 5
    assert all(s.image.size == (336, 336) and len(s.answer.split()) == 1 for s in first)


def test_questions_are_answered_from_the_scene():
    import random
    import re

    from harness.tasks import SceneObject, ask

    objects = [SceneObject("circle", "red", "large", (10, 10, 80, 80)),
               SceneObject("square", "blue", "small", (200, 150, 230, 180)),
               SceneObject("square", "green", "large", (100, 250, 170, 320))]
    centers = {o.name(): o.center for o in objects}
    words = [("cat", (250, 20, 290, 40))]
    rng = random.Random(0)
    counts = {"red objects": "one", "blue objects": "one", "green objects": "one", "squares": "two",
              "circles": "one", "triangles": "zero"}
    numbers = ("zero", "one", "two", "three")
    for _ in range(30):  # every answer, and the evidence it rests on
        question, answer, evidence = ask("color", objects, words, rng)
        named = question.removeprefix("What color is the ").split("?")[0]
        assert answer == {"circle": "red", "small square": "blue", "large square": "green"}[named]
        assert [o.color for o in evidence] == [answer]
        question, answer, evidence = ask("relation", objects, words, rng)
        first, relation, second = re.match(r"Is the (.+) (left of|above) the (.+)\?", question).groups()
        axis = 0 if relation == "left of" else 1
        assert answer == ("yes" if centers[first][axis] < centers[second][axis] else "no")
        assert [o.name() for o in evidence] == [first, second]
        question, answer, evidence = ask("count", objects, words, rng)
        key = question.removeprefix("How many ").split(" are there")[0]
        assert answer == counts.get(key, "zero") == numbers[len(evidence)]
        assert all(key in (f"{o.color} objects", f"{o.shape}s") for o in evidence)
        question, answer, evidence = ask("exist", objects, words, rng)
        assert answer == ("yes" if evidence else "no")
        assert all(question == f"Is there a {o.color} {o.shape}? Answer yes or no." for o in evidence)
    assert ask("read", objects, words, rng) == ("What word is written in the image? Answer with the word.", "cat",
                                                words)
    same = [SceneObject("square", "red", "large", (0, 0, 60, 60)),
            SceneObject("square", "blue", "large", (100, 0, 160, 60))]
    assert ask("color", same, words, rng) is None  # "the large square" would be ambiguous
    assert ask("relation", same[:1] + same[:1], words, rng) is None  # two red squares: no unique pair
