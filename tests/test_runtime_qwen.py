"""The pruning runtime on the tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models (M-RoPE, dynamic resolution, DeepStack):
the exactness tests of tests/test_runtime.py, with the model's own 3-row positions."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from harness.runtime import prune
from methods import Budget, ConfigError, FastV, Probe, RandomPruner, Selection, TokenPruner
from tests.conftest import noise_images, tiny_of
from tests.test_runtime import QUESTION, KeepAll, generate, hide_keys_from

FEW = 5  # new tokens where 20 would only repeat what the keep-all test shows


def generate_few(model, inputs):
    out = model.generate(**inputs, max_new_tokens=FEW, min_new_tokens=FEW, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences, out.logits[0]


@pytest.fixture(scope="module", params=["tiny_qwen2vl", "tiny_qwen25vl", "tiny_qwen3vl"])
def qwen(request):
    return tiny_of(request.param)


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    return noise_images([(336, 336), (336, 336), (100, 90)], seed=0)  # 64, 64 and 12 (Qwen3-VL: 9) vision tokens


@torch.no_grad()
def test_keeping_every_token_equals_the_untouched_model(qwen, pictures):
    """Selecting every vision token at layer 1 gathers every per-token tensor, positions included (the runtime
    rebuilt 1-D RoPE here before: 1.6e-3 off on Qwen2-VL, and generate() crashed on the 4-row position ids)."""
    inputs = qwen.inputs(pictures[:1], [QUESTION])
    reference_logits = qwen.model(**inputs).logits
    reference_tokens, _ = generate(qwen.model, inputs)
    with prune(qwen.model, KeepAll()) as runtime:
        logits = qwen.model(**inputs).logits
        tokens, _ = generate(qwen.model, inputs)
    assert runtime.vision_tokens_per_layer().tolist() == [[64] * 4]
    assert runtime.state.positions.shape == (3, 1, inputs["input_ids"].shape[1])
    assert (logits - reference_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, reference_tokens)


def small(qwen) -> int:
    """Vision tokens of the 100x90 picture: 4x3 at 28 px per token, 3x3 at Qwen3-VL's 32."""
    return 9 if qwen.adapter.family == "qwen3_vl" else 12


@torch.no_grad()
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_physical_drop_equals_attention_mask_reference(qwen, pictures, k):
    """On Qwen3-VL, layers 0 and 1 add DeepStack features after they run: dropping before them must add each kept
    token's own."""
    inputs = qwen.inputs(pictures[:1], [QUESTION])
    n = inputs["input_ids"].shape[1]
    with prune(qwen.model, RandomPruner(k=k, budget=Budget(16)), sample_ids=["s0"]) as runtime:
        logits = qwen.model(**inputs).logits
        kept = runtime.layers[k].orig_index[0]
        tokens, _ = generate_few(qwen.model, inputs)
    is_image = inputs["input_ids"][0] == qwen.model.config.image_token_id
    assert int(is_image[kept].sum()) == 16 and int((~is_image[kept]).sum()) == int((~is_image).sum())
    hidden = torch.ones(1, n, dtype=torch.bool)
    hidden[0, kept] = False
    with hide_keys_from(qwen.model, [None] * k + [hidden] * (4 - k)):
        reference = qwen.model(**inputs).logits
        reference_tokens, _ = generate_few(qwen.model, inputs)
    assert (logits[0] - reference[0, kept]).abs().max() <= 1e-4
    assert torch.equal(tokens, reference_tokens)


@torch.no_grad()
def test_padded_batch_equals_each_sample_alone(qwen, pictures):
    questions = [QUESTION, "Describe the colours and the shapes you can see in this picture, please."]
    inputs = qwen.inputs(pictures[:2], questions)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded"
    pruner = RandomPruner(k=1, budget=Budget(16))
    with prune(qwen.model, pruner, sample_ids=["a", "b"]):
        batch_tokens, batch_logits = generate_few(qwen.model, inputs)
    width = inputs["input_ids"].shape[1]
    for row in range(2):
        alone = qwen.inputs(pictures[row: row + 1], questions[row: row + 1])
        with prune(qwen.model, pruner, sample_ids=[["a", "b"][row]]):
            tokens, logits = generate_few(qwen.model, alone)
        assert torch.equal(batch_tokens[row, width:], tokens[0, alone["input_ids"].shape[1]:])
        assert (batch_logits[row] - logits[0]).abs().max() <= 1e-4


class KeepEveryRow(TokenPruner):
    """Selects every vision token of each row at layer 1, -1 padding the shorter rows of a ragged batch."""

    supports_ragged_batches = True

    def select(self, layer, state):
        if layer != 1:
            return None
        entries = torch.arange(state.vision_index.shape[1]).expand(state.batch_size, -1)
        return Selection(keep=entries.masked_fill(~state.vision_valid, -1))


class NeedsOneCount(RandomPruner):
    """An in-LLM method that does not handle rows of different vision counts (none of the registered ones does not)."""

    name = "needs_one_count"
    supports_ragged_batches = False


@torch.no_grad()
@pytest.mark.parametrize(("pruner", "vision"), [
    (KeepEveryRow(), lambda small: [[64] * 4, [small] * 4]),
    (RandomPruner(k=1, budget=Budget(8)), lambda small: [[64] + [8] * 3, [small] + [8] * 3]),  # the same kept
    (FastV(k=2, budget=Budget(retain=0.25)), lambda small: [[64, 64] + [16] * 2, [small] * 2 + [round(small / 4)] * 2]),
], ids=["keep-all", "random-8", "fastv-retain0.25"])
def test_a_padded_batch_of_images_of_different_sizes_equals_each_alone(qwen, pictures, pruner, vision):
    """Rows with 64 and 12 (Qwen3-VL: 9) vision tokens: a row that drops more keeps the difference as masked padding
    slots, so both rows stay one length; each row's logits at every step and its tokens are those it gets alone."""
    questions = [QUESTION, "Describe the colours and the shapes you can see in this picture, please."]
    batch = qwen.inputs([pictures[0], pictures[2]], questions)
    with prune(qwen.model, pruner, sample_ids=["a", "b"]) as runtime:
        out = qwen.model.generate(**batch, max_new_tokens=FEW, min_new_tokens=FEW, do_sample=False,
                                  return_dict_in_generate=True, output_logits=True)
    assert runtime.vision_tokens_per_layer().tolist() == vision(small(qwen))
    width = batch["input_ids"].shape[1]
    for row in range(2):
        alone = qwen.inputs([pictures[[0, 2][row]]], questions[row: row + 1])
        with prune(qwen.model, pruner, sample_ids=[["a", "b"][row]]):
            reference = qwen.model.generate(**alone, max_new_tokens=FEW, min_new_tokens=FEW, do_sample=False,
                                            return_dict_in_generate=True, output_logits=True)
        assert torch.equal(out.sequences[row, width:], reference.sequences[0, alone["input_ids"].shape[1]:])
        for step, logits in enumerate(out.logits):
            assert (logits[row] - reference.logits[step][0]).abs().max() <= 1e-5, step


@torch.no_grad()
def test_a_method_that_needs_one_count_per_batch_refuses_images_of_different_sizes(qwen, pictures):
    inputs = qwen.inputs([pictures[0], pictures[2]], [QUESTION, QUESTION])
    with prune(qwen.model, NeedsOneCount(budget=Budget(8))), \
            pytest.raises(ValueError, match=rf"^method needs_one_count needs the same number of vision tokens in every "
                                            rf"sample of a batch, got \[64, {small(qwen)}\]; set batch_size=1$"):
        qwen.model(**inputs)
    with prune(qwen.model, NeedsOneCount(budget=Budget(8))):  # images of one size: no refusal
        qwen.model(**qwen.inputs([pictures[0], pictures[1]], [QUESTION, QUESTION]))


@torch.no_grad()
def test_two_images_in_one_prompt_keep_their_budget_each(qwen, pictures):
    inputs = qwen.inputs([[pictures[2], pictures[0]]], ["Which picture is brighter?"])
    n = inputs["input_ids"].shape[1]
    (first, first_end), (second, second_end) = qwen.adapter.image_spans(qwen.model, inputs["input_ids"])[0]
    assert (first_end - first, second_end - second) == (small(qwen), 64)
    with prune(qwen.model, RandomPruner(k=1, budget=Budget(8)), sample_ids=["two"]) as runtime:
        logits = qwen.model(**inputs).logits
        kept = runtime.layers[1].orig_index[0]
    assert runtime.vision_tokens_per_layer().tolist() == [[small(qwen) + 64, 16, 16, 16]]
    assert int(((kept >= first) & (kept < first_end)).sum()) == 8 == int(((kept >= second) & (kept < second_end)).sum())
    hidden = torch.ones(1, n, dtype=torch.bool)
    hidden[0, kept] = False
    with hide_keys_from(qwen.model, [None] + [hidden] * 3):
        reference = qwen.model(**inputs).logits
    assert (logits[0] - reference[0, kept]).abs().max() <= 1e-4
    with prune(qwen.model, RandomPruner(k=1, budget=Budget(retain=0.25)), sample_ids=["two"]) as runtime:
        qwen.model(**inputs)
    kept_per_image = round(small(qwen) / 4) + 16  # a quarter of each image's own tokens
    assert runtime.vision_tokens_per_layer().tolist() == [[small(qwen) + 64] + [kept_per_image] * 3]


class PreviewAndProbe(TokenPruner):
    """At layer 1: the attention preview of the last query before the layer runs, and the probe of what it ran."""

    def probe(self, layer, state):
        if layer != 1:
            return None
        self.preview = state.attention_preview(state.last_query)
        return Probe(queries=state.last_query)


@torch.no_grad()
def test_the_attention_preview_is_what_the_layer_computes(qwen, pictures):
    """PDrop scores the next layer with a preview from its own projections and RoPE: on M-RoPE models at the 3-row
    positions, on Qwen3-VL with the q/k norms."""
    inputs = qwen.inputs(pictures[:1], [QUESTION])
    pruner = PreviewAndProbe()
    with prune(qwen.model, pruner) as runtime:
        qwen.model(**inputs)
    assert (pruner.preview - runtime.state.probes[1].attention.float()).abs().max() <= 1e-5


def test_compact_positions_are_refused_on_m_rope(qwen):
    pruner = RandomPruner(k=1, budget=Budget(8), positions="compact")
    with pytest.raises(ConfigError, match=r"positions=compact is not defined on .*M-RoPE"), prune(qwen.model, pruner):
        pass
