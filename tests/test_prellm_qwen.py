"""Pre-LLM reduction on the tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models (towers without CLS): the received-attention
signal, each image's merger outputs reduced with the kept tokens at their own M-RoPE positions (and, on Qwen3-VL,
with their own DeepStack features), exact against a genuinely shorter input."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

from harness.adapters.base import VisionAttentionCall
from harness.config import compose, validate
from harness.runtime import chunk_attention, prune, received_attention
from methods.base import TokenPruner
from tests.conftest import noise_images, tiny_of
from tests.test_cli import tiny_run
from tests.test_runtime_qwen import FEW

QWEN = ["tiny_qwen2vl", "tiny_qwen25vl", "tiny_qwen3vl"]


@pytest.fixture(scope="module", params=QWEN)
def qwen(request):
    return tiny_of(request.param)


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    return noise_images([(100, 90), (336, 336)], seed=3)  # 12 (Qwen3-VL: 9) and 64 vision tokens


def test_the_received_attention_maps_qwen25_window_order_back_to_raster_tokens():
    """A 4x8-patch image is 2x4 tokens; the tiny Qwen2.5-VL's 56 px windows hold 2x2 tokens, so the ViT runs the
    merge units in the window order [0, 1, 4, 5 | 2, 3, 6, 7] (two chunks of 16 patches in its windowed blocks).
    In each chunk, head 0 of every query attends only to one patch, head 1 uniformly: that patch receives
    (1 + 1/16) / 2, every other one 1/32; a token averages its 4 patches."""
    qwen25 = tiny_of("tiny_qwen25vl")
    token_of_patch = qwen25.adapter.token_of_patch(qwen25.model, torch.tensor([[1, 4, 8]]))
    assert token_of_patch.tolist() == [token for token in [0, 1, 4, 5, 2, 3, 6, 7] for _ in range(4)]
    chunks = []
    for focus in (9, 4):  # ViT patch 9 is in unit 2 (token 4); patch 16 + 4 in unit 5 (token 3)
        one_hot = torch.zeros(16, 16)
        one_hot[:, focus] = 1
        chunks.append(torch.stack([one_hot, torch.full((16, 16), 1 / 16)]))
    focused = ((1 + 1 / 16) / 2 + 3 / 32) / 4
    expected = [1 / 32, 1 / 32, 1 / 32, focused, focused, 1 / 32, 1 / 32, 1 / 32]
    assert torch.allclose(received_attention(chunks, token_of_patch), torch.tensor(expected), atol=1e-7)


@torch.no_grad()
def test_the_probed_attention_is_the_one_the_vision_block_computes(qwen, pictures):
    """The queries and keys the adapter recomputes (fused qkv, the ViT's 2-D RoPE), chunked by the block's own
    boundaries, give back the block's attention output: probabilities @ values, then its output projection."""
    block = qwen.adapter.tower_attention(qwen.model, None)
    seen = {}

    def capture(module, args, kwargs, output):
        seen["call"] = qwen.adapter.vision_attention_call(module, args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["values"] = module.qkv(hidden).reshape(hidden.shape[0], 3, module.num_heads, -1)[:, 2]
        seen["output"] = output

    handle = block.register_forward_hook(capture, with_kwargs=True)
    try:
        qwen.model(**qwen.inputs([pictures], ["Which picture is brighter?"]))
    finally:
        handle.remove()
    call: VisionAttentionCall = seen["call"]
    assert call.chunks.tolist() == ([0, 36, 292] if qwen.adapter.family == "qwen3_vl" else [0, 48, 304])
    bounds = call.chunks.tolist()
    outputs = [probs.to(seen["values"].dtype) @ seen["values"][start:end].transpose(0, 1)
               for probs, start, end in zip(chunk_attention(call), bounds[:-1], bounds[1:], strict=True)]
    recomputed = block.proj(torch.cat([o.transpose(0, 1).flatten(1) for o in outputs]))
    assert (recomputed - seen["output"]).abs().max() <= 1e-5


@dataclass
class KeepThirdAndSummary(TokenPruner):
    """Per image: a random third of its tokens, in reverse order (the runtime places tokens by their sources), and
    one token of no source, the mean of the others (it takes the image's last free slot)."""

    name = "keep_third_and_summary"
    choices: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)

    def reduce_image_embeddings(self, embeddings, vision, questions):
        count = embeddings.shape[1]
        generator = torch.Generator().manual_seed(count)
        kept = torch.randperm(count, generator=generator)[:count // 3].sort(descending=True).values.tolist()
        dropped = [i for i in range(count) if i not in kept]
        summary = embeddings[0, dropped].mean(dim=0)
        self.choices.append((kept, summary))
        self.sources = [[[i] for i in kept] + [[]]]
        return torch.cat([embeddings[0, kept], summary[None]])[None]


@torch.no_grad()
def test_a_pre_llm_reduction_equals_a_shorter_input(qwen, pictures):
    """Two images of different sizes in one prompt, each reduced on its own. The reference runs the language model on
    the shorter sequence itself: the kept tokens' features at the M-RoPE positions of their own slots, the summary
    token at the position of its image's last dropped slot, and on Qwen3-VL each kept token's own DeepStack
    features (none for the summary)."""
    inputs = qwen.inputs([pictures], ["Which picture is brighter?"])
    pruner = KeepThirdAndSummary()
    with prune(qwen.model, pruner, sample_ids=["two"]) as runtime:
        logits = qwen.model(**inputs).logits
    model, ids = qwen.model.model, inputs["input_ids"]
    features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    positions, _ = model.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                        attention_mask=inputs["attention_mask"])
    embeds = model.get_input_embeddings()(ids)[0]
    keep = (ids[0] != qwen.model.config.image_token_id).clone()
    own = torch.zeros_like(keep)
    for (start, _), image, (kept, summary) in zip(qwen.adapter.image_spans(qwen.model, ids)[0],
                                                   features.pooler_output, pruner.choices, strict=True):
        last_free = max(set(range(len(image))) - set(kept))
        embeds[start: start + len(image)] = image
        embeds[start + last_free] = summary
        keep[[start + i for i in (*kept, last_free)]] = True
        own[[start + i for i in kept]] = True
    extra = {}
    if qwen.adapter.deepstack_layers(qwen.model):
        is_image = ids[0] == qwen.model.config.image_token_id
        kept_slots, own_slots = keep[is_image], own[is_image][keep[is_image], None]
        extra = {"visual_pos_masks": is_image[keep][None],
                 "deepstack_visual_embeds": [torch.cat(layer)[kept_slots] * own_slots
                                             for layer in features.deepstack_features]}
    hidden = model.language_model(inputs_embeds=embeds[keep][None], position_ids=positions[:, :, keep],
                                  **extra).last_hidden_state
    reference = qwen.model.lm_head(hidden)
    kept_counts = [len(kept) + 1 for kept, _ in pruner.choices]
    assert runtime.vision_tokens_per_layer().tolist() == [[sum(kept_counts)] * 4]
    assert torch.equal(runtime.layers[0].orig_index[0], keep.nonzero()[:, 0])
    assert logits.shape == reference.shape and (logits - reference).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("method", ["visionzip", "holov", "divprune"])
def test_each_image_keeps_its_own_share_under_retain(qwen, pictures, method):
    """retain=0.25 on a 12-token (Qwen3-VL: 9) and a 64-token image: round(V/4) of each, from before layer 0."""
    pruner = validate(compose([f"model={qwen.name}", f"method={method}", "retain=0.25"]))
    inputs = qwen.inputs([pictures], ["Which picture is brighter?"])
    with prune(qwen.model, pruner, sample_ids=["two"]) as runtime:
        qwen.model(**inputs)
    kept = runtime.layers[0].orig_index[0]
    spans = qwen.adapter.image_spans(qwen.model, inputs["input_ids"])[0]
    per_image = [int(((kept >= start) & (kept < end)).sum()) for start, end in spans]
    assert per_image == [round((end - start) / 4) for start, end in spans]
    assert runtime.vision_tokens_per_layer().tolist() == [[sum(per_image)] * 4]


@torch.no_grad()
def test_a_padded_batch_of_pre_llm_reductions_equals_each_sample_alone(qwen, pictures):
    """Two prompts of different lengths, each with its own same-size image: every image is reduced on its own, and
    each row's kept slots are found among that row's vision tokens (the same tokens and next-token logits)."""
    pixels = torch.rand(336, 336, 3, generator=torch.Generator().manual_seed(4))
    images = [pictures[1], Image.fromarray((pixels * 255).to(torch.uint8).numpy())]
    questions = ["Which picture is brighter?", "Describe the colours and the shapes you can see in this picture."]
    pruner = validate(compose([f"model={qwen.name}", "method=vispruner", "budget=16"]))
    inputs = qwen.inputs(images, questions)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded"
    with prune(qwen.model, pruner, sample_ids=["a", "b"]) as runtime:
        batch_logits = qwen.model(**inputs).logits[:, -1]
    batch_kept = runtime.layers[0].orig_index
    for row in range(2):
        alone = qwen.inputs(images[row: row + 1], questions[row: row + 1])
        with prune(qwen.model, pruner, sample_ids=[["a", "b"][row]]) as runtime:
            logits = qwen.model(**alone).logits[0, -1]
        padding = inputs["input_ids"].shape[1] - alone["input_ids"].shape[1]
        kept = batch_kept[row][batch_kept[row] >= padding] - padding
        assert torch.equal(kept, runtime.layers[0].orig_index[0])
        assert (batch_logits[row] - logits).abs().max() <= 1e-4


@torch.no_grad()
def test_a_batch_of_images_of_different_sizes_reduced_before_the_llm_equals_each_alone(qwen, pictures):
    """A 12-token (Qwen3-VL: 9) and a 64-token image in one padded batch, VisionZip at retain=0.25: each image keeps
    a quarter of its own tokens (the shorter row the difference as masked padding), and each row's logits at every
    generated step and its tokens are those it gets alone."""
    questions = ["Which picture is brighter?", "Describe the colours and the shapes you can see in this picture."]
    pruner = validate(compose([f"model={qwen.name}", "method=visionzip", "retain=0.25", "batch_size=2"]))
    inputs = qwen.inputs(pictures, questions)
    with prune(qwen.model, pruner, sample_ids=["a", "b"]) as runtime:
        out = qwen.model.generate(**inputs, max_new_tokens=FEW, min_new_tokens=FEW, do_sample=False,
                                  return_dict_in_generate=True, output_logits=True)
    counts = [(end - start) for [(start, end)] in qwen.adapter.image_spans(qwen.model, inputs["input_ids"])]
    assert runtime.vision_tokens_per_layer()[:, 0].tolist() == [round(count / 4) for count in counts]
    width = inputs["input_ids"].shape[1]
    for row in range(2):
        alone = qwen.inputs(pictures[row: row + 1], questions[row: row + 1])
        with prune(qwen.model, pruner, sample_ids=[["a", "b"][row]]):
            reference = qwen.model.generate(**alone, max_new_tokens=FEW, min_new_tokens=FEW, do_sample=False,
                                            return_dict_in_generate=True, output_logits=True)
        assert torch.equal(out.sequences[row, width:], reference.sequences[0, alone["input_ids"].shape[1]:])
        for step, logits in enumerate(out.logits):
            assert (logits[row] - reference.logits[step][0]).abs().max() <= 1e-4, step


def test_a_pre_llm_method_on_a_tiny_qwen_goes_end_to_end(tmp_path):
    """`python -m harness model=tiny_qwen25vl method=visionzip retain=0.25`: each 64-token image keeps 14 dominant and
    2 contextual tokens from before layer 0."""
    result, samples = tiny_run(tmp_path, "tiny_qwen25vl", "visionzip", "retain=0.25", "retain0.25")
    assert result["tokens"] == {"per_layer": [16.0] * 4, "mean_vision_tokens": 16.0, "mean_vision_fraction": 0.25}
    assert [s["vision_tokens_per_layer"] for s in samples] == [[16] * 4] * 2
