"""The pruning runtime on the tiny InternVL3 model (tiles + thumbnail per image, 1-D RoPE): the exactness tests of
tests/test_runtime.py. Tiles are 64 px with 16 vision tokens each; a 128x64 image is 2x1 tiles + a thumbnail."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from harness.runtime import prune
from methods import Budget, RandomPruner
from tests.conftest import noise_images, tiny_of
from tests.test_runtime import QUESTION, KeepAll, generate, hide_keys_from
from tests.test_runtime_qwen import NeedsOneCount, generate_few


@pytest.fixture(scope="module")
def internvl():
    return tiny_of("tiny_internvl")


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    return noise_images([(128, 64), (96, 48), (64, 64)], seed=0)  # 3 tiles (2x1 + thumbnail), 3 tiles, 1 tile


@torch.no_grad()
def test_keeping_every_token_equals_the_untouched_model(internvl, pictures):
    inputs = internvl.inputs(pictures[:1], [QUESTION])
    reference_logits = internvl.model(**inputs).logits
    reference_tokens, _ = generate(internvl.model, inputs)
    with prune(internvl.model, KeepAll()) as runtime:
        logits = internvl.model(**inputs).logits
        tokens, _ = generate(internvl.model, inputs)
    assert runtime.vision_tokens_per_layer().tolist() == [[48] * 4]
    assert (logits - reference_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, reference_tokens)


@torch.no_grad()
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_physical_drop_equals_attention_mask_reference(internvl, pictures, k):
    inputs = internvl.inputs(pictures[:1], [QUESTION])
    n = inputs["input_ids"].shape[1]
    with prune(internvl.model, RandomPruner(k=k, budget=Budget(12)), sample_ids=["s0"]) as runtime:
        logits = internvl.model(**inputs).logits
        kept = runtime.layers[k].orig_index[0]
        tokens, _ = generate_few(internvl.model, inputs)
    is_image = inputs["input_ids"][0] == internvl.model.config.image_token_id
    assert int(is_image[kept].sum()) == 12 and int((~is_image[kept]).sum()) == int((~is_image).sum())
    hidden = torch.ones(1, n, dtype=torch.bool)
    hidden[0, kept] = False
    with hide_keys_from(internvl.model, [None] * k + [hidden] * (4 - k)):
        reference = internvl.model(**inputs).logits
        reference_tokens, _ = generate_few(internvl.model, inputs)
    assert (logits[0] - reference[0, kept]).abs().max() <= 1e-4
    assert torch.equal(tokens, reference_tokens)


@torch.no_grad()
def test_padded_batch_of_images_with_as_many_tiles_equals_each_alone(internvl, pictures):
    """128x64 and 96x48 both tile 2x1 + a thumbnail: the same 48 vision tokens, and questions of different lengths
    make the batch padded."""
    questions = [QUESTION, "Describe the colours and the shapes you can see in this picture, please."]
    inputs = internvl.inputs(pictures[:2], questions)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded"
    pruner = RandomPruner(k=1, budget=Budget(12))
    with prune(internvl.model, pruner, sample_ids=["a", "b"]):
        batch_tokens, batch_logits = generate_few(internvl.model, inputs)
    width = inputs["input_ids"].shape[1]
    for row in range(2):
        alone = internvl.inputs(pictures[row: row + 1], questions[row: row + 1])
        with prune(internvl.model, pruner, sample_ids=[["a", "b"][row]]):
            tokens, logits = generate_few(internvl.model, alone)
        assert torch.equal(batch_tokens[row, width:], tokens[0, alone["input_ids"].shape[1]:])
        assert (batch_logits[row] - logits[0]).abs().max() <= 1e-4


@torch.no_grad()
def test_a_batch_whose_images_differ_in_tiles_is_refused(internvl, pictures):
    """The tile count follows each image's shape: a method that needs one vision count per batch refuses a batch with
    different counts per row on its first forward (the harness refuses it at batch_size > 1 before loading; every
    registered method that batches takes such batches, tests/test_ragged_batches.py)."""
    inputs = internvl.inputs([pictures[0], pictures[2]], [QUESTION, QUESTION])
    with prune(internvl.model, NeedsOneCount(budget=Budget(8))), \
            pytest.raises(ValueError, match=r"the same number of vision tokens in every sample of a batch, got "
                                            r"\[48, 16\]"):
        internvl.model(**inputs)


@torch.no_grad()
def test_two_images_in_one_prompt_keep_their_budget_each(internvl, pictures):
    inputs = internvl.inputs([[pictures[2], pictures[0]]], ["Which picture is brighter?"])
    n = inputs["input_ids"].shape[1]
    first, second = internvl.adapter.image_tiles(internvl.model, inputs["input_ids"])[0]
    assert (first.tiles, second.tiles) == (1, 3)
    with prune(internvl.model, RandomPruner(k=1, budget=Budget(8)), sample_ids=["two"]) as runtime:
        logits = internvl.model(**inputs).logits
        kept = runtime.layers[1].orig_index[0]
    assert runtime.vision_tokens_per_layer().tolist() == [[64, 16, 16, 16]]
    for image in (first, second):
        assert int(((kept >= image.start) & (kept < image.end)).sum()) == 8
    hidden = torch.ones(1, n, dtype=torch.bool)
    hidden[0, kept] = False
    with hide_keys_from(internvl.model, [None] + [hidden] * 3):
        reference = internvl.model(**inputs).logits
    assert (logits[0] - reference[0, kept]).abs().max() <= 1e-4
    with prune(internvl.model, RandomPruner(k=1, budget=Budget(retain=0.25)), sample_ids=["two"]) as runtime:
        internvl.model(**inputs)
    assert runtime.vision_tokens_per_layer().tolist() == [[64] + [4 + 12] * 3]  # a quarter of each image's own
