"""The model-adapter layer: loading, prompts and vision-token layout of each family, before any pruning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from harness.adapters import SUPPORTED_MODELS, adapter_for, adapter_of
from harness.adapters.llava import LlavaAdapter
from harness.config import check_overrides
from harness.models import load
from methods import ConfigError
from tests.conftest import tiny_of
from tests.test_cli import tiny_run

QWEN = ["tiny_qwen2vl", "tiny_qwen25vl", "tiny_qwen3vl"]


@pytest.fixture(scope="module", params=QWEN)
def qwen(request):
    return tiny_of(request.param)


def solid(width: int, height: int, colour=(200, 40, 90)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def test_prompt_equals_the_lmms_eval_qwen_wrappers(qwen):
    """lmms-eval's `qwen2_vl` / `qwen2_5_vl` / `qwen3_vl` (simple) build, for a context and one image:
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": [{"type": "image", "image": ...}, {"type": "text", "text": context}]}]
    with any literal "<image>" removed from the context, rendered by the processor's chat template with
    add_generation_prompt=True."""
    context = "<image>\nWhat color is the circle?\nAnswer the question using a single word or phrase."
    [prompt] = qwen.adapter.prompts(qwen.processor, [context], [[solid(100, 90)]])
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                      "\nWhat color is the circle?\nAnswer the question using a single word or phrase.<|im_end|>\n"
                      "<|im_start|>assistant\n")
    [two] = qwen.adapter.prompts(qwen.processor, ["Compare them."], [[solid(100, 90), solid(60, 60)]])
    assert two.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert two.index("<|vision_end|><|vision_start|>") < two.index("Compare them.")  # images first, as lmms-eval


def test_each_image_is_one_run_of_vision_tokens_sized_by_the_pixel_bounds(qwen):
    # Qwen2/2.5-VL: 28 px per vision token within 28² .. 28²·64 px: 100x90 -> 4x3 tokens (rounded to 112x84); Qwen3-VL:
    # 32 px within 32² .. 32²·64: 100x90 -> 3x3 (96x96). 336x336 is scaled down to the 64-token bound: 8x8.
    images = [solid(100, 90), solid(336, 336, (10, 200, 30))]
    inputs = qwen.inputs([images], ["Which is larger?"])
    ids = inputs["input_ids"][0]
    config = qwen.model.config
    spans = qwen.adapter.image_spans(qwen.model, inputs["input_ids"])
    small, grid = (9, [1, 6, 6]) if qwen.adapter.family == "qwen3_vl" else (12, [1, 6, 8])
    assert [end - start for start, end in spans[0]] == [small, 64]
    assert inputs["image_grid_thw"].tolist() == [grid, [1, 16, 16]]
    for start, end in spans[0]:  # the markers around each run are text tokens
        assert ids[start - 1] == config.vision_start_token_id and ids[end] == config.vision_end_token_id
    assert int(qwen.adapter.vision_mask(qwen.model, inputs["input_ids"]).sum()) == small + 64


def test_a_batch_is_left_padded_with_one_span_per_image(qwen):
    inputs = qwen.inputs([solid(100, 90), solid(336, 336)], ["Short?", "A longer question about the picture?"])
    assert (inputs["attention_mask"][:, -1] == 1).all() and (inputs["attention_mask"][0, 0] == 0)
    spans = qwen.adapter.image_spans(qwen.model, inputs["input_ids"])
    assert [[end - start for start, end in row] for row in spans] == [[9 if qwen.adapter.family == "qwen3_vl" else 12],
                                                                       [64]]


def load_from_checkpoint_directory(tiny, directory: Path, **overrides) -> tuple:
    """(loaded, spec): the tiny model saved as what `hf download` leaves (weights, tokenizer, image processor, the
    processor's chat template where it has one), then loaded from that directory with `source: hf`; the same
    prompt and image give the same ids and logits as the tiny model itself."""
    tiny.model.save_pretrained(directory)
    tiny.processor.tokenizer.save_pretrained(directory)
    tiny.processor.image_processor.save_pretrained(directory)
    if getattr(tiny.processor, "chat_template", None):
        (directory / "chat_template.jinja").write_text(tiny.processor.chat_template)
    spec = OmegaConf.merge(OmegaConf.load(f"conf/model/{tiny.name}.yaml"),
                           {"source": "hf", "path": str(directory), "dtype": "float32", **overrides})
    loaded = load(spec, "cpu")
    image = [solid(100, 90)]
    expected, got = tiny.inputs(image, ["What?"]), loaded.inputs(image, ["What?"])
    assert torch.equal(expected["input_ids"], got["input_ids"])
    assert torch.equal(loaded.model(**got).logits, tiny.model(**expected).logits)
    return loaded, spec


@torch.no_grad()
def test_a_checkpoint_directory_loads_with_the_conf_pixel_bounds(tmp_path):
    """`source: hf` reads weights, tokenizer, image processor and chat template from a local directory (what
    `huggingface-cli download` leaves), with the conf's min/max pixels over the checkpoint's own."""
    _, spec = load_from_checkpoint_directory(tiny_of("tiny_qwen25vl"), tmp_path)
    fewer = load(OmegaConf.merge(spec, {"max_pixels": 28 * 28 * 16}), "cpu")
    assert fewer.adapter.image_spans(fewer.model, fewer.inputs([solid(336, 336)], ["What?"])["input_ids"]) == \
        [[(45, 61)]]  # 16 tokens after the system turn, "<|im_start|>user\n<|vision_start|>": 45 tokens (bytes)


def test_every_supported_class_has_one_adapter_and_others_are_refused(tiny):
    assert set(SUPPORTED_MODELS) == {"LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                                     "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                                     "InternVLForConditionalGeneration", "LlavaNextForConditionalGeneration",
                                     "LlavaOnevisionForConditionalGeneration"}
    assert isinstance(adapter_for(tiny.model), LlavaAdapter)
    assert tiny.adapter.decoder_layers(tiny.model) is tiny.model.model.language_model.layers
    assert tiny.adapter.projector(tiny.model) is tiny.model.model.multi_modal_projector
    with pytest.raises(ConfigError, match=r"^LlamaModel is not supported; supported: LlavaForConditionalGeneration, "):
        adapter_for(tiny.model.model.language_model)
    families = (r"unknown model\.family 'gemma3'; valid families: internvl, llava, llava_next, llava_onevision, "
                r"qwen2_5_vl, qwen2_vl, qwen3_vl")
    with pytest.raises(ConfigError, match=families):
        adapter_of(OmegaConf.create({"family": "gemma3"}))


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=pdrop", "budget=16"], "method pdrop with positions=compact is not defined on Qwen2.5-VL's M-RoPE (3-row "
                                    "image-grid positions): use method.positions=original"),
    (["method=cdpruner", "budget=16"], "method cdpruner does not run on Qwen2.5-VL, whose vision tower is no CLIP"),
    (["method=fastv", "budget=65"], "budget must be in 1..64"),
    (["method=fastv", "budget=16", "batch_size=2", "flops=counted"], "flops=counted counts a batch as a whole, whose "
                                                                     "rows may hold images of different sizes on "
                                                                     "Qwen2.5-VL: set batch_size=1 or flops=projected"),
])
def test_what_the_runtime_does_not_define_on_qwen_is_refused_before_loading(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_overrides(["model=tiny_qwen25vl", *overrides])
    assert message in str(error.value)
    check_overrides(["model=tiny_qwen25vl", "method=pdrop", "budget=16", "method.positions=original"])
    check_overrides(["model=tiny_qwen25vl", "method=fastv", "budget=16", "batch_size=2"])  # rows of any sizes


def test_a_tiny_qwen_run_goes_end_to_end_through_lmms_eval(tmp_path):
    """`python -m harness model=tiny_qwen25vl method=fastv retain=0.25` on the synthetic task: 336 px images give 64
    vision tokens (8x8 at 28 px each within max_pixels), FastV keeps a quarter of them from layer 2 on."""
    result, samples = tiny_run(tmp_path, "tiny_qwen25vl", "fastv", "retain=0.25", "retain0.25")
    assert result["budget"] == {"tokens": None, "convention": "exact", "per": "image", "used": True}
    assert result["tokens"] == {"per_layer": [64.0, 64.0, 16.0, 16.0], "mean_vision_tokens": 40.0,
                                "mean_vision_fraction": 0.625}
    assert [s["vision_tokens_unpruned"] for s in samples] == [64, 64]
    assert all(s["flops"]["prefill"]["vision"] > 0 and s["flops"]["prefill"]["projector"] > 0 for s in samples)
