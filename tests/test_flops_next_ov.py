"""FLOPs of LLaVA-NeXT and LLaVA-OneVision: the torch counter equals the projection per layer and component on the tiny
models (every view through the tower and projector, newline slots as text), and the shipped 7B configs project the
token counts of models.md §6."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from harness.cost import ForwardTimer
from harness.flops import AnyResArchitecture, FlopCounter, executed_schedule, model_architecture, parse_args, project
from harness.flops import report as flops_report
from harness.runtime import prune
from methods import METHODS, Budget, RandomPruner
from tests.conftest import noise_images, tiny_of
from tests.test_flops import NEW_TOKENS, assert_equal_flops


@pytest.fixture(scope="module", params=["tiny_next", "tiny_ov"])
def family(request):
    return tiny_of(request.param)


def picture(width: int, height: int) -> Image.Image:
    return noise_images([(width, height)], seed=2)[0]


def test_counter_equals_projection_on_a_tiny_model(family):
    """A 100x60 image, then a prompt with it and a 336 px one: NeXT crops each image (both 2x2 crops, the 100x60 one's
    grid unpadded to 4x8 tokens), OneVision gives each image of a several-image prompt one view. Layer 0 runs dense,
    the others on 16 vision tokens per image."""
    for images in ([picture(100, 60)], [picture(100, 60), picture(336, 336)]):
        inputs = family.inputs([images], ["What is in the image?"])
        with torch.no_grad(), prune(family.model, RandomPruner(k=1, budget=Budget(16)), sample_ids=["s"]) as runtime, \
                ForwardTimer(family.model) as timer, FlopCounter(family.model, runtime) as counter:
            family.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        layout = family.adapter.prompt_layout(family.model, inputs)
        arch = model_architecture(family.model.config, layout=layout)
        assert isinstance(arch, AnyResArchitecture)
        assert arch.image_features == int(runtime.prompt_vision.sum())
        projected = project(arch, executed_schedule(runtime, timer.decode_steps))
        assert projected[0].layers[0].projections == arch.layer(inputs["input_ids"].shape[1], 0, 0).projections
        for phase_counted, phase_projected in zip((counter.prefill, counter.decode), projected, strict=True):
            assert_equal_flops(phase_counted, phase_projected)
    views = 5 + 5 if family.name == "tiny_next" else 1 + 1
    assert layout.views == views


@torch.no_grad()
def test_counter_equals_projection_under_a_pre_llm_reduction(family):
    """VisionZip at retain=0.25 on a 336 px image: every view through the tower and projector, then a quarter of the
    packed image's vision tokens (and its newline slots) in every decoder layer; the method's own work (the probe's
    attention rows, the packing of its signal, the merge) is counted on a line of its own, left out of projections."""
    inputs = family.inputs([[picture(336, 336)]], ["What is in the image?"])
    pruner = METHODS["visionzip"](budget=Budget(retain=0.25))
    with prune(family.model, pruner, sample_ids=["s"]) as runtime, ForwardTimer(family.model) as timer, \
            FlopCounter(family.model, runtime) as counter:
        family.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    arch = model_architecture(family.model.config, layout=family.adapter.prompt_layout(family.model, inputs))
    schedule = executed_schedule(runtime, timer.decode_steps)
    assert schedule.vision == [round(arch.image_features / 4)] * 4
    for counted, projected in zip((counter.prefill, counter.decode), project(arch, schedule), strict=True):
        assert_equal_flops(counted, dataclasses.replace(projected, method=counted.method))
    assert counter.prefill.method > 0


@pytest.mark.parametrize(("model", "image", "expected"), [
    # models.md §6: NeXT 336² -> 1,176 slots, 448² -> 2,928, 640x480 -> 2,340; OneVision 640x480 -> 2,929
    ("llava_next7b", "336x336", (3, 1152, 24)),
    ("llava_next7b", "448x448", (5, 2880, 48)),
    ("llava_next_mistral7b", "640x480", (5, 2304, 36)),
    ("llava_ov7b", "640x480", (5, 2889, 40)),
    ("llava_ov7b", "1920x1080", (16, 7209, 60)),
])
def test_shipped_configs_project_the_published_token_counts(model, image, expected):
    result = flops_report(*parse_args([f"model={model}", "method=none", f"image={image}"]))
    views, vision, newlines = expected
    assert result["image"]["layout"] == {"views": views, "vision_tokens": vision, "newline_tokens": newlines}
    assert result["prompt"] == {"vision_tokens": vision, "text_tokens": 60 + newlines,
                                "total": vision + newlines + 60, "newline_tokens": newlines}
    assert result["dense"]["prefill"]["vision"] > 0 and result["dense"]["prefill"]["projector"] > 0
