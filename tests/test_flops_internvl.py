"""FLOPs of InternVL3: the torch counter equals the projection per layer and component on the tiny model (dense,
pruned inside the language model, reduced before it), the shipped configs load, and the 8B config counted on `meta`
equals the projection and `python -m harness.flops` for a 640x480 image (13 tiles)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig, InternVLConfig, InternVLForConditionalGeneration

from harness.cost import ForwardTimer
from harness.flops import (
    FlopCounter,
    InternVLArchitecture,
    Schedule,
    executed_schedule,
    model_architecture,
    parse_args,
    project,
    report,
)
from harness.models import MODEL_CONFIGS
from harness.runtime import prune
from methods import Budget, DivPrune, RandomPruner, TokenPruner
from tests.conftest import noise_images, tiny_of
from tests.test_flops import NEW_TOKENS, assert_equal_flops


@pytest.fixture(scope="module")
def internvl():
    return tiny_of("tiny_internvl")


@torch.no_grad()
@pytest.mark.parametrize("pruner", [TokenPruner(), RandomPruner(k=1, budget=Budget(12)),
                                    DivPrune(budget=Budget(retain=0.25))], ids=["none", "random", "divprune"])
def test_counter_equals_projection_on_the_tiny_internvl(internvl, pruner):
    """Two images (1 and 3 tiles: 64 vision tokens): every tile through the ViT, the projector on all 64 tokens
    (DivPrune reduces its output before layer 0), each decoder layer's projections, MLP, attention and its
    vision-related part, lm_head, in prefill and in the decode steps."""
    images = noise_images([(64, 64), (128, 64)], seed=0)
    inputs = internvl.inputs([images], ["Which picture is brighter?"])
    model = internvl.model
    with prune(model, pruner, sample_ids=[0], questions=["Which picture is brighter?"]) as runtime, \
            ForwardTimer(model) as timer, FlopCounter(model, runtime) as counter:
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    arch = model_architecture(model.config, tiles=len(inputs["pixel_values"]))
    assert (arch.tiles, arch.image_features) == (4, 64)
    schedule = executed_schedule(runtime, timer.decode_steps)
    assert schedule.vision == {"none": [64] * 4, "random": [64, 24, 24, 24], "divprune": [16] * 4}[pruner.name]
    for counted, projected in zip((counter.prefill, counter.decode), project(arch, schedule), strict=True):
        # The projection leaves the method's own work out (DivPrune's distances: 0.8% on this tiny model).
        assert_equal_flops(counted, dataclasses.replace(projected, method=counted.method))
        assert counted.other == 0
    assert counter.prefill.vision == arch.vision_encoder() > 0
    assert counter.prefill.projector == arch.projector(64) > 0 and counter.decode.vision == 0


@pytest.mark.parametrize(("name", "numbers"), [
    ("InternVL3-8B-hf", (28, 3584, 18944, 28, 4, 128, 151674, 24, 1024, 4096, 448, 14)),
    ("InternVL3-1B-hf", (24, 896, 4864, 14, 2, 64, 151674, 24, 1024, 4096, 448, 14)),
])
def test_shipped_internvl_configs_load_with_their_class(name, numbers):
    path = MODEL_CONFIGS / f"{name}.json"
    config = InternVLConfig.from_json_file(path)
    assert type(AutoConfig.from_pretrained(path)) is InternVLConfig
    assert (config.image_token_id, config.image_seq_length, config.vision_config.use_qk_norm) == (151667, 256, False)
    arch = InternVLArchitecture.from_config(config, tiles=1)
    fields = ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "vision_layers",
              "vision_hidden", "vision_intermediate", "image_size", "patch_size")
    assert tuple(getattr(arch, field) for field in fields) == numbers
    assert arch.image_features == 256


def test_shipped_internvl3_8b_on_meta_equals_the_projection_and_the_command():
    """A 640x480 image is 4x3 tiles + a thumbnail: 13 tiles, 3,328 vision tokens; with a 60-token question, counted
    on `meta` (each tile's ViT, the projector, the language model, the last position's lm_head)."""
    config = InternVLConfig.from_json_file(MODEL_CONFIGS / "InternVL3-8B-hf.json")
    # Dynamic RoPE scaling compares position values, which `meta` tensors lack; RoPE is element-wise (no FLOPs).
    config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config).eval()
    n = 3328 + 60
    with torch.no_grad(), FlopCounter(model) as counter:
        model.model.get_image_features(pixel_values=torch.empty(13, 3, 448, 448, device="meta"))
        hidden = model.model.language_model(inputs_embeds=torch.empty(1, n, 3584, device="meta"), use_cache=True)
        model.lm_head(hidden.last_hidden_state[:, -1:])
    result = report(*parse_args(["model=internvl3_8b", "method=none", "image=640x480", "text_tokens=60"]))
    assert result["prompt"] == {"vision_tokens": 3328, "text_tokens": 60, "total": n}
    assert result["image"] == {"size": [640, 480], "tile_grid": [4, 3], "tiles": 13, "tile_size": 448}
    arch = InternVLArchitecture.from_config(config, tiles=13)
    projected, _ = project(arch, Schedule([n] * 28, [3328] * 28))
    assert_equal_flops(counter.prefill, projected, skip=("method", "vision_attention"))
    assert result["dense"]["prefill"]["total"] == counter.prefill.total == projected.total
    assert counter.prefill.projector == 2 * 3328 * (4096 * 3584 + 3584 * 3584)
    one_tile = report(*parse_args(["model=internvl3_8b", "method=none", "image=448x448"]))
    assert one_tile["image"]["tiles"] == 1 and one_tile["prompt"]["vision_tokens"] == 256
