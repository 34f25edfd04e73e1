"""FLOPs of the Qwen-VL family: the shipped configs load with their transformers classes, the image grid follows the
processor, and the torch counter equals the projection per component on tiny random Qwen2-VL, Qwen2.5-VL (window
attention) and Qwen3-VL (DeepStack) models and on the shipped Qwen2.5-VL-7B config on `meta`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from harness.cost import ForwardTimer
from harness.flops import (
    FlopCounter,
    LayerFlops,
    PhaseFlops,
    QwenArchitecture,
    Schedule,
    executed_schedule,
    image_grid,
    model_architecture,
    parse_args,
    project,
    report,
)
from harness.models import MODEL_CONFIGS
from harness.runtime import prune
from methods import Budget, ConfigError, FastV
from tests.conftest import noise_images, tiny_of
from tests.test_flops import assert_equal_flops
from tests.test_runtime import QUESTION

IMAGE, VIDEO, VISION_START, VISION_END = 100, 101, 102, 103
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
# family: (config class, model class, vision config, extra text config, each image's patch rows and columns)
TINY = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                 dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2), {}, [(6, 8)]),
    # 56-px windows are 2×2 LLM tokens: a 5×3-token image has six windows, cut at the bottom and right edges; a
    # second image of 2×4 tokens has two.
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                   dict(depth=3, hidden_size=64, out_hidden_size=64, intermediate_size=128, num_heads=4, window_size=56,
                        fullatt_block_indexes=[1]), {}, [(10, 6), (4, 8)]),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                 dict(depth=3, hidden_size=64, out_hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
                 dict(head_dim=16, rope_parameters={**TEXT["rope_parameters"], "mrope_interleaved": True}), [(4, 6)]),
}
TEXT_TOKENS = 20
NEW_TOKENS = 4  # generate() runs 3 decode steps


def tiny_qwen(family: str):
    config_class, model_class, vision, text, grids = TINY[family]
    config = config_class(text_config={**TEXT, **text}, vision_config=vision, image_token_id=IMAGE,
                          video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    torch.manual_seed(0)
    return model_class(config).eval(), grids


def image_prompt(config, grids: list[tuple[int, int]]) -> dict:
    """Random text ids with each image's placeholders between text, random patches: what the processor returns."""
    vision = config.vision_config
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, IMAGE, (5,), generator=generator)]
    for rows, columns in grids:
        placeholders = rows * columns // vision.spatial_merge_size**2
        ids += [torch.tensor([VISION_START] + [IMAGE] * placeholders + [VISION_END]),
                torch.randint(0, IMAGE, (TEXT_TOKENS // len(grids),), generator=generator)]
    ids = torch.cat(ids)[None]
    patches = sum(rows * columns for rows, columns in grids)
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMAGE).long(),
                pixel_values=torch.randn(patches, patch, generator=generator),
                image_grid_thw=torch.tensor([[1, *grid] for grid in grids]))


@pytest.mark.parametrize(("family", "attention"), [*((family, "sdpa") for family in TINY), ("qwen2_5_vl", "eager")])
def test_counter_equals_projection_on_a_tiny_qwen_model(family, attention):
    """A dense generation: the vision tower (windows, DeepStack mergers), the merger, each decoder layer's
    projections, MLP and attention, and lm_head, counted as they ran in prefill and in the decode steps, equal the
    projection from the config and the image grids, with sdpa (per image or window) and eager attention."""
    model, grids = tiny_qwen(family)
    model.set_attn_implementation(attention)
    inputs = image_prompt(model.config, grids)
    with torch.no_grad(), FlopCounter(model) as counter:
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    arch = model_architecture(model.config, [tuple(grid[1:]) for grid in inputs["image_grid_thw"].tolist()])
    tokens, vision = inputs["input_ids"].shape[1], int((inputs["input_ids"] == IMAGE).sum())
    assert arch.image_features == vision and generated.shape[1] == tokens + NEW_TOKENS
    projected = project(arch, Schedule([tokens] * arch.layers, [vision] * arch.layers, decode_steps=NEW_TOKENS - 1))
    # Without a pruning runtime the counter does not split vision-related attention.
    for phase_counted, phase_projected in zip((counter.prefill, counter.decode), projected, strict=True):
        assert_equal_flops(phase_counted, phase_projected, skip=("method", "vision_attention"))
        assert phase_counted.total == phase_projected.total and phase_counted.other == 0
    counted = counter.prefill
    assert counted.vision > 0 and counted.projector > 0 and counter.decode.vision == 0
    if family == "qwen2_5_vl":
        # patches: 2×2, 2×1, 2×2, 2×1, 1×2, 1×1 tokens of 4 patches; then 2×2, 2×2
        windows = [16, 8, 16, 8, 8, 4, 16, 16]
        assert [arch.attention_groups(block) for block in range(3)] == [windows, [60, 32], windows]
        assert dataclasses.replace(arch, window=0).vision_encoder() > counted.vision
    if family == "qwen3_vl":
        assert dataclasses.replace(arch, deepstack_mergers=0).vision_encoder() == counted.vision - 2 * arch.projector(6)


@pytest.mark.parametrize(("patch", "size", "bounds", "expected"), [
    (14, (100, 90), (28**2, 28**2 * 64), (6, 8)),  # models.md §4.1: 12 tokens
    (14, (1000, 500), (28**2, 28**2 * 64), (10, 22)),  # 55 tokens
    (14, (1920, 1080), (3136, 602112), (40, 72)),  # lmms-eval's qwen2_vl bounds: 720 tokens
    (16, (100, 90), (32**2, 32**2 * 64), (6, 6)),
])
def test_image_grid_equals_the_processors(patch, size, bounds, expected):
    config = Qwen3VLConfig(vision_config={"patch_size": patch}) if patch == 16 else Qwen2VLConfig()
    grid = image_grid(config, size[1], size[0], *bounds)
    processor = Qwen2VLImageProcessorPil(min_pixels=bounds[0], max_pixels=bounds[1], patch_size=patch)
    pixels = Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8))
    assert tuple(processor(images=[pixels], return_tensors="pt")["image_grid_thw"][0].tolist()) == (1, *grid)
    assert grid == expected


@pytest.mark.parametrize(("name", "config_class", "numbers"), [
    ("Qwen2-VL-7B-Instruct", Qwen2VLConfig, (28, 3584, 18944, 28, 4, 128, 152064, 32, 1280, 14, 0, (), 0)),
    ("Qwen2.5-VL-7B-Instruct", Qwen2_5_VLConfig, (28, 3584, 18944, 28, 4, 128, 152064, 32, 1280, 14, 4,
                                                  (7, 15, 23, 31), 0)),
    ("Qwen2.5-VL-3B-Instruct", Qwen2_5_VLConfig, (36, 2048, 11008, 16, 2, 128, 151936, 32, 1280, 14, 4,
                                                  (7, 15, 23, 31), 0)),
    ("Qwen3-VL-8B-Instruct", Qwen3VLConfig, (36, 4096, 12288, 32, 8, 128, 151936, 27, 1152, 16, 0, (), 3)),
])
def test_shipped_qwen_configs_load_with_their_classes(name, config_class, numbers):
    path = MODEL_CONFIGS / f"{name}.json"
    config = config_class.from_json_file(path)
    assert type(AutoConfig.from_pretrained(path)) is config_class
    assert config_class.from_dict(config.to_dict()).to_dict() == config.to_dict()
    arch = QwenArchitecture.from_config(config, [(32, 32)])
    fields = ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "vision_layers",
              "vision_hidden", "patch_size", "window", "full_attention_blocks", "deepstack_mergers")
    assert tuple(getattr(arch, field) for field in fields) == numbers


def meta_vision_kwargs(config, grid_thw: torch.Tensor) -> dict:
    """The index tensors the ViT computes from `grid_thw` with `.tolist()`, precomputed on the CPU (`meta` holds no
    values); its sdpa path splits by the window lengths, which stay on the CPU."""
    vision = config.vision_config
    kwargs = {"position_ids": get_vision_position_ids(grid_thw, vision.spatial_merge_size).to("meta")}
    window_index, window_lengths = get_vision_window_index(grid_thw, vision.spatial_merge_size, vision.window_size,
                                                           vision.patch_size)
    return {**kwargs, "window_index": window_index.to("meta"), "cu_window_seqlens": window_lengths}


def test_shipped_qwen25vl7b_on_meta_equals_the_projection_and_the_command():
    """The README's number: a 448×448 image and a 60-token question on the Qwen2.5-VL-7B config, counted on `meta`."""
    config = Qwen2_5_VLConfig.from_json_file(MODEL_CONFIGS / "Qwen2.5-VL-7B-Instruct.json")
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    grid_thw = torch.tensor([[1, 32, 32]])
    n, d, m = 256 + 60, 3584, 18944
    with torch.no_grad(), FlopCounter(model) as counter:
        model.model.visual(torch.empty(1024, 3 * 2 * 14 * 14, device="meta"), grid_thw=grid_thw,
                           **meta_vision_kwargs(config, grid_thw))
        hidden = model.model.language_model(inputs_embeds=torch.empty(1, n, d, device="meta"), use_cache=True)
        model.lm_head(hidden.last_hidden_state[:, -1:])
    result = report(*parse_args(["model_config=Qwen2.5-VL-7B-Instruct", "method=none", "image=448x448",
                                 "text_tokens=60"]))
    assert result["prompt"] == {"vision_tokens": 256, "text_tokens": 60, "total": n}
    assert result["image"] == {"size": [448, 448], "resized": [448, 448], "patch_grid": [32, 32],
                               "pixel_bounds": [3136, 12845056]}
    arch = QwenArchitecture.from_config(config, [(32, 32)])
    projected, _ = project(arch, Schedule([n] * 28, [256] * 28))
    assert_equal_flops(counter.prefill, projected, skip=("method", "vision_attention"))
    dense = result["dense"]["prefill"]
    assert dense["total"] == counter.prefill.total == projected.total
    kv = 4 * 128
    assert dense["language_model"] == 28 * (2 * n * (2 * d * d + 2 * d * kv + 3 * d * m) + 4 * n * n * d)
    assert dense["total"] == pytest.approx(5.5121e12, rel=1e-4)


def test_pixel_bounds_come_from_the_options_then_the_model_conf():
    """1920×1080 within lmms-eval's qwen2_vl bounds is 720 tokens (models.md §4.1); a conf's min_pixels of
    512·28² scales a 448×448 image up to 23×23 tokens, unless the command overrides it."""
    qwen2 = report(*parse_args(["model_config=Qwen2-VL-7B-Instruct", "method=none", "image=1920x1080",
                                "min_pixels=3136", "max_pixels=602112"]))
    assert qwen2["prompt"]["vision_tokens"] == 720 and qwen2["image"]["resized"] == [1008, 560]
    conf = ["model_config=Qwen2.5-VL-7B-Instruct", "method=none", "+model.min_pixels=401408"]
    assert report(*parse_args(conf))["prompt"]["vision_tokens"] == 23 * 23
    assert report(*parse_args([*conf, "min_pixels=3136"]))["prompt"]["vision_tokens"] == 256


@pytest.mark.parametrize(("args", "message"), [
    (["model=llava7b", "image=448x448"], "resizes every image to 336 px"),
    (["model_config=Qwen2.5-VL-7B-Instruct", "image=448"], "WIDTHxHEIGHT"),
    (["model_config=Qwen2.5-VL-7B", "method=none"], "shipped: InternVL3-1B-hf, InternVL3-8B-hf, Qwen2-VL-7B-Instruct, "
                                                        "Qwen2.5-VL-3B-Instruct"),
    (["model_config=Qwen2.5-VL-7B-Instruct", "counter=fvcore"], "not both"),
    (["model_config=Qwen2.5-VL-7B-Instruct", "results_dir=results"], "pass image=WIDTHxHEIGHT"),
])
def test_flops_command_refuses_what_it_cannot_project(args, message):
    with pytest.raises(ConfigError, match=message):
        report(*parse_args(["method=none", *args]))


def executed(loaded, pruner, images: list[list[Image.Image]], questions: list[str]) -> tuple:
    """Generate under the counter: its (prefill, decode) of the whole batch, and each row's projection of what ran
    (its own images' architecture, its own schedule)."""
    inputs = loaded.inputs(images, questions)
    with torch.no_grad(), prune(loaded.model, pruner, sample_ids=list(range(len(questions)))) as runtime, \
            ForwardTimer(loaded.model) as timer, FlopCounter(loaded.model, runtime) as counter:
        loaded.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    grids = [tuple(grid[1:]) for grid in inputs["image_grid_thw"].tolist()]
    firsts = [sum(len(row) for row in images[:index]) for index in range(len(images))]
    projected = [project(model_architecture(loaded.model.config, grids[first:first + len(row)]),
                         executed_schedule(runtime, timer.decode_steps, index))
                 for index, (first, row) in enumerate(zip(firsts, images, strict=True))]
    return (counter.prefill, counter.decode), projected, runtime


def noise(width: int, height: int) -> Image.Image:
    return noise_images([(width, height)], seed=width)[0]


@pytest.mark.parametrize("conf", ["tiny_qwen2vl", "tiny_qwen25vl", "tiny_qwen3vl"])
def test_counter_equals_projection_of_a_pruned_qwen_run(conf):
    """FastV at retain=0.25 on each tiny Qwen (64 vision tokens, 16 kept from layer 2): per layer and component,
    vision-related attention included, as for LLaVA's pruned runs; then a padded batch of a 336 px and a 100x90 px
    image, whose counted batch is the sum of its rows' projections (each row its own images and kept tokens; the
    row that dropped more counts its masked padding slots as tokens, not as vision)."""
    loaded = tiny_of(conf)
    pruner = FastV(budget=Budget(retain=0.25))
    counted, (projected,), runtime = executed(loaded, pruner, [[noise(336, 336)]], [QUESTION])
    assert runtime.vision_tokens_per_layer().tolist() == [[64, 64, 16, 16]]
    for phase_counted, phase_projected in zip(counted, projected, strict=True):
        assert_equal_flops(phase_counted, phase_projected)
    assert counted[0].vision > 0 and counted[0].projector > 0 and counted[0].layers[3].vision_attention > 0
    counted, rows, runtime = executed(loaded, pruner, [[noise(336, 336)], [noise(100, 90)]], [QUESTION] * 2)
    small = 9 if conf == "tiny_qwen3vl" else 12
    assert runtime.vision_tokens_per_layer().tolist() == [[64, 64, 16, 16], [small, small] + [round(small / 4)] * 2]
    for phase_counted, *phase_rows in zip(counted, *rows, strict=True):
        total = PhaseFlops([sum(layers, LayerFlops()) for layers in zip(*(p.layers for p in phase_rows), strict=True)],
                           *(sum(getattr(p, part) for p in phase_rows) for part in ("vision", "projector", "lm_head")))
        # the counter splits vision-related attention by the batch's first row
        assert_equal_flops(phase_counted, total, skip=("method", "vision_attention"))
