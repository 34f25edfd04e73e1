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
    (["method=bogus"], "unknown method 'bogus'; valid choices: fastv, none, pdrop, random, sparsevlm, visionzip, "
                       "visipruner"),
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
    (["method=random", "budget=64", "method.k=16"], "k must be in 0..15"),
    (["method=random", "budget=64", "method.k=two"], "method random option k must be int"),
    (["method=random", "budget=64", "method.positions=shuffled"], "positions must be 'original' or 'compact'"),
    (["method=random", "budget=192", "budget_convention=average", "method.k=7"], "unreachable"),
    (["batch_size=0"], "batch_size must be a positive whole number"),
    (["model=llava7b"], "huggingface-cli download llava-hf/llava-1.5-7b-hf"),
    (["model=llava13b", "model.path=/nonexistent/dir"], "are not on this machine"),
]


@pytest.mark.parametrize(("overrides", "message"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_refused_with_the_valid_choices(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_overrides(overrides)
    assert message in str(error.value)


def test_good_input_passes():
    check_overrides(["method=random", "budget=192", "method.k=1", "budget_convention=average"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert compose("config").method.name == "none"


def test_cli_reports_bad_input_fast_and_without_a_traceback(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness", "model=llava7b", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "prunebench: error:" in proc.stderr and "huggingface-cli download" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - start < 60
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused run"
