"""FastV, SparseVLM, PDrop and VisionZip: scoring rules on hand-built tensors, physical drops against the
attention-mask reference, generation with the KV cache, and the budget arithmetic of baselines.md."""

from __future__ import annotations

import statistics

import pytest
import torch

from harness.cost import returned_cache
from harness.runtime import ProbeResult, PruneState, PruningRuntime, VisionProbe, prune
from methods import Budget, ConfigError, FastV, PDrop, Probe, SparseVLM, TokenPruner, VisionZip
from methods.sparsevlm import density_peak_merge
from tests.conftest import tiny_model
from tests.test_runtime import NEW_TOKENS, QUESTION, generate, hide_keys_from

N, V0, V1 = 10, 2, 6  # a 10-token sequence with vision tokens at 2..5


def state(num_layers: int = 32) -> PruneState:
    is_vision = torch.zeros(1, N, dtype=torch.bool)
    is_vision[0, V0:V1] = True
    return PruneState(num_layers=num_layers, sample_ids=["s"], orig_index=torch.arange(N)[None], is_vision=is_vision,
                      valid=torch.ones(1, N, dtype=torch.bool), positions=torch.arange(N)[None])


# ---------------------------------------------------------------------- scoring rules
def test_fastv_scores_the_last_query_at_k_minus_1_averaged_over_heads():
    st = state()
    attention = torch.zeros(1, 2, 1, N)
    attention[0, 0, 0, [3, 5]] = torch.tensor([0.4, 0.2])  # head 0 likes vision tokens 1 and 3
    attention[0, 1, 0, [2, 5]] = torch.tensor([0.1, 0.5])  # head 1 likes 0 and 3
    st.probes[1] = ProbeResult(torch.tensor([[N - 1]]), attention, None)
    pruner = FastV(k=2, budget=Budget(2))
    assert pruner.probe(1, st).queries.tolist() == [[N - 1]] and pruner.probe(2, st) is None
    assert torch.allclose(pruner.score(st), torch.tensor([[0.05, 0.2, 0.0, 0.35]]))
    assert pruner.select(2, st).keep.tolist() == [[1, 3]]
    assert pruner.select(1, st) is None


def test_fastv_keep_counts_under_both_conventions():
    assert FastV(k=2, budget=Budget(192)).keep_count(576, 32) == 192
    assert [FastV(k=2, budget=Budget(n, "average")).keep_count(576, 32) for n in (192, 128, 64)] == [166, 98, 30]
    assert FastV(k=2, ratio=0.5).keep_count(576, 32) == 288 and not FastV(ratio=0.5).uses_budget
    with pytest.raises(ConfigError, match="k must be at least 1"):
        FastV(k=0, budget=Budget(64)).validate(576, 32)


def test_sparsevlm_raters_are_post_image_tokens_above_mean_relevance():
    st = state()
    hidden = torch.zeros(1, N, 4)
    hidden[0, V0:V1, 0] = 1.0  # vision tokens point along axis 0
    hidden[0, [6, 8], 0] = 3.0  # text tokens 6 and 8 align with them, 7 and 9 do not
    st.hidden_states = hidden
    assert SparseVLM(budget=Budget(192)).choose_raters(st).tolist() == [6, 8]


def test_sparsevlm_scores_rater_rows_averaged_over_heads_then_raters():
    pruner = SparseVLM(budget=Budget(64), recycle=False)
    st = state()
    pruner.begin(st)
    pruner.schedule = {2: 2}
    attention = torch.zeros(1, 2, 2, N)
    attention[0, 0, 0, [2, 3]] = torch.tensor([0.6, 0.3])
    attention[0, 1, 1, [4, 5]] = torch.tensor([0.2, 0.5])
    st.probes[2] = ProbeResult(torch.tensor([[7, 9]]), attention, None)
    selection = pruner.prune(2, st)
    assert selection.keep.tolist() == [[0, 3]]  # scores 0.15, 0.075, 0.05, 0.125
    assert selection.merged is None


def test_density_peak_merge_finds_two_obvious_clusters():
    a = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    b = torch.tensor([[5.0, 5.0], [5.1, 5.0]])
    tokens = torch.cat([a, b])
    merged = density_peak_merge(tokens, 2, torch.Generator().manual_seed(0))
    merged = merged[merged[:, 0].argsort()]
    assert torch.allclose(merged, torch.stack([a.sum(0) / (3 + 1e-6), b.sum(0) / (2 + 1e-6)]), atol=1e-6)


def test_sparsevlm_recycles_the_top_deleted_tokens_into_clusters():
    pruner = SparseVLM(budget=Budget(64))
    st = state()
    pruner.begin(st)
    pruner.schedule = {2: 1}
    st.hidden_states = torch.randn(1, N, 4, generator=torch.Generator().manual_seed(0))
    attention = torch.zeros(1, 1, 1, N)
    attention[0, 0, 0, V0:V1] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    st.probes[2] = ProbeResult(torch.tensor([[8]]), attention, None)
    selection = pruner.prune(2, st)
    assert selection.keep.tolist() == [[0]]
    # 3 deleted -> int(0.3*3)+1 = 1 recycled (the best deleted, vision token 1) -> int(1/10)+1 = 1 cluster of itself
    assert torch.allclose(selection.merged[0, 0], st.hidden_states[0, V0 + 1] / (1 + 1e-6))


def test_visionzip_dominant_by_cls_attention_and_contextual_merge():
    hidden = torch.arange(8 * 2, dtype=torch.float32).view(1, 8, 2)  # CLS + 7 patches
    cls = torch.zeros(1, 2, 8)
    cls[0, 0, 5], cls[0, 1, 2] = 0.9, 0.5  # summed over heads: patch 5 first, then patch 2
    keys = torch.zeros(1, 2, 8, 2)
    keys[0, :, :, 0] = 1.0
    keys[0, :, [4, 7], 1] = 5.0  # tokens 4 and 7 look alike, the others point along axis 0
    probe = VisionProbe(hidden=hidden, cls_attention=cls, keys=keys)
    out = VisionZip(dominant=3, contextual=2).reduce_image_features(hidden[:, 1:], probe)
    assert torch.equal(out[0, :3], hidden[0, [0, 2, 5]])  # CLS + the top 2 patches, in original order
    # Remaining tokens 1,3,4,6,7: stride 5//2 = 2 -> targets are remaining[0]=1 and remaining[2]=4; 3 and 6 join 1,
    # 7 joins 4 (its key matches). Contextual = target + mean of the members.
    assert torch.equal(out[0, 3], hidden[0, 1] + (hidden[0, 3] + hidden[0, 6]) / 2)
    assert torch.equal(out[0, 4], hidden[0, 4] + hidden[0, 7])


def test_visionzip_budgets_map_to_the_reference_settings():
    """LLaVA-1.5's 162+30, 108+20, 54+10, and 27+5 (the smallest per-crop LLaVA-NeXT one); others need both counts."""
    assert [VisionZip(budget=Budget(n)).counts() for n in (192, 128, 64, 32)] == [(162, 30), (108, 20), (54, 10),
                                                                               (27, 5)]
    with pytest.raises(ConfigError, match=r"for budget 48 set method\.dominant and method\.contextual"):
        VisionZip(budget=Budget(48)).counts()


def test_pdrop_schedules_and_budget_matching():
    layers, counts = PDrop().schedule(576, 32)
    assert (layers, counts) == ([8, 16, 24], [288, 144, 72])
    mean = (8 * 576 + 8 * 288 + 8 * 144 + 8 * 72) / 32
    assert mean == 270
    for budget in (192, 128, 64):
        layers, counts = PDrop(budget=Budget(budget, "average")).schedule(576, 32)
        spans = [2, 6, 8, 16]
        tbar = sum(n * s for n, s in zip([576, *counts], spans, strict=True)) / 32
        assert layers == [2, 8, 16] and budget - 1 < tbar <= budget, (budget, counts, tbar)
    with pytest.raises(ConfigError, match="out of reach"):
        PDrop(budget=Budget(30, "average")).schedule(576, 32)


# ---------------------------------------------------------------------- runs on the tiny model
class PreviewAndProbe(TokenPruner):
    def probe(self, layer, state):
        if layer == 2:
            self.preview = state.attention_preview(state.last_query)
            return Probe(queries=state.last_query)
        return None


@torch.no_grad()
def test_pdrop_preview_equals_the_layers_own_attention(tiny, images):
    inputs = tiny.inputs(images, [QUESTION, "Which shapes are there, and what are their colours?"])
    pruner = PreviewAndProbe()
    with prune(tiny.model, pruner) as runtime:
        tiny.model(**inputs)
    recorded = runtime.state.probes[2].attention
    assert (pruner.preview.to(recorded.dtype) - recorded).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def eight_layers():
    return tiny_model(num_layers=8)


METHODS_THAT_ONLY_DROP = {
    "fastv": lambda: FastV(k=2, budget=Budget(64)),
    "pdrop": lambda: PDrop(layers=(2, 4, 6), ratio=0.5, positions="original"),
    "sparsevlm": lambda: SparseVLM(budget=Budget(192), layers=(1, 3, 5), recycle=False, positions="original"),
}


@torch.no_grad()
@pytest.mark.parametrize("method", sorted(METHODS_THAT_ONLY_DROP))
def test_drop_only_methods_equal_their_attention_mask_reference(eight_layers, images, method):
    assert_equals_attention_mask_reference(eight_layers, images, METHODS_THAT_ONLY_DROP[method]())


def assert_equals_attention_mask_reference(loaded, images, pruner: TokenPruner) -> PruningRuntime:
    """A drop-only method's physically pruned run (logits, KV caches, generation) equals the model that keeps every
    token but hides the dropped ones' keys in the same layers."""
    model = loaded.model
    inputs = loaded.inputs(images[:1], [QUESTION])
    n = inputs["input_ids"].shape[1]
    with prune(model, pruner, sample_ids=["s"]) as runtime:
        out = model(**inputs, use_cache=True)
        tokens, _ = generate(model, inputs)
    kept = [record.orig_index[0] for record in runtime.layers]
    assert [layer.keys.shape[2] for layer in returned_cache(out).layers] == [k.numel() for k in kept]
    assert len({k.numel() for k in kept}) > 1, "the method must drop something"
    hidden = [torch.ones(1, n, dtype=torch.bool).index_fill_(1, k, False) for k in kept]
    with hide_keys_from(model, hidden):
        reference = model(**inputs).logits
        reference_tokens, _ = generate(model, inputs)
    assert (out.logits[0] - reference[0, kept[-1]]).abs().max() <= 1e-4
    assert torch.equal(tokens, reference_tokens)
    return runtime


@torch.no_grad()
@pytest.mark.parametrize("pruner", [SparseVLM(budget=Budget(64), layers=(1, 3, 5)), VisionZip(budget=Budget(64)),
                                    PDrop(budget=Budget(128))], ids=["sparsevlm-recycling", "visionzip", "pdrop"])
def test_merging_and_compacting_methods_generate_with_the_kv_cache(eight_layers, images, pruner):
    model = eight_layers.model
    inputs = eight_layers.inputs(images[:1], [QUESTION])
    with prune(model, pruner, sample_ids=["s"]) as runtime:
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True)
    per_layer = runtime.vision_tokens_per_layer()[0].tolist()
    cache = [layer.keys.shape[2] for layer in returned_cache(out).layers]
    text = inputs["input_ids"].shape[1] - 576
    assert cache == [text + v + NEW_TOKENS - 1 for v in per_layer]
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS


@pytest.fixture(scope="module")
def llava_depth():
    """576 vision tokens and 32 layers: the geometry the published budgets refer to."""
    return tiny_model(num_layers=32)


@torch.no_grad()
@pytest.mark.parametrize(("budget", "tbar", "counter"), [(192, 206.5, 192.0), (128, 145.4, 128.6), (64, 82.2, 64.8)])
def test_sparsevlm_processed_tokens_and_counter_match_the_reference(llava_depth, images, budget, tbar, counter):
    inputs = llava_depth.inputs(images[:1], [QUESTION])
    pruner = SparseVLM(budget=Budget(budget))
    with prune(llava_depth.model, pruner, sample_ids=["s"]) as runtime:
        llava_depth.model(**inputs)
    per_layer = runtime.vision_tokens_per_layer()[0].tolist()
    assert round(statistics.fmean(per_layer), 1) == tbar
    assert round(pruner.record(0)["counter_mean_vision_tokens"], 1) == counter


@torch.no_grad()
@pytest.mark.parametrize(("convention", "tbar"), [("exact", (2 * 576 + 30 * 192) / 32), ("average", 191.625)])
def test_fastv_mean_vision_tokens_under_both_conventions(llava_depth, images, convention, tbar):
    inputs = llava_depth.inputs(images[:1], [QUESTION])
    with prune(llava_depth.model, FastV(k=2, budget=Budget(192, convention))) as runtime:
        llava_depth.model(**inputs)
    assert statistics.fmean(runtime.vision_tokens_per_layer()[0].tolist()) == tbar


@torch.no_grad()
@pytest.mark.parametrize("make", [lambda: FastV(k=2, budget=Budget(64)), lambda: PDrop(budget=Budget(128)),
                                  lambda: VisionZip(budget=Budget(64))], ids=["fastv", "pdrop", "visionzip"])
def test_batched_methods_give_each_sample_its_own_result(eight_layers, images, make):
    questions = [QUESTION, "Describe the colours and the shapes you can see in this picture, please."]
    inputs = eight_layers.inputs(images, questions)
    with prune(eight_layers.model, make(), sample_ids=["a", "b"]):
        batch_tokens, batch_logits = generate(eight_layers.model, inputs)
    width = inputs["input_ids"].shape[1]
    for row in range(2):
        alone = eight_layers.inputs(images[row: row + 1], questions[row: row + 1])
        with prune(eight_layers.model, make(), sample_ids=[["a", "b"][row]]):
            tokens, logits = generate(eight_layers.model, alone)
        assert torch.equal(batch_tokens[row, width:], tokens[0, alone["input_ids"].shape[1]:])
        assert (batch_logits[row] - logits[0]).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("make", [lambda: FastV(k=2, budget=Budget(64)), lambda: PDrop(budget=Budget(128)),
                                  lambda: SparseVLM(budget=Budget(192), layers=(1, 3, 5)),
                                  lambda: SparseVLM(budget=Budget(64), version="2.0", layers=(1, 3, 5)),
                                  lambda: VisionZip(budget=Budget(128)), lambda: TokenPruner()],
                         ids=["fastv", "pdrop", "sparsevlm", "sparsevlm-2.0", "visionzip", "none"])
def test_declared_vision_schedules_are_what_runs(eight_layers, images, make):
    """The schedules FLOP projections use for full-size models equal the counts the runtime executes."""
    inputs = eight_layers.inputs(images[:1], [QUESTION])
    pruner = make()
    with prune(eight_layers.model, pruner, sample_ids=["s"]) as runtime:
        eight_layers.model(**inputs)
    assert runtime.vision_tokens_per_layer()[0].tolist() == pruner.vision_schedule(576, 8)
