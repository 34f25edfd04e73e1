"""The pruning runtime on the tiny LLaVA-NeXT and LLaVA-OneVision models (AnyRes crops, packed grids, image-newline
slots): the exactness tests of tests/test_runtime.py, with the newline slots kept like text."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from harness.runtime import prune
from methods import METHODS, Budget, DivPrune, RandomPruner
from methods.divprune import max_min_diverse
from tests.conftest import noise_images, tiny_of
from tests.test_runtime import QUESTION, KeepAll, generate, hide_keys_from
from tests.test_runtime_qwen import FEW, NeedsOneCount, generate_few

# Per family, for the 336 px and 100x60 pictures: (prunable vision tokens, newline slots). NeXT: 16 base + an 8x8 grid
# of 2x2 crops + 8 newlines; 100x60: a 2x1 grid of crops unpadded to 6x8. OneVision: 9 base + 6x6 crops shrunk to 9x9
# + 9 newlines; 100x60: 6x9 after unpadding.
LAYOUT = {"tiny_next": ((80, 8), (48, 4)), "tiny_ov": ((90, 9), (63, 6))}


@pytest.fixture(scope="module", params=list(LAYOUT))
def family(request):
    return tiny_of(request.param)


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    return noise_images([(336, 336), (336, 336), (100, 60)], seed=0)


def newline_slots(loaded, inputs) -> torch.Tensor:
    return loaded.adapter.newline_mask(loaded.model, inputs["input_ids"], inputs)


def embeddings_entering_the_language_model(loaded, inputs) -> torch.Tensor:
    captured = {}
    handle = loaded.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        loaded.model(**inputs)
    finally:
        handle.remove()
    return captured["embeds"]


@torch.no_grad()
def test_newline_slots_are_where_the_model_puts_image_newline(family, pictures):
    """The adapter's newline slots are exactly the slots whose embedding the model sets to `image_newline`, and they
    are not prunable vision tokens."""
    for picture, (vision, newlines) in zip(pictures[1:], LAYOUT[family.name], strict=True):
        inputs = family.inputs([picture], [QUESTION])
        ids = inputs["input_ids"]
        is_newline = (embeddings_entering_the_language_model(family, inputs)[0] == family.model.model.image_newline
                      ).all(-1)
        assert torch.equal(newline_slots(family, inputs)[0], is_newline)
        is_vision = family.adapter.vision_mask(family.model, ids, inputs)
        assert (int(is_vision.sum()), int(is_newline.sum())) == (vision, newlines)
        assert torch.equal(is_vision | is_newline, ids == family.adapter.image_token_id(family.model))


@torch.no_grad()
def test_keeping_every_token_equals_the_untouched_model(family, pictures):
    inputs = family.inputs(pictures[:1], [QUESTION])
    reference_logits = family.model(**inputs).logits
    reference_tokens, _ = generate(family.model, inputs)
    with prune(family.model, KeepAll()) as runtime:
        logits = family.model(**inputs).logits
        tokens, _ = generate(family.model, inputs)
    assert runtime.vision_tokens_per_layer().tolist() == [[LAYOUT[family.name][0][0]] * 4]
    assert (logits - reference_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, reference_tokens)


@torch.no_grad()
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_physical_drop_equals_attention_mask_reference(family, pictures, k):
    """16 of the prunable tokens survive from layer k on; every newline slot and text token stays."""
    inputs = family.inputs(pictures[:1], [QUESTION])
    n = inputs["input_ids"].shape[1]
    with prune(family.model, RandomPruner(k=k, budget=Budget(16)), sample_ids=["s0"]) as runtime:
        logits = family.model(**inputs).logits
        kept = runtime.layers[k].orig_index[0]
        tokens, _ = generate_few(family.model, inputs)
    is_vision = family.adapter.vision_mask(family.model, inputs["input_ids"], inputs)[0]
    assert int(is_vision[kept].sum()) == 16 and int((~is_vision[kept]).sum()) == int((~is_vision).sum())
    assert bool(newline_slots(family, inputs)[0][kept].sum() == LAYOUT[family.name][0][1])
    hidden = torch.ones(1, n, dtype=torch.bool)
    hidden[0, kept] = False
    with hide_keys_from(family.model, [None] * k + [hidden] * (4 - k)):
        reference = family.model(**inputs).logits
        reference_tokens, _ = generate_few(family.model, inputs)
    assert (logits[0] - reference[0, kept]).abs().max() <= 1e-4
    assert torch.equal(tokens, reference_tokens)


@torch.no_grad()
def test_padded_batch_equals_each_sample_alone(family, pictures):
    """Two prompts of different lengths whose images share a size (so the same number of vision tokens)."""
    questions = [QUESTION, "Describe the colours and the shapes you can see in this picture, please."]
    inputs = family.inputs(pictures[:2], questions)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded"
    pruner = RandomPruner(k=1, budget=Budget(16))
    with prune(family.model, pruner, sample_ids=["a", "b"]):
        batch_tokens, batch_logits = generate_few(family.model, inputs)
    width = inputs["input_ids"].shape[1]
    for row in range(2):
        alone = family.inputs(pictures[row: row + 1], questions[row: row + 1])
        with prune(family.model, pruner, sample_ids=[["a", "b"][row]]):
            tokens, logits = generate_few(family.model, alone)
        assert torch.equal(batch_tokens[row, width:], tokens[0, alone["input_ids"].shape[1]:])
        assert (batch_logits[row] - logits[0]).abs().max() <= 1e-4


@torch.no_grad()
def test_a_batch_whose_images_differ_in_size_is_refused(family, pictures):
    """Images of different sizes give rows different numbers of vision tokens: a method that needs one count per batch
    is refused by the runtime (the harness refuses it at batch_size > 1 before loading; every registered method that
    batches takes such batches, tests/test_ragged_batches.py)."""
    inputs = family.inputs([pictures[0], pictures[2]], [QUESTION, QUESTION])
    expected = [LAYOUT[family.name][0][0], LAYOUT[family.name][1][0]]
    with prune(family.model, NeedsOneCount(budget=Budget(8))), \
            pytest.raises(ValueError, match=rf"the same number of vision tokens in every sample of a batch, got "
                                            rf"\[{expected[0]}, {expected[1]}\]"):
        family.model(**inputs)


@torch.no_grad()
def test_two_images_in_one_prompt_keep_their_budget_each(family, pictures):
    """NeXT crops each image; OneVision gives each image of a several-image prompt one view and one newline."""
    inputs = family.inputs([[pictures[2], pictures[0]]], ["Which picture is brighter?"])
    n = inputs["input_ids"].shape[1]
    image = family.adapter.image_index(family.model, inputs["input_ids"], inputs)[0]
    sizes = [int((image == i).sum()) for i in range(2)]
    per_image = [48, 80] if family.name == "tiny_next" else [9, 9]
    assert sizes == per_image
    assert int(newline_slots(family, inputs).sum()) == (4 + 8 if family.name == "tiny_next" else 2)
    with prune(family.model, RandomPruner(k=1, budget=Budget(4)), sample_ids=["two"]) as runtime:
        logits = family.model(**inputs).logits
        kept = runtime.layers[1].orig_index[0]
    assert runtime.vision_tokens_per_layer().tolist() == [[sum(per_image), 8, 8, 8]]
    assert int((image[kept] == 0).sum()) == 4 == int((image[kept] == 1).sum())
    hidden = torch.ones(1, n, dtype=torch.bool)
    hidden[0, kept] = False
    with hide_keys_from(family.model, [None] + [hidden] * 3):
        reference = family.model(**inputs).logits
    assert (logits[0] - reference[0, kept]).abs().max() <= 1e-4


@torch.no_grad()
def test_pre_llm_reduction_equals_a_shorter_input_of_the_kept_packed_features(family, pictures):
    """DivPrune on the packed image (after `pack_image_features`: crops laid out, unpadded, OneVision's grid shrunk,
    newlines added) keeps 16 of its vision tokens: the same logits and tokens as the language model run on the shorter
    sequence of the text, the newline slots and those 16 packed features, at contiguous positions. Reducing before
    packing instead would scatter the freed slots (NeXT) or blend them into neighbours (OneVision), models.md §6."""
    inputs = family.inputs(pictures[:1], [QUESTION])
    pruner = DivPrune(budget=Budget(16))
    with prune(family.model, pruner, sample_ids=["s"]) as runtime:
        logits = family.model(**inputs).logits
        tokens, _ = generate_few(family.model, inputs)
    assert runtime.vision_tokens_per_layer().tolist() == [[16] * 4]

    model = family.model.model
    [packed] = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **{
        key: inputs[key] for key in ("batch_num_images",) if key in inputs}).pooler_output
    is_vision = (packed != model.image_newline).any(-1)
    kept_vision = max_min_diverse(packed[is_vision], 16).sort().values
    kept = torch.cat([(~is_vision).nonzero()[:, 0], is_vision.nonzero()[:, 0][kept_vision]]).sort().values
    ids = inputs["input_ids"][0]
    slots = (ids == family.adapter.image_token_id(family.model)).nonzero()[:, 0]
    embeds = model.get_input_embeddings()(ids).clone()
    embeds[slots] = packed
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[slots] = False
    keep[slots[kept]] = True
    shorter = embeds[keep][None]
    reference = family.model(inputs_embeds=shorter).logits
    assert logits.shape == reference.shape and (logits - reference).abs().max() <= 1e-5
    reference_tokens = family.model.generate(inputs_embeds=shorter, max_new_tokens=FEW, min_new_tokens=FEW,
                                             do_sample=False)
    assert torch.equal(tokens[0, inputs["input_ids"].shape[1]:], reference_tokens[0])
    with prune(family.model, DivPrune(budget=Budget(retain=0.25)), sample_ids=["s"]) as runtime:
        family.model(**inputs)
    vision = LAYOUT[family.name][0][0]
    assert runtime.vision_tokens_per_layer().tolist() == [[round(vision / 4)] * 4]  # a quarter of this image's


def packed_view_values(loaded, values: torch.Tensor, inputs) -> torch.Tensor:
    """(views, patches[, C]) per-view values of one image -> (vision tokens[, C]), laid out by the model's packing."""
    model = loaded.model.model
    options = {"vision_feature_select_strategy": loaded.model.config.vision_feature_select_strategy} \
        if loaded.name == "tiny_next" else {"vision_aspect_ratio": loaded.model.config.vision_aspect_ratio}
    channels = values.dim() == 3
    [packed], _ = type(model).pack_image_features(model, [values if channels else values[..., None]],
                                                  inputs["image_sizes"], image_newline=None, **options)
    return packed if channels else packed[:, 0]


def feature_layer(loaded, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's own (eager) attention probabilities (views, heads, n, n) and output states (views, n, d) at
    the feature layer, for every view of the prompt's one image; `view_of` below lays out which token is whose."""
    model, config = loaded.model.model, loaded.model.config
    views = int(loaded.adapter.views(config, inputs["image_sizes"], [True])[0])
    model.vision_tower.config._attn_implementation = "eager"
    try:
        out = model.vision_tower(inputs["pixel_values"][0, :views], output_attentions=True, output_hidden_states=True)
    finally:
        model.vision_tower.config._attn_implementation = "sdpa"
    return out.attentions[config.vision_feature_layer], out.hidden_states[config.vision_feature_layer]


def view_of(loaded, inputs, states: torch.Tensor) -> torch.Tensor:
    """(vision tokens,) the view of the image each packed vision token comes from."""
    views, patches = states.shape[0], states.shape[1] - loaded.adapter.cls_token
    return packed_view_values(loaded, torch.arange(views, dtype=torch.float32)[:, None].expand(-1, patches), inputs)


def reduce_and_find_kept_features(loaded, inputs, pruner) -> tuple[list[int], list[list[int]]]:
    """Run `pruner` on the prompt: which packed vision tokens enter layer 0 as the packed features themselves (kept as
    they are, not merged), and the vision tokens entering each layer."""
    model = loaded.model.model
    [packed] = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    vision = packed[(packed != model.image_newline).any(-1)]
    captured = {}
    handle = model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(hidden=args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True)
    try:
        with prune(loaded.model, pruner, sample_ids=["s"], questions=[QUESTION]) as runtime:
            loaded.model(**inputs)
    finally:
        handle.remove()
    entering = captured["hidden"][0]
    unchanged = [i for i in range(len(vision)) if (entering == vision[i]).all(-1).any()]
    return unchanged, runtime.vision_tokens_per_layer().tolist()


@torch.no_grad()
def test_pre_llm_methods_rank_each_packed_token_by_its_own_patchs_signal(family, pictures):
    """VisionZip's dominant tokens on a packed image are the tokens whose patch ranks highest by the vision tower's
    own attention at the feature layer (eager `output_attentions`), laid out like the features: NeXT's CLIP by the
    CLS row of the patch's view (summed over heads), OneVision's SigLIP (no CLS) by the attention the patch receives
    within its view (mean over heads and queries; the 336 px grid is shrunk, so blended). They enter layer 0 as the
    packed features themselves, at their own slots; the one contextual token merges the rest."""
    inputs = family.inputs(pictures[:1], [QUESTION])
    attention, _ = feature_layer(family, inputs)
    if family.adapter.cls_token:  # the CLS row over the patches, summed over heads
        signal = attention[:, :, 0, 1:].sum(1)
    else:  # the attention each patch receives
        signal = attention.mean(dim=(1, 2))
    expected = packed_view_values(family, signal, inputs).topk(12).indices.sort().values
    pruner = METHODS["visionzip"](budget=Budget(64), dominant=12, contextual=1)
    assert reduce_and_find_kept_features(family, inputs, pruner) == (expected.tolist(), [[13] * 4])


@torch.no_grad()
@pytest.mark.parametrize("picture", [0, 2])
def test_a_budget_per_view_reduces_each_crop_with_its_own_cls_row(pictures, picture):
    """`budget_per=view` on LLaVA-NeXT (VisionZip's and VisPruner's published per-crop count): VisionZip keeps, in
    each view of the packed image (its base view, each crop as unpadded), the 7 tokens its own CLS row ranks highest
    (eager `output_attentions`) plus one contextual token; a crop that unpadding left with at most 8 tokens (the
    100x60 picture's, 8 of 16) is kept whole."""
    family = tiny_of("tiny_next")
    inputs = family.inputs(pictures[picture:picture + 1], [QUESTION])
    attention, states = feature_layer(family, inputs)
    signal = packed_view_values(family, attention[:, :, 0, 1:].sum(1), inputs)
    views = view_of(family, inputs, states)
    expected, kept = [], 0
    for view in range(len(states)):
        tokens = (views == view).nonzero()[:, 0]
        expected += tokens[signal[tokens].topk(7).indices].tolist() if len(tokens) > 8 else tokens.tolist()
        kept += min(len(tokens), 8)
    pruner = METHODS["visionzip"](budget=Budget(8, per="view"), dominant=7, contextual=1)
    assert reduce_and_find_kept_features(family, inputs, pruner) == (sorted(expected), [[kept] * 4])


@torch.no_grad()
def test_cdpruner_on_next_scores_the_feature_layers_states_laid_out_like_the_tokens(pictures):
    """CDPruner's CLIP image embeddings come from the vision tower's feature-layer states: on a packed NeXT image the
    runtime lays them out like the tokens (the tower's own `hidden_states`, each patch's at its token), CLS first: the
    views' mean, or per view (`budget_per=view`) the view's own."""
    family = tiny_of("tiny_next")
    inputs = family.inputs(pictures[2:], [QUESTION])
    _, states = feature_layer(family, inputs)
    expected = packed_view_values(family, states[:, 1:], inputs)
    seen = []

    class Spy(METHODS["cdpruner"]):
        def reduce_image_embeddings(self, embeddings, vision, questions):
            seen.append(vision)
            return super().reduce_image_embeddings(embeddings, vision, questions)

    _, per_layer = reduce_and_find_kept_features(family, inputs, Spy(budget=Budget(8), text_tower="tiny"))
    [vision] = seen
    assert per_layer == [[8] * 4]
    assert torch.allclose(vision.tower_hidden[0, 1:], expected, atol=1e-6)
    assert torch.allclose(vision.tower_hidden[0, 0], states[:, 0].mean(0), atol=1e-6)

    seen.clear()
    reduce_and_find_kept_features(family, inputs, Spy(budget=Budget(4, per="view"), text_tower="tiny"))
    views = view_of(family, inputs, states)
    assert len(seen) == len(states)
    for view, vision in enumerate(seen):
        assert torch.allclose(vision.tower_hidden[0, 0], states[view, 0], atol=1e-6)
        assert torch.allclose(vision.tower_hidden[0, 1:], expected[views == view], atol=1e-6)
