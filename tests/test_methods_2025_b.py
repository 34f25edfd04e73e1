"""DART, VisPruner and PruMerge/PruMerge+: their selection rules on hand-built tensors against hand-derived values and
straightforward loops written from the spec (methods-2025.md), the runtime checks (DART: the attention-mask
reference; the pre-LLM two: a genuinely shorter input) and the keep counts on LLaVA-1.5 geometry."""

from __future__ import annotations

import math

import pytest
import torch

from harness.config import check_overrides
from harness.runtime import ProbeResult, PruneState, VisionProbe, prune
from methods import DART, Budget, ConfigError, PruMerge, VisPruner
from methods.prumerge import iqr_outliers
from tests.conftest import tiny_model
from tests.test_baselines import assert_equals_attention_mask_reference
from tests.test_baselines import test_batched_methods_give_each_sample_its_own_result as batched_equals_alone
from tests.test_baselines import test_declared_vision_schedules_are_what_runs as schedule_is_what_runs
from tests.test_runtime import QUESTION, assert_equals_a_shorter_input


@pytest.fixture(scope="module")
def eight_layers():
    return tiny_model(num_layers=8)


# ---------------------------------------------------------------------- DART
def dart_state(keys: torch.Tensor, hidden: torch.Tensor, vision: range, pad: int = 0) -> PruneState:
    n = hidden.shape[1]
    is_vision = torch.zeros(1, n, dtype=torch.bool)
    is_vision[0, vision.start:vision.stop] = True
    valid = torch.ones(1, n, dtype=torch.bool)
    valid[0, :pad] = False
    st = PruneState(num_layers=4, sample_ids=["s"], orig_index=torch.arange(n)[None], is_vision=is_vision,
                    valid=valid, positions=torch.arange(n)[None], hidden_states=hidden, final_norm=lambda h: h)
    st.probes[1] = ProbeResult(None, None, None, None, keys)
    return st


def dart_by_the_spec(key_norms: list[float], states: torch.Tensor, start: int, end: int, per_pivot: int,
                     order=lambda pivots: list(set(pivots))) -> list[int]:
    """§1.10 of the spec with Python sets and lists (indices absolute, the reference's): kept image tokens, indices
    into the image. `order` puts the pivots in the order they pick (the reference: its Python set's)."""
    def top(first: int, last: int, count: int) -> list[int]:
        return sorted(range(first, last), key=lambda i: -key_norms[i])[:count]

    image_pivots, text_pivots = top(start, end, 4), top(end, len(key_norms), 4)
    pool, keep = set(range(start, end)) - set(image_pivots), set(image_pivots)
    for pivot in order(image_pivots + text_pivots):
        candidates = list(pool)
        cosine = [float(torch.nn.functional.cosine_similarity(states[pivot], states[j], dim=0)) for j in candidates]
        picked = {candidates[i] for i in sorted(range(len(candidates)), key=lambda i: cosine[i])[:per_pivot]}
        keep |= picked
        pool -= picked
    return sorted(i - start for i in keep)


def test_dart_pivots_are_the_largest_l1_key_norms_and_each_keeps_its_least_similar_token():
    # 3 text tokens, 14 image tokens (3..16), 5 text tokens after it; budget 8: one token per pivot, 4 + 8 = 12 kept.
    n, start, end = 22, 3, 17
    keys = torch.zeros(1, 2, n, 2)  # (B, kv_heads, n, head_dim): L1 over both heads and dims
    keys[0, 0, :, 0] = 0.1
    keys[0, :, [4, 6, 9, 11], :] = 1.0  # image pivots: L1 4.0 ...
    keys[0, 0, 5, 0] = 3.5  # ... ahead of token 5 (L1 3.5), although its L2 (3.5) beats theirs (2.0)
    keys[0, 0, [0, 1], 0] = 9.0  # text *before* the image is never a pivot
    keys[0, 0, 17:, 0] = torch.tensor([5.0, 4.0, 0.2, 6.0, 7.0])  # text pivots 20, 21, 17, 18 (19 is not)
    # Every pivot points along axis 0; the other image tokens at growing angles from it, 5 and 13 the closest two.
    angle = torch.zeros(n)
    angle[[3, 7, 8, 10, 12, 14, 15, 16]] = torch.tensor([0.5, 0.8, 1.1, 1.4, 1.7, 2.0, 2.3, 2.6])
    angle[[5, 13]] = torch.tensor([0.1, 0.2])
    hidden = torch.stack([angle.cos(), angle.sin()], dim=-1)[None]
    pruner = DART(k=2, budget=Budget(8))
    assert pruner.keep_count(14, 4) == 12 and pruner.per_pivot(14, 4) == 1
    kept = pruner.select(2, dart_state(keys, hidden, range(start, end))).keep[0].tolist()
    # The 8 pivots each take the least similar token left: all but 5 and 13; text pivots are not kept.
    assert kept == [i - start for i in range(start, end) if i not in (5, 13)]


def test_dart_follows_the_python_set_order_of_its_pivots_and_ignores_left_padding():
    generator = torch.Generator().manual_seed(3)
    n, start, end, pad = 70, 6, 62, 2  # padded row: the reference's indices are 2 less
    keys = torch.randn(1, 2, n, 4, generator=generator)
    hidden = torch.randn(1, n, 8, generator=generator)
    pruner = DART(k=2, budget=Budget(16))
    kept = pruner.select(2, dart_state(keys, hidden, range(start, end), pad=pad)).keep[0].tolist()
    key_norms = keys.abs().sum((1, 3))[0].tolist()
    expected = dart_by_the_spec(key_norms[pad:], hidden[0, pad:], start - pad, end - pad, 2)
    assert len(kept) == 4 + 8 * 2 and kept == expected
    # The set order matters: pivots taken in ascending order would keep other tokens on this input.
    assert kept != dart_by_the_spec(key_norms[pad:], hidden[0, pad:], start - pad, end - pad, 2, order=sorted)


def test_dart_keeps_four_more_than_the_budget_on_llava_geometry():
    assert [DART(budget=Budget(b)).keep_count(576, 32) for b in (192, 128, 64)] == [196, 132, 68]
    assert DART(budget=Budget(64)).vision_schedule(576, 32) == [576] * 2 + [68] * 30
    with pytest.raises(ConfigError, match="k must be at least 1"):
        DART(k=0, budget=Budget(64)).validate(576, 32)
    with pytest.raises(ConfigError, match="asks for more than"):
        DART(budget=Budget(576)).validate(576, 32)


@torch.no_grad()
def test_dart_equals_its_attention_mask_reference_and_generates(eight_layers, images):
    runtime = assert_equals_attention_mask_reference(eight_layers, images, DART(k=2, budget=Budget(64)))
    assert runtime.vision_tokens_per_layer()[0].tolist() == [576, 576] + [68] * 6


@torch.no_grad()
def test_dart_in_a_padded_batch_gives_each_sample_its_own_result(eight_layers, images):
    """Each row's pivots take their set order from indices without the left padding: batched equals alone."""
    batched_equals_alone(eight_layers, images, lambda: DART(budget=Budget(64)))
    schedule_is_what_runs(eight_layers, images, lambda: DART(budget=Budget(64)))


# ---------------------------------------------------------------------- VisPruner
def vispruner_by_the_spec(attention: list[float], features: torch.Tensor, total: int, ratio: float) -> list[int]:
    """§3.3 of the spec with plain lists."""
    unit = features / features.norm(dim=-1, keepdim=True)
    important = int(total * ratio)
    order = sorted(range(len(attention)), key=lambda i: -attention[i])
    residual = order[important:] if total > important else []  # no diverse tokens: the important ones only
    while (drop := min(8, len(residual) - (total - important))) > 0:
        even, odd = residual[0::2], residual[1::2]
        score = {i: max(float(unit[i] @ unit[j]) for j in odd) for i in even}
        residual = sorted(even, key=lambda i: -score[i])[drop:] + odd
    return sorted(order[:important] + residual)


def test_vispruner_important_by_cls_attention_then_duplicates_removed():
    # 8 patches, T = 4, r = 0.5: patches 1 and 3 have the most CLS attention (mean of two heads, CLS column ignored).
    cls = torch.zeros(1, 2, 9)
    cls[0, 0, 0] = 5.0
    cls[0, :, 1:] = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.05, 0.6, 0.4]] * 2)
    features = torch.eye(8)[[2, 2, 2, 2, 0, 1, 2, 0]][None]  # patches 4 and 7 coincide; 5 is unlike both
    probe = VisionProbe(hidden=torch.zeros(1, 9, 8), cls_attention=cls, keys=torch.zeros(1, 2, 9, 4))
    pruner = VisPruner(budget=Budget(4))
    out = pruner.reduce_image_features(features, probe)
    # Residual by attention [6, 7, 2, 4, 0, 5]: round 1 drops all 3 even places (drop 4), leaving [7, 4, 5];
    # round 2 pairs 7 and 5 against 4 and drops 7, its duplicate.
    assert pruner.sources == [[[1], [3], [4], [5]]]
    assert torch.equal(out, features[:, [1, 3, 4, 5]])


@pytest.mark.parametrize(("total", "ratio"), [(10, 0.4), (12, 0.5), (6, 1.0), (5, 0.0)])
def test_vispruner_matches_the_spec_loop(total, ratio):
    generator = torch.Generator().manual_seed(total)
    features = torch.randn(2, 40, 6, generator=generator)
    cls = torch.rand(2, 3, 41, generator=generator)
    pruner = VisPruner(budget=Budget(total), important_ratio=ratio)
    out = pruner.reduce_image_features(features, VisionProbe(torch.zeros(2, 41, 6), cls, torch.zeros(2, 3, 41, 2)))
    for image in range(2):
        expected = vispruner_by_the_spec(cls[image, :, 1:].mean(0).tolist(), features[image], total, ratio)
        assert [source[0] for source in pruner.sources[image]] == expected
        assert torch.equal(out[image], features[image, expected])


def test_vispruner_score_dtype_and_ratio_are_checked():
    with pytest.raises(ConfigError, match="score_dtype must be one of model, float32, float16"):
        VisPruner(budget=Budget(64), score_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"important_ratio must be in \[0, 1\]"):
        VisPruner(budget=Budget(64), important_ratio=1.5)


@torch.no_grad()
@pytest.mark.parametrize("budget", [192, 128, 64])
def test_vispruner_keeps_exactly_the_budget(tiny, images, budget):
    inputs = tiny.inputs(images[:1], [QUESTION])
    pruner = VisPruner(budget=Budget(budget))
    with prune(tiny.model, pruner, sample_ids=["s"]) as runtime:
        tiny.model(**inputs)
    assert runtime.vision_tokens_per_layer()[0].tolist() == [budget] * 4 == pruner.vision_schedule(576, 4)


@torch.no_grad()
def test_vispruner_equals_a_shorter_input_of_the_kept_patches(tiny, images):
    pruner = VisPruner(budget=Budget(64))
    assert_equals_a_shorter_input(tiny, images, pruner,
                                  lambda features: features[:, [source[0] for source in pruner.sources[0]]])




# ---------------------------------------------------------------------- PruMerge / PruMerge+
def test_iqr_outliers_use_linear_percentiles():
    # Sorted values 1..7, 100: Q1 = 2.75, Q3 = 6.25 (linear), bound 6.25 + 1.5 * 3.5 = 11.5: only 100 is above.
    assert iqr_outliers(torch.tensor([5.0, 1, 100, 3, 2, 7, 6, 4])) == 1
    # 1..7, 11.4 and 11.6 around that bound (Q3 moves to 7 + 0.25*(11.4-7) = 8.1, bound 8.1 + 1.5*5.35 = 16.1): none.
    assert iqr_outliers(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 11.4, 11.6])) == 0


def prumerge_by_the_spec(query, keys, features, variant: str, neighbours: int):
    """§4.3-4.4 of the spec, token by token as the reference loops (one image)."""
    num, width = features.shape
    attention = ((query @ keys.T) * width ** -0.5).softmax(-1)[0, 1:]
    values = sorted(attention.tolist())

    def percentile(fraction: float) -> float:  # numpy's linear interpolation, by hand
        position = fraction * (num - 1)
        low = math.floor(position)
        return values[low] + (position - low) * (values[min(low + 1, num - 1)] - values[low])

    bound = percentile(0.75) + 1.5 * (percentile(0.75) - percentile(0.25))
    count = sum(a > bound for a in attention.tolist())
    kept = sorted(range(num), key=lambda i: -float(attention[i]))[:count]
    if variant == "plus":
        kept += [x for x in range(0, num - 1, int(int(1 / (count / num)) / 3)) if x not in kept]
    pruned = [i for i in range(num) if i not in kept]
    unit = keys[1:] / keys[1:].norm(dim=-1, keepdim=True)
    out = []
    for i, token in enumerate(kept):
        rest = kept[:i] + kept[i + 1:] + pruned
        nearest = [rest[j] for j in (unit[rest] @ unit[token]).topk(neighbours).indices.tolist()]
        out.append(features[token] + sum(attention[j] * features[j] for j in nearest))
    out.append(sum(attention[j] * features[j] for j in pruned))
    return kept, torch.stack(out)


def prumerge_probe(num: int = 64, width: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1 + num, width, generator=generator)
    keys[1:, 0] = torch.rand(num, generator=generator) * 0.2 - 0.1  # near-uniform attention ...
    query = torch.zeros(1, width)
    query[0, 0] = 6.0
    keys[1 + torch.tensor([5, 17, 40, 41]), 0] = torch.tensor([3.0, 2.5, 4.0, 3.5])  # ... but four clear outliers
    features = torch.randn(num, width, generator=generator)
    # The probe holds q/k per head (2 heads of width/2); PruMerge concatenates them back to one head of `width`.
    probe = VisionProbe(hidden=torch.zeros(1, 1 + num, width), cls_attention=torch.zeros(1, 2, 1 + num),
                        keys=keys.view(1, 1 + num, 2, -1).transpose(1, 2),
                        cls_query=query.view(1, 1, 2, -1).transpose(1, 2))
    return probe, query, keys, features


@pytest.mark.parametrize("variant", ["plus", "prumerge"])
def test_prumerge_selects_iqr_outliers_and_merges_without_averaging(variant):
    probe, query, keys, features = prumerge_probe()
    pruner = PruMerge(variant=variant, neighbours=6)
    out = pruner.reduce_image_features(features[None], probe)
    kept, expected = prumerge_by_the_spec(query, keys, features, variant, 6)
    assert pruner.outliers == 4 and kept[:4] == [40, 41, 5, 17]  # by attention, descending
    if variant == "plus":  # stride int(int(64/4)/3) = 5 over 0..62, without the outliers, ascending
        assert kept[4:] == [0, 10, 15, 20, 25, 30, 35, 45, 50, 55, 60]
    else:
        assert len(kept) == 4
    assert out.shape == (1, len(kept) + 1, 8)
    assert (out[0] - expected).abs().max() <= 1e-5
    assert [source[0] for source in pruner.sources[0][:-1]] == kept and len(pruner.sources[0][0]) == 7
    assert sorted(pruner.sources[0][-1]) == pruner.sources[0][-1] and not set(pruner.sources[0][-1]) & set(kept)


def test_prumerge_has_no_budget_and_runs_alone():
    assert not PruMerge.uses_budget and not PruMerge.supports_batching and PruMerge().vision_schedule(576, 32) is None
    with pytest.raises(ConfigError, match="variant must be one of plus, prumerge"):
        PruMerge(variant="advanced")
    with pytest.raises(ConfigError, match="neighbours must be below"):
        PruMerge(neighbours=576).validate(576, 32)
    with pytest.raises(ConfigError, match=r"supports batch size 1 only \(it decides per sample\); set batch_size=1"):
        check_overrides(["method=prumerge_plus", "batch_size=16"])


@torch.no_grad()
@pytest.mark.parametrize("variant", ["plus", "prumerge"])
def test_prumerge_equals_a_shorter_input_of_its_merged_tokens(tiny, images, variant):
    pruner, reduced = PruMerge(variant=variant), []
    merge = pruner.reduce_image_features

    def recorded(features, vision):  # the merged tokens the runtime hands the projector
        reduced.append(merge(features, vision))
        return reduced[-1]

    pruner.reduce_image_features = recorded
    runtime = assert_equals_a_shorter_input(tiny, images, pruner, lambda features: reduced[0])
    count = runtime.vision_tokens_per_layer()[0, 0].item()
    assert count == len(pruner.sources[0]) and pruner.outliers > 0
    assert (count == pruner.outliers + 1) == (variant == "prumerge")
