"""Exactness of the pruning runtime on a tiny LLaVA-1.5-geometry model (576 vision tokens, GQA, fp32, sdpa)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from harness.cost import forward_cache, returned_cache
from harness.runtime import PruningRuntime, prune
from methods import Budget, Probe, RandomPruner, Selection, TokenPruner
from tests.conftest import tiny_model

QUESTION = "What is in the image?"
NEW_TOKENS = 20


def generate(model, inputs, **kw):
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, out.logits[0]


@contextlib.contextmanager
def hide_keys_from(model, hidden_per_layer):
    """The attention-mask reference: in layer l, keys at original indices `hidden_per_layer[l]` ((B, N) bool; None:
    none) are invisible to every query, prefill and decode; positions and everything else unchanged.
    `hidden_per_layer` may also be a function of the layer, for decisions made during the same forward."""
    hidden_at = hidden_per_layer if callable(hidden_per_layer) else hidden_per_layer.__getitem__

    def hook(module, args, kwargs):
        hidden = hidden_at(module.self_attn.layer_idx)
        if hidden is None:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        q = h.shape[1]
        cache = forward_cache(kwargs)
        past = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0
        kv = past + q
        visible = torch.ones(h.shape[0], kv, dtype=torch.bool)
        visible[:, : hidden.shape[1]] &= ~hidden
        causal = torch.arange(kv)[None, :] <= (past + torch.arange(q))[:, None]
        given = kwargs.get("attention_mask")
        mask = causal[None, None] & visible[:, None, None, :]
        if given is not None and given.dtype == torch.bool:
            mask = mask & given
        if model.config.text_config._attn_implementation.endswith("eager"):  # eager masks are additive
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.language_model.layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class KeepAll(TokenPruner):
    """Selects every vision token at layer 1: exercises the gather path while changing nothing."""

    def select(self, layer, state):
        if layer == 1:
            return Selection(keep=torch.arange(state.num_vision).expand(state.batch_size, -1))
        return None


@torch.no_grad()
@pytest.mark.parametrize("pruner", [TokenPruner(), KeepAll()], ids=["none", "keep-all"])
def test_keeping_every_token_equals_the_untouched_model(tiny, images, pruner):
    inputs = tiny.inputs(images[:1], [QUESTION])
    reference_logits = tiny.model(**inputs).logits
    reference_tokens, _ = generate(tiny.model, inputs)
    with prune(tiny.model, pruner) as runtime:
        logits = tiny.model(**inputs).logits
        tokens, _ = generate(tiny.model, inputs)
    assert runtime.vision_tokens_per_layer().tolist() == [[576] * 4]
    assert (logits - reference_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, reference_tokens)


@torch.no_grad()
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_physical_drop_equals_attention_mask_reference(tiny, images, k):
    inputs = tiny.inputs(images[:1], [QUESTION])
    n = inputs["input_ids"].shape[1]
    pruner = RandomPruner(k=k, budget=Budget(64))
    with prune(tiny.model, pruner, sample_ids=["s0"]) as runtime:
        logits = tiny.model(**inputs).logits
        kept = runtime.layers[k].orig_index[0]
        tokens, _ = generate(tiny.model, inputs)
    is_image = inputs["input_ids"][0] == tiny.model.config.image_token_id
    assert int(is_image[kept].sum()) == 64 and int((~is_image[kept]).sum()) == int((~is_image).sum())
    hidden = torch.ones(1, n, dtype=torch.bool)
    hidden[0, kept] = False
    with hide_keys_from(tiny.model, [None] * k + [hidden] * (4 - k)):
        reference = tiny.model(**inputs).logits
        reference_tokens, _ = generate(tiny.model, inputs)
    assert logits.shape[1] == kept.numel()
    assert (logits[0] - reference[0, kept]).abs().max() <= 1e-4
    assert torch.equal(tokens, reference_tokens)


@torch.no_grad()
def test_kv_cache_lengths_and_mean_vision_tokens(tiny, images):
    inputs = tiny.inputs(images[:1], [QUESTION])
    n = inputs["input_ids"].shape[1]
    with prune(tiny.model, RandomPruner(k=2, budget=Budget(64))) as runtime:
        out = tiny.model(**inputs, use_cache=True)
    lengths = [layer.keys.shape[2] for layer in returned_cache(out).layers]
    assert lengths == [n, n, n - 512, n - 512]
    per_layer = runtime.vision_tokens_per_layer()[0].tolist()
    assert per_layer == [576, 576, 64, 64]
    assert sum(per_layer) / len(per_layer) == (2 * 576 + 2 * 64) / 4

    with prune(tiny.model, RandomPruner(k=1, budget=Budget(192, "average"))) as runtime:
        tiny.model(**inputs)
    per_layer = runtime.vision_tokens_per_layer()[0].tolist()
    assert per_layer == [576, 64, 64, 64]  # keep = (192*4 - 1*576) / 3 = 64
    assert sum(per_layer) / len(per_layer) == 192

    with prune(tiny.model, RandomPruner(k=1, budget=Budget(64))) as runtime:
        out = tiny.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                  return_dict_in_generate=True)
    lengths = [layer.keys.shape[2] for layer in returned_cache(out).layers]
    assert lengths == [n + 2, n - 512 + 2, n - 512 + 2, n - 512 + 2]  # the last new token is not fed back


@torch.no_grad()
@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_padded_batch_equals_each_sample_alone(tiny, images, positions, k):
    questions = [QUESTION, "Describe the colours and the shapes you can see in this picture, please."]
    inputs = tiny.inputs(images, questions)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded"
    pruner = RandomPruner(k=k, budget=Budget(64), positions=positions)
    with prune(tiny.model, pruner, sample_ids=["a", "b"]):
        batch_tokens, batch_logits = generate(tiny.model, inputs)
    width = inputs["input_ids"].shape[1]
    for row in range(2):
        alone = tiny.inputs(images[row: row + 1], questions[row: row + 1])
        with prune(tiny.model, pruner, sample_ids=[["a", "b"][row]]):
            tokens, logits = generate(tiny.model, alone)
        assert torch.equal(batch_tokens[row, width:], tokens[0, alone["input_ids"].shape[1]:])
        assert (batch_logits[row] - logits[0]).abs().max() <= 1e-4


class AverageAdjacentFeatures(TokenPruner):
    """A pre-LLM reduction for the test: mean of each pair of adjacent vision features (576 -> 288)."""

    def reduce_image_features(self, features, vision):
        return features.view(features.shape[0], -1, 2, features.shape[-1]).mean(dim=2)


@torch.no_grad()
def test_pre_llm_reduction_equals_a_shorter_input(tiny, images):
    runtime = assert_equals_a_shorter_input(
        tiny, images, AverageAdjacentFeatures(positions="compact"),
        lambda features: AverageAdjacentFeatures().reduce_image_features(features, None))
    assert runtime.vision_tokens_per_layer().tolist() == [[288] * 4]


def assert_equals_a_shorter_input(loaded, images, pruner: TokenPruner, reduce) -> PruningRuntime:
    """A pre-LLM reduction run by the runtime equals `reduce` (features -> the same reduced features) as a plain
    projector hook on a prompt that only ever had as many <image> placeholders as reduced tokens."""
    inputs = loaded.inputs(images[:1], [QUESTION])
    with prune(loaded.model, pruner, sample_ids=["s"]) as runtime:
        logits = loaded.model(**inputs).logits
        tokens, _ = generate(loaded.model, inputs)
    count = runtime.vision_tokens_per_layer()[0, 0].item()
    assert runtime.vision_tokens_per_layer().tolist() == [[count] * len(runtime.layers)] and count < 576

    image_id = loaded.model.config.image_token_id
    ids = inputs["input_ids"][0]
    first = int((ids == image_id).nonzero()[0])
    short_ids = torch.cat([ids[: first + count], ids[first + 576:]])[None]
    short = {"input_ids": short_ids, "attention_mask": torch.ones_like(short_ids),
             "pixel_values": inputs["pixel_values"]}
    projector = loaded.model.model.multi_modal_projector
    handle = projector.register_forward_pre_hook(lambda module, args: (reduce(args[0]),))
    try:
        reference = loaded.model(**short).logits
        reference_tokens, _ = generate(loaded.model, short)
    finally:
        handle.remove()
    assert (logits - reference).abs().max() <= 1e-5
    assert torch.equal(tokens[0, ids.numel():], reference_tokens[0, short_ids.shape[1]:])
    return runtime


@torch.no_grad()
def test_compact_positions_equal_a_shorter_input(tiny, images):
    """k=0 with compact positions is exactly a prompt that only ever had the kept image tokens."""
    inputs = tiny.inputs(images[:1], [QUESTION])
    pruner = RandomPruner(k=0, budget=Budget(100), positions="compact")
    with prune(tiny.model, pruner, sample_ids=["s"]) as runtime:
        logits = tiny.model(**inputs).logits
        tokens, _ = generate(tiny.model, inputs)
    kept = runtime.layers[0].orig_index[0]

    embeds = tiny.model.model.get_input_embeddings()(inputs["input_ids"])
    features = tiny.model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    image = inputs["input_ids"][0] == tiny.model.config.image_token_id
    embeds[0, image] = features
    short = embeds[:, kept]
    reference = tiny.model(inputs_embeds=short, attention_mask=torch.ones(1, kept.numel(), dtype=torch.long)).logits
    reference_tokens = tiny.model.generate(inputs_embeds=short, attention_mask=torch.ones(1, kept.numel(),
                                           dtype=torch.long), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                           do_sample=False)
    assert (logits - reference).abs().max() <= 1e-5
    assert torch.equal(tokens[0, inputs["input_ids"].shape[1]:], reference_tokens[0])


class MergeRest(TokenPruner):
    """Keeps the first 100 vision tokens at layer 2 and merges the other 476 into `groups` means."""

    groups: int = 1

    def select(self, layer, state):
        if layer != 2:
            return None
        vision = state.hidden_states.gather(
            1, state.vision_index[:, :, None].expand(-1, -1, state.hidden_states.shape[2]))
        keep = torch.arange(100).expand(state.batch_size, -1)
        merged = torch.stack([part.mean(dim=1) for part in vision[:, 100:].chunk(self.groups, dim=1)], dim=1)
        return Selection(keep=keep, merged=merged)


@torch.no_grad()
def test_merged_tokens_are_cached_and_batched(tiny, images):
    questions = [QUESTION, "Which shapes are there, and what are their colours?"]
    inputs = tiny.inputs(images, questions)
    n = inputs["input_ids"].shape[1]
    with prune(tiny.model, MergeRest(positions="compact")) as runtime:
        out = tiny.model(**inputs, use_cache=True)
        batch_tokens, _ = generate(tiny.model, inputs)
    assert runtime.vision_tokens_per_layer().tolist() == [[576, 576, 101, 101]] * 2
    assert [layer.keys.shape[2] for layer in returned_cache(out).layers] == [n, n, n - 475, n - 475]
    for row in range(2):
        alone = tiny.inputs(images[row: row + 1], questions[row: row + 1])
        with prune(tiny.model, MergeRest(positions="compact")):
            tokens, _ = generate(tiny.model, alone)
        assert torch.equal(batch_tokens[row, n:], tokens[0, alone["input_ids"].shape[1]:])


@torch.no_grad()
def test_merged_tokens_sit_between_the_kept_vision_tokens_and_the_text(tiny, images):
    inputs = tiny.inputs(images[:1], [QUESTION])
    pruner = MergeRest(positions="compact")
    pruner.groups = 7
    with prune(tiny.model, pruner) as runtime:
        tiny.model(**inputs)
    order = runtime.layers[2].orig_index[0]
    vision = runtime.state.is_vision[0]
    first_vision = int(vision.nonzero()[0])
    assert vision[first_vision: first_vision + 107].all() and int(vision.sum()) == 107  # 100 kept + 7 merged
    assert bool((order[1:] >= order[:-1]).all())  # original order, merged tokens on their image's last slot


class RecordLastRow(TokenPruner):
    def probe(self, layer, state):
        return Probe(queries=state.last_query, values=True) if layer == 1 else None


@torch.no_grad()
def test_probe_equals_eager_attention_without_switching_backend(images):
    sdpa, eager = tiny_model(), tiny_model(attn_implementation="eager")
    inputs = sdpa.inputs(images, [QUESTION, "Describe the colours and the shapes you can see, please."])
    with prune(sdpa.model, RecordLastRow()) as runtime:
        sdpa.model(**inputs)
        assert sdpa.model.config.text_config._attn_implementation == "prunebench_sdpa"
    assert sdpa.model.config.text_config._attn_implementation == "sdpa"
    probe = runtime.state.probes[1]
    reference = eager.model(**inputs, output_attentions=True).attentions[1][:, :, -1:]
    assert probe.attention.shape == reference.shape
    assert (probe.attention - reference).abs().max() <= 1e-5
    assert probe.values.shape[:3] == (2, 4, inputs["input_ids"].shape[1])  # 2 kv heads repeated to 4


class MaskVisionByEdit(TokenPruner):
    """Zero attention to vision keys in layers 0-1 and renormalise: must equal hiding those keys by the mask."""

    def attention_edit(self, layer, state):
        if layer > 1:
            return None

        def edit(probs, state):
            probs = probs.masked_fill(state.is_vision[:, None, None, :], 0.0)
            return probs / probs.sum(dim=-1, keepdim=True)

        return edit


@torch.no_grad()
def test_attention_edit_runs_only_in_the_asked_layers(tiny, images):
    inputs = tiny.inputs(images[:1], [QUESTION])
    with prune(tiny.model, MaskVisionByEdit()):
        logits = tiny.model(**inputs).logits
    vision = inputs["input_ids"] == tiny.model.config.image_token_id
    # Reference: vision keys hidden by the mask in layers 0-1 only (every row keeps the system-prompt keys).
    hidden_layers = {0, 1}

    def hook(module, args, kwargs):
        if module.self_attn.layer_idx not in hidden_layers:
            return None
        n = args[0].shape[1] if args else kwargs["hidden_states"].shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        kwargs["attention_mask"] = causal[None, None] & ~vision[:, None, None, :]
        return args, kwargs

    layers = tiny.model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        reference = tiny.model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    text = ~vision[0]
    assert (logits[0, text] - reference[0, text]).abs().max() <= 1e-4


def test_batch_size_one_methods_refuse_batches(tiny, images):
    class OnlyOne(TokenPruner):
        supports_batching = False

    inputs = tiny.inputs(images, [QUESTION, QUESTION])
    with prune(tiny.model, OnlyOne()), pytest.raises(ValueError, match="batch size 1 only"):
        tiny.model(**inputs)


@torch.no_grad()
def test_prompt_without_image_runs_unpruned(tiny):
    inputs = tiny.inputs(None, [QUESTION])
    reference = tiny.model(**inputs).logits
    with prune(tiny.model, RandomPruner(k=0, budget=Budget(8))) as runtime:
        logits = tiny.model(**inputs).logits
    assert not runtime.active
    assert torch.equal(logits, reference)
