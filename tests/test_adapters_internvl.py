"""The InternVL3 adapter: loading, the prompt of lmms-eval's `internvl_hf` wrapper, tiles per image."""

from __future__ import annotations

import pytest
import torch
from lmms_eval.protocol import ChatMessages

from harness.config import check_overrides
from harness.models import ModelNotAvailable
from tests.conftest import tiny_of
from tests.test_adapters import load_from_checkpoint_directory, solid


@pytest.fixture(scope="module")
def internvl():
    return tiny_of("tiny_internvl")


def test_prompt_equals_the_lmms_eval_internvl_hf_wrapper(internvl):
    """lmms-eval's `internvl_hf` (chat) takes the task's messages (one user turn: the images first, then the context
    as given), dumps them, and renders them with `processor.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)`: the -hf template, no system turn, each image as `<IMG_CONTEXT>` and a newline."""
    context = "<image>\nWhat color is the circle?\nAnswer the question using a single word or phrase."
    images = [solid(100, 90), solid(60, 60)]
    turn = [{"role": "user", "content": [*({"type": "image", "url": image} for image in images),
                                         {"type": "text", "text": context}]}]
    lmms_eval = internvl.processor.apply_chat_template(ChatMessages(messages=turn).model_dump()["messages"],
                                                       tokenize=False, add_generation_prompt=True)
    [prompt] = internvl.adapter.prompts(internvl.processor, [context], [images])
    assert prompt == lmms_eval == ("<|im_start|>user\n<IMG_CONTEXT>\n<IMG_CONTEXT>\n<image>\nWhat color is the circle?"
                                   "\nAnswer the question using a single word or phrase.<|im_end|>\n"
                                   "<|im_start|>assistant\n")


@pytest.mark.parametrize(("size", "tiles"), [((64, 64), 1), ((128, 64), 3), ((100, 90), 5), ((336, 336), 10),
                                             ((640, 480), 13), ((64, 448), 8)])
def test_each_image_is_its_tiles_then_a_thumbnail_between_image_markers(internvl, size, tiles):
    """The processor's tiling (models.md §5): the cols x rows grid (<= 12 tiles) closest to the image's aspect ratio,
    plus a thumbnail when it has more than one tile; 16 tokens per 64 px tile here (256 per 448 px tile in InternVL3:
    640x480 -> 3,328)."""
    inputs = internvl.inputs([solid(*size)], ["Which?"])
    ids = inputs["input_ids"][0]
    [[image]] = internvl.adapter.image_tiles(internvl.model, inputs["input_ids"])
    assert (image.tiles, image.tokens_per_tile, image.has_thumbnail) == (tiles, 16, tiles > 1)
    assert inputs["pixel_values"].shape[0] == tiles
    tokenizer = internvl.processor.tokenizer
    assert ids[image.start - 1] == tokenizer.convert_tokens_to_ids("<img>")
    assert ids[image.end] == tokenizer.convert_tokens_to_ids("</img>")
    tile = internvl.adapter.tile_index(internvl.model, inputs["input_ids"])[0]
    assert tile[image.start:image.end].tolist() == [t for t in range(tiles) for _ in range(16)]
    assert bool((tile[:image.start] == -1).all()) and bool((tile[image.end:] == -1).all())


def test_two_images_are_two_spans_and_a_batch_is_left_padded(internvl):
    inputs = internvl.inputs([[solid(64, 64), solid(128, 64)]], ["Compare them."])
    assert [(i.tiles, i.end - i.start) for i in internvl.adapter.image_tiles(internvl.model,
                                                                             inputs["input_ids"])[0]] == [(1, 16),
                                                                                                          (3, 48)]
    batch = internvl.inputs([solid(64, 64), solid(64, 64)], ["Short?", "A longer question about the picture?"])
    assert (batch["attention_mask"][:, -1] == 1).all() and batch["attention_mask"][0, 0] == 0


@torch.no_grad()
def test_a_checkpoint_directory_loads(internvl, tmp_path):
    """`source: hf` reads weights, tokenizer (with its image tokens), image processor and chat template from a
    local directory (what `hf download` leaves)."""
    load_from_checkpoint_directory(internvl, tmp_path)


@pytest.mark.parametrize(("model", "repo"), [("internvl3_8b", "OpenGVLab/InternVL3-8B-hf"),
                                             ("internvl3_1b", "OpenGVLab/InternVL3-1B-hf")])
def test_an_absent_checkpoint_stops_before_loading_with_the_download_command(model, repo):
    with pytest.raises(ModelNotAvailable, match=f"hf download {repo}"):
        check_overrides([f"model={model}", "method=fastv", "retain=0.25"])
