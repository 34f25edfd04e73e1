"""Every registered method on each tiny Qwen model: it runs (5 new tokens, the vision tokens entering each layer as
the method declares them) or is refused before any model loads, with the reason and what works instead."""

from __future__ import annotations

import itertools

import pytest
import torch

from harness.config import compose, validate
from harness.runtime import prune
from methods import METHODS, ConfigError
from tests.conftest import tiny_of

# What runs on Qwen where the LLaVA default does not: original positions (M-RoPE has no compact renumbering).
QWEN_OPTIONS = {"pdrop": ["method.positions=original"], "sparsevlm": ["method.version='2.0'"]}
REFUSED = {"cdpruner": "method cdpruner does not run on Qwen.*, whose vision tower is no CLIP"}
# SparseVLM has reference schedules for fixed budgets only; VisionZip's retain splits each image's share as they do
BUDGET = {"sparsevlm": "budget=64", "visionzip": "retain=0.25"}


@pytest.fixture(scope="module", params=["tiny_qwen2vl", "tiny_qwen25vl", "tiny_qwen3vl"])
def qwen(request):
    return tiny_of(request.param)


@torch.no_grad()
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_qwen_or_is_refused_before_loading(qwen, picture, method):
    cfg = compose([f"model={qwen.name}", f"method={method}", BUDGET.get(method, "budget=16"),
                   *QWEN_OPTIONS.get(method, [])])
    if method in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[method]):
            validate(cfg)
        return
    pruner = validate(cfg)
    inputs = qwen.inputs([picture], ["What is in the image?"])
    with prune(qwen.model, pruner, sample_ids=["s"]) as runtime:
        out = qwen.model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    per_layer = runtime.vision_tokens_per_layer()[0].tolist()
    declared = pruner.vision_schedule(64, 4)
    assert per_layer == (declared if declared is not None else per_layer)
    assert per_layer[0] <= 64 and all(b <= a for a, b in itertools.pairwise(per_layer))
