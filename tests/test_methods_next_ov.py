"""Every registered method on the tiny LLaVA-NeXT and LLaVA-OneVision models: it runs (5 new tokens, the vision tokens
entering each layer as the method declares them, every image-newline slot in every layer) or is refused before any
model loads, with the reason and what works instead."""

from __future__ import annotations

import itertools

import pytest
import torch

from harness.config import compose, validate
from harness.runtime import prune
from methods import METHODS, ConfigError
from tests.conftest import tiny_of

REFUSED = {"tiny_next": {}, "tiny_ov": {"cdpruner": "whose vision tower is no CLIP"}}  # CDPruner's text tower
VISION = {"tiny_next": 80, "tiny_ov": 90}  # prunable vision tokens of a 336 px image
# PDrop's average budget must lie within its stages' reach: T̄_in from 20 to 80 tokens on tiny NeXT
BUDGET = {"sparsevlm": 64, "visionzip": 64, "pdrop": 40}  # SparseVLM and VisionZip have settings for 64/128/192


@pytest.fixture(scope="module", params=list(VISION))
def family(request):
    return tiny_of(request.param)


@torch.no_grad()
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_next_and_onevision_or_is_refused_before_loading(family, picture, method):
    cfg = compose([f"model={family.name}", f"method={method}", f"budget={BUDGET.get(method, 16)}"])
    if method in REFUSED[family.name]:
        with pytest.raises(ConfigError, match=REFUSED[family.name][method]):
            validate(cfg)
        return
    pruner = validate(cfg)
    inputs = family.inputs([picture], ["What is in the image?"])
    with prune(family.model, pruner, sample_ids=["s"], questions=["What is in the image?"]) as runtime:
        out = family.model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    vision = VISION[family.name]
    per_layer = runtime.vision_tokens_per_layer()[0].tolist()
    declared = pruner.vision_schedule(vision, 4)
    assert per_layer == (declared if declared is not None else per_layer)
    assert per_layer[0] <= vision and all(b <= a for a, b in itertools.pairwise(per_layer))
    newlines = family.adapter.newline_mask(family.model, inputs["input_ids"], inputs)
    assert runtime.tokens_per_layer(newlines).tolist() == [[int(newlines.sum())] * 4]
