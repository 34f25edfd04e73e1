"""The LLaVA-NeXT and LLaVA-OneVision adapters: prompts as lmms-eval's wrappers build them, loading, refusals before
loading, and a run end to end through lmms-eval."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from harness.config import check_overrides
from harness.models import ModelNotAvailable, load
from methods import ConfigError
from tests.conftest import tiny_of
from tests.test_adapters import load_from_checkpoint_directory, solid
from tests.test_cli import tiny_run

CONTEXT = "What color is the circle?\nAnswer the question using a single word or phrase."
# mistral-7b-instruct's template (the llava-v1.6-mistral tokenizer's), reduced to user turns
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}[INST] {{ message['content'] }} [/INST]"
                    "{% endfor %}")


@pytest.fixture(scope="module")
def next_model():
    return tiny_of("tiny_next")


@pytest.fixture(scope="module")
def ov_model():
    return tiny_of("tiny_ov")


def test_next_prompt_equals_the_lmms_eval_llava_hf_wrapper(next_model):
    """lmms-eval's `llava_hf` (simple) prepends `<image>` tokens (space-joined) and a newline to a context without
    one, and renders [{"role": "user", "content": context}] with the tokenizer's chat template, or its Vicuna template
    when the tokenizer has none (the tiny one)."""
    adapter, processor = next_model.adapter, next_model.processor
    [prompt] = adapter.prompts(processor, [CONTEXT], [[solid(100, 90)]])
    assert prompt == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the user's questions. USER: <image>\n" + CONTEXT
                      + " ASSISTANT:")
    [two] = adapter.prompts(processor, ["Compare them."], [[solid(100, 90), solid(60, 60)]])
    assert two.endswith("USER: <image> <image>\nCompare them. ASSISTANT:")
    [given] = adapter.prompts(processor, ["Look: <image>\nWhat?"], [[solid(100, 90)]])
    assert given.endswith("USER: Look: <image>\nWhat? ASSISTANT:")  # a context that places the image keeps it
    processor.tokenizer.chat_template = MISTRAL_TEMPLATE
    try:
        [mistral] = adapter.prompts(processor, [CONTEXT], [[solid(100, 90)]])
    finally:
        processor.tokenizer.chat_template = None
    assert mistral == "<s>[INST] <image>\n" + CONTEXT + " [/INST]"


def test_onevision_prompt_equals_the_lmms_eval_llava_onevision_wrapper(ov_model):
    """lmms-eval's `llava_onevision` (simple, conv template `qwen_1_5`, SeparatorStyle.CHATML): a system turn, the
    user turn with `<image>` tokens and a newline before the context, an open assistant turn."""
    adapter, processor = ov_model.adapter, ov_model.processor
    [prompt] = adapter.prompts(processor, [CONTEXT], [[solid(100, 90)]])
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
                      + CONTEXT + "<|im_end|>\n<|im_start|>assistant\n")
    [two] = adapter.prompts(processor, ["Compare them."], [[solid(100, 90), solid(60, 60)]])
    assert "<|im_start|>user\n<image> <image>\nCompare them.<|im_end|>" in two


def test_each_image_is_one_span_with_its_newline_slots(next_model, ov_model):
    """NeXT: each image -> base 16 + an 8x8 grid + 8 newlines (88 slots); OneVision: each image of a two-image prompt is
    one view (9) and one newline."""
    inputs = next_model.inputs([[solid(100, 90), solid(336, 336)]], ["Which is larger?"])
    spans = next_model.adapter.image_spans(next_model.model, inputs["input_ids"], inputs)[0]
    assert [end - start for start, end in spans] == [88, 88]  # 100x90: 2x2 crops, too close to square to unpad
    inputs = ov_model.inputs([[solid(100, 90), solid(336, 336)]], ["Which is larger?"])
    spans = ov_model.adapter.image_spans(ov_model.model, inputs["input_ids"], inputs)[0]
    assert [end - start for start, end in spans] == [10, 10]


@torch.no_grad()
@pytest.mark.parametrize("conf", ["tiny_next", "tiny_ov"])
def test_a_checkpoint_directory_loads(conf, tmp_path):
    """`source: hf` reads weights, tokenizer and image processor from a local directory (what `hf download` leaves)."""
    load_from_checkpoint_directory(tiny_of(conf), tmp_path)


@pytest.mark.parametrize("conf", ["llava_next7b", "llava_next_mistral7b", "llava_ov7b"])
def test_an_absent_checkpoint_is_refused_with_what_to_download(conf):
    spec = OmegaConf.load(f"conf/model/{conf}.yaml")
    with pytest.raises(ModelNotAvailable, match=f"hf download {spec.path}"):
        load(spec, "cpu")


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=fastv", "budget=81"], "budget must be in 1..80"),
    (["method=fastv", "budget=4", "budget_per=view"], "budget_per=view (a budget per crop) is defined for pre-LLM "
                                                      "methods on LLaVA-NeXT, not for method fastv"),
    (["method=visionzip", "budget=64", "budget_per=crop"], "budget_per must be image or view"),
])
def test_what_the_runtime_does_not_define_on_next_is_refused_before_loading(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_overrides(["model=tiny_next", *overrides])
    assert message in str(error.value)
    check_overrides(["model=tiny_next", "method=divprune", "budget=16"])  # pre-LLM on the packed embeddings
    check_overrides(["model=tiny_next", "method=visionzip", "retain=0.25"])  # and ranked by the CLS rows, packed


def test_a_budget_per_view_is_labelled_and_refused_where_views_are_blended():
    """Per view (LLaVA-NeXT's per-crop count) is a different budget: its own results directory; OneVision's shrunk grids
    blend crops, so it has none."""
    from harness.config import compose, validate

    assert validate(compose(["model=tiny_next", "method=divprune", "budget=4", "budget_per=view"])).budget.label == \
        "4-per-view"
    with pytest.raises(ConfigError, match="not for method divprune on LLaVA-OneVision"):
        check_overrides(["model=tiny_ov", "method=divprune", "budget=4", "budget_per=view"])


def test_clip_methods_are_refused_on_onevision_naming_its_tower():
    with pytest.raises(ConfigError) as error:
        check_overrides(["model=tiny_ov", "method=cdpruner", "budget=16"])
    assert "does not run on LLaVA-OneVision, whose vision tower is no CLIP" in str(error.value)
    check_overrides(["model=tiny_ov", "method=vispruner", "budget=16"])  # ranked by the attention patches receive


@pytest.mark.parametrize(("conf", "method", "budget", "directory", "per_layer", "unpruned", "newlines"), [
    ("tiny_next", "fastv", "retain=0.25", "retain0.25", [80, 80, 20, 20], 80, 8),  # a quarter from layer 2 on
    ("tiny_ov", "divprune", "budget=16", "16", [16] * 4, 90, 9),  # pre-LLM, on the packed image
    ("tiny_next", "visionzip", "retain=0.25", "retain0.25", [20] * 4, 80, 8),  # ranked by each view's CLS row
    ("tiny_ov", "visionzip", "retain=0.25", "retain0.25", [22] * 4, 90, 9),  # by the attention patches receive
])
def test_a_tiny_run_goes_end_to_end_through_lmms_eval(tmp_path, conf, method, budget, directory, per_layer, unpruned,
                                                      newlines):
    """`python -m harness model=<tiny NeXT/OneVision> method=...` on the synthetic task (336 px images); the newline
    slots enter every layer and count as text."""
    result, samples = tiny_run(tmp_path, conf, method, budget, directory)
    assert result["tokens"]["per_layer"] == per_layer and result["budget"]["per"] == "image"
    for sample in samples:
        assert sample["vision_tokens_unpruned"] == unpruned
        assert sample["newline_tokens_per_layer"] == [newlines] * 4
        # every prompt token enters layer 0 but the slots a pre-LLM reduction freed
        assert sample["tokens_per_layer"][0] == sample["input_tokens"] - (unpruned - per_layer[0])
        assert sample["flops"]["prefill"]["vision"] > 0 and sample["flops"]["prefill"]["projector"] > 0
