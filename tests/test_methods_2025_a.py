"""DivPrune, HoloV and CDPruner: their scoring on hand-built tensors, and on the tiny model that a pruned run equals a
genuinely shorter input built from the kept embeddings (prefill and generation, batched or alone)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from harness.config import compose, validate
from harness.cost import returned_cache
from harness.models import ModelNotAvailable, model_config
from harness.runtime import VisionProbe, prune
from methods import Budget, CDPruner, ConfigError, DivPrune, HoloV
from methods.cdpruner import ClipRelevance, conditional_dpp, dpp_map, question_text, text_tower_for
from methods.divprune import max_min_diverse
from methods.holov import allocate, chunk_bounds, crop_score
from tests.test_runtime import NEW_TOKENS, QUESTION, generate


def unit_vectors(degrees: list[float], lengths: list[float] | None = None) -> torch.Tensor:
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    vectors = torch.stack([radians.cos(), radians.sin()], dim=1)
    return vectors * torch.tensor(lengths, dtype=torch.float64)[:, None] if lengths else vectors


# ---------------------------------------------------------------------------------------------------- DivPrune
def test_divprune_picks_the_most_isolated_token_then_the_farthest_from_those_picked():
    # 0°, 10°, 90°, 180°, 95°: nearest-neighbour distances 1-cos10, 1-cos10, 1-cos5, 1-cos85, 1-cos5 -> 180° first;
    # then distance to {180°}: 2, 1+cos10, 1, -, 1-cos85 -> 0°; then min over {180°, 0°}: 1-cos10, 1, 1-cos85 -> 90°.
    # Lengths do not matter (cosine distance).
    features = unit_vectors([0, 10, 90, 180, 95], lengths=[1, 3, 0.5, 2, 7])
    assert max_min_diverse(features, 3).tolist() == [3, 0, 2]


def test_divprune_equals_a_plain_max_min_loop():
    features = torch.randn(30, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    distance = [[1 - float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for b in features] for a in features]
    picked = [max(range(30), key=lambda j: sorted(distance[j])[1])]
    while len(picked) < 10:
        picked.append(max(range(30), key=lambda j: min(distance[s][j] for s in picked)))
    assert max_min_diverse(features, 10).tolist() == picked


# ---------------------------------------------------------------------------------------------------- HoloV
def test_holov_chunks_are_contiguous_with_the_remainder_first():
    assert chunk_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert chunk_bounds(576, 16) == [(36 * c, 36 * c + 36) for c in range(16)]
    pruner = HoloV(budget=Budget(64))
    assert [HoloV(budget=Budget(b)).num_chunks(576) for b in (192, 128, 64)] == [5, 8, 16]
    assert pruner.num_chunks(576) == 16 and HoloV(chunks=4, budget=Budget(64)).num_chunks(576) == 4


def test_holov_crop_score_by_hand():
    # Tokens e1, e1, e2: S with its diagonal zeroed = [[0,1,0],[1,0,0],[0,0,0]], means (1/2, 1/2, 0), variances
    # summed over all three entries / 2 = (3/8, 3/8, 0); A = 1000 a = (1, 2, 3), γ = mean|A| / mean|V| = 2 / (1/4) = 8;
    # h = A + 0.09 · 8 · V = (1.27, 2.27, 3), mean 2.18.
    tokens = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert crop_score(tokens, torch.tensor([0.001, 0.002, 0.003])).item() == pytest.approx(2.18, abs=1e-4)
    assert crop_score(tokens[:1], torch.tensor([0.004])).item() == pytest.approx(0.004)  # one token: raw attention


def test_holov_allocation_floors_then_gives_the_remainder_to_the_largest_weights():
    assert allocate(torch.tensor([1.0, 1.0, 2.0]), 5).tolist() == [1, 1, 3]  # floors 1, 1, 2; one left -> weight 1/2
    assert allocate(torch.tensor([3.0, 1.0]), 6).tolist() == [5, 1]  # floors 4, 1; one left -> the larger


def holov_probe(attention: list[float]) -> VisionProbe:
    """A vision probe whose CLS row (one head) gives the patches `attention`."""
    row = torch.tensor([[[0.0, *attention]]])
    return VisionProbe(hidden=torch.zeros(1, len(attention) + 1, 4), cls_attention=row, keys=torch.zeros(1))


def test_holov_keeps_top_attention_in_descending_order_and_zero_pads_an_overflow():
    embeddings = torch.randn(1, 8, 6, generator=torch.Generator().manual_seed(0))
    attention = [0.1, 0.3, 0.2, 0.25, 0.01, 0.02, 0.03, 0.04]
    # crop scores ≈ 1.09 · mean A: (0.2125, 0.025) · 1.09; budget 3: floors (2, 0), the one left to chunk 0
    pruner = HoloV(chunks=2, budget=Budget(3))
    reduced = pruner.reduce_image_embeddings(embeddings, holov_probe(attention), None)
    assert pruner.sources == [[[1], [3], [2]]]
    assert torch.equal(reduced[0], embeddings[0, [1, 3, 2]])
    # budget 6: floors (5, 0), remainder to chunk 0 -> 6 >= its 4 tokens: kept whole, the surplus lost, zeros after
    pruner = HoloV(chunks=2, budget=Budget(6))
    reduced = pruner.reduce_image_embeddings(embeddings, holov_probe([0.2] * 4 + attention[4:]), None)
    assert pruner.sources == [[[0], [1], [2], [3], [], []]] and pruner.record(0) == {"padding_tokens": 2}
    assert torch.equal(reduced[0, :4], embeddings[0, :4]) and not reduced[0, 4:].any()


# ---------------------------------------------------------------------------------------------------- CDPruner
def test_dpp_map_skips_a_duplicate_of_a_picked_token():
    # S = [[1,1,0],[1,1,0],[0,0,1]], r = (1, 0.9, 0.5): d² = r²; pick 0; e = L[0] = (1, 0.9, 0); d² -> (-, 0, 0.25):
    # the duplicate has no gain left, token 2 comes next.
    similarity = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = torch.tensor([1.0, 0.9, 0.5])
    assert dpp_map(r[:, None] * similarity * r[None, :], 2).tolist() == [0, 2]
    # a rank-1 kernel asked for 3: after the first pick every gain is 0; the picks stay distinct
    assert dpp_map(torch.ones(3, 3), 3).tolist() == [0, 1, 2]


def test_dpp_map_equals_greedy_determinant_maximisation():
    factors = torch.randn(12, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernel = factors @ factors.T
    picked: list[int] = []
    for _ in range(5):
        rest = [j for j in range(12) if j not in picked]
        picked.append(max(rest, key=lambda j: float(torch.det(kernel[[*picked, j]][:, [*picked, j]]))))
    assert dpp_map(kernel, 5).tolist() == picked


def test_cdpruner_relevance_is_negated_in_the_code_and_not_in_the_paper():
    # Orthogonal embeddings: the kernel's diagonal is r², so one pick is the most relevant token. Token 0 aligns with
    # the text, token 2 opposes it: the code (-cos) keeps 2, the paper (+cos) keeps 0.
    embeddings = torch.eye(3)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    text = torch.tensor([[2.0, 0.0]])
    assert conditional_dpp(embeddings, image, text, 1).tolist() == [2]
    assert conditional_dpp(embeddings, image, text, 1, sign=1.0).tolist() == [0]
    assert conditional_dpp(embeddings, image, text, 3).tolist() == [0, 1, 2]  # sorted: raster order


def test_cdpruner_question_text_and_segments():
    assert question_text("What colour?\nAnswer the question using a single word or phrase.") == "What colour?"
    clip = ClipRelevance.tiny(vision_width=32)
    assert clip.text_embeds("short question", torch.device("cpu")).shape == (1, 16)
    assert clip.text_embeds("x" * 100, torch.device("cpu")).shape == (2, 16)  # 101 tokens: two 77-token segments
    # zero padding to the segment length changes nothing (masked, and pooled where it was)
    ids = clip.tokenizer("short question", return_tensors="pt")["input_ids"]
    plain = clip.clip.get_text_features(input_ids=ids).pooler_output
    assert (clip.text_embeds("short question", torch.device("cpu")) - plain).abs().max() <= 1e-5


def test_cdpruner_text_tower_is_resolved_and_checked_before_loading():
    llava = model_config(compose(["model=llava7b"]).model)
    assert text_tower_for(llava.vision_config) == "openai/clip-vit-large-patch14-336"
    fetch = "hf download openai/clip-vit-large-patch14-336"
    with pytest.raises(ModelNotAvailable, match=re.escape(fetch)):
        CDPruner(budget=Budget(64)).check_model(llava)  # not in this machine's cache: stops here, never downloads
    assert validate(compose(["method=cdpruner", "model=tiny_trained", "budget=64"])).text_tower == "tiny"
    with pytest.raises(ModelNotAvailable, match=re.escape("method.text_tower=/nowhere does not exist")):
        CDPruner(text_tower="/nowhere", budget=Budget(64)).check_model(llava)
    llava.vision_config.hidden_size = 2048
    with pytest.raises(ConfigError, match=re.escape("set method.text_tower")):
        text_tower_for(llava.vision_config)


# ---------------------------------------------------------------------------------------------------- tiny model
PRUNERS = {
    "divprune": lambda budget: DivPrune(budget=Budget(budget)),
    "holov": lambda budget: HoloV(budget=Budget(budget)),
    "cdpruner": lambda budget: CDPruner(text_tower="tiny", budget=Budget(budget)),
}


@torch.no_grad()
@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_pruned_run_equals_a_shorter_input_of_the_kept_embeddings(tiny, images, method):
    model = tiny.model
    inputs = tiny.inputs(images[:1], [QUESTION])
    pruner = PRUNERS[method](64)
    with prune(model, pruner, sample_ids=["s"], questions=[QUESTION]) as runtime:
        out = model(**inputs, use_cache=True)
        tokens, _ = generate(model, inputs)
    assert runtime.vision_tokens_per_layer().tolist() == [[64] * 4]
    text = inputs["input_ids"].shape[1] - 576
    assert [layer.keys.shape[2] for layer in returned_cache(out).layers] == [text + 64] * 4

    # Reference: the prompt's embeddings with the image span replaced by the kept embeddings (zeros for padding).
    projected = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    kept = torch.stack([projected[s[0]] if s else torch.zeros_like(projected[0]) for s in pruner.sources[0]])
    embeds = model.model.get_input_embeddings()(inputs["input_ids"])[0]
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    short = torch.cat([embeds[: image[0]], kept, embeds[image[-1] + 1:]])[None]
    mask = torch.ones(1, short.shape[1], dtype=torch.long)
    reference = model(inputs_embeds=short, attention_mask=mask).logits
    reference_tokens = model.generate(inputs_embeds=short, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, do_sample=False)
    assert (out.logits - reference).abs().max() <= 1e-5
    assert torch.equal(tokens[0, inputs["input_ids"].shape[1]:], reference_tokens[0])


@torch.no_grad()
@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_batched_samples_get_their_own_selection(tiny, images, method):
    questions = [QUESTION, "Describe the colours and the shapes you can see in this picture, please."]
    inputs = tiny.inputs(images, questions)
    with prune(tiny.model, PRUNERS[method](64), sample_ids=["a", "b"], questions=questions):
        batch_tokens, batch_logits = generate(tiny.model, inputs)
    width = inputs["input_ids"].shape[1]
    for row in range(2):
        alone = tiny.inputs(images[row: row + 1], questions[row: row + 1])
        with prune(tiny.model, PRUNERS[method](64), sample_ids=["ab"[row]], questions=questions[row: row + 1]):
            tokens, logits = generate(tiny.model, alone)
        assert torch.equal(batch_tokens[row, width:], tokens[0, alone["input_ids"].shape[1]:])
        assert (batch_logits[row] - logits[0]).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("budget", [192, 128, 64])
def test_keep_counts_on_llava_geometry(tiny, images, budget):
    """576 vision tokens: each method gives exactly the budget in every layer (HoloV's zero padding included), as its
    declared schedule says."""
    inputs = tiny.inputs(images[:1], [QUESTION])
    for make in PRUNERS.values():
        pruner = make(budget)
        with prune(tiny.model, pruner, sample_ids=["s"], questions=[QUESTION]) as runtime:
            tiny.model(**inputs)
        assert runtime.vision_tokens_per_layer()[0].tolist() == pruner.vision_schedule(576, 4) == [budget] * 4
        assert len(pruner.sources[0]) == budget
        real = [s[0] for s in pruner.sources[0] if s]
        assert len(set(real)) == len(real)


def test_a_question_reading_method_needs_the_questions(tiny):
    backend = tiny.model.config.text_config._attn_implementation
    with pytest.raises(ValueError, match="pass questions= to prune"), prune(tiny.model, PRUNERS["cdpruner"](64)):
        pass
    # refused before installing anything: no hook left behind, the model's own attention backend
    assert not tiny.model.model._forward_pre_hooks and not tiny.model.model.multi_modal_projector._forward_hooks
    assert tiny.model.config.text_config._attn_implementation == backend
